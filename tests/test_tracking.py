"""wandb tracking of evaluation runs, on real wandb in offline mode (eval.tracking).

The offline runs are read back from the files wandb writes: tables from ``files/media/table/*.table.json``,
config and summary from the run's transaction log (``run-<id>.wandb``: wandb's ``:W&B`` header, then the
LevelDB log format, each record a ``wandb.proto.wandb_internal_pb2.Record``).
"""

import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llava
from conftest import REPO
from eval.benchmarks.sample import SampleBenchmark
from eval.runner import read_predictions
from eval.tracking import SAMPLE_COLUMNS, init_wandb, layer_token_counts, log_results, run_id, sample_score

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

ARM = ["model=llava15_tiny", "benchmark=sample", "limit=3", "batch_size=3", "max_new_tokens=2"]


def eval_script(args, tiny_cache, tmp_path):
    """``scripts/eval.py`` as a user runs it, with HOME pointing at an empty folder (nothing may land there)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", HOME=str(home),
               DYMU_CACHE_DIR=str(tiny_cache), DYMU_OUTPUT_DIR=str(tmp_path / "outputs"))
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_RUN_ID"):
        env.pop(variable, None)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "eval.py"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` transaction log (32 KiB blocks of ``crc32 | length | type`` chunks)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, block, chunks, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunks = data[pos + 7 : pos + 7 + length] if kind in (1, 2) else chunks + data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            out.append(record)
    return out


def run_contents(run_dir: Path) -> tuple[str, dict, dict]:
    """``(run id, config, summary)`` of an offline run directory, values decoded from JSON."""
    (log,) = run_dir.glob("run-*.wandb")
    config, summary, rid = {}, {}, None
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            rid = record.run.run_id
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
    return rid, config, summary


def table(run_dir: Path, key: str) -> dict:
    (path,) = (run_dir / "files" / "media" / "table").glob(f"{key}_*.table.json")
    return json.loads(path.read_text())


def test_one_resumed_run_per_arm_under_one_wandb_dir_with_samples_layers_and_config(tiny_cache, tmp_path):
    outputs = tmp_path / "outputs"
    mid_dir = outputs / "eval" / "llava15_tiny" / "mid" / "sample"
    low_dir = outputs / "eval" / "llava15_tiny" / "low" / "sample"
    eval_script([*ARM, "dymu=mid", "wandb.mode=disabled"], tiny_cache, tmp_path)
    assert (mid_dir / "predictions.jsonl").is_file()
    assert not (outputs / "wandb").exists() and not list(outputs.rglob("*wandb*"))  # disabled: nothing at all

    for _ in range(2):  # the same command twice (the predictions are already there: logging only)
        eval_script([*ARM, "dymu=mid"], tiny_cache, tmp_path)
    eval_script([*ARM, "dymu=low"], tiny_cache, tmp_path)

    runs = sorted((outputs / "wandb").glob("offline-run-*"))
    ids = [d.name.rsplit("-", 1)[1] for d in runs]
    mid_id, low_id = run_id("dymu", mid_dir), run_id("dymu", low_dir)
    assert sorted(ids) == sorted([mid_id, mid_id, low_id]) and mid_id != low_id  # one id per arm
    assert not (mid_dir / "wandb").exists() and not (tmp_path / "wandb").exists()
    assert not [p for p in (tmp_path / "home").rglob("*") if p.is_file()], "wrote outside output / cache folders"

    records = read_predictions(mid_dir / "predictions.jsonl")
    metrics = json.loads((mid_dir / "metrics.json").read_text())
    last_mid = [d for d in runs if d.name.endswith(mid_id)][-1]
    rid, config, summary = run_contents(last_mid)
    assert rid == mid_id
    assert config["dymu/name"] == "mid" and config["model/name"] == "llava15_tiny"
    assert "budget/max_visual_tokens" in config and config["benchmark/name"] == "sample"
    assert summary["metrics/accuracy"] == pytest.approx(metrics["metrics"]["accuracy"])
    assert summary["visual_tokens/mean"] == pytest.approx(metrics["visual_tokens"]["mean"])
    assert summary["n_samples"] == 3

    samples = table(last_mid, "samples")
    assert samples["columns"] == SAMPLE_COLUMNS and len(samples["data"]) == 3
    rows = [dict(zip(SAMPLE_COLUMNS, row)) for row in samples["data"]]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert [r["visual_tokens"] for r in rows] == [r["visual_tokens"] for r in records]
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in records]
    assert all(r["correct"] in (0.0, 1.0) and r["error"] is None for r in rows)
    assert 100 * sum(r["correct"] for r in rows) / 3 == pytest.approx(metrics["metrics"]["accuracy"])

    def layer_means(run_dir):
        layers = table(run_dir, "layer_tokens")
        assert layers["columns"] == ["layer", "mean_tokens"]
        return [m for _, m in layers["data"]]

    mid_layers = layer_means(last_mid)
    assert mid_layers == sorted(mid_layers, reverse=True)  # merging only ever removes tokens
    tokens = [r["visual_tokens"] for r in records]
    assert mid_layers[-1] == pytest.approx(sum(tokens) / len(tokens) + 1)  # the feature layer, with CLS
    assert summary["layer_tokens/layer_00"] == pytest.approx(mid_layers[0])
    low_run = next(d for d in runs if d.name.endswith(low_id))
    assert layer_means(low_run)[-1] < mid_layers[-1]  # low keeps fewer tokens than mid
    assert run_contents(low_run)[1]["dymu/name"] == "low"


def test_run_id_is_stable_per_folder_and_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_id("dymu", "out/a") == run_id("dymu", tmp_path / "out" / "a")  # relative = its absolute path
    assert len({run_id("dymu", "out/a"), run_id("dymu", "out/b"), run_id("other", "out/a")}) == 3
    assert init_wandb({"mode": "disabled"}, {"a": 1}, tmp_path) is None
    assert not list(tmp_path.iterdir())


class _BrokenBenchmark(SampleBenchmark):
    """A benchmark whose sample list fails when the logger reads it (a logging failure, after evaluation)."""

    def samples(self):
        raise OSError("data folder vanished")


def test_a_failure_while_logging_is_reported_and_the_run_still_finishes(tmp_path, caplog, monkeypatch):
    for variable in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # init_wandb sets them; restored afterwards
        monkeypatch.delenv(variable, raising=False)
    settings = {"mode": "offline", "project": "dymu", "dir": str(tmp_path), "data_dir": str(tmp_path / "staging"),
                "cache_dir": str(tmp_path / "cache")}
    run = init_wandb(settings, {"dymu": {"name": "mid"}}, tmp_path / "arm")
    assert run is not None and run.id == run_id("dymu", tmp_path / "arm")
    records = [{"id": "sample-0001", "prediction": "yes", "answers": ["yes"], "answer_type": "yes_no",
                "visual_tokens": 10}]
    with caplog.at_level(logging.ERROR, logger="eval.tracking"):
        log_results(run, {"metrics": {"accuracy": 100.0}}, records, _BrokenBenchmark(limit=1))  # must not raise
    assert "data folder vanished" in caplog.text and "Re-run the same command" in caplog.text
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    exit_codes = [r.exit.exit_code for r in wandb_records(next(run_dir.glob("*.wandb"))) if r.HasField("exit")]
    assert exit_codes == [1]  # finished, and marked as failed


def test_sample_score_is_the_benchmarks_own_score_of_one_record():
    bench = SampleBenchmark()
    yes_no = next(s for s in bench.samples() if s.answer_type == "yes_no")
    record = {"id": yes_no.id, "answers": yes_no.answers, "answer_type": "yes_no", "meta": yes_no.meta}
    assert sample_score(bench, {**record, "prediction": yes_no.answers[0]}) == 1.0
    assert sample_score(bench, {**record, "prediction": "no" if yes_no.answers[0] == "yes" else "yes"}) == 0.0
    assert sample_score(bench, {**record, "prediction": None}) == 0.0  # a failed sample is wrong, as in the metric

    class Judged(SampleBenchmark):
        name = "mmvet"  # an LLM-judged benchmark: one record has no score of its own

    assert sample_score(Judged(limit=1), {**record, "prediction": "yes"}) is None


def test_layer_counts_under_an_exact_budget_follow_the_bounded_pass(tiny_path):
    """With ``max_visual_tokens`` below what the thresholds keep, the pipeline encodes the images a second time
    under the bounded rule; the feature layer's count is then exactly the bound (+ CLS)."""
    bench = SampleBenchmark(limit=3)
    records = [{"id": s.id} for s in bench.samples()]
    thresholds = tiny_path / "thresholds" / "mid.json"
    plain = llava.load_model(tiny_path, dymu=thresholds, dtype=torch.float32)
    free = layer_token_counts(plain, bench, records, max_samples=3)
    bound = int(free[-1]) - 1 - 20  # visual tokens (CLS dropped), well below the free count
    pipe = llava.load_model(tiny_path, dymu=thresholds, dtype=torch.float32, budget={"max_visual_tokens": bound})
    counts = layer_token_counts(pipe, bench, records, max_samples=3)
    assert counts[-1] == bound + 1 and len(counts) == len(free)
    assert layer_token_counts(pipe, bench, records, max_samples=0) is None
    unmerged = llava.load_model(tiny_path, dymu=None, dtype=torch.float32)
    assert layer_token_counts(unmerged, bench, records) is None  # nothing merges: no per-layer counts
