"""ScienceQA-IMG test: the ScienceQA test questions that come with an image.

Data (local, official format of https://github.com/lupantech/ScienceQA, ``data/scienceqa``):

- ``problems.json``: ``{problem id: {"question", "choices" (list of str), "answer" (index into
  choices), "hint" (context text, may be ""), "image" ("image.png" or null), "split"
  ("train"/"val"/"test"), "subject", "grade", "topic", "category", "skill", "lecture", ...}}``;
- ``pid_splits.json`` (optional): ``{"test": [problem ids in order], ...}``; without it the problems
  with ``split == "test"`` are taken in file order;
- ``images/test/<problem id>/image.png``.

Only test problems with an image are kept (the "IMG" subset, 2017 questions, on which LLaVA-1.5
reports ScienceQA).

Data (online): the Hugging Face dataset ``lmms-lab/ScienceQA`` (config ``ScienceQA-IMG``, split
``test``), the same fields with a decoded ``image`` and no problem id (the row number is used); used
when ``data_dir`` is None (needs ``pip install datasets``); images are written once to a cache folder.

Prompt (LLaVA-1.5: the ``llava_test_CQM-A.json`` question file of its evaluation data, asked with
``--single-pred-prompt``): ``"Context: <hint>\\n"`` when the hint is not empty, the question, a newline,
the options as ``"A. ...\\nB. ..."`` and "\\nAnswer with the option's letter from the given choices
directly."

Metric: accuracy in percent (ScienceQA paper, Lu et al. 2022), overall and per subject (natural /
social / language science) and grade band (G1-6, G7-12), the columns of the paper's tables. Answers
are read with :func:`eval.benchmarks.choices.extract_choice`; an unreadable one is wrong (LLaVA's
scorer picks a random option instead).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from dymu.atomic import atomic_path
from eval.benchmarks import _hub
from eval.benchmarks.base import (Benchmark, Sample, check_data_file, check_limit, data_path, load_json,
                                  load_local_or_hub)
from eval.benchmarks.choices import (
    MULTIPLE_CHOICE_PROMPT,
    accuracy_by,
    extract_choice,
    format_options,
    options_from_list,
    percent,
    sample_of,
)

__all__ = ["ScienceQABenchmark"]

logger = logging.getLogger(__name__)

PROBLEMS_FILE = "problems.json"
SPLITS_FILE = "pid_splits.json"
DOWNLOAD_HINT = (
    "get problems.json, pid_splits.json and the test images (images/test/<id>/image.png) from "
    "https://github.com/lupantech/ScienceQA (data/scienceqa)"
)
REQUIRED_KEYS = ("question", "choices", "answer")


class ScienceQABenchmark(Benchmark):
    """ScienceQA-IMG test: multiple-choice science questions about one image each.

    Args:
        data_dir: folder holding ``problems.json`` (+ optional ``pid_splits.json``) and ``images/``;
            None loads ``hub_id`` with ``datasets.load_dataset`` instead.
        limit: keep only the first ``limit`` questions.
        image_cache_dir: where images from the hub are written once; default
            ``$DYMU_CACHE_DIR/benchmarks/scienceqa`` (``~/.cache/dymu/...``). Unused for local data.
        hub_id, hub_config, hub_split: the Hugging Face dataset used when ``data_dir`` is None.
        allow_external_images: accept problem ids / ``image`` names in the local ``problems.json`` that lead
            outside ``data_dir`` (absolute, or with ``..``); refused by default.

    Samples have the problem id as id, ``answers == [letter]`` and ``meta`` with ``options``,
    ``answer_letter``, ``hint``, ``subject``, ``grade`` and the other fields of the problem.

    Raises:
        FileNotFoundError: ``data_dir`` or ``problems.json`` is missing (says where to get them).
        ValueError: a malformed problem, a missing image, or (without ``allow_external_images``) an image
            outside ``data_dir``; the message names the file, the problem id and what to fix.
    """

    name = "scienceqa"
    max_new_tokens = 8

    def __init__(
        self,
        data_dir: str | None = None,
        limit: int | None = None,
        image_cache_dir: str | None = None,
        hub_id: str | None = "lmms-lab/ScienceQA",
        hub_config: str | None = "ScienceQA-IMG",
        hub_split: str = "test",
        allow_external_images: bool = False,
    ) -> None:
        check_limit(limit)
        self.allow_external_images = bool(allow_external_images)
        self._samples, folder = load_local_or_hub(
            data_dir, hub_id,
            lambda local: _read_local(local, limit, hub_id, self.allow_external_images),
            lambda hub: _read_hub(hub, hub_config, hub_split, _hub.cache_dir(image_cache_dir, self.name), limit),
            f"pass data_dir= a folder holding {PROBLEMS_FILE}, or hub_id= a dataset id",
        )
        source = str(folder / PROBLEMS_FILE) if folder is not None else f"{hub_id} ({hub_config}, {hub_split})"
        self._by_id = {s.id: s for s in self._samples}
        logger.info("ScienceQA-IMG: %d questions from %s", len(self._samples), source)


    def prompt(self, sample: Sample) -> str:
        """``Context: <hint>`` line (if any) + question + options + LLaVA-1.5's multiple-choice instruction."""
        context = f"Context: {sample.meta['hint']}\n" if sample.meta["hint"] else ""
        return context + sample.question + "\n" + format_options(sample.meta["options"]) + MULTIPLE_CHOICE_PROMPT

    def score(self, records: list[dict]) -> dict[str, float | None]:
        """Accuracy in percent: ``accuracy``, ``subject/<subject>`` and ``grade/G1-6``, ``grade/G7-12``.

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
        metrics.update(accuracy_by(correct, [s.meta["subject"] for s in samples], "subject"))
        metrics.update(accuracy_by(correct, [_grade_band(s.meta["grade"]) for s in samples], "grade"))
        return metrics


def _grade_band(grade: str) -> str:
    """``"grade3"`` -> ``"G1-6"``, ``"grade10"`` -> ``"G7-12"`` (the ScienceQA paper's columns); else ``""``."""
    found = re.fullmatch(r"grade(\d+)", grade or "")
    if not found:
        return ""
    return "G1-6" if int(found.group(1)) <= 6 else "G7-12"


def _read_local(data_dir: Path, limit: int | None, hub_id: str | None,
                allow_external_images: bool = False) -> list[Sample]:
    path = data_dir / PROBLEMS_FILE
    check_data_file(path, data_dir, DOWNLOAD_HINT, hub_id)
    problems = load_json(path, "use the official file")
    if not isinstance(problems, dict):
        raise ValueError(f"{path}: expected a JSON object {{problem id: problem}}, got {type(problems).__name__}")

    splits_path = data_dir / SPLITS_FILE
    if splits_path.is_file():
        splits = load_json(splits_path, "use the official file")
        if not isinstance(splits, dict) or not isinstance(splits.get("test"), list):
            raise ValueError(f"{splits_path}: expected a JSON object with a 'test' list of problem ids")
        unknown = [pid for pid in splits["test"] if str(pid) not in problems]
        if unknown:
            raise ValueError(
                f"{splits_path}: test id(s) {unknown[:5]} are not in {path}; use the two files of one release"
            )
        test_ids = [str(pid) for pid in splits["test"]]
    else:
        test_ids = [
            pid for pid, problem in problems.items() if isinstance(problem, dict) and problem.get("split") == "test"
        ]

    samples: list[Sample] = []
    for pid in test_ids:
        problem = problems[pid]
        where = f"{path}: problem {pid!r}"
        if not isinstance(problem, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(problem).__name__}")
        if not problem.get("image"):
            continue  # not in the IMG subset
        if limit is not None and len(samples) >= limit:
            break
        image = data_path(data_dir / "images" / "test", str(Path(pid) / str(problem["image"])), data_dir, where,
                          allow_external=allow_external_images).resolve()
        if not image.is_file():
            raise ValueError(f"{where}: image {image} does not exist; {DOWNLOAD_HINT}")
        samples.append(_sample(pid, problem, str(image), where))
    if not samples:
        raise ValueError(f"{path} holds no test problems with an image; {DOWNLOAD_HINT}")
    return samples


def _sample(pid: str, problem: dict, image_path: str, where: str) -> Sample:
    """Validate one problem and make its sample."""
    missing = [key for key in REQUIRED_KEYS if key not in problem]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; every problem needs {list(REQUIRED_KEYS)}")
    question, choices, answer = problem["question"], problem["choices"], problem["answer"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string, got {question!r}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: 'choices' must be a list of at least 2 strings, got {choices!r}")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(
            f"{where}: 'answer' must be the index (0..{len(choices) - 1}) of the right choice, got {answer!r}"
        )
    options = options_from_list(choices)
    letter = list(options)[answer]
    hint = problem.get("hint") or ""
    meta = {key: value for key, value in problem.items() if key not in ("question", "choices", "answer", "hint")}
    meta.update(options=options, answer_letter=letter, hint=hint.strip(),
                subject=problem.get("subject") or "", grade=problem.get("grade") or "")
    return Sample(
        id=pid,
        image_paths=[image_path],
        question=question.strip(),
        answers=[letter],
        answer_type="multiple_choice",
        meta=meta,
    )


def _read_hub(hub_id: str, config: str | None, split: str, cache: Path, limit: int | None) -> list[Sample]:
    """Questions of the Hugging Face copy (no problem ids: the row number is the id)."""
    local_hint = f"a folder holding {PROBLEMS_FILE}; {DOWNLOAD_HINT}"
    rows = _hub.load_dataset(hub_id, config, split=split, local_hint=local_hint)
    return _samples_from_rows(rows, cache, limit, f"{hub_id}[{split}]")


def _samples_from_rows(rows, cache: Path, limit: int | None, source: str) -> list[Sample]:
    """Samples from dict rows with a PIL ``image`` (rows without one are skipped)."""
    samples: list[Sample] = []
    for number, row in enumerate(rows):
        if row.get("image") is None:
            continue
        if limit is not None and len(samples) >= limit:
            break
        pid = str(number)
        target = (cache / f"{pid}.png").resolve()
        if not target.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as partial:  # unique temporary name: concurrent loaders never collide
                row["image"].convert("RGB").save(partial, format="PNG")
        problem = {key: value for key, value in row.items() if key != "image"}
        samples.append(_sample(pid, problem, str(target), f"{source} row {number}"))
    return samples
