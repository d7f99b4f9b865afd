"""Issue 13: concurrent runs, broken prediction records, secrets, typed settings, torn tables, full disks.

Real files, real subprocesses holding real OS locks, the real Hydra entry points on the embedded tiny model, a real
HTTP server standing in for the LLM judge (the judge is not the thing under test; what the project writes is).
"""

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from conftest import REPO
from eval.benchmarks.judge import JudgeClient, JudgeError
from eval.benchmarks.sample import SampleBenchmark
from eval.jsonio import read_json, write_json_atomic
from eval.lock import OutputLockedError, output_lock
from eval.redaction import install_log_redaction
from eval.runner import check_predictions, check_run_settings, read_predictions, run_benchmark
from eval.speed import run_from_config
from eval.tables import collect
from test_bench_mmvet import FIXTURE as MMVET_FIXTURE
from test_bench_mmvet import judge_server  # noqa: F401 - the loopback OpenAI-compatible server fixture
from test_scripts import run_script

EVAL = str(REPO / "scripts" / "eval.py")
SECRET = "sk-live-0123456789abcdefSECRET"


def answer_all(calls):
    """A generate function that answers "yes" and counts its calls (the runner is what is tested)."""

    def generate(prompts, inputs, max_new_tokens):
        calls.append(len(prompts))
        return ["yes"] * len(prompts), [7] * len(prompts)

    return generate


