"""Answer-matching metrics for short-answer and yes/no VQA benchmarks.

Pure functions over strings and floats (no torch). Scores are fractions in [0, 1];
benchmarks convert them to percentages when they report.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence

__all__ = [
    "exact_match",
    "extract_yes_no",
    "mean",
    "normalize_answer",
    "yes_no_accuracy",
    "yes_no_match",
]

_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_YES_NO = re.compile(r"\b(yes|no)\b")


def _as_list(answers: str | Sequence[str]) -> list[str]:
    """Wrap a single reference answer in a list; pass a sequence of answers through."""
    return [answers] if isinstance(answers, str) else list(answers)


def normalize_answer(text: str) -> str:
    """Canonical form of an answer for matching.

    Lower-cases, strips surrounding whitespace and trailing punctuation, drops the
    articles "a", "an" and "the", maps the number words zero..ten to digits and
    collapses runs of whitespace, e.g. ``"  The Two  Cats. "`` -> ``"2 cats"``.
    """
    text = text.lower().strip().rstrip(string.punctuation + string.whitespace)
    words = [_NUMBER_WORDS.get(word, word) for word in text.split() if word not in _ARTICLES]
    return " ".join(words)


def extract_yes_no(text: str | None) -> str | None:
    """The first whole word "yes" or "no" in the normalised text, or None if there is neither.

    ``"Yes, there is."`` -> ``"yes"``; ``"I don't know"`` -> ``None`` ("know" is not "no").
    """
    if text is None:
        return None
    found = _YES_NO.search(normalize_answer(text))
    return found.group(1) if found else None


def exact_match(prediction: str | None, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference answer, else 0.0.

    ``answers`` is one reference string or a sequence of acceptable ones; a None
    prediction (a failed sample) scores 0.0.
    """
    if prediction is None:
        return 0.0
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(answer) for answer in _as_list(answers)))


def yes_no_match(prediction: str | None, answers: str | Sequence[str]) -> float:
    """1.0 if the yes/no word extracted from the prediction equals a reference answer, else 0.0.

    References are normalised ("Yes." counts as "yes"); a prediction with neither
    word, or None, scores 0.0.
    """
    extracted = extract_yes_no(prediction)
    if extracted is None:
        return 0.0
    return float(any(extracted == normalize_answer(answer) for answer in _as_list(answers)))


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean; raises ValueError on no values rather than returning a silent 0 or NaN."""
    values = list(values)
    if not values:
        raise ValueError("mean() of no values: there is nothing to average")
    return sum(values) / len(values)


def yes_no_accuracy(
    predictions: Sequence[str | None], answers: Sequence[str | Sequence[str]]
) -> float:
    """Fraction of predictions whose yes/no word matches the reference (see ``yes_no_match``).

    ``predictions`` and ``answers`` are parallel sequences of the same, non-zero length.
    """
    if len(predictions) != len(answers):
        raise ValueError(
            f"yes_no_accuracy() got {len(predictions)} predictions but {len(answers)} answers; "
            "pass one reference (or list of references) per prediction"
        )
    return mean(yes_no_match(p, a) for p, a in zip(predictions, answers))
