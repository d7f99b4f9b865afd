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
from PIL import ExifTags, Image, ImageOps
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
           "load_image", "IMAGE_FORMATS", "IMAGE_SUFFIXES"]

logger = logging.getLogger(__name__)

ImageLike = Image.Image | str | os.PathLike


MAX_IMAGE_SIDE = 4608
"""Longer side (px) above which :func:`load_image` first shrinks an image by an integer factor (``Image.reduce``,
a box filter), bounding preprocessing memory: twice LLaVA-OneVision's largest AnyRes side; LLaVA-1.5 sees 336."""


def _supported_formats() -> tuple[str, ...]:
    from PIL import features

    Image.init()  # registers every plugin, so the check below sees them all
    wanted = {"JPEG": "jpg", "MPO": "jpg", "PNG": "zlib", "BMP": None, "GIF": None, "WEBP": "webp", "TIFF": None,
              "AVIF": "avif"}  # format -> the Pillow feature that decodes it
    return tuple(f for f, need in wanted.items() if f in Image.registered_extensions().values()
                 and (need is None or features.check(need)))


IMAGE_FORMATS: tuple[str, ...] = _supported_formats()
"""The file formats :func:`load_image` opens (Pillow format names): the raster formats JPEG, MPO (multi-picture
JPEG from phones; Pillow reads it with its JPEG plugin), PNG (and APNG), BMP, GIF, WEBP, TIFF and AVIF, each
where this Pillow build can decode it. Every other format Pillow knows (EPS, which it would render with
Ghostscript; XPM, ICO, PSD, PPM, TGA, ...) is refused whatever the file is called; Pillow cannot read PDF at all.
:data:`IMAGE_SUFFIXES` lists these formats' file names."""

IMAGE_SUFFIXES: tuple[str, ...] = tuple(sorted(
    suffix for suffix, fmt in Image.registered_extensions().items() if fmt in IMAGE_FORMATS))
"""File-name suffixes (lower case) of :data:`IMAGE_FORMATS`, from Pillow's registered extensions: what
``llava.calibrate.list_images`` collects from a folder."""

_OPENED_FORMATS = tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)  # MPO has no opener of its own: JPEG's reads it
_TILE_SIDE = 1024  # px; conversion works on tiles of about this side, so its copies are small whatever the mode


