"""LLaVA-1.5 adapter: exactness against the stock transformers model, batching, generation, errors."""

from pathlib import Path

import pytest
import torch

import dymu
import llava
from conftest import REPO, SAMPLE_IMAGES
from dymu.thresholds import encoder_fingerprint

IMAGES = [SAMPLE_IMAGES / "chelsea.jpg", SAMPLE_IMAGES / "astronaut.jpg", SAMPLE_IMAGES / "hubble_deep_field.jpg"]
QUESTIONS = ["What animal is this?", "Who is in the picture and what is this person wearing?", "Is it night?"]


def merge_nothing(pipe) -> dymu.Thresholds:
    vision = pipe.model.config.vision_config
    # scores are cosine similarities clamped to [-1, 1] and the rule is strict (>), so 1.0 merges nothing
    return dymu.Thresholds(values=[1.0] * vision.num_hidden_layers, encoder=encoder_fingerprint(vision),
                           num_layers=vision.num_hidden_layers, feature_layer=-2)


def stock_inputs(pipe, question, image):
    """What the unmodified model sees: the stock processor expands <image> to 576 placeholders."""
    background = tuple(int(round(255 * m)) for m in pipe.image_processor.image_mean)
    square = llava.expand_to_square(llava.load_image(image), background)
    return pipe.processor(images=square, text=llava.build_prompt(question), return_tensors="pt")


def test_llava_package_is_this_repo():
    assert Path(llava.__file__).resolve().is_relative_to(REPO)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_nothing_merged_with_vtu_reproduces_stock_logits(tiny_path, attn):
    stock = llava.load_model(tiny_path, dymu=None, vtu=False, attn_implementation=attn)
    pipe = llava.load_model(tiny_path, dymu=None, vtu=False, attn_implementation=attn)
    dymu.apply_dtome(pipe.model, merge_nothing(pipe))
    dymu.apply_vtu(pipe.model)
    pipe.vtu = True
    prompts = [llava.build_prompt(q) for q in QUESTIONS]
    inputs = pipe.build_inputs(prompts, [[im] for im in IMAGES])  # batch of 3, left padding
    assert inputs.vtu is not None and inputs.visual_tokens == [576, 576, 576]
    logits = pipe.forward(inputs).logits
    for b, (q, im) in enumerate(zip(QUESTIONS, IMAGES)):
        with torch.no_grad():
            ref = stock.model(**stock_inputs(stock, q, im)).logits[0]
        torch.testing.assert_close(logits[b, -ref.shape[0]:], ref, atol=1e-5, rtol=0)


def test_generate_with_nothing_merged_matches_stock_generate(tiny_path):
    stock = llava.load_model(tiny_path, dymu=None, vtu=False)
    pipe = llava.load_model(tiny_path, dymu=merge_nothing(stock), vtu=True)
    answers, _ = pipe.generate(QUESTIONS, IMAGES, max_new_tokens=8)
    for q, im, answer in zip(QUESTIONS, IMAGES, answers):
        enc = stock_inputs(stock, q, im)
        with torch.no_grad():
            out = stock.model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=stock.tokenizer.pad_token_id)
        expected = stock.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert answer == expected


def test_merging_gives_per_image_token_counts_and_batch_invariance(tiny_path):
    pipe = llava.load_model(tiny_path, dymu=tiny_path / "thresholds" / "mid.json", vtu=True)
    answers, inputs = pipe.generate(QUESTIONS, IMAGES, max_new_tokens=6)
    counts = inputs.visual_tokens
    assert all(0 < c < 576 for c in counts) and len(set(counts)) > 1  # dynamic: depends on the image
    logits = pipe.forward(inputs).logits
    for b, (q, im) in enumerate(zip(QUESTIONS, IMAGES)):
        single_answers, single = pipe.generate([q], [im], max_new_tokens=6)
        assert single.visual_tokens == [counts[b]]
        assert single_answers[0] == answers[b]
        n = single.inputs_embeds.shape[1]
        torch.testing.assert_close(logits[b, -n:], pipe.forward(single).logits[0], atol=1e-4, rtol=1e-4)


