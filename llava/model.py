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
from PIL import Image, ImageOps
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
)

import dymu as _dymu
from dymu.budget import TokenBudget
from dymu.thresholds import Thresholds, ThresholdsError
from dymu.vtu import VTUInputs

from .conversation import build_prompt

__all__ = ["DyMULlava", "Video", "VisualBudget", "EncodedImages", "LlavaInputs", "load_model", "expand_to_square",
           "load_image"]

logger = logging.getLogger(__name__)

ImageLike = Image.Image | str | os.PathLike


MAX_IMAGE_SIDE = 4608
"""Longer side (px) above which :func:`load_image` first shrinks an image by an integer factor (``Image.reduce``,
a box filter), bounding preprocessing memory: twice LLaVA-OneVision's largest AnyRes side; LLaVA-1.5 sees 336."""


def _to_rgb(img: Image.Image, name: object) -> Image.Image:
    """8-bit RGB of a loaded image (see :func:`load_image` for the rules)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        import numpy as np

        values = np.asarray(img).astype(np.int32)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if img.mode == "I" and 0 <= low and high <= 255:
            pass  # 8-bit data held in a 32-bit image: as PIL's own conversion
        elif 0 <= low and high <= 65535:
            values = (values + 128) // 257  # 16 bit -> 8 bit, rounded (65535 -> 255); convert() would saturate
        else:
            raise ValueError(f"image {name} is a 32-bit integer image with values in [{low}, {high}], beyond 16 bit; "
                             "scale it to 8 bit and pass it as a PIL image.")
        img = Image.fromarray(values.astype(np.uint8))
    elif img.mode == "F":
        raise ValueError(f"image {name} holds 32-bit floats (PIL mode 'F'), which have no defined value range; "
                         "convert it to 8 bit first, e.g. Image.fromarray((array * 255).round().astype('uint8')).")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # then alpha is dropped as for RGBA (same colours, no PIL warning)
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(image: ImageLike) -> Image.Image:
    """Open an image file (or take a PIL image) as the 8-bit RGB image the model sees.

    - EXIF orientation is applied (``ImageOps.exif_transpose``): a portrait photo stored sideways is upright.
      (Upstream LLaVA does not do this; only files carrying an orientation tag differ.)
    - 16-bit images (PIL modes ``I;16*``, e.g. 16-bit PNG / TIFF, and ``I`` with values up to 65535) are scaled
      to 8 bit (``round(v / 257)``); ``I`` images whose values fit in ``[0, 255]`` are taken as 8-bit.
    - Alpha (RGBA, LA, palette with transparency) is dropped exactly as upstream LLaVA's ``convert("RGB")``
      does: the colour stored under transparent pixels is kept, nothing is composited. Composite it
      yourself (e.g. onto white) and pass the PIL image if that is what you want.
    - Grayscale, 1-bit, palette and CMYK images go through PIL's conversion to RGB.
    - An image whose longer side exceeds :data:`MAX_IMAGE_SIDE` is first reduced by the smallest integer
      factor that brings it within (it is resized to 336 / at most 2304 px later anyway).
      PIL's decompression-bomb limit (``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels) applies to files.

    A PIL image passed in is not modified.

    Raises:
        FileNotFoundError: no file at the path.
        ValueError: the file is not a readable image (truncated, not an image, a decompression bomb, a
            float image, or a mode PIL cannot convert); the message names the file and what to do.
        TypeError: ``image`` is neither a PIL image nor a path / file object.
    """
    name = image if isinstance(image, (str, os.PathLike)) else (
        getattr(image, "filename", "") or getattr(image, "name", "") or f"<{type(image).__name__}>")
    try:
        if isinstance(image, Image.Image):
            img = ImageOps.exif_transpose(image)  # a copy: the caller's image is left as it is
        elif isinstance(image, (str, os.PathLike)) or hasattr(image, "read"):
            with Image.open(image) as opened:
                opened.load()
                ImageOps.exif_transpose(opened, in_place=True)
                img = opened
        else:
            raise TypeError(f"load_image takes a PIL image or an image file path, got {type(image).__name__}; "
                            "wrap an (H, W, 3) uint8 array with PIL.Image.fromarray(array).")
        factor = -(-max(img.size) // MAX_IMAGE_SIDE)  # ceil: the longer side ends in (MAX / 2, MAX]
        if factor > 1 and img.mode in ("L", "LA", "RGB", "RGBA", "CMYK", "I"):
            img = img.reduce(factor)  # before the RGB conversion, which would copy the full-size image
        img = _to_rgb(img, name)
        return img.reduce(factor) if max(img.size) > MAX_IMAGE_SIDE else img
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image file {image} does not exist; check the path (or the benchmark's "
                                "data_dir / image root).") from err
    except Image.DecompressionBombError as err:
        raise ValueError(f"image {name} is too large to decode safely ({err}); if the file is trusted, shrink it "
                         "first or raise PIL.Image.MAX_IMAGE_PIXELS.") from err
    except (OSError, SyntaxError, EOFError) as err:
        raise ValueError(f"cannot read image {name}: {err}. The file is truncated, corrupt or not an image "
                         "(JPEG, PNG, ...): re-download or re-export it, or drop it from the inputs.") from err
    except ValueError as err:
        if str(name) in str(err):
            raise
        raise ValueError(f"cannot read image {name}: {err}") from err


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
            ValueError: no frames, or an array of frames that is not uint8.
        """
        frames = self.frames
        if hasattr(frames, "shape"):  # (F, H, W, 3) array or tensor
            import numpy as np

            array = np.asarray(frames.cpu() if hasattr(frames, "cpu") else frames)
            if array.dtype != np.uint8:  # a cast would wrap or zero floats (0..1 frames, NaN) without a word
                raise ValueError(f"Video frames as an array must be uint8 RGB (F, H, W, 3), got dtype {array.dtype}; "
                                 "convert first, e.g. (frames * 255).round().clip(0, 255).astype(np.uint8).")
            frames = [Image.fromarray(f) for f in array]
        images = [load_image(f) for f in frames]
        if not images:
            raise ValueError("a Video needs at least one frame.")
        return images


