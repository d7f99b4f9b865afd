"""MME: the official release layout, validation errors, the prompt, MME's yes/no rule, acc / acc+ / summed
scores, and scripts/eval.py end to end on the fixture."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO
from eval.benchmarks.mme import COGNITION, PERCEPTION, MMEBenchmark, mme_yes_no
from eval.runner import read_predictions

FIXTURE = REPO / "tests" / "fixtures" / "mme"
RELEASE = FIXTURE / "MME_Benchmark_release_version"
SUFFIX = "\nAnswer the question using a single word or phrase."


def run_script(args, tiny_cache, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               DYMU_CACHE_DIR=str(tiny_cache), DYMU_OUTPUT_DIR=str(tmp_path / "outputs"))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def record(sample_id, prediction):
    return {"id": sample_id, "prediction": prediction, "answers": [], "answer_type": "yes_no"}


def test_loads_both_official_layouts_in_subtask_order():
    bench = MMEBenchmark(data_dir=str(FIXTURE))
    samples = bench.samples()
    assert [s.id for s in samples] == [
        "existence/000000006040.jpg/0", "existence/000000006040.jpg/1",
        "existence/000000015254.jpg/0", "existence/000000015254.jpg/1",
        "artwork/10002.jpg/0", "artwork/10002.jpg/1",  # images/ + questions_answers_YN/ layout
        "code_reasoning/0020.png/0", "code_reasoning/0020.png/1",
    ]
    assert [s.answers for s in samples[:2]] == [["Yes"], ["No"]]
    assert samples[4].image_paths == [str((RELEASE / "artwork" / "images" / "10002.jpg").resolve())]
    assert samples[0].question == "Is there a red ball in this image? Please answer yes or no."
    assert {s.answer_type for s in samples} == {"yes_no"}
    # the release folder itself works as data_dir too; limit and subtasks select
    assert [s.id for s in MMEBenchmark(data_dir=str(RELEASE), limit=3).samples()] == [s.id for s in samples[:3]]
    assert [s.id for s in MMEBenchmark(data_dir=str(FIXTURE), subtasks=["code_reasoning"]).samples()] == [
        "code_reasoning/0020.png/0", "code_reasoning/0020.png/1"]


def test_prompt_is_the_question_plus_llava_short_answer_instruction():
    bench = MMEBenchmark(data_dir=str(FIXTURE))
    assert bench.prompt(bench.samples()[0]) == (
        "Is there a red ball in this image? Please answer yes or no."
        "\nAnswer the question using a single word or phrase."
    )
    assert bench.visual_inputs(bench.samples()[0]) == bench.samples()[0].image_paths


def test_missing_or_wrong_data_dir_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MMEBenchmark(data_dir=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="none of the MME subtask folders"):
        MMEBenchmark(data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown MME subtask"):
        MMEBenchmark(data_dir=str(FIXTURE), subtasks=["colour"])


@pytest.mark.parametrize(
    "content, message",
    [
        ("Is there a cat? Please answer yes or no. Yes\n", r"0001\.txt:1: expected 'question<TAB>answer'"),
        ("Is there a cat?\tYes\nIs there a dog?\tMaybe\n",
         r"0001\.txt:2: expected a question and the answer Yes or No"),
        ("\n\n", "holds no questions"),
    ],
)
def test_malformed_question_files_name_file_and_line(tmp_path, content, message):
    folder = tmp_path / "count"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "0001.jpg")
    (folder / "0001.txt").write_text(content)
    with pytest.raises(ValueError, match=message):
        MMEBenchmark(data_dir=str(tmp_path))


def test_a_question_file_without_its_image_fails(tmp_path):
    shutil.copytree(RELEASE / "existence", tmp_path / "existence")
    (tmp_path / "existence" / "000000006040.jpg").unlink()
    with pytest.raises(ValueError, match=r"000000006040\.txt: no image 000000006040"):
        MMEBenchmark(data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("Yes", "yes"), ("no", "no"), ("  YES \n", "yes"), ("Yes, there is a ball.", "yes"), ("No.", "no"),
        ("No, it is not.", "no"),
        ("There is no dog.", None),  # neither word in the first four characters: wrong, as in MME's eval_tool
        ("I don't know", None), ("", None), (None, None),
        ("Not at all", "no"),  # "not " contains "no": MME's rule
    ],
)
def test_yes_no_follows_mme_eval_tool(prediction, expected):
    assert mme_yes_no(prediction) == expected


def test_scores_acc_acc_plus_and_sums_by_hand():
    bench = MMEBenchmark(data_dir=str(FIXTURE))
    records = [
        record("existence/000000006040.jpg/0", "Yes"),  # truth Yes: right
        record("existence/000000006040.jpg/1", "No"),  # truth No: right -> image 1 both right
        record("existence/000000015254.jpg/0", "Yes."),  # truth Yes: right
        record("existence/000000015254.jpg/1", "Yes"),  # truth No: WRONG -> image 2 not both right
        record("artwork/10002.jpg/0", "No, it was not."),  # truth No: right
        record("artwork/10002.jpg/1", None),  # failed sample: wrong
        record("code_reasoning/0020.png/0", "yes"),  # truth Yes: right
        record("code_reasoning/0020.png/1", "The output is 2."),  # neither yes nor no: wrong
    ]
    metrics = bench.score(records)
    assert metrics["existence/acc"] == pytest.approx(75.0)  # 3 of 4 questions
    assert metrics["existence/acc_plus"] == pytest.approx(50.0)  # 1 of 2 images
    assert metrics["existence/score"] == pytest.approx(125.0)
    assert metrics["artwork/acc"] == pytest.approx(50.0) and metrics["artwork/acc_plus"] == 0.0
    assert metrics["code_reasoning/acc"] == pytest.approx(50.0) and metrics["code_reasoning/acc_plus"] == 0.0
    assert metrics["perception"] == pytest.approx(125.0 + 50.0)
    assert metrics["cognition"] == pytest.approx(50.0)
    assert metrics["total"] == pytest.approx(225.0)
    assert set(metrics) == {"perception", "cognition", "total"} | {
        f"{t}/{m}" for t in ("existence", "artwork", "code_reasoning") for m in ("acc", "acc_plus", "score")}


def test_category_sums_reach_2000_and_800_and_absent_categories_are_left_out(tmp_path):
    for subtask in PERCEPTION + COGNITION:
        (tmp_path / subtask).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / subtask / "1.png")
        (tmp_path / subtask / "1.txt").write_text("A?\tYes\nB?\tNo\n")
    bench = MMEBenchmark(data_dir=str(tmp_path))
    perfect = [record(s.id, s.answers[0]) for s in bench.samples()]
    metrics = bench.score(perfect)
    assert (metrics["perception"], metrics["cognition"], metrics["total"]) == (2000.0, 800.0, 2800.0)
    only_cognition = [r for r in perfect if r["id"].split("/")[0] in COGNITION]
    partial = bench.score(only_cognition)
    assert "perception" not in partial and partial["cognition"] == 800.0 and partial["total"] == 800.0
    with pytest.raises(ValueError, match="not an MME question"):
        bench.score([record("existence/missing.jpg/0", "yes")])


def test_eval_script_runs_mme_end_to_end(tiny_cache, tmp_path):
    result = run_script([str(REPO / "scripts" / "eval.py"), "model=llava15_tiny", "dymu=low", "benchmark=mme",
                         f"benchmark.task.data_dir={FIXTURE}", "wandb.mode=disabled", "max_new_tokens=4"],
                        tiny_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out_dir = tmp_path / "outputs" / "eval" / "llava15_tiny" / "low" / "mme"
    records = read_predictions(out_dir / "predictions.jsonl")
    assert len(records) == 8 and all(isinstance(r["prediction"], str) for r in records)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["benchmark"] == "mme" and metrics["n_samples"] == 8 and metrics["pending"] == []
    assert {"perception", "cognition", "total", "existence/acc", "existence/acc_plus"} <= set(metrics["metrics"])
    assert 0 <= metrics["metrics"]["perception"] <= 3 * 200 and 0 <= metrics["metrics"]["cognition"] <= 200
