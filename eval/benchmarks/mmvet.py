"""MM-Vet (Yu et al., 2023, "MM-Vet: Evaluating Large Multimodal Models for Integrated Capabilities").

218 open-ended questions, each tagged with the capabilities it needs: recognition (rec), OCR (ocr),
knowledge (know), language generation (gen), spatial awareness (spat) and math (math).

Local data, the official release (``mm-vet.zip``; ``data_dir`` may be the unzipped ``mm-vet/`` folder or its
parent): ``mm-vet.json``, a dict ``"v1_<n>" -> {"imagename", "question", "answer", "capability": [...]}``,
and ``images/<imagename>``. Without ``data_dir`` the questions come from the Hugging Face dataset
``lmms-lab/MMVet`` (split ``test``).

Prompt: the question as is (as LLaVA-1.5 evaluates it); answers may be long (``max_new_tokens`` = 512).

Metric (the paper's Sec. 3.3): an LLM judge (GPT-4 in the paper) compares each prediction with the ground
truth in a few-shot prompt and returns a correctness score in [0, 1]; in the ground truth ``<AND>`` means all
parts are needed and ``<OR>`` that any one is enough. ``mm_vet`` = 100 x the mean score; ``mm_vet/<cap>`` =
the same over the questions needing that capability. The prompt text below is this project's own, written
from that description. A reply without a score in [0, 1] counts 0 (the released evaluator also falls back
to 0 after failed retries). Without an API key the metrics are None (pending).
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from eval.benchmarks import _hub
from eval.benchmarks.base import Sample, data_path
from eval.benchmarks.judge import JudgeClient, JudgedBenchmark, JudgeError

__all__ = ["CAPABILITIES", "MMVetBenchmark", "mmvet_judge_prompt", "parse_mmvet_score"]

logger = logging.getLogger(__name__)

CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")
DATA_FILE = "mm-vet.json"
DEFAULT_HUB_ID = "lmms-lab/MMVet"
JUDGE_MAX_TOKENS = 5  # the reply is one number

# This project's wording of the judge task described in the MM-Vet paper (Sec. 3.3, Table 1): grade the
# prediction against the ground truth with 0.0, 0.1, ..., 1.0; <AND> / <OR> semantics; few-shot table rows.
JUDGE_INSTRUCTION = (
    "You are grading the answer of an AI assistant to a question about an image, by comparing it with the "
    "ground-truth answer. Give the prediction a correctness score from 0.0 (totally wrong) to 1.0 (totally "
    "right) in steps of 0.1: 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9 or 1.0. Give partial credit to a "
    "partially right prediction. In the ground truth, <AND> joins parts that must all be present in the "
    "prediction for it to be totally right, and <OR> joins alternatives of which any one present makes it "
    "totally right. For open-ended questions, judge whether the prediction conveys the content of the ground "
    "truth. Reply with the score of the last row only, nothing else."
)
JUDGE_EXAMPLES = (
    ("How many apples are on the plate?", "3", "There are three apples on the plate.", "1.0"),
    ("What does the red sign say?", "STOP", "The sign says SLOW.", "0.0"),
    ("Which two colors make up the flag?", "red <AND> white", "The flag is red.", "0.5"),
    ("What is the woman holding?", "umbrella <OR> parasol", "She is holding a parasol.", "1.0"),
    ("What is the total price on the receipt?", "$12.40", "The total is $12.", "0.0"),
    (
        "Why might the road in this photo be dangerous?",
        "It is covered in snow and ice, so cars can slip; visibility is also low because of fog.",
        "The road looks icy, so vehicles could skid.",
        "0.6",
    ),
)
_SCORE = re.compile(r"(?<![\d.\-])(\d+(?:\.\d+)?|\.\d+)")


def _cell(text: str) -> str:
    """A table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "/")


def mmvet_judge_prompt(question: str, answer: str, prediction: str) -> str:
    """The few-shot grading prompt: instruction, a table of examples, and the case to grade (score left blank)."""
    rows = ["Question | Ground truth | Prediction | Correctness", "--- | --- | --- | ---"]
    rows += [" | ".join(_cell(part) for part in example) for example in JUDGE_EXAMPLES]
    rows.append(" | ".join(_cell(part) for part in (question, answer, prediction)) + " |")
    return JUDGE_INSTRUCTION + "\n\n" + "\n".join(rows)


def parse_mmvet_score(reply: str | None) -> float | None:
    """The first number in the judge's reply if it lies in [0, 1], else None.

    ``"0.7"`` -> 0.7; ``"Correctness: 1.0"`` -> 1.0; ``"1"`` -> 1.0; ``"7"`` -> None; ``"great"`` -> None.
    """
    if reply is None:
        return None
    found = _SCORE.search(reply)
    if found is None:
        return None
    value = float(found.group(1))
    return value if 0.0 <= value <= 1.0 else None


