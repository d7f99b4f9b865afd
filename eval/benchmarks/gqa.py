"""GQA testdev-balanced (Hudson & Manning, CVPR 2019): compositional questions about real images.

Local data (``data_dir``), in the official layout of the GQA download page
(cs.stanford.edu/people/dorarad/gqa/download.html)::

    data_dir/testdev_balanced_questions.json   # {question_id: {"imageId", "question", "answer", ...}}
    data_dir/images/<imageId>.jpg

LLaVA-1.5's evaluation layout is accepted too: if ``llava_gqa_testdev_balanced.jsonl`` (one JSON object
per line with ``question_id``, ``image``, ``text``) lies in ``data_dir``, it gives the questions and their
order, and the answers still come from the official questions JSON. Each of the JSON file and the
``images/`` folder may also sit one level down in ``data_dir/data/`` (LLaVA's ``playground/data/eval/gqa``).

Without ``data_dir`` the questions come from the Hub (``hub_id``, default ``lmms-lab/GQA``), assuming its
configs ``testdev_balanced_instructions`` (questions: ``id``, ``imageId``, ``question``, ``answer``, ...) and
``testdev_balanced_images`` (``id``, ``image``), both with the split ``testdev``; images are written once
to ``image_cache_dir`` so that samples carry file paths.

Metric: exact-match accuracy (%). GQA's official ``eval.py`` counts a prediction as correct when it
equals the gold answer string; LLaVA-1.5 lower-cases predictions and strips a final period before
running it. Here both sides go through :func:`normalize_gqa_answer` (lower-case, punctuation removed,
articles dropped), a superset of that clean-up.
"""

from __future__ import annotations

import logging
import re
import string
from pathlib import Path

from eval.benchmarks import _hub
from eval.benchmarks.base import (Benchmark, Sample, check_data_folder, check_limit, data_path, iter_jsonl,
                                  load_json, load_local_or_hub)
from eval.metrics import mean

__all__ = ["GQABenchmark", "normalize_gqa_answer", "gqa_match"]

logger = logging.getLogger(__name__)

QUESTIONS_FILE = "testdev_balanced_questions.json"
LLAVA_QUESTIONS_FILE = "llava_gqa_testdev_balanced.jsonl"
IMAGES_DIR = "images"
DEFAULT_HUB_ID = "lmms-lab/GQA"
HUB_QUESTIONS_CONFIG = "testdev_balanced_instructions"
HUB_IMAGES_CONFIG = "testdev_balanced_images"
HUB_SPLIT = "testdev"
DOWNLOAD_HINT = (
    f"download GQA's questions ({QUESTIONS_FILE}) and images from "
    "https://cs.stanford.edu/people/dorarad/gqa/download.html"
)
# LLaVA-1.5's instruction for short-answer VQA (its GQA question file and paper, Table 7 / Appendix).
SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."

_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_gqa_answer(text: str) -> str:
    """Canonical form of a GQA answer: lower-cased, ASCII punctuation deleted, articles dropped.

    ``"The T-shirt."`` -> ``"tshirt"``; ``"  Left "`` -> ``"left"``; whitespace runs collapse.
    """
    text = _PUNCTUATION.sub("", text.lower())
    return " ".join(word for word in text.split() if word not in _ARTICLES)


def gqa_match(prediction: str | None, answers: list[str]) -> float:
    """1.0 if the normalised prediction equals a normalised reference, else 0.0 (None scores 0.0)."""
    if prediction is None:
        return 0.0
    predicted = normalize_gqa_answer(prediction)
    return float(any(predicted == normalize_gqa_answer(answer) for answer in answers))


