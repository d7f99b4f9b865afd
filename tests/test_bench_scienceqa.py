"""ScienceQA-IMG test: official problems.json / pid_splits.json / images loading, errors, prompts, scoring."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO
from eval.benchmarks.base import Benchmark
from eval.benchmarks.scienceqa import ScienceQABenchmark, _samples_from_rows
from eval.runner import read_predictions

FIXTURE = REPO / "tests" / "fixtures" / "scienceqa"
INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."


@pytest.fixture
def bench() -> ScienceQABenchmark:
    return ScienceQABenchmark(data_dir=str(FIXTURE))


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A writable copy of the fixture folder, to break."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "scienceqa"))


def edit_problems(data_dir: Path, change) -> None:
    path = data_dir / "problems.json"
    problems = json.loads(path.read_text())
    change(problems)
    path.write_text(json.dumps(problems))


def test_fixture_keeps_test_questions_with_an_image_in_split_order(bench):
    samples = bench.samples()
    assert isinstance(bench, Benchmark) and bench.name == "scienceqa" and bench.max_new_tokens <= 8
    # test = 5, 7, 12, 18; 7 has no image; 1 (train) and 21 (val) are not test questions.
    assert [s.id for s in samples] == ["5", "12", "18"]
    assert [s.answers for s in samples] == [["B"], ["A"], ["B"]]
    for sample in samples:
        assert sample.answer_type == "multiple_choice" and sample.answers == [sample.meta["answer_letter"]]
        assert sample.image_paths == [str((FIXTURE / "images" / "test" / sample.id / "image.png").resolve())]
        with Image.open(sample.image_paths[0]) as image:
            assert image.format == "PNG"
    assert samples[2].meta["options"] == {"A": "one", "B": "two", "C": "three", "D": "four"}
    assert samples[2].meta["subject"] == "natural science" and samples[2].meta["grade"] == "grade10"


def test_without_pid_splits_the_split_field_decides(data_dir):
    (data_dir / "pid_splits.json").unlink()
    assert [s.id for s in ScienceQABenchmark(data_dir=str(data_dir)).samples()] == ["5", "12", "18"]
    assert [s.id for s in ScienceQABenchmark(data_dir=str(data_dir), limit=2).samples()] == ["5", "12"]


def test_missing_data_dir_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        ScienceQABenchmark(data_dir=str(tmp_path / "nowhere"))
    assert "problems.json" in str(err.value) and "lupantech/ScienceQA" in str(err.value)
    assert "data_dir=null" in str(err.value)


def test_missing_image_names_the_problem_and_the_download(data_dir):
    (data_dir / "images" / "test" / "12" / "image.png").unlink()
    with pytest.raises(ValueError, match=r"problem '12': image .*image.png does not exist; get .*images/test"):
        ScienceQABenchmark(data_dir=str(data_dir))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p["5"].update(answer=3), r"problem '5': 'answer' must be the index \(0..2\)"),
        (lambda p: p["5"].update(answer="B"), r"problem '5': 'answer' must be the index"),
        (lambda p: p["12"].update(choices=["only"]), r"problem '12': 'choices' must be a list of at least 2"),
        (lambda p: p["18"].pop("question"), r"problem '18': missing key\(s\) \['question'\]"),
        (lambda p: p.pop("12"), r"pid_splits.json: test id\(s\) \['12'\] are not in"),
    ],
)
def test_malformed_problems_name_file_problem_and_fix(data_dir, change, message):
    edit_problems(data_dir, change)
    with pytest.raises(ValueError, match=message) as err:
        ScienceQABenchmark(data_dir=str(data_dir))
    assert str(data_dir) in str(err.value)


def test_invalid_json_names_the_line(data_dir):
    (data_dir / "problems.json").write_text('{\n"5": {,\n}')
    with pytest.raises(ValueError, match=r"problems.json:2: not valid JSON"):
        ScienceQABenchmark(data_dir=str(data_dir))


def test_prompts_put_the_context_first_only_when_there_is_one(bench):
    first, second, _ = bench.samples()
    assert bench.prompt(first) == (
        "Context: Look at the picture.\nWhich color is the shape?\nA. blue\nB. red\nC. green" + INSTRUCTION
    )
    assert bench.prompt(second) == "Which shape is on the map?\nA. circle\nB. square" + INSTRUCTION


def record(sample_id, prediction):
    return {"id": sample_id, "prediction": prediction, "answers": [], "answer_type": "multiple_choice"}


def test_score_accuracy_per_subject_and_grade(bench):
    assert bench.score([record("5", "B"), record("12", "(A) circle"), record("18", "two")])["accuracy"] == 100.0
    # 5 (natural, grade2) right; 12 (social, grade8) failed -> wrong; 18 (natural, grade10) ambiguous -> wrong.
    metrics = bench.score([record("5", "The answer is B."), record("12", None), record("18", "one or two")])
    assert metrics["accuracy"] == pytest.approx(100 / 3)
    assert metrics["subject/natural science"] == 50.0
    assert metrics["subject/social science"] == 0.0
    assert metrics["grade/G1-6"] == 100.0 and metrics["grade/G7-12"] == 0.0
    assert set(metrics) == {"accuracy", "subject/natural science", "subject/social science", "grade/G1-6",
                            "grade/G7-12"}
    with pytest.raises(ValueError, match="'7' is not a sample of this scienceqa benchmark"):
        bench.score([record("7", "A")])


def test_hub_rows_become_samples_with_cached_images(tmp_path):
    rows = [
        {"image": Image.new("RGB", (8, 8), "red"), "question": "Q?", "choices": ["a", "b"], "answer": 1,
         "hint": "", "subject": "natural science", "grade": "grade1"},
        {"image": None, "question": "No image?", "choices": ["a", "b"], "answer": 0, "hint": ""},
    ]
    (sample,) = _samples_from_rows(rows, tmp_path, None, "hub")
    assert sample.id == "0" and sample.answers == ["B"] and Path(sample.image_paths[0]).is_file()


def run_script(args, tiny_cache, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               DYMU_CACHE_DIR=str(tiny_cache), DYMU_OUTPUT_DIR=str(tmp_path / "outputs"))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_eval_script_runs_scienceqa_end_to_end(tiny_cache, tmp_path):
    result = run_script([str(REPO / "scripts" / "eval.py"), "model=llava15_tiny", "dymu=low", "benchmark=scienceqa",
                         f"benchmark.task.data_dir={FIXTURE}", "wandb.mode=disabled"], tiny_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out_dir = tmp_path / "outputs" / "eval" / "llava15_tiny" / "low" / "scienceqa"
    records = read_predictions(out_dir / "predictions.jsonl")
    assert [r["id"] for r in records] == ["5", "12", "18"]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n_samples"] == 3 and "accuracy" in metrics["metrics"]