def _open_regular_file(path: str | os.PathLike):
    """``path`` opened for binary reading, refused (ValueError) unless it is a regular file.

    ``os.stat`` decides before anything is opened: a named pipe is never opened (reading one blocks until a
    writer appears). The open itself is non-blocking and re-checked, in case the path changed in between.
    """
    import stat

    kinds = {stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISSOCK: "a socket",
             stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}

    def refuse(mode: int) -> None:
        if stat.S_ISDIR(mode):
            raise ValueError(f"image path {path} is a directory, not an image file; pass the path of an image file.")
        if not stat.S_ISREG(mode):
            kind = next((kind for test, kind in kinds.items() if test(mode)), "a special file")
            raise ValueError(f"image path {path} is {kind}, not a regular file; it is not read, since reading a pipe "
                             "or device can block or never end. Save the image to a file and pass that path.")

    try:
        refuse(os.stat(path).st_mode)
    except FileNotFoundError:
        raise
    except OSError as err:  # a symbolic-link loop, a path component that is not a folder, no permission, ...
        raise ValueError(f"cannot access image path {path}: {err.strerror or err}; check the path and any symbolic "
                         "links on it.") from err
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except PermissionError as err:
        raise ValueError(f"cannot open image file {path}: permission denied; make it readable or copy it to a "
                         "folder you can read.") from err
    try:
        refuse(os.fstat(fd).st_mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _refused_format(fp) -> str | None:
    """The Pillow formats outside :data:`IMAGE_FORMATS` whose signature the file's first bytes match, if any
    (``"XBM or XPM"`` where several do).

    Only the plugins' signature checks run, on the first 16 bytes; nothing is parsed or decoded.
    """
    try:
        fp.seek(0)
        prefix = fp.read(16)
    except (OSError, ValueError, AttributeError):
        return None
    matches = []
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        try:
            if accept is not None and accept(prefix):
                matches.append(fmt)
        except Exception:  # noqa: BLE001 - a plugin's check that chokes on these bytes does not claim them
            continue
    if any(fmt in IMAGE_FORMATS for fmt in matches):
        return None  # an allowed format's signature: a corrupt file of that format, not a refused one
    return " or ".join(matches) or None


def _rgb_converter(img: Image.Image, name: object):
    """How to turn (a tile of) ``img`` into 8-bit RGB (see :func:`load_image` for the rules); the mode and, for
    32-bit integer images, the value range are checked once for the whole image."""
    if img.mode == "F":
        raise ValueError(f"image {name} holds 32-bit floats (PIL mode 'F'), which have no defined value range; "
                         "convert it to 8 bit first, e.g. Image.fromarray((array * 255).round().astype('uint8')).")
    if img.mode.startswith("I;16") or img.mode == "I":
        import numpy as np

        low, high = img.getextrema() if img.width and img.height else (0, 0)
        if img.mode == "I" and 0 <= low and high <= 255:
            scale = False  # 8-bit data held in a 32-bit image: as PIL's own conversion
        elif 0 <= low and high <= 65535:
            scale = True  # 16 bit -> 8 bit, rounded (65535 -> 255); convert() would saturate
        else:
            raise ValueError(f"image {name} is a 32-bit integer image with values in [{low}, {high}], beyond 16 bit; "
                             "scale it to 8 bit and pass it as a PIL image.")

        def from_integers(tile: Image.Image) -> Image.Image:
            values = np.asarray(tile).astype(np.uint32)
            if scale:
                values += 128
                values //= 257
            return Image.fromarray(values.astype(np.uint8)).convert("RGB")

        return from_integers
    if img.mode == "P" and "transparency" in img.info:
        return lambda tile: tile.convert("RGBA").convert("RGB")  # alpha then dropped as for RGBA (no PIL warning)
    return lambda tile: tile if tile.mode == "RGB" else tile.convert("RGB")


def _to_rgb(img: Image.Image, name: object, factor: int) -> Image.Image:
    """``img`` as 8-bit RGB reduced by ``factor``, converted tile by tile; never ``img`` itself.

    Equal to converting the whole image, then ``reduce(factor)``: tiles start at multiples of ``factor``, so the
    reduction boxes are the same. Only one tile's conversion is held at a time besides the output.
    """
    convert = _rgb_converter(img, name)
    width, height = img.size
    if width <= _TILE_SIDE and height <= _TILE_SIDE:
        out = convert(img.crop((0, 0, width, height)) if img.mode == "RGB" else img)  # crop: a copy
        return out.reduce(factor) if factor > 1 else out
    side = factor * max(1, _TILE_SIDE // factor)  # a multiple of factor
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    for top in range(0, height, side):
        for left in range(0, width, side):
            tile = convert(img.crop((left, top, min(left + side, width), min(top + side, height))))
            out.paste(tile.reduce(factor) if factor > 1 else tile, (left // factor, top // factor))
    return out


def _open_allowed_format(fp, name: object) -> Image.Image:
    """``Image.open`` restricted to :data:`IMAGE_FORMATS`; a file in another known format is a ValueError naming it."""
    from PIL import UnidentifiedImageError

    try:
        return Image.open(fp, formats=_OPENED_FORMATS)
    except UnidentifiedImageError:
        refused = _refused_format(fp)
        if refused is None:  # Pillow's message would name the file descriptor; load_image names the file
            raise UnidentifiedImageError("cannot identify image file") from None
    raise ValueError(f"image {name} is in {refused} format, which load_image does not open; it reads only the "
                     f"raster formats {', '.join(IMAGE_FORMATS)}. Convert it to PNG or JPEG first.")


def _upright_rgb(img: Image.Image, name: object) -> Image.Image:
    """:func:`_to_rgb` with the reduction :func:`load_image` documents, then the EXIF orientation applied."""
    orientation = img.getexif().get(ExifTags.Base.Orientation)
    out = _to_rgb(img, name, max(1, -(-max(img.size) // MAX_IMAGE_SIDE)))  # ceil: longer side in (MAX/2, MAX]
    if orientation is None:
        return out
    out.getexif()[ExifTags.Base.Orientation] = orientation  # the tag of the source, on the reduced pixels
    return ImageOps.exif_transpose(out)


def load_image(image: ImageLike) -> Image.Image:
    """Open an image file (or take a PIL image) as the 8-bit RGB image the model sees.

    - Files are opened only in the formats :data:`IMAGE_FORMATS` (JPEG, MPO, PNG, BMP, GIF, WEBP, TIFF, AVIF),
      whatever their name: an EPS file named ``photo.jpg`` is refused, not rendered by Ghostscript (XPM, ICO,
      PSD, PPM, ... likewise). Only regular files are opened: a directory, named pipe (never opened: reading it
      would block), device or symbolic-link loop is refused at once.
    - EXIF orientation is applied (as ``ImageOps.exif_transpose``, after any reduction): a portrait photo stored
      sideways is upright. (Upstream LLaVA does not do this; only files carrying an orientation tag differ.)
    - 16-bit images (PIL modes ``I;16*``, e.g. 16-bit PNG / TIFF, and ``I`` with values up to 65535) are scaled
      to 8 bit (``round(v / 257)``); ``I`` images whose values fit in ``[0, 255]`` are taken as 8-bit.
    - Alpha (RGBA, LA, palette with transparency) is dropped exactly as upstream LLaVA's ``convert("RGB")``
      does: the colour stored under transparent pixels is kept, nothing is composited. Composite it
      yourself (e.g. onto white) and pass the PIL image if that is what you want.
    - Grayscale, 1-bit, palette and CMYK images go through PIL's conversion to RGB.
    - An image whose longer side exceeds :data:`MAX_IMAGE_SIDE` is reduced by the smallest integer factor that
      brings it within (``Image.reduce``, a box filter, on the RGB image; it is resized to 336 / at most 2304 px
      later anyway). PIL's decompression-bomb limit (``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels) applies to files.

    Memory: PIL decodes a file whole, taking width x height x 1 byte (modes ``1``, ``L``, ``P``), 2 bytes
    (``I;16``) or 4 bytes (``RGB``, ``RGBA``, ``CMYK``, ``I``: PIL stores 3 channels in 4 bytes). On top of that
    load_image holds only its output (at most 4608 x 4608 px, 81 MiB) and one tile of about 1024 x 1024 px being
    converted, whatever the mode and size: peak memory stays under 160 MiB above the decoded image (measured
    at most 110 MiB, for every mode, up to PIL's largest legal image of 179 M px). The result equals
    converting the whole image, then reducing it.

    A PIL image passed in is not modified.

    Raises:
        FileNotFoundError: no file at the path.
        ValueError: the path is not a regular file (directory, named pipe, device, symbolic-link loop) or not
            readable; the file is in a format outside :data:`IMAGE_FORMATS` (the message names the format); or it
            is not a readable image (truncated, not an image, a decompression bomb, a float image, or a mode PIL
            cannot convert). The message names the file and what to do.
        TypeError: ``image`` is neither a PIL image nor a path / file object.
    """
    name = image if isinstance(image, (str, os.PathLike)) else (
        getattr(image, "filename", "") or getattr(image, "name", "") or f"<{type(image).__name__}>")
    try:
        if isinstance(image, Image.Image):
            return _upright_rgb(image, name)
        if isinstance(image, (str, os.PathLike)):
            with _open_regular_file(image) as fp, _open_allowed_format(fp, name) as opened:
                opened.load()
                return _upright_rgb(opened, name)
        if hasattr(image, "read"):
            with _open_allowed_format(image, name) as opened:
                opened.load()
                return _upright_rgb(opened, name)
        raise TypeError(f"load_image takes a PIL image or an image file path, got {type(image).__name__}; "
                        "wrap an (H, W, 3) uint8 array with PIL.Image.fromarray(array).")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image file {image} does not exist; check the path (or the benchmark's "
                                "data_dir / image root).") from err
    except Image.DecompressionBombError as err:
        raise ValueError(f"image {name} is too large to decode safely ({err}); if the file is trusted, shrink it "
                         "first or raise PIL.Image.MAX_IMAGE_PIXELS.") from err
    except (OSError, SyntaxError, EOFError) as err:
        raise ValueError(f"cannot read image {name}: {err}. The file is truncated, corrupt or not an image in a "
                         f"format load_image opens ({', '.join(IMAGE_FORMATS)}): re-download or re-export it, or "
                         "drop it from the inputs.") from err
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


def _frames_shape_hint(shape: tuple[int, ...]) -> str:
    """What to do about a frames array of the wrong shape (see :class:`Video`)."""
    if 0 in shape:
        return "; it holds no pixels (a dimension is 0): check the decoding / sampling that made it"
    if len(shape) == 3 and shape[-1] == 3:
        return "; one frame of shape (H, W, 3)? add the time axis: frames[None]"
    if len(shape) == 3:
        return "; grayscale frames (T, H, W)? repeat them to RGB: np.repeat(frames[..., None], 3, axis=-1)"
    if len(shape) == 4 and shape[1] == 3:
        return "; channels first (T, 3, H, W)? move them last: frames.transpose(0, 2, 3, 1) (torch: permute)"
    if len(shape) == 4 and shape[-1] == 4:
        return "; RGBA? drop the alpha channel: frames[..., :3]"
    if len(shape) == 4 and shape[-1] == 1:
        return "; one channel? repeat it to RGB: frames.repeat(3, axis=-1)"
    return ""


@dataclass
class Video:
    """A video as a prompt input: its sampled frames, in time order (for a ``<video>`` placeholder).

    Only LLaVA-OneVision takes videos; for LLaVA-1.5 pass frames as images.

    Attributes:
        frames: a non-empty list of frames (PIL images or paths), or a ``(T, H, W, 3)`` uint8 RGB array /
            tensor with ``T, H, W >= 1``. Checked when the Video is made.

    Raises:
        TypeError: ``frames`` is one image or path, or neither a list nor an array.
        ValueError: no frames; an array whose shape is not ``(T, H, W, 3)`` with ``T, H, W >= 1`` or whose dtype is
            not uint8 (the message says how to convert).
    """

    frames: Sequence[ImageLike] | object

    def __post_init__(self) -> None:
        frames = self.frames
        if hasattr(frames, "shape") and hasattr(frames, "dtype"):  # (T, H, W, 3) array or tensor
            shape = tuple(int(n) for n in frames.shape)
            if len(shape) != 4 or shape[-1] != 3 or 0 in shape:
                raise ValueError(f"Video frames as an array must have shape (T, H, W, 3) (T RGB frames of H x W "
                                 f"pixels, T, H, W >= 1), got {shape}{_frames_shape_hint(shape)}.")
            dtype = str(frames.dtype).removeprefix("torch.")
            if dtype != "uint8":  # a cast would wrap or zero floats (0..1 frames, NaN) without a word
                raise ValueError(f"Video frames as an array must be uint8 RGB (T, H, W, 3), got dtype {dtype}; "
                                 "convert first, e.g. (frames * 255).round().clip(0, 255).astype(np.uint8).")
        elif isinstance(frames, (str, bytes, os.PathLike, Image.Image)) or not isinstance(frames, Sequence):
            raise TypeError(f"Video takes a list of frames (PIL images or paths) or a (T, H, W, 3) uint8 array, got "
                            f"{type(frames).__name__}; wrap a single frame in a list (Video([frame])), or pass a "
                            "still image as an image, not a Video.")
        elif len(frames) == 0:
            raise ValueError("a Video needs at least one frame, got an empty list of frames.")

    @property
    def num_frames(self) -> int:
        """Frames in the video (without decoding them)."""
        return int(self.frames.shape[0]) if hasattr(self.frames, "shape") else len(self.frames)

    def images(self) -> list[Image.Image]:
        """The frames as RGB PIL images.

        Raises:
            ValueError: a frame file that cannot be read (see :func:`load_image`).
        """
        frames = self.frames
        if hasattr(frames, "shape"):  # checked in __post_init__: (T, H, W, 3) uint8
            import numpy as np

            array = np.asarray(frames.cpu() if hasattr(frames, "cpu") else frames)
            frames = [Image.fromarray(f) for f in array]
        return [load_image(f) for f in frames]


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


def _check_text(name: str, text: object) -> None:
    """``text`` (a question or prompt, ``name`` says which) must be a ``str`` of valid Unicode.

    The tokenizers fail on anything else with a raw ``TypeError`` that names neither the prompt nor the cause.

    Raises:
        TypeError: not a ``str``.
        ValueError: it holds a lone surrogate (``"\\ud800"``), which is not Unicode text and cannot be encoded.
    """
    if not isinstance(text, str):
        hint = " (decode bytes first: text.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ""
        raise TypeError(f"{name} is {type(text).__name__} ({text!r:.60}), not a string; pass the text as a str{hint}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{name} holds a lone surrogate U+{ord(text[err.start]):04X} at character {err.start} "
            f"({text[:err.start][-30:]!r} precedes it), which is not valid Unicode text (typically text decoded with errors='surrogateescape' or a "
            "JSON '\\ud83d' escape without its pair); repair the text, e.g. text.encode('utf-8', "
            "'replace').decode('utf-8') puts '?' in its place."
        ) from None


def _describe_inputs(inputs: Sequence) -> str:
    """``"2 images and 1 video (64 frames)"``: the visual inputs of one prompt, for error messages."""
    videos = [x for x in inputs if isinstance(x, Video)]
    n_images = len(inputs) - len(videos)
    parts = [f"{n_images} image{'s' * (n_images != 1)}"] if n_images or not videos else []
    if videos:
        frames = sum(v.num_frames for v in videos)
        parts.append(f"{len(videos)} video{'s' * (len(videos) != 1)} ({frames} frame{'s' * (frames != 1)})")
    return " and ".join(parts)


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

    supports_video = False
    """Whether :class:`Video` inputs are taken (LLaVA-OneVision); LLaVA-1.5 takes images only."""
    placeholders = ("<image>",)
    """Texts the tokenizer reads as a visual input's slot (LLaVA-OneVision adds ``<video>``)."""

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

    @property
    def max_positions(self) -> int | None:
        """Positions the language model takes (``text_config.max_position_embeddings``, read at each call);
        None when its config has no limit."""
        limit = getattr(self.model.config.text_config, "max_position_embeddings", None)
        return int(limit) if limit is not None else None

    def _visual_positions_before_encoding(self, inputs: Sequence[ImageLike | Video]) -> tuple[int, bool]:
        """LLM positions the visual inputs of one prompt take, as known before encoding: ``(count, exact)``,
        ``count`` a lower bound when not ``exact``.

        With VTU the count is the virtual (unmerged) layout, which merging does not change; LLaVA-1.5: exact,
        every image's full patch grid (576 for CLIP ViT-L/14-336). Without VTU the merged count is known only
        after encoding (at least one position per image).
        """
        if not self.vtu or not inputs:
            return len(inputs), not inputs
        try:
            n0, _ = _dymu.vision_token_count(self.tower)
        except NotImplementedError:  # a tower of unknown geometry: the exact check after encoding still holds
            return len(inputs), False
        keep_cls = self.model.config.vision_feature_select_strategy == "full"
        return (n0 - (0 if keep_cls else 1)) * len(inputs), True  # as encode_images drops token 0

    def _check_positions(self, index: int, text: int, visual: int, inputs: Sequence, max_new_tokens: int,
                         exact: bool = True) -> None:
        """Prompt ``index`` (``text`` tokens, ``visual`` LLM positions of its ``inputs``) plus ``max_new_tokens``
        must fit in :attr:`max_positions`.

        Raises:
            ValueError: it does not; the message gives the numbers and what to reduce.
        """
        limit, total = self.max_positions, text + visual + max_new_tokens
        if limit is None or total <= limit:
            return
        layout = ("visual tokens count in the unmerged layout that VTU's positions run over, so merging does not "
                  "shorten them" if self.vtu else
                  "visual tokens are the merged ones, at consecutive positions (VTU off)")
        raise ValueError(
            f"prompt {index} needs {'' if exact else 'at least '}{total:,} positions but the language model has "
            f"{limit:,} (text_config.max_position_embeddings): {text:,} text tokens + {visual:,} visual tokens for "
            f"{_describe_inputs(inputs)} + {max_new_tokens:,} for the answer (max_new_tokens); {layout}. Cut at "
            f"least {total - limit:,}: fewer images or video frames, a shorter prompt, or a smaller max_new_tokens."
        )

    def _check_visual_inputs(self, index: int, inputs: Sequence) -> None:
        """The model takes every input of prompt ``index``.

        Raises:
            TypeError: a :class:`Video` for a model without video support (LLaVA-1.5).
        """
        for i, item in enumerate(inputs):
            if isinstance(item, Video) and not self.supports_video:
                raise TypeError(
                    f"prompt {index}, input {i} is a llava.Video ({item.num_frames} frames), but {type(self).__name__} "
                    "(LLaVA-1.5) takes images only: use a LLaVA-OneVision model for video, or pass the frames as "
                    "images (video.images(), one '<image>' each)."
                )

    def _check_question(self, question: object, inputs: Sequence, index: int | None = None) -> None:
        """A question for :meth:`prompt` (``index``: its place in a :meth:`generate` call).

        Raises:
            TypeError: not a str.
            ValueError: a lone surrogate; placeholders in the question that do not match the inputs one to one.
        """
        name = f"question {index}" if index is not None else "the question"
        _check_text(name, question)
        count = sum(question.count(p) for p in self.placeholders)
        if count and count != len(inputs):
            marks = " / ".join(f"'{p}'" for p in self.placeholders)
            raise ValueError(
                f"{name} contains {count} {marks} placeholder{'s' * (count != 1)} but {_describe_inputs(inputs)} "
                f"{'was' if len(inputs) == 1 else 'were'} given. A question that contains {marks} places its inputs "
                "itself, one placeholder per input in order (a question without any gets them before it). If the "
                "text is meant literally, it cannot be passed as it is, since the tokenizer reads it as the slot "
                "of an input: write it another way, e.g. '< image >'."
            )

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
        """Encode the images of a batch of prompts (per prompt, its images), flattened in prompt order.

        Raises:
            TypeError: a :class:`Video` (LLaVA-1.5 takes images only).
        """
        for s, imgs in enumerate(images):
            self._check_visual_inputs(s, imgs)
        flat = [img for imgs in images for img in imgs]
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
        """The model's chat prompt for one question about ``inputs`` (LLaVA-1.5: the vicuna_v1 template).

        Placeholders: a question without ``<image>`` gets one ``<image>\\n`` per input before it. A question that
        contains ``<image>`` places its inputs itself: it must contain exactly one per input, in input order,
        each taken as that input's slot. So the literal text ``<image>`` cannot be asked about as it is (the
        tokenizer reads it as the image slot): a question holding it with a different number of inputs is
        refused rather than guessed at; write such text another way (e.g. ``< image >``).

        Raises:
            TypeError: ``question`` is not a str.
            ValueError: an empty question, a lone surrogate in it, or placeholders in it that do not match
                ``inputs`` one to one.
        """
        self._check_question(question, inputs)
        return build_prompt(question, num_images=len(inputs))

    # ------------------------------------------------------------- prompts
    def build_inputs(self, prompts: Sequence[str], images: Sequence[Sequence[ImageLike]],
                     budget: VisualBudget | dict | None = None, max_new_tokens: int = 0) -> LlavaInputs:
        """Tokenise prompts, encode their images, and lay out the merged batch (left padding).

        Position limit: each prompt's positions plus ``max_new_tokens`` must fit in the language model's
        :attr:`max_positions` (``text_config.max_position_embeddings``). With VTU the positions are the virtual
        layout: its text tokens plus every visual input's full pre-merge token count (576 per LLaVA-1.5 image),
        however much the encoder merges; without VTU, the merged length. The check runs twice, both times
        before the LLM: before any image is read or encoded, on the length known from the prompt alone (exact
        for LLaVA-1.5 images and LLaVA-OneVision videos and multi-image prompts; a lower bound for a
        single-image AnyRes prompt, whose length depends on the image size), and after encoding, exactly.

        An empty batch (``[]``, ``[]``) gives empty inputs (no prompt, nothing encoded).

        Args:
            prompts: full prompts containing one ``<image>`` placeholder per image (see
                :func:`llava.conversation.build_prompt`).
            images: per prompt, its images in placeholder order.
            budget: this request's :class:`VisualBudget` (per-image lists follow the images in prompt
                order); default: the pipeline's :attr:`budget`.
            max_new_tokens: positions to keep free after each prompt for its answer (:meth:`generate` passes
                its own); 0 for a forward pass.

        Raises:
            TypeError: ``prompts`` is one str rather than a list, a prompt is not a str, or a :class:`Video`
                for a model without video support (LLaVA-1.5).
            ValueError: prompts and image lists differ in length; a prompt holds a lone surrogate; a prompt's
                placeholder count differs from its number of images; a prompt (plus ``max_new_tokens``) is
                longer than the model's position limit; ``max_new_tokens`` is negative or not an int.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of prompts, one per sample; got a single str: wrap it, "
                            "build_inputs([prompt], [images]).")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}.")
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists.")
        if not prompts:
            return self._empty_inputs()
        tokenised = []  # placeholders and lengths are checked first: a bad prompt costs no vision compute
        for s, (prompt, imgs) in enumerate(zip(prompts, images)):
            _check_text(f"prompt {s}", prompt)
            self._check_visual_inputs(s, imgs)
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
            visual, exact = self._visual_positions_before_encoding(imgs)
            self._check_positions(s, len(ids) - len(slots), visual, imgs, max_new_tokens, exact=exact)
            tokenised.append((ids, slots))
        self._request_budget = VisualBudget.coerce(budget) if budget is not None else None
        try:
            encoded = self.encode_prompt_images(images)
        finally:
            self._request_budget = None
        embed = self.model.get_input_embeddings()
        merged_embeds, virtual_groups, merged_lengths, visual_tokens, unmerged = [], [], [], [], []
        next_image = 0
        for s, (ids, slots) in enumerate(tokenised):
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
            n_text = len(ids) - len(slots)  # the exact check, before the LLM: virtual (VTU) or merged positions
            self._check_positions(s, n_text, n_unmerged if self.vtu else n_visual, images[s], max_new_tokens)
            merged_embeds.append(torch.cat(pieces))
            virtual_groups.append(torch.cat(groups))
            merged_lengths.append(offset)
            visual_tokens.append(n_visual)
            unmerged.append(n_unmerged)
        inputs = self._pad(merged_embeds, virtual_groups, merged_lengths, visual_tokens)
        inputs.unmerged_visual_tokens = unmerged
        return inputs

    def _empty_inputs(self) -> LlavaInputs:
        """The inputs of an empty batch: ``(0, 0, C)`` embeddings, ``(0, 0)`` mask and positions, no samples."""
        weight = self.model.get_input_embeddings().weight
        empty = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        return LlavaInputs(weight.new_zeros(0, 0, weight.shape[-1]), empty, empty.clone(), None, [], [])

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
            ``(answers, inputs)``; ``inputs.visual_tokens`` gives the visual token count per question. No
            questions (``generate([], [])``): ``([], inputs)`` with empty inputs, and the model does not run.

        Raises:
            TypeError: ``questions`` is one str rather than a list, a question is not a str, or a
                :class:`Video` for LLaVA-1.5.
            ValueError: questions and image lists differ in number; an empty question, or one with a lone
                surrogate or with placeholders that do not match its inputs (see :meth:`prompt`); a prompt whose
                positions plus ``max_new_tokens`` exceed the model's limit (see :meth:`build_inputs`), raised
                before the LLM runs. In eval the runner records such a sample as failed and scores the rest.
        """
        if isinstance(questions, str):
            raise TypeError("questions must be a list of questions, one per sample; got a single str: wrap it, "
                            "generate([question], [image]).")
        images = [[im] if isinstance(im, (Image.Image, str, os.PathLike, Video)) else list(im) for im in images]
        if len(images) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(images)} images (or image lists); give one per "
                             "question.")
        for i, (question, imgs) in enumerate(zip(questions, images)):
            self._check_question(question, imgs, index=i)
        prompts = [self.prompt(q, imgs) for q, imgs in zip(questions, images)]
        inputs = self.build_inputs(prompts, images, budget=budget,
                                   max_new_tokens=max_new_tokens if max_new_tokens is not None else 0)
        if not prompts:
            return [], inputs
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
