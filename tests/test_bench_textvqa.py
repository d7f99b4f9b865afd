"""TextVQA val and the VQA accuracy: loading, OCR sources, validation errors, prompts, normalisation, eval.py."""

import itertools
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
from eval.benchmarks.textvqa import TextVQABenchmark
from eval.benchmarks.vqa_accuracy import normalize_vqa_answer, vqa_accuracy
from eval.runner import read_predictions

FIXTURE = REPO / "tests" / "fixtures" / "textvqa"
QUESTIONS = "TextVQA_0.5.1_val.json"
OCR = "TextVQA_Rosetta_OCR_v0.2_val.json"
SUFFIX = "\nAnswer the question using a single word or phrase."


def run_script(args, tiny_cache, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               DYMU_CACHE_DIR=str(tiny_cache), DYMU_OUTPUT_DIR=str(tmp_path / "outputs"))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A writable copy of the fixture."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "textvqa"))


def edit_json(path: Path, edit) -> Path:
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))
    return path


# ----------------------------------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two dogs.", "2 dogs"),  # number word -> digit, final period dropped
        ("none", "0"),
        ("The Coca-Cola", "coca cola"),  # article dropped; "-" between letters becomes a space
        ("coca - cola", "coca cola"),  # "-" next to a space is deleted
        ("red,blue", "red blue"),
        ("yes, it is", "yes it is"),
        ("1,000", "1000"),  # a digit-comma-digit group: commas are deleted
        ("3.5", "3.5"),  # a period before a digit stays
        ("a.m.", "am"),
        ("dont", "don't"),  # contractions get their apostrophe
        ("Whats up", "what's up"),
        ("it's", "it's"),
        ("(Yes)!", "yes"),
        ("\tAn  apple\n", "apple"),
        ("Theater", "theater"),
    ],
)
def test_normalize_vqa_answer(text, expected):
    assert normalize_vqa_answer(text) == expected


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_is_the_leave_one_out_mean(matches, expected):
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)
    # the same number straight from the definition: mean over the 10 subsets of 9 answers
    subsets = list(itertools.combinations(answers, 9))
    assert vqa_accuracy("cat", answers) == pytest.approx(sum(min(1, s.count("cat") / 3) for s in subsets) / 10)


