"""LLaVA-1.5 with DyMU on transformers' ``LlavaForConditionalGeneration``.

The stock processor expands each ``<image>`` to a fixed 576 placeholders and the stock model asserts
features == placeholders; DyMU's token count is known only after encoding. So this adapter encodes the
images first (DToMe in the CLIP tower), then builds the merged input sequence itself: embeddings, a 2-D
attention mask, position ids and the VTU group map over the virtual (unmerged) layout, and calls the
model / ``generate`` with ``inputs_embeds``. Nothing of upstream LLaVA is vendored.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
)

import dymu as _dymu
from dymu.thresholds import Thresholds, ThresholdsError
from dymu.vtu import VTUInputs

from .conversation import build_prompt

__all__ = ["DyMULlava", "Video", "EncodedImages", "LlavaInputs", "load_model", "expand_to_square", "load_image"]

logger = logging.getLogger(__name__)

ImageLike = Image.Image | str | os.PathLike


def load_image(image: ImageLike) -> Image.Image:
    """Open an image file (or pass a PIL image through) as RGB.

    Raises:
        ValueError: the file cannot be read as an image (names the file).
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {image}: {err}") from err


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square of side ``max(w, h)`` with ``background``, image centred (LLaVA-1.5's "pad" mode).

    LLaVA-1.5 evaluates with ``image_aspect_ratio="pad"``: the background is the CLIP mean colour, so the
    padding normalises to zero.
    """
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


@dataclass
class Video:
    """A video as a prompt input: its sampled frames, in time order (for a ``<video>`` placeholder).

    Attributes:
        frames: images (PIL or paths) or a ``(F, H, W, 3)`` uint8 array / tensor.
    """

    frames: Sequence[ImageLike] | object

    def images(self) -> list[Image.Image]:
        """The frames as RGB PIL images.

        Raises:
            ValueError: no frames.
        """
        frames = self.frames
        if hasattr(frames, "shape"):  # (F, H, W, 3) array or tensor
            import numpy as np

            frames = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
        images = [load_image(f) for f in frames]
        if not images:
            raise ValueError("a Video needs at least one frame.")
        return images


@dataclass
class EncodedImages:
    """Merged visual tokens of a list of images, ready for the LLM.

    Attributes:
        features: per image ``(n_i, C_llm)`` merged tokens as fed to the LLM (LLaVA-1.5: projected merged
            patches in raster order, by the smallest original patch index of each group).
        group_index: per image ``(V_i,)`` long, the merged token in ``[0, n_i)`` of every position of the
            image's virtual (unmodified-model) layout (LLaVA-1.5: the 576 patches in raster order, CLS
            dropped with the "default" strategy).
    """

    features: list[torch.Tensor]
    group_index: list[torch.Tensor]

    @property
    def num_tokens(self) -> list[int]:
        """Visual tokens per image fed to the LLM."""
        return [f.shape[0] for f in self.features]


@dataclass
class LlavaInputs:
    """A left-padded batch of merged prompts.

    Attributes:
        inputs_embeds: ``(B, L_m, C)``.
        attention_mask: ``(B, L_m)`` long.
        position_ids: ``(B, L_m)`` long. With VTU: the virtual position of each merged token's first
            member (so ``generate`` continues after the last virtual position); without VTU: consecutive.
        vtu: the virtual layout (``None`` when VTU is off).
        visual_tokens: per sample, visual tokens fed to the LLM (all its images).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    vtu: VTUInputs | None
    visual_tokens: list[int]

    def model_kwargs(self) -> dict:
        """Keyword arguments for ``model(...)`` / ``model.generate(...)``."""
        kwargs = dict(inputs_embeds=self.inputs_embeds, attention_mask=self.attention_mask, position_ids=self.position_ids)
        if self.vtu is not None:
            kwargs["vtu"] = self.vtu
        return kwargs


