"""MMBench (English, dev split) with CircularEval.

Data (local, official format): ``mmbench_dev_en_20231003.tsv`` from the MMBench release
(https://download.openmmlab.com/mmclassification/datasets/mmbench/mmbench_dev_en_20231003.tsv), a
tab-separated file with a header row and the columns ``index, question, hint, A, B, C, D, answer,
category, image, source, l2-category, comment, split``: ``hint`` and the options after ``B`` may be
empty, ``answer`` is the right option's letter and ``image`` the base64-encoded image. The file
already holds the CircularEval copies of each question (its options shifted), under
``index + k * 1_000_000`` (MMBench issues #8, #12: the TSV has ~4x as many rows as questions; the
official evaluator groups rows by ``index % 1e6``). This module keeps the original rows
(``index < 1_000_000``) and makes the rotations itself, so the same code serves files with and
without the copies.

Data (online): the Hugging Face dataset ``lmms-lab/MMBench`` (config ``en``, split ``dev``), the same
rows with a decoded ``image`` column; used when ``data_dir`` is None (needs ``pip install datasets``).

Images are written once to a cache folder (``<data_dir>/.images/<index>.<ext>`` by default) so that
samples refer to real files.

Prompt (LLaVA-1.5, llava/eval/model_vqa_mmbench.py with ``--single-pred-prompt``): the hint (when
present) and a newline, the question, a newline, the options as ``"A. ...\\nB. ..."`` (up to the first
missing one), and "\\nAnswer with the option's letter from the given choices directly."

Metric (MMBench paper, Liu et al. 2023, "CircularEval"): a question with n options is asked n times,
its options rotated one step further each time; it counts as right only if every rotation is
answered right. Answers are read with the rule-based :func:`eval.benchmarks.choices.extract_choice`
(the official evaluator falls back to an LLM judge when rules fail; we count such answers as wrong).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import logging
import sys
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from dymu.atomic import atomic_path, write_bytes_atomic
from eval.benchmarks import _hub
from eval.benchmarks.base import Benchmark, Sample, check_data_file, check_limit, load_local_or_hub
from eval.benchmarks.choices import (
    MULTIPLE_CHOICE_PROMPT,
    accuracy_by,
    extract_choice,
    format_options,
    percent,
    sample_of,
)

__all__ = ["MMBenchBenchmark", "circular_accuracy", "circular_correct", "rotate_options"]

logger = logging.getLogger(__name__)

TSV_FILE = "mmbench_dev_en_20231003.tsv"
TSV_URL = "https://download.openmmlab.com/mmclassification/datasets/mmbench/" + TSV_FILE
REQUIRED_COLUMNS = ("index", "question", "A", "B", "answer", "image")
OPTION_COLUMNS = ("A", "B", "C", "D")
# Rows with index >= this are the file's own CircularEval copies (index % COPY_STRIDE is the question).
COPY_STRIDE = 1_000_000
# Cell values that mean "empty": pandas' default NA strings (the official tooling reads the TSV with
# pandas) plus LLaVA-1.5's is_none() check for "nan"/"none" in any case.
_MISSING = frozenset(
    {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
     "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
)
_IMAGE_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp"}


def _missing(value: Any) -> bool:
    if value is None or (isinstance(value, float) and value != value):  # None / NaN
        return True
    text = str(value).strip()
    return text in _MISSING or text.lower() in ("nan", "none")


def rotate_options(options: dict[str, str], answer: str, k: int) -> tuple[dict[str, str], str]:
    """The options shifted ``k`` steps (letter i shows the text of letter i+k), and the answer's new letter.

    ``rotate_options({"A": "x", "B": "y", "C": "z"}, "A", 1)`` -> ``({"A": "y", "B": "z", "C": "x"}, "C")``.
    Rotation 0 is the original order; rotations 0..n-1 show each text once at every letter.
    """
    letters = list(options)
    texts = list(options.values())
    n = len(letters)
    rotated = {letters[i]: texts[(i + k) % n] for i in range(n)}
    return rotated, letters[(letters.index(answer) - k) % n]


def circular_correct(results: dict[Any, dict[int, bool]], rotations: dict[Any, int]) -> dict[Any, bool]:
    """CircularEval per question: right only if every one of its rotations was answered right.

    Args:
        results: per question, ``{rotation: answered right}`` for the rotations that were evaluated.
        rotations: per question, how many rotations it has (its option count; 1 without CircularEval).
            A rotation missing from ``results`` counts as wrong.
    """
    return {
        question: all(results[question].get(k, False) for k in range(rotations[question]))
        for question in results
    }


def circular_accuracy(results: dict[Any, dict[int, bool]], rotations: dict[Any, int]) -> float:
    """CircularEval accuracy in percent over the questions in ``results`` (see :func:`circular_correct`)."""
    return percent(circular_correct(results, rotations).values())


class MMBenchBenchmark(Benchmark):
    """MMBench-en dev: multiple-choice questions about one image each, scored with CircularEval.

    Args:
        data_dir: folder holding ``mmbench_dev_en_20231003.tsv``; None loads ``hub_id`` with
            ``datasets.load_dataset`` instead.
        limit: keep only the first ``limit`` questions (before the rotations are made).
        circular: ask each question once per rotation of its options (CircularEval); if False, only
            the original order (rotation 0) is asked.
        image_cache_dir: where decoded images are written once; default ``<data_dir>/.images``, or
            ``$DYMU_CACHE_DIR/benchmarks/mmbench`` (``~/.cache/dymu/...``) for the hub.
        hub_id, hub_config, hub_split: the Hugging Face dataset used when ``data_dir`` is None.

    Samples have ids ``"<index>-c<k>"`` (question index, rotation k) and ``meta`` with ``group``
    (the question index), ``rotation``, ``n_rotations``, ``options`` (rotated), ``answer_letter``,
    ``hint``, ``category`` and ``l2_category``.

    Raises:
        FileNotFoundError: ``data_dir`` or the TSV in it does not exist (says where to get it).
        ValueError: a malformed row; the message names the file, the line and what to fix.
    """

    name = "mmbench"
    max_new_tokens = 8

    def __init__(
        self,
        data_dir: str | None = None,
        limit: int | None = None,
        circular: bool = True,
        image_cache_dir: str | None = None,
        hub_id: str | None = "lmms-lab/MMBench",
        hub_config: str | None = "en",
        hub_split: str = "dev",
    ) -> None:
        check_limit(limit)
        self.circular = circular
        questions, folder = load_local_or_hub(
            data_dir, hub_id,
            lambda local: _read_local(local, image_cache_dir, limit, hub_id),
            lambda hub: _read_hub(hub, hub_config, hub_split, _hub.cache_dir(image_cache_dir, self.name), limit),
            "pass data_dir= a folder holding the MMBench TSV, or hub_id= a dataset id",
        )
        source = str(folder / TSV_FILE) if folder is not None else f"{hub_id} ({hub_config}, {hub_split})"
        self._samples = [s for question in questions for s in self._expand(question)]
        self._by_id = {s.id: s for s in self._samples}
        logger.info("MMBench: %d questions, %d samples from %s", len(questions), len(self._samples), source)

    def _expand(self, question: dict) -> list[Sample]:
        """The question's samples: one per rotation of its options (only rotation 0 if not circular)."""
        n = len(question["options"]) if self.circular else 1
        samples = []
        for k in range(n):
            options, answer = rotate_options(question["options"], question["answer"], k)
            samples.append(
                Sample(
                    id=f"{question['index']}-c{k}",
                    image_paths=[question["image_path"]],
                    question=question["question"],
                    answers=[answer],
                    answer_type="multiple_choice",
                    meta={
                        "group": question["index"],
                        "rotation": k,
                        "n_rotations": n,
                        "options": options,
                        "answer_letter": answer,
                        "hint": question["hint"],
                        "category": question["category"],
                        "l2_category": question["l2_category"],
                    },
                )
            )
        return samples


    def prompt(self, sample: Sample) -> str:
        """Hint (if any) + newline + question + newline + options + LLaVA-1.5's multiple-choice instruction."""
        text = sample.question
        if sample.meta["hint"]:
            text = sample.meta["hint"] + "\n" + text
        return text + "\n" + format_options(sample.meta["options"]) + MULTIPLE_CHOICE_PROMPT

    def score(self, records: list[dict]) -> dict[str, float | None]:
        """CircularEval accuracy in percent, and more.

        Returns ``accuracy`` (a question is right only if all its rotations are; a rotation without a
        record counts as wrong), ``accuracy_single`` (rotation 0 alone, the usual single-pass score),
        ``category/<name>`` and ``l2-category/<name>`` (circular accuracy per category). A record with
        prediction None (a failed sample) is wrong. Records must come from this benchmark's samples
        (the runner's records do not carry ``meta``; it is looked up by id).
        """
        results: dict[int, dict[int, bool]] = {}
        first: dict[int, Sample] = {}
        for record in records:
            sample = sample_of(record, self._by_id, self.name)
            meta = sample.meta
            right = extract_choice(record["prediction"], meta["options"]) == meta["answer_letter"]
            results.setdefault(meta["group"], {})[meta["rotation"]] = right
            first.setdefault(meta["group"], sample)
        if not results:
            return {}
        rotations = {group: first[group].meta["n_rotations"] for group in results}
        incomplete = sum(any(k not in results[g] for k in range(rotations[g])) for g in results)
        if incomplete:
            logger.warning("%d MMBench questions lack some rotations; they count as wrong", incomplete)
        by_group = circular_correct(results, rotations)
        correct = [by_group[g] for g in results]
        metrics: dict[str, float | None] = {"accuracy": percent(correct)}
        singles = [results[g][0] for g in results if 0 in results[g]]
        if singles:
            metrics["accuracy_single"] = percent(singles)
        metrics.update(accuracy_by(correct, [first[g].meta["category"] for g in results], "category"))
        metrics.update(accuracy_by(correct, [first[g].meta["l2_category"] for g in results], "l2-category"))
        return metrics


