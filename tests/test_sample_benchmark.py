"""The packaged "sample" benchmark: loading, validation errors, prompts and scoring."""

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from eval.benchmarks.base import Benchmark, Sample
from eval.benchmarks.sample import SampleBenchmark


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A scratch benchmark folder with two tiny images and no questions file yet."""
    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (4, 4), "red").save(tmp_path / "images" / name)
    return tmp_path


def write_lines(data_dir: Path, lines: list) -> None:
    """Write ``lines`` (dicts are JSON-encoded, strings written verbatim) as questions.jsonl."""
    text = "\n".join(json.dumps(line) if isinstance(line, dict) else line for line in lines)
    (data_dir / "questions.jsonl").write_text(text + "\n", encoding="utf-8")


def row(question_id="q1", image="images/a.jpg", answer="yes", answer_type="yes_no", **extra) -> dict:
    """A valid questions.jsonl row, with fields overridable."""
    return {
        "question_id": question_id,
        "image": image,
        "question": "Is it red?",
        "answer": answer,
        "answer_type": answer_type,
        **extra,
    }


def test_packaged_benchmark_loads_with_real_images():
    bench = SampleBenchmark()
    samples = bench.samples()
    assert isinstance(bench, Benchmark) and bench.name == "sample"
    assert len(samples) >= 24
    assert len({s.id for s in samples}) == len(samples)
    types = Counter(s.answer_type for s in samples)
    assert set(types) == {"yes_no", "short"}
    assert min(types.values()) >= len(samples) // 3  # roughly half of each kind
    assert {s.answers[0] for s in samples if s.answer_type == "yes_no"} == {"yes", "no"}
    for sample in samples:
        assert len(sample.image_paths) == 1 and Path(sample.image_paths[0]).is_absolute()
        assert sample.answers and all(isinstance(a, str) for a in sample.answers)
        with Image.open(sample.image_paths[0]) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert max(image.size) <= 512


def test_limit_keeps_the_first_questions():
    everything = SampleBenchmark().samples()
    first_five = SampleBenchmark(limit=5).samples()
    assert [s.id for s in first_five] == [s.id for s in everything[:5]]
    assert SampleBenchmark(limit=0).samples() == []


def test_prompt_appends_llava_short_answer_instruction():
    sample = Sample("x", [], "What is this?", ["cat"], "short", {})
    assert SampleBenchmark(limit=1).prompt(sample) == (
        "What is this?\nAnswer the question using a single word or phrase."
    )


def test_custom_data_dir_fields_and_meta(data_dir):
    write_lines(data_dir, [row(), "", row("q2", "images/b.jpg", ["cat", "kitten"], "short", source="x")])
    samples = SampleBenchmark(str(data_dir)).samples()
    assert [s.id for s in samples] == ["q1", "q2"]
    assert samples[0].answers == ["yes"] and samples[0].meta == {}
    assert samples[1].answers == ["cat", "kitten"] and samples[1].meta == {"source": "x"}
    assert samples[1].image_paths == [str((data_dir / "images" / "b.jpg").resolve())]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", r"questions\.jsonl:2: not valid JSON"),
        ('["a list"]', r"questions\.jsonl:2: expected a JSON object"),
        ({"question_id": "q2", "image": "images/a.jpg"}, r"questions\.jsonl:2: missing key.*'question'"),
        (row("q2", image="images/missing.jpg"), r"jsonl:2: image file .*missing\.jpg does not exist"),
        (row("q2", answer_type="multiple_choice"), r"jsonl:2: unknown answer_type 'multiple_choice'"),
        (row("q2", answer="maybe"), r"jsonl:2: a yes_no question needs the answer 'yes' or 'no'"),
        (row("q2", answer=[], answer_type="short"), r"jsonl:2: 'answer' must be a string or a non-empty list"),
        (row("q1"), r"questions\.jsonl:2: duplicate question_id 'q1' \(first used on line 1\)"),
    ],
)
def test_malformed_lines_name_file_and_line(data_dir, bad_line, message):
    write_lines(data_dir, [row("q1"), bad_line, row("q3")])
    with pytest.raises(ValueError, match=message):
        SampleBenchmark(str(data_dir))


def test_missing_or_empty_questions_file(data_dir):
    with pytest.raises(FileNotFoundError, match="questions.jsonl"):
        SampleBenchmark(str(data_dir))
    write_lines(data_dir, [""])
    with pytest.raises(ValueError, match="holds no questions"):
        SampleBenchmark(str(data_dir))


def test_score_percentages_by_type():
    # Right: 1, 4, 5, 7. Wrong: 2, 6. Failed (None): 3, 8.
    records = [
        {"id": "1", "prediction": "Yes, there is.", "answers": ["yes"], "answer_type": "yes_no"},
        {"id": "2", "prediction": "no", "answers": ["yes"], "answer_type": "yes_no"},
        {"id": "3", "prediction": None, "answers": ["no"], "answer_type": "yes_no"},
        {"id": "4", "prediction": "No.", "answers": ["no"], "answer_type": "yes_no"},
        {"id": "5", "prediction": "The Kitten.", "answers": ["cat", "kitten"], "answer_type": "short"},
        {"id": "6", "prediction": "dog", "answers": ["cat"], "answer_type": "short"},
        {"id": "7", "prediction": "two", "answers": ["2"], "answer_type": "short"},
        {"id": "8", "prediction": None, "answers": ["cat"], "answer_type": "short"},
    ]
    scores = SampleBenchmark(limit=1).score(records)
    assert scores == pytest.approx(
        {"accuracy": 100 * 4 / 8, "yes_no_accuracy": 100 * 2 / 4, "short_answer_accuracy": 100 * 2 / 4}
    )


def test_score_omits_empty_categories():
    bench = SampleBenchmark(limit=1)
    only_short = [
        {"id": "1", "prediction": "cat", "answers": ["cat"], "answer_type": "short"},
        {"id": "2", "prediction": "cat", "answers": ["dog"], "answer_type": "short"},
        {"id": "3", "prediction": "cat", "answers": ["dog"], "answer_type": "short"},
    ]
    assert bench.score(only_short) == pytest.approx(
        {"accuracy": 100 / 3, "short_answer_accuracy": 100 / 3}
    )
    assert bench.score([]) == {}
    with pytest.raises(ValueError, match="answer_type 'mc'"):
        bench.score([{"id": "1", "prediction": "a", "answers": ["a"], "answer_type": "mc"}])
