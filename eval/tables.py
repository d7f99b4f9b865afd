"""Result tables in the paper's layout: method, visual tokens (mean ± std), one column per benchmark, average.

Runs are read from ``<root>/<model>/<run>/<benchmark>/metrics.json`` (the layout ``scripts/eval.py`` writes);
the paper's LLaVA-1.5-7B rows (DyMU paper Table 1, as in ``docs/dymu-method.md`` Sec. 5) are printed beside ours.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["COLUMNS", "PAPER_LLAVA15", "Row", "collect", "paper_rows", "to_markdown", "to_csv", "write_tables"]

# (column title, benchmark name, metric key in metrics.json, scale to percent for the average or None to skip)
COLUMNS: list[tuple[str, str, str, float | None]] = [
    ("GQA", "gqa", "accuracy", 1.0),
    ("MMB", "mmbench", "accuracy", 1.0),
    ("MME-P", "mme", "perception", 100 / 2000),  # perception is out of 2000
    ("MME", "mme", "total", None),
    ("POPE", "pope", "f1", 1.0),
    ("SQA-I", "scienceqa", "accuracy", 1.0),
    ("SEED-I", "seed", "accuracy", 1.0),
    ("TextVQA", "textvqa", "accuracy", 1.0),
    ("MM-Vet", "mmvet", "mm_vet", 1.0),
    ("LLaVA-W", "llava_bench", "llava_wild", 1.0),
    ("Video-MME", "videomme", "accuracy", 1.0),
    ("Sample", "sample", "accuracy", 1.0),
]
AVERAGE_NOTE = ("Avg (ours): mean of the percent-scale columns present, MME perception as % of 2000. The paper's "
                "Avg is copied as printed.")

# DyMU paper, Table 1 (LLaVA-1.5-7B); MME as (perception, total).
PAPER_LLAVA15 = [
    ("LLaVA-1.5-7B", "576", [62.0, 64.6, 1506, 1862, 86.9, 69.4, 66.2, 58.3, 30.7, 63.5], 55.8),
    ("ToMe", "94", [57.3, 59.7, 1357, 1673, 86.8, 68.9, 60.5, 53.2, 25.6, 61.0], 52.6),
    ("ToMe", "209", [59.2, 62.4, 1418, 1734, 87.4, 69.2, 63.5, 54.9, 30.9, 62.9], 54.6),
    ("ToMe", "393", [59.5, 64.1, 1454, 1769, 86.7, 68.4, 65.1, 55.8, 30.8, 66.0], 55.2),
    ("DyMU-low", "89 ± 27", [60.8, 62.1, 1438, 1787, 86.3, 69.3, 65.0, 53.1, 30.0, 62.9], 54.5),
    ("DyMU-mid", "195 ± 47", [61.7, 62.8, 1483, 1862, 86.6, 69.2, 65.9, 55.1, 30.9, 65.1], 55.3),
    ("DyMU-high", "394 ± 57", [61.9, 64.3, 1498, 1846, 86.8, 69.9, 66.1, 58.0, 31.5, 64.5], 56.0),
]


@dataclass
class Row:
    """One table row: a method and its values per column title (None: not run / pending)."""

    method: str
    tokens: str
    values: dict[str, float | None] = field(default_factory=dict)
    average: float | None = None
    source: str = "ours"
    incomplete: dict[str, str] = field(default_factory=dict)  # column title -> "k of n failed" (a run with failures)


def _pooled_tokens(metrics: Iterable[dict]) -> str:
    """Visual tokens mean ± std pooled over benchmarks (each weighted by its sample count)."""
    n = total = squares = 0.0
    for m in metrics:
        k, t = m.get("n_samples") or 0, m.get("visual_tokens") or {}
        if not k or not all(isinstance(t.get(key), (int, float)) and math.isfinite(t[key]) for key in ("mean", "std")):
            continue  # no answered sample (older files wrote NaN there)
        n += k
        total += k * t["mean"]
        squares += k * (t["std"] ** 2 + t["mean"] ** 2)
    if not n:
        return "-"
    mean = total / n
    return f"{mean:.0f} ± {math.sqrt(max(squares / n - mean * mean, 0.0)):.0f}"


def collect(root: str | os.PathLike, model: str | None = None) -> list[Row]:
    """Our rows: one per ``<model>/<run>`` folder under ``root`` (e.g. ``outputs/eval``), sorted by name.

    A ``metrics.json`` that cannot be read (torn by a kill, not JSON, not an object) is skipped with a warning
    naming it, and its cells stay empty; the other runs are tabled.

    Raises:
        FileNotFoundError: ``root`` does not exist or holds no ``metrics.json``.
        ValueError: no ``metrics.json`` under ``root`` can be read (each is named).
    """
    root = Path(root)
    files = sorted(root.glob("*/*/*/metrics.json"))
    if model is not None:
        files = [f for f in files if f.parts[-4] == model]
    if not files:
        raise FileNotFoundError(f"no <model>/<run>/<benchmark>/metrics.json under {root}; run scripts/eval.py first.")
    runs: dict[tuple[str, str], dict[str, dict]] = {}
    skipped = []
    for f in files:
        try:
            metrics = json.loads(f.read_text(encoding="utf-8"))  # lenient: older files may hold NaN
        except (OSError, UnicodeDecodeError, ValueError) as err:  # torn by a kill, hand-edited, unreadable
            skipped.append(f"{f} ({err})")
            continue
        if not isinstance(metrics, dict):
            skipped.append(f"{f} (a JSON {type(metrics).__name__}, not a metrics object)")
            continue
        runs.setdefault((f.parts[-4], f.parts[-3]), {})[f.parts[-2]] = metrics
    for line in skipped:
        logger.warning("skipped unreadable %s; its cell stays empty. Re-run that evaluation (it resumes from "
                       "predictions.jsonl and rewrites metrics.json).", line)
    if not runs:
        raise ValueError(f"every metrics.json under {root} is unreadable: {'; '.join(skipped)}")
    rows = []
    for (model_name, run), per_benchmark in sorted(runs.items()):
        row = Row(method=f"{model_name} {run}", tokens=_pooled_tokens(per_benchmark.values()))
        scaled = []
        for title, benchmark, key, scale in COLUMNS:
            metrics = per_benchmark.get(benchmark, {})
            value = metrics.get("metrics", {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):  # an older metrics.json with NaN
                value = None
            row.values[title] = value
            note = _incomplete(metrics)
            if note:
                row.incomplete[title] = note
            if value is not None and scale is not None:
                scaled.append(value * scale)
        row.average = sum(scaled) / len(scaled) if scaled else None
        rows.append(row)
    return rows


def _incomplete(metrics: dict) -> str | None:
    """``"k of n failed"`` for a run that did not answer every sample (also for files written before ``status``)."""
    if not metrics:
        return None
    failed = metrics.get("n_failed") or 0
    expected = metrics.get("n_expected", metrics.get("n_samples") or 0)
    if metrics.get("status", "complete") == "complete" and not failed:
        return None
    return f"{failed} of {expected} failed"


def paper_rows() -> list[Row]:
    """The paper's LLaVA-1.5-7B rows in the same columns."""
    titles = [title for title, *_ in COLUMNS if title not in ("Video-MME", "Sample")]
    return [Row(method=f"{method} (paper)", tokens=tokens, values=dict(zip(titles, values)), average=avg,
                source="paper") for method, tokens, values, avg in PAPER_LLAVA15]


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 200 else f"{value:.1f}"