def _read_local(data_dir: Path, image_cache_dir: str | None, limit: int | None, hub_id: str | None) -> list[dict]:
    """Questions of ``data_dir``'s official TSV, their images written to ``image_cache_dir`` (default
    ``data_dir/.images``)."""
    path = data_dir / TSV_FILE
    check_data_file(path, data_dir, f"download {TSV_URL}", hub_id)
    cache = Path(image_cache_dir) if image_cache_dir else data_dir / ".images"
    return _read_tsv(path, cache, limit)


def _read_tsv(path: Path, cache: Path, limit: int | None) -> list[dict]:
    """Questions (index < 1e6) of an official MMBench TSV, their images written to ``cache``."""
    old_limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images exceed csv's 128 kB default
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t")
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path} is empty; expected the official MMBench TSV with a header row")
            header = [column.strip() for column in header]
            missing = [column for column in REQUIRED_COLUMNS if column not in header]
            if missing:
                raise ValueError(
                    f"{path}:1: header lacks column(s) {missing}; expected the official MMBench TSV columns "
                    f"{list(REQUIRED_COLUMNS)} (+ hint, C, D, category, l2-category, ...), tab-separated"
                )
            questions: list[dict] = []
            seen: dict[int, int] = {}
            copies: dict[int, int] = {}  # question index -> line of its first copy
            n_copies = 0
            for row in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                where = f"{path}:{line}"
                if len(row) != len(header):
                    raise ValueError(
                        f"{where}: {len(row)} tab-separated cells but the header has {len(header)}; "
                        "quote cells that contain tabs or newlines"
                    )
                cells = dict(zip(header, row))
                index = _parse_index(cells["index"], where)
                if index >= COPY_STRIDE:
                    copies.setdefault(index % COPY_STRIDE, line)
                    n_copies += 1
                    continue
                if index in seen:
                    raise ValueError(
                        f"{where}: duplicate index {index} (first on line {seen[index]}); indexes must be unique"
                    )
                seen[index] = line
                if limit is not None and len(questions) >= limit:
                    continue
                question = _question(cells, index, where)
                question["image_path"] = _cache_image(_decode_base64_image(cells["image"], where), cache, index, where)
                questions.append(question)
    finally:
        csv.field_size_limit(old_limit)
    orphans = sorted(set(copies) - set(seen))
    if orphans:
        raise ValueError(
            f"{path}:{copies[orphans[0]]}: CircularEval copy of question {orphans[0]} (index mod {COPY_STRIDE}) "
            "but no row has that index; use the complete official TSV"
        )
    if not seen:
        raise ValueError(f"{path} holds no questions; expected one row per question under the header")
    if n_copies:
        logger.info("%s: skipped %d CircularEval copy rows (rotations are made here)", path, n_copies)
    return questions


