"""MM-Vet and the LLM-judge client: official mm-vet.json loading, errors, prompt, judge prompt and score
parsing, scores per capability, pending without a key; the client against a real HTTP server on 127.0.0.1
(request body, Authorization, retries, cache); scripts/eval.py end to end (pending)."""

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import REPO
from eval.benchmarks.judge import JudgeClient, JudgeError
from eval.benchmarks.mmvet import JUDGE_EXAMPLES, MMVetBenchmark, mmvet_judge_prompt, parse_mmvet_score
from eval.runner import read_predictions, summarise

FIXTURE = REPO / "tests" / "fixtures" / "mmvet"


def run_script(args, tiny_cache, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               DYMU_CACHE_DIR=str(tiny_cache), DYMU_OUTPUT_DIR=str(tmp_path / "outputs"))
    env.pop("OPENAI_API_KEY", None)  # no judge: the metric must come out pending
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------- a scripted OpenAI-compatible server (loopback)


def completion(text):
    return {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        request = {"path": self.path, "authorization": self.headers.get("Authorization"),
                   "content_type": self.headers.get("Content-Type"), "body": body}
        self.server.requests.append(request)
        status, payload, headers = self.server.script.pop(0) if self.server.script else self.server.reply(request)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server(monkeypatch):
    """A real HTTP server on 127.0.0.1: answers from ``script`` (a list of (status, json, headers)) first,
    then from ``reply(request)``; records every request."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests, server.script = [], []
    server.reply = lambda request: (200, completion("1.0"), {})
    server.url = f"http://127.0.0.1:{server.server_port}/v1"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    yield server
    server.shutdown()
    server.server_close()


def client(server, tmp_path, **kwargs):
    return JudgeClient(base_url=server.url, cache_path=tmp_path / "judge.jsonl", backoff_s=0.01, **kwargs)


# ---------------------------------------------------------------- the judge client


def test_client_posts_the_chat_completion_request(judge_server, tmp_path):
    judge_server.script = [(200, completion("0.7"), {})]
    reply = client(judge_server, tmp_path, model="judge-x").complete("Grade this.", max_tokens=5)
    assert reply == "0.7"
    (request,) = judge_server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["authorization"] == "Bearer sk-test-123"
    assert request["content_type"] == "application/json"
    assert request["body"] == {"model": "judge-x", "messages": [{"role": "user", "content": "Grade this."}],
                               "temperature": 0, "max_tokens": 5}


def test_client_takes_base_url_from_env_and_key_from_the_named_variable(judge_server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", judge_server.url + "/")
    monkeypatch.setenv("MY_JUDGE_KEY", "other-key")
    judge = JudgeClient(api_key_env="MY_JUDGE_KEY")
    assert judge.base_url == judge_server.url and judge.model == "gpt-4-0613"
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert judge.complete(messages) == "1.0"
    (request,) = judge_server.requests
    assert request["authorization"] == "Bearer other-key"
    assert request["body"] == {"model": "gpt-4-0613", "messages": messages, "temperature": 0}


def test_client_retries_on_500_and_429_then_succeeds(judge_server, tmp_path):
    judge_server.script = [(500, {"error": "busy"}, {}), (429, {"error": "slow down"}, {"Retry-After": "0"}),
                           (200, completion("0.3"), {})]
    assert client(judge_server, tmp_path).complete("p") == "0.3"
    assert len(judge_server.requests) == 3


def test_client_gives_up_after_max_retries_and_not_retrying_a_401(judge_server, tmp_path):
    judge_server.reply = lambda request: (503, {"error": "down"}, {})
    with pytest.raises(JudgeError, match="after 3 attempts"):
        client(judge_server, tmp_path, max_retries=2).complete("p")
    assert len(judge_server.requests) == 3
    judge_server.requests.clear()
    judge_server.script = [(401, {"error": "bad key"}, {})]
    with pytest.raises(JudgeError, match="HTTP 401"):
        client(judge_server, tmp_path).complete("p")
    assert len(judge_server.requests) == 1
    judge_server.script = [(200, {"no": "choices"}, {})]
    with pytest.raises(JudgeError, match="no choices"):
        client(judge_server, tmp_path).complete("p")


def test_cache_file_prevents_a_second_call(judge_server, tmp_path):
    judge_server.script = [(200, completion("0.4"), {})]
    assert client(judge_server, tmp_path).complete("same prompt") == "0.4"
    lines = (tmp_path / "judge.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["response"] == "0.4"
    fresh = client(judge_server, tmp_path)  # a resumed run: new client, same cache file
    assert fresh.complete("same prompt") == "0.4"
    assert len(judge_server.requests) == 1  # answered from the cache
    assert client(judge_server, tmp_path, model="another-judge").complete("same prompt") == "1.0"  # key has the model
    assert len(judge_server.requests) == 2


def test_no_key_returns_none_with_one_warning_and_no_request(judge_server, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("OPENAI_API_KEY")
    judge = client(judge_server, tmp_path)
    with caplog.at_level(logging.WARNING, logger="eval.benchmarks.judge"):
        assert judge.complete("a") is None and judge.complete("b") is None
    assert not judge.available and judge_server.requests == []
    assert len([r for r in caplog.records if "OPENAI_API_KEY" in r.getMessage()]) == 1


# ---------------------------------------------------------------- MM-Vet


def test_loads_official_json_and_prompts_the_question_as_is():
    bench = MMVetBenchmark(data_dir=str(FIXTURE))
    samples = bench.samples()
    assert [s.id for s in samples] == ["v1_0", "v1_1", "v1_2"]
    assert samples[1].meta["capability"] == ["ocr", "math"] and samples[1].answers == ["7"]
    assert samples[2].image_paths == [str((FIXTURE / "images" / "v1_2.jpg").resolve())]
    assert bench.prompt(samples[0]) == "What shape is shown in the image?"
    assert bench.max_new_tokens == 512
    assert [s.id for s in MMVetBenchmark(data_dir=str(FIXTURE), limit=2).samples()] == ["v1_0", "v1_1"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: {k: v for k, v in d.items() if k != "v1_0"}, None),  # still valid
        (lambda d: {**d, "v1_9": {"imagename": "v1_0.png", "question": "Q"}},
         r"'v1_9': missing key\(s\) \['answer', 'capability'\]"),
        (lambda d: {**d, "v1_9": {**d["v1_1"], "capability": "ocr"}}, "'capability' must be a non-empty list"),
        (lambda d: {**d, "v1_9": {**d["v1_1"], "imagename": "gone.png"}}, r"gone\.png does not exist"),
        (lambda d: [d], "must be a non-empty JSON object"),
    ],
)
def test_malformed_entries_fail_naming_the_entry(tmp_path, edit, message):
    shutil.copytree(FIXTURE, tmp_path / "mm-vet")
    path = tmp_path / "mm-vet" / "mm-vet.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    if message is None:
        assert len(MMVetBenchmark(data_dir=str(tmp_path)).samples()) == 2  # parent of mm-vet/ works too
    else:
        with pytest.raises(ValueError, match=message):
            MMVetBenchmark(data_dir=str(tmp_path))


def test_missing_data_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="mm-vet.json not found"):
        MMVetBenchmark(data_dir=str(tmp_path))
    (tmp_path / "mm-vet.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MMVetBenchmark(data_dir=str(tmp_path))


def test_judge_prompt_has_the_rules_examples_and_the_case_last():
    prompt = mmvet_judge_prompt("What is | this?", "cat <OR> kitten", "A small\ncat.")
    assert "<AND>" in prompt and "<OR>" in prompt and "0.0" in prompt and "1.0" in prompt
    lines = prompt.splitlines()
    assert lines[-1] == "What is / this? | cat <OR> kitten | A small cat. |"  # one row, pipes escaped, score blank
    assert lines.index("Question | Ground truth | Prediction | Correctness") == len(lines) - len(JUDGE_EXAMPLES) - 3
    assert len(JUDGE_EXAMPLES) >= 2


@pytest.mark.parametrize(
    "reply, score",
    [("0.7", 0.7), ("1.0", 1.0), ("1", 1.0), ("0", 0.0), (" Correctness: 0.4\n", 0.4), (".5", 0.5),
     ("0.6 (partly right)", 0.6), ("7", None), ("1.5", None), ("-0.2", None), ("great answer", None), ("", None),
     (None, None)],
)
def test_parse_judge_score(reply, score):
    assert parse_mmvet_score(reply) == score


def grader(scores_by_question):
    """A judge that answers by the question in the prompt's last row."""
    def reply(request):
        last_row = request["body"]["messages"][-1]["content"].splitlines()[-1]
        for question, text in scores_by_question.items():
            if last_row.startswith(question):
                return 200, completion(text), {}
        return 500, {"error": "unexpected prompt"}, {}
    return reply


def records_for(predictions):
    return [{"id": i, "prediction": p, "answers": [], "answer_type": "open"} for i, p in predictions.items()]


def test_scores_mean_and_per_capability_from_the_judge(judge_server, tmp_path):
    judge_server.reply = grader({"What shape": "1.0", "What is the answer": "0.5", "Where is": "0.2"})
    bench = MMVetBenchmark(data_dir=str(FIXTURE), judge=client(judge_server, tmp_path))
    metrics = bench.score(records_for({"v1_0": "a circle", "v1_1": "12", "v1_2": "top left"}))
    assert metrics["mm_vet"] == pytest.approx(100 * (1.0 + 0.5 + 0.2) / 3)
    assert metrics["mm_vet/rec"] == pytest.approx(100 * (1.0 + 0.2) / 2)  # v1_0 and v1_2
    assert metrics["mm_vet/ocr"] == pytest.approx(50.0) and metrics["mm_vet/math"] == pytest.approx(50.0)
    assert metrics["mm_vet/spat"] == pytest.approx(20.0)
    assert set(metrics) == {"mm_vet", "mm_vet/rec", "mm_vet/ocr", "mm_vet/math", "mm_vet/spat"}
    body = judge_server.requests[0]["body"]
    assert body["temperature"] == 0 and body["model"] == "gpt-4-0613"
    last_row = body["messages"][0]["content"].splitlines()[-1]
    assert last_row == "What shape is shown in the image? | circle <OR> ball | a circle |"


def test_unparseable_reply_counts_zero_and_none_prediction_is_wrong_without_a_call(judge_server, tmp_path):
    judge_server.reply = grader({"What shape": "I think it is right", "Where is": "1.0"})
    bench = MMVetBenchmark(data_dir=str(FIXTURE), judge=client(judge_server, tmp_path))
    metrics = bench.score(records_for({"v1_0": "circle", "v1_1": None, "v1_2": "centre"}))
    assert metrics["mm_vet"] == pytest.approx(100 * (0 + 0 + 1.0) / 3)
    assert len(judge_server.requests) == 2  # none for the failed sample


def test_pending_without_key_or_when_the_judge_fails(judge_server, tmp_path, monkeypatch):
    records = records_for({"v1_0": "circle", "v1_1": "7", "v1_2": "centre"})
    judge_server.script = [(401, {"error": "bad key"}, {})]
    failing = MMVetBenchmark(data_dir=str(FIXTURE), judge=client(judge_server, tmp_path))
    assert set(failing.score(records).values()) == {None}
    monkeypatch.delenv("OPENAI_API_KEY")
    bench = MMVetBenchmark(data_dir=str(FIXTURE), judge={"cache_path": str(tmp_path / "c.jsonl")})
    metrics = bench.score(records)
    assert metrics == dict.fromkeys(["mm_vet", "mm_vet/rec", "mm_vet/ocr", "mm_vet/math", "mm_vet/spat"])
    summary = summarise(records, bench)
    assert summary["pending"] == sorted(metrics)


def test_hydra_config_builds_the_judge(tmp_path):
    cfg = OmegaConf.create({"paths": {"data_dir": str(FIXTURE.parent), "cache_dir": str(tmp_path)},
                            "benchmark": OmegaConf.load(REPO / "hydra_conf" / "benchmark" / "mmvet.yaml")})
    bench = instantiate(cfg.benchmark.task)
    assert isinstance(bench, MMVetBenchmark) and len(bench.samples()) == 3
    assert isinstance(bench.judge, JudgeClient) and bench.judge.model == "gpt-4-0613"
    assert bench.judge.cache_path == tmp_path / "judge" / "mmvet.jsonl"


def test_eval_script_runs_mmvet_end_to_end_with_the_metric_pending(tiny_cache, tmp_path):
    result = run_script([str(REPO / "scripts" / "eval.py"), "model=llava15_tiny", "dymu=low", "benchmark=mmvet",
                         f"benchmark.task.data_dir={FIXTURE}", "wandb.mode=disabled", "max_new_tokens=4"],
                        tiny_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out_dir = tmp_path / "outputs" / "eval" / "llava15_tiny" / "low" / "mmvet"
    records = read_predictions(out_dir / "predictions.jsonl")
    assert len(records) == 3 and all(isinstance(r["prediction"], str) for r in records)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n_samples"] == 3 and metrics["metrics"]["mm_vet"] is None
    assert "mm_vet" in metrics["pending"] and "mm_vet/rec" in metrics["pending"]
