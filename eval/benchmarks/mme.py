"""MME (Fu et al., 2023, "MME: A Comprehensive Evaluation Benchmark for Multimodal Large Language Models").

Fourteen yes/no subtasks: ten of *perception* (existence, count, position, color, posters, celebrity, scene,
landmark, artwork, OCR) and four of *cognition* (commonsense_reasoning, numerical_calculation,
text_translation, code_reasoning). Every image has two questions, one answered "Yes" and one "No".

Local data, the official release layout (``MME_Benchmark_release_version/``; ``data_dir`` may be that folder,
its parent, or the inner ``MME_Benchmark/`` some copies have)::

    <subtask>/images/<name>.jpg + <subtask>/questions_answers_YN/<name>.txt   (artwork, celebrity, landmark,
                                                                               posters, scene)
    <subtask>/<name>.png + <subtask>/<name>.txt                                (the others)

Each ``.txt`` holds one question per line: ``question<TAB>answer`` with answer ``Yes`` or ``No``. Without
``data_dir`` the questions come from the Hugging Face dataset ``lmms-lab/MME`` (split ``test``; columns
``question_id`` = ``<subtask>/<image file>``, ``question``, ``answer``, ``category``, ``image``).

Prompt: the question as given plus LLaVA-1.5's short-answer instruction (LLaVA-1.5 evaluates MME that way).

Metric (MME paper, Sec. 3 and its ``eval_tool``): per subtask, ``acc`` = % of questions answered correctly
and ``acc_plus`` = % of images with *both* questions correct; subtask score = acc + acc_plus (max 200);
perception = sum of the ten perception scores (max 2000), cognition = sum of the four cognition scores
(max 800). A prediction counts as "yes"/"no" by MME's rule (see :func:`mme_yes_no`); anything else is wrong.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from eval.benchmarks import _hub
from eval.benchmarks.base import Benchmark, Sample, check_limit, load_local_or_hub

__all__ = ["COGNITION", "PERCEPTION", "MMEBenchmark", "mme_yes_no"]

logger = logging.getLogger(__name__)

PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
# LLaVA-1.5's instruction for short-answer VQA, which its MME evaluation appends to every question.
SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
RELEASE_DIRS = (".", "MME_Benchmark_release_version", "MME_Benchmark_release_version/MME_Benchmark", "MME_Benchmark")
DEFAULT_HUB_ID = "lmms-lab/MME"


def mme_yes_no(prediction: str | None) -> str | None:
    """The answer a prediction gives ("yes", "no" or None), by the rule of MME's official ``eval_tool``.

    The lower-cased, stripped prediction counts as itself if it is exactly "yes" or "no"; otherwise as "yes"
    if its first four characters contain "yes", else as "no" if they contain "no"; otherwise it is neither
    (None, scored wrong). E.g. ``"Yes, it is."`` -> yes, ``"No."`` -> no, ``"There is a dog."`` -> None.
    """
    if prediction is None:
        return None
    text = prediction.strip().lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return None


class MMEBenchmark(Benchmark):
    """MME perception and cognition: yes/no questions, two per image, scored by acc + acc+.

    Args:
        data_dir: the official release folder (see the module docstring); None: load ``hub_id``.
        limit: keep only the first ``limit`` questions (subtasks in :data:`SUBTASKS` order, files by name).
        subtasks: evaluate only these subtasks (default: all that are present).
        hub_id: Hugging Face dataset id used when ``data_dir`` is None.

    Raises:
        FileNotFoundError: ``data_dir`` does not exist or holds none of the 14 subtask folders.
        ValueError: a malformed ``.txt`` line (names file and line), a missing image, or an unknown subtask.
    """

    name = "mme"
    max_new_tokens = 16

    def __init__(
        self,
        data_dir: str | None = None,
        limit: int | None = None,
        subtasks: list[str] | None = None,
        hub_id: str | None = DEFAULT_HUB_ID,
    ) -> None:
        check_limit(limit)
        unknown = sorted(set(subtasks or ()) - set(SUBTASKS))
        if unknown:
            raise ValueError(f"unknown MME subtask(s) {unknown}; choose from {list(SUBTASKS)}")
        wanted = tuple(subtasks) if subtasks else SUBTASKS
        self._hub = None
        self._samples, _ = load_local_or_hub(
            data_dir, hub_id, lambda local: _load_local(local, wanted), lambda hub: self._load_hub(hub, wanted),
            "MMEBenchmark needs data_dir (the MME_Benchmark_release_version folder) or hub_id",
        )
        self._by_id = {s.id: s for s in self._samples}
        if limit is not None:
            self._samples = self._samples[:limit]
        present = sorted({s.meta["subtask"] for s in self._samples}, key=SUBTASKS.index)
        logger.info("MME: %d questions in %d subtasks (%s)", len(self._samples), len(present), ", ".join(present))


    def prompt(self, sample: Sample) -> str:
        """The question as given, then LLaVA-1.5's "single word or phrase" instruction."""
        return sample.question + SHORT_ANSWER_PROMPT

    def visual_inputs(self, sample: Sample) -> list:
        """The image path (local data) or the decoded PIL image (Hugging Face data)."""
        if sample.image_paths:
            return list(sample.image_paths)
        return [self._hub[sample.meta["hub_row"]]["image"]]

    def score(self, records: list[dict]) -> dict[str, float | None]:
        """MME points: ``perception``, ``cognition``, ``total`` and per subtask ``<subtask>/acc``,
        ``<subtask>/acc_plus`` (percent) and ``<subtask>/score`` (= acc + acc_plus).

        A category sum covers the subtasks present in ``records``; with some missing it is logged as
        incomplete (not comparable with published numbers), and a category with none is left out. A None
        prediction, or one that is neither yes nor no, is wrong.

        Raises:
            ValueError: a record whose id is not an MME question of this benchmark.
        """
        # subtask -> image -> correctness of each of its questions
        results: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
        for record in records:
            sample = self._by_id.get(record["id"])
            if sample is None:
                raise ValueError(f"record id {record['id']!r} is not an MME question loaded by this benchmark")
            truth = sample.answers[0].strip().lower()
            results[sample.meta["subtask"]][sample.meta["image_key"]].append(mme_yes_no(record["prediction"]) == truth)

        metrics: dict[str, float | None] = {}
        category_sums: dict[str, float] = {}
        for category, members in (("perception", PERCEPTION), ("cognition", COGNITION)):
            scored = [subtask for subtask in members if subtask in results]
            for subtask in scored:
                images = results[subtask]
                answers = [ok for per_image in images.values() for ok in per_image]
                acc = 100.0 * sum(answers) / len(answers)
                acc_plus = 100.0 * sum(all(per_image) for per_image in images.values()) / len(images)
                metrics[f"{subtask}/acc"] = acc
                metrics[f"{subtask}/acc_plus"] = acc_plus
                metrics[f"{subtask}/score"] = acc + acc_plus
            if scored:
                category_sums[category] = sum(metrics[f"{subtask}/score"] for subtask in scored)
                if len(scored) < len(members):
                    logger.warning("MME %s sums %d of its %d subtasks (missing: %s); not comparable with the "
                                   "paper's numbers", category, len(scored), len(members),
                                   ", ".join(s for s in members if s not in results))
        metrics.update(category_sums)
        if category_sums:
            metrics["total"] = sum(category_sums.values())
        return metrics

    def _load_hub(self, hub_id: str, wanted: tuple[str, ...]) -> list[Sample]:
        """Questions of the Hugging Face copy (images stay in the dataset, decoded on use)."""
        self._hub = _hub.load_dataset(hub_id, split="test",
                                      local_hint="the official MME_Benchmark_release_version folder")
        rows = self._hub.remove_columns("image")
        samples: list[Sample] = []
        seen: dict[str, int] = defaultdict(int)
        for row_index, row in enumerate(rows):
            subtask = row["category"]
            if subtask not in wanted:
                continue
            image_key = row["question_id"]  # "<subtask>/<image file>", shared by the image's two questions
            samples.append(_sample(f"{image_key}/{seen[image_key]}", [], row["question"], row["answer"], subtask,
                                   image_key, hub_row=row_index))
            seen[image_key] += 1
        samples.sort(key=lambda s: SUBTASKS.index(s.meta["subtask"]))  # stable: keeps the dataset's order within
        return samples


