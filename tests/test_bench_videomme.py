"""Video-MME: question loading (flat and nested JSON), frames folders, uniform frame sampling, errors, the
prompt, answer-letter extraction, accuracy overall and per duration, and scripts/eval.py end to end with the
tiny LLaVA-OneVision."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

import llava
from conftest import REPO
from eval.benchmarks import videomme
from eval.benchmarks.videomme import VideoMMEBenchmark, decode_uniform_frames, extract_choice, uniform_indices
from eval.runner import read_predictions

FIXTURE = REPO / "tests" / "fixtures" / "videomme"
VIDEOS = ("fFjv93ACGo8", "JspVuT6rsLA")


def run_script(args, tiny_cache, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               DYMU_CACHE_DIR=str(tiny_cache), DYMU_OUTPUT_DIR=str(tmp_path / "outputs"))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def questions():
    return json.loads((FIXTURE / "videomme.json").read_text())


def write_dataset(folder, rows, frames=True):
    """A Video-MME folder with ``rows`` as its questions and the fixture's frames (or none)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "videomme.json").write_text(json.dumps(rows))
    if frames:
        shutil.copytree(FIXTURE / "frames", folder / "frames")
    return folder


def test_loads_questions_and_frames_folders():
    bench = VideoMMEBenchmark(data_dir=str(FIXTURE))
    samples = bench.samples()
    assert [s.id for s in samples] == ["001-1", "001-2", "002-1", "002-2"]
    assert samples[0].video_path == str((FIXTURE / "frames" / "fFjv93ACGo8").resolve())
    assert samples[0].answers == ["A"] and samples[0].answer_type == "multiple_choice"
    assert samples[2].meta["duration"] == "medium" and samples[2].meta["task_type"] == "Object Recognition"
    assert samples[0].image_paths == []


def test_prompt_is_question_options_and_the_letter_instruction():
    bench = VideoMMEBenchmark(data_dir=str(FIXTURE))
    assert bench.prompt(bench.samples()[0]) == (
        "What color is the ball in the video?\nA. Red.\nB. Blue.\nC. Green.\nD. Yellow.\n"
        "Answer with the option's letter from the given choices directly."
    )


def test_visual_inputs_are_a_video_of_uniformly_sampled_frames():
    frames = sorted((FIXTURE / "frames" / VIDEOS[0]).iterdir())
    bench = VideoMMEBenchmark(data_dir=str(FIXTURE))
    (video,) = bench.visual_inputs(bench.samples()[0])
    assert isinstance(video, llava.Video)
    assert video.frames == [str(p.resolve()) for p in frames]  # 4 frames <= 32: all of them, in order
    two = VideoMMEBenchmark(data_dir=str(FIXTURE), num_frames=2)
    (video,) = two.visual_inputs(two.samples()[0])
    assert video.frames == [str(frames[0].resolve()), str(frames[3].resolve())]
    assert len(video.images()) == 2


