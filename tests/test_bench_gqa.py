"""GQA testdev-balanced: loading the official (and LLaVA) layouts, validation errors, prompt, scoring, eval.py."""

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
from eval.benchmarks.gqa import GQABenchmark, gqa_match, normalize_gqa_answer
from eval.runner import read_predictions

FIXTURE = REPO / "tests" / "fixtures" / "gqa"
QUESTIONS = "testdev_balanced_questions.json"


def run_script(args, tiny_cache, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               DYMU_CACHE_DIR=str(tiny_cache), DYMU_OUTPUT_DIR=str(tmp_path / "outputs"))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A writable copy of the fixture."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "gqa"))


def edit_questions(data_dir: Path, edit) -> Path:
    path = data_dir / QUESTIONS
    questions = json.loads(path.read_text())
    edit(questions)
    path.write_text(json.dumps(questions))
    return path


def test_fixture_loads_in_file_order_with_absolute_image_paths():
    bench = GQABenchmark(str(FIXTURE))
    samples = bench.samples()
    assert isinstance(bench, Benchmark) and bench.name == "gqa"
    assert [s.id for s in samples] == ["20968379", "20968380", "201307251", "201307252", "05451384"]
    assert [s.answers for s in samples] == [["red"], ["yes"], ["right"], ["square"], ["yes"]]
    assert all(isinstance(s, Sample) and s.answer_type == "short" for s in samples)
    assert samples[0].image_paths == [str(FIXTURE.resolve() / "images" / "n161313.jpg")]
    assert all(Path(p).is_absolute() and Path(p).is_file() for s in samples for p in s.image_paths)
    assert samples[2].meta["image_id"] == "n235859" and samples[2].meta["types"]["structural"] == "query"
    assert [s.id for s in GQABenchmark(str(FIXTURE), limit=2).samples()] == ["20968379", "20968380"]


def test_prompt_is_llava15_short_answer_format():
    bench = GQABenchmark(str(FIXTURE), limit=1)
    assert bench.prompt(bench.samples()[0]) == (
        "What color is the circle?\nAnswer the question using a single word or phrase."
    )


def test_llava_question_file_gives_order_and_text_answers_come_from_official_json(tmp_path):
    root = tmp_path / "gqa"  # LLaVA's playground layout: the official files one level down in data/
    shutil.copytree(FIXTURE, root / "data")
    lines = [
        {"question_id": "201307252", "image": "n235859.jpg",
         "text": "What shape is to the left of the triangle?\nAnswer the question using a single word or phrase.",
         "category": "default"},
        {"question_id": "20968379", "image": "n161313.jpg", "text": "What color is the circle?", "category": "default"},
    ]
    (root / "llava_gqa_testdev_balanced.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    bench = GQABenchmark(str(root))
    samples = bench.samples()
    assert [s.id for s in samples] == ["201307252", "20968379"]
    assert [s.answers for s in samples] == [["square"], ["red"]]
    assert samples[0].image_paths == [str(root.resolve() / "data" / "images" / "n235859.jpg")]
    assert bench.prompt(samples[0]) == (  # the instruction already in LLaVA's text is not doubled
        "What shape is to the left of the triangle?\nAnswer the question using a single word or phrase."
    )

    jsonl = root / "llava_gqa_testdev_balanced.jsonl"
    jsonl.write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(jsonl))}:2: not valid JSON"):
        GQABenchmark(str(root))
    jsonl.write_text(json.dumps(dict(lines[0], question_id="999")) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(jsonl))}:1: question_id '999' is not in .*{QUESTIONS}"):
        GQABenchmark(str(root))


def test_missing_data_dir_says_where_to_get_the_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; download GQA.*data_dir=null.*lmms-lab/GQA"):
        GQABenchmark(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=rf"has no {QUESTIONS}.*gqa/download"):
        GQABenchmark(str(tmp_path))
    with pytest.raises(ValueError, match="needs data_dir"):
        GQABenchmark(None, hub_id=None)


def test_malformed_entry_names_file_and_question(data_dir):
    path = edit_questions(data_dir, lambda q: q["201307251"].pop("answer"))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} question '201307251': 'answer' must be a non-empty string"):
        GQABenchmark(str(data_dir))
    path.write_text('{\n  "1": {"imageId": "n161313",\n  oops\n}')
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:3: not valid JSON"):
        GQABenchmark(str(data_dir))
    path.write_text("[]")
    with pytest.raises(ValueError, match="expected a JSON object mapping question ids"):
        GQABenchmark(str(data_dir))


def test_missing_image_names_question_and_path(data_dir):
    (data_dir / "images" / "n336443.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"question '05451384': image .*n336443\.jpg does not exist"):
        GQABenchmark(str(data_dir))


def test_normalisation_lowercases_and_strips_punctuation_and_articles():
    assert normalize_gqa_answer("The T-shirt.") == "tshirt"
    assert normalize_gqa_answer("  Left ") == "left"
    assert normalize_gqa_answer("a  white   dog!") == "white dog"
    assert normalize_gqa_answer("Theater") == "theater"  # "the" is dropped only as a whole word
    assert gqa_match("Right.", ["right"]) == 1.0
    assert gqa_match("YES", ["yes"]) == 1.0
    assert gqa_match("on the right", ["right"]) == 0.0  # exact match, not containment
    assert gqa_match("2", ["two"]) == 0.0  # no number-word mapping in GQA's comparison
    assert gqa_match(None, ["yes"]) == 0.0


def test_score_is_percent_exact_match_with_failed_samples_wrong():
    bench = GQABenchmark(str(FIXTURE), limit=1)
    records = [
        {"id": "1", "prediction": "Red.", "answers": ["red"], "answer_type": "short"},
        {"id": "2", "prediction": "the square", "answers": ["square"], "answer_type": "short"},
        {"id": "3", "prediction": "left", "answers": ["right"], "answer_type": "short"},
        {"id": "4", "prediction": None, "answers": ["yes"], "answer_type": "short"},
    ]
    assert bench.score(records) == {"accuracy": 50.0}
    assert bench.score([]) == {}


def test_eval_script_runs_gqa_fixture_end_to_end(tiny_cache, tmp_path):
    result = run_script([str(REPO / "scripts" / "eval.py"), "model=llava15_tiny", "dymu=low", "benchmark=gqa",
                         f"benchmark.task.data_dir={FIXTURE}", "wandb.mode=disabled"], tiny_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out_dir = tmp_path / "outputs" / "eval" / "llava15_tiny" / "low" / "gqa"
    records = read_predictions(out_dir / "predictions.jsonl")
    assert [r["id"] for r in records] == [s.id for s in GQABenchmark(str(FIXTURE)).samples()]
    assert all(isinstance(r["prediction"], str) for r in records)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["benchmark"] == "gqa" and metrics["n_samples"] == 5
    assert 0.0 <= metrics["metrics"]["accuracy"] <= 100.0
