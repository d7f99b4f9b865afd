"""Multiple-choice helpers shared by MMBench, ScienceQA and SEED-Bench: prompts, answer extraction, accuracy.

Pure functions over strings (no I/O, no torch).

Options are an ordered ``dict`` from option letter to option text, e.g. ``{"A": "cat", "B": "dog"}``;
the letters are always ``A, B, C, ...`` in order.

Answer extraction (:func:`extract_choice`) is rule based, tried in this order:

1. a lone option letter at the start of the prediction: ``"B"``, ``"(B)"``, ``"[B]"``, ``"B."``,
   ``"B)"``, ``"B:"``, ``"B,"``, possibly followed by more text (``"(C) cat"``). A capital letter
   followed by a space and a word (``"A cat sits"``) is *not* taken as a letter: it reads as an article;
2. ``"the answer is B"`` / ``"Answer: (B)"`` anywhere in the prediction ("answer" in any case, the
   letter a capital);
3. the one option whose text occurs in the prediction as a whole word or phrase, case-insensitively
   (an option whose text lies inside another matching option's text, e.g. "cat" in "cat food", does
   not count against that longer option);
4. otherwise ``None``: the prediction names no option, or several (it is scored as wrong).

A letter that is not one of the options (``"E"`` with four options) is ignored by rules 1 and 2.
The rules are deterministic: unlike LLaVA's ScienceQA scorer, an unreadable answer is never
replaced by a random option, and unlike MMBench's official evaluator no LLM judge is asked.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence

from eval.benchmarks.base import Sample
from eval.metrics import mean

__all__ = [
    "MULTIPLE_CHOICE_PROMPT",
    "accuracy_by",
    "extract_choice",
    "format_options",
    "options_from_list",
    "percent",
    "sample_of",
]

# LLaVA-1.5's instruction for multiple-choice questions (MMBench, ScienceQA, SEED-Bench), appended to the
# question and its options: `--single-pred-prompt` in LLaVA-1.5's evaluation scripts (llava/eval/
# model_vqa_mmbench.py, model_vqa_science.py) and the SEED-Bench question file of its evaluation docs.
MULTIPLE_CHOICE_PROMPT = "\nAnswer with the option's letter from the given choices directly."

LETTERS = string.ascii_uppercase

# Rule 1: "(B)", "[B]", or "B" followed by ".", ")", ":", ",", or by nothing but whitespace.
_LEADING_LETTER = re.compile(r"^\s*(?:\(\s*([A-Z])\s*\)|\[\s*([A-Z])\s*\]|([A-Z])(?:[.):,]|\s*$))")
# Rule 2: "the answer is B", "Answer: (B)", "The correct answer is [C]."
_ANSWER_IS = re.compile(r"(?i:\banswer\s*(?:is|:))\s*:?\s*[(\[]?\s*([A-Z])(?![A-Za-z0-9])")


def options_from_list(choices: Sequence[str]) -> dict[str, str]:
    """Letter the choices in order: ``["cat", "dog"]`` -> ``{"A": "cat", "B": "dog"}``.

    Raises:
        ValueError: more than 26 choices.
    """
    if len(choices) > len(LETTERS):
        raise ValueError(f"{len(choices)} choices; at most {len(LETTERS)} can be lettered A-Z")
    return {letter: choice for letter, choice in zip(LETTERS, choices)}


def format_options(options: Mapping[str, str]) -> str:
    """One option per line as ``"A. cat\\nB. dog"`` (LLaVA-1.5's option format; no trailing newline)."""
    return "\n".join(f"{letter}. {text}" for letter, text in options.items())


def extract_choice(prediction: str | None, options: Mapping[str, str]) -> str | None:
    """The option letter a free-text prediction picks, or None (see the module docstring for the rules).

    ``"B"`` -> ``"B"``; ``"(C) cat"`` -> ``"C"``; ``"The answer is D."`` -> ``"D"``; ``"a dog"`` with
    ``{"A": "cat", "B": "dog"}`` -> ``"B"``; ``"cat or dog"`` -> ``None``; ``None`` -> ``None``.
    """
    if prediction is None:
        return None
    leading = _LEADING_LETTER.match(prediction)
    if leading:
        letter = next(group for group in leading.groups() if group)
        if letter in options:
            return letter
    for found in _ANSWER_IS.finditer(prediction):
        if found.group(1) in options:
            return found.group(1)
    return _option_by_text(prediction, options)


def _option_by_text(prediction: str, options: Mapping[str, str]) -> str | None:
    """Rule 3: the single option whose text occurs in the prediction as a whole phrase (case-insensitive)."""
    matched = {
        letter: text.strip().lower()
        for letter, text in options.items()
        if text.strip() and re.search(rf"(?<!\w){re.escape(text.strip())}(?!\w)", prediction, re.IGNORECASE)
    }
    # "cat" inside "cat food" is no rival of "cat food"; identical texts stay rivals.
    longest = [
        letter
        for letter, text in matched.items()
        if not any(text != other and text in other for other in matched.values())
    ]
    return longest[0] if len(longest) == 1 else None


def percent(values: Iterable[bool | float]) -> float:
    """Mean of 0/1 values in percent (0-100); raises ValueError on no values."""
    return 100.0 * mean(float(value) for value in values)


def accuracy_by(correct: Sequence[bool], keys: Sequence[str], prefix: str) -> dict[str, float]:
    """Accuracy in percent per key, named ``"<prefix>/<key>"``, in sorted key order.

    ``correct`` and ``keys`` are parallel: whether each question was right and its group (category,
    subject, ...). Questions with an empty key are left out.
    """
    if len(correct) != len(keys):
        raise ValueError(f"accuracy_by() got {len(correct)} results but {len(keys)} keys; pass one key per result")
    groups: dict[str, list[bool]] = {}
    for right, key in zip(correct, keys):
        if key:
            groups.setdefault(key, []).append(right)
    return {f"{prefix}/{key}": percent(groups[key]) for key in sorted(groups)}


def sample_of(record: dict, by_id: Mapping[str, Sample], benchmark: str) -> Sample:
    """The sample a prediction record belongs to (records from the runner carry its id, not its ``meta``).

    Raises:
        ValueError: the id is not one of ``by_id`` (predictions of other data, options or limit).
    """
    try:
        return by_id[record["id"]]
    except KeyError:
        raise ValueError(
            f"record id {record.get('id')!r} is not a sample of this {benchmark} benchmark; score predictions "
            "with the benchmark (data, limit, options) that produced them"
        ) from None
