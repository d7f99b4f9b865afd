"""Deterministic generated visual questions with one-word answers (training and benchmark data for the testbed).

The recipe, for image ``i`` of split ``s`` (seed ``SPLITS[s] + i``, so splits never share an image):

1. **Scene** (:func:`make_scene`). ``numpy.random.default_rng(seed)`` draws the background (uniform over
   :data:`BACKGROUNDS`), the number of shapes (uniform 1..6) and, per shape, its kind (:data:`SHAPES`), colour
   (:data:`COLOURS`) and size class (``small``: radius about 0.07 * image size, ``large``: about 0.13 * size,
   each jittered by +-10%). Centres are placed one shape at a time by rejection sampling so that every shape's
   bounding circle lies inside the image (with an edge margin) and is separated from the others' by a gap; a
   shape that finds no free spot is dropped, so a scene may hold fewer shapes than first drawn, and everything
   downstream (the count question included) uses the shapes actually placed.
2. **Rendering** (:func:`render`). The background spans flat to busy: one muted colour (``flat``), a linear
   blend of two muted colours at a random angle (``gradient``), a random crop of scikit-image's grayscale
   textures (``brick``, ``grass``, ``gravel``; optionally tinted) or of one of its bundled photos (``photo``).
   Muted colours are resampled while they are close to any shape colour, so shapes on flat and gradient
   backgrounds never blend in. Shapes are solid fills (no anti-aliasing: a shape's pixels are exactly its
   colour) with a thin dark or light outline, whichever contrasts with the background under the shape. All
   randomness comes from ``scene.seed``, so the same scene always gives the same pixels.
3. **Questions** (:func:`questions`). At most one question per type and image (the benchmark's questions), and
   every type whenever it is well defined: ``shape`` (the kind of the only shape of some colour), ``color`` (the colour of the only shape
   of some kind), ``count`` (how many shapes), ``position`` (left or right, for a shape named uniquely by colour
   and kind whose centre is more than 0.12 * size off the vertical midline) and ``exists`` (a present or an
   absent colour-kind pair, yes or no with probability 1/2 each). Choices among valid candidates use a
   generator derived from the scene seed. Training may ask more of each image (``every=True``): every well-defined
   question of each type, so one pass over an image's visual tokens supervises several times more answers; the
   one-per-type questions, and so the benchmark, do not change.

Simple images (flat background, one shape) should end with few visual tokens after merging, busy ones (a
texture or a photo with six shapes) with many. :func:`split_samples` lists the questions of a range of images;
:func:`write_split` writes a split to disk (PNG images, ``questions.jsonl``, ``meta.json``).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "GENERATOR_VERSION",
    "SHAPES",
    "COLOURS",
    "QUESTION_TYPES",
    "BACKGROUNDS",
    "SPLITS",
    "Shape",
    "Scene",
    "Question",
    "Sample",
    "make_scene",
    "render",
    "shape_mask",
    "patch_labels",
    "questions",
    "split_samples",
    "write_split",
    "answer_words",
]

GENERATOR_VERSION = "1"
"""Bumped whenever a change to this module changes any scene, pixel or question for a given seed."""

SHAPES = ("circle", "square", "triangle", "star", "cross")
"""Shape kinds, as they appear in questions and answers."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 80, 230),
    "yellow": (245, 215, 30),
    "purple": (150, 50, 190),
    "orange": (250, 135, 20),
}
"""Shape colour names (the answer words of ``color`` questions) and their exact RGB fill values."""

QUESTION_TYPES = ("shape", "color", "count", "position", "exists")
"""Question types, in the order :func:`questions` returns them."""

BACKGROUNDS = ("flat", "gradient", "brick", "grass", "gravel", "photo")
"""Background kinds, from simplest to busiest."""

SPLITS = {"train": 0, "val": 1_000_000, "test": 2_000_000}
"""Image-seed offset per split: image ``i`` of split ``s`` has seed ``SPLITS[s] + i``."""