def test_vqa_accuracy_normalises_both_sides_and_handles_edge_cases():
    answers = ["two"] * 2 + ["2"] * 2 + ["the 2."] + ["three"] * 5
    assert vqa_accuracy("2", answers) == 1.0  # five references normalise to "2"
    assert vqa_accuracy("A Three!", answers) == 1.0
    assert vqa_accuracy("42.", ["42"] + ["x"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy(None, answers) == 0.0
    assert vqa_accuracy("nike", ["Nike"]) == 1.0 and vqa_accuracy("adidas", ["nike"]) == 0.0  # one reference
    with pytest.raises(ValueError, match="no reference answers"):
        vqa_accuracy("x", [])


# ----------------------------------------------------------------------------------------- benchmark


def test_fixture_loads_with_rosetta_ocr_and_absolute_paths():
    bench = TextVQABenchmark(str(FIXTURE))
    samples = bench.samples()
    assert isinstance(bench, Benchmark) and bench.name == "textvqa"
    assert [s.id for s in samples] == ["34602", "34603", "34604", "34605"]
    assert all(isinstance(s, Sample) and s.answer_type == "short" and len(s.answers) == 10 for s in samples)
    assert samples[0].image_paths == [str(FIXTURE.resolve() / "train_images" / "003a8ae2ef43b901.jpg")]
    assert all(Path(p).is_absolute() and Path(p).is_file() for s in samples for p in s.image_paths)
    assert samples[2].meta == {"image_id": "01c5b1d2f0e9a7c3", "ocr_tokens": ["Nike", "JUST", "DO"]}
    assert [s.id for s in TextVQABenchmark(str(FIXTURE), limit=1).samples()] == ["34602"]


def test_prompts_with_and_without_ocr():
    sample = TextVQABenchmark(str(FIXTURE)).samples()[2]
    assert TextVQABenchmark(str(FIXTURE)).prompt(sample) == (
        "What brand is shown?\nReference OCR token: Nike, JUST, DO\nAnswer the question using a single word or phrase."
    )
    assert TextVQABenchmark(str(FIXTURE), use_ocr=False).prompt(sample) == "What brand is shown?" + SUFFIX
    no_tokens = Sample("1", [], "what is written?", ["a"] * 10, "short", {"image_id": "x", "ocr_tokens": []})
    assert TextVQABenchmark(str(FIXTURE), limit=0).prompt(no_tokens) == "What is written?" + SUFFIX


def test_ocr_tokens_from_the_entries_when_there_is_no_rosetta_file(data_dir):
    (data_dir / OCR).unlink()

    def add_tokens(content):
        for entry in content["data"]:
            entry["ocr_tokens"] = ["sale", "50%"]

    with pytest.raises(ValueError, match=r"data\[0\] \(question_id 34602\): no OCR tokens.*use_ocr=false"):
        TextVQABenchmark(str(data_dir))
    assert TextVQABenchmark(str(data_dir), use_ocr=False).samples()[0].meta["ocr_tokens"] == []
    edit_json(data_dir / QUESTIONS, add_tokens)
    bench = TextVQABenchmark(str(data_dir))
    assert bench.prompt(bench.samples()[1]) == (
        "What number is written on the image?\nReference OCR token: sale, 50%" + SUFFIX
    )


def test_missing_data_dir_file_and_image_say_what_to_do(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; download TextVQA_0\.5\.1_val\.json.*data_dir=null"):
        TextVQABenchmark(str(tmp_path / "nowhere"))
    (data_dir / "train_images" / "01c5b1d2f0e9a7c3.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"data\[2\] \(question_id 34604\): image .*01c5b1d2f0e9a7c3\.jpg does"):
        TextVQABenchmark(str(data_dir))
    (data_dir / QUESTIONS).unlink()
    with pytest.raises(FileNotFoundError, match=rf"has no {re.escape(QUESTIONS)}; download"):
        TextVQABenchmark(str(data_dir))


def test_malformed_entries_name_file_entry_and_question(data_dir):
    path = data_dir / QUESTIONS
    where = re.escape(str(path))
    edit_json(path, lambda c: c["data"][1].update(answers="42"))
    with pytest.raises(ValueError, match=rf"{where} data\[1\] \(question_id 34603\): 'answers' must be a non-empty"):
        TextVQABenchmark(str(data_dir))
    edit_json(path, lambda c: c["data"][1].pop("answers"))
    with pytest.raises(ValueError, match=rf"{where} data\[1\]: missing key\(s\) \['answers'\]"):
        TextVQABenchmark(str(data_dir))
    path.write_text('{"data": [\n{"question_id": 1,,}\n]}')
    with pytest.raises(ValueError, match=rf"{where}:2: not valid JSON"):
        TextVQABenchmark(str(data_dir))
    path.write_text('[{"question_id": 1}]')
    with pytest.raises(ValueError, match='a JSON object with a "data" list'):
        TextVQABenchmark(str(data_dir))


def test_score_is_mean_vqa_accuracy_in_percent():
    bench = TextVQABenchmark(str(FIXTURE))
    answers = {s.id: s.answers for s in bench.samples()}
    records = [
        {"id": "34602", "prediction": "Stop.", "answers": answers["34602"], "answer_type": "short"},  # 9 match: 1
        {"id": "34603", "prediction": "forty two", "answers": answers["34603"], "answer_type": "short"},  # 1: 0.3
        {"id": "34604", "prediction": "Adidas", "answers": answers["34604"], "answer_type": "short"},  # 2: 0.6
        {"id": "34605", "prediction": None, "answers": answers["34605"], "answer_type": "short"},  # failed: 0
    ]
    assert bench.score(records) == {"accuracy": pytest.approx(47.5)}
    assert bench.score([]) == {}


def test_eval_script_runs_textvqa_fixture_end_to_end(tiny_cache, tmp_path):
    result = run_script([str(REPO / "scripts" / "eval.py"), "model=llava15_tiny", "dymu=low", "benchmark=textvqa",
                         f"benchmark.task.data_dir={FIXTURE}", "wandb.mode=disabled"], tiny_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out_dir = tmp_path / "outputs" / "eval" / "llava15_tiny" / "low" / "textvqa"
    records = read_predictions(out_dir / "predictions.jsonl")
    assert [r["id"] for r in records] == ["34602", "34603", "34604", "34605"]
    assert all(isinstance(r["prediction"], str) for r in records)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["benchmark"] == "textvqa" and metrics["n_samples"] == 4
    assert 0.0 <= metrics["metrics"]["accuracy"] <= 100.0