class GQABenchmark(Benchmark):
    """GQA testdev-balanced (12,578 questions), scored by normalised exact match.

    Args:
        data_dir: folder in the official layout (see the module docstring); None loads ``hub_id``.
        limit: keep only the first ``limit`` questions (all when None).
        hub_id: Hugging Face dataset id used when ``data_dir`` is None.
        image_cache_dir: where Hub images are written (default ``$DYMU_CACHE_DIR/benchmarks/gqa``,
            or ``~/.cache/dymu/benchmarks/gqa``); unused for local data.
        allow_external_images: accept image paths in the local question files that lead outside
            ``data_dir`` (absolute, or with ``..``); refused by default.

    Raises:
        FileNotFoundError: ``data_dir``, the questions JSON, or an image is missing.
        ValueError: a question entry or JSONL line is malformed (the message names the file and the
            question id or line number), or names an image outside ``data_dir`` without
            ``allow_external_images``.
    """

    name = "gqa"

    def __init__(
        self,
        data_dir: str | None = None,
        limit: int | None = None,
        hub_id: str | None = DEFAULT_HUB_ID,
        image_cache_dir: str | None = None,
        allow_external_images: bool = False,
    ) -> None:
        check_limit(limit)
        self.hub_id = hub_id
        self.allow_external_images = bool(allow_external_images)
        self._samples, self.data_dir = load_local_or_hub(
            data_dir, hub_id,
            lambda local: _load_local(local, self.hub_id, self.allow_external_images),
            lambda hub: _load_hub(hub, _hub.cache_dir(image_cache_dir, self.name).resolve()),
            f"GQABenchmark needs data_dir (a folder with {QUESTIONS_FILE}) or hub_id", resolve=True,
        )
        source = str(self.data_dir) if self.data_dir is not None else hub_id
        if limit is not None:
            self._samples = self._samples[:limit]
        logger.info("loaded %d GQA questions from %s", len(self._samples), source)


    def prompt(self, sample: Sample) -> str:
        """The question followed by LLaVA-1.5's single-word-or-phrase instruction."""
        return sample.question + SHORT_ANSWER_PROMPT

    def score(self, records: list[dict]) -> dict[str, float]:
        """``{"accuracy": %}``: share of records whose normalised prediction equals the answer.

        A record whose 'prediction' is None (a failed sample) counts as wrong; no records, no metric.
        """
        if not records:
            return {}
        return {"accuracy": 100.0 * mean(gqa_match(r["prediction"], r["answers"]) for r in records)}


def _first_existing(data_dir: Path, name: str) -> Path | None:
    """``data_dir/name`` or ``data_dir/data/name`` (LLaVA's layout), whichever exists first."""
    for candidate in (data_dir / name, data_dir / "data" / name):
        if candidate.exists():
            return candidate
    return None


def _load_local(data_dir: Path, hub_id: str | None, allow_external_images: bool = False) -> list[Sample]:
    check_data_folder(data_dir, "GQA", DOWNLOAD_HINT, hub_id)
    questions_path = _first_existing(data_dir, QUESTIONS_FILE)
    if questions_path is None:
        raise FileNotFoundError(
            f"{data_dir} has no {QUESTIONS_FILE} (looked in {data_dir} and {data_dir / 'data'}); {DOWNLOAD_HINT}"
        )
    images_dir = _first_existing(data_dir, IMAGES_DIR) or data_dir / IMAGES_DIR
    entries = _read_official_questions(questions_path)
    llava_path = data_dir / LLAVA_QUESTIONS_FILE
    if llava_path.is_file():
        rows = _read_llava_questions(llava_path, entries, questions_path)
        logger.info("using LLaVA's question list %s with answers from %s", llava_path, questions_path)
    else:
        rows = [(qid, entry["imageId"] + ".jpg", entry["question"], f"{questions_path} question {qid!r}")
                for qid, entry in entries.items()]
    samples = []
    for qid, image_name, question, where in rows:
        image_path = data_path(images_dir, image_name, data_dir, where, allow_external=allow_external_images)
        if not image_path.is_file():
            raise FileNotFoundError(
                f"{where}: image {image_path} does not exist; put GQA's images/ folder next to {questions_path.name}"
            )
        entry = entries[qid]
        samples.append(
            Sample(
                id=qid,
                image_paths=[str(image_path)],
                question=question,
                answers=[entry["answer"]],
                answer_type="short",
                meta=_meta(entry),
            )
        )
    if not samples:
        raise ValueError(f"{questions_path} holds no questions")
    return samples


def _meta(entry: dict) -> dict:
    meta = {"image_id": entry["imageId"]}
    if "fullAnswer" in entry:
        meta["full_answer"] = entry["fullAnswer"]
    if isinstance(entry.get("types"), dict):
        meta["types"] = dict(entry["types"])  # structural / semantic / detailed question type
    return meta


