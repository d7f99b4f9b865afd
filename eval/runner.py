"""Evaluation runner: generate answers for a benchmark, append predictions as it goes, score.

Resumable: every finished sample is appended to ``predictions.jsonl`` (flushed and fsynced), and a run started
again with the same output directory evaluates only the samples not yet there, after checking that the folder
was written with the same prediction settings (:mod:`eval.fingerprint`). A sample that fails is recorded with
its error (``prediction: null``) and counted; the others are still scored. A resumed run keeps failed records as
they are (a corrupt file would fail again on every resume); ``retry_failed=True`` redoes them.

A run with failures never reads as a result: ``metrics.json`` says ``"status": "incomplete"`` (some samples
failed) or ``"failed"`` (all did) with the count and the first distinct errors, the end of the run logs a
prominent summary with the command that retries them, and :func:`raise_if_failed` turns an all-failed run into
an error after its records are written. Every JSON file is strict (no NaN / Infinity, :mod:`eval.jsonio`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .benchmarks.base import Benchmark, Sample
from .fingerprint import check_fingerprint
from .jsonio import dumps, loads, write_json_atomic, write_text_atomic
from .lock import output_lock

__all__ = ["run_benchmark", "read_predictions", "check_record", "check_predictions", "check_run_settings", "summarise",
           "check_output_dir", "has_predictions", "failure_summary", "raise_if_failed", "RunFailedError"]

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"

# (prompts, visual inputs per sample, max_new_tokens) -> (answers, visual tokens per sample)
Generate = Callable[[list[str], list[list], int], tuple[list[str], list[int]]]


def read_predictions(path: str | os.PathLike, *, repair: bool = True) -> list[dict]:
    """Validated records of a ``predictions.jsonl``; a torn last line (a run killed mid-write) is dropped.

    Args:
        path: the file (a missing file has no records).
        repair: cut the torn last line off the file (with a warning) so appending continues cleanly; False
            only skips it (a read-only check).

    Raises:
        ValueError: a line other than the last is not UTF-8, not JSON, or not a valid record (see
            :func:`check_record`); the message names ``<path>:<line>``, what is wrong and what to do. Raised
            before any work, so a resumed run never counts a broken line as done.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()  # the newline that ends the last record
    records = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}:{i}"
        try:
            record = loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            if i == len(lines):
                logger.warning("%s is incomplete (run interrupted while writing); it will be redone", where)
                if repair:
                    _truncate_last_line(path)
                break
            what = "UTF-8 text" if isinstance(err, UnicodeDecodeError) else "valid JSON"
            raise ValueError(f"{where} is not {what} ({err}); {_FIX_LINE}") from err
        check_record(record, where)
        records.append(record)
    return records


_FIX_LINE = ("fix or delete that line (a deleted sample is evaluated again on resume), or move the file away "
             "and start over.")

# field -> (allowed types, description); bool is excluded from the numbers explicitly below
_RECORD_FIELDS = {
    "id": ((str, int), "a string"),
    "question": ((str,), "a string"),
    "prediction": ((str, type(None)), "a string (null when the sample failed)"),
    "answers": ((list,), "a list of strings"),
    "answer_type": ((str,), "a string"),
    "meta": ((dict,), "an object"),
    "visual_tokens": ((int, type(None)), "an integer >= 0 or null"),
    "seconds": ((int, float, type(None)), "a number >= 0 or null"),
}