def _columns(rows: list[Row]) -> list[str]:
    """Column titles that have a value, or a run with failures, in at least one row (in COLUMNS order)."""
    return [title for title, *_ in COLUMNS
            if any(r.values.get(title) is not None or title in r.incomplete for r in rows)]


def _cell(row: Row, column: str) -> str:
    """A value; ``FAILED`` for a run with no answer; ``value *`` for a run with failed samples (footnoted)."""
    value = row.values.get(column)
    if column not in row.incomplete:
        return _fmt(value)
    return f"FAILED ({row.incomplete[column]})" if value is None else f"{_fmt(value)} * ({row.incomplete[column]})"


def to_markdown(rows: list[Row]) -> str:
    """A Markdown table (only columns with at least one value) with the averaging note below it.

    Runs with failed samples are marked in their cell (``61.2 * (3 of 29 failed)``, or ``FAILED`` when no sample
    was answered) and footnoted, so a partial result never reads as a complete one."""
    columns = _columns(rows)
    lines = ["| Method | # visual tokens | " + " | ".join(columns) + " | Avg |",
             "|---|---|" + "---|" * (len(columns) + 1)]
    for r in rows:
        cells = [_cell(r, c) for c in columns]
        average = _fmt(r.average) + (" *" if r.incomplete and r.average is not None else "")
        lines.append(f"| {r.method} | {r.tokens} | " + " | ".join(cells) + f" | {average} |")
    note = AVERAGE_NOTE
    if any(r.incomplete for r in rows):
        note += ("\n\n\\* incomplete run: the value covers only the samples that did not fail; fix the errors "
                 "(predictions.jsonl) and re-run with retry_failed=true.")
    return "\n".join(lines) + f"\n\n{note}\n"


def to_csv(rows: list[Row]) -> str:
    """The same table as CSV (empty cells where a value is missing; ``incomplete`` lists runs with failures)."""
    columns = _columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "source", "visual_tokens", *columns, "avg", "incomplete"])
    for r in rows:
        writer.writerow([r.method, r.source, r.tokens, *("" if r.values.get(c) is None else r.values[c] for c in columns),
                         "" if r.average is None else r.average,
                         "; ".join(f"{c}: {note}" for c, note in r.incomplete.items())])
    return buffer.getvalue()


def write_tables(root: str | os.PathLike, out_dir: str | os.PathLike, model: str | None = None,
                 with_paper: bool = True) -> tuple[Path, Path]:
    """Collect runs under ``root`` and write ``<out_dir>/results[_<model>].md`` and ``.csv``.

    Returns:
        The Markdown and CSV paths.
    """
    rows = (paper_rows() if with_paper else []) + collect(root, model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "results" if model is None else f"results_{model}"
    md, csv_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    md.write_text(to_markdown(rows), encoding="utf-8")
    csv_path.write_text(to_csv(rows), encoding="utf-8")
    return md, csv_path
