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
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from dymu.calibration import find_thresholds
from dymu.checkpoint import CalibrationCheckpoint, CheckpointError
from dymu.patch import encoder_spec, layers_to_run
from dymu.thresholds import Thresholds, weights_identity
from llava.images import IMAGE_SUFFIXES, load_image
from llava.pipeline import DyMUPipeline

from .distributed import process_group
from .factory import load_from_config

__all__ = ["list_images", "image_list_record", "calibrate", "calibrate_from_config", "checkpoint_path",
           "IMAGE_SUFFIXES", "MAX_LISTED_IMAGES", "UNREADABLE_SHOWN"]

logger = logging.getLogger(__name__)

# IMAGE_SUFFIXES (imported above): the file names of llava.images.IMAGE_FORMATS, the formats load_image opens

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
    def __init__(self, paths: Sequence[Path], pipe: DyMUPipeline):
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


UNREADABLE_SHOWN = 5
"""How many unreadable images are named (with the reason) in logs, errors and the thresholds file."""


def checkpoint_path(output: str | os.PathLike) -> Path:
    """The checkpoint :func:`calibrate_from_config` keeps while calibrating ``output``: ``<output>.partial.json``
    (under ``torch.distributed`` rank ``r`` of ``w`` uses ``<output>.partial.rank<r>-of-<w>.json``)."""
    output = Path(output)
    return output.with_name(output.name + ".partial.json")


def _rank_file(path: Path, rank: int, world: int) -> Path:
    return path if world == 1 else path.with_name(f"{path.stem}.rank{rank}-of-{world}{path.suffix}")


def _integer(name: str, value, minimum: int, *, none: str | None = None) -> int | None:
    """``value`` if it is an integer >= ``minimum`` (``none``: what null means, if allowed); else ValueError."""
    if value is None and none is not None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (f", or null ({none})" if none is not None else "")
        raise ValueError(f"{name} must be {allowed}; got {value!r} ({type(value).__name__}).")
    return value


def _fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (the largest share of unreadable images to skip; 0 "
                         f"refuses any); got {value!r} ({type(value).__name__}).")
    return float(value)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj, world: int, device: torch.device) -> list:
    """``obj`` of every rank (a list of one element without torch.distributed)."""
    if world == 1:
        return [obj]
    if dist.get_backend() == "nccl" and device.type == "cuda":
        torch.cuda.set_device(device)  # object collectives on nccl use the current device
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _fail_together(error: BaseException | None, world: int, device: torch.device) -> None:
    """Raise on every rank if any rank failed (a lone failing rank would leave the others hanging)."""
    messages = _gather(None if error is None else f"{type(error).__name__}: {error}", world, device)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        raise RuntimeError("calibration failed on " + "; ".join(f"rank {r}: {m}" for r, m in failed))