MAX_SHAPES = 6
_SPLIT_STRIDE = 1_000_000  # images per split before its seeds would run into the next split's
_MIN_SIZE = 32
_RADIUS_FRACTION = {"small": 0.07, "large": 0.13}
_RADIUS_JITTER = 0.10
_EDGE_MARGIN = 0.02  # of the image size, between a bounding circle and the image border
_GAP = 0.04  # of the image size, between two bounding circles
_PLACEMENT_TRIES = 400
_POSITION_MARGIN = 0.12  # of the image size: |x - size/2| must exceed this for a position question
_MIN_COLOUR_DISTANCE = 90.0  # RGB Euclidean distance between a muted background colour and any shape colour
_DARK_OUTLINE = (20, 20, 20)
_LIGHT_OUTLINE = (240, 240, 240)
_TEXTURES = ("brick", "grass", "gravel")
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "coins", "camera", "immunohistochemistry")
_MIN_CROP = 160


@dataclass(frozen=True)
class Shape:
    """One shape of a scene.

    Attributes:
        kind: one of :data:`SHAPES`.
        color: a key of :data:`COLOURS`.
        size: ``"small"`` or ``"large"`` (the size class the radius was drawn from).
        center: ``(x, y)`` of the centre in pixels (integers; x to the right, y down, origin top left).
        radius: radius of the bounding circle in pixels; the drawn shape lies inside it and contains the centre.
    """

    kind: str
    color: str
    size: str
    center: tuple[int, int]
    radius: float


@dataclass(frozen=True)
class Scene:
    """A generated image before rendering.

    Attributes:
        seed: the image seed (all randomness of :func:`render` and :func:`questions` derives from it).
        size: width and height of the square image in pixels.
        background: one of :data:`BACKGROUNDS`.
        shapes: the shapes actually placed (1 to 6 for scenes from :func:`make_scene`).
    """

    seed: int
    size: int
    background: str
    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class Question:
    """One question about a scene.

    Attributes:
        qtype: one of :data:`QUESTION_TYPES`.
        question: the question text.
        answer: the answer, one lowercase word (a member of :func:`answer_words`).
    """

    qtype: str
    question: str
    answer: str


@dataclass(frozen=True)
class Sample:
    """One question of a split, tied to its image.

    Attributes:
        question_id: ``f"{split}-{index:06d}-{qtype}"`` (unique within and across splits).
        split: a key of :data:`SPLITS`.
        image_seed: ``SPLITS[split] + index``; the image is ``render(make_scene(image_seed, size))``.
        qtype: one of :data:`QUESTION_TYPES`.
        question: the question text.
        answer: the one-word answer.
    """

    question_id: str
    split: str
    image_seed: int
    qtype: str
    question: str
    answer: str


# --------------------------------------------------------------------------------------------------- scenes


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < _MIN_SIZE:
        raise ValueError(f"size must be an int >= {_MIN_SIZE} (pixels), got {size!r}")
    return int(size)


def make_scene(seed: int, size: int = 224) -> Scene:
    """Draw the scene of image ``seed``: background, shapes, their attributes and non-overlapping positions.

    Args:
        seed: non-negative int; the scene is a pure function of ``(seed, size)``.
        size: image width and height in pixels (>= 32).

    Returns:
        A :class:`Scene` with 1 to 6 shapes (fewer than drawn if some found no free spot).

    Raises:
        ValueError: for a negative or non-int seed, or a size below 32.
    """
    seed = _check_seed(seed)
    size = _check_size(size)
    rng = np.random.default_rng(seed)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    count = int(rng.integers(1, MAX_SHAPES + 1))
    colour_names = tuple(COLOURS)
    drafts = []
    for _ in range(count):
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = colour_names[int(rng.integers(len(colour_names)))]
        size_class = ("small", "large")[int(rng.integers(2))]
        jitter = rng.uniform(1.0 - _RADIUS_JITTER, 1.0 + _RADIUS_JITTER)
        radius = round(float(_RADIUS_FRACTION[size_class] * size * jitter), 2)
        drafts.append((kind, colour, size_class, radius))

    edge = _EDGE_MARGIN * size
    gap = _GAP * size
    placed: list[Shape] = []
    for kind, colour, size_class, radius in drafts:
        low = math.ceil(radius + edge)
        high = math.floor(size - radius - edge)
        # Always draw the same number of candidates, so later shapes' draws do not depend on earlier outcomes.
        candidates = rng.integers(low, high + 1, size=(_PLACEMENT_TRIES, 2))
        ok = np.ones(_PLACEMENT_TRIES, dtype=bool)
        for other in placed:
            distance = np.hypot(candidates[:, 0] - other.center[0], candidates[:, 1] - other.center[1])
            ok &= distance >= radius + other.radius + gap
        hits = np.flatnonzero(ok)
        if hits.size == 0:
            continue  # no free spot: drop this shape
        x, y = candidates[hits[0]]
        placed.append(Shape(kind=kind, color=colour, size=size_class, center=(int(x), int(y)), radius=radius))
    return Scene(seed=seed, size=size, background=background, shapes=tuple(placed))


