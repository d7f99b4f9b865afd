"""The fingerprint of an evaluation: every setting that changes predictions, recorded next to ``predictions.jsonl``.

A resumed run appends to the predictions of an earlier one, so both must be the same experiment: same model
and weights, same thresholds (by content), same DToMe / VTU / KV-cache / budget settings, answer length, dtype,
prompt format, benchmark and split. Settings that do not change what a sample's answer is (batch size, device,
world size, ``limit``, paths of the data) are recorded under ``info`` but never compared, so a run may resume
on another machine, with more ranks or a larger ``limit``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .jsonio import finite, read_json, write_json_atomic
from .tracking import flatten

__all__ = ["FINGERPRINT", "FingerprintMismatch", "weights_identity", "file_digest", "experiment_fingerprint",
           "check_fingerprint", "differences"]

logger = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"

# benchmark-config keys that locate data or cap the sample count: they never change a sample's answer
_FREE_BENCHMARK_KEYS = ("data_dir", "image_cache_dir", "cache_dir", "limit")


class FingerprintMismatch(ValueError):
    """Resuming an output folder written with other prediction settings."""


def weights_identity(model: torch.nn.Module, tensors: int = 8, values: int = 4096) -> str:
    """A cheap identity of a model's weights: sha256 over names, shapes and leading values of a few parameters.

    Takes ``tensors`` parameters spread evenly over ``named_parameters()`` (always the first and the last) and
    hashes the first ``values`` entries of each, as float32 bytes, so the identity does not depend on the
    device; it does depend on the dtype the weights were loaded in only through their values (a bfloat16 copy
    of float32 weights is another identity: it answers differently). About a millisecond, even at 7B.

    Returns:
        ``"sha256:<16 hex digits>"``.
    """
    named = list(model.named_parameters())
    if not named:
        return "sha256:none"
    step = max(1, (len(named) - 1) / max(1, tensors - 1))
    picks = sorted({min(len(named) - 1, round(i * step)) for i in range(tensors)})
    digest = hashlib.sha256()
    for i in picks:
        name, param = named[i]
        head = param.detach().reshape(-1)[:values].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(param.shape)}:".encode())
        digest.update(head.numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    """``"sha256:<16 hex digits>"`` of a file's bytes (e.g. a thresholds JSON).

    Raises:
        OSError: the file cannot be read.
    """
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def experiment_fingerprint(cfg: Mapping, pipe, thresholds_file: str | os.PathLike | None) -> dict[str, Any]:
    """The fingerprint of one evaluation arm.

    Args:
        cfg: the resolved ``eval`` config (a plain dict: ``OmegaConf.to_container(cfg, resolve=True)``).
        pipe: the loaded pipeline (:func:`llava.load_model`): its weights and its prompt format are read.
        thresholds_file: the thresholds file the arm uses (``None``: no thresholds, e.g. ``dymu=off`` or ToMe).

    Returns:
        ``{"settings": {...compared on resume...}, "info": {...recorded only...}}`` (plain JSON types).
    """
    model_cfg = dict(cfg["model"])
    benchmark = {k: v for k, v in dict(cfg["benchmark"].get("task", {})).items() if k not in _FREE_BENCHMARK_KEYS}
    settings = {
        "model": {
            "name_or_path": str(model_cfg.get("name_or_path")),
            "weights": weights_identity(pipe.model),
            "dtype": str(model_cfg.get("dtype")),
            "attn_implementation": model_cfg.get("attn_implementation"),
            "image_aspect_ratio": model_cfg.get("image_aspect_ratio"),
            "layout": model_cfg.get("layout"),
            "video_pooling": model_cfg.get("video_pooling"),
        },
        "thresholds": file_digest(thresholds_file) if thresholds_file is not None else None,
        "dymu": {k: v for k, v in dict(cfg["dymu"]).items() if k != "name"},
        "budget": dict(cfg.get("budget") or {}),
        "max_new_tokens": cfg.get("max_new_tokens"),
        "prompt_format": pipe.prompt("{question}", ["image"]),
        "benchmark": {"name": cfg["benchmark"]["name"], **benchmark},
        "seed": cfg.get("seed"),
    }
    import transformers

    info = {
        "batch_size": cfg.get("batch_size"),
        "device": str(cfg.get("device")),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "limit": cfg.get("limit"),
        "thresholds_file": str(thresholds_file) if thresholds_file is not None else None,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    return json.loads(json.dumps(finite({"settings": settings, "info": info}), default=str, allow_nan=False))


def differences(recorded: Mapping, current: Mapping) -> list[str]:
    """``"key: recorded -> current"`` for every setting that differs (nested keys joined by ``/``)."""
    old, new = flatten(recorded), flatten(current)
    return [f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}"
            for key in sorted(set(old) | set(new)) if old.get(key, "<absent>") != new.get(key, "<absent>")]


def check_fingerprint(output_dir: str | os.PathLike, fingerprint: Mapping, has_records: bool,
                      write: bool = True) -> None:
    """Refuse to resume ``output_dir`` if it was written with other prediction settings; record them if new.

    Args:
        output_dir: the run's folder.
        fingerprint: :func:`experiment_fingerprint` of this run.
        has_records: the folder already holds predictions (then a recorded fingerprint must match).
        write: write ``fingerprint.json`` (rank 0 only under torchrun).

    Raises:
        FingerprintMismatch: the recorded ``settings`` differ; the message lists every difference and the two
            ways out.
    """
    path = Path(output_dir) / FINGERPRINT
    recorded = read_json(path) if path.is_file() else None
    if recorded is not None and has_records:
        diff = differences(recorded.get("settings", {}), fingerprint["settings"])
        if diff:
            raise FingerprintMismatch(
                f"{output_dir} holds predictions made with other settings, so resuming would mix two experiments:\n  "
                + "\n  ".join(diff)
                + "\nEither run again with the recorded settings to continue that experiment, or write this one "
                  "elsewhere (output_dir=<new folder>, or move / delete the folder to start over).")
    elif has_records and recorded is None:
        logger.warning("%s holds predictions but no %s (written before fingerprints existed): resuming without "
                       "checking that the settings are the same; recording the current ones.", output_dir, FINGERPRINT)
    if write and (recorded is None or not has_records or recorded != fingerprint):
        write_json_atomic(path, dict(fingerprint))
