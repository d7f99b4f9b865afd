"""Weights & Biases logging for evaluation runs (offline by default: no account or network needed).

One wandb run per experiment arm and output folder: the run id is derived from the project and the absolute
``output_dir`` (:func:`run_id`), and the run is started with ``resume="allow"``, so re-running a command
continues its run instead of adding one. Every run of a project lives under one wandb directory
(``<wandb.dir>/wandb``, by default ``outputs/wandb``), which one command uploads::

    wandb sync outputs/wandb

In offline mode each invocation writes its own ``offline-run-<time>-<id>`` folder; the folders of one arm
share the id, and ``wandb sync`` (wandb >= 0.23, ``wandb/wandb#10708``) uploads folders of the same run one
after the other, in order of start time, into that one run.

What a run holds (everything a dashboard needs to compare arms):

- config: the resolved eval config, flattened (``dymu/name``, ``model/name``, ``budget/max_visual_tokens``,
  ...), so runs can be grouped and filtered by any setting;
- summary: the metrics of ``metrics.json`` flattened (``metrics/accuracy``, ``visual_tokens/mean``,
  ``n_samples``, ...);
- ``samples``: a table with one row per sample (id, question, prediction, answers, visual tokens, correct,
  error); ``correct`` is the sample's own score in [0, 1] where the benchmark's metric is a mean over
  independent samples (see :func:`sample_score`), else empty;
- ``layer_tokens``: mean tokens per encoder input (image, crop or frame) after each DToMe encoder layer,
  measured by encoding the first samples' images again (see :func:`layer_token_counts`), with a line plot;
- ``visual_tokens/histogram``.

Logging never loses predictions: they are on disk before anything is logged, and an error while starting or
logging a run is reported and swallowed (re-running the same command evaluates nothing new and logs again).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dymu.budget import out_of_bounds

__all__ = ["init_wandb", "log_results", "flatten", "run_id", "sample_score", "layer_token_counts",
           "SAMPLE_COLUMNS"]

logger = logging.getLogger(__name__)

SAMPLE_COLUMNS = ["id", "question", "prediction", "answers", "visual_tokens", "correct", "error"]

# Benchmarks whose metric is a mean over independent samples, so that metric computed on one record is that
# sample's score (percent): benchmark name -> metric key (a callable: from the record). Left out, with
# `correct` empty: mmbench (circular evaluation scores a question only over all its rotations), mmvet and
# llava_bench (an LLM judge, which would be called once per sample).
_PER_SAMPLE_METRIC: dict[str, Any] = {
    "sample": "accuracy",
    "gqa": "accuracy",
    "textvqa": "accuracy",  # VQA accuracy: 0, 1/3, 2/3 or 1 per sample
    "pope": "accuracy",
    "scienceqa": "accuracy",
    "seed": "accuracy",
    "videomme": "accuracy",
    "mme": lambda record: f"{record['meta']['subtask']}/acc",  # per question (acc+ pairs the image's questions)
}


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


def run_id(project: str, output_dir: str | os.PathLike) -> str:
    """The wandb run id of an experiment arm: 16 hex digits of SHA-256 over the project and the absolute,
    resolved ``output_dir`` (each arm has its own output folder), so the same command gets the same id."""
    key = f"{project}\0{Path(output_dir).expanduser().resolve()}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def init_wandb(settings: Mapping, config: Mapping, output_dir: str | os.PathLike):
    """Start (or resume) the wandb run of an experiment arm; None when ``settings["mode"] == "disabled"``.

    Args:
        settings: the ``wandb`` config section: ``mode`` (offline | online | disabled), ``project``,
            ``group``, ``name``, ``tags``; ``id`` (None: :func:`run_id` of ``project`` and ``output_dir``);
            ``dir`` (runs go to ``<dir>/wandb``; None: ``output_dir``); ``cache_dir`` / ``data_dir``
            (``WANDB_CACHE_DIR`` / ``WANDB_DATA_DIR`` unless already set in the environment: wandb's debug
            logs and artifact cache / staged table artifacts, kept inside the project's folders).
        config: the resolved run config; recorded flattened (``dymu/name``, ...).
        output_dir: the arm's output folder (names the run id).

    Returns:
        The run, or None: disabled, or wandb failed to start (logged as an error; the evaluation goes on).
    """
    mode = settings.get("mode", "offline")
    if mode == "disabled":
        return None
    project = settings.get("project") or "dymu"
    root = Path(settings.get("dir") or output_dir)
    for variable, key in (("WANDB_CACHE_DIR", "cache_dir"), ("WANDB_DATA_DIR", "data_dir")):
        if settings.get(key):  # before wandb starts its service, which reads them
            os.environ.setdefault(variable, str(settings[key]))
    identifier = settings.get("id") or run_id(project, output_dir)
    try:
        import wandb

        (root / "wandb").mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=project,
            group=settings.get("group"),
            name=settings.get("name"),
            tags=list(settings.get("tags") or []),
            id=identifier,
            resume="allow",
            dir=str(root),
            mode=mode,
            config=flatten(config),
            job_type="eval",
            reinit="finish_previous",
        )
    except Exception as err:  # noqa: BLE001 - the evaluation matters more than its dashboard
        logger.error("wandb did not start (%s: %s); evaluating without it. Predictions are written as usual; "
                     "re-run the same command to log them (finished samples are not evaluated again), or pass "
                     "wandb.mode=offline / disabled.", type(err).__name__, err)
        return None
    logger.info("wandb run %s (%s) in %s", run.id, mode, Path(run.dir).parent)
    return run


def sample_score(benchmark, record: Mapping) -> float | None:
    """One record's score in [0, 1] (1 right, 0 wrong; TextVQA: its VQA accuracy), from the benchmark's own
    ``score`` applied to that record alone; None where one record has no score of its own (MMBench's circular
    evaluation, judged benchmarks, unknown benchmarks) or scoring it fails."""
    key = _PER_SAMPLE_METRIC.get(getattr(benchmark, "name", None))
    if key is None:
        return None
    try:
        with _quiet(type(benchmark).__module__):  # e.g. MME warns that one record covers few subtasks
            value = benchmark.score([dict(record)]).get(key(record) if callable(key) else key)
    except Exception as err:  # noqa: BLE001 - a row without a score beats a run without a table
        logger.debug("no per-sample score for %s: %s: %s", record.get("id"), type(err).__name__, err)
        return None
    return None if value is None else float(value) / 100.0


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence logger ``name`` below ERROR for the duration."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def layer_token_counts(pipe, benchmark, records: Sequence[Mapping],
                       max_samples: int | None = 256) -> list[float] | None:
    """Mean tokens per encoder input (image, AnyRes crop or video frame) after each DToMe encoder layer.

    The records hold only the final count, so the first ``max_samples`` successful records' visual inputs are
    encoded again through the pipeline's own ``encode_prompt_images`` (same preprocessing, thresholds and
    budget, deterministic), with forward hooks on the patched encoder layers reading each layer's token
    count (CLS included where the encoder has one; padding excluded); the hooks are removed afterwards.
    Under a budget with exact bounds (LLaVA-1.5), the images the pipeline encodes a second time take their
    counts from that bounded pass, as the pipeline does.

    Args:
        pipe: the loaded pipeline (``llava.load_model``): ``tower``, ``encode_prompt_images``.
        benchmark: gives each record's visual inputs (``visual_inputs`` of its sample).
        records: prediction records, in benchmark order.
        max_samples: at most this many samples (None: all).

    Returns:
        ``[mean tokens after layer 0, after layer 1, ...]`` over the layers the encoder runs, or None when the
        tower has no DToMe (nothing merges) or no sample could be encoded.
    """
    import torch

    from dymu.patch.vit import DToMeEncoderLayerMixin

    tower = getattr(pipe, "tower", None)
    layers = [m for m in tower.modules() if isinstance(m, DToMeEncoderLayerMixin)] if tower is not None else []
    if not layers or max_samples == 0:
        return None
    by_id = {s.id: s for s in benchmark.samples()}
    chosen = [by_id[r["id"]] for r in records if not r.get("error") and r["id"] in by_id]
    chosen = chosen[:max_samples] if max_samples is not None else chosen
    passes: list[dict[int, list[int]]] = []  # per tower call: layer -> tokens of each input

    def start_pass(module, args, kwargs):
        passes.append({})

    def count(layer: int):
        def hook(module, args, output):
            hidden, state = output  # (B, N_l, C), TokenState
            mask = state.padding_mask  # (B, N_l) True for real tokens, or None without padding
            passes[-1][layer] = (mask.sum(-1).tolist() if mask is not None else [hidden.shape[1]] * hidden.shape[0])
        return hook

    handles = [tower.register_forward_pre_hook(start_pass, with_kwargs=True)]
    handles += [m.register_forward_hook(count(i)) for i, m in enumerate(layers)]
    per_input: list[list[int]] = []
    skipped: list[str] = []
    try:
        for sample in chosen:
            passes.clear()
            try:
                with torch.inference_mode():
                    pipe.encode_prompt_images([benchmark.visual_inputs(sample)])
                per_input += _final_counts(pipe, passes)
            except Exception as err:  # noqa: BLE001 - skip the sample, keep the measurement
                skipped.append(f"{sample.id}: {type(err).__name__}: {err}")
    finally:
        for handle in handles:
            handle.remove()
    if skipped:
        logger.warning("per-layer token counts leave out %d of %d samples that failed to encode again, e.g. %s",
                       len(skipped), len(chosen), skipped[0])
    if not per_input:
        return None
    n_layers = min(len(counts) for counts in per_input)
    return [sum(counts[layer] for counts in per_input) / len(per_input) for layer in range(n_layers)]


def _final_counts(pipe, passes: list[dict[int, list[int]]]) -> list[list[int]]:
    """Per encoder input of one request, its token count after each layer.

    Every tower pass encodes its own inputs (LLaVA-OneVision: the images' crops, then each video's frames),
    except under a budget with exact bounds (LLaVA-1.5), where a second pass re-encodes the inputs
    ``dymu.budget.out_of_bounds`` lists for the first pass's counts (as ``dymu.budget.encode_under_budget``
    does); their rows come from that pass.
    """
    rows = [[[p[layer][i] for layer in sorted(p)] for i in range(len(next(iter(p.values()))))]
            for p in passes if p]
    budget = pipe.request_budget()
    if not budget.has_bounds or len(rows) < 2:
        return [row for pass_rows in rows for row in pass_rows]
    counts, redone = rows[0], rows[1]
    again = out_of_bounds(pipe.tower, [row[-1] for row in counts], budget, dropped_tokens=pipe.dropped_tokens)
    if len(rows) != 2 or len(again) != len(redone):
        raise RuntimeError(f"{len(rows)} tower passes do not match the pipeline's bounded re-encoding")
    for i, row in zip(again, redone):
        counts[i] = row
    return counts


def _row(record: Mapping, correct: float | None) -> list:
    return [str(record.get("id")), record.get("question"), record.get("prediction"),
            [str(a) for a in record.get("answers") or []], record.get("visual_tokens"), correct, record.get("error")]


def log_results(run, metrics: Mapping, records: Sequence[Mapping], benchmark=None, pipe=None, *,
                limit: int | None = None, layer_samples: int | None = 256) -> None:
    """Log an evaluation to its run, then finish the run; does nothing when ``run`` is None.

    Logs the summary metrics (``metrics.json`` flattened), the ``samples`` table, the visual-token histogram
    and, given ``pipe``, the per-layer token counts (see the module docstring). An error while logging is
    reported and swallowed: the predictions are already on disk.

    Args:
        run: from :func:`init_wandb`.
        metrics: the run's metrics (``metrics.json``).
        records: the records of ``predictions.jsonl``.
        benchmark: the task; with it the records are restricted to its first ``limit`` samples (what
            ``metrics`` covers), ordered as the benchmark, and scored one by one (``correct``).
        pipe: the loaded pipeline, for :func:`layer_token_counts` (None: not logged).
        limit: the run's ``limit``.
        layer_samples: samples encoded again for the per-layer counts (0: none; None: all).
    """
    if run is None:
        return
    failed = False
    try:
        import wandb

        records = list(records)
        if benchmark is not None:
            order = {s.id: i for i, s in enumerate(benchmark.samples()[:limit] if limit is not None
                                                   else benchmark.samples())}
            records = sorted((r for r in records if r.get("id") in order), key=lambda r: order[r["id"]])
        flat = flatten(metrics)
        run.summary.update({k: v for k, v in flat.items() if v is not None})
        payload: dict[str, Any] = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and v is not None}
        tokens = [r["visual_tokens"] for r in records if r.get("visual_tokens") is not None]
        if tokens:
            payload["visual_tokens/histogram"] = wandb.Histogram(tokens)
        scores = [sample_score(benchmark, r) if benchmark is not None else None for r in records]
        payload["samples"] = wandb.Table(columns=SAMPLE_COLUMNS, data=[_row(r, s) for r, s in zip(records, scores)])
        if pipe is not None and benchmark is not None:
            means = layer_token_counts(pipe, benchmark, records, layer_samples)
            if means is not None:
                table = wandb.Table(columns=["layer", "mean_tokens"], data=[[i, m] for i, m in enumerate(means)])
                payload["layer_tokens"] = table
                payload["layer_tokens_plot"] = wandb.plot.line(
                    table, "layer", "mean_tokens", title="mean tokens per encoder input after each layer")
                run.summary.update({f"layer_tokens/layer_{i:02d}": m for i, m in enumerate(means)})
        run.log(payload)
    except Exception as err:  # noqa: BLE001 - predictions and metrics.json are already written
        failed = True
        logger.error("logging to wandb run %s failed (%s: %s); predictions.jsonl and metrics.json are written. "
                     "Re-run the same command to log again (nothing is evaluated twice).",
                     getattr(run, "id", "?"), type(err).__name__, err)
    finally:
        try:
            run.finish(exit_code=1 if failed else 0)
        except Exception as err:  # noqa: BLE001
            logger.error("finishing wandb run %s failed: %s: %s", getattr(run, "id", "?"), type(err).__name__, err)
