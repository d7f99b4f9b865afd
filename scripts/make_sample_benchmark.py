"""Build the small offline "sample" benchmark from photos that ship inside scikit-image.

Exports a handful of real images from ``skimage.data`` (all bundled in the scikit-image
wheel, so no download is needed) as RGB JPEGs and writes the hand-written questions
about them to ``questions.jsonl``. The output is deterministic, so re-running the script
reproduces the packaged files in ``eval/data/sample``.

Usage::

    python scripts/make_sample_benchmark.py [--out eval/data/sample] [--max-side 512]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "eval" / "data" / "sample"
JPEG_QUALITY = 90

# skimage.data loader names; each one is bundled in the scikit-image wheel (checked offline).
IMAGES = [
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "horse",
    "coins",
    "page",
    "hubble_deep_field",
    "moon",
    "colorwheel",
    "text",
]

# (image name, question, answer, answer_type); for "short", answer may be a list of strings.
QUESTIONS: list[tuple[str, str, str | list[str], str]] = [
    ("astronaut", "Is the person in the image wearing an orange suit?", "yes", "yes_no"),
    ("astronaut", "What color is the spacesuit?", "orange", "short"),
    ("astronaut", "Is there a flag in the image?", "yes", "yes_no"),
    ("astronaut", "How many people are in the image?", "1", "short"),
    ("chelsea", "Is there a cat in the image?", "yes", "yes_no"),
    ("chelsea", "Is there a dog in the image?", "no", "yes_no"),
    ("chelsea", "What animal is shown in the image?", ["cat", "kitten", "tabby cat", "tabby"], "short"),
    ("coffee", "What drink is in the cup?", ["coffee", "espresso"], "short"),
    ("coffee", "Is there a spoon on the saucer?", "yes", "yes_no"),
    ("coffee", "Is the cup empty?", "no", "yes_no"),
    ("coffee", "What is the table made of?", ["wood", "wooden"], "short"),
    ("rocket", "What is standing on the launch pad?", ["rocket", "spacecraft", "falcon 9"], "short"),
    ("camera", "Is the photo in black and white?", "yes", "yes_no"),
    ("camera", "What is the camera mounted on?", ["tripod", "camera tripod", "stand"], "short"),
    ("camera", "Is the man wearing a hat?", "no", "yes_no"),
    ("camera", "What device is the man using?", ["camera", "video camera", "camcorder"], "short"),
    ("camera", "What color is the man's coat?", ["black", "dark"], "short"),
    ("horse", "What animal is shown in silhouette?", ["horse", "pony", "stallion", "mare"], "short"),
    ("horse", "Is the horse facing to the right?", "yes", "yes_no"),
    ("coins", "What objects are shown in the image?", ["coins", "coin", "ancient coins"], "short"),
    ("coins", "Is the image in color?", "no", "yes_no"),
    (
        "page",
        "What is the heading at the top of the page?",
        ["region-based segmentation", "region based segmentation"],
        "short",
    ),
    ("hubble_deep_field", "Does the image show galaxies in space?", "yes", "yes_no"),
    ("hubble_deep_field", "Is there a building in the image?", "no", "yes_no"),
    ("moon", "Are there trees in the image?", "no", "yes_no"),
    ("colorwheel", "What shape is the colorful object?", ["circle", "disc", "disk", "round"], "short"),
    ("colorwheel", "What color is the background?", "black", "short"),
    ("colorwheel", "Is the image in black and white?", "no", "yes_no"),
    ("text", "Is the writing handwritten?", "yes", "yes_no"),
]


def load_rgb(name: str) -> Image.Image:
    """Load ``skimage.data.<name>()`` as an 8-bit RGB PIL image.

    Raises RuntimeError if the image is not bundled with the installed scikit-image
    (some images need a network download, which this script must not rely on).
    """
    try:
        array = getattr(skimage.data, name)()
    except Exception as exc:  # a download attempt or a missing optional dependency
        raise RuntimeError(
            f"skimage.data.{name}() could not be loaded offline ({exc}); "
            "pick an image that ships inside the scikit-image wheel"
        ) from exc
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise RuntimeError(f"skimage.data.{name}() has dtype {array.dtype}, expected uint8 or bool")
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise RuntimeError(f"skimage.data.{name}() has unexpected shape {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array[..., :3]), mode="RGB")


def downscale(image: Image.Image, max_side: int) -> Image.Image:
    """Return ``image`` shrunk (aspect kept) so its longer side is at most ``max_side`` px."""
    width, height = image.size
    scale = max_side / max(width, height)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def export_images(out_dir: Path, max_side: int) -> dict[str, int]:
    """Write every image in ``IMAGES`` to ``out_dir/images/<name>.jpg``; return bytes per file."""
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name in IMAGES:
        path = image_dir / f"{name}.jpg"
        downscale(load_rgb(name), max_side).save(path, format="JPEG", quality=JPEG_QUALITY)
        sizes[path.name] = path.stat().st_size
        logger.info("wrote %s (%d bytes)", path, sizes[path.name])
    return sizes


def write_questions(out_dir: Path) -> int:
    """Write ``QUESTIONS`` to ``out_dir/questions.jsonl``; return the number of lines."""
    known = set(IMAGES)
    lines = []
    for index, (name, question, answer, answer_type) in enumerate(QUESTIONS, start=1):
        if name not in known:
            raise ValueError(f"question {index} refers to {name!r}, which is not in IMAGES")
        record = {
            "question_id": f"sample-{index:04d}",
            "image": f"images/{name}.jpg",
            "question": question,
            "answer": answer,
            "answer_type": answer_type,
        }
        lines.append(json.dumps(record, ensure_ascii=False, allow_nan=False))
    path = out_dir / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    logger.info("wrote %s (%d questions)", path, len(lines))
    return len(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, export the images and write the questions."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--max-side", type=int, default=512, help="longest image side in px")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sizes = export_images(args.out, args.max_side)
    count = write_questions(args.out)
    logger.info("%d images, %d bytes in all; %d questions", len(sizes), sum(sizes.values()), count)


if __name__ == "__main__":
    main()
