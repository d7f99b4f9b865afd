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
    answer_type: str  # "yes_no" | "short"
    meta: dict  # anything else from the data file


class Benchmark(abc.ABC):
    """A set of questions with a prompt format and a scoring rule.

    Subclasses set ``name`` and implement ``samples``, ``prompt`` and ``score``.
    """

    name: str

    @abc.abstractmethod
    def samples(self) -> list[Sample]:
        """All samples of the benchmark, in a fixed order."""

    @abc.abstractmethod
    def prompt(self, sample: Sample) -> str:
        """The user turn's text (without the image placeholder), e.g. the question plus an answer-format instruction."""

    @abc.abstractmethod
    def score(self, records: list[dict]) -> dict[str, float]:
        """Metrics from prediction records; each record has at least 'id', 'prediction', 'answers', 'answer_type'."""
