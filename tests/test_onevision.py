"""LLaVA-OneVision adapter: faithful AnyRes layout (unpadding, newlines, anyres_max_9 downsampling), paper
layout, batching and multi-image prompts, exact against the stock transformers model."""

import pytest
import torch
from PIL import Image

import dymu
import llava
from conftest import SAMPLE_IMAGES, uniform_thresholds
from dymu.thresholds import encoder_fingerprint
from llava.onevision import _MIXED, _NEWLINE, virtual_layout
from llava.prompts import build_onevision_prompt

QUESTION = "What is this?"


def photo(name: str, size=None) -> Image.Image:
    image = Image.open(SAMPLE_IMAGES / f"{name}.jpg").convert("RGB")
    return image.resize(size) if size else image


# chelsea 451x300: crop grid unpadded by rows; page 384x191: heavy unpadding; 1800x1300: anyres_max_9 downsampling
IMAGES = {"unpad": ("chelsea", None), "unpad_strong": ("page", None), "downsample": ("astronaut", (1800, 1300))}


def merge_nothing(pipe) -> dymu.Thresholds:
    return uniform_thresholds(pipe.model.config.vision_config, 1.0, feature_layer=-1)


def stock_logits(stock, image):
    """The unmodified model on the stock layout: <image> expanded to the host's packed feature count."""
    processed = stock.image_processor([image], return_tensors="pt")
    config = stock.model.config
    with torch.no_grad():
        features = stock.model.model.get_image_features(
            pixel_values=processed["pixel_values"], image_sizes=processed["image_sizes"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio,
        ).pooler_output[0]
        ids = stock.tokenizer(build_onevision_prompt(QUESTION), return_tensors="pt")["input_ids"][0]
        slot = (ids == config.image_token_id).nonzero().item()
        expanded = torch.cat([ids[:slot], torch.full((features.shape[0],), config.image_token_id), ids[slot + 1:]])
        logits = stock.model(input_ids=expanded[None], pixel_values=processed["pixel_values"],
                             image_sizes=processed["image_sizes"]).logits[0]
    return logits, features.shape[0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", sorted(IMAGES))
def test_faithful_layout_with_nothing_merged_reproduces_stock_logits(tiny_ov_path, attn, case):
    stock = llava.load_model(tiny_ov_path, vtu=False, attn_implementation=attn)
    pipe = llava.load_model(tiny_ov_path, dymu=merge_nothing(stock), vtu=True, attn_implementation=attn)
    image = photo(*IMAGES[case])
    ref, n_visual = stock_logits(stock, image)
    inputs = pipe.build_inputs([build_onevision_prompt(QUESTION)], [[image]])
    assert inputs.visual_tokens == [n_visual]
    logits = pipe.forward(inputs).logits[0]
    assert logits.shape == ref.shape
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)


def test_virtual_layout_keys(tiny_ov_path):
    pipe = llava.load_model(tiny_ov_path, vtu=False)
    host = pipe.model.model
    for case, expect_mixed in (("unpad", False), ("downsample", True)):
        image = photo(*IMAGES[case])
        processed = pipe.image_processor([image], return_tensors="pt")
        n_crops = int((processed["pixel_values"][0].flatten(1).abs().sum(-1) > 0).sum())
        crop_ids = torch.arange(n_crops * 729).view(n_crops, 729)  # nothing merged: every patch its own group
        keys = virtual_layout(host, crop_ids, processed["image_sizes"][0], "anyres_max_9")
        assert torch.equal(keys[:729], torch.arange(729))  # base image raster first
        assert keys[729:].eq(_NEWLINE).sum() >= 1 and keys[-1] == _NEWLINE  # a newline ends every grid row
        assert bool((keys == _MIXED).any()) == expect_mixed  # only the downsampling mixes patches
        groups = keys[keys >= 0]
        assert groups.unique().numel() == groups.numel()  # no patch twice
        # downsampling: a position whose bilinear sources all lie in one group joins it
        one_group = torch.zeros_like(crop_ids)
        one_group[1:] = 1  # base crop = group 0, all grid crops = group 1
        keys = virtual_layout(host, one_group, processed["image_sizes"][0], "anyres_max_9")
        assert set(keys.unique().tolist()) == {0, 1, _NEWLINE}


@pytest.mark.parametrize("layout", ["faithful", "paper"])
def test_merging_batch_equals_single(tiny_ov_path, layout):
    base = llava.load_model(tiny_ov_path, vtu=False)
    thresholds = uniform_thresholds(base.model.config.vision_config, 0.6, feature_layer=-1)
    pipe = llava.load_model(tiny_ov_path, dymu=thresholds, vtu=True, layout=layout)
    images = [SAMPLE_IMAGES / "chelsea.jpg", SAMPLE_IMAGES / "page.jpg", SAMPLE_IMAGES / "coffee.jpg"]
    answers, inputs = pipe.generate([QUESTION] * 3, images, max_new_tokens=4)
    logits = pipe.forward(inputs).logits
    unmerged = [base.build_inputs([build_onevision_prompt(QUESTION)], [[im]]).visual_tokens[0] for im in images]
    for b, image in enumerate(images):
        assert inputs.visual_tokens[b] < unmerged[b] / 4
        single_answers, single = pipe.generate([QUESTION], [image], max_new_tokens=4)
        assert single_answers == [answers[b]] and single.visual_tokens == [inputs.visual_tokens[b]]
        n = single.inputs_embeds.shape[1]
        torch.testing.assert_close(pipe.forward(single).logits[0], logits[b, -n:], atol=1e-4, rtol=1e-4)


def test_paper_layout_is_flat_crops_without_newlines(tiny_ov_path):
    stock = llava.load_model(tiny_ov_path, vtu=False)
    pipe = llava.load_model(tiny_ov_path, dymu=merge_nothing(stock), vtu=True, layout="paper")
    image = photo("chelsea")
    inputs = pipe.build_inputs([build_onevision_prompt(QUESTION)], [[image]])
    processed = stock.image_processor([image], return_tensors="pt")
    n_crops = int((processed["pixel_values"][0].flatten(1).abs().sum(-1) > 0).sum())
    assert inputs.visual_tokens == [n_crops * 729]  # every crop's every patch, no unpadding, no newline
    text = inputs.vtu.virtual_length - n_crops * 729
    assert text == len(stock.tokenizer(build_onevision_prompt(QUESTION))["input_ids"]) - 1


def test_several_images_in_one_prompt_use_the_base_crop_and_one_newline_each(tiny_ov_path):
    stock = llava.load_model(tiny_ov_path, vtu=False)
    pipe = llava.load_model(tiny_ov_path, dymu=merge_nothing(stock), vtu=True)
    prompt = build_onevision_prompt("Compare them.", 2)
    inputs = pipe.build_inputs([prompt], [[photo("chelsea"), photo("coffee")]])
    assert inputs.visual_tokens == [2 * (729 + 1)]


def frames(n: int = 4) -> list[Image.Image]:
    """A short 'video': a window panning across a real photo."""
    image = photo("astronaut")
    return [image.crop((20 * i, 10 * i, 300 + 20 * i, 300 + 10 * i)) for i in range(n)]


def test_video_pool_mode_with_nothing_merged_reproduces_stock_logits(tiny_ov_path):
    stock = llava.load_model(tiny_ov_path, vtu=False)
    pipe = llava.load_model(tiny_ov_path, dymu=merge_nothing(stock), vtu=True, video_pooling="pool")
    video = llava.Video(frames())
    prompt = build_onevision_prompt("What happens?", ["<video>"])
    inputs = pipe.build_inputs([prompt], [[video]])
    assert inputs.visual_tokens == [4 * 196 + 1]  # the unmodified model's 2x2-pooled frames and one newline
    pixels = stock.image_processor([video.images()], return_tensors="pt")["pixel_values"][:, 0]
    config = stock.model.config
    ids = stock.tokenizer(prompt, return_tensors="pt")["input_ids"][0]
    slot = (ids == config.video_token_id).nonzero().item()
    expanded = torch.cat([ids[:slot], torch.full((4 * 196 + 1,), config.video_token_id), ids[slot + 1:]])
    with torch.no_grad():
        ref = stock.model(input_ids=expanded[None], pixel_values_videos=pixels[None]).logits[0]
    torch.testing.assert_close(pipe.forward(inputs).logits[0], ref, atol=1e-5, rtol=0)


def test_video_merge_mode_replaces_pooling_and_batches_with_images(tiny_ov_path):
    base = llava.load_model(tiny_ov_path, vtu=False)
    nothing = llava.load_model(tiny_ov_path, dymu=merge_nothing(base), vtu=True)
    video = llava.Video(frames())
    prompt = build_onevision_prompt("What happens?", ["<video>"])
    unmerged = nothing.build_inputs([prompt], [[video]])
    assert unmerged.visual_tokens == [4 * 729 + 1]  # every frame patch (no pooling) and one newline
    merging = uniform_thresholds(base.model.config.vision_config, 0.6, feature_layer=-1)
    pipe = llava.load_model(tiny_ov_path, dymu=merging, vtu=True)
    answers, batch = pipe.generate(["What happens?", QUESTION], [video, SAMPLE_IMAGES / "coffee.jpg"], max_new_tokens=3)
    assert batch.vtu.virtual_length >= unmerged.vtu.virtual_length
    assert batch.visual_tokens[0] < 4 * 196  # fewer than even the unmodified model's pooled frames
    single_answers, single = pipe.generate(["What happens?"], [video], max_new_tokens=3)
    assert single_answers[0] == answers[0] and single.visual_tokens[0] == batch.visual_tokens[0]


def test_placeholder_kinds_must_match_inputs(tiny_ov_path):
    pipe = llava.load_model(tiny_ov_path, vtu=False)
    with pytest.raises(ValueError, match="llava.Video"):
        pipe.build_inputs([build_onevision_prompt("Q?", ["<image>"])], [[llava.Video(frames(2))]])


def test_anyres_crops_in_one_batch_equal_each_crop_alone(tiny_ov_path):
    base = llava.load_model(tiny_ov_path, vtu=False)
    vis = base.model.config.vision_config
    n = vis.num_hidden_layers
    # the random tiny SigLIP's keys are very similar (its calibrated thresholds are ~0.99): a high threshold
    # leaves the crops with different lengths
    merging = dymu.Thresholds(values=[0.99] * n, encoder=encoder_fingerprint(vis), num_layers=n, feature_layer=-1)
    pipe = llava.load_model(tiny_ov_path, dymu=merging, vtu=True)
    crops = pipe.crops(photo("chelsea")).to(pipe.dtype)
    assert crops.shape[0] > 2  # base image + grid crops
    with torch.no_grad():
        batch = pipe.tower(crops)
        lengths = batch.padding_mask.sum(-1).tolist()
        assert len(set(lengths)) > 1  # crops keep different lengths (padding)
        for c in range(crops.shape[0]):
            alone = pipe.tower(crops[c : c + 1])
            assert alone.last_hidden_state.shape[1] == lengths[c]
            assert torch.equal(alone.group_ids[0], batch.group_ids[c])
            torch.testing.assert_close(alone.last_hidden_state[0], batch.last_hidden_state[c, : lengths[c]],
                                       atol=1e-5, rtol=0)


def test_generate_with_nothing_merged_matches_stock_generate(tiny_ov_path):
    stock = llava.load_model(tiny_ov_path, vtu=False)
    pipe = llava.load_model(tiny_ov_path, dymu=merge_nothing(stock), vtu=True)
    images = [photo("chelsea"), photo("page")]
    answers, _ = pipe.generate([QUESTION, QUESTION], images, max_new_tokens=6)  # batch of 2, left padding
    config = stock.model.config
    for image, answer in zip(images, answers):
        processed = stock.image_processor([image], return_tensors="pt")
        _, n_visual = stock_logits(stock, image)
        ids = stock.tokenizer(build_onevision_prompt(QUESTION), return_tensors="pt")["input_ids"][0]
        slot = (ids == config.image_token_id).nonzero().item()
        expanded = torch.cat([ids[:slot], torch.full((n_visual,), config.image_token_id), ids[slot + 1:]])[None]
        with torch.no_grad():
            out = stock.model.generate(input_ids=expanded, attention_mask=torch.ones_like(expanded),
                                       pixel_values=processed["pixel_values"], image_sizes=processed["image_sizes"],
                                       max_new_tokens=6, do_sample=False, pad_token_id=stock.tokenizer.pad_token_id)
        assert stock.tokenizer.decode(out[0, expanded.shape[1]:], skip_special_tokens=True).strip() == answer