class MMVetBenchmark(JudgedBenchmark):
    """MM-Vet: open-ended questions scored in [0, 1] by an LLM judge, reported as 100 x mean overall and per
    capability.

    Args:
        data_dir: folder with ``mm-vet.json`` and ``images/`` (or its parent); None: load ``hub_id``.
        limit: keep only the first ``limit`` questions (file order).
        judge: a :class:`~eval.benchmarks.judge.JudgeClient`, or a mapping of its arguments (the Hydra
            ``judge`` node); None: the defaults (gpt-4-0613, ``$OPENAI_API_KEY``, no cache).
        hub_id: Hugging Face dataset id used when ``data_dir`` is None.
        allow_external_images: accept image paths in the local files that lead outside ``data_dir``
            (absolute, or with ``..``); refused by default.

    Raises:
        FileNotFoundError: no ``mm-vet.json`` in ``data_dir``.
        ValueError: a malformed entry (names the entry and what to fix), a missing image, or (without
            ``allow_external_images``) an ``imagename`` outside ``data_dir``.
    """

    name = "mmvet"
    max_new_tokens = 512

    title = "MM-Vet"
    data_hint = "a folder with mm-vet.json and images/"

    def __init__(self, data_dir: str | None = None, limit: int | None = None,
                 judge: JudgeClient | Mapping | None = None, hub_id: str | None = DEFAULT_HUB_ID,
                 allow_external_images: bool = False) -> None:
        super().__init__(data_dir, limit, judge, hub_id, allow_external_images)

    @staticmethod
    def _read_local(data_dir: Path, allow_external_images: bool = False) -> list[Sample]:
        return _load_local(data_dir, allow_external_images)

    def judge_scores(self, records: list[dict]) -> dict[str, float] | None:
        """Judge score in [0, 1] per record id, or None when any record could not be judged (no key, or the
        judge failed; the failure is logged). A None prediction scores 0 without a judge call."""
        scores: dict[str, float] = {}
        for record in records:
            sample = self._sample_of(record)
            if record["prediction"] is None:
                scores[record["id"]] = 0.0
                continue
            prompt = mmvet_judge_prompt(sample.question, sample.answers[0], record["prediction"])
            try:
                reply = self.judge.complete(prompt, max_tokens=JUDGE_MAX_TOKENS)
            except JudgeError as err:
                logger.error("MM-Vet judge failed on %s: %s; the MM-Vet metrics stay pending", record["id"], err)
                return None
            if reply is None:
                return None
            score = parse_mmvet_score(reply)
            if score is None:
                logger.warning("MM-Vet judge reply for %s has no score in [0, 1] (%r); counted as 0",
                               record["id"], reply)
                score = 0.0
            scores[record["id"]] = score
        return scores

    def score(self, records: list[dict]) -> dict[str, float | None]:
        """``mm_vet`` (100 x mean judge score) and ``mm_vet/<capability>`` for each capability present; all
        None (pending) when the judge has no API key or failed.

        Raises:
            ValueError: a record whose id is not a question of this benchmark.
        """
        if not records:
            return {}
        capabilities = sorted({c for r in records for c in self._sample_of(r).meta["capability"]},
                              key=lambda c: (CAPABILITIES.index(c) if c in CAPABILITIES else len(CAPABILITIES), c))
        keys = ["mm_vet"] + [f"mm_vet/{c}" for c in capabilities]
        scores = self.judge_scores(records)
        if scores is None:
            return dict.fromkeys(keys)
        per_capability: dict[str, list[float]] = defaultdict(list)
        for record in records:
            for capability in self._sample_of(record).meta["capability"]:
                per_capability[capability].append(scores[record["id"]])
        metrics: dict[str, float | None] = {"mm_vet": 100.0 * sum(scores.values()) / len(scores)}
        for capability in capabilities:
            values = per_capability[capability]
            metrics[f"mm_vet/{capability}"] = 100.0 * sum(values) / len(values)
        return metrics

    def _sample_of(self, record: dict) -> Sample:
        sample = self._by_id.get(record["id"])
        if sample is None:
            raise ValueError(f"record id {record['id']!r} is not an MM-Vet question loaded by this benchmark")
        return sample

    def _load_hub(self, hub_id: str) -> list[Sample]:
        """Questions of the Hugging Face copy (images stay in the dataset, decoded on use)."""
        self._hub = _hub.load_dataset(hub_id, split="test", local_hint="the unzipped mm-vet folder")
        samples = []
        for row_index, row in enumerate(self._hub.remove_columns("image")):
            capability = row["capability"]
            if isinstance(capability, str):  # "ocr,math" in some copies
                capability = [c.strip() for c in capability.split(",") if c.strip()]
            samples.append(Sample(id=str(row["question_id"]), image_paths=[], question=row["question"],
                                  answers=[row["answer"]], answer_type="open",
                                  meta={"capability": list(capability), "hub_row": row_index}))
        return samples


def _load_local(data_dir: Path, allow_external_images: bool = False) -> list[Sample]:
    """Parse and validate ``mm-vet.json`` (in ``data_dir`` or ``data_dir/mm-vet``)."""
    path = next((p for p in (data_dir / DATA_FILE, data_dir / "mm-vet" / DATA_FILE) if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"{data_dir / DATA_FILE} not found; download mm-vet.zip (MM-Vet GitHub release v1), unzip it and pass "
            "data_dir= the folder holding mm-vet.json and images/"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path} must be a non-empty JSON object mapping question ids (v1_0, ...) to entries")
    samples = []
    for question_id, entry in data.items():
        where = f"{path} entry {question_id!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
        missing = [k for k in ("imagename", "question", "answer", "capability") if k not in entry]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}; each entry needs imagename, question, answer, "
                             "capability")
        for key in ("imagename", "question", "answer"):
            if not isinstance(entry[key], str) or not entry[key].strip():
                raise ValueError(f"{where}: {key!r} must be a non-empty string, got {entry[key]!r}")
        capability = entry["capability"]
        if not isinstance(capability, list) or not capability or not all(isinstance(c, str) for c in capability):
            raise ValueError(f"{where}: 'capability' must be a non-empty list of strings such as ['ocr', 'math'], "
                             f"got {capability!r}")
        image = data_path(path.parent / "images", entry["imagename"], data_dir, where,
                          allow_external=allow_external_images)
        if not image.is_file():
            raise ValueError(f"{where}: image {image} does not exist (images live in {path.parent / 'images'})")
        samples.append(Sample(id=question_id, image_paths=[str(image.resolve())], question=entry["question"],
                              answers=[entry["answer"]], answer_type="open", meta={"capability": capability}))
    return samples
