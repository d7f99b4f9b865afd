"""The interface every benchmark implements: samples, their prompts, and scoring."""

from __future__ import annotations

import abc
from dataclasses import dataclass

__all__ = ["Benchmark", "Sample"]


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


class Benchmark(abc.ABC):
    """A set of questions with a prompt format and a scoring rule.

    Subclasses set ``name`` and implement ``samples``, ``prompt`` and ``score``; they may override
    ``max_new_tokens`` (answer length the task needs) and :meth:`visual_inputs` (e.g. video frames).
    """

    name: str
    max_new_tokens: int = 16

    @abc.abstractmethod
    def samples(self) -> list[Sample]:
        """All samples of the benchmark, in a fixed order."""

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