@dataclass(frozen=True)
class VisualBudget:
    """Per-request control of the visual tokens DToMe leaves per image (see :mod:`dymu.budget`).

    Attributes:
        threshold_scale: multiplies every layer's DToMe threshold (``< 1`` merges more, ``> 1`` less; 1.0 =
            as calibrated). Needs threshold-based DyMU (low / mid / high), not fixed-r ToMe.
        max_visual_tokens: at most this many visual tokens per image reach the LLM, exactly; one int for all
            images or a list with one per image of the request (images in prompt order). None: no bound.
        min_visual_tokens: at least this many (same forms); None: no bound.

    Counts are what the LLM gets per image (LLaVA-1.5: merged patches, the CLS token dropped). The bounds are
    met inside the encoder by merging the most similar pairs (raising) or fewer pairs (lowering) than the
    thresholds pick, so nothing is truncated or padded.
    """

    threshold_scale: float = 1.0
    max_visual_tokens: int | Sequence[int] | None = None
    min_visual_tokens: int | Sequence[int] | None = None

    def __post_init__(self) -> None:
        for name in ("max_visual_tokens", "min_visual_tokens"):
            value = getattr(self, name)
            items = [value] if value is None or isinstance(value, int) else value
            if isinstance(value, (str, bytes)) or not isinstance(items, Sequence) or not all(
                    v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in items):
                raise ValueError(f"{name} must be an int, a list of ints (one per image) or None; got {value!r}.")
            if value is not None and not isinstance(value, int):
                object.__setattr__(self, name, tuple(value))  # frozen and hashable

    @classmethod
    def coerce(cls, value: "VisualBudget | dict | None") -> "VisualBudget":
        """A :class:`VisualBudget` from itself, a mapping of its fields (e.g. a Hydra node), or None (default).

        Raises:
            ValueError: a mapping with unknown keys.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown budget keys {unknown}; use {sorted(cls.__dataclass_fields__)}.")
        fields = {k: (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v) for k, v in value.items()}
        fields = {k: v for k, v in fields.items() if v is not None}
        return cls(**fields)

    @property
    def is_default(self) -> bool:
        """True when the budget changes nothing."""
        return self.threshold_scale == 1.0 and self.max_visual_tokens is None and self.min_visual_tokens is None

    def tokens(self, offset: int) -> TokenBudget:
        """The encoder-token budget, with ``offset`` tokens per image that the LLM does not get (a dropped CLS)."""
        shift = lambda v: None if v is None else (v + offset if isinstance(v, int) else [x + offset for x in v])  # noqa: E731
        return TokenBudget(float(self.threshold_scale), shift(self.max_visual_tokens), shift(self.min_visual_tokens))


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
        unmerged_visual_tokens: per sample, the visual tokens the unmodified model would get (the length of
            its images' virtual layout: 576 per LLaVA-1.5 image).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    vtu: VTUInputs | None
    visual_tokens: list[int]
    unmerged_visual_tokens: list[int] | None = None

    def model_kwargs(self) -> dict:
        """Keyword arguments for ``model(...)`` / ``model.generate(...)``."""
        kwargs = dict(inputs_embeds=self.inputs_embeds, attention_mask=self.attention_mask, position_ids=self.position_ids)
        if self.vtu is not None:
            kwargs["vtu"] = self.vtu
        return kwargs


def _split_tower_output(out) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image of a DToMe tower output: ``(n_i, C)`` real tokens and ``(N0,)`` group ids."""
    lengths = (out.padding_mask.sum(-1).tolist() if out.padding_mask is not None
               else [out.last_hidden_state.shape[1]] * out.last_hidden_state.shape[0])
    return [(out.last_hidden_state[i, :n], out.group_ids[i]) for i, n in enumerate(lengths)]


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
        budget: default :class:`VisualBudget` of every request (a request may pass its own).

    Raises:
        ValueError: unknown ``image_aspect_ratio`` or ``vtu_cache``; a budget the model cannot meet (e.g. no
            DToMe in the tower).
    """

    def __init__(self, model: LlavaForConditionalGeneration, processor, vtu: bool = True, image_aspect_ratio: str = "pad",
                 vtu_cache: str = "merged", budget: VisualBudget | dict | None = None):
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
        self.budget = VisualBudget.coerce(budget)
        self._request_budget: VisualBudget | None = None
        if not self.budget.is_default:  # a bad default budget fails here, before any work
            if not all(v is None or isinstance(v, int) for v in (self.budget.max_visual_tokens,
                                                                  self.budget.min_visual_tokens)):
                raise ValueError("a pipeline's default budget takes one int per bound; per-image lists go with "
                                 "each request (generate(..., budget=...)).")
            self.merge_rule(1)

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

    def token_budget(self, budget: VisualBudget | dict | None = None) -> TokenBudget | None:
        """``budget`` (default: the request's budget while :meth:`build_inputs` runs, else :attr:`budget`) in
        encoder tokens (:class:`dymu.budget.TokenBudget`); None when it changes nothing.

        Raises:
            ValueError: a budget on a model without DToMe in its vision tower.
        """
        budget = VisualBudget.coerce(budget if budget is not None else (self._request_budget or self.budget))
        if budget.is_default:
            return None
        if not _dymu.is_patched(self.tower):
            raise ValueError("a visual-token budget needs DToMe in the vision tower (dymu=low|mid|high or a ToMe "
                             "variant); this model runs the unmodified encoder.")
        has_cls = _dymu.vision_token_count(self.tower)[1]
        return budget.tokens(int(has_cls and self.model.config.vision_feature_select_strategy != "full"))

    def merge_rule(self, batch_size: int, budget: VisualBudget | dict | None = None,
                   bounded: Sequence[int] | None = None):
        """The encoder's merge rule under a budget (None: the configured rule).

        Without ``bounded``: the first pass, the configured rule with scaled thresholds. With ``bounded`` (the
        request's images that :meth:`out_of_bounds` lists, in the order the second pass encodes them): the
        rule that meets their bounds.

        Args:
            batch_size: images in the request.
            budget: see :meth:`token_budget`.
            bounded: images of the request the bounded pass encodes.

        Raises:
            ValueError: see :meth:`token_budget` and :class:`dymu.budget.TokenBudget`.
        """
        tb = self.token_budget(budget)
        if tb is None:
            return None
        settings = self.tower._dymu
        scaled = tb.scaled(settings.rule)
        n0, has_cls = _dymu.vision_token_count(self.tower)
        geometry = dict(num_tokens=n0, num_layers=settings.num_layers, has_cls=has_cls)
        tb.bounds(batch_size, **geometry)  # validate before any work
        if bounded is None:
            return scaled
        return tb.rule(scaled, batch_size=batch_size, images=bounded, device=self.device, **geometry)

    def _tower(self, pixel_values: torch.Tensor, budget) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: ``(n_i, C_vis)`` feature-layer tokens (CLS included) and ``(N0,)`` group ids, under the
        budget: one pass, and a second, bounded one for the images outside their bounds."""
        n = pixel_values.shape[0]
        out = self.tower(pixel_values, merge_rule=self.merge_rule(n, budget))
        per_image = _split_tower_output(out)
        counts = [t.shape[0] for t, _ in per_image]
        redo = self.out_of_bounds(counts, budget)
        if redo:
            rule = self.merge_rule(n, budget, bounded=redo)
            again = _split_tower_output(self.tower(pixel_values[redo], merge_rule=rule))
            for i, item in zip(redo, again):
                per_image[i] = item
        return per_image

    def out_of_bounds(self, counts: Sequence[int], budget: VisualBudget | dict | None = None) -> list[int]:
        """The images (indices into ``counts``, encoder tokens per image after the first pass) whose count lies
        outside the budget's bounds: they are encoded again under the bounded rule."""
        tb = self.token_budget(budget)
        if tb is None or not tb.has_bounds:
            return []
        n0, has_cls = _dymu.vision_token_count(self.tower)
        return tb.violations(counts, num_tokens=n0, num_layers=self.tower._dymu.num_layers, has_cls=has_cls)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, budget: VisualBudget | dict | None = None) -> EncodedImages:
        """Run the vision tower (DToMe if applied) and the projector.

        Args:
            pixel_values: ``(N, 3, H, W)``.
            budget: per-request token budget (default: see :meth:`token_budget`).

        Returns:
            :class:`EncodedImages` (one host sync for the per-image lengths).

        Raises:
            ValueError: NaN / infinite pixel values; a budget the model cannot meet (see :meth:`token_budget`).
        """
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or infinite values; check the image preprocessing.")
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        keep_cls = self.model.config.vision_feature_select_strategy == "full"
        start = 0 if keep_cls else 1
        if _dymu.is_patched(self.tower):
            per_image = self._tower(pixel_values, budget)
            lengths = torch.tensor([t.shape[0] - start for t, _ in per_image])
            tokens = torch.nn.utils.rnn.pad_sequence([t[start:] for t, _ in per_image], batch_first=True)
            group_ids = torch.stack([g[start:] - start for _, g in per_image])  # (N, P) token index without CLS
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

    @torch.no_grad()
    def merge_map(self, image: ImageLike, layers: Sequence[int] | None = None, fill: str = "mean",
                  budget: VisualBudget | dict | None = None):
        """Draw DToMe's merge groups of one image (all its crops), one row per encoder layer.

        Args:
            image: an image file or PIL image.
            layers: encoder layers (0-based; negative from the feature layer); default: the feature layer.
            fill: ``"mean"``, ``"distinct"`` or ``"none"`` (see :func:`dymu.vis.draw_merge_map`).
            budget: token budget to draw under (default: the pipeline's).

        Returns:
            RGB PIL image: the crop(s) the encoder sees with their groups and token counts; one crop (LLaVA-1.5):
            the layers side by side; several (LLaVA-OneVision): a row of crops per layer.

        Raises:
            ValueError: the model runs without DToMe.
        """
        from dymu import vis

        if not _dymu.is_patched(self.tower):
            raise ValueError("merge maps need DToMe in the vision tower (load with dymu=low|mid|high or ToMe).")
        crops = self.crops(image)
        mean, std = self.image_processor.image_mean, self.image_processor.image_std
        views = [vis.image_from_pixels(c, mean, std) for c in crops]
        rule = self.merge_rule(crops.shape[0], budget)
        if (tb := self.token_budget(budget)) is not None and tb.has_bounds:  # as encode_images: the bounded
            counts = vis.merge_groups(self.tower, crops, merge_rule=rule).num_tokens  # rule where needed
            if self.out_of_bounds(counts, budget):
                rule = self.merge_rule(crops.shape[0], budget, bounded=range(crops.shape[0]))
        rows = []
        for layer in (layers if layers is not None else [None]):
            groups = vis.merge_groups(self.tower, crops, layer, merge_rule=rule)
            names = ["image"] if len(views) == 1 else ["base"] + [f"crop {i}" for i in range(1, len(views))]
            rows.append([vis.draw_merge_map(view, labels, fill=fill,
                                            caption=f"{name}, layer {groups.layer}: {k} of {labels.numel()}")
                         for view, labels, k, name in zip(views, groups.labels, groups.num_groups, names)])
        if len(views) == 1:  # one crop: the layers side by side
            rows = [[row[0] for row in rows]]
        return vis.tile(rows)

    def prompt(self, question: str, inputs: Sequence[ImageLike | Video] = ("image",)) -> str:
        """The model's chat prompt for one question about ``inputs`` (LLaVA-1.5: the vicuna_v1 template)."""
        return build_prompt(question, num_images=len(inputs))

    # ------------------------------------------------------------- prompts
    def build_inputs(self, prompts: Sequence[str], images: Sequence[Sequence[ImageLike]],
                     budget: VisualBudget | dict | None = None) -> LlavaInputs:
        """Tokenise prompts, encode their images, and lay out the merged batch (left padding).

        Args:
            prompts: full prompts containing one ``<image>`` placeholder per image (see
                :func:`llava.conversation.build_prompt`).
            images: per prompt, its images in placeholder order.
            budget: this request's :class:`VisualBudget` (per-image lists follow the images in prompt
                order); default: the pipeline's :attr:`budget`.

        Raises:
            ValueError: prompts and image lists differ in length, or a prompt's placeholder count differs
                from its number of images.
        """
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists.")
        tokenised = []  # placeholders are checked first: a bad prompt costs no vision compute
        for s, (prompt, imgs) in enumerate(zip(prompts, images)):
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"][0].to(self.device)
            is_video = ids == self.video_token_id if self.video_token_id is not None else torch.zeros_like(ids).bool()
            slots = ((ids == self.image_token_id) | is_video).nonzero().flatten().tolist()
            if len(slots) != len(imgs):
                raise ValueError(
                    f"prompt {s} has {len(slots)} '<image>'/'<video>' placeholders but {len(imgs)} images or "
                    "videos were given; put one placeholder per image (or video) in the prompt, e.g. build it "
                    "with pipe.prompt(question, images), which adds them to a question that has none."
                )
            kinds = [bool(is_video[slot]) for slot in slots]
            if kinds != [isinstance(item, Video) for item in imgs]:
                raise ValueError(f"prompt {s}: the order of '<image>' / '<video>' placeholders does not match the "
                                 "inputs (pass llava.Video(frames) for each '<video>').")
            tokenised.append((ids, slots))
        self._request_budget = VisualBudget.coerce(budget) if budget is not None else None
        try:
            encoded = self.encode_prompt_images(images)
        finally:
            self._request_budget = None
        embed = self.model.get_input_embeddings()
        merged_embeds, virtual_groups, merged_lengths, visual_tokens, unmerged = [], [], [], [], []
        next_image = 0
        for ids, slots in tokenised:
            pieces, groups, offset, cursor, n_visual, n_unmerged = [], [], 0, 0, 0, 0
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
                    n_unmerged += encoded.group_index[next_image].numel()
                    next_image += 1
                cursor = slot + 1
            merged_embeds.append(torch.cat(pieces))
            virtual_groups.append(torch.cat(groups))
            merged_lengths.append(offset)
            visual_tokens.append(n_visual)
            unmerged.append(n_unmerged)
        inputs = self._pad(merged_embeds, virtual_groups, merged_lengths, visual_tokens)
        inputs.unmerged_visual_tokens = unmerged
        return inputs

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
        budget: VisualBudget | dict | None = None,
        **generate_kwargs,
    ) -> tuple[list[str], LlavaInputs]:
        """Answer questions about images (greedy by default).

        Args:
            questions: user texts (placeholders are added unless present; see :meth:`prompt`).
            images: per question a list of images (or :class:`Video` s), or one per question.
            max_new_tokens: answer length limit.
            budget: this request's :class:`VisualBudget` (default: the pipeline's), e.g.
                ``{"max_visual_tokens": 64}`` or ``VisualBudget(threshold_scale=1.1)``.
            generate_kwargs: passed to ``model.generate``.

        Returns:
            ``(answers, inputs)``; ``inputs.visual_tokens`` gives the visual token count per question.
        """
        images = [[im] if isinstance(im, (Image.Image, str, os.PathLike, Video)) else list(im) for im in images]
        if len(images) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(images)} images (or image lists); give one per "
                             "question.")
        prompts = [self.prompt(q, imgs) for q, imgs in zip(questions, images)]
        inputs = self.build_inputs(prompts, images, budget=budget)
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
    budget: VisualBudget | dict | None = None,
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
        budget: default per-request :class:`VisualBudget` (threshold scale, max / min visual tokens per image).
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
                                  vtu_cache=vtu_cache, budget=budget)
    return DyMULlava(model, processor, vtu=vtu, image_aspect_ratio=image_aspect_ratio, vtu_cache=vtu_cache,
                     budget=budget)
