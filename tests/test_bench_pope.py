"""POPE: loading the official JSONL splits, validation errors, prompt, answer rule, per-split metrics, eval.py."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from eval.benchmarks.base import Benchmark, Sample
from eval.benchmarks.pope import POPEBenchmark, pope_answer, pope_metrics
from eval.runner import read_predictions

FIXTURE = REPO / "tests" / "fixtures" / "pope"
IDS = ["random/1", "random/2", "popular/1", "popular/2", "adversarial/1", "adversarial/2"]


def run_script(args, tiny_cache, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               DYMU_CACHE_DIR=str(tiny_cache), DYMU_OUTPUT_DIR=str(tmp_path / "outputs"))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A writable copy of the fixture."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "pope"))


def record(sample_id: str, prediction, label: str) -> dict:
    return {"id": sample_id, "prediction": prediction, "answers": [label], "answer_type": "yes_no"}


def test_fixture_loads_all_splits_with_unique_ids_and_absolute_paths():
    bench = POPEBenchmark(str(FIXTURE))
    samples = bench.samples()
    assert isinstance(bench, Benchmark) and bench.name == "pope"
    assert [s.id for s in samples] == IDS
    assert [s.answers for s in samples] == [["yes"], ["no"]] * 3
    assert all(isinstance(s, Sample) and s.answer_type == "yes_no" for s in samples)
    assert [s.meta["split"] for s in samples] == ["random"] * 2 + ["popular"] * 2 + ["adversarial"] * 2
    assert samples[0].image_paths == [str(FIXTURE.resolve() / "val2014" / "COCO_val2014_000000310196.jpg")]
    assert all(Path(p).is_absolute() and Path(p).is_file() for s in samples for p in s.image_paths)
    assert samples[1].question == "Is there a giraffe in the image?"


def test_splits_and_limit_per_split():
    assert [s.id for s in POPEBenchmark(str(FIXTURE), limit=1).samples()] == ["random/1", "popular/1", "adversarial/1"]
    assert [s.id for s in POPEBenchmark(str(FIXTURE), splits=["adversarial"]).samples()] == IDS[4:]
    with pytest.raises(ValueError, match="splits must be distinct names among"):
        POPEBenchmark(str(FIXTURE), splits=["gqa"])


def test_llava_layout_with_coco_subfolder(tmp_path):
    root = tmp_path / "pope"
    shutil.copytree(FIXTURE / "val2014", root / "val2014")
    (root / "coco").mkdir()
    for path in FIXTURE.glob("coco_pope_*.json"):
        shutil.copy(path, root / "coco" / path.name)
    assert [s.id for s in POPEBenchmark(str(root)).samples()] == IDS


def test_prompt_is_llava15_short_answer_format():
    bench = POPEBenchmark(str(FIXTURE), limit=1)
    assert bench.prompt(bench.samples()[0]) == (
        "Is there a dining table in the image?\nAnswer the question using a single word or phrase."
    )


def test_missing_data_dir_split_file_and_image_say_what_to_do(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; get coco_pope_.*RUCAIBox/POPE.*data_dir=null"):
        POPEBenchmark(str(tmp_path / "nowhere"))
    (data_dir / "coco_pope_popular.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no coco_pope_popular\.json.*splits=\[\.\.\.\]"):
        POPEBenchmark(str(data_dir))
    assert len(POPEBenchmark(str(data_dir), splits=["random", "adversarial"]).samples()) == 4
    (data_dir / "val2014" / "COCO_val2014_000000429913.jpg").unlink()
    path = data_dir / "coco_pope_adversarial.json"
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(path))}:1: image .*429913\.jpg does not exist"):
        POPEBenchmark(str(data_dir), splits=["adversarial"])


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "not valid JSON"),
        ('{"question_id": 3, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a cat?"}',
         r"missing key\(s\) \['label'\]"),
        ('{"question_id": 3, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a cat?", "label": "maybe"}',
         "'label' must be 'yes' or 'no'"),
        ('{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a cat?", "label": "no"}',
         "duplicate question_id '1'"),
    ],
)
def test_malformed_line_names_file_and_line(data_dir, bad_line, message):
    path = data_dir / "coco_pope_random.json"
    path.write_text(path.read_text() + "\n" + bad_line + "\n")  # lines 1-2 valid, 3 blank, 4 bad
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:4: {message}"):
        POPEBenchmark(str(data_dir))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("NO!", "no"),
        ("Not really", "no"),
        ("There is not a dog in the image.", "no"),
        ("Yes, no doubt.", "no"),  # any "no" word in the first sentence
        ("There is a dog. No cat.", "yes"),  # only the first sentence counts
        ("There isn't one", "yes"),  # "isn't" is not the word "not" (as in POPE's rule)
        ("I don't know", "yes"),
        ("Nothing", "yes"),
        ("", "yes"),
        (None, None),
    ],
)
def test_pope_answer_rule(text, expected):
    assert pope_answer(text) == expected


def test_pope_metrics_by_hand_and_zero_yes_predictions():
    # TP=1 FN=2 FP=1 TN=1
    m = pope_metrics(["yes", "yes", "yes", "no", "no"], ["yes", "no", "no", "yes", "no"])
    assert m == pytest.approx({"accuracy": 40.0, "precision": 50.0, "recall": 100 / 3, "f1": 40.0, "yes_ratio": 40.0})
    # nothing predicted "yes": precision has no denominator and is defined as 0, so is F1
    m = pope_metrics(["yes", "no", "no", "yes"], ["no", "no", "no", "no"])
    assert m == {"accuracy": 50.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    # no "yes" label: recall is defined as 0
    assert pope_metrics(["no", "no"], ["yes", "no"])["recall"] == 0.0
    with pytest.raises(ValueError, match="2 labels but 1 predictions"):
        pope_metrics(["yes", "no"], ["yes"])
    with pytest.raises(ValueError, match="expects 'yes' / 'no'"):
        pope_metrics(["yes"], ["maybe"])


def test_score_per_split_average_and_failed_samples():
    records = [
        # random: predictions yes, no, no (failed, label yes -> counted wrong), yes, no -> TP1 FN2 FP1 TN1
        record("random/1", "Yes", "yes"),
        record("random/2", "No, there is not.", "yes"),
        record("random/3", None, "yes"),
        record("random/4", "yes", "no"),
        record("random/5", "No.", "no"),
        # popular: every prediction "no" -> precision defined as 0
        record("popular/1", "No", "yes"),
        record("popular/2", "no.", "no"),
        record("popular/3", "There is not.", "no"),
        record("popular/4", "I do not see one", "yes"),
        # adversarial: TP1 FP1 (the failed "no" sample counts as a wrong "yes")
        record("adversarial/1", "Yes, there is a kite.", "yes"),
        record("adversarial/2", None, "no"),
    ]
    bench = POPEBenchmark(str(FIXTURE), limit=1)
    m = bench.score(records)
    expected = {
        "random/accuracy": 40.0, "random/precision": 50.0, "random/recall": 100 / 3, "random/f1": 40.0,
        "random/yes_ratio": 40.0,
        "popular/accuracy": 50.0, "popular/precision": 0.0, "popular/recall": 0.0, "popular/f1": 0.0,
        "popular/yes_ratio": 0.0,
        "adversarial/accuracy": 50.0, "adversarial/precision": 50.0, "adversarial/recall": 100.0,
        "adversarial/f1": 200 / 3, "adversarial/yes_ratio": 100.0,
        "avg/accuracy": 140 / 3, "avg/precision": 100 / 3, "avg/recall": (100 / 3 + 100) / 3,
        "avg/f1": (40 + 200 / 3) / 3, "avg/yes_ratio": 140 / 3,
    }
    expected["f1"] = expected["avg/f1"]
    expected["accuracy"] = expected["avg/accuracy"]
    assert m == pytest.approx(expected)
    assert set(m) == set(expected)
    # only the splits present are reported and averaged; the split may also come from meta
    only = bench.score([dict(record("x", "yes", "yes"), meta={"split": "popular"})])
    assert only["f1"] == only["popular/f1"] == 100.0 and "random/f1" not in only
    assert bench.score([]) == {}
    with pytest.raises(ValueError, match="cannot tell its POPE split"):
        bench.score([record("7", "yes", "yes")])


def test_eval_script_runs_pope_fixture_end_to_end(tiny_cache, tmp_path):
    result = run_script([str(REPO / "scripts" / "eval.py"), "model=llava15_tiny", "dymu=low", "benchmark=pope",
                         f"benchmark.task.data_dir={FIXTURE}", "wandb.mode=disabled"], tiny_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out_dir = tmp_path / "outputs" / "eval" / "llava15_tiny" / "low" / "pope"
    records = read_predictions(out_dir / "predictions.jsonl")
    assert [r["id"] for r in records] == IDS
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["benchmark"] == "pope" and metrics["n_samples"] == 6
    assert 0.0 <= metrics["metrics"]["f1"] <= 100.0
    assert {f"{split}/f1" for split in ("random", "popular", "adversarial")} <= set(metrics["metrics"])
