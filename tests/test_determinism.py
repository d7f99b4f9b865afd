"""Determinism: the same inputs give the same tokens across separately loaded pipelines, repeated calls and
batch compositions; calibration is reproducible from the seed and image list its thresholds file records."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig

import dymu
import llava
from conftest import SAMPLE_IMAGES
from dymu.thresholds import encoder_fingerprint
from eval.calibrate import MAX_LISTED_IMAGES, calibrate, calibrate_from_config, image_list_record, list_images

MAX_NEW = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only adds overhead


def _image(name: str, size: tuple[int, int] | None = None) -> Image.Image:
    image = Image.open(SAMPLE_IMAGES / f"{name}.jpg").convert("RGB")
    return image.resize(size) if size else image


# (question, images): different prompt lengths, image sizes and image counts per prompt
SAMPLES = {
    "cat": ("What animal is this?", ["chelsea"]),
    "astronaut": ("Who is in the picture, what is this person wearing and what is behind them?", ["astronaut"]),
    "sky": ("Night?", ["hubble_deep_field"]),
    "two": ("Compare the two images.", ["coffee", "page"]),
    "coins": ("How many coins are there?", ["coins"]),
}
COMPOSITIONS = [  # the target "cat" first, in the middle, last; partners of other lengths
    ["cat"],
    ["astronaut", "cat", "sky"],
    ["cat", "two"],
    ["coins", "sky", "two", "cat"],
]
OV_SIZES = {"astronaut": (500, 330), "hubble_deep_field": (300, 520)}  # OneVision: other AnyRes grids, kept small


def _load(kind: str, path: Path):
    if kind == "llava15":
        return llava.load_model(path, dymu=path / "thresholds" / "mid.json", vtu=True)
    vis = AutoConfig.from_pretrained(path).vision_config
    n = vis.num_hidden_layers  # random SigLIP keys are alike: 0.9 still merges most tokens, image-dependently
    thresholds = dymu.Thresholds(values=[0.9] * n, encoder=encoder_fingerprint(vis), num_layers=n, feature_layer=-1)
    return llava.load_model(path, dymu=thresholds, vtu=True)


def _images(kind: str, names: list[str]) -> list[Image.Image]:
    return [_image(n, OV_SIZES.get(n) if kind == "onevision" else None) for n in names]


def _generate(pipe, kind: str, names: list[str]):
    """Greedy generation as :meth:`DyMULlava.generate` runs it.

    Returns:
        ``(ids (B, T), logits (T, B, V), inputs)``: new tokens, the logits that chose them, the merged inputs.
    """
    questions = [SAMPLES[n][0] for n in names]
    images = [_images(kind, SAMPLES[n][1]) for n in names]
    inputs = pipe.build_inputs([pipe.prompt(q, ims) for q, ims in zip(questions, images)], images)
    out = pipe.model.generate(**inputs.model_kwargs(), max_new_tokens=MAX_NEW, do_sample=False,
                              pad_token_id=pipe.tokenizer.pad_token_id, return_dict_in_generate=True,
                              output_logits=True)
    return out.sequences, torch.stack(out.logits), inputs


def _answer(row: torch.Tensor, eos: set[int]) -> list[int]:
    """New tokens up to and including the first end-of-sequence token (later ones are batch padding)."""
    ids = row.tolist()
    end = next((i for i, t in enumerate(ids) if t in eos), len(ids) - 1)
    return ids[: end + 1]


def _eos(pipe) -> set[int]:
    eos = pipe.model.generation_config.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos}


@pytest.fixture(scope="module", params=["llava15", "onevision"])
def kind_path(request):
    name = "tiny_path" if request.param == "llava15" else "tiny_ov_path"
    return request.param, request.getfixturevalue(name)


# --------------------------------------------------------------------------- generation


def test_same_tokens_across_loads_and_repeated_calls(kind_path):
    """Two separately loaded pipelines, and a repeated call, give bit-identical inputs, logits and tokens."""
    kind, path = kind_path
    names = ["astronaut", "cat", "two"]
    first, second = _load(kind, path), _load(kind, path)
    with torch.no_grad():
        ids_a, logits_a, in_a = _generate(first, kind, names)
        ids_b, logits_b, in_b = _generate(second, kind, names)
        ids_again, logits_again, _ = _generate(first, kind, names)  # nothing carried over from the last call
    assert torch.equal(in_a.inputs_embeds, in_b.inputs_embeds)  # bit-identical merged inputs
    assert torch.equal(in_a.position_ids, in_b.position_ids)
    assert in_a.visual_tokens == in_b.visual_tokens
    assert torch.equal(ids_a, ids_b) and torch.equal(ids_a, ids_again)
    assert torch.equal(logits_a, logits_b) and torch.equal(logits_a, logits_again)
    answers, _ = first.generate([SAMPLES[n][0] for n in names], [_images(kind, SAMPLES[n][1]) for n in names],
                                max_new_tokens=MAX_NEW)
    assert answers == [a.strip() for a in first.tokenizer.batch_decode(ids_a, skip_special_tokens=True)]


def test_same_answer_tokens_and_visual_tokens_in_any_batch_composition(kind_path):
    """A sample alone and batched (first / middle / last, with other prompt lengths, image sizes and counts)."""
    kind, path = kind_path
    pipe = _load(kind, path)
    eos = _eos(pipe)
    with torch.no_grad():
        alone = {}
        for name in SAMPLES:
            ids, logits, inputs = _generate(pipe, kind, [name])
            alone[name] = (_answer(ids[0], eos), logits[:, 0], inputs.visual_tokens[0])
        counts = [alone[n][2] for n in SAMPLES]
        assert len(set(counts)) > 1, "merging should depend on the image"
        for names in COMPOSITIONS:
            ids, logits, inputs = _generate(pipe, kind, names)
            for b, name in enumerate(names):
                answer, ref_logits, count = alone[name]
                assert inputs.visual_tokens[b] == count, (names, name)
                assert _answer(ids[b], eos) == answer, (names, name)
                # the random-weight LLMs repeat tokens: the logits show the whole computation agrees
                steps = len(answer)
                torch.testing.assert_close(logits[:steps, b], ref_logits[:steps], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- calibration


def _calibrate(pipe, images, seed, batch_size=4, target=209):
    return calibrate(pipe, images, target, batch_size=batch_size, seed=seed, realised_max_images=None, progress=False)


def test_calibration_is_reproducible_from_the_recorded_seed_and_image_list(tiny_path, tmp_path):
    images = list_images(SAMPLE_IMAGES)  # 12 real photos -> 3 batches of 4
    pipe = llava.load_model(tiny_path, dymu=None, vtu=False)
    saved = _calibrate(pipe, images, seed=7).save(tmp_path / "mid.json")
    record = dymu.Thresholds.load(saved)
    extra = record.extra
    assert extra["seed"] == 7 and extra["batch_size"] == 4 and extra["images"] == len(images)
    assert Path(extra["image_dir"]) == SAMPLE_IMAGES.absolute()
    assert [Path(extra["image_dir"]) / p for p in extra["image_list"]] == [p.absolute() for p in images]

    # a fresh model, and only what the file records
    fresh = llava.load_model(tiny_path, dymu=None, vtu=False)
    listed = [Path(extra["image_dir"]) / p for p in extra["image_list"]]
    again = _calibrate(fresh, listed, seed=extra["seed"], batch_size=extra["batch_size"], target=record.target_tokens)
    assert again.values == record.values  # exact, through the JSON round trip
    assert again.realised_tokens == record.realised_tokens and again.num_images == record.num_images
    assert again.extra["image_list_sha256"] == extra["image_list_sha256"]

    # the record is needed: another seed or another order of the same images gives other batches
    other_seed = _calibrate(fresh, images, seed=8)
    reordered = _calibrate(fresh, images[::-1], seed=7)
    assert other_seed.values != record.values and reordered.values != record.values
    assert reordered.extra["image_list_sha256"] != extra["image_list_sha256"]
    assert other_seed.extra["image_list_sha256"] == extra["image_list_sha256"]


def test_find_thresholds_config_records_how_to_relist_its_images(tiny_path, tmp_path):
    """``calibrate_from_config`` (what scripts/find_thresholds.py runs): same values twice; the file names the
    source, ``max_images`` and seed, and re-listing them reproduces the image list (hash) and the values."""
    def cfg(output):
        return {"output": str(output), "target_tokens": 94, "batch_size": 3, "seed": 11, "realised_max_images": None,
                "data": {"images": str(SAMPLE_IMAGES), "image_root": None, "max_images": 9},
                "model": {"name": "llava15_tiny", "name_or_path": str(tiny_path), "dtype": "float32"}}

    first = calibrate_from_config(cfg(tmp_path / "a.json"))
    second = calibrate_from_config(cfg(tmp_path / "b.json"))
    assert first.values == second.values
    record = dymu.Thresholds.load(tmp_path / "a.json")
    extra = record.extra
    assert record.values == first.values and extra["seed"] == 11 and extra["max_images"] == 9
    assert len(extra["image_list"]) == 9
    relisted = list_images(extra["image_source"], extra["image_root"])[: extra["max_images"]]
    assert image_list_record(relisted)["image_list_sha256"] == extra["image_list_sha256"]
    pipe = llava.load_model(tiny_path, dymu=None, vtu=False)
    again = _calibrate(pipe, relisted, seed=extra["seed"], batch_size=extra["batch_size"], target=record.target_tokens)
    assert again.values == record.values


def test_image_list_record_is_portable_and_hashes_large_lists(tmp_path):
    names = [f"part{i % 3}/img_{i:05d}.jpg" for i in range(MAX_LISTED_IMAGES + 1)]
    here = image_list_record([tmp_path / "a" / n for n in names])
    there = image_list_record([tmp_path / "elsewhere" / "b" / n for n in names])
    assert here["image_list_sha256"] == there["image_list_sha256"]  # relative paths: folder-independent
    assert Path(here["image_dir"]) == (tmp_path / "a").absolute()
    assert "image_list" not in here  # too long to list: the hash identifies it
    small = image_list_record([tmp_path / "a" / n for n in names[:5]])
    assert small["image_list"] == names[:5]
    swapped = image_list_record([tmp_path / "a" / n for n in [names[1], names[0], *names[2:5]]])
    assert swapped["image_list_sha256"] != small["image_list_sha256"]  # the order fixes the batches
