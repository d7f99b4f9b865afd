"""LLaVA-OneVision with DyMU on transformers' ``LlavaOnevisionForConditionalGeneration`` (SigLIP + Qwen2, AnyRes).

Every crop of an image (the 384x384 base image and the grid crops of the best-fitting resolution) goes
through the DToMe SigLIP tower in one padded batch and merges independently with the same thresholds
(``docs/dymu-method.md`` Sec. 4). VTU then needs, per image, the map from every position of the
**virtual layout** to a merged token. Two layouts:

``layout="faithful"`` (default): exactly the unmodified model's layout. The map is computed by running the
host's own ``pack_image_features`` (base raster; crops stitched into one grid, unpadded to the aspect
ratio, ``anyres_max_9`` bilinear downsampling, an ``image_newline`` after every row) on a two-channel
tensor of (group id, a fixed per-id hash) instead of features, so it follows upstream by construction:

- a position whose value is one group's exact (id, hash) pair belongs to that group;
- every ``image_newline`` occurrence is a token of its own (its own group, the learned newline vector);
- **downsampling rule**: where the unmodified model bilinearly downsamples, a position whose non-zero
  bilinear weights all fall on patches of one group joins that group (its unmodified feature *is* that
  group's feature); a position that mixes several groups becomes a token of its own, holding exactly the
  mix the unmodified model computes. So merging nothing reproduces the unmodified model everywhere;
- merged tokens that lose all their positions to unpadding are dropped.

``layout="paper"``: the layout of the DyMU authors' code, kept to reproduce their numbers: the crops'
tokens flattened ``[base; crop1; crop2; ...]``, no unpadding, no newline tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from PIL import Image
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from .model import DyMULlava, EncodedImages, ImageLike, load_image

__all__ = ["DyMULlavaOnevision", "build_onevision_prompt", "virtual_layout", "LAYOUTS"]

logger = logging.getLogger(__name__)

LAYOUTS = ("faithful", "paper")
QWEN_SYSTEM = "You are a helpful assistant."
_NEWLINE = -1  # key of an image_newline position
_MIXED = -2  # key of a downsampled position that mixes several groups


def build_onevision_prompt(question: str, num_images: int = 1, system: str = QWEN_SYSTEM) -> str:
    """One-turn LLaVA-OneVision (Qwen2 chat) prompt ending where the assistant's answer starts.

    ``<image>`` placeholders (one per image, each followed by a newline) go before the question unless
    the question already contains them.

    Raises:
        ValueError: empty question.
    """
    if not question or not question.strip():
        raise ValueError("the question is empty; pass the text to ask about the image.")
    if "<image>" not in question:
        question = "<image>\n" * num_images + question
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


@torch.no_grad()
def virtual_layout(
    host: torch.nn.Module,
    crop_ids: torch.Tensor,
    image_size: torch.Tensor,
    vision_aspect_ratio: str,
) -> torch.Tensor:
    """Keys of an image's faithful virtual layout (see the module docstring).

    Args:
        host: the ``LlavaOnevisionModel`` (its ``pack_image_features`` and config are used).
        crop_ids: ``(n_crops, P)`` long, the merged token (image-global id ``>= 0``) of every patch of every
            crop, base crop first (``P`` = 729 for SigLIP-384/14).
        image_size: ``(2,)`` the image's ``(height, width)`` as the image processor reports it.
        vision_aspect_ratio: e.g. ``"anyres_max_9"``.

    Returns:
        ``(V,)`` long: the merged id of each virtual position, ``-1`` for ``image_newline`` positions, ``-2``
        for downsampled positions that mix several groups.
    """
    n_ids = int(crop_ids.max()) + 1
    # fixed pseudo-random hash per id, in float64: a bilinear mix of different ids cannot reproduce
    # one id's (id, hash) pair unless the other weights are below ~1e-9
    hashes = torch.rand(n_ids + 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids = crop_ids.cpu()
    channels = torch.stack([ids.double(), hashes[ids]], dim=-1)  # (n_crops, P, 2)
    newline = torch.tensor([float(_NEWLINE), float(hashes[n_ids])], dtype=torch.float64)
    packed, _ = host.pack_image_features(
        [channels], image_size.cpu()[None], image_newline=newline, vision_aspect_ratio=vision_aspect_ratio
    )
    value, hashed = packed[0][:, 0], packed[0][:, 1]  # (V,)
    key = value.round()
    index = key.long().clamp(0, n_ids - 1)
    tol = 1e-9
    is_group = (value - key).abs().lt(tol) & (key >= 0) & (hashed - hashes[index]).abs().lt(tol)
    is_newline = (value - _NEWLINE).abs().lt(tol) & (hashed - hashes[n_ids]).abs().lt(tol)
    keys = torch.full_like(index, _MIXED)
    keys[is_group] = index[is_group]
    keys[is_newline] = _NEWLINE
    return keys.to(crop_ids.device)


class DyMULlavaOnevision(DyMULlava):
    """A LLaVA-OneVision model, its tokenizer / image processor, and DyMU settings.

    Args:
        model: ``LlavaOnevisionForConditionalGeneration`` (DToMe / VTU applied or not).
        processor: any object with ``.tokenizer`` and ``.image_processor`` (LLaVA-OneVision's processor
            also needs a video processor, i.e. torchvision; the two parts suffice here).
        vtu: run the LLM with virtual token unmerging.
        layout: ``"faithful"`` or ``"paper"`` (see the module docstring).
    """

    def __init__(self, model, processor, vtu: bool = True, layout: str = "faithful"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
        super().__init__(model, processor, vtu=vtu, image_aspect_ratio="crop")
        self.layout = layout
        self.host = model.model

    def prompt(self, question: str, num_images: int = 1) -> str:
        """The Qwen2 chat prompt LLaVA-OneVision was trained with."""
        return build_onevision_prompt(question, num_images=num_images)

    def preprocess(self, images: Sequence[ImageLike]):  # pragma: no cover - use encode_prompt_images
        raise NotImplementedError("LLaVA-OneVision preprocesses per prompt (AnyRes); use encode_prompt_images.")

    def crops(self, image: ImageLike) -> torch.Tensor:
        """``(n_crops, 3, 384, 384)``: the base image and AnyRes grid crops of a single-image prompt."""
        processed = self.image_processor([load_image(image)], return_tensors="pt")
        config = self.model.config
        n = image_size_to_num_patches(processed["image_sizes"][0].tolist(), config.image_grid_pinpoints,
                                      config.vision_config.image_size)
        return processed["pixel_values"][0, :n]

    @torch.no_grad()
    def encode_prompt_images(self, images: Sequence[Sequence[ImageLike]]) -> EncodedImages:
        """AnyRes-encode the images of a batch of prompts; returns merged tokens and virtual group maps.

        As in the unmodified model, a prompt with one image gets the base image plus grid crops; a prompt
        with several images gets the base image only for each (``batch_num_images``).
        """
        groups = [[load_image(im) for im in imgs] for imgs in images if len(imgs)]
        if not groups:
            return EncodedImages([], [])
        processed = self.image_processor(groups, return_tensors="pt")
        pixels, sizes = processed["pixel_values"], processed["image_sizes"]  # (I, max_crops, 3, H, W), (I, 2)
        per_sample = [len(g) for g in groups]
        config = self.model.config
        crops_per_image = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) if n == 1 else 1
            for n, size in zip([n for n in per_sample for _ in range(n)], sizes.tolist())
        ]
        crops = torch.cat([p[:n] for p, n in zip(pixels, crops_per_image)]).to(self.device, self.dtype)
        tokens, lengths, group_ids = self._encode_crops(crops)
        projected = self.host.multi_modal_projector(tokens)  # (crops, N', C)
        features, group_index, start = [], [], 0
        for image, n_crops in enumerate(crops_per_image):
            lens = lengths[start : start + n_crops]
            offsets = torch.tensor([0] + lens[:-1], device=self.device).cumsum(0)
            merged = torch.cat([projected[start + c, :n] for c, n in enumerate(lens)])  # (n_i, C)
            crop_ids = group_ids[start : start + n_crops] + offsets[:, None]  # image-global ids
            feats, index = self._lay_out(merged, crop_ids, sizes[image])
            features.append(feats)
            group_index.append(index)
            start += n_crops
        return EncodedImages(features=features, group_index=group_index)

    def _encode_crops(self, crops: torch.Tensor) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """``(tokens (crops, N', C_vis), valid lengths, group ids (crops, P))`` from the (patched) tower."""
        if self.model.config.vision_feature_select_strategy != "full":
            raise NotImplementedError("LLaVA-OneVision with DToMe expects vision_feature_select_strategy='full'.")
        from dymu import is_patched

        if is_patched(self.tower):
            out = self.tower(crops)
            n = out.last_hidden_state.shape[1]
            lengths = out.padding_mask.sum(-1).tolist() if out.padding_mask is not None else [n] * crops.shape[0]
            return out.last_hidden_state, lengths, out.group_ids
        hidden = self.tower(crops, output_hidden_states=True).hidden_states[self.model.config.vision_feature_layer]
        ids = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        return hidden, [hidden.shape[1]] * hidden.shape[0], ids

    def _lay_out(self, merged: torch.Tensor, crop_ids: torch.Tensor, size: torch.Tensor):
        """Merged tokens in first-occurrence order and the virtual group map of one image."""
        if self.layout == "paper":
            raw = crop_ids.flatten()
        else:
            raw = virtual_layout(self.host, crop_ids, size, self.model.config.vision_aspect_ratio)
        n_groups = merged.shape[0]
        positions = torch.arange(raw.numel(), device=raw.device)
        # newline and mixed positions are tokens of their own: unique keys past the group ids
        keys = torch.where(raw >= 0, raw, n_groups + positions)
        unique, inverse = torch.unique(keys, return_inverse=True)
        first = torch.full((unique.numel(),), raw.numel(), device=raw.device).scatter_reduce(
            0, inverse, positions, reduce="amin"
        )
        order = first.argsort()  # merged tokens in order of first virtual occurrence (unique keys)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        token_keys = unique[order]
        feats = merged.new_empty(token_keys.numel(), merged.shape[-1])
        is_group = token_keys < n_groups
        feats[is_group] = merged[token_keys[is_group]]
        own_pos = token_keys[~is_group] - n_groups  # virtual positions of the tokens of their own
        is_newline = raw[own_pos] == _NEWLINE
        own = feats[~is_group]
        own[is_newline] = self.host.image_newline.to(feats.dtype)
        if (~is_newline).any():  # downsampled mixes: exactly the unmodified model's features there
            own[~is_newline] = self._host_features(merged, crop_ids, size)[own_pos[~is_newline]].to(feats.dtype)
        feats[~is_group] = own
        return feats, rank[inverse]

    def _host_features(self, merged: torch.Tensor, crop_ids: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """The unmodified model's packed features of this image, computed from the unmerged features.

        Used only for downsampled positions that mix several groups.
        """
        unmerged = merged[crop_ids]  # (n_crops, P, C): every patch carries its group's feature
        packed, _ = self.host.pack_image_features(
            [unmerged], size[None], image_newline=self.host.image_newline,
            vision_aspect_ratio=self.model.config.vision_aspect_ratio,
        )
        return packed[0]