def check_record(record: Any, where: str = "record") -> None:
    """Raise unless ``record`` has the shape the runner writes (:func:`_record`), so scoring can read it.

    Fields: ``id`` (string or int), ``question`` / ``answer_type`` (strings), ``prediction`` (string; null
    exactly when the record has an ``error`` string), ``answers`` (list of strings), ``meta`` (object),
    ``visual_tokens`` (int >= 0 or null), ``seconds`` (number >= 0 or null); optional ``error`` (string)
    and ``rank`` (int).

    Raises:
        ValueError: naming ``where`` (e.g. ``<file>:<line>``), the field and what it must be.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a JSON {type(record).__name__}, not a prediction record (an object with "
                         f"{', '.join(_RECORD_FIELDS)}); {_FIX_LINE}")
    missing = [k for k in _RECORD_FIELDS if k not in record]
    if missing:
        raise ValueError(f"{where} is missing {', '.join(missing)}: not a prediction record written by the "
                         f"runner; {_FIX_LINE}")
    for key, (types, description) in _RECORD_FIELDS.items():
        value = record[key]
        bad = isinstance(value, bool) or not isinstance(value, types)
        if not bad and isinstance(value, (int, float)) and key in ("visual_tokens", "seconds"):
            bad = value < 0  # NaN cannot get here: loads() refuses it
        if not bad and key == "answers":
            bad = not all(isinstance(a, str) for a in value)
        if bad:
            raise ValueError(f"{where}: {key} must be {description}, got {value!r}; {_FIX_LINE}")
    error = record.get("error")
    if error is not None and not isinstance(error, str):
        raise ValueError(f"{where}: error must be a string, got {error!r}; {_FIX_LINE}")
    if (error is None) != isinstance(record["prediction"], str):
        raise ValueError(f"{where}: a record has a prediction string or an error string, not "
                         f"{'both' if error is not None else 'neither'}; {_FIX_LINE}")
    rank = record.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise ValueError(f"{where}: rank must be an integer, got {rank!r}; {_FIX_LINE}")


def check_predictions(output_dir: str | os.PathLike) -> int:
    """Validate every prediction file in ``output_dir`` without changing it (call before any work on resume).

    Returns:
        The number of records read.

    Raises:
        ValueError: a broken line (see :func:`read_predictions`), naming ``<file>:<line>``.
    """
    output_dir = Path(output_dir)
    files = [output_dir / PREDICTIONS, *sorted(output_dir.glob("predictions.rank*.jsonl"))]
    return sum(len(read_predictions(f, repair=False)) for f in files)


def _truncate_last_line(path: Path) -> None:
    data = path.read_bytes()
    cut = data.rstrip(b"\n").rfind(b"\n")
    path.write_bytes(data[: cut + 1] if cut >= 0 else b"")


class RunFailedError(RuntimeError):
    """Every sample of a run failed: its records are written, but there is no result."""


FIRST_ERRORS = 3  # distinct error messages kept in metrics.json and the end-of-run summary


def failure_summary(records: Sequence[dict], limit: int = FIRST_ERRORS) -> dict[str, Any]:
    """``{"count": failed samples, "first_errors": [up to limit distinct messages, in sample order], "ids": [...]}``.

    The first 20 failed ids are kept (``ids``) so a user can look at them in ``predictions.jsonl``."""
    failed = [r for r in records if r.get("error")]
    distinct: list[str] = []
    for r in failed:
        if r["error"] not in distinct and len(distinct) < limit:
            distinct.append(r["error"])
    return {"count": len(failed), "first_errors": distinct, "ids": [r["id"] for r in failed[:20]]}


def summarise(records: Sequence[dict], benchmark: Benchmark, expected: int | None = None) -> dict[str, Any]:
    """``metrics.json`` content: status, sample count, failures, visual token stats, metrics, seconds per sample.

    ``status`` is ``"complete"`` (every expected sample answered), ``"incomplete"`` (some failed or are missing) or
    ``"failed"`` (no sample answered); statistics over no value are ``None``, never NaN.

    Args:
        records: this run's records (one per sample).
        benchmark: the task (its ``score``).
        expected: samples the run should have (default: ``len(records)``).
    """
    tokens = [r["visual_tokens"] for r in records if r.get("visual_tokens") is not None]
    seconds = [r["seconds"] for r in records if r.get("seconds") is not None]
    mean = sum(tokens) / len(tokens) if tokens else None
    std = math.sqrt(sum((t - mean) ** 2 for t in tokens) / len(tokens)) if tokens else None
    metrics = benchmark.score(list(records))
    failed = failure_summary(records)
    expected = len(records) if expected is None else expected
    answered = len(records) - failed["count"]
    if answered == expected == len(records):
        status = "complete"
    elif answered == 0:
        status = "failed"
    else:
        status = "incomplete"
    return {
        "benchmark": benchmark.name,
        "status": status,
        "n_samples": len(records),
        "n_failed": failed["count"],
        "n_expected": expected,
        "failed": failed,
        "visual_tokens": {
            "mean": mean,
            "std": std,
            "min": min(tokens) if tokens else None,
            "max": max(tokens) if tokens else None,
        },
        "metrics": metrics,
        "pending": sorted(name for name, value in metrics.items() if value is None),
        "seconds_per_sample": sum(seconds) / len(seconds) if seconds else None,
    }


def _record(sample: Sample, prediction: str | None, tokens: int | None, seconds: float, error: str | None) -> dict:
    record = {
        "id": sample.id,
        "question": sample.question,
        "prediction": prediction,
        "answers": sample.answers,
        "answer_type": sample.answer_type,
        "meta": sample.meta,
        "visual_tokens": tokens,
        "seconds": seconds,
    }
    if error is not None:
        record["error"] = error
    return record


def _dist() -> tuple[int, int]:
    """``(rank, world size)`` of an initialised torch.distributed group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def has_predictions(output_dir: str | os.PathLike) -> bool:
    """True if ``output_dir`` holds a non-empty ``predictions.jsonl`` or rank file (of an interrupted
    data-parallel run). An empty file (a run that stopped before its first sample) holds nothing to protect."""
    output_dir = Path(output_dir)
    files = [output_dir / PREDICTIONS, *output_dir.glob("predictions.rank*.jsonl")]
    return any(f.is_file() and f.stat().st_size > 0 for f in files)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_run_settings(*, batch_size: Any = 1, limit: Any = None, resume: Any = True, retry_failed: Any = False,
                       max_new_tokens: Any = None) -> None:
    """Check the runner's settings by type and range, before any work (a wrong value names its key).

    Raises:
        ValueError: ``batch_size`` is not an int >= 1, ``limit`` not None or an int >= 0, ``max_new_tokens``
            not None or an int >= 1, or ``resume`` / ``retry_failed`` not a bool (a string such as ``"no"``
            would read as true).
    """
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (samples per generate call), got {batch_size!r}.")
    if limit is not None and (not _is_int(limit) or limit < 0):
        raise ValueError(f"limit must be null (all samples) or an integer >= 0, got {limit!r}.")
    if max_new_tokens is not None and (not _is_int(max_new_tokens) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be null (the benchmark's own) or an integer >= 1, got "
                         f"{max_new_tokens!r}.")
    for key, value in (("resume", resume), ("retry_failed", retry_failed)):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r} ({type(value).__name__}).")


