"""SEED-Bench (v1), image part: multiple-choice questions over 9 image evaluation dimensions.

Data (local, official format of https://huggingface.co/datasets/AILab-CVC/SEED-Bench):

- ``SEED-Bench.json``: ``{"questions": [{"question_id", "question", "choice_a", "choice_b",
  "choice_c", "choice_d", "answer" ("A".."D"), "question_type_id", "data_id" (the image file name),
  "data_type" ("image" or "video"), ...}], "question_type": {dimension name: id}}``;
- ``SEED-Bench-image/<data_id>``: the images.

Only ``data_type == "image"`` questions are kept (dimensions 1-9; the video dimensions need frames).

Data (online): the Hugging Face dataset ``lmms-lab/SEED-Bench`` (split ``test``), the same fields with
decoded images (a list per row); used when ``data_dir`` is None (needs ``pip install datasets``);
images are written once to a cache folder. Dimension names come from :data:`QUESTION_TYPES`.

Prompt (LLaVA-1.5: the SEED-Bench question file of its evaluation docs, ``llava-seed-bench.jsonl``):
the question, a newline, the options as ``"A. ...\\nB. ...\\nC. ...\\nD. ..."`` and "\\nAnswer with
the option's letter from the given choices directly."

Metric (SEED-Bench paper, Li et al. 2023): accuracy in percent over the image questions, and per
evaluation dimension (question type). Answers are read with
:func:`eval.benchmarks.choices.extract_choice`; an unreadable one is wrong.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dymu.atomic import atomic_path
from eval.benchmarks import _hub
from eval.benchmarks.base import (Benchmark, Sample, check_data_file, check_limit, data_path, load_json,
                                  load_local_or_hub)
from eval.benchmarks.choices import (
    MULTIPLE_CHOICE_PROMPT,
    accuracy_by,
    extract_choice,
    format_options,
    percent,
    sample_of,
)

__all__ = ["QUESTION_TYPES", "SEEDBenchmark"]

logger = logging.getLogger(__name__)

JSON_FILE = "SEED-Bench.json"
IMAGE_DIR = "SEED-Bench-image"
DOWNLOAD_HINT = (
    f"download {JSON_FILE} and {IMAGE_DIR}.zip (unzipped) from https://huggingface.co/datasets/AILab-CVC/SEED-Bench"
)
REQUIRED_KEYS = ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer",
                 "question_type_id", "data_id", "data_type")
CHOICE_KEYS = {"A": "choice_a", "B": "choice_b", "C": "choice_c", "D": "choice_d"}
# The "question_type" table of SEED-Bench.json (v1): evaluation dimension -> question_type_id.
QUESTION_TYPES = {
    "Scene Understanding": 1,
    "Instance Identity": 2,
    "Instance Attributes": 3,
    "Instance Location": 4,
    "Instances Counting": 5,
    "Spatial Relation": 6,
    "Instance Interaction": 7,
    "Visual Reasoning": 8,
    "Text Understanding": 9,
    "Action Recognition": 10,
    "Action Prediction": 11,
    "Procedure Understanding": 12,
}


class SEEDBenchmark(Benchmark):
    """SEED-Bench image questions: four options each, one image each.

    Args:
        data_dir: folder holding ``SEED-Bench.json`` and ``SEED-Bench-image/``; None loads ``hub_id``
            with ``datasets.load_dataset`` instead.
        limit: keep only the first ``limit`` image questions.
        image_cache_dir: where images from the hub are written once; default
            ``$DYMU_CACHE_DIR/benchmarks/seed`` (``~/.cache/dymu/...``). Unused for local data.
        hub_id, hub_config, hub_split: the Hugging Face dataset used when ``data_dir`` is None.
        allow_external_images: accept ``data_id`` values in the local ``SEED-Bench.json`` that lead outside
            ``data_dir`` (absolute, or with ``..``); refused by default.

    Samples have the ``question_id`` as id, ``answers == [letter]`` and ``meta`` with ``options``,
    ``answer_letter``, ``question_type_id``, ``question_type`` (the dimension's name) and ``data_id``.

    Raises:
        FileNotFoundError: ``data_dir`` or ``SEED-Bench.json`` is missing (says where to get them).
        ValueError: a malformed question, a missing image, or (without ``allow_external_images``) an image
            outside ``data_dir``; the message names the file, the question and what to fix.
    """

    name = "seed"
    max_new_tokens = 8

    def __init__(
        self,
        data_dir: str | None = None,
        limit: int | None = None,
        image_cache_dir: str | None = None,
        hub_id: str | None = "lmms-lab/SEED-Bench",
        hub_config: str | None = None,
        hub_split: str = "test",
        allow_external_images: bool = False,
    ) -> None:
        check_limit(limit)
        self.allow_external_images = bool(allow_external_images)
        self._samples, folder = load_local_or_hub(
            data_dir, hub_id,
            lambda local: _read_local(local, limit, hub_id, self.allow_external_images),
            lambda hub: _read_hub(hub, hub_config, hub_split, _hub.cache_dir(image_cache_dir, self.name), limit),
            f"pass data_dir= a folder holding {JSON_FILE}, or hub_id= a dataset id",
        )
        source = str(folder / JSON_FILE) if folder is not None else f"{hub_id} ({hub_split})"
        self._by_id = {s.id: s for s in self._samples}
        logger.info("SEED-Bench: %d image questions from %s", len(self._samples), source)


    def prompt(self, sample: Sample) -> str:
        """Question + options + LLaVA-1.5's multiple-choice instruction."""
        return sample.question + "\n" + format_options(sample.meta["options"]) + MULTIPLE_CHOICE_PROMPT

    def score(self, records: list[dict]) -> dict[str, float | None]:
        """Accuracy in percent: ``accuracy`` and ``question_type/<dimension>``.

        A record is right when the option extracted from its prediction is the answer letter; a None
        prediction (a failed sample) is wrong. Records are matched to samples by id.
        """
        if not records:
            return {}
        samples = [sample_of(record, self._by_id, self.name) for record in records]
        correct = [
            extract_choice(record["prediction"], sample.meta["options"]) == sample.meta["answer_letter"]
            for record, sample in zip(records, samples)
        ]
        metrics: dict[str, float | None] = {"accuracy": percent(correct)}
        metrics.update(accuracy_by(correct, [s.meta["question_type"] for s in samples], "question_type"))
        return metrics


def _read_local(data_dir: Path, limit: int | None, hub_id: str | None,
                allow_external_images: bool = False) -> list[Sample]:
    path = data_dir / JSON_FILE
    check_data_file(path, data_dir, DOWNLOAD_HINT, hub_id)
    data = load_json(path, "use the official file")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise ValueError(f"{path}: expected a JSON object with a 'questions' list (and a 'question_type' table)")
    table = data.get("question_type", QUESTION_TYPES)
    if not isinstance(table, dict):
        raise ValueError(f"{path}: 'question_type' must map dimension names to ids, got {type(table).__name__}")
    try:
        type_names = {int(type_id): str(name) for name, type_id in table.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{path}: 'question_type' must map dimension names to integer ids, got {table!r}") from None

    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for number, question in enumerate(data["questions"]):
        where = f"{path}: questions[{number}]"
        if not isinstance(question, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(question).__name__}")
        if question.get("data_type") != "image":
            continue
        if limit is not None and len(samples) >= limit:
            break
        sample = _sample(question, type_names, where, image_dir=data_dir / IMAGE_DIR,
                         allow_external_images=allow_external_images)
        if sample.id in seen:
            raise ValueError(f"{where}: duplicate question_id {sample.id!r} (first at questions[{seen[sample.id]}])")
        seen[sample.id] = number
        samples.append(sample)
    if not samples:
        raise ValueError(f"{path} holds no questions with data_type 'image'; {DOWNLOAD_HINT}")
    return samples


def _sample(question: dict, type_names: dict[int, str], where: str, image_dir: Path | None = None,
            image_path: str | None = None, allow_external_images: bool = False) -> Sample:
    """Validate one question and make its sample (image from ``image_dir/data_id`` or ``image_path``).

    A ``data_id`` leading outside ``image_dir``'s parent (the data folder) is refused unless
    ``allow_external_images``.
    """
    missing = [key for key in REQUIRED_KEYS if key not in question]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; every question needs {list(REQUIRED_KEYS)}")
    options: dict[str, Any] = {letter: question[key] for letter, key in CHOICE_KEYS.items()}
    bad = [letter for letter, text in options.items() if not isinstance(text, str) or not text.strip()]
    if bad:
        raise ValueError(f"{where}: option(s) {bad} empty or not text; every question has choice_a..choice_d")
    answer = question["answer"]
    if answer not in options:
        raise ValueError(f"{where}: answer {answer!r} is not one of {list(options)}; use the right option's letter")
    if not isinstance(question["question"], str) or not question["question"].strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string, got {question['question']!r}")
    try:
        type_id = int(question["question_type_id"])
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: 'question_type_id' must be an integer, got {question['question_type_id']!r}"
        ) from None
    if image_path is None:
        image = data_path(image_dir, str(question["data_id"]), image_dir.parent, where,
                          allow_external=allow_external_images).resolve()
        if not image.is_file():
            raise ValueError(f"{where}: image {image} does not exist; {DOWNLOAD_HINT}")
        image_path = str(image)
    meta = {key: value for key, value in question.items() if key not in ("question", "answer", *CHOICE_KEYS.values())}
    meta.update(options={k: v.strip() for k, v in options.items()}, answer_letter=answer,
                question_type_id=type_id, question_type=type_names.get(type_id, str(type_id)))
    return Sample(
        id=str(question["question_id"]),
        image_paths=[image_path],
        question=question["question"].strip(),
        answers=[answer],
        answer_type="multiple_choice",
        meta=meta,
    )


def _read_hub(hub_id: str, config: str | None, split: str, cache: Path, limit: int | None) -> list[Sample]:
    local_hint = f"a folder holding {JSON_FILE}; {DOWNLOAD_HINT}"
    rows = _hub.load_dataset(hub_id, config, split=split, local_hint=local_hint)
    return _samples_from_rows(rows, cache, limit, f"{hub_id}[{split}]")


def _samples_from_rows(rows, cache: Path, limit: int | None, source: str) -> list[Sample]:
    """Samples from dict rows whose ``image`` is a PIL image or a list of them (the first is used).

    Each row is validated before its image is written to ``cache``; the file name comes from
    :func:`eval.benchmarks._hub.cache_file_name` (``question_id`` ``"1"`` -> ``1.png``; an id such as
    ``../../x`` gets a hashed name inside ``cache``). Sample ids stay the dataset's ``question_id``.

    Raises:
        ValueError: a row without an image or with a malformed question; nothing is written for that row.
    """
    type_names = {type_id: name for name, type_id in QUESTION_TYPES.items()}
    samples: list[Sample] = []
    for number, row in enumerate(rows):
        if row.get("data_type") != "image":
            continue
        if limit is not None and len(samples) >= limit:
            break
        where = f"{source} row {number}"
        image = row.get("image")
        image = image[0] if isinstance(image, (list, tuple)) and image else image
        if image is None or isinstance(image, (list, tuple)):
            raise ValueError(f"{where}: no image; every SEED-Bench image question has one")
        question = {key: value for key, value in row.items() if key != "image"}
        sample = _sample(question, type_names, where, image_path="")  # validate before writing anything
        target = _hub.cache_file(cache.resolve(), sample.id, ".png")  # "../x" ids cannot leave the cache
        if not target.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as partial:  # unique temporary name: concurrent loaders never collide
                image.convert("RGB").save(partial, format="PNG")
        sample.image_paths = [str(target)]
        samples.append(sample)
    return samples
