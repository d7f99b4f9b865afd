"""LLaVA-Bench (In-the-Wild): official JSONL loading, errors, prompt, review prompt and score parsing, the
relative score overall and per category with a judge on a real 127.0.0.1 server, pending without a key, and
scripts/eval.py end to end (pending)."""

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import REPO
from eval.benchmarks.judge import JudgeClient
from eval.benchmarks.llava_bench import (
    JUDGE_RULE,
    JUDGE_SYSTEM,
    LLaVABenchWildBenchmark,
    llava_wild_judge_messages,
    parse_review_scores,
    relative_score,
)
from eval.runner import read_predictions, summarise

FIXTURE = REPO / "tests" / "fixtures" / "llava_bench"


def run_script(args, tiny_cache, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               DYMU_CACHE_DIR=str(tiny_cache), DYMU_OUTPUT_DIR=str(tmp_path / "outputs"))
    env.pop("OPENAI_API_KEY", None)  # no judge: the metric must come out pending
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"authorization": self.headers.get("Authorization"), "body": body})
        status, text = self.server.reply(body)
        message = {"role": "assistant", "content": text}
        payload = {"choices": [{"index": 0, "message": message}]} if status == 200 else {}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server(monkeypatch):
    """A real HTTP server on 127.0.0.1 replying ``reply(request_body) -> (status, text)``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests = []
    server.url = f"http://127.0.0.1:{server.server_port}/v1"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    yield server
    server.shutdown()
    server.server_close()


def reviewer(replies):
    """A judge that answers by the question in the review prompt."""
    def reply(body):
        user = body["messages"][1]["content"]
        for question, text in replies.items():
            if f"[Question]\n{question}" in user:
                return 200, text
        return 500, ""
    return reply


def records_for(predictions):
    return [{"id": i, "prediction": p, "answers": [], "answer_type": "open"} for i, p in predictions.items()]


def bench_with(server, tmp_path):
    judge = JudgeClient(base_url=server.url, cache_path=tmp_path / "judge.jsonl", backoff_s=0.01, max_retries=1)
    return LLaVABenchWildBenchmark(data_dir=str(FIXTURE), judge=judge)


def test_loads_questions_references_and_captions():
    bench = LLaVABenchWildBenchmark(data_dir=str(FIXTURE))
    samples = bench.samples()
    assert [s.id for s in samples] == ["0", "1", "2"]
    assert [s.meta["category"] for s in samples] == ["conv", "detail", "complex"]
    assert samples[0].answers == ["The ball is orange."]
    assert samples[1].meta["caption"] == "An orange ball on a light grey background."
    assert samples[2].image_paths == [str((FIXTURE / "images" / "002.jpg").resolve())]
    assert bench.prompt(samples[2]) == "What might this blue box be used for? Explain your reasoning."
    assert bench.max_new_tokens == 1024
    assert len(LLaVABenchWildBenchmark(data_dir=str(FIXTURE), limit=2).samples()) == 2


@pytest.mark.parametrize(
    "filename, edit, error, message",
    [
        ("answers_gpt4.jsonl", lambda lines: lines[:2], ValueError, "no reference answer for question_id 2"),
        ("context.jsonl", lambda lines: lines[:1], ValueError, r"no caption for image '002\.jpg'"),
        ("questions.jsonl", lambda lines: lines + ["{oops"], ValueError, r"questions\.jsonl:4: not valid JSON"),
        ("questions.jsonl", lambda lines: lines + ['{"question_id": 9, "image": "001.jpg"}'], ValueError,
         r"questions\.jsonl:4: missing key\(s\) \['text', 'category'\]"),
        ("questions.jsonl", lambda lines: lines + [lines[0]], ValueError, "duplicate question_id 0"),
        ("context.jsonl", None, FileNotFoundError, r"context\.jsonl not found"),
    ],
)
def test_malformed_or_missing_files_fail_clearly(tmp_path, filename, edit, error, message):
    data = tmp_path / "llava-bench-in-the-wild"
    shutil.copytree(FIXTURE, data)
    path = data / filename
    if edit is None:
        path.unlink()
    else:
        path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    with pytest.raises(error, match=message):
        LLaVABenchWildBenchmark(data_dir=str(data))


def test_missing_data_dir_or_image_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLaVABenchWildBenchmark(data_dir=str(tmp_path / "nope"))
    shutil.copytree(FIXTURE, tmp_path / "d")
    (tmp_path / "d" / "images" / "001.jpg").unlink()
    with pytest.raises(ValueError, match=r"question 0: image .*001\.jpg does not exist"):
        LLaVABenchWildBenchmark(data_dir=str(tmp_path / "d"))


def test_review_prompt_puts_reference_first_and_prediction_second():
    system, user = llava_wild_judge_messages("CAPTION", "QUESTION?", "REFERENCE", "PREDICTION")
    assert system == {"role": "system", "content": JUDGE_SYSTEM}
    assert user["role"] == "user"
    assert user["content"] == (
        "[Context]\nCAPTION\n\n[Question]\nQUESTION?\n\n[Assistant 1]\nREFERENCE\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\nPREDICTION\n\n[End of Assistant 2]\n\n[System]\n{JUDGE_RULE}\n\n"
    )
    assert "scale of 1 to 10" in JUDGE_RULE and "two values" in JUDGE_RULE


@pytest.mark.parametrize(
    "reply, expected",
    [("8 6\nAssistant 1 is more detailed.", (8.0, 6.0)), ("7, 9.5\n", (7.0, 9.5)), ("\n  10 10  \nok", (10.0, 10.0)),
     ("Assistant 1: 8\nAssistant 2: 6", None), ("8\n6", None), ("8 6 7", None), ("", None), (None, None)],
)
def test_parse_review_scores(reply, expected):
    assert parse_review_scores(reply) == expected


def test_relative_score_is_the_ratio_of_sums_not_the_mean_of_ratios():
    pairs = [(8, 6), (10, 5), (6, 6)]
    assert relative_score(pairs) == pytest.approx(100 * 17 / 24)  # mean of ratios would be 75.0
    with pytest.raises(ValueError):
        relative_score([])


def test_scores_relative_overall_and_per_category(judge_server, tmp_path):
    judge_server.reply = reviewer({"What color is the ball?": "8 6\nfine", "Describe this photo": "10 5\nshort",
                                   "What might this blue box": "6, 6\nboth good"})
    bench = bench_with(judge_server, tmp_path)
    metrics = bench.score(records_for({"0": "Orange.", "1": "A ball.", "2": None}))
    assert metrics == pytest.approx({"llava_wild": 100 * 17 / 24, "llava_wild/conv": 75.0,
                                     "llava_wild/detail": 50.0, "llava_wild/complex": 100.0})
    assert [r["authorization"] for r in judge_server.requests] == ["Bearer sk-test"] * 3
    first = judge_server.requests[0]["body"]["messages"][1]["content"]
    assert "[Assistant 1]\nThe ball is orange.\n" in first and "[Assistant 2]\nOrange.\n" in first
    assert "[Context]\nAn orange ball on a light grey background.\n" in first
    assert "[Assistant 2]\n\n\n[End of Assistant 2]" in judge_server.requests[2]["body"]["messages"][1]["content"]


def test_unparseable_review_is_left_out(judge_server, tmp_path):
    judge_server.reply = reviewer({"What color is the ball?": "8 6", "Describe this photo": "10 5",
                                   "What might this blue box": "I cannot rate this."})
    metrics = bench_with(judge_server, tmp_path).score(records_for({"0": "a", "1": "b", "2": "c"}))
    assert metrics["llava_wild"] == pytest.approx(100 * 11 / 18) and metrics["llava_wild/complex"] is None


def test_pending_without_key_or_when_the_judge_fails(judge_server, tmp_path, monkeypatch):
    records = records_for({"0": "a", "2": "c"})
    judge_server.reply = lambda body: (500, "")
    assert set(bench_with(judge_server, tmp_path).score(records).values()) == {None}
    monkeypatch.delenv("OPENAI_API_KEY")
    bench = LLaVABenchWildBenchmark(data_dir=str(FIXTURE))
    metrics = bench.score(records)
    assert metrics == {"llava_wild": None, "llava_wild/conv": None, "llava_wild/complex": None}
    assert summarise(records, bench)["pending"] == ["llava_wild", "llava_wild/complex", "llava_wild/conv"]


def test_eval_script_runs_llava_bench_end_to_end_with_the_metric_pending(tiny_cache, tmp_path):
    result = run_script([str(REPO / "scripts" / "eval.py"), "model=llava15_tiny", "dymu=low", "benchmark=llava_bench",
                         f"benchmark.task.data_dir={FIXTURE}", "wandb.mode=disabled", "max_new_tokens=4"],
                        tiny_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out_dir = tmp_path / "outputs" / "eval" / "llava15_tiny" / "low" / "llava_bench"
    records = read_predictions(out_dir / "predictions.jsonl")
    assert len(records) == 3 and all(isinstance(r["prediction"], str) for r in records)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n_samples"] == 3 and metrics["metrics"]["llava_wild"] is None
    assert set(metrics["pending"]) == {"llava_wild", "llava_wild/conv", "llava_wild/detail", "llava_wild/complex"}