# ------------------------------------------------------------------------------------------------ rendering


def _muted_colour(rng: np.random.Generator, lightness: tuple[float, float] = (45.0, 205.0)) -> np.ndarray:
    """A low-saturation RGB colour (float array of 3)."""
    grey = rng.uniform(*lightness)
    return np.clip(grey + rng.uniform(-30.0, 30.0, size=3), 0.0, 255.0)


def _far_from_palette(colours: np.ndarray) -> bool:
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    distances = np.linalg.norm(colours[:, None, :] - palette[None, :, :], axis=-1)
    return bool(distances.min() >= _MIN_COLOUR_DISTANCE)


def _safe_muted_colours(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """``count`` muted colours such that every blend of them stays away from the shape palette."""
    blend = np.linspace(0.0, 1.0, 33)[:, None]
    for _ in range(1000):
        colours = [_muted_colour(rng) for _ in range(count)]
        if count == 1:
            line = colours[0][None, :]
        else:
            line = colours[0][None, :] * (1.0 - blend) + colours[1][None, :] * blend
        if _far_from_palette(line):
            return colours
    grey = np.array([128.0, 128.0, 128.0])  # unreachable in practice; mid grey is far from every shape colour
    return [grey] * count


@functools.lru_cache(maxsize=None)
def _skimage_image(name: str) -> np.ndarray:
    """A bundled scikit-image picture as an RGB or grayscale uint8 array (read-only, loaded once)."""
    from skimage import data as skdata

    array = np.ascontiguousarray(getattr(skdata, name)(), dtype=np.uint8)
    if array.ndim == 3:
        array = array[..., :3]
    array.setflags(write=False)
    return array


def _random_crop(rng: np.random.Generator, array: np.ndarray, size: int) -> np.ndarray:
    """A random square crop (side ``_MIN_CROP`` .. the short side) resized to ``size``, as an RGB float array."""
    height, width = array.shape[:2]
    side = int(rng.integers(min(_MIN_CROP, height, width), min(height, width) + 1))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(array[top : top + side, left : left + side])
    crop = crop.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(crop, dtype=np.float64)


def _background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """The background of ``scene`` as a (size, size, 3) float array in 0..255."""
    size = scene.size
    kind = scene.background
    if kind == "flat":
        (colour,) = _safe_muted_colours(rng, 1)
        return np.broadcast_to(np.round(colour), (size, size, 3)).copy()
    if kind == "gradient":
        first, second = _safe_muted_colours(rng, 2)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
        projection = coords[None, :] * math.cos(angle) + coords[:, None] * math.sin(angle)
        span = np.ptp(projection)
        t = (projection - projection.min()) / (span if span > 0 else 1.0)
        return np.round(first * (1.0 - t[..., None]) + second * t[..., None])
    if kind in _TEXTURES:
        texture = _random_crop(rng, _skimage_image(kind), size)
        texture = np.rot90(texture, k=int(rng.integers(4)))
        if rng.random() < 0.5:
            texture = texture * rng.uniform(0.55, 1.0, size=3)
        return np.round(texture)
    if kind == "photo":
        name = _PHOTOS[int(rng.integers(len(_PHOTOS)))]
        photo = _random_crop(rng, _skimage_image(name), size)
        if rng.random() < 0.5:
            photo = photo[:, ::-1]
        return photo
    raise ValueError(f"unknown background {kind!r}; valid backgrounds: {', '.join(BACKGROUNDS)}")


def _polygon(shape: Shape) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape (None for circle and square), all within the bounding circle."""
    cx, cy = shape.center
    r = shape.radius
    if shape.kind == "triangle":  # equilateral, apex up, centroid at the centre
        angles = [-90.0, 30.0, 150.0]
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in angles]
    if shape.kind == "star":  # five points, inner radius 0.45 r
        points = []
        for i in range(10):
            rr = r if i % 2 == 0 else 0.45 * r
            a = math.radians(-90.0 + 36.0 * i)
            points.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return points
    if shape.kind == "cross":  # plus sign: arms 0.6 r wide, reaching 0.9 r from the centre
        w, l = 0.3 * r, 0.9 * r
        offsets = [
            (-w, -l), (w, -l), (w, -w), (l, -w), (l, w), (w, w),
            (w, l), (-w, l), (-w, w), (-l, w), (-l, -w), (-w, -w),
        ]
        return [(cx + dx, cy + dy) for dx, dy in offsets]
    return None


def render(scene: Scene) -> Image.Image:
    """Render ``scene`` as an RGB image of ``scene.size`` x ``scene.size`` pixels.

    Deterministic: the background's randomness derives from ``scene.seed``. Shapes are drawn in order, as
    solid fills of their exact :data:`COLOURS` value (no anti-aliasing) with an outline about ``size / 112``
    pixels wide, dark or light to contrast with the background under the shape.

    Args:
        scene: a scene from :func:`make_scene` or built by hand.

    Returns:
        A new ``PIL.Image.Image`` in mode ``"RGB"``.

    Raises:
        ValueError: for an unknown background, shape kind or colour, or an invalid seed or size.
    """
    _check_seed(scene.seed)
    size = _check_size(scene.size)
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"unknown background {scene.background!r}; valid backgrounds: {', '.join(BACKGROUNDS)}")
    for shape in scene.shapes:
        if shape.kind not in SHAPES:
            raise ValueError(f"unknown shape kind {shape.kind!r}; valid kinds: {', '.join(SHAPES)}")
        if shape.color not in COLOURS:
            raise ValueError(f"unknown colour {shape.color!r}; valid colours: {', '.join(COLOURS)}")
    rng = np.random.default_rng([scene.seed, 1])
    background = np.clip(_background(scene, rng), 0, 255).astype(np.uint8)
    luminance = background.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    image = Image.fromarray(np.ascontiguousarray(background), mode="RGB")
    draw = ImageDraw.Draw(image)
    width = _outline_width(size)
    for shape in scene.shapes:
        cx, cy = shape.center
        r = shape.radius
        rows = slice(max(0, int(cy - r)), max(1, int(cy + r) + 1))
        cols = slice(max(0, int(cx - r)), max(1, int(cx + r) + 1))
        local = luminance[rows, cols]
        outline = _DARK_OUTLINE if (local.mean() if local.size else 128.0) > 120.0 else _LIGHT_OUTLINE
        _draw_shape(draw, shape, COLOURS[shape.color], outline, width)
    return image


def _outline_width(size: int) -> int:
    """Outline width in pixels (about ``size / 112``), shared by :func:`render` and :func:`shape_mask`."""
    return max(1, round(size / 112))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill, outline=None, width: int = 0) -> None:
    """Draw one shape's geometry (what :func:`render` and :func:`shape_mask` share)."""
    cx, cy = shape.center
    r = shape.radius
    if shape.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=width)
    elif shape.kind == "square":  # inscribed in the bounding circle
        h = r / math.sqrt(2.0)
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_polygon(shape), fill=fill, outline=outline, width=width)


