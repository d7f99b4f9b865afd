"""POPE (Li et al., "Evaluating Object Hallucination in Large Vision-Language Models", EMNLP 2023).

Yes/no questions "Is there a <object> in the image?" about COCO val2014 images, with three ways of
choosing the absent objects: ``random``, ``popular`` and ``adversarial`` (3,000 questions each,
half "yes").

Local data (``data_dir``), in the layout of the POPE repository (github.com/RUCAIBox/POPE,
``output/coco/``) plus COCO's val2014 images::

    data_dir/coco_pope_random.json        # JSONL despite the suffix: one object per line with
    data_dir/coco_pope_popular.json       #   question_id, image, text, label ("yes" / "no")
    data_dir/coco_pope_adversarial.json
    data_dir/val2014/COCO_val2014_000000310196.jpg ...

The JSONL files may also sit in ``data_dir/coco/`` (LLaVA-1.5's ``playground/data/eval/pope`` layout).

Without ``data_dir`` the questions come from the Hub (``hub_id``, default ``lmms-lab/POPE``), assuming its
``default`` config with the split ``test`` (columns ``question_id``, ``question``, ``answer``,
``image_source``, ``image``, ``category`` = split name); images are written once to ``image_cache_dir``.

Answer rule (POPE's ``evaluate.py``, also used by LLaVA-1.5's ``eval_pope.py``, described in words):
keep the text before the first period, delete commas, split into words; if any word is "no" or "not" the
answer is "no", otherwise it is "yes". Here words are compared case-insensitively after stripping
surrounding punctuation (the original compares "No", "no", "not" exactly), so "NO!" is "no" as well.
"isn't" contains no "not" word and counts as "yes", as in the original.

Metrics per split, in percent, with "yes" as the positive class: accuracy, precision, recall, F1 and the
yes-ratio (share of "yes" predictions); their mean over the evaluated splits under ``avg/``; the headline
``f1`` is the mean F1, as papers report (and ``accuracy`` the mean accuracy).
"""

from __future__ import annotations

import logging
import string
from collections.abc import Sequence
from pathlib import Path

from eval.benchmarks import _hub
from eval.benchmarks.base import (Benchmark, Sample, check_data_folder, check_limit, data_path, iter_jsonl,
                                  load_local_or_hub)

__all__ = ["POPEBenchmark", "SPLITS", "pope_answer", "pope_metrics"]

logger = logging.getLogger(__name__)

SPLITS = ("random", "popular", "adversarial")
FILE_PATTERN = "coco_pope_{split}.json"
IMAGES_DIR = "val2014"
DEFAULT_HUB_ID = "lmms-lab/POPE"
HUB_SPLIT = "test"
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
DOWNLOAD_HINT = (
    "get coco_pope_{random,popular,adversarial}.json from https://github.com/RUCAIBox/POPE (output/coco/) "
    "and COCO's val2014 images from https://cocodataset.org"
)
# LLaVA-1.5's instruction for short-answer VQA, used for POPE too (its llava_pope_test.jsonl).
SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."
_NEGATIVE_WORDS = frozenset({"no", "not"})


def pope_answer(text: str | None) -> str | None:
    """The yes/no answer read from a free-form prediction by POPE's rule (see the module docstring).

    ``"No, there is not."`` -> ``"no"``; ``"Yes."`` -> ``"yes"``; ``"There is a dog. No cat."`` ->
    ``"yes"`` (only the first sentence counts); ``"I cannot tell"`` -> ``"yes"``; None -> None.
    """
    if text is None:
        return None
    first_sentence = text.split(".", 1)[0].replace(",", "")
    words = {word.strip(string.punctuation).lower() for word in first_sentence.split()}
    return "no" if words & _NEGATIVE_WORDS else "yes"


