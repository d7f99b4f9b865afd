"""The testbed benchmark: generated visual questions with one-word answers (:mod:`eval.testbed.data`).

The questions of a split (test by default) are generated deterministically from image seeds on first use and written
to ``data_dir`` (PNG images + ``questions.jsonl`` + ``meta.json``), then read back like any local benchmark. Five
question types: shape, color, count, position (left / right) and exists (yes / no). Questions are asked exactly as
generated, with no answer-format instruction: the testbed's projector was trained on them that way
(:mod:`eval.testbed.train`).

Metrics, in percent: ``accuracy`` over every question, and ``accuracy_<type>`` per question type. A prediction is
right when its normalised form (:func:`eval.metrics.normalize_answer`) equals the answer; for exists questions, when
its first yes / no word does.
"""

from __future__ import annotations

import logging
from pathlib import Path

from eval.benchmarks.base import Benchmark, Sample, check_limit, data_path, iter_jsonl
from eval.metrics import exact_match, mean, yes_no_match
from eval.testbed import data as tdata

__all__ = ["TestbedBenchmark"]

logger = logging.getLogger(__name__)

_KEYS = ("question_id", "image", "question", "answer", "type")


class TestbedBenchmark(Benchmark):
    """Generated shape / color / count / position / exists questions over ``num_images`` images of a split.

    Args:
        data_dir: where the split is written on first use and read from (e.g. ``<cache>/testbed_data/test-200``).
        split: ``"test"`` (default), ``"val"`` or ``"train"`` (:data:`eval.testbed.data.SPLITS`).
        num_images: images of the split, from image 0 (about 4.8 questions each).
        limit: keep only the first ``limit`` questions (all when None).

    Raises:
        ValueError: an unknown split or a negative count; a malformed ``questions.jsonl`` (file and line named).
        FileExistsError: ``data_dir`` holds another split or count (:func:`eval.testbed.data.write_split`).
    """

    name = "testbed"
    max_new_tokens = 4

    def __init__(self, data_dir: str, split: str = "test", num_images: int = 200, limit: int | None = None) -> None:
        check_limit(limit)
        self.data_dir = Path(data_dir)
        path = tdata.write_split(self.data_dir, split, num_images)
        samples = []
        for line_number, where, row in iter_jsonl(path):
            missing = [k for k in _KEYS if k not in row]
            if missing:
                raise ValueError(f"{where}: missing key(s) {missing}; regenerate the split (delete {self.data_dir})")
            if row["type"] not in tdata.QUESTION_TYPES:
                raise ValueError(f"{where}: unknown question type {row['type']!r}; expected one of "
                                 f"{tdata.QUESTION_TYPES}")
            image = data_path(path.parent, row["image"], self.data_dir, where)
            samples.append(Sample(id=row["question_id"], image_paths=[str(image)], question=row["question"],
                                  answers=[row["answer"]], answer_type=row["type"],
                                  meta={"type": row["type"], "background": row.get("background"),
                                        "num_shapes": row.get("num_shapes")}))
        self._samples = samples[:limit] if limit is not None else samples
        logger.info("testbed: %d questions over %d %s images in %s", len(self._samples), num_images, split,
                    self.data_dir)

    def prompt(self, sample: Sample) -> str:
        """The question as generated (the projector was trained on exactly these)."""
        return sample.question

    def score(self, records: list[dict]) -> dict[str, float]:
        """Accuracy in percent overall and per question type (types without records are left out); a failed sample
        (prediction None) counts as wrong.

        Raises:
            ValueError: no records, or a record of an unknown type.
        """
        by_type: dict[str, list[float]] = {t: [] for t in tdata.QUESTION_TYPES}
        for record in records:
            qtype = record["answer_type"]
            if qtype not in by_type:
                raise ValueError(f"record {record.get('id')!r} has type {qtype!r}; expected one of "
                                 f"{tdata.QUESTION_TYPES}")
            match = yes_no_match if qtype == "exists" else exact_match
            by_type[qtype].append(match(record["prediction"], record["answers"]))
        every = [v for values in by_type.values() for v in values]
        metrics = {"accuracy": 100.0 * mean(every)}
        metrics.update({f"accuracy_{t}": 100.0 * mean(v) for t, v in by_type.items() if v})
        return metrics