class DyMULlava:
    """A LLaVA-1.5 model, its processor, and DyMU settings.

    Args:
        model: ``LlavaForConditionalGeneration`` (DToMe / VTU applied or not).
        processor: its ``LlavaProcessor`` (tokenizer + CLIP image processor are used separately).
        vtu: run the LLM with virtual token unmerging (else merged tokens at consecutive positions).
        image_aspect_ratio: ``"pad"`` (LLaVA-1.5 evaluation: pad to square with the mean colour) or
            ``"crop"`` (the image processor's resize + centre crop).
        vtu_cache: KV cache layout of VTU generation, ``"merged"`` (scales with the merged length) or
            ``"expanded"`` (full length); see :class:`~dymu.vtu.VTUInputs`.

    Raises:
        ValueError: unknown ``image_aspect_ratio`` or ``vtu_cache``.
    """

    def __init__(self, model: LlavaForConditionalGeneration, processor, vtu: bool = True, image_aspect_ratio: str = "pad",
                 vtu_cache: str = "merged"):
        if image_aspect_ratio not in ("pad", "crop"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'crop', got {image_aspect_ratio!r}.")
        if vtu_cache not in ("merged", "expanded"):
            raise ValueError(f"vtu_cache must be 'merged' or 'expanded', got {vtu_cache!r}.")
        self.vtu_cache = vtu_cache
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.vtu = vtu
        self.image_aspect_ratio = image_aspect_ratio
        config = model.config
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise NotImplementedError(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r}")
        self.image_token_id = config.image_token_id
        self.video_token_id = getattr(config, "video_token_id", None)
        self.tower = model.model.vision_tower

    @property
    def device(self) -> torch.device:
        """Device of the model's weights."""
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's weights (pixels are cast to it)."""
        return self.model.dtype

    # -------------------------------------------------------------- images
    def preprocess(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Images -> ``(N, 3, H, W)`` pixel values as LLaVA-1.5 evaluates (see ``image_aspect_ratio``)."""
        pil = [load_image(img) for img in images]
        if self.image_aspect_ratio == "pad":
            background = tuple(int(round(255 * m)) for m in self.image_processor.image_mean)
            pil = [expand_to_square(img, background) for img in pil]
        return self.image_processor(images=pil, return_tensors="pt")["pixel_values"]

    def crops(self, image: ImageLike) -> torch.Tensor:
        """``(n_crops, 3, H, W)``: what the vision tower sees of one image at deployment (LLaVA-1.5: one
        crop). Threshold calibration uses this, so it sees deployment preprocessing."""
        return self.preprocess([image])

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> EncodedImages:
        """Run the vision tower (DToMe if applied) and the projector.

        Args:
            pixel_values: ``(N, 3, H, W)``.

        Returns:
            :class:`EncodedImages` (one host sync for the per-image lengths).
        """
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        keep_cls = self.model.config.vision_feature_select_strategy == "full"
        start = 0 if keep_cls else 1
        if _dymu.is_patched(self.tower):
            out = self.tower(pixel_values)
            tokens = out.last_hidden_state[:, start:]  # (N, N'-start, C_vis)
            lengths = (out.padding_mask.sum(-1) if out.padding_mask is not None
                       else torch.full((tokens.shape[0],), out.last_hidden_state.shape[1], device=tokens.device)) - start
            group_ids = out.group_ids[:, start:] - start  # (N, P) -> token index without CLS
        else:
            layer = self.model.config.vision_feature_layer
            hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[layer]
            tokens = hidden[:, start:]
            lengths = torch.full((tokens.shape[0],), tokens.shape[1], device=tokens.device)
            group_ids = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        projected = self.model.model.multi_modal_projector(tokens)  # (N, N'-start, C_llm)
        features, groups = [], []
        for i, n in enumerate(lengths.tolist()):
            gid = group_ids[i]
            first_patch = torch.full((n,), gid.numel(), device=gid.device, dtype=torch.long)
            first_patch.scatter_reduce_(0, gid, torch.arange(gid.numel(), device=gid.device), reduce="amin")
            order = first_patch.argsort()  # raster order; keys are unique, so the sort is deterministic
            rank = torch.empty_like(order)
            rank[order] = torch.arange(n, device=order.device)
            features.append(projected[i, :n][order])
            groups.append(rank[gid])
        return EncodedImages(features=features, group_index=groups)

    def encode_prompt_images(self, images: Sequence[Sequence[ImageLike]]) -> EncodedImages:
        """Encode the images of a batch of prompts (per prompt, its images), flattened in prompt order."""
        flat = [img for imgs in images for img in imgs]
        if any(isinstance(img, Video) for img in flat):
            raise NotImplementedError(f"{type(self).__name__} takes images only; videos need LLaVA-OneVision.")
        return self.encode_images(self.preprocess(flat)) if flat else EncodedImages([], [])

    def prompt(self, question: str, inputs: Sequence[ImageLike | Video] = ("image",)) -> str:
        """The model's chat prompt for one question about ``inputs`` (LLaVA-1.5: the vicuna_v1 template)."""
        return build_prompt(question, num_images=len(inputs))

    # ------------------------------------------------------------- prompts
    def build_inputs(self, prompts: Sequence[str], images: Sequence[Sequence[ImageLike]]) -> LlavaInputs:
        """Tokenise prompts, encode their images, and lay out the merged batch (left padding).

        Args:
            prompts: full prompts containing one ``<image>`` placeholder per image (see
                :func:`llava.conversation.build_prompt`).
            images: per prompt, its images in placeholder order.

        Raises:
            ValueError: prompts and image lists differ in length, or a prompt's placeholder count differs
                from its number of images.
        """
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists.")
        encoded = self.encode_prompt_images(images)
        embed = self.model.get_input_embeddings()
        merged_embeds, virtual_groups, merged_lengths, visual_tokens = [], [], [], []
        next_image = 0
        for s, (prompt, imgs) in enumerate(zip(prompts, images)):
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"][0].to(self.device)
            is_video = ids == self.video_token_id if self.video_token_id is not None else torch.zeros_like(ids).bool()
            slots = ((ids == self.image_token_id) | is_video).nonzero().flatten().tolist()
            if len(slots) != len(imgs):
                raise ValueError(
                    f"prompt {s} has {len(slots)} '<image>'/'<video>' placeholders but {len(imgs)} images or "
                    "videos were given; put one placeholder per image (or video) in the prompt."
                )
            kinds = [bool(is_video[slot]) for slot in slots]
            if kinds != [isinstance(item, Video) for item in imgs]:
                raise ValueError(f"prompt {s}: the order of '<image>' / '<video>' placeholders does not match the "
                                 "inputs (pass llava.Video(frames) for each '<video>').")
            pieces, groups, offset, cursor, n_visual = [], [], 0, 0, 0
            for slot in slots + [len(ids)]:
                text = ids[cursor:slot]
                pieces.append(embed(text))
                groups.append(torch.arange(offset, offset + len(text), device=self.device))
                offset += len(text)
                if slot < len(ids):
                    feats = encoded.features[next_image]
                    pieces.append(feats.to(pieces[-1].dtype))
                    groups.append(encoded.group_index[next_image] + offset)
                    offset += feats.shape[0]
                    n_visual += feats.shape[0]
                    next_image += 1
                cursor = slot + 1
            merged_embeds.append(torch.cat(pieces))
            virtual_groups.append(torch.cat(groups))
            merged_lengths.append(offset)
            visual_tokens.append(n_visual)
        return self._pad(merged_embeds, virtual_groups, merged_lengths, visual_tokens)

    def _pad(self, merged_embeds, virtual_groups, merged_lengths, visual_tokens) -> LlavaInputs:
        bsz, lm, length = len(merged_embeds), max(merged_lengths), max(len(g) for g in virtual_groups)
        width = merged_embeds[0].shape[-1]
        embeds = merged_embeds[0].new_zeros(bsz, lm, width)
        mask = torch.zeros(bsz, lm, dtype=torch.long, device=self.device)
        group_index = torch.zeros(bsz, length, dtype=torch.long, device=self.device)
        virtual_mask = torch.zeros(bsz, length, dtype=torch.long, device=self.device)
        for b, (e, g, n) in enumerate(zip(merged_embeds, virtual_groups, merged_lengths)):
            embeds[b, lm - n :] = e
            mask[b, lm - n :] = 1
            group_index[b, length - len(g) :] = g + (lm - n)
            virtual_mask[b, length - len(g) :] = 1
        if not self.vtu:
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            return LlavaInputs(embeds, mask, positions, None, visual_tokens)
        vtu = VTUInputs(group_index=group_index, attention_mask=virtual_mask, merged_length=lm, cache=self.vtu_cache)
        big = torch.iinfo(torch.long).max
        first = torch.full((bsz, lm), big, dtype=torch.long, device=self.device)
        first.scatter_reduce_(1, group_index, vtu.position_ids.masked_fill(virtual_mask == 0, big), reduce="amin")
        positions = first.masked_fill(mask == 0, 0)
        return LlavaInputs(embeds, mask, positions, vtu, visual_tokens)

    # ------------------------------------------------------------- outputs
    @torch.no_grad()
    def forward(self, inputs: LlavaInputs):
        """One forward pass over merged inputs; returns the model output (logits ``(B, L_m, V)``)."""
        return self.model(**inputs.model_kwargs())

    @torch.no_grad()
    def generate(
        self,
        questions: Sequence[str],
        images: Sequence[Sequence[ImageLike]] | Sequence[ImageLike],
        max_new_tokens: int = 32,
        **generate_kwargs,
    ) -> tuple[list[str], LlavaInputs]:
        """Answer questions about images (greedy by default).

        Args:
            questions: user texts (placeholders are added unless present; see :meth:`prompt`).
            images: per question a list of images (or :class:`Video` s), or one per question.
            max_new_tokens: answer length limit.
            generate_kwargs: passed to ``model.generate``.

        Returns:
            ``(answers, inputs)``; ``inputs.visual_tokens`` gives the visual token count per question.
        """
        images = [[im] if isinstance(im, (Image.Image, str, os.PathLike, Video)) else list(im) for im in images]
        prompts = [self.prompt(q, imgs) for q, imgs in zip(questions, images)]
        inputs = self.build_inputs(prompts, images)
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        out = self.model.generate(**inputs.model_kwargs(), max_new_tokens=max_new_tokens, **generate_kwargs)
        answers = [a.strip() for a in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        return answers, inputs


def _resolve_thresholds(dymu_arg) -> Thresholds | None:
    if dymu_arg is None or (isinstance(dymu_arg, str) and dymu_arg == "off"):
        return None
    if isinstance(dymu_arg, Thresholds):
        return dymu_arg
    path = Path(dymu_arg)
    if path.suffix == ".json" or path.exists():
        return Thresholds.load(path)
    try:
        return Thresholds.packaged(str(dymu_arg))
    except ThresholdsError as err:
        raise ThresholdsError(
            f"dymu={dymu_arg!r} is neither a thresholds file nor a packaged thresholds name; packaged: "
            f"{sorted(p.stem for p in _dymu.thresholds.PACKAGED_DIR.glob('*.json'))}."
        ) from err


def load_model(
    name_or_path: str | os.PathLike,
    dymu: Thresholds | str | os.PathLike | None = None,
    *,
    tome_r: Sequence[int] | None = None,
    tome_target: int | None = None,
    vtu: bool = True,
    vtu_cache: str = "merged",
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    image_aspect_ratio: str = "pad",
    layout: str = "faithful",
    video_pooling: str = "merge",
    local_files_only: bool | None = None,
) -> DyMULlava:
    """Load a LLaVA-1.5 or LLaVA-OneVision checkpoint (hub id or local path) with DyMU applied.

    Args:
        name_or_path: e.g. ``"llava-hf/llava-1.5-7b-hf"``, ``"llava-hf/llava-onevision-qwen2-7b-ov-hf"`` or a
            local directory from ``save_pretrained``.
        dymu: thresholds (object, JSON path, or packaged name such as
            ``"clip-vit-large-patch14-336_openai_low_published"``); ``None`` / ``"off"`` for no merging.
        tome_r: instead of thresholds, the fixed-r ToMe baseline (per-layer ``r``).
        tome_target: ToMe with the budget ``N0 - tome_target`` spread evenly over the layers run (e.g. 94 /
            209 / 393 for LLaVA-1.5: r = 21 / 16 / 8 over 23 layers).
        vtu: use virtual token unmerging in the LLM (DyMU); ``False`` feeds merged tokens at consecutive
            positions (the ablation "DToMe without VTU").
        vtu_cache: ``"merged"`` (default; KV cache of ``L_m`` rows) or ``"expanded"`` (``L`` rows), see
            :class:`~dymu.vtu.VTUInputs`.
        dtype: weights dtype (``"auto"``: as saved).
        device: where to put the model.
        attn_implementation: ``"eager"`` / ``"sdpa"`` / ... (default: transformers' choice).
        image_aspect_ratio: LLaVA-1.5: ``"pad"`` or ``"crop"`` (see :class:`DyMULlava`).
        layout: LLaVA-OneVision: ``"faithful"`` or ``"paper"`` (see :mod:`llava.onevision`).
        video_pooling: LLaVA-OneVision videos: ``"merge"`` or ``"pool"`` (see
            :class:`~llava.onevision.DyMULlavaOnevision`).
        local_files_only: never contact the Hub (default: True when ``HF_HUB_OFFLINE=1``).

    Returns:
        :class:`DyMULlava`, or :class:`~llava.onevision.DyMULlavaOnevision` for a LLaVA-OneVision checkpoint.

    Raises:
        OSError: the checkpoint cannot be found; the message says how to pass a local path.
        ThresholdsError: thresholds do not fit the encoder.
    """
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    kwargs = dict(local_files_only=local_files_only)
    try:
        onevision = AutoConfig.from_pretrained(name_or_path, **kwargs).model_type == "llava_onevision"
        if onevision:  # its processor also wants a video processor (torchvision); the two parts suffice
            processor = SimpleNamespace(
                tokenizer=AutoTokenizer.from_pretrained(name_or_path, **kwargs),
                image_processor=AutoImageProcessor.from_pretrained(name_or_path, **kwargs),
            )
        else:
            processor = AutoProcessor.from_pretrained(name_or_path, **kwargs)
        model_cls = LlavaOnevisionForConditionalGeneration if onevision else LlavaForConditionalGeneration
        model = model_cls.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    except OSError as err:
        raise OSError(
            f"could not load LLaVA checkpoint '{name_or_path}': it is not a local directory and could not be "
            f"fetched from the Hugging Face Hub ({type(err).__name__}: {err}). On an offline machine download it "
            "elsewhere (e.g. `hf download llava-hf/llava-1.5-7b-hf --local-dir DIR`), copy DIR here and pass "
            "the local path (Hydra: model.name_or_path=DIR)."
        ) from err
    model.to(device).eval()
    thresholds = _resolve_thresholds(dymu)
    if tome_target is not None:
        vision = model.config.vision_config
        n0, _ = _dymu.vision_token_count(model.model.vision_tower)
        n_run = _dymu.layers_to_run(vision.num_hidden_layers, model.config.vision_feature_layer)
        tome_r = _dymu.constant_schedule(n0 - int(tome_target), n_run)
    if thresholds is not None or tome_r is not None:
        _dymu.apply_dtome(model, thresholds, tome_r=list(tome_r) if tome_r is not None else None)
    if vtu:
        _dymu.apply_vtu(model)
    if onevision:
        from .onevision import DyMULlavaOnevision

        return DyMULlavaOnevision(model, processor, vtu=vtu, layout=layout, video_pooling=video_pooling,
                                  vtu_cache=vtu_cache)
    return DyMULlava(model, processor, vtu=vtu, image_aspect_ratio=image_aspect_ratio, vtu_cache=vtu_cache)