def check_output_dir(output_dir: str | os.PathLike, resume: bool) -> None:
    """Refuse to start over predictions of an earlier run unless resuming (call it before any work).

    Raises:
        FileExistsError: ``predictions.jsonl`` (or a rank file) exists in ``output_dir`` and ``resume`` is False.
    """
    pred_path = Path(output_dir) / PREDICTIONS
    if not resume and has_predictions(output_dir):
        raise FileExistsError(f"{pred_path} exists; pass resume=true to continue it (nothing is overwritten), or "
                              "choose another output_dir.")


def run_benchmark(
    generate: Generate,
    benchmark: Benchmark,
    output_dir: str | os.PathLike,
    *,
    batch_size: int = 1,
    limit: int | None = None,
    resume: bool = True,
    progress: bool = True,
    on_record: Callable[[dict], None] | None = None,
    retry_failed: bool = False,
    fingerprint: dict | None = None,
    retry_command: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``benchmark`` with ``generate`` and write ``predictions.jsonl`` and ``metrics.json``.

    Resumable: finished samples are appended (flushed, fsynced) as they come, and a run started again with the
    same ``output_dir`` evaluates only what is missing. Data-parallel under an initialised torch.distributed
    group (e.g. ``torchrun``): the missing samples are split over the ranks (every one evaluated exactly once),
    each rank appends to its own ``predictions.rank<k>.jsonl``, and rank 0 gathers the records, writes the
    merged ``predictions.jsonl`` (in benchmark order) and ``metrics.json``, and removes the rank files. Every
    rank returns the metrics.

    Args:
        generate: ``(prompts, visual inputs per sample, max_new_tokens) -> (answers, visual tokens per sample)``.
        benchmark: the task (samples, prompt, score).
        output_dir: where the files go (shared by all ranks).
        batch_size: samples per ``generate`` call.
        limit: evaluate only the first ``limit`` samples.
        resume: continue existing predictions; if False and predictions exist, refuse.
        progress: tqdm bar (rank 0).
        on_record: called with each new record of this rank (e.g. to log to wandb).
        retry_failed: evaluate again the samples recorded with an error (default: keep them as recorded);
            their new records replace the old ones in ``predictions.jsonl``.
        fingerprint: the run's prediction settings (:func:`eval.fingerprint.experiment_fingerprint`); checked
            against the folder's ``fingerprint.json`` before resuming, and recorded there.
        retry_command: the command that re-runs failed samples (shown in the end-of-run summary).

    Returns:
        The metrics dict (also written to ``metrics.json``); ``status`` tells whether the run is complete.

    Raises:
        ValueError: a setting of the wrong type or range (:func:`check_run_settings`), or a broken line in the
            existing predictions (:func:`read_predictions`); both before any sample runs.
        FileExistsError: predictions exist and ``resume`` is False.
        eval.lock.OutputLockedError: another process is writing into ``output_dir``.
        eval.fingerprint.FingerprintMismatch: the folder holds predictions made with other settings.
    """
    check_run_settings(batch_size=batch_size, limit=limit, resume=resume, retry_failed=retry_failed)
    rank, world = _dist()
    with output_lock(output_dir) if rank == 0 else nullcontext():  # reentrant: eval.main may hold it already
        return _run_locked(generate, benchmark, Path(output_dir), batch_size, limit, resume, progress, on_record,
                           retry_failed, fingerprint, retry_command, rank, world)


def _run_locked(generate, benchmark, output_dir: Path, batch_size, limit, resume, progress, on_record, retry_failed,
                fingerprint, retry_command, rank: int, world: int) -> dict[str, Any]:
    check_output_dir(output_dir, resume)
    output_dir.mkdir(parents=True, exist_ok=True)
    pred_path = output_dir / PREDICTIONS
    existing = [pred_path, *sorted(output_dir.glob("predictions.rank*.jsonl"))]
    samples = benchmark.samples()
    if limit is not None:
        samples = samples[:limit]
    wanted = {s.id for s in samples}
    on_disk = {r["id"]: r for p in existing for r in read_predictions(p)}  # a later line wins (a retried sample)
    if fingerprint is not None:
        check_fingerprint(output_dir, fingerprint, has_records=bool(on_disk), write=rank == 0)
    records = {i: r for i, r in on_disk.items() if i in wanted}
    failed_before = sum(1 for r in records.values() if r.get("error"))
    retried = [i for i, r in records.items() if r.get("error")] if retry_failed else []
    for i in retried:
        del records[i]
    if retried and rank == 0:
        logger.info("retrying %d failed samples", len(retried))
    todo = [s for s in samples if s.id not in records]
    if records and rank == 0:
        logger.info("resuming: %d of %d samples already in %s (%d of them recorded as failed%s)", len(records) +
                    len(retried), len(samples), output_dir, failed_before + len(retried),
                    ": retrying them" if retried else "; retry_failed=true evaluates them again" if failed_before else "")
    mine = todo[rank::world]  # every rank read the same files, so the shards are disjoint and complete
    own_path = pred_path if world == 1 else output_dir / f"predictions.rank{rank}.jsonl"
    new = []
    with open(own_path, "ab", buffering=0) as out, tqdm(  # unbuffered: a failed write leaves nothing to flush
        total=len(samples), initial=len(records), desc=f"eval {benchmark.name}", unit="sample",
        disable=not progress or rank != 0,
    ) as bar:
        for start in range(0, len(mine), batch_size):
            batch = mine[start : start + batch_size]
            for record in _run_batch(generate, benchmark, batch):
                if world > 1:
                    record["rank"] = rank
                try:
                    line = memoryview((dumps(record) + "\n").encode("utf-8"))
                    while line:  # a raw write may take part of the line
                        line = line[out.write(line):]
                    os.fsync(out.fileno())
                except OSError as err:  # ENOSPC / EFBIG / EIO name no file on their own
                    raise OSError(err.errno, f"cannot write {own_path} ({err.strerror or err}); free disk space "
                                  "or fix the folder's permissions, then re-run: the records already written are "
                                  "kept and the run resumes after them.") from err
                new.append(record)
                if on_record is not None:
                    on_record(record)
            bar.update(len(batch) * world)  # rank 0's view of the whole run
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world if rank == 0 else None
        dist.gather_object(new, gathered, dst=0)
        new = [r for part in (gathered or []) for r in part]
    metrics = None
    if rank == 0:
        records.update({r["id"]: r for r in new})
        order = {s.id: i for i, s in enumerate(samples)}
        ordered = sorted(records.values(), key=lambda r: order[r["id"]])
        rank_files = sorted(output_dir.glob("predictions.rank*.jsonl"))  # all ranks are past the gather
        if rank_files or retried:  # one predictions.jsonl, one line per sample; records beyond `limit` are kept
            kept = sorted({**on_disk, **records}.values(), key=lambda r: order.get(r["id"], len(order)))
            write_text_atomic(pred_path, "".join(dumps(r) + "\n" for r in kept))
            for path in rank_files:
                path.unlink()
        metrics = summarise(ordered, benchmark, expected=len(samples))
        write_json_atomic(output_dir / METRICS, metrics)
        if metrics["status"] != "complete":
            logger.warning(_failure_banner(metrics, output_dir, retry_command))
    if world > 1:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def _failure_banner(metrics: dict, output_dir: Path, retry_command: str | None) -> str:
    """The end-of-run summary of a run with failures (count, first distinct errors, how to retry)."""
    failed, n = metrics["failed"], metrics["n_expected"]
    rule = "=" * 78
    lines = [rule, f"{metrics['status'].upper()}: {failed['count']} of {n} samples FAILED in {output_dir} "
             f"({metrics['n_samples']} recorded); the metrics cover only the samples that ran."]
    lines += [f"  error: {e}" for e in failed["first_errors"]]
    if failed["count"] > len(failed["first_errors"]):
        lines.append(f"  (every failed record, with its error, is in {output_dir / PREDICTIONS})")
    if failed["count"]:
        lines.append("Fix the cause, then retry the failed samples with: "
                     + (retry_command or "the same command plus retry_failed=true"))
    lines.append(rule)
    return "\n".join(lines)


def raise_if_failed(metrics: dict, output_dir: str | os.PathLike) -> None:
    """Raise when no sample of the run was answered (its records and ``metrics.json`` are already written).

    Raises:
        RunFailedError: ``metrics["status"] == "failed"``; the message gives the first errors.
    """
    if metrics.get("status") == "failed":
        errors = "; ".join(metrics["failed"]["first_errors"]) or "no sample was evaluated"
        raise RunFailedError(f"all {metrics['n_expected']} samples failed ({errors}); the failed records are in "
                             f"{Path(output_dir) / PREDICTIONS}.")


def _run_batch(generate: Generate, benchmark: Benchmark, batch: list[Sample]) -> list[dict]:
    """Generate for a batch; if it fails, retry sample by sample so one bad sample fails alone."""
    start = time.perf_counter()
    try:  # reading a sample's inputs (a video's frames, ...) can fail too: that sample alone is recorded
        prompts = [benchmark.prompt(s) for s in batch]
        inputs = [benchmark.visual_inputs(s) for s in batch]
        answers, tokens = generate(prompts, inputs, benchmark.max_new_tokens)
        if len(answers) != len(batch) or len(tokens) != len(batch):
            raise RuntimeError(f"generate returned {len(answers)} answers and {len(tokens)} token counts for "
                               f"{len(batch)} samples")
        seconds = (time.perf_counter() - start) / len(batch)
        return [_record(s, a, t, seconds, None) for s, a, t in zip(batch, answers, tokens)]
    except Exception as err:  # noqa: BLE001 - recorded per sample below
        if len(batch) == 1:
            logger.warning("sample %s failed: %s: %s", batch[0].id, type(err).__name__, err)
            return [_record(batch[0], None, None, time.perf_counter() - start, f"{type(err).__name__}: {err}")]
    return [r for s in batch for r in _run_batch(generate, benchmark, [s])]
