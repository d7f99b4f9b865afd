"""MMBench-en dev: official TSV loading, validation errors, prompts, CircularEval scoring; choice extraction."""

import base64
import csv
import io
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
from eval.benchmarks.choices import extract_choice, format_options
from eval.benchmarks.mmbench import (
    TSV_FILE,
    TSV_URL,
    MMBenchBenchmark,
    _questions_from_rows,
    circular_accuracy,
    rotate_options,
)
from eval.runner import read_predictions

FIXTURE = REPO / "tests" / "fixtures" / "mmbench"
INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."
HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
          "l2-category", "comment", "split"]


@pytest.fixture
def bench(tmp_path) -> MMBenchBenchmark:
    """The fixture TSV, its images decoded under tmp_path (the repository stays clean)."""
    return MMBenchBenchmark(data_dir=str(FIXTURE), image_cache_dir=str(tmp_path / "images"))


def image_b64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def row(index=1, question="Q?", hint="", options=("x", "y", "z", ""), answer="A", image=None, category="cat"):
    cells = dict(index=str(index), question=question, hint=hint, A=options[0], B=options[1], C=options[2],
                 D=options[3], answer=answer, category=category, image=image if image is not None else image_b64(),
                 source="MMBench", comment="", split="dev")
    cells["l2-category"] = "l2"
    return cells


