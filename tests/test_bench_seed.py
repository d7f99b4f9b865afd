"""SEED-Bench image part: official SEED-Bench.json + SEED-Bench-image/ loading, errors, prompts, scoring."""

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
from eval.benchmarks.seed import QUESTION_TYPES, SEEDBenchmark, _samples_from_rows
from eval.runner import read_predictions

FIXTURE = REPO / "tests" / "fixtures" / "seed"
INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."


@pytest.fixture
def bench() -> SEEDBenchmark:
    return SEEDBenchmark(data_dir=str(FIXTURE))


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "seed"))


def edit_questions(data_dir: Path, change) -> None:
    path = data_dir / "SEED-Bench.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_fixture_keeps_image_questions_only(bench):
    samples = bench.samples()
    assert isinstance(bench, Benchmark) and bench.name == "seed" and bench.max_new_tokens <= 8
    assert [s.id for s in samples] == ["101669", "101670", "101671", "101672"]  # the video question is dropped
    assert [s.answers for s in samples] == [["B"], ["D"], ["C"], ["B"]]
    assert [s.meta["question_type"] for s in samples] == [
        "Instance Attributes", "Instances Counting", "Spatial Relation", "Instance Identity",
    ]
    for sample in samples:
        assert sample.answer_type == "multiple_choice" and sample.answers == [sample.meta["answer_letter"]]
        assert sample.image_paths == [str((FIXTURE / "SEED-Bench-image" / sample.meta["data_id"]).resolve())]
        with Image.open(sample.image_paths[0]) as image:
            assert image.format == "JPEG"
    assert samples[0].meta["options"] == {"A": "Green", "B": "Red", "C": "Blue", "D": "Yellow"}
    assert [s.id for s in SEEDBenchmark(data_dir=str(FIXTURE), limit=2).samples()] == ["101669", "101670"]


def test_question_type_table_matches_the_official_names():
    with open(FIXTURE / "SEED-Bench.json") as handle:
        assert json.load(handle)["question_type"] == QUESTION_TYPES


def test_missing_data_dir_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        SEEDBenchmark(data_dir=str(tmp_path / "nowhere"))
    assert "SEED-Bench.json" in str(err.value) and "AILab-CVC/SEED-Bench" in str(err.value)
    assert "data_dir=null" in str(err.value)


def test_missing_image_names_the_question_and_the_download(data_dir):
    (data_dir / "SEED-Bench-image" / "1454428_3399.jpg").unlink()
    with pytest.raises(ValueError, match=r"questions\[3\]: image .*1454428_3399.jpg does not exist; download"):
        SEEDBenchmark(data_dir=str(data_dir))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["questions"][0].update(answer="E"), r"questions\[0\]: answer 'E' is not one of"),
        (lambda d: d["questions"][1].update(choice_c=""), r"questions\[1\]: option\(s\) \['C'\] empty"),
        (lambda d: d["questions"][0].pop("data_id"), r"questions\[0\]: missing key\(s\) \['data_id'\]"),
        (lambda d: d["questions"][3].update(question_id="101669"), r"questions\[3\]: duplicate question_id"),
        (lambda d: d["questions"][0].update(question_type_id="x"), r"'question_type_id' must be an integer"),
        (lambda d: d.pop("questions"), r"expected a JSON object with a 'questions' list"),
    ],
)
def test_malformed_questions_name_file_question_and_fix(data_dir, change, message):
    edit_questions(data_dir, change)
    with pytest.raises(ValueError, match=message) as err:
        SEEDBenchmark(data_dir=str(data_dir))
    assert str(data_dir / "SEED-Bench.json") in str(err.value)


def test_prompt_is_question_options_instruction(bench):
    assert bench.prompt(bench.samples()[0]) == (
        "What is the main color of the object in the image?\nA. Green\nB. Red\nC. Blue\nD. Yellow" + INSTRUCTION
    )


def record(sample_id, prediction):
    return {"id": sample_id, "prediction": prediction, "answers": [], "answer_type": "multiple_choice"}


def test_score_accuracy_per_question_type(bench):
    assert bench.score([record("101669", "B"), record("101670", "Four"), record("101671", "The answer is C"),
                        record("101672", "(B)")])["accuracy"] == 100.0
    metrics = bench.score([record("101669", "Red."), record("101670", None), record("101671", "A"),
                           record("101672", "B) Triangle")])
    assert metrics == {
        "accuracy": 50.0,
        "question_type/Instance Attributes": 100.0,
        "question_type/Instances Counting": 0.0,  # failed sample
        "question_type/Spatial Relation": 0.0,
        "question_type/Instance Identity": 100.0,
    }
    with pytest.raises(ValueError, match="'v_2001' is not a sample of this seed benchmark"):
        bench.score([record("v_2001", "A")])


def test_hub_rows_become_samples_with_cached_images(tmp_path):
    common = {"choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d", "answer": "C",
              "question": "Q?", "question_type_id": 9, "data_id": "x.jpg"}
    rows = [
        {**common, "question_id": "1", "data_type": "image", "image": [Image.new("RGB", (8, 8), "red")]},
        {**common, "question_id": "2", "data_type": "video", "image": []},
    ]
    (sample,) = _samples_from_rows(rows, tmp_path, None, "hub")
    assert sample.id == "1" and sample.meta["question_type"] == "Text Understanding"
    assert Path(sample.image_paths[0]).is_file()


def run_script(args, tiny_cache, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               DYMU_CACHE_DIR=str(tiny_cache), DYMU_OUTPUT_DIR=str(tmp_path / "outputs"))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_eval_script_runs_seed_end_to_end(tiny_cache, tmp_path):
    result = run_script([str(REPO / "scripts" / "eval.py"), "model=llava15_tiny", "dymu=low", "benchmark=seed",
                         f"benchmark.task.data_dir={FIXTURE}", "wandb.mode=disabled"], tiny_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out_dir = tmp_path / "outputs" / "eval" / "llava15_tiny" / "low" / "seed"
    records = read_predictions(out_dir / "predictions.jsonl")
    assert [r["id"] for r in records] == ["101669", "101670", "101671", "101672"]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n_samples"] == 4 and "accuracy" in metrics["metrics"]
