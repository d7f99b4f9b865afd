"""Merge maps: which image patches each DToMe token holds, drawn over the image.

The groups come from the patched encoder's own bookkeeping (``group_ids``); no second implementation of the
merge. To see the groups after an intermediate layer ``l``, the encoder runs with its configured rule up to
``l`` and merges nothing after it, so the groups are exactly those the deployed encoder has after layer ``l``.

Pillow only (no matplotlib), so merge maps are available wherever DyMU is installed.

Shapes:
    N       images (or crops) in the batch
    N0      tokens per image before merging (CLS included where the encoder has one)
    h, w    patch grid (24 x 24 for CLIP ViT-L/14-336, 27 x 27 for SigLIP so400m/14-384)
    H, W    pixels (h * patch, w * patch)
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .merge import MergeRule
from .patch import dtome_settings

__all__ = ["MergeGroups", "merge_groups", "image_from_pixels", "draw_merge_map", "tile", "save_png"]


@dataclass
class MergeGroups:
    """Merge groups of a batch of images at one encoder layer.

    Attributes:
        labels: ``(N, h, w)`` long, the group of every patch, numbered ``0..k-1`` per image in raster order of
            each group's first patch (so labels are comparable across layers and runs).
        num_tokens: per image, the tokens the encoder holds at that layer (CLS included where the encoder
            has one). For LLaVA-1.5 (CLS dropped) the LLM gets ``num_tokens - 1`` visual tokens.
        num_groups: per image, the number of patch groups (``num_tokens`` without the CLS token).
        layer: 0-based encoder layer after which the groups were taken.
        has_cls: token 0 is a CLS token (not drawn: it covers no patch).
    """

    labels: torch.Tensor
    num_tokens: list[int]
    num_groups: list[int]
    layer: int
    has_cls: bool


@dataclass
class _StopAfter:
    """Merge rule that follows ``rule`` up to ``layer`` and merges nothing after it."""

    rule: MergeRule
    layer: int

    def __call__(self, layer: int, scores: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if layer > self.layer:
            return torch.zeros_like(scores, dtype=torch.bool)
        return self.rule(layer, scores, lengths)


def _raster_labels(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Renumber ``(P,)`` group ids ``0..k-1`` in order of each group's first patch; returns ``(labels, k)``."""
    unique, inverse = torch.unique(group_ids, return_inverse=True)
    first = torch.full((unique.numel(),), group_ids.numel(), dtype=torch.long, device=group_ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(group_ids.numel(), device=group_ids.device), reduce="amin")
    rank = torch.empty_like(first)
    rank[first.argsort()] = torch.arange(first.numel(), device=first.device)
    return rank[inverse], int(unique.numel())


@torch.no_grad()
def merge_groups(vision_model: torch.nn.Module, pixel_values: torch.Tensor, layer: int | None = None,
                 merge_rule: MergeRule | None = None) -> MergeGroups:
    """Merge groups of images at an encoder layer, from a DToMe-patched vision model.

    Args:
        vision_model: a vision tower patched by :func:`dymu.apply_dtome` (CLIP, SigLIP or open_clip).
        pixel_values: ``(N, 3, H, W)`` preprocessed images (as the model's image processor makes them).
        layer: 0-based encoder layer whose output groups are wanted; negative counts back from the last
            layer run (``-1``, the default ``None``: the feature layer, i.e. the tokens the LLM gets).
        merge_rule: override of the configured rule (e.g. a budgeted one); default: the configured rule.

    Returns:
        :class:`MergeGroups`.

    Raises:
        ValueError: the model is not a vision tower patched with :func:`dymu.apply_dtome` (see
            :func:`dymu.dtome_settings`), the patch grid is not square, or ``layer`` is out of range.
    """
    settings = dtome_settings(vision_model)  # ValueError unless a DToMe-patched tower (not the whole LLaVA model)
    n_run = settings.num_layers
    layer = n_run - 1 if layer is None else int(layer)
    if layer < 0:
        layer += n_run
    if not 0 <= layer < n_run:
        raise ValueError(f"layer must be in [-{n_run}, {n_run - 1}] (the encoder runs {n_run} layers), got {layer}.")
    rule = _StopAfter(merge_rule if merge_rule is not None else settings.rule, layer)
    param = next(vision_model.parameters())
    out = vision_model.dtome_forward(pixel_values.to(param.device, param.dtype), merge_rule=rule)
    has_cls = settings.protect_first
    group_ids = out.group_ids[:, int(has_cls):].cpu()  # (N, P): token of every patch
    side = int(round(group_ids.shape[1] ** 0.5))
    if side * side != group_ids.shape[1]:
        raise ValueError(f"{group_ids.shape[1]} patches do not form a square grid.")
    labels, counts = [], []
    for ids in group_ids:
        lab, k = _raster_labels(ids)
        labels.append(lab.view(side, side))
        counts.append(k)
    return MergeGroups(labels=torch.stack(labels), num_tokens=[k + int(has_cls) for k in counts], num_groups=counts,
                       layer=layer, has_cls=has_cls)


