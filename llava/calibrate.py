"""Threshold calibration for LLaVA models: image lists, deployment preprocessing, data-parallel sharding.

The method itself lives in :func:`dymu.find_thresholds`; this module feeds it batches preprocessed exactly
as at deployment (LLaVA-1.5: pad to square with the mean colour, then 336x336; LLaVA-OneVision: the
AnyRes base image and grid crops), and shards whole batches
over ``torch.distributed`` ranks so N ranks see the same batches as one process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from dymu.thresholds import Thresholds, find_thresholds

from .model import DyMULlava

__all__ = ["list_images", "image_list_record", "calibrate", "calibrate_from_config", "IMAGE_SUFFIXES",
           "MAX_LISTED_IMAGES"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

MAX_LISTED_IMAGES = 1000
"""Calibration sets up to this size are listed in full in the thresholds file; larger ones by hash only."""


def list_images(source: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[Path]:
    """Image files from a folder (recursive, sorted) or a JSON list of ``{"image": relpath}``.

    The JSON form is the LLaVA instruction-data format; entries without an ``"image"`` key (text-only
    conversations) are skipped. Relative paths resolve against ``image_root`` (default: the JSON's folder).

    Raises:
        FileNotFoundError: ``source`` does not exist, or listed images are missing (first few named).
        ValueError: the JSON is not a list of objects, or no image is found.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"image source {source} does not exist; pass a folder of images or a JSON list.")
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        entries = json.loads(source.read_text(encoding="utf-8"))
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"{source} must hold a JSON list of objects with an 'image' key.")
        root = Path(image_root) if image_root is not None else source.parent
        paths = [root / e["image"] for e in entries if e.get("image")]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images listed in {source} are missing, e.g. {missing[:3]}; "
                                    "set image_root to the folder they are relative to.")
    if not paths:
        raise ValueError(f"no images found in {source} (suffixes {IMAGE_SUFFIXES}).")
    return paths


def image_list_record(images: Sequence[str | os.PathLike]) -> dict:
    """How a thresholds file identifies its calibration images (with the seed, they fix the batches).

    Returns:
        ``{"image_dir", "image_list_sha256", "image_list"}``: the images' deepest common folder, the
        SHA-256 of their paths relative to it (POSIX, in the given order, one per line), and those
        relative paths; ``image_list`` is left out above :data:`MAX_LISTED_IMAGES` images (re-list the
        recorded source and compare the hash instead).
    """
    paths = [Path(p).absolute() for p in images]
    root = Path(os.path.commonpath([p.parent for p in paths])) if paths else Path()
    relative = [p.relative_to(root).as_posix() for p in paths]
    record = {"image_dir": str(root), "image_list_sha256": hashlib.sha256("\n".join(relative).encode()).hexdigest()}
    if len(relative) <= MAX_LISTED_IMAGES:
        record["image_list"] = relative
    return record


class _Images(Dataset):
    def __init__(self, paths: Sequence[Path], pipe: DyMULlava):
        self.paths, self.pipe = list(paths), pipe

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.pipe.crops(self.paths[i])  # (n_crops, 3, H, W) as deployed


def _batches_for_rank(n: int, batch_size: int, seed: int, rank: int, world: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)  # diverse batches; recorded seed makes it reproducible
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return batches[rank::world]