def pope_metrics(labels: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio in percent; "yes" is the positive class.

    ``labels`` and ``predictions`` are parallel sequences of "yes" / "no". When nothing is predicted
    "yes", precision (TP / (TP + FP)) has no denominator and is defined as 0; likewise recall is 0 when
    no label is "yes", and F1 is 0 when precision + recall is 0 (scikit-learn's ``zero_division=0``).

    Raises:
        ValueError: the sequences differ in length, are empty, or hold something other than "yes" / "no".
    """
    if len(labels) != len(predictions):
        raise ValueError(f"pope_metrics() got {len(labels)} labels but {len(predictions)} predictions")
    if not labels:
        raise ValueError("pope_metrics() got no records: there is nothing to score")
    for value in (*labels, *predictions):
        if value not in ("yes", "no"):
            raise ValueError(f"pope_metrics() expects 'yes' / 'no' values, got {value!r}")
    pairs = list(zip(labels, predictions))
    tp = sum(1 for label, pred in pairs if label == "yes" and pred == "yes")
    fp = sum(1 for label, pred in pairs if label == "no" and pred == "yes")
    fn = sum(1 for label, pred in pairs if label == "yes" and pred == "no")
    tn = len(pairs) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / len(pairs),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / len(pairs),
    }


class POPEBenchmark(Benchmark):
    """POPE on COCO: the random, popular and adversarial splits (sample ids ``"<split>/<question_id>"``).

    Args:
        data_dir: folder in the POPE layout (see the module docstring); None loads ``hub_id``.
        limit: keep only the first ``limit`` questions of each split (all when None), so that every
            split stays represented.
        splits: which splits to load, in this order (default all three).
        hub_id: Hugging Face dataset id used when ``data_dir`` is None.
        image_cache_dir: where Hub images are written (default ``$DYMU_CACHE_DIR/benchmarks/pope``,
            or ``~/.cache/dymu/benchmarks/pope``); unused for local data.
        allow_external_images: accept ``image`` paths in the local split files that lead outside ``data_dir``
            (absolute, or with ``..``); refused by default. A ``val2014`` symlink to a shared COCO copy is fine.

    Raises:
        FileNotFoundError: ``data_dir``, a split's file, or an image is missing.
        ValueError: a line is malformed (the message names the file and line), an unknown split, or (without
            ``allow_external_images``) an image outside ``data_dir``.
    """

    name = "pope"

    def __init__(
        self,
        data_dir: str | None = None,
        limit: int | None = None,
        splits: Sequence[str] = SPLITS,
        hub_id: str | None = DEFAULT_HUB_ID,
        image_cache_dir: str | None = None,
        allow_external_images: bool = False,
    ) -> None:
        check_limit(limit)
        self.allow_external_images = bool(allow_external_images)
        self.splits = tuple(str(split) for split in splits)
        unknown = [split for split in self.splits if split not in SPLITS]
        if unknown or not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits must be distinct names among {list(SPLITS)}, got {list(self.splits)}")
        self.hub_id = hub_id
        by_split, self.data_dir = load_local_or_hub(
            data_dir, hub_id,
            lambda local: _load_local(local, self.splits, hub_id, self.allow_external_images),
            lambda hub: _load_hub(hub, self.splits, _hub.cache_dir(image_cache_dir, self.name).resolve()),
            "POPEBenchmark needs data_dir (a folder with coco_pope_<split>.json files) or hub_id", resolve=True,
        )
        source = str(self.data_dir) if self.data_dir is not None else hub_id
        self._samples = [s for split in self.splits for s in by_split[split][:limit]]
        logger.info("loaded %d POPE questions (%s) from %s", len(self._samples), ", ".join(self.splits), source)


    def prompt(self, sample: Sample) -> str:
        """The question followed by LLaVA-1.5's single-word-or-phrase instruction."""
        return sample.question + SHORT_ANSWER_PROMPT

    def score(self, records: list[dict]) -> dict[str, float]:
        """Per-split and averaged POPE metrics in percent (see :func:`pope_metrics`).

        Keys: ``"<split>/<metric>"`` for each split present in ``records``, ``"avg/<metric>"`` (mean over
        those splits), and the headlines ``"f1"`` (= ``avg/f1``) and ``"accuracy"`` (= ``avg/accuracy``);
        metric is one of accuracy, precision, recall, f1, yes_ratio. The split of a record comes from its
        ``meta["split"]`` if present, else from its id ``"<split>/<question_id>"``. The label is the
        record's first answer. A record whose 'prediction' is None (a failed sample) counts as the wrong
        answer (the opposite of its label) in every metric. No records, no metrics.
        """
        by_split: dict[str, tuple[list[str], list[str]]] = {}
        for record in records:
            split = _split_of(record)
            label = str(record["answers"][0]).strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"record {record.get('id')!r}: POPE label must be 'yes' or 'no', got {label!r}")
            predicted = pope_answer(record["prediction"])
            if predicted is None:
                predicted = "no" if label == "yes" else "yes"
            labels, predictions = by_split.setdefault(split, ([], []))
            labels.append(label)
            predictions.append(predicted)
        if not by_split:
            return {}
        metrics: dict[str, float] = {}
        ordered = [split for split in SPLITS if split in by_split]
        for split in ordered:
            for key, value in pope_metrics(*by_split[split]).items():
                metrics[f"{split}/{key}"] = value
        for key in METRICS:
            metrics[f"avg/{key}"] = sum(metrics[f"{split}/{key}"] for split in ordered) / len(ordered)
        metrics["f1"] = metrics["avg/f1"]
        metrics["accuracy"] = metrics["avg/accuracy"]
        return metrics


def _split_of(record: dict) -> str:
    split = (record.get("meta") or {}).get("split")
    if split is None:
        split = str(record.get("id", "")).split("/", 1)[0]
    if split not in SPLITS:
        raise ValueError(
            f"record {record.get('id')!r}: cannot tell its POPE split; ids look like '<split>/<question_id>' "
            f"with split in {list(SPLITS)}"
        )
    return split


def _load_local(data_dir: Path, splits: tuple[str, ...], hub_id: str | None,
                allow_external_images: bool = False) -> dict[str, list[Sample]]:
    check_data_folder(data_dir, "POPE", DOWNLOAD_HINT, hub_id)
    images_dir = data_dir / IMAGES_DIR
    by_split = {}
    for split in splits:
        name = FILE_PATTERN.format(split=split)
        path = next((p for p in (data_dir / name, data_dir / "coco" / name) if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"{data_dir} has no {name} (looked in {data_dir} and {data_dir / 'coco'}); {DOWNLOAD_HINT}, "
                f"or choose the splits you have with splits=[...]"
            )
        by_split[split] = _read_split(path, split, images_dir, data_dir, allow_external_images)
    return by_split


def _read_split(path: Path, split: str, images_dir: Path, data_dir: Path | None = None,
                allow_external_images: bool = False) -> list[Sample]:
    """Parse and validate one POPE JSONL file; blank lines are skipped. Images must lie in ``data_dir``
    (default: ``images_dir``'s parent) unless ``allow_external_images``."""
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for line_number, where, row in iter_jsonl(path):
        missing = [key for key in ("question_id", "image", "text", "label") if key not in row]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}; every line needs question_id, image, text, label")
        for key in ("image", "text"):
            if not isinstance(row[key], str) or not row[key].strip():
                raise ValueError(f"{where}: {key!r} must be a non-empty string, got {row[key]!r}")
        label = row["label"]
        if label not in ("yes", "no"):
            raise ValueError(f"{where}: 'label' must be 'yes' or 'no', got {label!r}")
        qid = str(row["question_id"])
        if qid in seen:
            raise ValueError(f"{where}: duplicate question_id {qid!r} (first on line {seen[qid]})")
        seen[qid] = line_number
        image_path = data_path(images_dir, row["image"], data_dir or images_dir.parent, where,
                               allow_external=allow_external_images)
        if not image_path.is_file():
            raise FileNotFoundError(
                f"{where}: image {image_path} does not exist; put COCO's val2014 images in {images_dir}"
            )
        samples.append(
            Sample(
                id=f"{split}/{qid}",
                image_paths=[str(image_path)],
                question=row["text"],
                answers=[label],
                answer_type="yes_no",
                meta={"split": split, "question_id": row["question_id"], "image": row["image"]},
            )
        )
    if not samples:
        raise ValueError(f"{path} holds no questions; it should have one JSON object per line")
    return samples


def _load_hub(hub_id: str, splits: tuple[str, ...], cache: Path) -> dict[str, list[Sample]]:
    """Questions of ``hub_id``'s ``test`` split grouped by its ``category`` column; images cached as files."""
    local_hint = "a local copy of POPE"
    image_feature = _hub.hub_image_feature(hub_id, local_hint)
    rows = _hub.load_dataset(hub_id, split=HUB_SPLIT, local_hint=local_hint)
    rows = rows.cast_column("image", image_feature(decode=False))
    image_dir = cache / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[Sample]] = {split: [] for split in splits}
    for row in rows:
        split = row["category"]
        if split not in by_split:
            continue
        name = Path(str(row["image_source"])).name
        path = image_dir / (name if Path(name).suffix else f"{name}.jpg")
        if not path.is_file():
            path.write_bytes(row["image"]["bytes"] or Path(row["image"]["path"]).read_bytes())
        label = str(row["answer"]).strip().lower()
        by_split[split].append(Sample(id=f"{split}/{row['question_id']}", image_paths=[str(path)],
                                      question=row["question"], answers=[label], answer_type="yes_no",
                                      meta={"split": split, "question_id": row["question_id"], "image": path.name}))
    return by_split