def _parse_index(value: str, where: str) -> int:
    try:
        return int(float(value))
    except (ValueError, OverflowError):
        raise ValueError(f"{where}: 'index' must be an integer, got {value!r}") from None


def _question(cells: dict[str, Any], index: int, where: str) -> dict:
    """Validate one row (a dict of column -> value) and turn it into a question dict (without image)."""
    if _missing(cells.get("question")):
        raise ValueError(f"{where}: empty 'question'; every row needs the question text")
    options: dict[str, str] = {}
    for letter in OPTION_COLUMNS:
        value = cells.get(letter)
        if _missing(value):
            break
        options[letter] = str(value).strip()
    later = [letter for letter in OPTION_COLUMNS[len(options) + 1 :] if not _missing(cells.get(letter))]
    if later:
        raise ValueError(
            f"{where}: option {OPTION_COLUMNS[len(options)]} is empty but {later} are not; fill options "
            "from A on without gaps"
        )
    if len(options) < 2:
        raise ValueError(f"{where}: {len(options)} option(s); a question needs at least options A and B")
    answer = "" if _missing(cells.get("answer")) else str(cells["answer"]).strip()
    if answer not in options:
        raise ValueError(
            f"{where}: answer {cells.get('answer')!r} is not one of the options {list(options)}; "
            "'answer' must be the right option's letter"
        )
    hint = cells.get("hint")
    l2 = cells.get("l2-category", cells.get("L2-category"))
    return {
        "index": index,
        "question": str(cells["question"]).strip(),
        "hint": "" if _missing(hint) else str(hint).strip(),
        "options": options,
        "answer": answer,
        "category": "" if _missing(cells.get("category")) else str(cells["category"]).strip(),
        "l2_category": "" if _missing(l2) else str(l2).strip(),
    }


