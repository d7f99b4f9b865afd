"""The Hydra entry points, run as a user runs them (subprocesses, offline, tiny model)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from eval.benchmarks.sample import SampleBenchmark
from eval.runner import read_predictions, run_benchmark


def run_script(args, tiny_cache, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               DYMU_CACHE_DIR=str(tiny_cache), DYMU_OUTPUT_DIR=str(tmp_path / "outputs"))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_eval_script_writes_predictions_metrics_and_resumes(tiny_cache, tmp_path):
    out_dir = tmp_path / "outputs" / "eval" / "llava15_tiny" / "mid" / "sample"
    first = run_script([str(REPO / "scripts" / "eval.py"), "model=llava15_tiny", "dymu=mid", "benchmark=sample",
                        "limit=5", "batch_size=2"], tiny_cache, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    records = read_predictions(out_dir / "predictions.jsonl")
    assert [r["id"] for r in records] == [s.id for s in SampleBenchmark().samples()[:5]]
    assert all(0 < r["visual_tokens"] < 576 and isinstance(r["prediction"], str) for r in records)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n_samples"] == 5 and set(metrics["visual_tokens"]) == {"mean", "std", "min", "max"}
    assert set(metrics["metrics"]) >= {"accuracy"} and metrics["seconds_per_sample"] > 0
    from test_newcomer import readme_metrics_example

    example = readme_metrics_example()  # the README's trimmed metrics.json shows fields a real run writes
    assert set(example) <= set(metrics), set(example) - set(metrics)
    assert set(example["visual_tokens"]) == set(metrics["visual_tokens"])
    assert set(example["metrics"]) == set(metrics["metrics"])
    assert list((tmp_path / "outputs" / "wandb").glob("offline-run-*")), "wandb offline run missing"  # wandb.dir

    second = run_script([str(REPO / "scripts" / "eval.py"), "model=llava15_tiny", "dymu=mid", "benchmark=sample",
                         "limit=7", "wandb.mode=disabled"], tiny_cache, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = read_predictions(out_dir / "predictions.jsonl")
    assert resumed[:5] == records and len(resumed) == 7  # only the missing samples were evaluated
    assert json.loads((out_dir / "metrics.json").read_text())["n_samples"] == 7


def test_eval_script_runs_llava_onevision_offline(tiny_cache, tmp_path):
    result = run_script([str(REPO / "scripts" / "eval.py"), "model=llava_ov_tiny", "dymu=mid", "benchmark=sample",
                         "limit=3", "wandb.mode=disabled"], tiny_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out_dir = tmp_path / "outputs" / "eval" / "llava_ov_tiny" / "mid" / "sample"
    records = read_predictions(out_dir / "predictions.jsonl")
    assert len(records) == 3 and all(r["visual_tokens"] > 0 for r in records)
    import dymu

    t = dymu.Thresholds.load(tiny_cache / "llava_ov_tiny" / "thresholds" / "mid.json")  # calibrated on first use
    assert t.encoder.startswith("siglip_vision_model") and t.target_tokens == 182
    assert t.num_images > t.extra["images"]  # calibration saw the AnyRes crops, not just one view per image


def test_missing_mid_thresholds_for_llava15_fail_with_the_command_to_make_them(tiny_cache, tmp_path):
    result = run_script([str(REPO / "scripts" / "eval.py"), "model=llava15", "dymu=mid",
                         f"paths.thresholds_dir={tmp_path}/none", "wandb.mode=disabled"], tiny_cache, tmp_path)
    assert result.returncode != 0
    assert "scripts/find_thresholds.py model=llava15 variant=mid" in result.stderr


def test_find_thresholds_script_writes_a_loadable_file(tiny_cache, tmp_path):
    out = tmp_path / "low.json"
    result = run_script([str(REPO / "scripts" / "find_thresholds.py"), "model=llava15_tiny", "variant=low",
                         f"output={out}", "batch_size=16", "data.max_images=32", "realised_max_images=16"],
                        tiny_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    import dymu

    t = dymu.Thresholds.load(out)
    assert len(t.values) == 7 and t.target_tokens == 94 and t.num_images == 32
    assert t.realised_tokens["num_images"] == 16 and t.extra["seed"] == 0
    again = run_script([str(REPO / "scripts" / "find_thresholds.py"), "model=llava15_tiny", "variant=low",
                        f"output={out}"], tiny_cache, tmp_path)
    assert again.returncode != 0 and "overwrite=true" in again.stderr  # never overwrites silently


class _Flaky:
    """A generate function that fails on one question (a real failure path, not a mock of the runner)."""

    def __init__(self, bad_id_question):
        self.bad = bad_id_question

    def __call__(self, prompts, inputs, max_new_tokens):
        if any(self.bad in p for p in prompts):
            raise RuntimeError("boom")
        return ["yes"] * len(prompts), [10] * len(prompts)


def test_runner_records_a_failing_sample_and_scores_the_rest(tmp_path):
    bench = SampleBenchmark(limit=4)
    bad = bench.samples()[1].question
    metrics = run_benchmark(_Flaky(bad), bench, tmp_path, batch_size=4, progress=False)
    records = read_predictions(tmp_path / "predictions.jsonl")
    assert len(records) == 4 and metrics["n_failed"] == 1 and metrics["n_samples"] == 4
    failed = [r for r in records if r.get("error")]
    assert failed[0]["prediction"] is None and "boom" in failed[0]["error"]


def test_runner_redoes_a_torn_last_line(tmp_path):
    bench = SampleBenchmark(limit=3)
    run_benchmark(_Flaky("never"), bench, tmp_path, progress=False)
    path = tmp_path / "predictions.jsonl"
    path.write_text(path.read_text()[:-20])  # killed while writing the last record
    metrics = run_benchmark(_Flaky("never"), bench, tmp_path, progress=False)
    assert metrics["n_samples"] == 3 and len(read_predictions(path)) == 3


def test_runner_refuses_to_overwrite_without_resume(tmp_path):
    bench = SampleBenchmark(limit=1)
    run_benchmark(_Flaky("never"), bench, tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="resume=true"):
        run_benchmark(_Flaky("never"), bench, tmp_path, resume=False, progress=False)
