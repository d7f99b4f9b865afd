"""The standard VQA accuracy (VQAv2, TextVQA, VizWiz): answer normalisation and leave-one-out scoring.

Pure functions over strings, written from the published description of the official VQA evaluation
(Antol et al., "VQA: Visual Question Answering", ICCV 2015, and the evaluation page of visualqa.org,
"Evaluation": accuracy = min(#humans that said the answer / 3, 1), averaged over all 10 choose 9 sets of
human annotators, after the answer processing listed there). The lists below (punctuation marks, number
words, articles, contractions) are facts taken from the official evaluation script ``vqaEval.py`` of the
VQA API (github.com/GT-Vision-Lab/VQA), as also used by the TextVQA challenge (EvalAI).

One deliberate difference from ``vqaEval.py``: that script normalises the prediction and the references
only when the ten references are not all identical; here they are always normalised, as the TextVQA /
EvalAI answer processor does (LLaVA-1.5's TextVQA numbers use that processor).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "normalize_vqa_answer",
    "vqa_accuracy",
]

# Punctuation marks handled by the official answer processing (vqaEval.py). Periods are handled
# separately (see _strip_punctuation); apostrophes and colons are kept.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# Number words mapped to digits (vqaEval.py's "manualMap"; note that "none" becomes "0").
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

ARTICLES = frozenset({"a", "an", "the"})

# Contractions written without (or with misplaced) apostrophes -> their canonical spelling, from
# vqaEval.py. Its entries with upper-case keys ("Im", "Ive", "Id've", "I'dve") are left out: words are
# lower-cased before this lookup, so they can never match. Its one reversed entry
# ("somebody'd" -> "somebodyd") is kept as it is, for identical scores.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# Number of human answers that make an answer fully correct (the "3" of min(#humans / 3, 1)).
_HUMANS_FOR_FULL_CREDIT = 3


def _strip_punctuation(text: str) -> str:
    """The official punctuation step.

    For each mark of :data:`PUNCTUATION`: if the text has the mark next to a space (``"p "`` or
    ``" p"``), or the text contains a digit-comma-digit group such as ``"1,000"``, every occurrence of
    the mark is deleted; otherwise every occurrence is replaced by a space (so ``"black-white"`` becomes
    two words). The conditions look at the original text. Then every period that is not followed by a
    digit is deleted (``"3.5"`` keeps its period, ``"yes."`` loses it).
    """
    delete_everywhere = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_everywhere or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def normalize_vqa_answer(text: str) -> str:
    """Canonical form of an answer under the official VQA answer processing.

    Steps, in the official order: newlines and tabs become spaces and the ends are stripped;
    punctuation is deleted or turned into spaces (see the rule in ``_strip_punctuation``); the text
    is lower-cased and split into words; number words ("none", "zero" .. "ten") become digits; the
    articles "a", "an", "the" are dropped; contractions written without apostrophes ("dont") get
    their apostrophe ("don't"); the words are joined by single spaces.

    Examples: ``"Two dogs."`` -> ``"2 dogs"``; ``"The Coca-Cola"`` -> ``"coca cola"``;
    ``"1,000"`` -> ``"1000"``; ``"3.5"`` -> ``"3.5"``; ``"dont"`` -> ``"don't"``.
    """
    text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str | None, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers, in [0, 1].

    For each of the ``n`` leave-one-out subsets of the references (``n`` = 10 in VQAv2 and TextVQA),
    the subset's score is ``min(1, #references equal to the prediction / 3)``; the accuracy is the
    mean over the ``n`` subsets. Prediction and references are compared after
    :func:`normalize_vqa_answer`. With 10 references, 0/1/2/3/4+ matches score 0, 0.3, 0.6, 0.9, 1.0
    (3 matches score 0.9, not 1: the three subsets that leave out a matching answer have only 2).

    A single reference has no leave-one-out subset; it then scores 1.0 when it matches (plain exact
    match). A None prediction (a failed sample) scores 0.0.

    Raises:
        ValueError: ``answers`` is empty (there is nothing to compare with).
    """
    if isinstance(answers, str):
        raise TypeError("answers must be a list of reference strings, not one string")
    if not answers:
        raise ValueError("vqa_accuracy() got no reference answers; pass the human answers of the question")
    if prediction is None:
        return 0.0
    predicted = normalize_vqa_answer(prediction)
    matching = [normalize_vqa_answer(answer) == predicted for answer in answers]
    if len(answers) == 1:
        return float(matching[0])
    total = sum(matching)
    subset_scores = [min(1.0, (total - left_out) / _HUMANS_FOR_FULL_CREDIT) for left_out in matching]
    return sum(subset_scores) / len(subset_scores)
