"""Prompts come from the checkpoint's own chat template; the hand-written formats are tested-equal fallbacks."""

import copy

import numpy as np
import pytest

import llava
from conftest import SAMPLE_IMAGES
from llava.prompts import build_onevision_prompt, build_prompt, chat_template_of

IMAGE = SAMPLE_IMAGES / "coffee.jpg"
QUESTIONS = ["What is in the picture?", "Is it red?\nAnswer the question using a single word or phrase.",
             "Compare <image> with <image>.", "  spaces around  ", "Ünïcödé ✓ 質問"]


def video(n: int = 2) -> llava.Video:
    return llava.Video(np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe(tiny_path):
    return llava.load_model(tiny_path, vtu=False)


@pytest.fixture(scope="module")
def ov(tiny_ov_path):
    return llava.load_model(tiny_ov_path, vtu=False)


def _inputs(question, n_default, items):
    return items[:question.count("<image>")] if "<image>" in question else items[:n_default]


@pytest.mark.parametrize("question", QUESTIONS)
@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_llava15_chat_template_renders_the_vicuna_v1_fallback(pipe, question, n_images):
    assert chat_template_of(pipe.processor) is not None  # the tiny checkpoint ships a template
    inputs = _inputs(question, n_images, [IMAGE] * 3)
    assert pipe.prompt(question, inputs) == build_prompt(question, num_images=len(inputs))


@pytest.mark.parametrize("question", QUESTIONS)
@pytest.mark.parametrize("kinds", [["image"], ["image", "image"], ["video"], ["image", "video", "image"]])
def test_onevision_chat_template_renders_the_qwen2_fallback(ov, question, kinds):
    assert chat_template_of(ov.processor) is not None
    items = [video() if k == "video" else IMAGE for k in kinds]
    inputs = _inputs(question, len(items), [IMAGE] * 3) if "<image>" in question else items
    placeholders = ["<video>" if isinstance(x, llava.Video) else "<image>" for x in inputs]
    assert ov.prompt(question, inputs) == build_onevision_prompt(question, placeholders)


def with_template(model, template):
    """A shallow copy of the pipeline whose checkpoint ships ``template`` (None: no chat template at all)."""
    processor = copy.copy(model.processor)
    processor.tokenizer = copy.copy(model.processor.tokenizer)
    processor.tokenizer.chat_template = template
    if "chat_template" in vars(processor):  # LlavaProcessor holds its own; OnevisionProcessor reads the tokenizer's
        processor.chat_template = template
    changed = copy.copy(model)
    changed.processor, changed.tokenizer = processor, processor.tokenizer
    return changed


def test_the_checkpoint_template_is_the_one_used_and_its_absence_falls_back(pipe, ov):
    question = "What is it?"
    for model, fallback in ((pipe, build_prompt(question)), (ov, build_onevision_prompt(question))):
        shouting = with_template(model, "{{ messages[-1]['content'][-1]['text'] | upper }}<image>")
        assert shouting.prompt(question, [IMAGE]) == "WHAT IS IT?<image>"
        bare = with_template(model, None)
        assert chat_template_of(bare.processor) is None
        assert bare.prompt(question, [IMAGE]) == fallback


GROUPING_TEMPLATE = (  # written here: renders every image item before every video item, as some templates do
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'video' %}{{ '<video>\\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_template_that_cannot_keep_the_input_order_falls_back_and_the_prompt_still_runs(ov):
    grouping = with_template(ov, GROUPING_TEMPLATE)
    inputs = [IMAGE, video(), IMAGE]
    prompt = grouping.prompt("What changes?", inputs)
    assert prompt == build_onevision_prompt("What changes?", ["<image>", "<video>", "<image>"])
    assert grouping.build_inputs([prompt], [inputs]).visual_tokens[0] > 0  # the slots match the inputs
    same_kind = [IMAGE, IMAGE]
    assert grouping.prompt("Compare.", same_kind) == build_onevision_prompt("Compare.", 2)  # in order: both agree


def test_a_literal_video_tag_in_a_llava15_question_is_text_not_a_slot(pipe):
    question = "What does <video> mean in HTML?"
    assert pipe.prompt(question, [IMAGE]) == build_prompt(question)
    assert pipe.prompt(question, [IMAGE]).count("<image>") == 1