class _Readable(Dataset):
    """Decodes each image once (as :func:`llava.images.load_image` does at deployment); yields ``(i, None)`` or
    ``(i, reason)`` for an unreadable one."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, str | None]:

        try:
            load_image(self.paths[i])
        except (OSError, ValueError) as err:  # missing, a FIFO / folder, truncated, corrupt, not an image
            return i, f"{type(err).__name__}: {err}"
        return i, None


def _unreadable(paths: Sequence[Path], rank: int, world: int, num_workers: int, progress: bool,
                device: torch.device) -> list[tuple[int, str]]:
    """``(index, reason)`` of every unreadable image, the same sorted list on every rank (each decodes a share)."""
    shard = list(range(rank, len(paths), world))
    loader = DataLoader(_Readable(paths), sampler=shard, batch_size=64, num_workers=num_workers, collate_fn=list)
    from tqdm.auto import tqdm

    found = [(i, why) for batch in tqdm(loader, desc="checking images", unit="batch",
                                         disable=not (progress and rank == 0)) for i, why in batch if why is not None]
    return sorted(item for part in _gather(found, world, device) for item in part)


def calibrate(
    pipe: DyMUPipeline,
    images: Sequence[Path],
    target_tokens: int,
    *,
    batch_size: int = 32,
    seed: int = 0,
    num_workers: int = 0,
    realised_max_images: int | None = 512,
    progress: bool = True,
    source: str = "",
    max_unreadable_fraction: float = 0.01,
    checkpoint: str | os.PathLike | None = None,
    restart: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> Thresholds:
    """Calibrate DToMe thresholds for a LLaVA model's vision tower.

    First every image is decoded once (each rank a share): unreadable ones (missing, a FIFO or folder,
    truncated, corrupt, not an image) are skipped, logged with a WARNING naming the first
    :data:`UNREADABLE_SHOWN`, and recorded in ``extra["unreadable_images"]``. The readable images are then
    shuffled with ``seed`` and cut into batches, so the batches (and thresholds) depend only on the readable
    set: removing the unreadable files gives the same result.

    Args:
        pipe: the loaded model (its tower may be patched or not; it is left as it was).
        images: calibration image files (shuffled with ``seed``, then cut into batches; recorded with
            :func:`image_list_record`). Under ``torch.distributed`` every rank must pass the same list.
        target_tokens: tokens per crop (CLS included) to leave at the feature layer, e.g. 94 / 209 / 393
            for LLaVA-1.5's low / mid / high (budgets r = 21 / 16 / 8 over 23 layers).
        batch_size: images per batch; all their crops (one for LLaVA-1.5, the AnyRes crops for
            LLaVA-OneVision) form the batch of ``B`` crops whose budget is the top ``B * r_l`` edges.
        seed: shuffling seed.
        num_workers: DataLoader workers for image decoding and preprocessing.
        realised_max_images: measure the realised token count on the first this-many readable images
            (None: all; 0: none).
        progress: progress bars.
        source: description recorded in the file.
        max_unreadable_fraction: the largest share of ``images`` that may be unreadable and skipped (0: none).
        checkpoint: a checkpoint file (e.g. :func:`checkpoint_path` of the output; under torch.distributed
            rank ``r`` of ``w`` uses ``<stem>.rank<r>-of-<w>.json``), written after every batch with the state
            so far (:class:`dymu.checkpoint.CalibrationCheckpoint`). If it exists and was written by the same
            run (same readable images, seed, batch size, target, world size, model weights and preprocessing),
            calibration continues from it and the result equals the uninterrupted run's exactly. It is left in
            place: delete it once the thresholds are saved (:func:`calibrate_from_config` does).
        restart: discard a checkpoint of other settings instead of refusing it.
        on_batch: called with the number of batches done after each batch (and its checkpoint).

    Returns:
        :class:`dymu.Thresholds` with the model name, seed, batch size, the number of images used
        (``images``) and listed (``images_listed``), the unreadable ones (``unreadable_images``: count,
        allowed fraction, the first few with their reason) and the used images' list
        (:func:`image_list_record`) recorded in ``extra``: calibrating again with them gives the same values.

    Raises:
        ValueError: a setting out of range (names it); no images; more unreadable images than
            ``max_unreadable_fraction`` allows (names the count and the first ones); ranks passing different
            image lists (raised on every rank, naming each rank's count and list hash);
            :class:`dymu.checkpoint.CheckpointError` for a checkpoint of other settings (and ``restart`` false)
            or an unreadable one. Under torch.distributed a failure on one rank is raised on all of them.
    """
    _integer("batch_size", batch_size, 1)
    _integer("seed", seed, 0)
    _integer("num_workers", num_workers, 0)
    _integer("realised_max_images", realised_max_images, 0, none="all images")
    _integer("target_tokens", target_tokens, 1)
    fraction = _fraction("max_unreadable_fraction", max_unreadable_fraction)
    listed = [Path(p) for p in images]
    if not listed:
        raise ValueError("calibrate got no images; pass a non-empty list of image files.")
    rank, world = _rank_world()
    device = next(pipe.tower.parameters()).device

    # Every rank must calibrate on the same list, or the batches (and the recorded list) mean nothing.
    mine = (len(listed), image_list_record(listed)["image_list_sha256"])
    lists = _gather(mine, world, device)
    if len(set(lists)) > 1:
        raise ValueError("the ranks were given different calibration image lists: " + ", ".join(
            f"rank {r}: {n} images (sha256 {h[:12]})" for r, (n, h) in enumerate(lists)) + ". Every rank must list "
            "the same images: pass the same data.images / data.image_root / data.max_images and make the files "
            "identical on every node.")

    bad = _unreadable(listed, rank, world, num_workers, progress, device)
    shown = [{"path": str(listed[i]), "error": why.splitlines()[0][:300]} for i, why in bad[:UNREADABLE_SHOWN]]
    allowed = math.floor(fraction * len(listed) + 1e-9)
    if len(bad) > allowed or len(bad) == len(listed):
        raise ValueError(
            f"{len(bad)} of {len(listed)} calibration images ({len(bad) / len(listed):.2%}) are unreadable, more than "
            f"max_unreadable_fraction={fraction:g} allows ({allowed} images); the first: "
            + "; ".join(f"{s['path']} ({s['error']})" for s in shown)
            + ". Fix or remove them (or raise max_unreadable_fraction to skip them).")
    if bad:
        named = "; ".join(f"{s['path']} ({s['error']})" for s in shown)
        logger.warning("skipping %d unreadable of %d calibration images (max_unreadable_fraction=%g allows %d): %s%s",
                       len(bad), len(listed), fraction, allowed, named, "; ..." if len(bad) > len(shown) else "")
    skipped = {i for i, _ in bad}
    used = [p for i, p in enumerate(listed) if i not in skipped]
    record = image_list_record(used)

    dataset = _Images(used, pipe)
    batches = _batches_for_rank(len(dataset), batch_size, seed, rank, world)
    config = pipe.model.config
    ckpt = None
    if checkpoint is not None:
        error = None
        try:
            spec = encoder_spec(pipe.tower)
            run = {"images": len(used), "image_list_sha256": record["image_list_sha256"], "seed": seed,
                   "batch_size": batch_size, "target_tokens": target_tokens, "world_size": world, "rank": rank,
                   "model": str(getattr(config, "_name_or_path", "")),
                   "weights_sha256": weights_identity(pipe.tower, layers_to_run(spec.num_layers,
                                                                                config.vision_feature_layer)),
                   "feature_layer": config.vision_feature_layer, "image_aspect_ratio": _aspect_ratio(pipe),
                   "dtype": str(next(pipe.tower.parameters()).dtype).removeprefix("torch.")}
            ckpt = CalibrationCheckpoint(_rank_file(Path(checkpoint), rank, world), run, restart=restart)
        except (CheckpointError, OSError) as err:
            error = err
        _fail_together(error, world, device)
        if ckpt.batches_done > len(batches):
            raise CheckpointError(f"calibration checkpoint {ckpt.path} records {ckpt.batches_done} batches but this "
                                  f"rank has {len(batches)}; delete it to start over.")
    start = ckpt.batches_done if ckpt is not None else 0
    loader = DataLoader(dataset, batch_sampler=batches[start:], num_workers=num_workers, collate_fn=torch.cat)
    realised_loader = None
    if realised_max_images != 0:
        limit = len(dataset) if realised_max_images is None else min(realised_max_images, len(dataset))
        subset = _batches_for_rank(limit, batch_size, seed, rank, world)
        realised_loader = DataLoader(dataset, batch_sampler=subset, num_workers=num_workers, collate_fn=torch.cat)
    return find_thresholds(
        pipe.tower,
        loader,
        target_tokens=target_tokens,
        feature_layer=config.vision_feature_layer,
        realised_batches=realised_loader,
        progress=progress,
        source=source or "eval.calibrate",
        checkpoint=ckpt,
        on_batch=on_batch,
        extra={
            "model": str(getattr(config, "_name_or_path", "")),
            "seed": seed,
            "batch_size": batch_size,
            "world_size": world,
            "image_aspect_ratio": _aspect_ratio(pipe),
            "images": len(used),
            "images_listed": len(listed),
            "unreadable_images": {"count": len(bad), "max_unreadable_fraction": fraction,
                                  "first": [{"path": Path(s["path"]).as_posix(), "error": s["error"]} for s in shown]},
            **record,
        },
    )


def _aspect_ratio(pipe: DyMUPipeline) -> str:
    """The preprocessing recorded with thresholds and checkpoints: LLaVA-1.5's ``image_aspect_ratio``; ``"crop"``
    for a family without the setting (LLaVA-OneVision resizes its AnyRes crops; recorded so before the family
    split, which keeps its checkpoints resumable)."""
    return getattr(pipe, "image_aspect_ratio", "crop")


def _settings(cfg: Mapping) -> dict:
    """The calibration settings of a config, validated before anything is loaded (every error names its key)."""
    data = cfg["data"]
    if not data.get("images"):
        raise ValueError("set data.images=<folder of images, or a LLaVA JSON list of {\"image\": relpath}>.")
    for key in ("overwrite", "restart"):
        if not isinstance(cfg.get(key, False), bool):
            raise ValueError(f"{key} must be true or false; got {cfg.get(key)!r}.")
    return {
        "target_tokens": _integer("target_tokens", cfg.get("target_tokens"), 1),
        "batch_size": _integer("batch_size", cfg.get("batch_size", 32), 1),
        "seed": _integer("seed", cfg.get("seed", 0), 0),
        "num_workers": _integer("num_workers", cfg.get("num_workers", 0), 0),
        "realised_max_images": _integer("realised_max_images", cfg.get("realised_max_images", 512), 0,
                                        none="all images"),
        "max_images": _integer("data.max_images", data.get("max_images"), 1, none="all images"),
        "max_unreadable_fraction": _fraction("max_unreadable_fraction", cfg.get("max_unreadable_fraction", 0.01)),
        "restart": cfg.get("restart", False),
    }


def calibrate_from_config(cfg: Mapping) -> Thresholds:
    """What ``scripts/find_thresholds.py`` runs (keys: see ``hydra_conf/find_thresholds.yaml``).

    Under ``torchrun`` (``WORLD_SIZE > 1``) it joins the process group (gloo on CPU, nccl on CUDA); rank 0
    writes the file. While it runs, each rank keeps a checkpoint next to the output (:func:`checkpoint_path`)
    updated after every batch: run again with the same settings after a kill and it continues where it was
    (``restart=true`` discards a checkpoint of other settings). The checkpoints are removed once the file is
    written.

    Raises:
        FileExistsError: the output exists and ``overwrite`` is false (checked before any work).
        ValueError: ``data.images`` is not set, or a setting is out of range or of the wrong type (names the key
            and the allowed values; checked before the model loads); and what :func:`calibrate` raises.
    """
    output = Path(str(cfg["output"]))
    if output.exists() and not cfg.get("overwrite", False):
        raise FileExistsError(f"{output} exists; pass overwrite=true to replace it, or output=<another file>.")
    data = cfg["data"]
    settings = _settings(cfg)
    model_cfg = cfg["model"]
    with process_group(str(cfg.get("device", "cpu"))) as device:
        pipe = load_from_config(model_cfg, {"mode": "off", "vtu": False}, device=device, build_thresholds=False)
        images = list_images(data["images"], data.get("image_root"))
        if settings["max_images"] is not None:
            images = images[: settings["max_images"]]
        rank, world = _rank_world()
        partial = checkpoint_path(output)
        thresholds = calibrate(
            pipe,
            images,
            settings["target_tokens"],
            batch_size=settings["batch_size"],
            seed=settings["seed"],
            num_workers=settings["num_workers"],
            realised_max_images=settings["realised_max_images"],
            max_unreadable_fraction=settings["max_unreadable_fraction"],
            checkpoint=partial,
            restart=settings["restart"],
            source=f"scripts/find_thresholds.py model={model_cfg.get('name')} variant={cfg.get('variant')}",
        )
        thresholds.extra["image_source"] = str(data["images"])  # re-lists the images (see image_list_sha256)
        thresholds.extra["image_root"] = str(data["image_root"]) if data.get("image_root") else None
        thresholds.extra["max_images"] = settings["max_images"]
        error = None
        if rank == 0:
            try:
                thresholds.save(output)
                logger.info("wrote %s: %d layers, target %s tokens, realised %s", output, len(thresholds.values),
                            thresholds.target_tokens, thresholds.realised_tokens)
            except BaseException as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
                error = err
        _fail_together(error, world, next(pipe.tower.parameters()).device)
        _rank_file(partial, rank, world).unlink(missing_ok=True)  # the file is written: the checkpoint is done
        return thresholds