def _read_official_questions(path: Path) -> dict[str, dict]:
    """question_id -> entry of the official questions JSON, validated."""
    data = load_json(path, f"re-download {QUESTIONS_FILE}")
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a JSON object mapping question ids to questions, got {type(data).__name__}"
        )
    for qid, entry in data.items():
        where = f"{path} question {qid!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        for key in ("imageId", "question", "answer"):
            value = entry.get(key)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{where}: {key!r} must be a non-empty string, got {value!r}; "
                    "every question needs 'imageId', 'question' and 'answer'"
                )
    return data


def _read_llava_questions(
    path: Path, entries: dict[str, dict], questions_path: Path
) -> list[tuple[str, str, str, str]]:
    """(question_id, image file, question, location) per line of LLaVA's GQA question file."""
    rows = []
    seen: dict[str, int] = {}
    for line_number, where, row in iter_jsonl(path):
        for key in ("image", "text"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{where}: {key!r} must be a non-empty string, got {row.get(key)!r}")
        if "question_id" not in row:
            raise ValueError(f"{where}: missing 'question_id'; every line needs question_id, image, text")
        qid = str(row["question_id"])
        if qid in seen:
            raise ValueError(f"{where}: duplicate question_id {qid!r} (first on line {seen[qid]})")
        seen[qid] = line_number
        if qid not in entries:
            raise ValueError(
                f"{where}: question_id {qid!r} is not in {questions_path}, which gives the answers; "
                f"use the {QUESTIONS_FILE} of the same release"
            )
        text = row["text"]
        if text.endswith(SHORT_ANSWER_PROMPT):  # LLaVA's file already carries the instruction
            text = text[: -len(SHORT_ANSWER_PROMPT)]
        rows.append((qid, row["image"], text, where))
    return rows


def _load_hub(hub_id: str, cache: Path) -> list[Sample]:
    """Questions from ``hub_id`` (configs ``testdev_balanced_instructions`` / ``_images``), images cached as files."""
    local_hint = "a local copy of GQA"
    image_feature = _hub.hub_image_feature(hub_id, local_hint)
    images = _hub.load_dataset(hub_id, HUB_IMAGES_CONFIG, split=HUB_SPLIT, local_hint=local_hint)
    images = images.cast_column("image", image_feature(decode=False))  # raw file bytes: no re-encoding
    questions = _hub.load_dataset(hub_id, HUB_QUESTIONS_CONFIG, split=HUB_SPLIT, local_hint=local_hint)
    return _samples_from_hub_rows(images, questions, cache, hub_id)


def _samples_from_hub_rows(image_rows, question_rows, cache: Path, source: str) -> list[Sample]:
    """Samples from the Hub layout: ``image_rows`` (``id``, undecoded ``image``) written to ``cache/images``,
    then ``question_rows`` (``id``, ``imageId``, ``question``, ``answer``, ...).

    Image file names come from :func:`eval.benchmarks._hub.cache_file_name` (an id such as ``../../x`` cannot
    leave the cache); the sample ids stay the dataset's ids.

    Raises:
        ValueError: an image row without an id or image bytes (nothing is written for it), or a question whose
            image is not among ``image_rows``.
    """
    image_dir = cache / "images"
    paths: dict[str, Path] = {}
    for number, row in enumerate(image_rows):
        where = f"{source} {HUB_IMAGES_CONFIG} row {number}"
        if row.get("id") is None or str(row["id"]) == "":
            raise ValueError(f"{where}: no 'id'; every image row needs the image id its questions refer to")
        paths[str(row["id"])] = _hub.cache_image_bytes(image_dir, row["id"], row.get("image"), where)
    samples = []
    for row in question_rows:
        if str(row["imageId"]) not in paths:
            raise ValueError(f"{source}: question {row['id']} refers to image {row['imageId']}, "
                             f"which is not in its {HUB_IMAGES_CONFIG} config")
        samples.append(Sample(id=str(row["id"]), image_paths=[str(paths[str(row["imageId"])])],
                              question=row["question"], answers=[row["answer"]], answer_type="short",
                              meta=_meta(row)))
    return samples