def image_from_pixels(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """Undo an image processor's normalisation: ``(3, H, W)`` pixel values -> RGB PIL image."""
    x = pixel_values.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy(), mode="RGB")


def _distinct_colours(k: int) -> np.ndarray:
    """``(k, 3)`` uint8 colours spread around the hue circle (golden-ratio steps, so neighbours differ)."""
    hues = (np.arange(k) * 0.6180339887) % 1.0
    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.55 + 0.35 * (i % 2), 0.95)]
                     for i, h in enumerate(hues)], dtype=np.uint8).reshape(k, 3)


def draw_merge_map(image: Image.Image, labels: torch.Tensor, fill: str = "mean", borders: bool = True,
                   caption: str | None = None, border_colour: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Draw merge groups over an image.

    Args:
        image: the view the encoder saw (e.g. :func:`image_from_pixels` of the preprocessed crop), ``H x W``.
        labels: ``(h, w)`` group of every patch (:attr:`MergeGroups.labels` of one image).
        fill: ``"mean"`` (each group filled with its mean colour), ``"distinct"`` (a colour per group) or
            ``"none"`` (the image itself; only the borders are drawn).
        borders: draw a 1-pixel line where neighbouring patches belong to different groups.
        caption: text drawn in a strip under the map (e.g. the token count); None for no strip.
        border_colour: RGB of the borders.

    Returns:
        RGB PIL image of ``H x W`` pixels (plus a caption strip).

    Raises:
        ValueError: unknown ``fill``, or an image smaller than the patch grid.
    """
    if fill not in ("mean", "distinct", "none"):
        raise ValueError(f"fill must be 'mean', 'distinct' or 'none', got {fill!r}.")
    h, w = labels.shape
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    height, width = rgb.shape[:2]
    if height < h or width < w:
        raise ValueError(f"image of {width}x{height} pixels is smaller than the {w}x{h} patch grid.")
    # Pixel -> patch -> group (nearest patch; exact when H, W are multiples of the grid).
    rows = np.minimum(np.arange(height) * h // height, h - 1)
    cols = np.minimum(np.arange(width) * w // width, w - 1)
    pix = labels.cpu().numpy()[rows[:, None], cols[None, :]]  # (H, W)
    k = int(pix.max()) + 1
    if fill == "mean":
        counts = np.bincount(pix.ravel(), minlength=k)[:, None]
        sums = np.stack([np.bincount(pix.ravel(), weights=rgb[..., c].ravel(), minlength=k) for c in range(3)], -1)
        out = (sums / np.maximum(counts, 1))[pix]
    elif fill == "distinct":
        out = _distinct_colours(k)[pix].astype(np.float64)
    else:
        out = rgb
    out = out.round().astype(np.uint8)
    if borders:
        edge = np.zeros((height, width), dtype=bool)
        edge[:, 1:] |= pix[:, 1:] != pix[:, :-1]
        edge[1:, :] |= pix[1:, :] != pix[:-1, :]
        out[edge] = border_colour
    drawn = Image.fromarray(out, mode="RGB")
    return _with_caption(drawn, caption) if caption is not None else drawn


def _with_caption(image: Image.Image, caption: str) -> Image.Image:
    font = ImageFont.load_default()
    lines = caption.split("\n")
    line_height = 14
    canvas = Image.new("RGB", (image.width, image.height + 6 + line_height * len(lines)), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, image.height + 3 + line_height * i), line, fill=(0, 0, 0), font=font)
    return canvas


def tile(images: Sequence[Sequence[Image.Image]], gap: int = 6, title: str | None = None) -> Image.Image:
    """Lay out rows of images on a white canvas (rows may differ in length), with an optional title strip."""
    rows = [list(r) for r in images if len(r)]
    if not rows:
        raise ValueError("tile needs at least one image.")
    widths = [sum(im.width for im in r) + gap * (len(r) - 1) for r in rows]
    heights = [max(im.height for im in r) for r in rows]
    top = 18 if title else 0
    canvas = Image.new("RGB", (max(widths) + 2 * gap, top + sum(heights) + gap * (len(rows) + 1)), (255, 255, 255))
    if title:
        ImageDraw.Draw(canvas).text((gap, 3), title, fill=(0, 0, 0), font=ImageFont.load_default())
    y = top + gap
    for r, height in zip(rows, heights):
        x = gap
        for im in r:
            canvas.paste(im, (x, y))
            x += im.width + gap
        y += height + gap
    return canvas


def save_png(image: Image.Image, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Save ``image`` as PNG (parent folders created).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True or choose another path.")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
