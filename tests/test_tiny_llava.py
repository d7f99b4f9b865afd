"""The embedded tiny LLaVA-1.5 (random weights) builds offline and loads with stock transformers."""

import json
import logging

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from eval import tiny
from eval.tiny import MARKER_FILE, build_tiny_llava15, build_tiny_tokenizer, ensure_tiny_llava15

PROMPT = "USER: <image>\nWhat animal is this? ASSISTANT:"
NUM_IMAGE_TOKENS = 576  # (336 / 14) ** 2 patches; CLS dropped by the "default" strategy


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_llava15(tmp_path_factory.mktemp("tiny") / "tiny-llava-1.5", seed=0)


@pytest.fixture(scope="module")
def model(checkpoint):
    return LlavaForConditionalGeneration.from_pretrained(checkpoint, local_files_only=True).eval()


@pytest.fixture(scope="module")
def processor(checkpoint):
    return AutoProcessor.from_pretrained(checkpoint, local_files_only=True)


def _photo(name: str = "chelsea") -> Image.Image:
    data = pytest.importorskip("skimage.data")
    return Image.fromarray(getattr(data, name)())


def test_checkpoint_files_and_marker(checkpoint, model):
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", MARKER_FILE):
        assert (checkpoint / name).is_file(), name
    marker = json.loads((checkpoint / MARKER_FILE).read_text())
    assert marker["random_weights"] is True and marker["seed"] == 0
    assert all(v.dtype == torch.float32 for v in load_file(checkpoint / "model.safetensors").values())

    config = model.config
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (336, 14)
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.image_seq_length == NUM_IMAGE_TOKENS
    assert config.text_config.vocab_size % 64 == 0
    assert config.text_config.num_key_value_heads == 2 and not config.tie_word_embeddings


def test_stock_processor_expands_image_placeholder(processor, model):
    inputs = processor(images=_photo(), text=PROMPT, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == NUM_IMAGE_TOKENS
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id


def test_stock_forward_and_generate(processor, model):
    inputs = processor(images=_photo(), text=PROMPT, return_tensors="pt")
    seq = inputs["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, seq, model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert 1 <= out.shape[1] - seq <= 3  # random weights may emit </s> early
    assert torch.equal(out[:, :seq], inputs["input_ids"])


def test_vision_tokens_vary_with_image(processor, model):
    """Random CLIP is not degenerate: keys differ across patches, features differ across images."""
    layer = model.model.vision_tower.encoder.layers[0]
    keys = []
    hook = layer.self_attn.k_proj.register_forward_hook(lambda mod, args, out: keys.append(out[0, 1:]))
    try:
        with torch.no_grad():
            feats = [model.get_image_features(**processor.image_processor(_photo(n), return_tensors="pt"))
                     for n in ("chelsea", "astronaut")]
    finally:
        hook.remove()
    for k in keys:  # (576, D)
        k = torch.nn.functional.normalize(k, dim=-1)
        assert (k @ k.T).mean() < 0.9
    # transformers 5: a BaseModelOutputWithPooling whose pooler_output is a list of (576, D_text) tensors
    a, b = (f.pooler_output[0] for f in feats)
    assert a.shape == (NUM_IMAGE_TOKENS, model.config.text_config.hidden_size)
    assert (a - b).abs().mean() > 0.1 * a.abs().mean()


@pytest.mark.parametrize("loaded", [False, True])
def test_tokenizer_round_trip_and_image_token(processor, model, loaded):
    tok = processor.tokenizer if loaded else build_tiny_tokenizer()
    for text in ("What color is the cat? The cat is orange.", "Zürich, 3.14 ✓ 😀\ttabs  and\nnewlines"):
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    image_ids = tok.encode("<image>", add_special_tokens=False)
    assert image_ids == [model.config.image_token_id]
    assert model.config.image_token_id < model.config.text_config.vocab_size
    assert tok.encode("a<image>b", add_special_tokens=False).count(model.config.image_token_id) == 1
    assert len(tok) <= model.config.text_config.vocab_size


def test_build_is_deterministic(tmp_path, checkpoint):
    again = load_file(build_tiny_llava15(tmp_path / "again", seed=0) / "model.safetensors")
    first = load_file(checkpoint / "model.safetensors")
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (checkpoint / "tokenizer.json").read_text()

    other = load_file(build_tiny_llava15(tmp_path / "other", seed=1) / "model.safetensors")
    assert not all(torch.equal(other[k], first[k]) for k in first)


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_llava15(tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_ensure_builds_once(tmp_path, monkeypatch, caplog):
    path = tmp_path / "cache" / "tiny"
    with caplog.at_level(logging.INFO, logger="eval.tiny"):
        assert ensure_tiny_llava15(path) == path
    assert (path / "config.json").is_file()
    assert "building" in caplog.text
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny"]  # no temporary left behind

    def fail(*args, **kwargs):
        raise AssertionError("must not rebuild")

    monkeypatch.setattr(tiny, "build_tiny_llava15", fail)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="eval.tiny"):
        assert ensure_tiny_llava15(str(path)) == path
    assert "reusing" in caplog.text


def test_ensure_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def half_build(path, seed=0):
        (path / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "build_tiny_llava15", half_build)
    with pytest.raises(KeyboardInterrupt):
        ensure_tiny_llava15(tmp_path / "tiny")
    assert list(tmp_path.iterdir()) == []


def test_ensure_refuses_foreign_directory(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(FileExistsError, match="config.json"):
        ensure_tiny_llava15(tmp_path / "tiny")