def hold_lock(folder):
    """A separate process that holds ``folder``'s output lock until killed; returns it once the lock is held."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from eval.lock import output_lock
        with output_lock({str(folder)!r}):
            print("held", flush=True)
            time.sleep(600)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


# ---------------------------------------------------------------- 1. one writer per output folder


def test_a_second_run_into_a_held_folder_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        calls = []
        with pytest.raises(OutputLockedError, match=rf"(?s)is in use by pid {holder.pid} on .*, started .*: .*python.* -c .*output_lock") as err:
            run_benchmark(answer_all(calls), SampleBenchmark(), out, limit=3, progress=False)
        assert "choose another output_dir" in str(err.value)
        assert calls == [] and not (out / "predictions.jsonl").exists()  # nothing evaluated, nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock died with it, the next run proceeds
    metrics = run_benchmark(answer_all([]), SampleBenchmark(), out, limit=3, progress=False)
    assert metrics["n_samples"] == 3


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    """eval.main holds the folder while the runner takes it again."""
    with output_lock(tmp_path / "run"):
        metrics = run_benchmark(answer_all([]), SampleBenchmark(), tmp_path / "run", limit=2, progress=False)
    assert metrics["status"] == "complete"


def test_eval_script_refuses_a_folder_another_run_holds_before_loading_the_model(tiny_cache, tmp_path):
    out = tmp_path / "outputs" / "eval" / "llava15_tiny" / "mid" / "sample"
    holder = hold_lock(out)
    try:
        run = run_script([EVAL, "model=llava15_tiny", "dymu=mid", "benchmark=sample", "limit=2",
                          "wandb.mode=disabled"], tiny_cache, tmp_path)
    finally:
        holder.kill()
        holder.wait()
    log = run.stdout + run.stderr
    assert run.returncode != 0
    assert f"is in use by pid {holder.pid}" in log
    assert "applied" not in log  # refused before the model loaded ("DToMe applied ...", "VTU applied ...")
    assert not (out / "predictions.jsonl").exists()


def test_two_identical_eval_commands_started_together_evaluate_each_sample_once(tiny_cache, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", DYMU_CACHE_DIR=str(tiny_cache),
               DYMU_OUTPUT_DIR=str(tmp_path / "outputs"))
    args = [sys.executable, EVAL, "model=llava15_tiny", "dymu=mid", "benchmark=sample", "limit=6", "batch_size=1",
            "max_new_tokens=2"]
    runs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    logs = [r.communicate(timeout=600)[0] for r in runs]
    codes = [r.returncode for r in runs]
    out = tmp_path / "outputs" / "eval" / "llava15_tiny" / "mid" / "sample"
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 6, logs  # before the lock: both runs evaluated everything (12 lines)
    assert 0 in codes
    for code, log in zip(codes, logs):
        assert code == 0 or "is in use by pid" in log, log[-2000:]


def test_concurrent_atomic_json_writes_never_fail_or_tear(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"writer": -1, "payload": "x" * 20000})
    errors, reads = [], []

    def write(k):
        try:
            for i in range(150):
                write_json_atomic(path, {"writer": k, "i": i, "payload": "x" * 20000})
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    def read():
        try:
            for _ in range(300):
                reads.append(read_json(path)["payload"] == "x" * 20000)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(3)] + [threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and all(reads) and len(reads) == 300
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left behind


# ---------------------------------------------------------------- 7. malformed prediction records


def _good_record(sample_id):
    return {"id": sample_id, "question": "q", "prediction": "yes", "answers": ["yes"], "answer_type": "yes_no",
            "meta": {}, "visual_tokens": 5, "seconds": 0.1}


BAD_LINES = {
    "id only": (json.dumps({"id": "x"}).encode(), "is missing question, prediction, answers"),
    "tokens as text": (json.dumps({**_good_record("x"), "visual_tokens": "many"}).encode(),
                       "visual_tokens must be an integer >= 0 or null, got 'many'"),
    "a list": (b"[1, 2, 3]", "is a JSON list, not a prediction record"),
    "tokens as bool": (json.dumps({**_good_record("x"), "visual_tokens": True}).encode(), "visual_tokens must be"),
    "answers not strings": (json.dumps({**_good_record("x"), "answers": [1]}).encode(), "answers must be a list of"),
    "prediction and error": (json.dumps({**_good_record("x"), "error": "boom"}).encode(), "not both"),
    "neither": (json.dumps({**_good_record("x"), "prediction": None}).encode(), "not neither"),
    "not UTF-8": (b'{"id": "\xff\xfe"}', "is not UTF-8 text"),
    "NaN": (json.dumps({**_good_record("x"), "seconds": float("nan")}).encode(), "is not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_malformed_records_are_refused_on_resume_before_any_work(case, tmp_path):
    line, message = BAD_LINES[case]
    samples = SampleBenchmark().samples()
    good = json.dumps(_good_record(samples[1].id)).encode()
    out = tmp_path / "run"
    out.mkdir()
    (out / "predictions.jsonl").write_bytes(line + b"\n" + good + b"\n")
    before = (out / "predictions.jsonl").read_bytes()
    calls = []
    with pytest.raises(ValueError, match="predictions.jsonl:1") as err:
        run_benchmark(answer_all(calls), SampleBenchmark(), out, limit=4, progress=False)
    assert message in str(err.value) and "fix or delete that line" in str(err.value)
    assert calls == [] and not (out / "metrics.json").exists()  # refused before any sample ran
    assert (out / "predictions.jsonl").read_bytes() == before  # and nothing was lost
    with pytest.raises(ValueError, match="predictions.jsonl:1"):
        check_predictions(out)  # what eval.main calls before loading the model


def test_a_torn_last_line_is_still_redone_and_a_good_file_reads(tmp_path):
    samples = SampleBenchmark().samples()
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(json.dumps(_good_record(samples[0].id)).encode() + b'\n{"id": "q1", "quest')
    assert check_predictions(tmp_path) == 1 and path.read_bytes().endswith(b'"quest')  # the check changes nothing
    assert [r["id"] for r in read_predictions(path)] == [samples[0].id]
    assert path.read_bytes().endswith(b"\n")  # repaired for appending


def test_eval_script_stops_on_a_broken_record_before_loading_the_model(tiny_cache, tmp_path):
    out = tmp_path / "outputs" / "eval" / "llava15_tiny" / "mid" / "sample"
    out.mkdir(parents=True)
    (out / "predictions.jsonl").write_text('{"id": "q0"}\n')
    run = run_script([EVAL, "model=llava15_tiny", "dymu=mid", "benchmark=sample", "wandb.mode=disabled"], tiny_cache,
                     tmp_path)
    log = run.stdout + run.stderr
    assert run.returncode != 0 and "predictions.jsonl:1 is missing question" in log
    assert "applied" not in log  # before the model loaded ("DToMe applied ...", "VTU applied ...")


# ---------------------------------------------------------------- 8. secrets


def test_an_api_key_echoed_by_the_judge_is_redacted_from_errors_logs_and_cache(judge_server, tmp_path, monkeypatch,
                                                                               caplog):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    echo = {"error": {"message": f"Incorrect API key provided: {SECRET}"}}
    judge_server.script = [(500, echo, {}), (401, echo, {})]
    judge = JudgeClient(base_url=judge_server.url, cache_path=tmp_path / "judge.jsonl", backoff_s=0.01, max_retries=2)
    with caplog.at_level(logging.WARNING), pytest.raises(JudgeError) as err:
        judge.complete("Grade this.")
    assert "HTTP 401" in str(err.value) and "<redacted>" in str(err.value)
    assert SECRET not in str(err.value) and SECRET not in caplog.text and "<redacted>" in caplog.text
    judge_server.script = [(200, {"choices": [{"message": {"content": f"ok {SECRET}"}}]}, {})]
    assert judge.complete("Grade that.") == "ok <redacted>"
    assert SECRET not in (tmp_path / "judge.jsonl").read_text()


def test_log_redaction_covers_every_logger_and_tracebacks(tmp_path, monkeypatch):
    monkeypatch.setenv("SOME_SERVICE_API_KEY", SECRET)
    handler = logging.FileHandler(tmp_path / "eval.log")
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        install_log_redaction()
        install_log_redaction()  # idempotent
        assert sum(type(f).__name__ == "RedactSecrets" for f in handler.filters) == 1
        logging.getLogger("some.library").error("request failed: key=%s", SECRET)
        try:
            raise RuntimeError(f"server said {SECRET}")
        except RuntimeError:
            logging.getLogger("other").exception("boom")
    finally:
        root.removeHandler(handler)
        handler.close()
    text = (tmp_path / "eval.log").read_text()
    assert SECRET not in text and text.count("<redacted>") == 2 and "RuntimeError" in text


def test_eval_script_never_stores_an_echoed_api_key(judge_server, tiny_cache, tmp_path):
    """End to end: the judge rejects the key and echoes it; nothing under outputs/ (eval.log, wandb's
    output.log and .wandb file, predictions, metrics) and nothing printed holds it."""
    judge_server.reply = lambda request: (401, {"error": {"message": f"Incorrect API key {SECRET}"}}, {})
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", OPENAI_API_KEY=SECRET,
               OPENAI_BASE_URL=judge_server.url, DYMU_CACHE_DIR=str(tiny_cache),
               DYMU_OUTPUT_DIR=str(tmp_path / "outputs"), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    run = subprocess.run([sys.executable, EVAL, "model=llava15_tiny", "dymu=low", "benchmark=mmvet",
                          f"benchmark.task.data_dir={MMVET_FIXTURE}", "max_new_tokens=2", "wandb.layer_tokens_samples=0",
                          f"benchmark.task.judge.cache_path={tmp_path / 'judge.jsonl'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert judge_server.requests and "HTTP 401" in run.stdout + run.stderr  # the judge was asked and refused
    assert SECRET not in run.stdout + run.stderr
    files = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert any(p.name == "eval.log" for p in files) and any(p.suffix == ".wandb" for p in files)
    leaking = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaking == []


# ---------------------------------------------------------------- 9. typed settings


def _compose(config, overrides):
    with initialize_config_dir(config_dir=str(REPO / "hydra_conf"), version_base="1.3"):
        return compose(config_name=config, overrides=overrides)


@pytest.mark.parametrize("word, value", [("no", False), ("false", False), ("off", False), ("yes", True)])
def test_boolean_settings_read_words_as_booleans(word, value):
    cfg = _compose("eval", [f"resume={word}", f"retry_failed={word}", "model=llava15_tiny"])
    assert cfg.resume is value and cfg.retry_failed is value


@pytest.mark.parametrize("override, key", [("batch_size=1.5", "batch_size"), ("batch_size=abc", "batch_size"),
                                           ("limit=2.5", "limit"), ("resume=maybe", "resume"),
                                           ("max_new_tokens=ten", "max_new_tokens"), ("wandb.mode=onine", "mode"),
                                           ("seed=0.5", "seed"), ("batch_sise=2", "batch_sise")])
def test_wrongly_typed_eval_settings_fail_while_composing_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        _compose("eval", ["model=llava15_tiny", override])
    message = f"{err.value}\n{err.value.__cause__}"
    assert key in message


def test_eval_script_with_a_wrongly_typed_value_writes_nothing(tiny_cache, tmp_path):
    run = run_script([EVAL, "model=llava15_tiny", "batch_size=1.5"], tiny_cache, tmp_path)
    assert run.returncode != 0 and "batch_size" in run.stderr and "could not be converted to Integer" in run.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("settings, key", [({"batch_size": 1.5}, "batch_size"), ({"batch_size": "abc"}, "batch_size"),
                                           ({"batch_size": True}, "batch_size"), ({"limit": 2.5}, "limit"),
                                           ({"resume": "no"}, "resume"), ({"retry_failed": "no"}, "retry_failed"),
                                           ({"max_new_tokens": 0}, "max_new_tokens")])
def test_the_runner_checks_its_settings_by_type_naming_the_key(settings, key, tmp_path):
    with pytest.raises(ValueError, match=rf"^{key} must be"):
        check_run_settings(**settings)
    runner_args = {k: v for k, v in settings.items() if k != "max_new_tokens"}
    if runner_args:
        with pytest.raises(ValueError, match=rf"^{key} must be"):
            run_benchmark(answer_all([]), SampleBenchmark(), tmp_path / "run", progress=False, **runner_args)
        assert not (tmp_path / "run").exists()  # nothing written, so resume=false still works afterwards


def test_an_empty_predictions_file_does_not_block_a_fresh_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "predictions.jsonl").write_text("")  # a run that stopped before its first sample
    metrics = run_benchmark(answer_all([]), SampleBenchmark(), tmp_path / "run", limit=2, resume=False, progress=False)
    assert metrics["n_samples"] == 2


def test_wandb_mode_from_the_environment_is_honoured(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert _compose("eval", ["model=llava15_tiny"]).wandb.mode.value == "disabled"
    assert _compose("eval", ["model=llava15_tiny", "wandb.mode=offline"]).wandb.mode.value == "offline"  # CLI wins
    monkeypatch.delenv("WANDB_MODE")
    assert _compose("eval", ["model=llava15_tiny"]).wandb.mode.value == "offline"


# ---------------------------------------------------------------- 10. tables, benchmark counts, full disks


def _metrics(value):
    return {"benchmark": "gqa", "status": "complete", "n_samples": 2, "n_failed": 0, "n_expected": 2,
            "visual_tokens": {"mean": 100.0, "std": 1.0, "min": 99, "max": 101}, "metrics": {"accuracy": value}}


def test_a_torn_metrics_file_is_skipped_and_named_not_fatal(tmp_path, caplog):
    good, torn = tmp_path / "m" / "good" / "gqa", tmp_path / "m" / "torn" / "gqa"
    good.mkdir(parents=True)
    torn.mkdir(parents=True)
    (good / "metrics.json").write_text(json.dumps(_metrics(0.6)))
    (torn / "metrics.json").write_text(json.dumps(_metrics(0.5))[:40])
    with caplog.at_level(logging.WARNING):
        rows = collect(tmp_path)
    assert [r.method for r in rows] == ["m good"]
    assert str(torn / "metrics.json") in caplog.text and "Re-run that evaluation" in caplog.text
    (good / "metrics.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="every metrics.json under .* is unreadable"):
        collect(tmp_path)


@pytest.mark.parametrize("key, value", [("rounds", 0), ("decode_tokens", -1), ("rounds", 1.5)])
def test_benchmark_counts_are_checked_before_anything_is_built(key, value, tmp_path):
    cfg = {"output_dir": str(tmp_path / "out"), "rounds": 1, "decode_tokens": 1, "shape": "no-such-shape",
           "calibration": {"max_images": 2, "batch_size": 2}, key: value}
    with pytest.raises(ValueError, match=rf"^{key} must be an integer >= "):
        run_from_config(cfg)
    assert not (tmp_path / "out").exists()


def test_benchmark_settings_are_typed_while_composing():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("speed", ["rounds=abc"])
    assert "rounds" in f"{err.value}\n{err.value.__cause__}"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_error_names_the_file_and_keeps_what_was_written(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "predictions.jsonl").symlink_to("/dev/full")  # every write: ENOSPC, "No space left on device"
    with pytest.raises(OSError, match=r"cannot write .*predictions.jsonl \(No space left on device\); free disk "
                                      r"space .* the run resumes after them"):
        run_benchmark(answer_all([]), SampleBenchmark(), out, limit=2, progress=False)


def test_output_lock_owner_file_is_written_and_the_lock_released(tmp_path):
    with output_lock(tmp_path / "run"):
        owner = json.loads((tmp_path / "run" / ".dymu.lock.owner.json").read_text())
        assert owner["pid"] == os.getpid()
    start = time.perf_counter()
    holder = hold_lock(tmp_path / "run")  # another process can take it at once
    holder.kill()
    holder.wait()
    assert time.perf_counter() - start < 60


def test_a_refused_run_names_a_holder_that_has_not_written_its_owner_file_yet(tmp_path):
    """The holder writes its owner file just after taking the lock; a run refused in between waits for it
    instead of reporting an unreadable owner (the race that made two simultaneous eval commands flaky)."""
    from filelock import FileLock

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".dymu.lock.owner.json").write_text('{"pid": 1, "host": "stale"')  # a torn leftover
    with FileLock(folder / ".dymu.lock", timeout=0):  # held, owner not written yet
        late = threading.Timer(0.3, lambda: (folder / ".dymu.lock.owner.json").write_text(json.dumps(
            {"pid": 4242, "host": "h", "started": "now", "command": "python scripts/eval.py"})))
        late.start()
        try:
            with pytest.raises(OutputLockedError, match="is in use by pid 4242 on h"):
                with output_lock(folder):
                    pass
        finally:
            late.join()
    with output_lock(folder):
        pass
    assert not (folder / ".dymu.lock.owner.json").exists()  # released: no owner left for the next run to report


def test_atomic_writes_name_the_file_when_the_disk_refuses_and_keep_the_old_content(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes the OS refuse the write with EFBIG, which names no file by itself."""
    target = tmp_path / "metrics.json"
    target.write_text("old")
    code = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from dymu.atomic import write_text_atomic
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        try:
            write_text_atomic({str(target)!r}, "x" * 5000)
        except OSError as err:
            print(err)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert f"cannot write {target} (File too large); free disk space" in out.stdout, out.stdout + out.stderr
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