def write_tsv(folder: Path, rows: list[dict], header=HEADER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / TSV_FILE, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        for cells in rows:
            writer.writerow([cells.get(column, "") for column in header])
    return folder / TSV_FILE


# ---------------------------------------------------------------- loading


def test_fixture_loads_questions_and_makes_every_rotation(bench):
    samples = bench.samples()
    assert isinstance(bench, Benchmark) and bench.name == "mmbench" and bench.max_new_tokens <= 8
    # 4 questions with 4, 2, 3, 4 options; the file's own copy rows (index >= 1e6) are not read twice.
    assert [s.id for s in samples] == [
        "241-c0", "241-c1", "241-c2", "241-c3", "242-c0", "242-c1",
        "243-c0", "243-c1", "243-c2", "244-c0", "244-c1", "244-c2", "244-c3",
    ]
    for sample in samples:
        assert sample.answer_type == "multiple_choice"
        assert sample.answers == [sample.meta["answer_letter"]]
        assert sample.meta["answer_letter"] in sample.meta["options"]
        assert sample.meta["n_rotations"] == len(sample.meta["options"])
        assert len(sample.image_paths) == 1 and Path(sample.image_paths[0]).is_absolute()
        with Image.open(sample.image_paths[0]) as image:
            assert image.format == "JPEG" and image.size == (32, 32)
    first = samples[0]
    assert first.meta["group"] == 241 and first.meta["category"] == "attribute_recognition"
    assert first.meta["l2_category"] == "finegrained_perception (instance-level)"
    assert first.meta["options"] == {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


def test_rotations_equal_the_official_files_own_circular_copies(bench):
    """The TSV holds each question's shifted copies under index + k * 1e6: ours are the same."""
    by_id = {s.id: s for s in bench.samples()}
    with open(FIXTURE / TSV_FILE, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    for cells in rows:
        index = int(cells["index"])
        sample = by_id[f"{index % 1_000_000}-c{index // 1_000_000}"]
        assert sample.meta["options"] == {k: cells[k] for k in "ABCD" if cells[k]}
        assert sample.meta["answer_letter"] == cells["answer"]


def test_images_are_decoded_once_into_the_cache(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "mmbench")
    first = MMBenchBenchmark(data_dir=str(tmp_path / "mmbench")).samples()
    path = Path(first[0].image_paths[0])
    assert path.parent == (tmp_path / "mmbench" / ".images").resolve() and path.name == "241.jpg"
    assert len(list(path.parent.iterdir())) == 4  # one file per question, not per rotation
    stamp = path.stat().st_mtime_ns
    MMBenchBenchmark(data_dir=str(tmp_path / "mmbench"))
    assert path.stat().st_mtime_ns == stamp


def test_limit_counts_questions_and_circular_false_asks_once(tmp_path):
    limited = MMBenchBenchmark(data_dir=str(FIXTURE), limit=2, image_cache_dir=str(tmp_path))
    assert [s.id for s in limited.samples()] == ["241-c0", "241-c1", "241-c2", "241-c3", "242-c0", "242-c1"]
    single = MMBenchBenchmark(data_dir=str(FIXTURE), circular=False, image_cache_dir=str(tmp_path))
    assert [s.id for s in single.samples()] == ["241-c0", "242-c0", "243-c0", "244-c0"]
    assert all(s.meta["n_rotations"] == 1 for s in single.samples())


def test_missing_data_dir_says_where_to_get_the_tsv(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        MMBenchBenchmark(data_dir=str(tmp_path / "nowhere"))
    assert TSV_FILE in str(err.value) and TSV_URL in str(err.value) and "data_dir=null" in str(err.value)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([row(answer="D")], r":2: answer 'D' is not one of the options \['A', 'B', 'C'\]"),
        ([row(options=("x", "", "z", ""))], r":2: option B is empty but \['C'\] are not"),
        ([row(options=("x", "", "", ""))], r":2: 1 option\(s\); a question needs at least options A and B"),
        ([row(image="not base64!")], r":2: 'image' is not valid base64"),
        ([row(image=base64.b64encode(b"plain text").decode())], r":2: 'image' does not decode to an image"),
        ([row(index="abc")], r":2: 'index' must be an integer"),
        ([row(question="")], r":2: empty 'question'"),
        ([row(index=5), row(index=5)], r":3: duplicate index 5 \(first on line 2\)"),
        ([row(index=1), row(index=1_000_007)], r":3: CircularEval copy of question 7"),
        ([], r"holds no questions"),
    ],
)
def test_malformed_rows_name_file_line_and_fix(tmp_path, rows, message):
    path = write_tsv(tmp_path / "data", rows)
    with pytest.raises(ValueError, match=message) as err:
        MMBenchBenchmark(data_dir=str(tmp_path / "data"), image_cache_dir=str(tmp_path / "cache"))
    assert str(path) in str(err.value)


def test_missing_column_and_short_row_are_reported(tmp_path):
    write_tsv(tmp_path / "a", [row()], header=[c for c in HEADER if c != "answer"])
    with pytest.raises(ValueError, match=r":1: header lacks column\(s\) \['answer'\]"):
        MMBenchBenchmark(data_dir=str(tmp_path / "a"), image_cache_dir=str(tmp_path / "cache"))
    path = write_tsv(tmp_path / "b", [row()])
    path.write_text(path.read_text().replace("\tdev\n", "\n"))
    with pytest.raises(ValueError, match=r":2: 13 tab-separated cells but the header has 14"):
        MMBenchBenchmark(data_dir=str(tmp_path / "b"), image_cache_dir=str(tmp_path / "cache"))


def test_pandas_style_empty_cells_count_as_missing(tmp_path):
    write_tsv(tmp_path / "d", [row(hint="nan", options=("x", "y", "NaN", "None"), answer="B")])
    (sample0, sample1) = MMBenchBenchmark(data_dir=str(tmp_path / "d"), image_cache_dir=str(tmp_path / "c")).samples()
    assert sample0.meta["options"] == {"A": "x", "B": "y"} and sample0.meta["hint"] == ""
    assert sample1.meta["options"] == {"A": "y", "B": "x"} and sample1.answers == ["A"]


def test_hub_rows_become_questions_with_cached_images(tmp_path):
    """The Hugging Face layout (decoded PIL image, 'L2-category'); copy rows are skipped."""
    image = Image.new("RGB", (8, 8), "blue")
    rows = [
        {"index": 3, "question": "Q?", "hint": None, "A": "x", "B": "y", "C": None, "D": None, "answer": "B",
         "category": "c", "L2-category": "l2", "image": image},
        {"index": 1_000_003, "question": "Q?", "hint": None, "A": "y", "B": "x", "C": None, "D": None,
         "answer": "A", "category": "c", "L2-category": "l2", "image": image},
    ]
    (question,) = _questions_from_rows(rows, tmp_path, None, "hub")
    assert question["options"] == {"A": "x", "B": "y"} and question["l2_category"] == "l2"
    assert Path(question["image_path"]).is_file() and question["hint"] == ""


def test_hub_without_datasets_package_says_what_to_install(tmp_path):
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            MMBenchBenchmark(data_dir=None, image_cache_dir=str(tmp_path))
    else:
        pytest.skip("datasets is installed; the hub path needs the network")


# ---------------------------------------------------------------- prompts


def test_prompts_are_llava15_multiple_choice_prompts(bench):
    by_id = {s.id: s for s in bench.samples()}
    assert bench.prompt(by_id["243-c0"]) == (
        "The picture is a simple drawing on a white background.\nWhich shape is shown?\n"
        "A. circle\nB. square\nC. triangle" + INSTRUCTION
    )
    assert bench.prompt(by_id["241-c1"]) == (
        "What color is the square in the image?\nA. green\nB. blue\nC. yellow\nD. red" + INSTRUCTION
    )
    assert bench.prompt(by_id["242-c1"]) == "Is the circle above the square?\nA. no\nB. yes" + INSTRUCTION
    assert format_options({"A": "x", "B": "y"}) == "A. x\nB. y"


# ---------------------------------------------------------------- CircularEval


def test_rotation_moves_the_answer_letter():
    options = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}
    assert rotate_options(options, "A", 0) == (options, "A")
    assert rotate_options(options, "A", 1) == ({"A": "green", "B": "blue", "C": "yellow", "D": "red"}, "D")
    assert rotate_options(options, "C", 2) == ({"A": "blue", "B": "yellow", "C": "red", "D": "green"}, "A")
    # Every rotation keeps the right text under the answer letter; n rotations put it under every letter once.
    letters = [rotate_options(options, "B", k)[1] for k in range(4)]
    assert sorted(letters) == ["A", "B", "C", "D"]
    for k in range(4):
        rotated, letter = rotate_options(options, "B", k)
        assert rotated[letter] == "green"


def test_two_option_question_has_two_rotations(bench):
    two = [s for s in bench.samples() if s.meta["group"] == 242]
    assert [s.meta["rotation"] for s in two] == [0, 1]
    assert [s.meta["options"] for s in two] == [{"A": "yes", "B": "no"}, {"A": "no", "B": "yes"}]
    assert [s.answers for s in two] == [["A"], ["B"]]


def test_circular_accuracy_rules():
    assert circular_accuracy({1: {0: True, 1: True}}, {1: 2}) == 100.0  # all rotations right
    assert circular_accuracy({1: {0: True, 1: False}}, {1: 2}) == 0.0  # one rotation wrong
    assert circular_accuracy({1: {0: True}}, {1: 2}) == 0.0  # a missing rotation is not a right one
    assert circular_accuracy({1: {0: True, 1: True}, 2: {0: True, 1: True, 2: False}}, {1: 2, 2: 3}) == 50.0


def records_for(bench, wrong=(), failed=()):
    """Records answering every sample right (in varied formats) except the ids in ``wrong`` / ``failed``."""
    records = []
    for i, sample in enumerate(bench.samples()):
        letter = sample.answers[0]
        right = [letter, f"({letter}) {sample.meta['options'][letter]}", f"The answer is {letter}."][i % 3]
        other = next(x for x in sample.meta["options"] if x != letter)
        prediction = None if sample.id in failed else (other if sample.id in wrong else right)
        records.append({"id": sample.id, "prediction": prediction, "answers": sample.answers,
                        "answer_type": sample.answer_type})
    return records


def test_score_counts_a_question_right_only_if_all_rotations_are(bench):
    assert bench.score(records_for(bench))["accuracy"] == 100.0
    metrics = bench.score(records_for(bench, wrong={"243-c2"}, failed={"244-c0"}))
    # 241 right, 242 right, 243 wrong (rotation 2), 244 wrong (rotation 0 failed: prediction None).
    assert metrics["accuracy"] == 50.0
    assert metrics["accuracy_single"] == 75.0  # rotation 0 alone: 241, 242, 243 right
    assert metrics["category/attribute_recognition"] == 50.0  # 241 right, 244 wrong
    assert metrics["category/spatial_relationship"] == 100.0
    assert metrics["category/image_topic"] == 0.0
    assert metrics["l2-category/finegrained_perception (instance-level)"] == 50.0
    assert metrics["l2-category/coarse_perception"] == 0.0
    assert set(metrics) == {
        "accuracy", "accuracy_single", "category/attribute_recognition", "category/spatial_relationship",
        "category/image_topic", "l2-category/finegrained_perception (instance-level)",
        "l2-category/relation_reasoning", "l2-category/coarse_perception",
    }


def test_score_rejects_records_of_other_data(bench):
    with pytest.raises(ValueError, match="'999-c0' is not a sample of this mmbench benchmark"):
        bench.score([{"id": "999-c0", "prediction": "A", "answers": ["A"], "answer_type": "multiple_choice"}])


# ---------------------------------------------------------------- choice extraction

OPTIONS = {"A": "dog", "B": "cat", "C": "cat food", "D": "bird"}


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", "B"),
        (" B\n", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B)", "B"),
        ("(C) cat", "C"),  # the letter wins over the text
        ("D. bird", "D"),
        ("The answer is D.", "D"),
        ("I think the answer is (A).", "A"),
        ("Answer: C", "C"),
        ("It is a bird.", "D"),  # option text only
        ("A bird sits on the fence.", "D"),  # "A" followed by a word is an article, not a letter
        ("Some CAT FOOD.", "C"),  # "cat" inside "cat food" does not compete with it
        ("a dog or a bird", None),  # two options named: ambiguous
        ("E", None),  # not an option
        ("I do not know.", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_choice(prediction, expected):
    assert extract_choice(prediction, OPTIONS) == expected


# ---------------------------------------------------------------- end to end


def run_script(args, tiny_cache, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               DYMU_CACHE_DIR=str(tiny_cache), DYMU_OUTPUT_DIR=str(tmp_path / "outputs"))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_eval_script_runs_mmbench_end_to_end(tiny_cache, tmp_path):
    data = tmp_path / "mmbench"
    shutil.copytree(FIXTURE, data)  # decoded images go next to this copy, not into the repository
    result = run_script([str(REPO / "scripts" / "eval.py"), "model=llava15_tiny", "dymu=low", "benchmark=mmbench",
                         f"benchmark.task.data_dir={data}", "wandb.mode=disabled"], tiny_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out_dir = tmp_path / "outputs" / "eval" / "llava15_tiny" / "low" / "mmbench"
    records = read_predictions(out_dir / "predictions.jsonl")
    assert [r["id"] for r in records] == [s.id for s in MMBenchBenchmark(data_dir=str(data)).samples()]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n_samples"] == 13 and "accuracy" in metrics["metrics"]
    assert 0.0 <= metrics["metrics"]["accuracy"] <= 100.0
