"""Issue 12 item 3: a broken run is never reported as a result.

End to end through ``scripts/eval.py`` on the embedded tiny model with real (and deliberately broken) image files:
an all-failed run exits non-zero after writing its records, a partly failed run ends with a summary and says so in
metrics.json, resuming checks the experiment's fingerprint, and every JSON written is strict.
"""

import ast
import json
import shutil

import pytest

from conftest import REPO
from eval.benchmarks.sample import SampleBenchmark
from eval.fingerprint import differences
from eval.jsonio import dumps, finite, read_json
from eval.runner import read_predictions, summarise
from eval.tables import collect, to_csv, to_markdown
from test_robustness import not_an_image, truncated, write_benchmark
from test_scripts import run_script

EVAL = str(REPO / "scripts" / "eval.py")


def _log(run) -> str:
    """What the user sees: Hydra's console log (stdout) and warnings / tracebacks (stderr)."""
    return run.stdout + run.stderr


def _strict(path):
    """Parse a JSON file, failing on NaN / Infinity (Python's json module accepts them by default)."""
    return json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{path} holds {name}"))


def test_all_failed_run_exits_non_zero_after_writing_its_records(tiny_cache, tmp_path):
    data = write_benchmark(tmp_path / "data", {"a": truncated(tmp_path / "a.jpg"), "b": not_an_image(tmp_path / "b.jpg")})
    out = tmp_path / "outputs" / "eval" / "llava15_tiny" / "mid" / "sample"
    run = run_script([EVAL, "model=llava15_tiny", "dymu=mid", "benchmark=sample", f"benchmark.task.data_dir={data}",
                      "wandb.mode=disabled"], tiny_cache, tmp_path)
    log = run.stdout + run.stderr  # Hydra's console log goes to stdout
    assert run.returncode == 1, log[-3000:]
    assert "run FAILED: all 2 samples failed" in log and "image file is truncated" in log
    records = read_predictions(out / "predictions.jsonl")
    assert [r["id"] for r in records] == ["q0", "q1"] and all(r["error"] for r in records)  # nothing lost
    metrics = _strict(out / "metrics.json")
    assert metrics["status"] == "failed" and metrics["n_failed"] == 2 and metrics["n_expected"] == 2
    assert metrics["visual_tokens"]["mean"] is None and metrics["visual_tokens"]["std"] is None
    assert len(metrics["failed"]["first_errors"]) == 2 and metrics["failed"]["ids"] == ["q0", "q1"]


def test_partial_failures_summary_and_resume_fingerprint(tiny_cache, tmp_path):
    data = write_benchmark(tmp_path / "data", {
        "chelsea": None, "bad1": truncated(tmp_path / "t.jpg"), "coffee": None, "bad2": not_an_image(tmp_path / "n.jpg")})
    thresholds = tmp_path / "mid.json"
    shutil.copy(tiny_cache / "llava15_tiny" / "thresholds" / "mid.json", thresholds)
    base = [EVAL, "model=llava15_tiny", "dymu=mid", "benchmark=sample", f"benchmark.task.data_dir={data}",
            f"model.thresholds.mid={thresholds}", "wandb.mode=disabled", "max_new_tokens=4"]
    out = tmp_path / "outputs" / "eval" / "llava15_tiny" / "mid" / "sample"

    first = run_script(base, tiny_cache, tmp_path)
    assert first.returncode == 0, _log(first)[-3000:]
    assert "INCOMPLETE: 2 of 4 samples FAILED" in _log(first)
    assert "image file is truncated" in _log(first) and "cannot identify image file" in _log(first)
    assert "retry_failed=true" in _log(first) and "python scripts/eval.py model=llava15_tiny" in _log(first)
    metrics = _strict(out / "metrics.json")
    assert metrics["status"] == "incomplete" and metrics["n_failed"] == 2 and metrics["n_samples"] == 4
    assert metrics["visual_tokens"]["mean"] > 0
    fingerprint = _strict(out / "fingerprint.json")
    assert fingerprint["settings"]["max_new_tokens"] == 4
    assert fingerprint["settings"]["thresholds"].startswith("sha256:")
    assert fingerprint["settings"]["model"]["weights"].startswith("sha256:")
    assert "{question}" in fingerprint["settings"]["prompt_format"]
    before = (out / "predictions.jsonl").read_text()

    # batch size and device do not change answers: resuming with another batch size is allowed, and says how
    # many recorded samples had failed
    again = run_script([*base, "batch_size=1"], tiny_cache, tmp_path)
    assert again.returncode == 0, _log(again)[-3000:]
    assert "resuming: 4 of 4 samples" in _log(again) and "2 of them recorded as failed" in _log(again)
    assert "retry_failed=true evaluates them again" in _log(again)
    assert (out / "predictions.jsonl").read_text() == before

    # other thresholds (same file, new content) and another answer length: another experiment, refused
    values = json.loads(thresholds.read_text())
    values["values"][0] = 0.5
    thresholds.write_text(json.dumps(values))
    other = run_script([*base[:-1], "max_new_tokens=3"], tiny_cache, tmp_path)
    assert other.returncode != 0
    assert "holds predictions made with other settings" in _log(other)
    assert "max_new_tokens: 4 -> 3" in _log(other) and "thresholds: 'sha256:" in _log(other)
    assert "output_dir=<new folder>" in _log(other) and "recorded settings" in _log(other)
    assert "batch_size" not in _log(other).split("other settings")[1].split("Either")[0]
    assert (out / "predictions.jsonl").read_text() == before  # nothing appended to the other experiment


