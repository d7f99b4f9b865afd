"""Hand-computed cases for the answer-matching metrics in eval.metrics."""

import pytest

from eval.metrics import (
    exact_match,
    extract_yes_no,
    mean,
    normalize_answer,
    yes_no_accuracy,
    yes_no_match,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Cat", "cat"),
        ("  cat  ", "cat"),
        ("Cat.", "cat"),
        ("cat?!", "cat"),
        ("The cat", "cat"),
        ("a cat", "cat"),
        ("an orange", "orange"),
        ("the  big \t red   ball", "big red ball"),
        ("Two", "2"),
        ("zero", "0"),
        ("ten.", "10"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("three cats", "3 cats"),
        ("there are two.", "there are 2"),
        ("theater", "theater"),  # articles are whole words only, not prefixes
        ("anchor", "anchor"),
        ("one-way", "one-way"),  # number words inside a token are kept
        ("3.5", "3.5"),  # only trailing punctuation goes
        ("region-based segmentation", "region-based segmentation"),
        ("", ""),
        ("The.", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yes", "yes"),
        ("Yes, there is.", "yes"),
        ("No.", "no"),
        ("NO", "no"),
        ("I don't know", None),  # "know" contains "no" but is not the word "no"
        ("Nothing is there", None),
        ("None", None),
        ("The answer is no, it is not.", "no"),
        ("Yesterday", None),
        ("no, yes", "no"),  # the first one wins
        ("", None),
        (None, None),
    ],
)
def test_extract_yes_no(text, expected):
    assert extract_yes_no(text) == expected


def test_exact_match_single_and_list_answers():
    assert exact_match("Cat.", "cat") == 1.0
    assert exact_match("The Kitten", ["cat", "kitten"]) == 1.0
    assert exact_match("dog", ["cat", "kitten"]) == 0.0
    assert exact_match("two", "2") == 1.0
    assert exact_match("2", ["Two"]) == 1.0
    assert exact_match("a cat", "cats") == 0.0
    assert exact_match("cat sitting", "cat") == 0.0  # exact, not substring
    assert exact_match(None, "cat") == 0.0
    assert exact_match("", []) == 0.0


def test_yes_no_match():
    assert yes_no_match("Yes, there is.", "yes") == 1.0
    assert yes_no_match("Yes, there is.", "no") == 0.0
    assert yes_no_match("no", ["No."]) == 1.0
    assert yes_no_match("I don't know", "no") == 0.0
    assert yes_no_match(None, "yes") == 0.0


def test_yes_no_accuracy_and_mean():
    predictions = ["Yes.", "no", "I don't know", None, "No, it is not."]
    answers = ["yes", "yes", "no", "no", ["no"]]
    # right, wrong, unparseable, failed, right -> 2 / 5
    assert yes_no_accuracy(predictions, answers) == pytest.approx(0.4)
    assert mean([1.0, 0.0, 0.0, 1.0]) == 0.5
    assert mean(iter([3.0])) == 3.0


def test_empty_and_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="no values"):
        mean([])
    with pytest.raises(ValueError, match="2 predictions but 1 answers"):
        yes_no_accuracy(["yes", "no"], ["yes"])