@pytest.mark.parametrize(
    "total, num, expected",
    [(10, 4, [0, 3, 6, 9]), (4, 32, [0, 1, 2, 3]), (100, 1, [0]), (5, 5, [0, 1, 2, 3, 4]), (7, 3, [0, 3, 6]),
     (86, 36, [i * 85 // 35 for i in range(36)])],
)
def test_uniform_indices(total, num, expected):
    indices = uniform_indices(total, num)
    assert indices == expected and indices[0] == 0 and len(set(indices)) == len(indices)
    if num > 1:
        assert indices[-1] == total - 1


def test_frames_sort_numbers_as_numbers(tmp_path):
    rows = questions()[:1]
    data = write_dataset(tmp_path / "d", rows, frames=False)
    folder = data / "frames" / VIDEOS[0]
    folder.mkdir(parents=True)
    for n in (10, 2, 1):
        Image.new("RGB", (8, 8), (n, n, n)).save(folder / f"frame_{n}.png")
    (folder / "notes.txt").write_text("not a frame")
    bench = VideoMMEBenchmark(data_dir=str(data))
    (video,) = bench.visual_inputs(bench.samples()[0])
    assert [os.path.basename(f) for f in video.frames] == ["frame_1.png", "frame_2.png", "frame_10.png"]


def test_nested_json_and_bare_option_texts_load_the_same(tmp_path):
    rows = questions()
    nested = []
    for video in ("001", "002"):
        mine = [r for r in rows if r["video_id"] == video]
        head = {k: v for k, v in mine[0].items() if k in ("video_id", "duration", "domain", "videoID")}
        nested.append({**head, "questions": [{k: r[k] for k in ("question_id", "task_type", "question", "options",
                                                                 "answer")} for r in mine]})
    nested[0]["questions"][0]["options"] = ["Red.", "Blue.", "Green.", "Yellow."]  # no "A. " prefixes
    bench = VideoMMEBenchmark(data_dir=str(write_dataset(tmp_path / "d", nested)))
    reference = VideoMMEBenchmark(data_dir=str(FIXTURE))
    assert [bench.prompt(s) for s in bench.samples()] == [reference.prompt(s) for s in reference.samples()]
    assert [s.meta["duration"] for s in bench.samples()] == ["short", "short", "medium", "medium"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: {k: v for k, v in r.items() if k != "options"}, r"item 0: missing key\(s\) \['options'\]"),
        (lambda r: {k: v for k, v in r.items() if k not in ("videoID", "video_id")}, r"videoID \(or video_id\)"),
        (lambda r: {**r, "answer": "E"}, r"'answer' must be one of the option letters \['A', 'B', 'C', 'D'\]"),
        (lambda r: {**r, "options": "A. Red."}, "'options' must be a non-empty list"),
    ],
)
def test_malformed_questions_fail_naming_the_item(tmp_path, edit, message):
    rows = questions()
    rows[0] = edit(rows[0])
    with pytest.raises(ValueError, match=message):
        VideoMMEBenchmark(data_dir=str(write_dataset(tmp_path / "d", rows)))


def test_missing_data_questions_or_videos_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoMMEBenchmark(data_dir=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no Video-MME questions .*videomme/test-00000-of-00001\.parquet"):
        VideoMMEBenchmark(data_dir=str(tmp_path / "empty"))
    data = write_dataset(tmp_path / "noframes", questions(), frames=False)
    with pytest.raises(FileNotFoundError, match=r"2 Video-MME video\(s\) not found .*'JspVuT6rsLA'"):
        VideoMMEBenchmark(data_dir=str(data))
    assert len(VideoMMEBenchmark(data_dir=str(FIXTURE), limit=1).samples()) == 1
    (data / "other.json").write_text("[]")
    with pytest.raises(ValueError, match="several question files"):
        VideoMMEBenchmark(data_dir=str(data))


def test_a_video_file_without_frames_needs_pyav(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "d", questions()[:2], frames=False)
    (data / "data").mkdir()
    (data / "data" / f"{VIDEOS[0]}.mp4").write_bytes(b"\x00" * 16)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(videomme.importlib.util, "find_spec",
                        lambda name, *args: None if name == "av" else real_find_spec(name, *args))
    with pytest.raises(ImportError, match="pip install av; or extract frames into frames/<videoID>/"):
        VideoMMEBenchmark(data_dir=str(data))
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` fails
    with pytest.raises(ImportError, match="needs PyAV: pip install av"):
        decode_uniform_frames(data / "data" / f"{VIDEOS[0]}.mp4", 4)


def test_decodes_uniform_frames_from_an_mp4_with_pyav(tmp_path):
    av = pytest.importorskip("av")
    import numpy as np

    path = tmp_path / "v.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 25, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    frames = decode_uniform_frames(path, 4)
    assert len(frames) == 4 and frames[0].size == (32, 32)
    levels = [np.asarray(f).mean() for f in frames]
    assert levels == pytest.approx([0, 75, 150, 225], abs=6)  # frames 0, 3, 6, 9
    data = write_dataset(tmp_path / "d", questions()[:2], frames=False)  # the benchmark decodes data/<videoID>.mp4
    (data / "data").mkdir()
    shutil.copy(path, data / "data" / f"{VIDEOS[0]}.mp4")
    bench = VideoMMEBenchmark(data_dir=str(data), num_frames=3)
    assert bench.samples()[0].video_path == str((data / "data" / f"{VIDEOS[0]}.mp4").resolve())
    (video,) = bench.visual_inputs(bench.samples()[0])
    assert [round(np.asarray(im).mean() / 25) for im in video.images()] == [0, 4, 9]  # frames 0, 4, 9


@pytest.mark.parametrize(
    "prediction, expected",
    [("A", "A"), ("(B)", "B"), ("C. Green.", "C"), ("The best answer is D.", "D"), ("Answer: B", "B"),
     ("The answer is (A)", "A"), ("I think C", "C"), ("Blue.", "B"), ("blue", "B"), ("I don't know", None),
     ("a ball", None), ("", None), (None, None)],
)
def test_extract_choice(prediction, expected):
    options = ["A. Red.", "B. Blue.", "C. Green.", "D. Yellow."]
    assert extract_choice(prediction, "ABCD", options) == expected


def test_accuracy_overall_and_per_duration():
    bench = VideoMMEBenchmark(data_dir=str(FIXTURE))
    records = [{"id": i, "prediction": p, "answers": [], "answer_type": "multiple_choice"} for i, p in
               [("001-1", "A"), ("001-2", "The answer is D."), ("002-1", "C"), ("002-2", None)]]
    # short: both right; medium: 002-1 wrong (truth B), 002-2 failed
    assert bench.score(records) == pytest.approx({"accuracy": 50.0, "accuracy/short": 100.0, "accuracy/medium": 0.0})
    records[2]["prediction"] = "B. Blue."
    assert bench.score(records) == pytest.approx({"accuracy": 75.0, "accuracy/short": 100.0, "accuracy/medium": 50.0})
    with pytest.raises(ValueError, match="not a Video-MME question"):
        bench.score([{"id": "999-1", "prediction": "A"}])


def test_eval_script_runs_videomme_end_to_end_on_llava_onevision(tiny_cache, tmp_path):
    result = run_script([str(REPO / "scripts" / "eval.py"), "model=llava_ov_tiny", "dymu=low", "benchmark=videomme",
                         f"benchmark.task.data_dir={FIXTURE}", "wandb.mode=disabled", "max_new_tokens=4"],
                        tiny_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out_dir = tmp_path / "outputs" / "eval" / "llava_ov_tiny" / "low" / "videomme"
    records = read_predictions(out_dir / "predictions.jsonl")
    assert len(records) == 4 and not [r for r in records if r.get("error")], records
    assert all(isinstance(r["prediction"], str) and r["visual_tokens"] > 0 for r in records)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n_samples"] == 4 and metrics["pending"] == []
    assert set(metrics["metrics"]) == {"accuracy", "accuracy/short", "accuracy/medium"}
