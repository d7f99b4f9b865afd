"""TextVQA val (Singh et al., "Towards VQA Models That Can Read", CVPR 2019): questions that need reading.

Local data (``data_dir``), in the layout of the official download (textvqa.org/dataset)::

    data_dir/TextVQA_0.5.1_val.json               # {"data": [{"question_id", "image_id", "question",
                                                  #            "answers": [10 strings], ...}, ...]}
    data_dir/train_images/<image_id>.jpg          # val images ship in the train_images archive
    data_dir/TextVQA_Rosetta_OCR_v0.2_val.json    # optional: {"data": [{"image_id", "ocr_tokens"}, ...]}

OCR tokens for the prompt come from the Rosetta file when it is there, else from an ``ocr_tokens`` field
of each question entry (as in the Hub copy).

Without ``data_dir`` the questions come from the Hub (``hub_id``, default ``lmms-lab/textvqa``), assuming
its split ``validation`` with the columns ``question_id``, ``image_id``, ``question``, ``answers``,
``ocr_tokens`` and ``image``; images are written once to ``image_cache_dir``.

Prompt: LLaVA-1.5's TextVQA question file (``llava_textvqa_val_v051_ocr.jsonl``), e.g.
``"What is the brand of this camera?\\nReference OCR token: DAKOTA, DIGITAL, Single-Use, Camera, Pire,
digitat\\nAnswer the question using a single word or phrase."``: the question with its first letter
upper-cased, the OCR line (tokens joined by ", "), then the short-answer instruction. ``use_ocr=False``
(or an image without OCR tokens) leaves the OCR line out.

Metric: the standard VQA accuracy (%), see :mod:`eval.benchmarks.vqa_accuracy`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from eval.benchmarks import _hub
from eval.benchmarks.base import (Benchmark, Sample, check_data_folder, check_limit, data_path, load_json,
                                  load_local_or_hub)
from eval.benchmarks.vqa_accuracy import vqa_accuracy
from eval.metrics import mean

__all__ = ["TextVQABenchmark"]

logger = logging.getLogger(__name__)

QUESTIONS_FILE = "TextVQA_0.5.1_val.json"
OCR_FILE = "TextVQA_Rosetta_OCR_v0.2_val.json"
IMAGES_DIR = "train_images"
DEFAULT_HUB_ID = "lmms-lab/textvqa"
HUB_SPLIT = "validation"
DOWNLOAD_HINT = (
    f"download {QUESTIONS_FILE}, the train_val images and (for use_ocr) {OCR_FILE} from https://textvqa.org/dataset"
)
OCR_PREFIX = "\nReference OCR token: "
# LLaVA-1.5's instruction for short-answer VQA (its TextVQA question file).
SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."


class TextVQABenchmark(Benchmark):
    """TextVQA val (5,000 questions, 10 human answers each), scored by VQA accuracy.

    Args:
        data_dir: folder in the official layout (see the module docstring); None loads ``hub_id``.
        limit: keep only the first ``limit`` questions (all when None).
        use_ocr: put the "Reference OCR token: ..." line in the prompt (LLaVA-1.5's protocol).
        hub_id: Hugging Face dataset id used when ``data_dir`` is None.
        image_cache_dir: where Hub images are written (default ``$DYMU_CACHE_DIR/benchmarks/textvqa``,
            or ``~/.cache/dymu/benchmarks/textvqa``); unused for local data.
        allow_external_images: accept ``image_id`` values in the local questions JSON that lead outside
            ``data_dir`` (absolute, or with ``..``); refused by default.

    Raises:
        FileNotFoundError: ``data_dir``, the questions JSON, or an image is missing.
        ValueError: an entry is malformed (the message names the file, entry index and question id),
            ``use_ocr`` is set and a question has no OCR tokens from either source, or an entry's image lies
            outside ``data_dir`` without ``allow_external_images``.
    """

    name = "textvqa"

    def __init__(
        self,
        data_dir: str | None = None,
        limit: int | None = None,
        use_ocr: bool = True,
        hub_id: str | None = DEFAULT_HUB_ID,
        image_cache_dir: str | None = None,
        allow_external_images: bool = False,
    ) -> None:
        check_limit(limit)
        self.use_ocr = bool(use_ocr)
        self.hub_id = hub_id
        self.allow_external_images = bool(allow_external_images)
        self._samples, self.data_dir = load_local_or_hub(
            data_dir, hub_id,
            lambda local: _load_local(local, self.use_ocr, hub_id, self.allow_external_images),
            lambda hub: _load_hub(hub, _hub.cache_dir(image_cache_dir, self.name).resolve()),
            f"TextVQABenchmark needs data_dir (a folder with {QUESTIONS_FILE}) or hub_id", resolve=True,
        )
        source = str(self.data_dir) if self.data_dir is not None else hub_id
        if limit is not None:
            self._samples = self._samples[:limit]
        logger.info("loaded %d TextVQA questions from %s (OCR in prompt: %s)", len(self._samples), source, self.use_ocr)


    def prompt(self, sample: Sample) -> str:
        """Question (first letter upper-cased), OCR line if ``use_ocr`` and any tokens, instruction."""
        question = sample.question[:1].upper() + sample.question[1:]
        tokens = sample.meta.get("ocr_tokens") or []
        ocr = OCR_PREFIX + ", ".join(tokens) if self.use_ocr and tokens else ""
        return question + ocr + SHORT_ANSWER_PROMPT

    def score(self, records: list[dict]) -> dict[str, float]:
        """``{"accuracy": %}``: mean VQA accuracy (see :func:`~eval.benchmarks.vqa_accuracy.vqa_accuracy`).

        A record whose 'prediction' is None (a failed sample) scores 0; no records, no metric.
        """
        if not records:
            return {}
        return {"accuracy": 100.0 * mean(vqa_accuracy(r["prediction"], r["answers"]) for r in records)}


def _read_json_data(path: Path) -> list:
    """The ``data`` list of an official TextVQA JSON file."""
    content = load_json(path, f"re-download {path.name}")
    if not isinstance(content, dict) or not isinstance(content.get("data"), list):
        raise ValueError(f'{path}: expected a JSON object with a "data" list, as in the official release')
    return content["data"]


def _is_string_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _read_ocr(path: Path) -> dict[str, list[str]]:
    """image_id -> OCR tokens of the official Rosetta OCR file."""
    tokens: dict[str, list[str]] = {}
    for index, entry in enumerate(_read_json_data(path)):
        if not isinstance(entry, dict) or not isinstance(entry.get("image_id"), str):
            raise ValueError(f"{path} data[{index}]: needs a string 'image_id'")
        if not _is_string_list(entry.get("ocr_tokens")):
            raise ValueError(
                f"{path} data[{index}] (image {entry['image_id']!r}): 'ocr_tokens' must be a list of strings"
            )
        tokens[entry["image_id"]] = entry["ocr_tokens"]
    return tokens


def _load_local(
    data_dir: Path, use_ocr: bool, hub_id: str | None, allow_external_images: bool = False
) -> list[Sample]:
    check_data_folder(data_dir, "TextVQA", DOWNLOAD_HINT, hub_id)
    path = data_dir / QUESTIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir} has no {QUESTIONS_FILE}; {DOWNLOAD_HINT}")
    ocr_path = data_dir / OCR_FILE
    ocr = _read_ocr(ocr_path) if ocr_path.is_file() else None
    images_dir = data_dir / IMAGES_DIR
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(_read_json_data(path)):
        where = f"{path} data[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        missing = [key for key in ("question_id", "image_id", "question", "answers") if key not in entry]
        if missing:
            raise ValueError(
                f"{where}: missing key(s) {missing}; every entry needs question_id, image_id, question, answers"
            )
        qid = str(entry["question_id"])
        where = f"{where} (question_id {qid})"
        for key in ("image_id", "question"):
            if not isinstance(entry[key], str) or not entry[key].strip():
                raise ValueError(f"{where}: {key!r} must be a non-empty string, got {entry[key]!r}")
        if not _is_string_list(entry["answers"]) or not entry["answers"]:
            raise ValueError(f"{where}: 'answers' must be a non-empty list of strings, got {entry['answers']!r}")
        if qid in seen:
            raise ValueError(f"{where}: duplicate question_id (first in data[{seen[qid]}])")
        seen[qid] = index
        image_id = entry["image_id"]
        if ocr is not None:
            if image_id not in ocr and use_ocr:
                raise ValueError(f"{where}: image {image_id!r} has no entry in {ocr_path}; use the OCR file of "
                                 "the same split, or use_ocr=false")
            tokens = ocr.get(image_id, [])
        elif "ocr_tokens" in entry:
            if not _is_string_list(entry["ocr_tokens"]):
                raise ValueError(f"{where}: 'ocr_tokens' must be a list of strings, got {entry['ocr_tokens']!r}")
            tokens = entry["ocr_tokens"]
        elif use_ocr:
            raise ValueError(
                f"{where}: no OCR tokens for the prompt; put {OCR_FILE} in {data_dir}, or set use_ocr=false "
                "(benchmark.task.use_ocr=false) to prompt without them"
            )
        else:
            tokens = []
        image_path = data_path(images_dir, f"{image_id}.jpg", data_dir, where, allow_external=allow_external_images)
        if not image_path.is_file():
            raise FileNotFoundError(
                f"{where}: image {image_path} does not exist; unpack the TextVQA train_val images into {images_dir}"
            )
        samples.append(
            Sample(
                id=qid,
                image_paths=[str(image_path)],
                question=entry["question"],
                answers=list(entry["answers"]),
                answer_type="short",
                meta={"image_id": image_id, "ocr_tokens": list(tokens)},
            )
        )
    if not samples:
        raise ValueError(f"{path} holds no questions")
    return samples


def _load_hub(hub_id: str, cache: Path) -> list[Sample]:
    """Questions of ``hub_id``'s ``validation`` split; images cached as files."""
    local_hint = "a local copy of TextVQA"
    image_feature = _hub.hub_image_feature(hub_id, local_hint)
    rows = _hub.load_dataset(hub_id, split=HUB_SPLIT, local_hint=local_hint)
    rows = rows.cast_column("image", image_feature(decode=False))
    return _samples_from_hub_rows(rows, cache, hub_id)


def _samples_from_hub_rows(rows, cache: Path, source: str) -> list[Sample]:
    """Samples from Hub rows (``question_id``, ``image_id``, ``question``, ``answers``, ``ocr_tokens``,
    undecoded ``image``); each image is written once to ``cache/images``.

    Image file names come from :func:`eval.benchmarks._hub.cache_file_name` (an ``image_id`` such as
    ``../../x`` cannot leave the cache); sample ids and ``meta["image_id"]`` stay the dataset's values.

    Raises:
        ValueError: a row without ``question_id``, ``image_id``, ``question``, a list of ``answers`` or image
            bytes; nothing is written for it.
    """
    image_dir = cache / "images"
    samples = []
    for number, row in enumerate(rows):
        where = f"{source} row {number}"
        missing = [key for key in ("question_id", "image_id", "question", "answers") if row.get(key) in (None, "")]
        if missing:
            raise ValueError(f"{where}: no {missing}; every row needs question_id, image_id, question, answers")
        if not _is_string_list(row["answers"]):
            raise ValueError(f"{where}: 'answers' must be a list of strings, got {row['answers']!r}")
        path = _hub.cache_image_bytes(image_dir, row["image_id"], row.get("image"), where)
        samples.append(Sample(id=str(row["question_id"]), image_paths=[str(path)], question=row["question"],
                              answers=list(row["answers"]), answer_type="short",
                              meta={"image_id": row["image_id"], "ocr_tokens": list(row.get("ocr_tokens") or [])}))
    return samples
