"""The evaluation runner as users run it: data-parallel under torchrun (gloo, CPU) and resumed after a real kill."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO

EVAL = str(REPO / "scripts" / "eval.py")


def env_for(tiny_cache, out_dir):
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
                DYMU_CACHE_DIR=str(tiny_cache), DYMU_OUTPUT_DIR=str(out_dir))


def run(args, tiny_cache, out_dir, torchrun: int = 0):
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}"] if torchrun else [sys.executable]
    result = subprocess.run([*launcher, EVAL, *args], cwd=out_dir.parent, env=env_for(tiny_cache, out_dir),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def read(run_dir):
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return records, metrics


def comparable(records, metrics):
    """What must not depend on how the run was split: answers, token counts, scores (not timings / ranks)."""
    rows = [(r["id"], r["prediction"], r["visual_tokens"]) for r in records]
    return rows, {k: v for k, v in metrics.items() if k != "seconds_per_sample"}


ARGS = ["model=llava15_tiny", "dymu=low", "benchmark=sample", "limit=9", "wandb.mode=disabled"]


def test_two_gloo_ranks_equal_one_process_and_each_sample_runs_once(tiny_cache, tmp_path):
    run(ARGS, tiny_cache, tmp_path / "single")
    run(ARGS, tiny_cache, tmp_path / "ddp", torchrun=2)
    sub = ("eval", "llava15_tiny", "low", "sample")
    single, ddp = read((tmp_path / "single").joinpath(*sub)), read((tmp_path / "ddp").joinpath(*sub))
    assert comparable(*ddp) == comparable(*single)
    ids = [r["id"] for r in ddp[0]]
    assert len(ids) == len(set(ids)) == 9  # every sample exactly once
    assert {r["rank"] for r in ddp[0]} == {0, 1}  # both ranks did work, rank 0 gathered
    assert not list((tmp_path / "ddp").joinpath(*sub).glob("predictions.rank*"))


def test_resume_with_another_world_size_evaluates_only_the_missing_samples(tiny_cache, tmp_path):
    out = tmp_path / "out"
    run([*ARGS[:3], "limit=4", "wandb.mode=disabled"], tiny_cache, out)
    run(ARGS, tiny_cache, out, torchrun=2)
    records, metrics = read(out / "eval" / "llava15_tiny" / "low" / "sample")
    assert metrics["n_samples"] == 9 and len(records) == 9
    assert [("rank" in r) for r in records] == [False] * 4 + [True] * 5  # the first 4 were not redone


def test_killed_run_resumes_and_ends_with_identical_metrics(tiny_cache, tmp_path):
    # OneVision unmerged (~1800 visual tokens per image) is slow enough per sample to be killed midway
    args = ["model=llava_ov_tiny", "dymu=off", "benchmark=sample", "batch_size=1", "limit=10", "max_new_tokens=4",
            "wandb.mode=disabled"]
    reference = tmp_path / "reference"
    run(args, tiny_cache, reference)
    out = tmp_path / "killed"
    run_dir = out / "eval" / "llava_ov_tiny" / "off" / "sample"
    proc = subprocess.Popen([sys.executable, EVAL, *args], cwd=tmp_path, env=env_for(tiny_cache, out),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    predictions = run_dir / "predictions.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if predictions.exists() and len(predictions.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(predictions.read_text().splitlines())
    assert 2 <= done_before < 10 and not (run_dir / "metrics.json").exists()
    run(args, tiny_cache, out)
    records, metrics = read(run_dir)
    assert comparable(records, metrics) == comparable(*read(reference / "eval" / "llava_ov_tiny" / "off" / "sample"))
