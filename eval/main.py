"""What ``scripts/eval.py`` runs: config -> model + benchmark -> resumable evaluation -> files and wandb."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from llava.factory import load_from_config

from .runner import PREDICTIONS, read_predictions, run_benchmark
from .tracking import init_wandb, log_results

__all__ = ["evaluate"]

logger = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run one evaluation described by the composed ``eval`` config (see ``hydra_conf/eval.yaml``).

    Writes ``predictions.jsonl`` (one line per sample, as it goes) and ``metrics.json`` into
    ``cfg.output_dir``; logs to wandb unless ``wandb.mode=disabled``.

    Returns:
        The metrics dict.
    """
    torch.manual_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    pipe = load_from_config(cfg.model, cfg.dymu, device=cfg.device)
    benchmark = instantiate(cfg.benchmark.task)

    def generate(prompts, visual_inputs, max_new_tokens):
        limit = cfg.max_new_tokens if cfg.max_new_tokens is not None else max_new_tokens
        answers, inputs = pipe.generate(prompts, visual_inputs, max_new_tokens=limit)
        return answers, inputs.visual_tokens

    run = init_wandb(cfg.wandb, OmegaConf.to_container(cfg, resolve=True), output_dir)
    metrics = run_benchmark(
        generate,
        benchmark,
        output_dir,
        batch_size=cfg.batch_size,
        limit=cfg.limit,
        resume=cfg.resume,
        progress=True,
    )
    tokens = [r["visual_tokens"] for r in read_predictions(output_dir / PREDICTIONS) if r.get("visual_tokens") is not None]
    log_results(run, metrics, tokens)
    logger.info("%s / %s / %s: %s", cfg.model.name, cfg.dymu.name, benchmark.name, metrics)
    return metrics