def _decode_base64_image(value: str, where: str) -> bytes:
    text = "".join(value.split())
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(
            f"{where}: 'image' is not valid base64 ({exc}); it must hold the base64-encoded image"
        ) from exc
    if not data:
        raise ValueError(f"{where}: 'image' is empty; every question needs its base64-encoded image")
    return data


def _cache_image(data: bytes, cache: Path, index: int, where: str) -> str:
    """Write encoded image bytes to ``cache/<index>.<ext>`` unless already there; the absolute path."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            suffix = _IMAGE_SUFFIX.get(image.format or "", f".{(image.format or 'img').lower()}")
    except UnidentifiedImageError as exc:
        raise ValueError(f"{where}: 'image' does not decode to an image ({exc})") from exc
    target = (cache / f"{index}{suffix}").resolve()
    if not (target.is_file() and target.stat().st_size == len(data)):
        cache.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(target, data)  # unique temporary name: concurrent loaders never collide
    return str(target)


def _read_hub(hub_id: str, config: str | None, split: str, cache: Path, limit: int | None) -> list[dict]:
    """Questions of the Hugging Face copy of MMBench (same columns, ``image`` decoded by ``datasets``)."""
    dataset = _hub.load_dataset(hub_id, config, split=split, local_hint=f"a folder holding {TSV_FILE}")
    return _questions_from_rows(dataset, cache, limit, f"{hub_id}[{split}]")


def _questions_from_rows(rows, cache: Path, limit: int | None, source: str) -> list[dict]:
    """Questions from dict rows with a PIL ``image`` (the Hugging Face layout); copies are skipped."""
    questions: list[dict] = []
    for number, row in enumerate(rows):
        where = f"{source} row {number}"
        index = _parse_index(str(row["index"]), where)
        if index >= COPY_STRIDE:
            continue
        if limit is not None and len(questions) >= limit:
            break
        question = _question(row, index, where)
        if row.get("image") is None:
            raise ValueError(f"{where}: no image; every MMBench question has one")
        target = (cache / f"{index}.png").resolve()
        if not target.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as partial:
                row["image"].convert("RGB").save(partial, format="PNG")
        question["image_path"] = str(target)
        questions.append(question)
    return questions