def shape_mask(scene: Scene) -> np.ndarray:
    """Which shape covers each pixel: ``(size, size)`` uint8, 0 for the background, ``i + 1`` for ``scene.shapes[i]``.

    The same geometry as :func:`render` (outline included, drawn in the same order, so a later shape covers an
    earlier one exactly where it does in the image).

    Raises:
        ValueError: for a scene with more than 254 shapes, an unknown kind, or a bad size.
    """
    size = _check_size(scene.size)
    if len(scene.shapes) > 254:
        raise ValueError(f"shape_mask labels at most 254 shapes, the scene has {len(scene.shapes)}")
    for shape in scene.shapes:
        if shape.kind not in SHAPES:
            raise ValueError(f"unknown shape kind {shape.kind!r}; valid kinds: {', '.join(SHAPES)}")
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    width = _outline_width(size)
    for index, shape in enumerate(scene.shapes, start=1):
        _draw_shape(draw, shape, index, index, width)
    return np.asarray(mask)


def patch_labels(scene: Scene, patch_size: int, min_cover: float = 0.25) -> np.ndarray:
    """The shape each ViT patch shows: ``(rows * cols,)`` int64 in raster order, 0 for the background, ``i + 1``
    for ``scene.shapes[i]``; the patch grid is ``size // patch_size`` square (a remainder at the right and bottom
    is ignored, as a ViT's patch embedding does).

    A patch is labelled with the shape covering most of its pixels if that shape covers at least ``min_cover``
    of them. At 224 px with 14 px patches every shape of :func:`make_scene` covers at least one patch (checked on
    the first 2,000 training scenes: median 7 patches per shape, 5th percentile 2). Used to align the testbed's
    projector (:mod:`eval.testbed.align`).

    Raises:
        ValueError: for a patch size below 1 or above the image size, or ``min_cover`` outside (0, 1].
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or not 1 <= patch_size <= scene.size:
        raise ValueError(f"patch_size must be an int in 1..{scene.size} (pixels), got {patch_size!r}")
    if not 0.0 < min_cover <= 1.0:
        raise ValueError(f"min_cover must be in (0, 1], got {min_cover!r}")
    grid = scene.size // patch_size
    mask = shape_mask(scene)[: grid * patch_size, : grid * patch_size]
    patches = mask.reshape(grid, patch_size, grid, patch_size).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    counts = np.stack([(patches == i).sum(1) for i in range(len(scene.shapes) + 1)], axis=1)  # (patches, shapes + 1)
    counts[:, 0] = 0
    best = counts.argmax(1)
    covered = counts[np.arange(len(best)), best] >= min_cover * patch_size * patch_size
    return np.where(covered, best, 0).astype(np.int64)


# ------------------------------------------------------------------------------------------------ questions


def questions(scene: Scene, every: bool = False) -> list[Question]:
    """The questions of ``scene``: at most one per type, every type whenever it is well defined.

    Types, in :data:`QUESTION_TYPES` order:

    * ``shape``: "What shape is the {color} object?" for a colour held by exactly one shape -> its kind.
    * ``color``: "What color is the {kind}?" for a kind held by exactly one shape -> its colour name.
    * ``count``: "How many shapes are there?" -> ``"1"`` .. ``"6"`` (always asked).
    * ``position``: "Is the {color} {kind} on the left or the right?" for a shape that is the only one of its
      colour and kind and whose centre is more than ``0.12 * size`` off the midline -> ``"left"``/``"right"``.
    * ``exists``: "Is there a {color} {kind}?" -> ``"yes"`` or ``"no"`` with probability 1/2 each (always asked).

    Choices among valid candidates use ``numpy.random.default_rng([scene.seed, 2])``, so the result is a pure
    function of the scene.

    With ``every=True`` (training), every well-defined question instead: ``shape`` for each colour held by one
    shape, ``color`` for each kind held by one shape, ``count``, ``position`` for each placeable shape, and
    ``exists`` for each present colour-kind pair (``"yes"``) plus as many absent pairs (``"no"``: the one-per-type
    question's pair if it asks one, the others drawn with ``numpy.random.default_rng([scene.seed, 3])``); so they
    contain the one-per-type questions. Types in :data:`QUESTION_TYPES` order, each in scene order.

    Args:
        scene: a scene with at least one shape.
        every: all well-defined questions rather than one per type.

    Returns:
        A list of :class:`Question`.

    Raises:
        ValueError: for a scene without shapes or with a negative seed.
    """
    _check_seed(scene.seed)
    if not scene.shapes:
        raise ValueError("a scene needs at least one shape to ask questions about")
    if every:
        return _every_question(scene)
    rng = np.random.default_rng([scene.seed, 2])
    shapes = scene.shapes
    out: list[Question] = []

    def pick(options):
        return options[int(rng.integers(len(options)))]

    colours_once = [c for c in COLOURS if sum(s.color == c for s in shapes) == 1]
    if colours_once:
        colour = pick(colours_once)
        (shape,) = [s for s in shapes if s.color == colour]
        out.append(Question("shape", f"What shape is the {colour} object?", shape.kind))

    kinds_once = [k for k in SHAPES if sum(s.kind == k for s in shapes) == 1]
    if kinds_once:
        kind = pick(kinds_once)
        (shape,) = [s for s in shapes if s.kind == kind]
        out.append(Question("color", f"What color is the {kind}?", shape.color))

    out.append(Question("count", "How many shapes are there?", str(len(shapes))))

    pairs = [(s.color, s.kind) for s in shapes]
    middle = scene.size / 2.0
    placeable = _placeable(scene)
    if placeable:
        shape = pick(placeable)
        side = "left" if shape.center[0] < middle else "right"
        out.append(Question("position", f"Is the {shape.color} {shape.kind} on the left or the right?", side))

    if rng.random() < 0.5:
        colour, kind = pick(pairs)
        answer = "yes"
    else:
        absent = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in pairs]
        colour, kind = pick(absent)
        answer = "no"
    out.append(Question("exists", f"Is there a {colour} {kind}?", answer))
    return out


def _placeable(scene: Scene) -> list[Shape]:
    """Shapes a position question can name: unique in colour and kind, centre clearly off the vertical midline."""
    pairs = [(s.color, s.kind) for s in scene.shapes]
    middle = scene.size / 2.0
    return [s for s in scene.shapes
            if pairs.count((s.color, s.kind)) == 1 and abs(s.center[0] - middle) > _POSITION_MARGIN * scene.size]


def _every_question(scene: Scene) -> list[Question]:
    """Every well-defined question of ``scene`` (:func:`questions` with ``every=True``)."""
    shapes = scene.shapes
    colours = [s.color for s in shapes]
    kinds = [s.kind for s in shapes]
    out = [Question("shape", f"What shape is the {s.color} object?", s.kind) for s in shapes
           if colours.count(s.color) == 1]
    out += [Question("color", f"What color is the {s.kind}?", s.color) for s in shapes if kinds.count(s.kind) == 1]
    out.append(Question("count", "How many shapes are there?", str(len(shapes))))
    middle = scene.size / 2.0
    out += [Question("position", f"Is the {s.color} {s.kind} on the left or the right?",
                     "left" if s.center[0] < middle else "right") for s in _placeable(scene)]
    present = list(dict.fromkeys((s.color, s.kind) for s in shapes))
    absent = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
    # the benchmark's own "no" pair (if it asks one) is among them, so these questions contain questions(scene)'s
    benchmark = [q for q in questions(scene) if q.qtype == "exists" and q.answer == "no"]
    first = [absent.index(tuple(q.question.removeprefix("Is there a ").removesuffix("?").split())) for q in benchmark]
    rest = [i for i in range(len(absent)) if i not in first]
    rng = np.random.default_rng([scene.seed, 3])
    chosen = first + [rest[i] for i in rng.choice(len(rest), size=len(present) - len(first), replace=False)]
    out += [Question("exists", f"Is there a {c} {k}?", "yes") for c, k in present]
    out += [Question("exists", f"Is there a {absent[i][0]} {absent[i][1]}?", "no") for i in sorted(chosen)]
    return out


def answer_words() -> tuple[str, ...]:
    """Every answer :func:`questions` can give, sorted: shape kinds, colour names, ``"1"``..``"6"``,
    ``"left"``, ``"right"``, ``"yes"``, ``"no"``.

    Returns:
        A sorted tuple of lowercase one-word strings.
    """
    words = set(SHAPES) | set(COLOURS) | {str(n) for n in range(1, MAX_SHAPES + 1)} | {"left", "right", "yes", "no"}
    return tuple(sorted(words))


# --------------------------------------------------------------------------------------------------- splits


def _check_split(split) -> str:
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


def _check_range(num_images, start) -> tuple[int, int]:
    for name, value in (("num_images", num_images), ("start", start)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
    if start + num_images > _SPLIT_STRIDE:
        raise ValueError(
            f"images {start}..{start + num_images - 1} run past {_SPLIT_STRIDE - 1}, the last index whose seed "
            "stays inside its split"
        )
    return int(num_images), int(start)


def _image_samples(split: str, index: int, scene: Scene, every: bool = False) -> list[Sample]:
    found = questions(scene, every=every)
    # one question per type: "<split>-<index>-<type>"; with every=True the k-th of its type gets "-<k>" too
    ids = [f"{split}-{index:06d}-{q.qtype}" + (f"-{sum(p.qtype == q.qtype for p in found[:i])}" if every else "")
           for i, q in enumerate(found)]
    return [
        Sample(
            question_id=qid,
            split=split,
            image_seed=scene.seed,
            qtype=q.qtype,
            question=q.question,
            answer=q.answer,
        )
        for qid, q in zip(ids, found)
    ]


def split_samples(split: str, num_images: int, start: int = 0, *, size: int = 224, every: bool = False) -> list[Sample]:
    """The samples of images ``start`` .. ``start + num_images - 1`` of ``split`` (no rendering).

    Args:
        split: a key of :data:`SPLITS`.
        num_images: how many images (>= 0).
        start: index of the first image (>= 0).
        size: image size in pixels the scenes are drawn at (positions, and so questions, depend on it).
        every: every well-defined question of each image (training), as :func:`questions` with ``every=True``.

    Returns:
        The samples, image by image, each image's in :data:`QUESTION_TYPES` order.

    Raises:
        ValueError: for an unknown split (the message names the valid ones), a negative or non-int count or
            start, a range reaching past index 999,999 (its seeds would belong to the next split), or a bad size.
    """
    split = _check_split(split)
    num_images, start = _check_range(num_images, start)
    samples: list[Sample] = []
    for index in range(start, start + num_images):
        samples.extend(_image_samples(split, index, make_scene(SPLITS[split] + index, size), every))
    return samples


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_split(folder, split: str, num_images: int, size: int = 224) -> Path:
    """Write images ``0 .. num_images - 1`` of ``split`` and their questions under ``folder``.

    Layout: ``folder/images/{split}-{index:06d}.png``; ``folder/questions.jsonl`` (one JSON object per sample
    with ``question_id``, ``image`` (the relative path ``"images/..."``), ``question``, ``answer``, ``type``,
    ``background``, ``num_shapes`` and ``image_seed``); ``folder/meta.json`` (``split``, ``num_images``,
    ``size``, ``generator_version``, ``num_samples``). Every file is written to a temporary name and renamed,
    and ``meta.json`` comes last, so a folder without it is an unfinished run and is simply written again.

    Args:
        folder: directory (str or path-like), created if missing.
        split: a key of :data:`SPLITS`.
        num_images: how many images (>= 0).
        size: image width and height in pixels (>= 32).

    Returns:
        The path of ``questions.jsonl``. If ``folder`` already holds this exact split (same ``meta.json``
        fields and a ``questions.jsonl``), returns at once without rewriting anything.

    Raises:
        ValueError: for an unknown split, a negative count or a bad size (before anything is written).
        FileExistsError: if ``folder/meta.json`` describes a different split, count, size or generator
            version, or cannot be read.
    """
    split = _check_split(split)
    num_images, _ = _check_range(num_images, 0)
    size = _check_size(size)
    folder = Path(folder)
    meta_path = folder / "meta.json"
    jsonl_path = folder / "questions.jsonl"
    wanted = {"split": split, "num_images": num_images, "size": size, "generator_version": GENERATOR_VERSION}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            found = {key: meta[key] for key in wanted}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise FileExistsError(f"{meta_path} exists but is not a readable testbed meta file ({error})") from error
        if found != wanted:
            raise FileExistsError(
                f"{folder} already holds a different generated split ({found}); asked for {wanted}. "
                "Use another folder or delete this one."
            )
        if jsonl_path.exists():
            return jsonl_path
        meta_path.unlink()  # meta without questions: treat as unfinished and write again

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(num_images):
        scene = make_scene(SPLITS[split] + index, size)
        relative = f"images/{split}-{index:06d}.png"
        target = folder / relative
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        render(scene).save(tmp, format="PNG")
        os.replace(tmp, target)
        for sample in _image_samples(split, index, scene):
            record = {
                "question_id": sample.question_id,
                "image": relative,
                "question": sample.question,
                "answer": sample.answer,
                "type": sample.qtype,
                "background": scene.background,
                "num_shapes": len(scene.shapes),
                "image_seed": sample.image_seed,
            }
            lines.append(json.dumps(record, allow_nan=False) + "\n")
    _write_atomic(jsonl_path, "".join(lines).encode())
    meta = dict(wanted, num_samples=len(lines))
    _write_atomic(meta_path, (json.dumps(meta, indent=2, allow_nan=False) + "\n").encode())
    return jsonl_path
