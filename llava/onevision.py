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
import math
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from dymu.budget import VisualBudget

from .images import ImageLike, Video, load_image
from .pipeline import DyMUPipeline, EncodedImages, order_by_first_position, register_family
from .prompts import QWEN_SYSTEM, build_onevision_prompt, chat_prompt

__all__ = ["DyMULlavaOnevision", "OnevisionProcessor", "virtual_layout", "pooled_layout", "LAYOUTS", "VIDEO_POOLING"]

logger = logging.getLogger(__name__)

LAYOUTS = ("faithful", "paper")
VIDEO_POOLING = ("merge", "pool")
_NEWLINE = -1  # key of an image_newline position
_MIXED = -2  # key of a downsampled position that mixes several groups


class OnevisionProcessor:
    """The two parts of a LLaVA-OneVision processor the pipeline uses: ``tokenizer`` and ``image_processor``.

    transformers' ``LlavaOnevisionProcessor`` also builds a video processor, which needs torchvision; frames
    go through the image processor here, so the two parts suffice. The chat template comes with the
    tokenizer (transformers loads the checkpoint's ``chat_template.jinja`` into it).
    """

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's chat template (None if the checkpoint ships none)."""
        return getattr(self.tokenizer, "chat_template", None)


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
    channels, hashes = _hash_channels(crop_ids)  # a mix of different ids cannot reproduce one id's pair
    newline = torch.tensor([float(_NEWLINE), float(hashes[-1])], dtype=torch.float64)
    packed, _ = host.pack_image_features(
        [channels], image_size.cpu()[None], image_newline=newline, vision_aspect_ratio=vision_aspect_ratio
    )
    return _decode_keys(packed[0], hashes).to(crop_ids.device)


