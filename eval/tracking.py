"""Weights & Biases logging for evaluation runs (offline by default: no account or network needed)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["init_wandb", "log_results", "flatten"]

logger = logging.getLogger(__name__)


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a/b": 1}`` (wandb groups keys by their ``/`` prefix)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def init_wandb(settings: Mapping, config: dict, run_dir: str | os.PathLike):
    """Start a wandb run, or return None when ``settings["mode"] == "disabled"``.

    Args:
        settings: ``mode`` (offline | online | disabled), ``project``, ``group``, ``name``, optional ``tags``.
            Runs of one ablation share a ``group`` so the dashboard compares them.
        config: the resolved run config (recorded with the run).
        run_dir: folder for wandb's files (``<run_dir>/wandb``).
    """
    mode = settings.get("mode", "offline")
    if mode == "disabled":
        return None
    import wandb

    return wandb.init(
        project=settings.get("project", "dymu"),
        group=settings.get("group"),
        name=settings.get("name"),
        tags=list(settings.get("tags") or []),
        dir=str(run_dir),
        mode=mode,
        config=config,
        job_type="eval",
        reinit="finish_previous",
    )


def log_results(run, metrics: Mapping, visual_tokens: list[int]) -> None:
    """Log final metrics (summary + one step) and the visual-token histogram, then finish the run."""
    if run is None:
        return
    import wandb

    flat = flatten(metrics)
    payload = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and v is not None}
    if visual_tokens:
        payload["visual_tokens/histogram"] = wandb.Histogram(visual_tokens)
    run.log(payload)
    run.summary.update({k: v for k, v in flat.items() if v is not None})
    run.finish()
