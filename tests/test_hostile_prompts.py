"""Hostile prompts and visual inputs (docs/robustness.md): each gets a clear error or a defined behaviour.

Prompts beyond the language model's position limit (counted over the virtual layout VTU runs over), an empty
request, questions that are not text or not valid Unicode, a literal ``<image>`` in a question, a video for
LLaVA-1.5, and malformed video arrays. Real tiny LLaVA-1.5 / OneVision models (random weights), the real runner.
The position limit is lowered on the loaded model's text config (``text_config.max_position_embeddings``): the
check reads it at each call, and the tiny models' rotary embeddings do not depend on it.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import llava
from conftest import SAMPLE_IMAGES, uniform_thresholds
from eval.benchmarks.sample import SampleBenchmark
from eval.main import make_generate
from eval.runner import read_predictions, run_benchmark

IMAGE = SAMPLE_IMAGES / "coffee.jpg"
LIMIT_MESSAGE = r"text_config\.max_position_embeddings.*fewer images or video frames, a shorter prompt, or a smaller " \
                r"max_new_tokens"


@pytest.fixture(scope="module")
def path15(tmp_path_factory) -> Path:
    from eval.tiny import ensure_tiny_llava15

    return ensure_tiny_llava15(tmp_path_factory.mktemp("hostile") / "llava15_tiny")


@pytest.fixture(scope="module")
def pipe(path15, one_thread):
    """The tiny LLaVA-1.5 with DToMe (a constant threshold that merges) and VTU."""
    from transformers import AutoConfig

    vision = AutoConfig.from_pretrained(path15).vision_config
    return llava.load_model(path15, dymu=uniform_thresholds(vision, 0.9, feature_layer=-2))


@pytest.fixture(scope="module")
def ov(tiny_ov_path, one_thread):
    from transformers import AutoConfig

    vision = AutoConfig.from_pretrained(tiny_ov_path).vision_config
    return llava.load_model(tiny_ov_path, dymu=uniform_thresholds(vision, 0.9, feature_layer=-1))


class Calls:
    """Counts forward calls of the vision tower and of the language model (real forward pre-hooks)."""

    def __init__(self, pipe):
        self.tower = self.llm = 0
        self.handles = [pipe.tower.register_forward_pre_hook(lambda *_: self._add("tower")),
                        pipe.model.model.language_model.register_forward_pre_hook(lambda *_: self._add("llm"))]

    def _add(self, name):
        setattr(self, name, getattr(self, name) + 1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def virtual_length(pipe, question, inputs) -> int:
    """Positions of one prompt in the LLM (virtual layout with VTU, merged length without), from its inputs."""
    built = pipe.build_inputs([pipe.prompt(question, inputs)], [inputs])
    return built.vtu.group_index.shape[1] if built.vtu is not None else built.inputs_embeds.shape[1]


def frames(n: int) -> llava.Video:
    rng = np.random.default_rng(n)
    return llava.Video(rng.integers(0, 256, (n, 48, 64, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------- position limit
@pytest.mark.parametrize("model, inputs, before_tower", [
    ("llava15", [IMAGE], True),  # 576 virtual positions per image, known from the prompt
    ("llava15", [IMAGE, IMAGE, IMAGE], True),
    ("onevision", [IMAGE, IMAGE, IMAGE], True),  # base crop + newline per image of a multi-image prompt
    ("onevision", "video", True),  # 27 x 27 per frame + one newline
    ("onevision", [IMAGE], False),  # AnyRes: the length depends on the image size, known after encoding
    ("onevision paper pool", [IMAGE, IMAGE], True),  # the paper layout: the base crop, no newline
    ("onevision paper pool", "video", True),  # pooled 14 x 14 per frame + one newline
])
def test_virtual_length_beyond_the_position_limit_fails_before_prefill(pipe, ov, monkeypatch, model, inputs,
                                                                       before_tower):
    from llava.onevision import DyMULlavaOnevision

    model = {"llava15": pipe, "onevision": ov}.get(model) or DyMULlavaOnevision(ov.model, ov.processor, layout="paper",
                                                                               video_pooling="pool")
    inputs = [frames(3)] if inputs == "video" else inputs
    question, new = "What is in the picture?", 3
    built = model.build_inputs([model.prompt(question, inputs)], [inputs])
    length, visual = built.vtu.group_index.shape[1], built.unmerged_visual_tokens[0]
    pooled = getattr(model, "video_pooling", None) == "pool" and isinstance(inputs[0], llava.Video)
    assert built.visual_tokens[0] < visual or pooled  # the encoder merges; the virtual layout keeps the full count
    config = model.model.config.text_config
    monkeypatch.setattr(config, "max_position_embeddings", length + new - 1)
    with Calls(model) as calls, pytest.raises(ValueError) as err:
        model.generate([question], [inputs], max_new_tokens=new)
    message = str(err.value)
    assert f"prompt 0 needs {length + new:,} positions but the language model has {length + new - 1:,}" in message
    assert f"{length - visual:,} text tokens + {visual:,} visual tokens" in message
    assert f"+ {new} for the answer (max_new_tokens); visual tokens count in the unmerged layout that VTU's " \
           "positions run over, so merging does not shorten them. Cut at least 1:" in message
    assert re.search(LIMIT_MESSAGE, message)
    assert calls.llm == 0  # refused before prefill
    assert calls.tower == (0 if before_tower else 1)  # and before any encoding where the length is known
    # exactly at the limit: the prompt and its whole answer fit, and it runs
    monkeypatch.setattr(config, "max_position_embeddings", length + new)
    answers, built = model.generate([question], [inputs], max_new_tokens=new)
    assert len(answers) == 1 and built.vtu.group_index.shape[1] == length
    monkeypatch.setattr(config, "max_position_embeddings", length - 1)
    with pytest.raises(ValueError, match=f"needs {length:,} positions but the language model has {length - 1:,}"):
        model.build_inputs([model.prompt(question, inputs)], [inputs])  # a forward pass keeps no room for answers


def test_the_position_limit_names_the_sample_of_a_batch_and_the_video_frames(ov, monkeypatch):
    question = "What happens?"
    short, long = virtual_length(ov, question, [frames(2)]), virtual_length(ov, question, [frames(6)])
    monkeypatch.setattr(ov.model.config.text_config, "max_position_embeddings", short + 4)
    with Calls(ov) as calls, pytest.raises(ValueError, match=rf"prompt 1 needs {long + 4:,} positions .* visual "
                                                             rf"tokens for 1 video \(6 frames\)"):
        ov.generate([question, question], [[frames(2)], [frames(6)]], max_new_tokens=4)
    assert calls.tower == calls.llm == 0


def test_without_vtu_the_merged_length_is_checked(path15, pipe, monkeypatch, one_thread):
    from transformers import AutoConfig

    vision = AutoConfig.from_pretrained(path15).vision_config
    merged = llava.load_model(path15, dymu=uniform_thresholds(vision, 0.9, feature_layer=-2), vtu=False)
    question, new = "What is in the picture?", 2
    length = virtual_length(merged, question, [IMAGE])
    assert length < virtual_length(pipe, question, [IMAGE])  # merging shortens the merged layout
    monkeypatch.setattr(merged.model.config.text_config, "max_position_embeddings", length + new - 1)
    with Calls(merged) as calls, pytest.raises(ValueError, match=r"visual tokens are the merged ones, at "
                                                                 r"consecutive positions \(VTU off\)"):
        merged.generate([question], [IMAGE], max_new_tokens=new)
    assert calls.llm == 0
    monkeypatch.setattr(merged.model.config.text_config, "max_position_embeddings", length + new)
    assert len(merged.generate([question], [IMAGE], max_new_tokens=new)[0]) == 1


def test_eval_records_an_overlong_sample_as_failed_and_scores_the_rest(pipe, monkeypatch, tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    shutil.copy(IMAGE, data / "images" / "coffee.jpg")
    questions = ["Is there a cup?", "Is there a saucer? " + "Describe every detail of it. " * 60, "Is it coffee?"]
    (data / "questions.jsonl").write_text("".join(
        json.dumps({"question_id": f"q{i}", "image": "images/coffee.jpg", "question": q, "answer": "yes",
                    "answer_type": "yes_no"}) + "\n" for i, q in enumerate(questions)))
    monkeypatch.setattr(pipe.model.config.text_config, "max_position_embeddings", 1000)
    metrics = run_benchmark(make_generate(pipe, max_new_tokens=2), SampleBenchmark(data_dir=str(data)),
                            tmp_path / "out", batch_size=3, progress=False)
    records = {r["id"]: r for r in read_predictions(tmp_path / "out" / "predictions.jsonl")}
    failed = records["q1"]
    assert failed["prediction"] is None and failed["error"].startswith("ValueError: prompt 0 needs ")
    assert "but the language model has 1,000 (text_config.max_position_embeddings)" in failed["error"]
    assert all(isinstance(records[q]["prediction"], str) and "error" not in records[q] for q in ("q0", "q2"))
    assert metrics["n_samples"] == 3 and metrics["n_failed"] == 1


# ------------------------------------------------------------------------------------------- prompts
def test_empty_generate_returns_no_answers_and_empty_inputs(pipe, ov):
    for model in (pipe, ov):
        with Calls(model) as calls:
            answers, inputs = model.generate([], [])
            built = model.build_inputs([], [])
        assert answers == [] and calls.tower == calls.llm == 0
        for x in (inputs, built):
            assert x.visual_tokens == [] and x.unmerged_visual_tokens == [] and x.vtu is None
            assert x.inputs_embeds.shape == (0, 0, model.model.config.text_config.hidden_size)
            assert x.attention_mask.shape == x.position_ids.shape == (0, 0)
    assert make_generate(pipe, max_new_tokens=2)([], [], 2) == ([], [])


@pytest.mark.parametrize("question, kind", [(5, "int"), (None, "NoneType"), (b"What is it?", "bytes"),
                                            (["What?"], "list")])
def test_non_string_questions_are_type_errors_naming_the_index_and_type(pipe, ov, question, kind):
    for model in (pipe, ov):
        with pytest.raises(TypeError, match=rf"question 1 is {kind} \(.*\), not a string"):
            model.generate(["What is it?", question], [IMAGE, IMAGE], max_new_tokens=1)
        with pytest.raises(TypeError, match=rf"prompt 1 is {kind} \(.*\), not a string"):
            model.build_inputs([model.prompt("Fine.", [IMAGE]), question], [[IMAGE], [IMAGE]])
        with pytest.raises(TypeError, match=rf"the question is {kind}"):
            model.prompt(question, [IMAGE])
    with pytest.raises(TypeError, match=r"decode bytes first: text\.decode\('utf-8'\)"):
        pipe.generate([b"What?"], [IMAGE], max_new_tokens=1)
    with pytest.raises(TypeError, match=r"got a single str: wrap it, generate\(\[question\], \[image\]\)"):
        pipe.generate("What is it?", [IMAGE], max_new_tokens=1)


def test_lone_surrogate_in_a_prompt_is_a_value_error_naming_index_and_position(pipe, ov):
    for model in (pipe, ov):
        with pytest.raises(ValueError, match=r"question 1 holds a lone surrogate U\+D800 at character 4 "
                                             r"\('What' precedes it\).*not valid Unicode"):
            model.generate(["Fine?", "What\ud800 is it?"], [IMAGE, IMAGE], max_new_tokens=1)
        prompt = model.prompt("Fine?", [IMAGE])
        with pytest.raises(ValueError, match=rf"prompt 0 holds a lone surrogate U\+DC80 at character {len(prompt)}"):
            model.build_inputs([prompt + "\udc80"], [[IMAGE]])
    # the suggested repair gives text the model takes
    repaired = "What\ud800 is it?".encode("utf-8", "replace").decode("utf-8")
    assert len(pipe.generate([repaired], [IMAGE], max_new_tokens=1)[0]) == 1


def test_literal_image_token_in_a_question_places_the_images_or_is_refused(pipe, ov):
    # as many placeholders as images: the question places them itself, nothing is added before it
    prompt = pipe.prompt("Compare <image> with <image>.", [IMAGE, IMAGE])
    assert prompt.count("<image>") == 2 and "USER: Compare <image> with <image>. ASSISTANT:" in prompt
    assert pipe.generate(["Compare <image> with <image>."], [[IMAGE, IMAGE]], max_new_tokens=1)[1].visual_tokens
    # any other count is ambiguous (literal text or slots?): refused, saying what to do
    cases = [("What does <image> mean here?", [IMAGE, IMAGE], "contains 1 '<image>' placeholder but 2 images were"),
             ("Is <image> the same as <image>?", [IMAGE], "contains 2 '<image>' placeholders but 1 image was given"),
             ("What is an <image> tag?", [], "contains 1 '<image>' placeholder but 0 images were given")]
    for question, inputs, message in cases:
        with pytest.raises(ValueError, match=rf"question 0 {message}.*write it another way, e\.g\. '< image >'"):
            pipe.generate([question], [inputs], max_new_tokens=1)
        with pytest.raises(ValueError, match=rf"the question {message}"):
            pipe.prompt(question, inputs)
    with pytest.raises(ValueError, match=r"question 0 contains 2 '<image>' / '<video>' placeholders but 1 image was"):
        ov.generate(["<video> or <image>?"], [IMAGE], max_new_tokens=1)
    written_otherwise = pipe.prompt("Is this < image > tag valid?", [IMAGE])  # the image slot is added before it
    assert written_otherwise.count("<image>") == 1
    assert "USER: <image>\nIs this < image > tag valid?" in written_otherwise


def test_video_on_llava15_says_it_takes_images_only(pipe):
    video = frames(2)
    message = (r"input 0 is a llava\.Video \(2 frames\), but DyMULlava \(LLaVA-1\.5\) takes images only: use a "
               r"LLaVA-OneVision model for video, or pass the frames as images")
    with Calls(pipe) as calls:
        with pytest.raises(TypeError, match=rf"prompt 0, {message}"):
            pipe.generate(["What happens?"], [video], max_new_tokens=1)
        with pytest.raises(TypeError, match=rf"prompt 1, {message}"):
            pipe.build_inputs([pipe.prompt("Q?", [IMAGE])] * 2, [[IMAGE], [video]])
        with pytest.raises(TypeError, match=message):
            pipe.encode_prompt_images([[video]])
    assert calls.tower == calls.llm == 0
    answers, inputs = pipe.generate(["What happens?"], [video.images()], max_new_tokens=1)  # the suggested way
    assert len(answers) == 1 and inputs.unmerged_visual_tokens == [2 * 576]


@pytest.mark.parametrize("frames_, message", [
    (np.zeros((2, 8, 8), np.uint8), r"got \(2, 8, 8\); grayscale frames \(T, H, W\)\? repeat them to RGB"),
    (np.zeros((8, 8, 3), np.uint8), r"got \(8, 8, 3\); one frame of shape \(H, W, 3\)\? add the time axis"),
    (np.zeros((2, 8, 8, 4), np.uint8), r"got \(2, 8, 8, 4\); RGBA\? drop the alpha channel"),
    (np.zeros((2, 3, 8, 8), np.uint8), r"got \(2, 3, 8, 8\); channels first"),
    (np.zeros((2, 8, 8, 1), np.uint8), r"got \(2, 8, 8, 1\); one channel\?"),
    (np.zeros((0, 8, 8, 3), np.uint8), r"got \(0, 8, 8, 3\); it holds no pixels"),
    (np.zeros((2, 0, 8, 3), np.uint8), r"got \(2, 0, 8, 3\); it holds no pixels"),
    (torch.zeros(2, 8, 8, 3, 2, dtype=torch.uint8), r"got \(2, 8, 8, 3, 2\)"),
])
def test_malformed_video_shapes_fail_at_construction(frames_, message):
    with pytest.raises(ValueError, match=r"Video frames as an array must have shape \(T, H, W, 3\) \(T RGB frames of H "
                                         rf"x W pixels, T, H, W >= 1\), {message}"):
        llava.Video(frames_)


def test_malformed_video_frames_other_than_shapes_fail_at_construction():
    with pytest.raises(ValueError, match="must be uint8 RGB .*got dtype float64"):
        llava.Video(np.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="must be uint8 RGB .*got dtype float32"):
        llava.Video(torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match="a Video needs at least one frame, got an empty list"):
        llava.Video([])
    with pytest.raises(TypeError, match=r"Video takes a list of frames .* got Image; wrap a single frame"):
        llava.Video(Image.new("RGB", (8, 8)))
    with pytest.raises(TypeError, match=r"got str; wrap a single frame"):
        llava.Video(str(IMAGE))
    for good in (np.zeros((2, 8, 8, 3), np.uint8), torch.zeros(1, 8, 8, 3, dtype=torch.uint8),
                 [Image.new("RGB", (8, 8)), str(IMAGE)]):
        video = llava.Video(good)
        assert len(video.images()) == video.num_frames


def test_an_anyres_image_whose_base_crop_alone_is_too_long_fails_before_the_tower(ov, monkeypatch):
    question, new = "What is in the picture?", 3
    text = virtual_length(ov, question, [IMAGE]) - ov.build_inputs([ov.prompt(question, [IMAGE])],
                                                                   [[IMAGE]]).unmerged_visual_tokens[0]
    monkeypatch.setattr(ov.model.config.text_config, "max_position_embeddings", text + 729 + new - 1)
    with Calls(ov) as calls, pytest.raises(ValueError, match=rf"prompt 0 needs at least {text + 729 + new:,} "
                                                             rf"positions .* {text:,} text tokens \+ 729 visual"):
        ov.generate([question], [IMAGE], max_new_tokens=new)
    assert calls.tower == calls.llm == 0
