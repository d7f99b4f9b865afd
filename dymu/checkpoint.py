"""Checkpoints of a running threshold calibration, so a killed run resumes to the same thresholds.

:func:`dymu.find_thresholds` accumulates, per encoder layer, the float64 sum and count of the per-batch
thresholds, plus the number of encoder inputs seen. Those three are the whole state of a calibration: a
checkpoint records them (exactly: JSON floats round-trip float64 bit for bit) after every batch, so a kill
loses at most the batch in flight, and a run resumed from it with the same remaining batches adds the same
values in the same order as an uninterrupted run.

A checkpoint also records what identifies the run (``run``: whatever the caller says fixes the batches, e.g.
the image list hash, seed, batch size, target; and ``model``: what :func:`dymu.find_thresholds` knows of the
tower: encoder geometry, weights identity, feature layer, schedule, dtype). A checkpoint of another run is
refused, never silently mixed in.

The file is strict JSON, replaced atomically under a unique temporary name after every batch.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic

__all__ = ["CalibrationCheckpoint", "CheckpointError", "CHECKPOINT_FORMAT"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "dymu-calibration-checkpoint"
_VERSION = 1


class CheckpointError(ValueError):
    """A calibration checkpoint is unreadable or belongs to another run."""


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _canonical(value: Any, what: str) -> Any:
    """``value`` as it reads back from strict JSON (tuples become lists), so stored and new identities compare."""
    try:
        return json.loads(json.dumps(value, allow_nan=False, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise TypeError(f"the calibration checkpoint's {what} must be JSON data without NaN / infinity: {err}") from err


def _differences(old: Mapping, new: Mapping) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: checkpoint {old.get(k, '<absent>')!r}, now {new.get(k, '<absent>')!r}"
            for k in keys if old.get(k) != new.get(k)]


class CalibrationCheckpoint:
    """The per-batch progress of one calibration run, in a strict-JSON file.

    Opening reads an existing file at ``path``: if it was written by the same ``run`` its state is loaded
    (:attr:`batches_done` batches are in it: feed :func:`dymu.find_thresholds` only the batches after those);
    if it belongs to another run it is refused, or discarded when ``restart`` is true. Nothing is written
    until the first batch is recorded.

    Args:
        path: the checkpoint file (e.g. ``<output>.partial.json``).
        run: JSON data identifying the run (what fixes the batches and the result: image list hash, seed,
            batch size, target, model, ...). Compared key by key with the stored one.
        restart: discard a checkpoint of another run (or an unreadable one) instead of refusing it.

    Attributes:
        batches_done: batches already accumulated.
        sums, counts: per-layer float64 sums / counts of the per-batch thresholds (None before any batch).
        n_images: encoder inputs seen so far.
        resumed: the state was loaded from the file.

    Raises:
        CheckpointError: the file is not a readable checkpoint, or it belongs to another run (the message
            lists the differing settings and says how to resume or start over); not raised when ``restart``.
        TypeError: ``run`` is not JSON data.
    """

    def __init__(self, path: str | os.PathLike, run: Mapping[str, Any], *, restart: bool = False):
        self.path = Path(path)
        self.run = _canonical(dict(run), "run identity")
        self.restart = bool(restart)
        self.batches_done = 0
        self.sums: list[float] | None = None
        self.counts: list[float] | None = None
        self.n_images = 0.0
        self.model: dict | None = None
        self.resumed = False
        if self.path.exists():
            self._open()

    def _fix(self) -> str:
        return (f"Rerun with the same settings to resume from it, or pass restart=true to discard it and start over "
                f"(or delete {self.path})")

    def _open(self) -> None:
        try:
            payload = json.loads(self.path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
            if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"not a DyMU calibration checkpoint (no \"format\": \"{CHECKPOINT_FORMAT}\")")
            if payload.get("version") != _VERSION:
                raise ValueError(f"checkpoint version {payload.get('version')!r}, this DyMU reads {_VERSION}")
            done, sums, counts, n = (payload.get(k) for k in ("batches_done", "sums", "counts", "n_images"))
            if not (isinstance(done, int) and not isinstance(done, bool) and done >= 1):
                raise ValueError(f"'batches_done' must be a positive integer, got {done!r}")
            if not (isinstance(sums, list) and isinstance(counts, list) and len(sums) == len(counts) and sums
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sums + counts + [n])):
                raise ValueError("'sums' / 'counts' must be equally long lists of numbers, 'n_images' a number")
            if not isinstance(payload.get("run"), dict) or not isinstance(payload.get("model"), dict):
                raise ValueError("'run' and 'model' must be objects")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            if self.restart:
                logger.warning("discarding unreadable calibration checkpoint %s (%s); starting over", self.path, err)
                return
            raise CheckpointError(f"calibration checkpoint {self.path} is unreadable ({err}); pass restart=true to "
                                  f"start over (or delete {self.path}).") from err
        if payload["run"] != self.run:
            diff = _differences(payload["run"], self.run)
            if self.restart:
                logger.warning("discarding calibration checkpoint %s of other settings (%s); starting over",
                               self.path, "; ".join(diff))
                return
            raise CheckpointError(f"calibration checkpoint {self.path} ({payload['batches_done']} batches done) was "
                                  f"written with other settings: {'; '.join(diff)}. {self._fix()}.")
        self.batches_done = payload["batches_done"]
        self.sums, self.counts = [float(v) for v in payload["sums"]], [float(v) for v in payload["counts"]]
        self.n_images = float(payload["n_images"])
        self.model = payload["model"]
        self.resumed = True
        logger.info("resuming calibration from %s: %d batches done", self.path, self.batches_done)

    def bind_model(self, model: Mapping[str, Any]) -> None:
        """Check (resumed) or set the model part of the identity; called by :func:`dymu.find_thresholds`.

        Raises:
            CheckpointError: a resumed checkpoint was written for another tower / schedule / dtype (names them).
        """
        model = _canonical(dict(model), "model identity")
        if self.resumed and self.model != model:
            raise CheckpointError(f"calibration checkpoint {self.path} was written for another model: "
                                  f"{'; '.join(_differences(self.model or {}, model))}. Resume it with the model "
                                  f"it was started on, or delete {self.path} to start over.")
        self.model = model

    def record(self, sums: Sequence[float], counts: Sequence[float], n_images: float, batches_done: int) -> None:
        """Write the state after ``batches_done`` batches (atomically; strict JSON)."""
        self.sums, self.counts = [float(v) for v in sums], [float(v) for v in counts]
        self.n_images, self.batches_done = float(n_images), int(batches_done)
        payload = {"format": CHECKPOINT_FORMAT, "version": _VERSION, "run": self.run, "model": self.model,
                   "batches_done": self.batches_done, "sums": self.sums, "counts": self.counts,
                   "n_images": self.n_images}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(payload, indent=1, allow_nan=False) + "\n")

    def remove(self) -> None:
        """Delete the file (once the final thresholds are written)."""
        self.path.unlink(missing_ok=True)