def test_differences_name_nested_settings():
    old = {"dymu": {"vtu": True, "vtu_cache": "merged"}, "max_new_tokens": 4}
    new = {"dymu": {"vtu": True, "vtu_cache": "expanded"}, "max_new_tokens": 4, "budget": {"max_visual_tokens": 64}}
    assert differences(old, new) == ["budget/max_visual_tokens: '<absent>' -> 64",
                                      "dymu/vtu_cache: 'merged' -> 'expanded'"]
    assert differences(old, old) == []


def test_summarise_has_no_nan_and_a_status():
    bench = SampleBenchmark(limit=3)
    samples = bench.samples()
    failed = [{"id": s.id, "prediction": None, "answers": s.answers, "answer_type": s.answer_type, "visual_tokens": None,
               "seconds": 0.1, "error": "ValueError: boom"} for s in samples]
    metrics = summarise(failed, bench)
    assert metrics["status"] == "failed" and metrics["visual_tokens"]["mean"] is None
    assert metrics["failed"]["first_errors"] == ["ValueError: boom"]  # distinct messages only
    json.loads(dumps(metrics), parse_constant=pytest.fail)
    good = [dict(r, prediction="yes", visual_tokens=10, error=None) for r in failed]
    assert summarise(good, bench)["status"] == "complete"
    assert summarise(good[:2], bench, expected=3)["status"] == "incomplete"  # a sample missing


def test_strict_json_helpers():
    assert finite({"a": float("nan"), "b": [1.0, float("inf")], "c": (2, "x")}) == {"a": None, "b": [1.0, None],
                                                                                     "c": [2, "x"]}
    assert dumps({"x": float("-inf")}) == '{"x": null}'


def test_read_json_refuses_nan(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{"mean": NaN}')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_json(path)


def test_make_table_marks_incomplete_and_failed_runs(tmp_path):
    def write(run, metrics):
        folder = tmp_path / "eval" / "llava15_tiny" / run / "sample"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(metrics))

    tokens = {"mean": 100.0, "std": 5.0, "min": 90, "max": 110}
    write("good", {"status": "complete", "n_samples": 29, "n_failed": 0, "n_expected": 29, "visual_tokens": tokens,
                   "metrics": {"accuracy": 41.4}})
    write("partial", {"status": "incomplete", "n_samples": 29, "n_failed": 3, "n_expected": 29,
                      "visual_tokens": tokens, "metrics": {"accuracy": 37.9}})
    write("broken", {"status": "failed", "n_samples": 29, "n_failed": 29, "n_expected": 29,
                     "visual_tokens": {"mean": None, "std": None}, "metrics": {"accuracy": None}})
    # a metrics.json written before "status" existed, by the run the issue describes
    (tmp_path / "legacy.json").write_text('{"n_samples": 29, "n_failed": 29, "visual_tokens": {"mean": NaN, "std": NaN},'
                                          ' "metrics": {"accuracy": NaN}}')
    folder = tmp_path / "eval" / "llava15_tiny" / "legacy" / "sample"
    folder.mkdir(parents=True)
    shutil.move(tmp_path / "legacy.json", folder / "metrics.json")

    table = to_markdown(collect(tmp_path / "eval"))
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in table.splitlines() if line.startswith("| llava")}
    assert "| 41.4 |" in rows["llava15_tiny good"] and "*" not in rows["llava15_tiny good"]
    assert "37.9 * (3 of 29 failed)" in rows["llava15_tiny partial"]
    assert "FAILED (29 of 29 failed)" in rows["llava15_tiny broken"]
    assert "FAILED (29 of 29 failed)" in rows["llava15_tiny legacy"]
    assert "nan" not in table.lower() and "incomplete run" in table
    assert "Sample: 3 of 29 failed" in to_csv(collect(tmp_path / "eval"))


_WRITTEN_BY_PROJECT = ["dymu", "llava", "eval", "scripts"]


def test_every_json_the_project_writes_is_strict():
    """Every ``json.dump`` / ``json.dumps`` call in the library and scripts passes ``allow_nan=False`` (directly or
    through :func:`eval.jsonio.dumps`), so no NaN / Infinity can reach a file."""
    offenders = []
    for package in _WRITTEN_BY_PROJECT:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("dump", "dumps") and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "json"):
                    strict = any(k.arg == "allow_nan" and isinstance(k.value, ast.Constant) and k.value.value is False
                                 for k in node.keywords)
                    if not strict:
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == [], f"json.dump(s) without allow_nan=False: {offenders}"
