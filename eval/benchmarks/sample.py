"""The packaged offline "sample" benchmark: a few dozen questions about scikit-image photos.

Data lives in ``eval/data/sample``: ``questions.jsonl`` (one JSON object per line with the
keys ``question_id``, ``image``, ``question``, ``answer``, ``answer_type``; extra keys go to
``Sample.meta``) and the images it refers to, relative to the JSONL's folder. Regenerate it
with ``scripts/make_sample_benchmark.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from eval.benchmarks.base import Benchmark, Sample, check_limit, data_path
from eval.metrics import exact_match, mean, normalize_answer, yes_no_match

__all__ = ["SampleBenchmark"]

logger = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "sample"
QUESTIONS_FILE = "questions.jsonl"
REQUIRED_KEYS = ("question_id", "image", "question", "answer", "answer_type")
ANSWER_TYPES = ("yes_no", "short")
# LLaVA-1.5's instruction for short-answer VQA (VQAv2, GQA, POPE, ...).
SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."


class SampleBenchmark(Benchmark):
    """Yes/no and short-answer questions about the photos in ``eval/data/sample``.

    Args:
        data_dir: folder holding ``questions.jsonl`` and its images; defaults to the
            packaged ``eval/data/sample``.
        limit: keep only the first ``limit`` questions (all when None).
        allow_external_images: accept ``image`` paths that lead outside ``data_dir`` (absolute, or
            with ``..``); refused by default.

    Raises:
        FileNotFoundError: ``questions.jsonl`` is missing from ``data_dir``.
        ValueError: a line of ``questions.jsonl`` is malformed, or (without ``allow_external_images``)
            names an image outside ``data_dir``; the message names the file, the line number and what to fix.
    """

    name = "sample"

    def __init__(self, data_dir: str | None = None, limit: int | None = None,
                 allow_external_images: bool = False) -> None:
        check_limit(limit)
        self.allow_external_images = bool(allow_external_images)
        self.data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
        path = self.data_dir / QUESTIONS_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; pass data_dir= a folder containing {QUESTIONS_FILE} "
                "or run scripts/make_sample_benchmark.py to create the packaged one"
            )
        self._samples = _load_questions(path, self.allow_external_images)
        if limit is not None:
            self._samples = self._samples[:limit]
        logger.info("loaded %d samples from %s", len(self._samples), path)


    def prompt(self, sample: Sample) -> str:
        """The question followed by LLaVA-1.5's single-word-or-phrase instruction."""
        return sample.question + SHORT_ANSWER_PROMPT

    def score(self, records: list[dict]) -> dict[str, float]:
        """Accuracy in percent (0-100): overall, on yes/no records and on short-answer records.

        Yes/no records are right when the first "yes"/"no" word of the prediction matches
        the answer; short-answer records when the normalised prediction equals one of the
        answers. A record whose 'prediction' is None (a failed sample) counts as wrong. A
        category with no records is left out of the result.
        """
        by_type: dict[str, list[float]] = {answer_type: [] for answer_type in ANSWER_TYPES}
        for record in records:
            answer_type = record["answer_type"]
            if answer_type not in by_type:
                raise ValueError(
                    f"record {record.get('id')!r} has answer_type {answer_type!r}; "
                    f"expected one of {ANSWER_TYPES}"
                )
            match = yes_no_match if answer_type == "yes_no" else exact_match
            by_type[answer_type].append(match(record["prediction"], record["answers"]))

        metrics = {}
        every = by_type["yes_no"] + by_type["short"]
        if every:
            metrics["accuracy"] = 100.0 * mean(every)
        if by_type["yes_no"]:
            metrics["yes_no_accuracy"] = 100.0 * mean(by_type["yes_no"])
        if by_type["short"]:
            metrics["short_answer_accuracy"] = 100.0 * mean(by_type["short"])
        return metrics


def _load_questions(path: Path, allow_external_images: bool = False) -> list[Sample]:
    """Parse and validate a questions JSONL file; blank lines are skipped."""
    samples: list[Sample] = []
    first_line_of: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            sample = _parse_line(line, path, line_number, allow_external_images)
            if sample.id in first_line_of:
                raise ValueError(
                    f"{path}:{line_number}: duplicate question_id {sample.id!r} "
                    f"(first used on line {first_line_of[sample.id]}); give each question a unique id"
                )
            first_line_of[sample.id] = line_number
            samples.append(sample)
    if not samples:
        raise ValueError(f"{path} holds no questions; add one JSON object per line")
    return samples


def _parse_line(line: str, path: Path, line_number: int, allow_external_images: bool = False) -> Sample:
    """Turn one JSONL line into a ``Sample``, raising ValueError at ``path:line_number`` if invalid (or if its
    image leads outside ``path``'s folder and not ``allow_external_images``)."""
    where = f"{path}:{line_number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc}); write one JSON object per line") from exc
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")

    missing = [key for key in REQUIRED_KEYS if key not in row]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; every line needs {list(REQUIRED_KEYS)}")
    for key in ("question_id", "image", "question"):
        if not isinstance(row[key], str) or not row[key].strip():
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {row[key]!r}")

    answer_type = row["answer_type"]
    if answer_type not in ANSWER_TYPES:
        raise ValueError(
            f"{where}: unknown answer_type {answer_type!r}; use one of {list(ANSWER_TYPES)}"
        )
    answers = [row["answer"]] if isinstance(row["answer"], str) else row["answer"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(
            f"{where}: 'answer' must be a string or a non-empty list of strings, got {row['answer']!r}"
        )
    if answer_type == "yes_no" and any(normalize_answer(a) not in ("yes", "no") for a in answers):
        raise ValueError(f"{where}: a yes_no question needs the answer 'yes' or 'no', got {row['answer']!r}")

    image_path = data_path(path.parent, row["image"], path.parent, where,
                           allow_external=allow_external_images).resolve()
    if not image_path.is_file():
        raise ValueError(
            f"{where}: image file {image_path} does not exist; 'image' is relative to {path.parent}"
        )

    meta = {key: value for key, value in row.items() if key not in REQUIRED_KEYS}
    return Sample(
        id=row["question_id"],
        image_paths=[str(image_path)],
        question=row["question"],
        answers=answers,
        answer_type=answer_type,
        meta=meta,
    )