def _hash_channels(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, hash)`` channels ``(..., 2)`` in float64, and the hash table (one entry per id, then the newline).

    The hash is a fixed pseudo-random number per id: a bilinear mix of different ids cannot reproduce one
    id's (id, hash) pair unless the other weights are below ~1e-9.
    """
    n_ids = int(ids.max()) + 1
    hashes = torch.rand(n_ids + 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids = ids.cpu()
    return torch.stack([ids.double(), hashes[ids]], dim=-1), hashes


def _decode_keys(packed: torch.Tensor, hashes: torch.Tensor) -> torch.Tensor:
    """Virtual keys from packed ``(V, 2)`` channels: an exact (id, hash) pair is that group, the newline pair
    ``-1``, anything else a mix ``-2``."""
    n_ids = hashes.numel() - 1
    value, hashed = packed[:, 0], packed[:, 1]
    key = value.round()
    index = key.long().clamp(0, n_ids - 1)
    tol = 1e-9
    is_group = (value - key).abs().lt(tol) & (key >= 0) & (hashed - hashes[index]).abs().lt(tol)
    is_newline = (value - _NEWLINE).abs().lt(tol) & (hashed - hashes[n_ids]).abs().lt(tol)
    keys = torch.full_like(index, _MIXED)
    keys[is_group] = index[is_group]
    keys[is_newline] = _NEWLINE
    return keys


@torch.no_grad()
def pooled_layout(host: torch.nn.Module, frame_ids: torch.Tensor) -> torch.Tensor:
    """Keys of the unmodified model's pooled video frames (2x2 bilinear, 27x27 -> 14x14), without the newline.

    Args:
        host: the ``LlavaOnevisionModel`` (its ``apply_pooling`` is used).
        frame_ids: ``(F, P)`` long video-global merged ids of every frame patch.

    Returns:
        ``(F * 196,)`` long keys (group id, or ``-2`` where pooling mixes groups).
    """
    channels, hashes = _hash_channels(frame_ids)
    pooled = host.apply_pooling(channels)  # (F, 196, 2)
    return _decode_keys(pooled.flatten(0, 1), hashes).to(frame_ids.device)


@register_family
class DyMULlavaOnevision(DyMUPipeline):
    """A LLaVA-OneVision model, its tokenizer / image processor, and DyMU settings.

    Args:
        model: ``LlavaOnevisionForConditionalGeneration`` (DToMe / VTU applied or not).
        processor: any object with ``.tokenizer`` and ``.image_processor``, e.g. :class:`OnevisionProcessor`
            (LLaVA-OneVision's own processor also needs a video processor, i.e. torchvision).
        vtu: run the LLM with virtual token unmerging.
        layout: ``"faithful"`` or ``"paper"`` (images; see the module docstring).
        video_pooling: how video frames reach the LLM. ``"merge"`` (DyMU, default): DToMe merging takes the
            place of the unmodified model's 2x2 bilinear frame pooling; the virtual layout is every frame's
            27x27 raster, then one ``image_newline``. ``"pool"``: the unmodified model's layout (14x14 pooled
            positions per frame, then one newline), pooled positions assigned to groups by the same rule as
            ``anyres_max_9`` downsampling; merging nothing then reproduces the unmodified model exactly.
            Frames are preprocessed as the image processor's base view (resized to 384x384, normalised).
        vtu_cache: ``"merged"`` or ``"expanded"`` KV cache (see :class:`~llava.pipeline.DyMUPipeline`).
        budget: default :class:`~dymu.budget.VisualBudget`; ``threshold_scale`` only: an image's visual tokens
            here span its AnyRes crops, ``image_newline`` tokens and downsampled positions, so encoder-side
            token bounds would not be exact in LLM tokens (NotImplementedError).
    """

    display_name = "LLaVA-OneVision"
    model_types = ("llava_onevision",)
    model_class = LlavaOnevisionForConditionalGeneration
    supports_video = True
    placeholders = ("<image>", "<video>")
    options = ("layout", "video_pooling")

    @classmethod
    def load_processor(cls, name_or_path, **kwargs) -> OnevisionProcessor:
        """The checkpoint's tokenizer and image processor (:class:`OnevisionProcessor`)."""
        return OnevisionProcessor(AutoTokenizer.from_pretrained(name_or_path, **kwargs),
                                  AutoImageProcessor.from_pretrained(name_or_path, **kwargs))

    def __init__(self, model, processor, vtu: bool = True, layout: str = "faithful", video_pooling: str = "merge",
                 vtu_cache: str = "merged", budget: VisualBudget | dict | None = None):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
        if video_pooling not in VIDEO_POOLING:
            raise ValueError(f"video_pooling must be one of {VIDEO_POOLING}, got {video_pooling!r}.")
        self.layout = layout
        self.video_pooling = video_pooling
        self.host = model.model
        super().__init__(model, processor, vtu=vtu, vtu_cache=vtu_cache, budget=budget)

    def format_prompt(self, question: str, inputs: Sequence[ImageLike | Video]) -> str:
        """The checkpoint's chat template, else the Qwen2 chat prompt LLaVA-OneVision was trained with
        (:func:`~llava.prompts.build_onevision_prompt`); ``<video>`` for :class:`~llava.images.Video` inputs."""
        placeholders = ["<video>" if isinstance(x, Video) else "<image>" for x in inputs]
        templated = chat_prompt(self.processor, question, placeholders, system=QWEN_SYSTEM, marks=self.placeholders)
        return templated if templated is not None else build_onevision_prompt(question, placeholders)

    def visual_positions(self, inputs: Sequence[ImageLike | Video]) -> tuple[int, bool]:
        """LLaVA-OneVision's virtual layout: exact for
        videos (per frame the 27x27 patches, ``video_pooling="merge"``, or the 14x14 pooled positions,
        ``"pool"``; then one newline) and for the images of a multi-image prompt (the base crop, plus its
        newline in the faithful layout); a single image's AnyRes length depends on its size, so its base crop
        is the lower bound until it is encoded."""
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        per_frame = side * side if self.video_pooling == "merge" else math.ceil(side / 2) ** 2
        total, exact = 0, True
        for item in inputs:
            if isinstance(item, Video):
                total += item.num_frames * per_frame + 1
            elif len(inputs) > 1:  # base crop only, as the unmodified model
                total += side * side + (self.layout == "faithful")
            else:
                total, exact = total + side * side, False
        return total, exact

    def crops(self, image: ImageLike) -> torch.Tensor:
        """``(n_crops, 3, 384, 384)``: the base image and AnyRes grid crops of a single-image prompt."""
        processed = self.image_processor([load_image(image)], return_tensors="pt")
        config = self.model.config
        n = image_size_to_num_patches(processed["image_sizes"][0].tolist(), config.image_grid_pinpoints,
                                      config.vision_config.image_size)
        return processed["pixel_values"][0, :n]

    @torch.no_grad()
    def encode_prompt_images(self, images: Sequence[Sequence[ImageLike | Video]],
                             budget: VisualBudget | dict | None = None) -> EncodedImages:
        """Encode the images and videos of a batch of prompts; merged tokens and virtual group maps per input.

        As in the unmodified model, a prompt with one image gets the base image plus grid crops; a prompt
        with several images gets the base image only for each (``batch_num_images``). Every crop and frame
        merges under ``budget`` (default: the pipeline's; ``threshold_scale`` only).

        Raises:
            NotImplementedError: token bounds in ``budget``; DToMe with a strategy other than ``"full"``.
            ValueError: an unreadable image; NaN / infinite pixels; an invalid budget.
        """
        budget = self.request_budget(budget)
        encoded = {}
        groups = [[(i, load_image(x)) for i, x in enumerate(xs) if not isinstance(x, Video)] for xs in images]
        image_out = iter(self._encode_images([[im for _, im in g] for g in groups if g], budget))
        for s, g in enumerate(groups):
            for i, _ in g:
                encoded[s, i] = next(image_out)
        for s, xs in enumerate(images):
            for i, x in enumerate(xs):
                if isinstance(x, Video):
                    encoded[s, i] = self._encode_video(x, budget)
        order = [encoded[s, i] for s, xs in enumerate(images) for i in range(len(xs))]
        return EncodedImages(features=[f for f, _ in order], group_index=[g for _, g in order])

    def _encode_images(self, groups: list[list[Image.Image]],
                       budget: VisualBudget) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Encode the images of the prompts that have any (per prompt, its images): a single image gets its
        AnyRes crops, several get their base crop each (as the unmodified model).

        Returns:
            per image, in order: ``(n_i, C)`` merged tokens in first-position order and the ``(V_i,)`` virtual
            group map of its layout (``layout``).
        """
        if not groups:
            return []
        processed = self.image_processor(groups, return_tensors="pt")
        pixels, sizes = processed["pixel_values"], processed["image_sizes"]  # (I, max_crops, 3, H, W), (I, 2)
        config = self.model.config
        per_image = [len(g) for g in groups for _ in g]
        crops_per_image = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) if n == 1 else 1
            for n, size in zip(per_image, sizes.tolist())
        ]
        crops = torch.cat([p[:n] for p, n in zip(pixels, crops_per_image)])
        merged, crop_ids = self._encode_crops(crops, crops_per_image, budget)
        out = []
        for feats, ids, size in zip(merged, crop_ids, sizes):
            if self.layout == "paper":
                raw = ids.flatten()
                out.append(self._tokens(feats, raw, None))
            else:
                raw = virtual_layout(self.host, ids, size, config.vision_aspect_ratio)
                out.append(self._tokens(feats, raw, lambda f=feats, i=ids, z=size: self._packed(f[i], z)))
        return out

    def _encode_video(self, video: Video, budget: VisualBudget) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a video's ``F`` frames (each as the base view, 384x384) in one tower batch.

        Returns:
            ``(n, C)`` merged tokens in first-position order and the ``(V,)`` virtual group map: ``F * 729 + 1``
            positions with ``video_pooling="merge"``, ``F * 196 + 1`` with ``"pool"`` (the last one the newline).
        """
        frames = self.image_processor([video.images()], return_tensors="pt")["pixel_values"][:, 0]  # (F, 3, H, W)
        (feats,), (frame_ids,) = self._encode_crops(frames, [frames.shape[0]], budget)
        newline = torch.tensor([_NEWLINE], device=frame_ids.device)
        if self.video_pooling == "merge":
            return self._tokens(feats, torch.cat([frame_ids.flatten(), newline]), None)
        raw = torch.cat([pooled_layout(self.host, frame_ids), newline])
        host = lambda: torch.cat([self.host.apply_pooling(feats[frame_ids]).flatten(0, 1),  # noqa: E731
                                  self.host.image_newline[None].to(feats)])
        return self._tokens(feats, raw, host)

    def _encode_crops(self, crops: torch.Tensor, per_item: list[int],
                      budget: VisualBudget) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run crops (or frames) through the tower and projector in one batch.

        Returns:
            per item: ``(n_i, C)`` projected merged tokens, and ``(n_crops_i, P)`` item-global group ids.
        """
        if self.model.config.vision_feature_select_strategy != "full":
            raise NotImplementedError("LLaVA-OneVision with DToMe expects vision_feature_select_strategy='full'.")
        tokens, group_ids = self.encode_tower(crops, budget)
        lengths = [t.shape[0] for t in tokens]
        projected = self.host.multi_modal_projector(torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True))
        features, ids, start = [], [], 0  # projected: (crops, max n, C)
        for n_crops in per_item:
            lens = lengths[start : start + n_crops]
            offsets = torch.tensor([0] + lens[:-1], device=self.device).cumsum(0)
            features.append(torch.cat([projected[start + c, :n] for c, n in enumerate(lens)]))
            ids.append(torch.stack(group_ids[start : start + n_crops]) + offsets[:, None])
            start += n_crops
        return features, ids

    def _tokens(self, merged: torch.Tensor, raw: torch.Tensor, host_features) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged tokens in order of first virtual occurrence, and the virtual group map, of one input.

        Args:
            merged: ``(n, C)`` the input's merged tokens (image-global ids ``0..n-1``).
            raw: ``(V,)`` virtual keys: group ids, ``-1`` newline, ``-2`` mixed position.
            host_features: callable giving the unmodified model's ``(V, C)`` features (used only if some
                position is mixed).
        """
        n_groups = merged.shape[0]
        positions = torch.arange(raw.numel(), device=raw.device)
        keys = torch.where(raw >= 0, raw, n_groups + positions)  # newline / mixed: tokens of their own
        unique, inverse = torch.unique(keys, return_inverse=True)
        order, rank = order_by_first_position(inverse, unique.numel())
        token_keys = unique[order]
        feats = merged.new_empty(token_keys.numel(), merged.shape[-1])
        is_group = token_keys < n_groups
        feats[is_group] = merged[token_keys[is_group]]
        own_pos = token_keys[~is_group] - n_groups  # virtual positions of the tokens of their own
        is_newline = raw[own_pos] == _NEWLINE
        own = feats[~is_group]
        own[is_newline] = self.host.image_newline.to(feats.dtype)
        if (~is_newline).any():  # mixed positions: exactly the unmodified model's features there
            own[~is_newline] = host_features()[own_pos[~is_newline]].to(feats.dtype)
        feats[~is_group] = own
        return feats, rank[inverse]

    def _packed(self, unmerged: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """The unmodified model's packed image features from per-patch features ``(n_crops, P, C)``."""
        packed, _ = self.host.pack_image_features(
            [unmerged], size[None], image_newline=self.host.image_newline,
            vision_aspect_ratio=self.model.config.vision_aspect_ratio,
        )
        return packed[0]