def _sample(sample_id: str, image_paths: list[str], question: str, answer: str, subtask: str, image_key: str,
            **meta) -> Sample:
    return Sample(id=sample_id, image_paths=image_paths, question=question, answers=[answer],
                  answer_type="yes_no", meta={"subtask": subtask, "image_key": image_key, **meta})


def _release_root(data_dir: Path) -> Path:
    """The folder holding the subtask folders: ``data_dir`` or a release folder inside it."""
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"MME data_dir {data_dir} does not exist; download and unzip MME_Benchmark_release_version "
            "(see the MME repository) and pass data_dir= that folder"
        )
    for relative in RELEASE_DIRS:
        root = data_dir / relative
        if any((root / subtask).is_dir() for subtask in SUBTASKS):
            return root
    raise FileNotFoundError(
        f"{data_dir} holds none of the MME subtask folders {list(SUBTASKS)} (also looked in {list(RELEASE_DIRS[1:])}); "
        "pass data_dir= the unzipped MME_Benchmark_release_version folder"
    )


def _load_local(data_dir: Path, wanted: tuple[str, ...]) -> list[Sample]:
    root = _release_root(data_dir)
    samples: list[Sample] = []
    missing = [subtask for subtask in wanted if not (root / subtask).is_dir()]
    if missing:
        logger.warning("MME subtask folder(s) missing under %s: %s", root, ", ".join(missing))
    for subtask in wanted:
        folder = root / subtask
        if not folder.is_dir():
            continue
        if (folder / "questions_answers_YN").is_dir():
            text_dir, image_dir = folder / "questions_answers_YN", folder / "images"
        else:
            text_dir = image_dir = folder
        text_files = sorted(text_dir.glob("*.txt"))
        if not text_files:
            raise ValueError(f"{text_dir} holds no question files (<image name>.txt); is the MME folder complete?")
        for text_file in text_files:
            image = next((image_dir / (text_file.stem + suffix) for suffix in IMAGE_SUFFIXES
                          if (image_dir / (text_file.stem + suffix)).is_file()), None)
            if image is None:
                raise ValueError(f"{text_file}: no image {text_file.stem}.jpg/.png in {image_dir}")
            image_key = f"{subtask}/{image.name}"
            questions = _read_questions(text_file)
            for index, (question, answer) in enumerate(questions):
                samples.append(_sample(f"{image_key}/{index}", [str(image.resolve())], question, answer, subtask,
                                       image_key))
    if not samples:
        raise FileNotFoundError(f"no MME questions found under {root} for subtasks {list(wanted)}")
    return samples


def _read_questions(path: Path) -> list[tuple[str, str]]:
    """``(question, "Yes" | "No")`` per non-blank line of an MME ``.txt`` file."""
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise ValueError(f"{path}:{number}: expected 'question<TAB>answer', got {line!r}")
        question, answer = (part.strip() for part in line.rsplit("\t", 1))
        if not question or answer.lower() not in ("yes", "no"):
            raise ValueError(f"{path}:{number}: expected a question and the answer Yes or No, got {line!r}")
        questions.append((question, answer))
    if not questions:
        raise ValueError(f"{path} holds no questions; write 'question<TAB>Yes|No' lines")
    return questions
