"""What ``scripts/eval.py`` runs: config -> model + benchmark -> resumable evaluation -> files and wandb."""

from __future__ import annotations

import logging
import shlex
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dymu.thresholds import PACKAGED_DIR

from .distributed import process_group
from .factory import load_from_config, thresholds_source
from .fingerprint import check_fingerprint, experiment_fingerprint
from .runner import (PREDICTIONS, Generate, check_output_dir, check_predictions, check_run_settings, has_predictions,
                     raise_if_failed, read_predictions, run_benchmark)
from .lock import output_lock
from .redaction import install_log_redaction
from .tracking import init_wandb, log_results

__all__ = ["evaluate", "make_generate", "check_config"]

logger = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run one evaluation described by the composed ``eval`` config (see ``hydra_conf/eval.yaml``).

    Writes ``predictions.jsonl`` (one line per sample, as it goes) and ``metrics.json`` into
    ``cfg.output_dir``; logs to wandb unless ``wandb.mode=disabled``. Under ``torchrun`` each rank evaluates a
    shard and rank 0 gathers the results (see :func:`eval.runner.run_benchmark`).

    Returns:
        The metrics dict (``status``: ``complete`` or ``incomplete``; a summary of failures is logged).

    Raises:
        RunFailedError: every sample failed (raised after the records and metrics.json are written).
        eval.lock.OutputLockedError: another run is writing into ``output_dir`` (checked before any work).
        FingerprintMismatch: ``output_dir`` holds predictions made with other prediction settings.
        ValueError / FileExistsError: bad settings (see :func:`check_config`), before any work.
        FileNotFoundError / ValueError: the benchmark's data is missing or malformed (before the model loads).
        ThresholdsError / OSError: the model or its thresholds cannot be loaded.
    """
    install_log_redaction()  # API keys never reach eval.log or the console wandb records
    check_config(cfg)
    torch.manual_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    with process_group(str(cfg.device)) as device:
        rank = dist.get_rank() if dist.is_initialized() else 0
        with output_lock(output_dir) if rank == 0 else nullcontext():  # one writer per folder, before any work
            check_output_dir(output_dir, cfg.resume)
            if rank == 0 and cfg.resume:
                check_predictions(output_dir)  # a broken record stops the run now, not after every sample ran
            return _evaluate(cfg, output_dir, device)


def _evaluate(cfg: DictConfig, output_dir: Path, device: str) -> dict[str, Any]:
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:  # first: missing / malformed data fails before the model loads, with the benchmark's own message
        benchmark = instantiate(cfg.benchmark.task)
    except InstantiationException as err:
        if err.__cause__ is None:
            raise
        raise err.__cause__ from None
    pipe = load_from_config(cfg.model, cfg.dymu, device=device, budget=cfg.get("budget"))
    generate = make_generate(pipe, cfg.max_new_tokens)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    fingerprint = experiment_fingerprint(resolved, pipe, _thresholds_file(cfg))
    if rank == 0:  # before wandb starts: refuse to resume another experiment's folder
        check_fingerprint(output_dir, fingerprint, has_records=has_predictions(output_dir), write=False)

    run = init_wandb(cfg.wandb, resolved, output_dir) if rank == 0 else None
    metrics = run_benchmark(
        generate,
        benchmark,
        output_dir,
        batch_size=cfg.batch_size,
        limit=cfg.limit,
        resume=cfg.resume,
        progress=True,
        retry_failed=cfg.get("retry_failed", False),
        fingerprint=fingerprint,
        retry_command=_retry_command(),
    )
    if rank == 0:
        records = read_predictions(output_dir / PREDICTIONS)
        log_results(run, metrics, records, benchmark, pipe, limit=cfg.limit,
                    layer_samples=cfg.wandb.get("layer_tokens_samples", 256))
        logger.info("%s / %s / %s: %s", cfg.model.name, cfg.dymu.name, benchmark.name, metrics)
    raise_if_failed(metrics, output_dir)
    return metrics


def _thresholds_file(cfg: DictConfig) -> Path | None:
    """The thresholds file a threshold-mode arm uses (a packaged name resolves to its shipped file)."""
    if cfg.dymu.get("mode") != "threshold":
        return None
    source = thresholds_source(cfg.model, str(cfg.dymu.variant))
    return Path(source) if source.endswith(".json") or Path(source).is_file() else PACKAGED_DIR / f"{source}.json"


def _retry_command() -> str | None:
    """``python scripts/eval.py <this run's overrides> retry_failed=true`` (None outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    overrides = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("retry_failed=")]
    return " ".join(["python scripts/eval.py", *map(shlex.quote, overrides), "retry_failed=true"])



def check_config(cfg: DictConfig) -> None:
    """Fail before any work (model loading, evaluation) on settings that cannot run.

    ``scripts/eval.py`` composes against the typed schema :class:`eval.config.EvalConfig`, so its values already
    have their types; this check repeats the type test for configs built by hand and adds the ranges.

    Raises:
        ValueError: ``batch_size`` is not an int >= 1, ``limit`` not null or an int >= 0, ``max_new_tokens`` not
            null or an int >= 1, or ``resume`` / ``retry_failed`` not a boolean (the key is named).
        FileExistsError: ``output_dir`` holds predictions and ``resume`` is false (nothing is overwritten).
    """
    check_run_settings(batch_size=cfg.batch_size, limit=cfg.limit, resume=cfg.resume,
                       retry_failed=cfg.get("retry_failed", False), max_new_tokens=cfg.max_new_tokens)
    check_output_dir(cfg.output_dir, cfg.resume)


def make_generate(pipe, max_new_tokens: int | None = None) -> Generate:
    """The runner's ``generate`` for a loaded pipeline (:func:`llava.load_model`).

    Args:
        pipe: the model; its ``generate(prompts, visual_inputs, max_new_tokens=...)`` returns
            ``(answers, inputs)``.
        max_new_tokens: answer length for every benchmark (``None``: the benchmark's own).

    Returns:
        ``(prompts, visual inputs, benchmark max_new_tokens) -> (answers, visual tokens per sample)``. It raises
        ``FloatingPointError`` when the merged input embeddings hold NaN / inf (e.g. a vision tower overflowing
        in float16, or corrupt weights), so the runner records those samples as failed instead of scoring
        garbage answers.
    """

    def generate(prompts, visual_inputs, benchmark_max_new_tokens):
        limit = max_new_tokens if max_new_tokens is not None else benchmark_max_new_tokens
        answers, inputs = pipe.generate(prompts, visual_inputs, max_new_tokens=limit)
        embeds = getattr(inputs, "inputs_embeds", None)
        if embeds is not None and not torch.isfinite(embeds).all():
            raise FloatingPointError(
                "the input embeddings (text + visual tokens) hold NaN or inf, so the answer would be garbage: "
                "the vision tower / projector overflowed or the weights are corrupt. Try model.dtype=float32 or "
                "bfloat16, and check the checkpoint."
            )
        return answers, inputs.visual_tokens

    return generate