def calibrate(
    pipe: DyMULlava,
    images: Sequence[Path],
    target_tokens: int,
    *,
    batch_size: int = 32,
    seed: int = 0,
    num_workers: int = 0,
    realised_max_images: int | None = 512,
    progress: bool = True,
    source: str = "",
) -> Thresholds:
    """Calibrate DToMe thresholds for a LLaVA model's vision tower.

    Args:
        pipe: the loaded model (its tower may be patched or not; it is left as it was).
        images: calibration image files (shuffled with ``seed``, then cut into batches; recorded with
            :func:`image_list_record`).
        target_tokens: tokens per crop (CLS included) to leave at the feature layer, e.g. 94 / 209 / 393
            for LLaVA-1.5's low / mid / high (budgets r = 21 / 16 / 8 over 23 layers).
        batch_size: images per batch; all their crops (one for LLaVA-1.5, the AnyRes crops for
            LLaVA-OneVision) form the batch of ``B`` crops whose budget is the top ``B * r_l`` edges.
        seed: shuffling seed.
        num_workers: DataLoader workers for image decoding and preprocessing.
        realised_max_images: measure the realised token count on the first this-many images (None: all).
        progress: progress bars.
        source: description recorded in the file.

    Returns:
        :class:`dymu.Thresholds` with the model name, seed, batch size, image count and image list
        recorded in ``extra``: calibrating again with them gives the same values.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    dataset = _Images(images, pipe)
    batches = _batches_for_rank(len(dataset), batch_size, seed, rank, world)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=torch.cat)
    realised_loader = None
    if realised_max_images != 0:
        limit = len(dataset) if realised_max_images is None else min(realised_max_images, len(dataset))
        subset = _batches_for_rank(limit, batch_size, seed, rank, world)
        realised_loader = DataLoader(dataset, batch_sampler=subset, num_workers=num_workers, collate_fn=torch.cat)
    config = pipe.model.config
    return find_thresholds(
        pipe.tower,
        loader,
        target_tokens=target_tokens,
        feature_layer=config.vision_feature_layer,
        realised_batches=realised_loader,
        progress=progress,
        source=source or "llava.calibrate",
        extra={
            "model": str(getattr(config, "_name_or_path", "")),
            "seed": seed,
            "batch_size": batch_size,
            "world_size": world,
            "image_aspect_ratio": pipe.image_aspect_ratio,
            "images": len(dataset),
            **image_list_record(dataset.paths),
        },
    )


def calibrate_from_config(cfg: Mapping) -> Thresholds:
    """What ``scripts/find_thresholds.py`` runs (keys: see ``hydra_conf/find_thresholds.yaml``).

    Under ``torchrun`` (``WORLD_SIZE > 1``) it joins the process group (gloo on CPU, nccl on CUDA); rank 0
    writes the file.

    Raises:
        FileExistsError: the output exists and ``overwrite`` is false (checked before any work).
        ValueError: ``data.images`` is not set.
    """
    from .factory import _DTYPES
    from .model import load_model

    output = Path(str(cfg["output"]))
    if output.exists() and not cfg.get("overwrite", False):
        raise FileExistsError(f"{output} exists; pass overwrite=true to replace it, or output=<another file>.")
    data = cfg["data"]
    if not data.get("images"):
        raise ValueError("set data.images=<folder of images, or a LLaVA JSON list of {\"image\": relpath}>.")
    model_cfg = cfg["model"]
    device = str(cfg.get("device", "cpu"))
    started_group = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        started_group = True
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        if model_cfg.get("build"):
            from .factory import build_embedded

            build_embedded(model_cfg, thresholds=False)
        pipe = load_model(
            str(model_cfg["name_or_path"]),
            dymu=None,
            vtu=False,
            dtype=_DTYPES[str(model_cfg.get("dtype", "auto"))],
            device=device,
            attn_implementation=model_cfg.get("attn_implementation"),
            image_aspect_ratio=model_cfg.get("image_aspect_ratio", "pad"),
            layout=model_cfg.get("layout", "faithful"),
        )
        images = list_images(data["images"], data.get("image_root"))
        if data.get("max_images"):
            images = images[: int(data["max_images"])]
        thresholds = calibrate(
            pipe,
            images,
            int(cfg["target_tokens"]),
            batch_size=int(cfg.get("batch_size", 32)),
            seed=int(cfg.get("seed", 0)),
            num_workers=int(cfg.get("num_workers", 0)),
            realised_max_images=cfg.get("realised_max_images"),
            source=f"scripts/find_thresholds.py model={model_cfg.get('name')} variant={cfg.get('variant')}",
        )
        thresholds.extra["image_source"] = str(data["images"])  # re-lists the images (see image_list_sha256)
        thresholds.extra["image_root"] = str(data["image_root"]) if data.get("image_root") else None
        thresholds.extra["max_images"] = data.get("max_images")
        if not dist.is_initialized() or dist.get_rank() == 0:
            thresholds.save(output)
            logger.info("wrote %s: %d layers, target %s tokens, realised %s", output, len(thresholds.values),
                        thresholds.target_tokens, thresholds.realised_tokens)
        return thresholds
    finally:
        if started_group:
            dist.destroy_process_group()
