"""What ``scripts/eval.py`` runs: config -> model + benchmark -> resumable evaluation -> files and wandb."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
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
    ``cfg.output_dir``; logs to wandb unless ``wandb.mode=disabled``. Under ``torchrun`` each rank evaluates a
    shard and rank 0 gathers the results (see :func:`eval.runner.run_benchmark`).

    Returns:
        The metrics dict.
    """
    torch.manual_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    device, started = _join_process_group(str(cfg.device))
    try:
        return _evaluate(cfg, output_dir, device)
    finally:
        if started:
            dist.destroy_process_group()


def _join_process_group(device: str) -> tuple[str, bool]:
    """Under torchrun (WORLD_SIZE > 1) join the default group: gloo on CPU, nccl on CUDA (one GPU per rank)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device, False
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return device, True


def _evaluate(cfg: DictConfig, output_dir: Path, device: str) -> dict[str, Any]:
    rank = dist.get_rank() if dist.is_initialized() else 0
    pipe = load_from_config(cfg.model, cfg.dymu, device=device)
    benchmark = instantiate(cfg.benchmark.task)

    def generate(prompts, visual_inputs, max_new_tokens):
        limit = cfg.max_new_tokens if cfg.max_new_tokens is not None else max_new_tokens
        answers, inputs = pipe.generate(prompts, visual_inputs, max_new_tokens=limit)
        return answers, inputs.visual_tokens

    run = init_wandb(cfg.wandb, OmegaConf.to_container(cfg, resolve=True), output_dir) if rank == 0 else None
    metrics = run_benchmark(
        generate,
        benchmark,
        output_dir,
        batch_size=cfg.batch_size,
        limit=cfg.limit,
        resume=cfg.resume,
        progress=True,
    )
    if rank == 0:
        records = read_predictions(output_dir / PREDICTIONS)
        log_results(run, metrics, [r["visual_tokens"] for r in records if r.get("visual_tokens") is not None])
        logger.info("%s / %s / %s: %s", cfg.model.name, cfg.dymu.name, benchmark.name, metrics)
    return metrics
