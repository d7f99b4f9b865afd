"""The interface every benchmark implements: samples, their prompts, and scoring."""

from __future__ import annotations

import abc
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Benchmark", "Sample", "check_limit", "iter_jsonl"]


@dataclass
class Sample:
    """One benchmark question."""

    id: str  # unique within the benchmark
    image_paths: list[str]  # absolute paths of the images the prompt refers to, in order
    question: str  # the question text as in the data file
    answers: list[str]  # acceptable reference answers
    answer_type: str  # task-specific, e.g. "yes_no" | "short" | "multiple_choice" | "open"
    meta: dict  # anything else from the data file (options, category, split, ...)
    video_path: str | None = None  # video tasks: a video file, or a folder of extracted frames


def check_limit(limit: int | None) -> None:
    """Raise ``ValueError`` unless ``limit`` (samples to keep) is None or >= 0."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")


def iter_jsonl(path: Path) -> Iterator[tuple[int, str, dict]]:
    """``(line number, "<path>:<line>", object)`` for every non-blank line of a JSONL file.

    Raises:
        ValueError: a line that is not JSON or not a JSON object (the message names file and line).
    """
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg}); write one JSON object per line") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield line_number, where, row


class Benchmark(abc.ABC):
    """A set of questions with a prompt format and a scoring rule.

    Subclasses set ``name`` and implement ``samples``, ``prompt`` and ``score``; they may override
    ``max_new_tokens`` (answer length the task needs) and :meth:`visual_inputs` (e.g. video frames).
    """

    name: str
    max_new_tokens: int = 16

    def samples(self) -> list[Sample]:
        """All samples of the benchmark (after ``limit``), in a fixed order: those the subclass loaded into
        ``self._samples``."""
        return list(self._samples)

    @abc.abstractmethod
    def prompt(self, sample: Sample) -> str:
        """The user turn's text (without the image placeholder), e.g. the question plus an answer-format instruction."""

    def visual_inputs(self, sample: Sample) -> list:
        """What the model sees for a sample, in placeholder order: image paths (default), or e.g.
        ``llava.Video`` frames for video tasks."""
        return list(sample.image_paths)

    @abc.abstractmethod
    def score(self, records: list[dict]) -> dict[str, float | None]:
        """Metrics from prediction records; each record has 'id', 'prediction', 'answers', 'answer_type' and the
        sample's 'meta' (so scores can be grouped by split / category).

        A metric that cannot be computed yet (e.g. an LLM judge without an API key) is ``None``: reported as
        pending, never as zero.
        """
