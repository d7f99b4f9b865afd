"""Images and videos as a VLM pipeline reads them: safe file opening, RGB conversion, padding, video frames.

Host-agnostic (PIL and numpy; no model): every family's pipeline reads its visual inputs through
:func:`load_image` and :class:`Video`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageOps

__all__ = ["ImageLike", "Video", "load_image", "expand_to_square", "describe_inputs", "IMAGE_FORMATS",
           "IMAGE_SUFFIXES", "MAX_IMAGE_SIDE"]

ImageLike = Image.Image | str | os.PathLike
"""An image as pipelines take it: a PIL image or the path of an image file."""


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
``eval.calibrate.list_images`` collects from a folder."""

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


def describe_inputs(inputs: Sequence) -> str:
    """``"2 images and 1 video (64 frames)"``: the visual inputs of one prompt, for error messages."""
    videos = [x for x in inputs if isinstance(x, Video)]
    n_images = len(inputs) - len(videos)
    parts = [f"{n_images} image{'s' * (n_images != 1)}"] if n_images or not videos else []
    if videos:
        frames = sum(v.num_frames for v in videos)
        parts.append(f"{len(videos)} video{'s' * (len(videos) != 1)} ({frames} frame{'s' * (frames != 1)})")
    return " and ".join(parts)