def test_vtu_group_map_covers_576_patches_per_image(tiny_path):
    pipe = llava.load_model(tiny_path, dymu=tiny_path / "thresholds" / "low.json", vtu=True)
    prompts = [llava.build_prompt("Compare the two images.", num_images=2)]
    inputs = pipe.build_inputs(prompts, [[IMAGES[0], IMAGES[1]]])
    vtu, n_text = inputs.vtu, None
    n_text = inputs.attention_mask.sum().item() - inputs.visual_tokens[0]
    assert vtu.virtual_length == n_text + 2 * 576
    # every merged slot is referenced; text slots have one member, visual slots their group sizes
    counts = vtu.counts[0]
    assert (counts >= 1).all() and counts.sum().item() == vtu.virtual_length
    # generate continues right after the last virtual position
    assert inputs.position_ids[0, -1].item() == vtu.virtual_length - 1


def test_dtome_without_vtu_uses_consecutive_positions(tiny_path):
    pipe = llava.load_model(tiny_path, dymu=tiny_path / "thresholds" / "low.json", vtu=False)
    inputs = pipe.build_inputs([llava.build_prompt(QUESTIONS[0])], [[IMAGES[0]]])
    assert inputs.vtu is None
    n = inputs.inputs_embeds.shape[1]
    assert inputs.position_ids[0].tolist() == list(range(n))
    assert torch.isfinite(pipe.forward(inputs).logits).all()


def test_fixed_r_tome_gives_the_same_count_for_every_image(tiny_path):
    pipe = llava.load_model(tiny_path, tome_target=209, vtu=False)
    _, inputs = pipe.generate(QUESTIONS, IMAGES, max_new_tokens=2)
    assert inputs.visual_tokens == [208, 208, 208]  # 209 at the feature layer minus the dropped CLS


def test_placeholder_count_must_match_images(tiny_path):
    pipe = llava.load_model(tiny_path, dymu=None, vtu=False)
    with pytest.raises(ValueError, match="placeholders but 2 images"):
        pipe.build_inputs([llava.build_prompt("Two?", num_images=1)], [[IMAGES[0], IMAGES[1]]])


def test_thresholds_of_another_encoder_are_rejected(tiny_path):
    with pytest.raises(dymu.ThresholdsError, match="calibrated for encoder"):
        llava.load_model(tiny_path, dymu="clip-vit-large-patch14-336_openai_low_published")


def test_missing_checkpoint_offline_says_how_to_pass_a_local_path(tmp_path):
    with pytest.raises(OSError, match="pass\\s+the local path"):
        llava.load_model("llava-hf/llava-1.5-7b-hf", local_files_only=True)


def test_remove_restores_stock_classes(tiny_path):
    pipe = llava.load_model(tiny_path, dymu=tiny_path / "thresholds" / "mid.json", vtu=True)
    original = {name: type(m) for name, m in llava.load_model(tiny_path, vtu=False).model.named_modules()}
    dymu.remove(pipe.model)
    assert {name: type(m) for name, m in pipe.model.named_modules()} == original


def test_vtu_returns_hidden_states_like_the_stock_model(tiny_path):
    """output_hidden_states under VTU: the host's tuple convention; nothing merged -> the stock states."""
    stock = llava.load_model(tiny_path, dymu=None, vtu=False)
    pipe = llava.load_model(tiny_path, dymu=merge_nothing(stock), vtu=True)
    inputs = pipe.build_inputs([llava.build_prompt(QUESTIONS[0])], [[IMAGES[0]]])
    with torch.no_grad():
        ours = pipe.model(**inputs.model_kwargs(), output_hidden_states=True).hidden_states
        ref = stock.model(**stock_inputs(stock, QUESTIONS[0], IMAGES[0]), output_hidden_states=True).hidden_states
    assert ours is not None and len(ours) == len(ref) == stock.model.config.text_config.num_hidden_layers + 1
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    merged = llava.load_model(tiny_path, dymu=tiny_path / "thresholds" / "low.json", vtu=True)
    inputs = merged.build_inputs([llava.build_prompt(QUESTIONS[0])], [[IMAGES[0]]])
    with torch.no_grad():
        states = merged.model(**inputs.model_kwargs(), output_hidden_states=True).hidden_states
    assert all(s.shape[1] == inputs.vtu.merged_length for s in states)  # merged length (expand maps them back)
    with pytest.raises(NotImplementedError, match="attention weights"):
        merged.model(**inputs.model_kwargs(), output_attentions=True)
