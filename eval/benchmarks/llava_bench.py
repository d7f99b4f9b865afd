"""LLaVA-Bench (In-the-Wild) (Liu et al., 2023, "Visual Instruction Tuning", Sec. 5; LLaVA-1.5 paper).

60 questions over 24 images in three categories: ``conv`` (conversation), ``detail`` (detailed
description) and ``complex`` (complex reasoning).

Local data, the official layout (Hugging Face ``liuhaotian/llava-bench-in-the-wild``):

- ``questions.jsonl``: ``{"question_id", "image", "text", "category"}`` per line;
- ``answers_gpt4.jsonl``: the GPT-4 reference answers, ``{"question_id", "text", ...}`` per line;
- ``context.jsonl``: ``{"image", "caption", ...}`` per line, the human-written description of each image;
- ``images/<image>``.

Without ``data_dir`` the questions come from ``lmms-lab/llava-bench-in-the-wild`` (split ``train``; columns
``question_id``, ``question``, ``image``, ``caption``, ``gpt_answer``, ``category``).

Prompt: the question as is (LLaVA's ``model_vqa``); answers are long (``max_new_tokens`` = 1024, as there).

Metric (LLaVA's GPT-4 review): a text-only judge sees the caption, the question, the reference answer as
"Assistant 1" and the prediction as "Assistant 2", and rates each 1-10 on its first output line. The
*relative score* is ``100 * sum(prediction scores) / sum(reference scores)``, overall (``llava_wild``) and per
category (``llava_wild/<category>``). A reply whose first line is not two numbers is skipped with a warning;
a None prediction is judged as an empty answer. Without an API key the metrics are None (pending).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from eval.benchmarks import _hub
from eval.benchmarks.base import Sample, data_path, iter_jsonl
from eval.benchmarks.judge import JudgeClient, JudgedBenchmark, JudgeError

__all__ = ["CATEGORIES", "LLaVABenchWildBenchmark", "llava_wild_judge_messages", "parse_review_scores",
           "relative_score"]

logger = logging.getLogger(__name__)

CATEGORIES = ("conv", "detail", "complex")
DEFAULT_HUB_ID = "lmms-lab/llava-bench-in-the-wild"
JUDGE_MAX_TOKENS = 1024  # LLaVA's review script's limit (the explanation follows the scores)

# The judge's system message and review instruction, as in LLaVA's GPT-4 review rules for LLaVA-Bench
# (llava/eval/table/rule.json, "llava_bench_*", used by eval_gpt_review_bench.py; Liu et al., 2023): the
# instruction wording matters for comparability with published numbers, so it is kept.
JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with a few sentences describing the image. \n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential "
    "bias and ensuring that the order in which the responses were presented does not affect your judgment."
)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def llava_wild_judge_messages(caption: str, question: str, reference: str, prediction: str) -> list[dict[str, str]]:
    """Chat messages for one review: reference = Assistant 1, prediction = Assistant 2 (LLaVA's layout)."""
    user = (
        f"[Context]\n{caption}\n\n[Question]\n{question}\n\n"
        f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{prediction}\n\n[End of Assistant 2]\n\n"
        f"[System]\n{JUDGE_RULE}\n\n"
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_review_scores(reply: str | None) -> tuple[float, float] | None:
    """``(reference score, prediction score)`` from the first non-blank line of a review, or None unless that
    line holds exactly two numbers (separated by spaces or a comma).

    ``"8 6\\nAssistant 1 ..."`` -> (8.0, 6.0); ``"7, 9.5"`` -> (7.0, 9.5); ``"Assistant 1: 8"`` -> None.
    """
    if reply is None:
        return None
    lines = [line for line in reply.splitlines() if line.strip()]
    if not lines:
        return None
    first = lines[0].replace(",", " ").split()
    if len(first) != 2 or not all(_NUMBER.fullmatch(token) for token in first):
        return None
    return float(first[0]), float(first[1])


def relative_score(pairs: list[tuple[float, float]]) -> float:
    """``100 * sum(prediction scores) / sum(reference scores)`` over ``(reference, prediction)`` pairs.

    Raises:
        ValueError: no pairs, or the reference scores sum to zero.
    """
    reference = sum(ref for ref, _ in pairs)
    if not pairs or reference <= 0:
        raise ValueError(f"relative score needs reviews with positive reference scores, got {pairs!r}")
    return 100.0 * sum(pred for _, pred in pairs) / reference


class LLaVABenchWildBenchmark(JudgedBenchmark):
    """LLaVA-Bench (In-the-Wild): open questions, scored relative to GPT-4's answers by an LLM judge.

    Args:
        data_dir: folder with ``questions.jsonl``, ``answers_gpt4.jsonl``, ``context.jsonl`` and ``images/``;
            None: load ``hub_id``.
        limit: keep only the first ``limit`` questions (file order).
        judge: a :class:`~eval.benchmarks.judge.JudgeClient`, or a mapping of its arguments (the Hydra
            ``judge`` node); None: the defaults (gpt-4-0613, ``$OPENAI_API_KEY``, no cache).
        hub_id: Hugging Face dataset id used when ``data_dir`` is None.
        allow_external_images: accept image paths in the local files that lead outside ``data_dir``
            (absolute, or with ``..``); refused by default.

    Raises:
        FileNotFoundError: ``data_dir`` lacks one of the three JSONL files.
        ValueError: a malformed line (names file and line), a question without reference answer or caption,
            a missing image, or (without ``allow_external_images``) an image outside ``data_dir``.
    """

    name = "llava_bench"
    max_new_tokens = 1024

    title = "LLaVA-Bench (In-the-Wild)"
    data_hint = "the llava-bench-in-the-wild folder"

    def __init__(self, data_dir: str | None = None, limit: int | None = None,
                 judge: JudgeClient | Mapping | None = None, hub_id: str | None = DEFAULT_HUB_ID,
                 allow_external_images: bool = False) -> None:
        super().__init__(data_dir, limit, judge, hub_id, allow_external_images)

    @staticmethod
    def _read_local(data_dir: Path, allow_external_images: bool = False) -> list[Sample]:
        return _load_local(data_dir, allow_external_images)

    def reviews(self, records: list[dict]) -> dict[str, tuple[float, float] | None] | None:
        """``(reference, prediction)`` judge scores per record id (None for an unparseable review), or None
        when the judge has no API key or failed (logged)."""
        reviews: dict[str, tuple[float, float] | None] = {}
        for record in records:
            sample = self._sample_of(record)
            prediction = record["prediction"] if record["prediction"] is not None else ""
            messages = llava_wild_judge_messages(sample.meta["caption"], sample.question, sample.answers[0],
                                                 prediction)
            try:
                reply = self.judge.complete(messages, max_tokens=JUDGE_MAX_TOKENS)
            except JudgeError as err:
                logger.error("LLaVA-Bench judge failed on %s: %s; the metrics stay pending", record["id"], err)
                return None
            if reply is None:
                return None
            pair = parse_review_scores(reply)
            if pair is None:
                logger.warning("LLaVA-Bench review of %s has no 'score score' first line (%r); skipped",
                               record["id"], reply[:200])
            reviews[record["id"]] = pair
        return reviews

    def score(self, records: list[dict]) -> dict[str, float | None]:
        """Relative scores ``llava_wild`` and ``llava_wild/<category>`` (percent of the reference's judge
        score); all None (pending) when the judge has no API key or failed.

        Raises:
            ValueError: a record whose id is not a question of this benchmark.
        """
        if not records:
            return {}
        categories = _ordered({self._sample_of(r).meta["category"] for r in records})
        keys = ["llava_wild"] + [f"llava_wild/{c}" for c in categories]
        reviews = self.reviews(records)
        if reviews is None:
            return dict.fromkeys(keys)
        by_category: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for record in records:
            pair = reviews[record["id"]]
            if pair is not None:
                by_category[self._sample_of(record).meta["category"]].append(pair)
        every = [pair for pairs in by_category.values() for pair in pairs]
        metrics: dict[str, float | None] = {"llava_wild": relative_score(every) if every else None}
        for category in categories:
            pairs = by_category.get(category)
            metrics[f"llava_wild/{category}"] = relative_score(pairs) if pairs else None
        return metrics

    def _sample_of(self, record: dict) -> Sample:
        sample = self._by_id.get(record["id"])
        if sample is None:
            raise ValueError(f"record id {record['id']!r} is not a LLaVA-Bench question loaded by this benchmark")
        return sample

    def _load_hub(self, hub_id: str) -> list[Sample]:
        """Questions of the Hugging Face copy (images stay in the dataset, decoded on use)."""
        self._hub = _hub.load_dataset(hub_id, split="train", local_hint="the llava-bench-in-the-wild folder")
        return [
            Sample(id=str(row["question_id"]), image_paths=[], question=row["question"], answers=[row["gpt_answer"]],
                   answer_type="open", meta={"category": row["category"], "caption": row["caption"], "hub_row": i})
            for i, row in enumerate(self._hub.remove_columns("image"))
        ]


def _ordered(categories: set[str]) -> list[str]:
    return sorted(categories, key=lambda c: (CATEGORIES.index(c) if c in CATEGORIES else len(CATEGORIES), c))


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[tuple[str, dict]]:
    """``("<path>:<line>", object)`` per line of a JSONL file with the ``required`` keys, validated (errors name
    file and line)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; download liuhaotian/llava-bench-in-the-wild (questions.jsonl, answers_gpt4.jsonl, "
            "context.jsonl, images/) and pass data_dir= that folder"
        )
    rows = []
    for _, where, row in iter_jsonl(path):
        missing = [key for key in required if key not in row]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}; every line needs {list(required)}")
        rows.append((where, row))
    if not rows:
        raise ValueError(f"{path} holds no lines")
    return rows


def _load_local(data_dir: Path, allow_external_images: bool = False) -> list[Sample]:
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"LLaVA-Bench data_dir {data_dir} does not exist; download liuhaotian/llava-bench-in-the-wild and pass "
            "data_dir= that folder"
        )
    questions = _read_jsonl(data_dir / "questions.jsonl", ("question_id", "image", "text", "category"))
    answers_path = data_dir / "answers_gpt4.jsonl"
    references = {str(r["question_id"]): r["text"] for _, r in _read_jsonl(answers_path, ("question_id", "text"))}
    context_path = data_dir / "context.jsonl"
    captions = {r["image"]: r["caption"] for _, r in _read_jsonl(context_path, ("image", "caption"))}
    samples, seen = [], set()
    for where, row in questions:
        question_id = str(row["question_id"])
        if question_id in seen:
            raise ValueError(f"{data_dir / 'questions.jsonl'}: duplicate question_id {question_id}")
        seen.add(question_id)
        if question_id not in references:
            raise ValueError(f"{answers_path} has no reference answer for question_id {question_id}")
        if row["image"] not in captions:
            raise ValueError(f"{context_path} has no caption for image {row['image']!r} (question {question_id})")
        image = data_path(data_dir / "images", str(row["image"]), data_dir, where,
                          allow_external=allow_external_images)
        if not image.is_file():
            raise ValueError(f"question {question_id}: image {image} does not exist")
        samples.append(Sample(id=question_id, image_paths=[str(image.resolve())], question=row["text"],
                              answers=[references[question_id]], answer_type="open",
                              meta={"category": row["category"], "caption": captions[row["image"]],
                                    "image": row["image"]}))
    return samples
