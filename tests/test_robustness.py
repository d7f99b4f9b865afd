"""Malformed inputs and unsafe files (docs/robustness.md): each gets a clear error or a recorded per-sample failure.

Real PIL images written at test time, the real tiny LLaVA-1.5 (random weights), the real runner and scripts.
The tiny model's thresholds here are written by hand (valid files, constant values) so that this module does not
need the session's calibration; calibration itself is tested in test_thresholds.py / test_scripts.py.
"""

import ast
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dymu
import llava
from conftest import REPO, SAMPLE_IMAGES
from dymu.thresholds import PACKAGED_DIR, EncoderSpec, Thresholds, ThresholdsError
from eval.benchmarks.sample import SampleBenchmark
from eval.main import check_config, evaluate, make_generate
from eval.runner import read_predictions, run_benchmark

GOOD = ["chelsea", "astronaut", "coffee"]


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A DYMU cache dir: the tiny LLaVA-1.5 and hand-written (valid) low / mid / high thresholds for it."""
    from eval.tiny import ensure_tiny_llava15

    cache = tmp_path_factory.mktemp("robust_cache")
    path = ensure_tiny_llava15(cache / "llava15_tiny")
    vision = json.loads((path / "config.json").read_text())["vision_config"]
    spec = EncoderSpec.from_config(llava.load_model(path, vtu=False).model.config.vision_config)
    for variant, value in {"low": 0.8, "mid": 0.9, "high": 0.97}.items():
        Thresholds(values=[value] * vision["num_hidden_layers"], encoder=spec.fingerprint,
                   num_layers=spec.num_layers, feature_layer=-2, source="tests (hand-written)").save(
            path / "thresholds" / f"{variant}.json")
    return cache


@pytest.fixture(scope="module")
def pipe(cache):
    return llava.load_model(cache / "llava15_tiny", dymu=cache / "llava15_tiny" / "thresholds" / "mid.json")


def truncated(path: Path) -> Path:
    data = (SAMPLE_IMAGES / "astronaut.jpg").read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])  # a download cut short
    return path


def not_an_image(path: Path) -> Path:
    path.write_text("id,question\n1,what is this?\n")  # a CSV renamed .jpg
    return path


def decompression_bomb(path: Path) -> Path:
    """A 1 kB PNG whose header claims 40000 x 40000 pixels (1.6 gigapixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 40000, 40000, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 5001))
                     + chunk(b"IEND", b""))
    return path


def write_benchmark(folder: Path, images: dict[str, Path | None]) -> Path:
    """A ``sample``-format benchmark: one yes/no question per image (None: a good photo copied in)."""
    (folder / "images").mkdir(parents=True)
    lines = []
    for i, (name, source) in enumerate(images.items()):
        target = folder / "images" / f"{name}.jpg"
        if source is None:
            shutil.copy(SAMPLE_IMAGES / f"{name}.jpg", target)
        else:
            shutil.copy(source, target)
        lines.append(json.dumps({"question_id": f"q{i}", "image": f"images/{name}.jpg",
                                 "question": f"Is this image number {i}?", "answer": "yes", "answer_type": "yes_no"}))
    (folder / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


# ------------------------------------------------------------------------------------------ image files
@pytest.mark.parametrize("make, error, message", [
    (truncated, ValueError, r"cannot read image .*bad\.jpg.*truncated.*re-download or re-export"),
    (not_an_image, ValueError, r"cannot read image .*bad\.jpg.*cannot identify image file"),
    (lambda p: p, FileNotFoundError, r"image file .*bad\.jpg does not exist"),
    (decompression_bomb, ValueError, r"too large to decode safely.*decompression bomb.*MAX_IMAGE_PIXELS"),
])
def test_unreadable_image_files_fail_naming_the_file_and_what_to_do(tmp_path, make, error, message):
    path = make(tmp_path / "bad.jpg")
    with pytest.raises(error, match=message):
        llava.load_image(path)


def test_a_non_image_object_is_a_type_error_that_says_what_to_pass():
    with pytest.raises(TypeError, match="PIL.Image.fromarray"):
        llava.load_image(np.zeros((8, 8, 3), dtype=np.uint8))


def _saved(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_every_image_mode_reaches_the_model_as_8_bit_rgb(tmp_path):
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 255] + [0] * 765)
    palette.info["transparency"] = 0  # the palette entry (blue) is fully transparent
    cases = {  # file -> expected RGB of pixel (0, 0)
        _saved(Image.new("L", (5, 4), 77), tmp_path / "gray.png"): (77, 77, 77),
        _saved(Image.new("1", (5, 4), 1), tmp_path / "bilevel.png"): (255, 255, 255),
        _saved(Image.new("LA", (5, 4), (90, 0)), tmp_path / "gray_alpha.png"): (90, 90, 90),
        # alpha is dropped as upstream LLaVA's convert("RGB"): the stored colour, not a composite
        _saved(Image.new("RGBA", (5, 4), (200, 30, 40, 0)), tmp_path / "rgba.png"): (200, 30, 40),
        _saved(palette, tmp_path / "palette.png", transparency=0): (0, 0, 255),
        _saved(Image.new("CMYK", (5, 4), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=100): (254, 0, 0),
        _saved(Image.new("CMYK", (5, 4), (0, 255, 255, 0)), tmp_path / "cmyk.tif"): (255, 0, 0),
    }
    for path, rgb in cases.items():
        image = llava.load_image(path)
        assert image.mode == "RGB" and image.size[0] >= 4, path.name
        assert all(abs(a - b) <= 2 for a, b in zip(image.getpixel((0, 0)), rgb)), (path.name, image.getpixel((0, 0)))


def test_16_bit_images_are_scaled_to_8_bit_not_saturated(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    png = _saved(Image.fromarray(ramp), tmp_path / "ramp16.png")
    tif = _saved(Image.fromarray(ramp), tmp_path / "ramp16.tif")
    assert Image.open(png).mode == "I;16" and Image.open(png).convert("RGB").getpixel((32, 32))[0] == 255  # PIL saturates
    expected = np.round(ramp / 257).astype(np.uint8)
    for path in (png, tif):
        got = np.asarray(llava.load_image(path))
        assert got.shape == (64, 64, 3) and (got == expected[..., None]).all()
    mid = round(int(ramp[32, 0]) / 257)
    assert llava.load_image(png).getpixel((0, 32))[0] == mid and 120 < mid < 136  # mid-grey stays mid-grey
    # a 32-bit integer image: 16-bit data is scaled, 8-bit data kept, anything wider refused
    assert llava.load_image(Image.fromarray(ramp.astype(np.int32))).getpixel((63, 63)) == (255, 255, 255)
    assert llava.load_image(Image.fromarray(np.full((4, 4), 200, np.int32))).getpixel((0, 0)) == (200, 200, 200)
    with pytest.raises(ValueError, match="beyond 16 bit"):
        llava.load_image(Image.fromarray(np.full((4, 4), 70000, np.int32)))


def test_float_images_are_refused_with_how_to_convert_them(tmp_path):
    path = _saved(Image.fromarray(np.full((4, 4), 0.5, np.float32)), tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"float\.tif holds 32-bit floats.*convert it to 8 bit"):
        llava.load_image(path)
    with pytest.raises(ValueError, match="32-bit floats"):  # NaN pixels cannot come in this way either
        llava.load_image(Image.fromarray(np.full((4, 4), np.nan, np.float32)))


def test_exif_orientation_is_honoured_for_files_and_pil_images(tmp_path):
    stored = Image.new("RGB", (40, 20), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the left of the stored raster
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = _saved(stored, tmp_path / "portrait.jpg", exif=exif.tobytes(), quality=95)
    upright = llava.load_image(path)
    assert upright.size == (20, 40)  # portrait, as a viewer shows it
    assert upright.getpixel((10, 2))[0] > 200 and upright.getpixel((10, 37))[0] < 50  # the band is now on top
    opened = Image.open(path)
    from_pil = llava.load_image(opened)
    assert np.array_equal(np.asarray(from_pil), np.asarray(upright))
    assert opened.size == (40, 20) and opened.getexif().get(0x0112) == 6  # the caller's image is not modified


def test_a_large_image_works_in_bounded_memory(cache, tmp_path):
    big = _saved(Image.linear_gradient("L").resize((10000, 10000)), tmp_path / "big.png", compress_level=1)
    code = ("import resource, sys, llava, torch\n"
            "pipe = llava.load_model(sys.argv[1], vtu=False)\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "pixels = pipe.preprocess([sys.argv[2]])\n"
            "assert pixels.shape == (1, 3, 336, 336) and torch.isfinite(pixels).all()\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n")
    result = subprocess.run([sys.executable, "-c", code, str(cache / "llava15_tiny"), str(big)], cwd=REPO,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    extra_mib = int(result.stdout.split()[-1])
    # the 100 MiB decode, reduced to <= 4608 px before anything else; unreduced, preprocessing peaks at ~1.7 GiB
    assert extra_mib < 600, f"preprocessing a 10000 x 10000 image took {extra_mib} MiB more"
    assert max(llava.load_image(big).size) == 3334  # reduced by 3 (ceil(10000 / 4608))


def test_tiny_and_unusual_images_run_through_the_model(pipe, tmp_path):
    rgb16 = np.random.default_rng(0).integers(0, 65535, (30, 20), dtype=np.uint16)
    images = [
        Image.new("RGB", (1, 1), (200, 10, 10)),
        Image.new("L", (3, 3), 128),
        _saved(Image.new("RGBA", (50, 30), (10, 200, 10, 128)), tmp_path / "a.png"),
        _saved(Image.new("CMYK", (30, 50), (255, 0, 0, 0)), tmp_path / "c.jpg"),
        _saved(Image.fromarray(rgb16), tmp_path / "g16.png"),
    ]
    answers, inputs = pipe.generate(["What is this?"] * len(images), images, max_new_tokens=2)
    assert len(answers) == len(images) and all(isinstance(a, str) for a in answers)
    assert all(0 < n <= 576 for n in inputs.visual_tokens) and torch.isfinite(inputs.inputs_embeds).all()
    # a 1x1 image is read as one RGB pixel (not misread as channels-first): every pixel is that colour
    pixels = pipe.preprocess([images[0]])[0]
    mean, std = torch.tensor(pipe.image_processor.image_mean), torch.tensor(pipe.image_processor.image_std)
    expected = (torch.tensor([200, 10, 10]) / 255 - mean) / std
    torch.testing.assert_close(pixels, expected[:, None, None].expand_as(pixels), atol=0.02, rtol=0)


# ---------------------------------------------------------------------------------------------- prompts
def test_empty_prompts_are_refused(pipe):
    for question in ("", "   \n"):
        with pytest.raises(ValueError, match="the question is empty"):
            pipe.generate([question], [SAMPLE_IMAGES / "coffee.jpg"], max_new_tokens=1)


def test_placeholders_must_match_the_images(pipe):
    image = SAMPLE_IMAGES / "coffee.jpg"
    with pytest.raises(ValueError, match="2 '<image>'/'<video>' placeholders but 1 images"):
        pipe.build_inputs([llava.build_prompt("<image>\n<image>\nCompare.")], [[image]])
    with pytest.raises(ValueError, match="1 '<image>'/'<video>' placeholders but 2 images"):
        pipe.build_inputs([llava.build_prompt("Compare.", num_images=1)], [[image, image]])
    with pytest.raises(ValueError, match=r"0 '<image>'/'<video>' placeholders but 1 images.*pipe\.prompt"):
        pipe.build_inputs(["USER: What is this? ASSISTANT:"], [[image]])  # a raw prompt without a placeholder
    # a question without a placeholder gets one per image through generate / prompt
    answers, inputs = pipe.generate(["What is this?"], [[image, image]], max_new_tokens=1)
    assert len(answers) == 1 and len(inputs.visual_tokens) == 1


def test_prompts_are_checked_before_any_image_is_read_or_encoded(pipe, tmp_path):
    missing = tmp_path / "not_there.jpg"  # would fail on reading; the placeholder error must come first
    with pytest.raises(ValueError, match="2 '<image>'/'<video>' placeholders but 1 images"):
        pipe.build_inputs([llava.build_prompt("<image>\n<image>\nCompare.")], [[missing]])
    with pytest.raises(ValueError, match="2 questions but 1 images"):
        pipe.generate(["What is this?", "And this?"], [SAMPLE_IMAGES / "coffee.jpg"], max_new_tokens=1)


def test_nan_pixels_and_float_video_frames_are_refused(pipe):
    pixels = pipe.preprocess([SAMPLE_IMAGES / "coffee.jpg"])
    pixels[0, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        pipe.encode_images(pixels)
    with pytest.raises(ValueError, match="must be uint8"):
        llava.Video(np.random.default_rng(0).random((2, 8, 8, 3))).images()  # floats in [0, 1] would become 0
    assert len(llava.Video(np.zeros((2, 8, 8, 3), dtype=np.uint8)).images()) == 2


def test_onevision_placeholders_must_match_the_images(tmp_path):
    from eval.tiny import build_tiny_llava_onevision

    ov = llava.load_model(build_tiny_llava_onevision(tmp_path / "ov"), vtu=False)
    image = SAMPLE_IMAGES / "coffee.jpg"
    with pytest.raises(ValueError, match="1 '<image>'/'<video>' placeholders but 2 images"):
        ov.build_inputs([ov.prompt("Compare.", [image])], [[image, image]])
    with pytest.raises(ValueError, match="the question is empty"):
        ov.prompt(" ", [image])


# ------------------------------------------------------------------------------------------- thresholds
def _thresholds_file(cache, tmp_path, **changes) -> Path:
    payload = json.loads((cache / "llava15_tiny" / "thresholds" / "mid.json").read_text())
    payload.update(changes)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(payload))
    return path


@pytest.mark.parametrize("change, message", [
    ({"values": "0.9"}, "must be a list of numbers"),
    ({"values": [0.9, "high"]}, "must be numbers"),
    ({"values": []}, "is empty"),
    ({"values": [0.9] * 6 + [1.5]}, r"must lie in \[-1, 1\]; layers \[6\] hold \[1.5\]"),
    ({"values": [-2.0] * 7}, r"must lie in \[-1, 1\]"),
    ({"values": [0.9] * 9}, "9 thresholds for an encoder of 8 layers"),
    ({"num_layers": 12}, "record 12 encoder layers, the model has 8"),
    ({"values": [0.9] * 3, "num_layers": 8}, "3 thresholds but DToMe runs 7 encoder layers"),
    ({"encoder": "clip_vision_model-h1024-l24-p14-s336"}, "calibrated for encoder .*find_thresholds"),
])
def test_thresholds_that_do_not_fit_are_refused_when_loading(cache, tmp_path, change, message):
    path = _thresholds_file(cache, tmp_path, **change)
    with pytest.raises(ThresholdsError, match=message):
        llava.load_model(cache / "llava15_tiny", dymu=path)


def test_corrupt_and_foreign_thresholds_files_are_refused(cache, tmp_path):
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "dymu-thresholds", "version": 1, "values": [0.9, 0.')  # cut short
    with pytest.raises(ThresholdsError, match="not valid JSON.*find_thresholds"):
        llava.load_model(cache / "llava15_tiny", dymu=corrupt)
    with pytest.raises(ThresholdsError, match="calibrated for encoder 'clip_vision_model-h1024-l24-p14-s336'"):
        llava.load_model(cache / "llava15_tiny", dymu="clip-vit-large-patch14-336_openai_low_published")


def test_shipped_and_calibrated_thresholds_lie_in_0_1_and_the_bounds_are_allowed():
    for path in PACKAGED_DIR.glob("*.json"):
        assert all(0.0 <= v <= 1.0 for v in Thresholds.load(path).values), path.name
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=3, num_attention_heads=4)).eval()
    flat = torch.zeros(2, 3, 56, 56)  # identical tokens: similarities of 1 (the upper bound)
    noise = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    for batch in (flat, noise):
        t = dymu.find_thresholds(tower, [batch], schedule=[2, 2, 2], progress=False)
        assert all(0.0 <= v <= 1.0 for v in t.values), t.values
    Thresholds(values=[-1.0, 1.0], encoder="e", num_layers=2, feature_layer=-1)  # the bounds are valid


def test_nan_pixels_are_refused_by_calibration():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    tower = CLIPVisionModel(CLIPVisionConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4)).eval()
    batch = torch.zeros(2, 3, 56, 56)
    batch[1, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite pixel values"):
        dymu.find_thresholds(tower, [torch.zeros(2, 3, 56, 56), batch], schedule=[2, 2], progress=False)


def test_nan_embeddings_are_recorded_as_failures_not_scored_as_answers(cache, tmp_path):
    broken = llava.load_model(cache / "llava15_tiny", dymu=None, vtu=False)
    with torch.no_grad():
        broken.model.model.multi_modal_projector.linear_1.weight[0, 0] = float("nan")  # e.g. a corrupt checkpoint
    metrics = run_benchmark(make_generate(broken, max_new_tokens=2), SampleBenchmark(limit=2), tmp_path,
                            batch_size=2, progress=False)
    records = read_predictions(tmp_path / "predictions.jsonl")
    assert metrics["n_failed"] == 2 and metrics["metrics"]["accuracy"] == 0.0
    assert all(r["prediction"] is None and "FloatingPointError" in r["error"] and "NaN" in r["error"]
               for r in records)


# ------------------------------------------------------------------------------------------ evaluation
def test_bad_images_are_recorded_per_sample_the_rest_scored_and_not_retried_on_resume(pipe, tmp_path):
    data = write_benchmark(tmp_path / "data", {
        "chelsea": None, "corrupt": truncated(tmp_path / "t.jpg"), "astronaut": None,
        "csv": not_an_image(tmp_path / "n.jpg"), "coffee": None, "vanishing": SAMPLE_IMAGES / "moon.jpg"})
    bench = SampleBenchmark(data_dir=str(data))
    (data / "images" / "vanishing.jpg").unlink()  # deleted after the benchmark was listed (e.g. a lost mount)
    calls = []
    generate = make_generate(pipe, max_new_tokens=2)

    def counting(prompts, images, max_new_tokens):
        calls.append(len(prompts))
        return generate(prompts, images, max_new_tokens)

    out = tmp_path / "out"
    metrics = run_benchmark(counting, bench, out, batch_size=3, progress=False)
    records = {r["id"]: r for r in read_predictions(out / "predictions.jsonl")}
    failed = {"q1": "image file is truncated", "q3": "cannot identify image file", "q5": "does not exist"}
    for qid, reason in failed.items():
        r = records[qid]
        assert r["prediction"] is None and r["visual_tokens"] is None and reason in r["error"], r
        assert str(data / "images") in r["error"]  # names the file
    good = [records[q] for q in ("q0", "q2", "q4")]
    assert all(isinstance(r["prediction"], str) and r["visual_tokens"] > 0 and "error" not in r for r in good)
    assert metrics["n_samples"] == 6 and metrics["n_failed"] == 3
    correct = sum(r["prediction"].strip().lower().startswith("yes") for r in good)
    assert metrics["metrics"]["accuracy"] == pytest.approx(100 * correct / 6)  # failed samples count as wrong
    assert (json.loads((out / "metrics.json").read_text())["n_failed"]) == 3

    before = (out / "predictions.jsonl").read_text()
    calls.clear()
    again = run_benchmark(counting, bench, out, batch_size=3, progress=False)  # resume: failures kept as recorded
    assert calls == [] and again == metrics and (out / "predictions.jsonl").read_text() == before

    for name in ("corrupt", "csv", "vanishing"):  # the data is fixed; retry only what failed
        shutil.copy(SAMPLE_IMAGES / "moon.jpg", data / "images" / f"{name}.jpg")
    fixed = run_benchmark(counting, bench, out, batch_size=3, progress=False, retry_failed=True)
    lines = read_predictions(out / "predictions.jsonl")
    assert sorted(calls) == [3] and fixed["n_failed"] == 0 and fixed["n_samples"] == 6
    assert [r["id"] for r in lines] == [f"q{i}" for i in range(6)]  # one line per sample
    assert [r for r in lines if r["id"] in ("q0", "q2", "q4")] == good  # the good ones were not redone


def test_a_generate_that_loses_answers_is_caught_not_zipped_away(tmp_path):
    def short(prompts, images, max_new_tokens):  # drops the last answer of a batch (a broken batched backend)
        n = max(len(prompts) - 1, 1)
        return ["yes"] * n, [10] * n

    metrics = run_benchmark(short, SampleBenchmark(limit=3), tmp_path, batch_size=3, progress=False)
    records = read_predictions(tmp_path / "predictions.jsonl")
    assert metrics["n_samples"] == 3 and metrics["n_failed"] == 0  # retried one by one, every sample answered
    assert [r["prediction"] for r in records] == ["yes"] * 3

def test_retrying_failures_with_a_smaller_limit_keeps_every_other_record(tmp_path):
    bench = SampleBenchmark()
    first = bench.samples()[0].question

    def failing_on_first(prompts, images, max_new_tokens):
        if any(first in p for p in prompts):
            raise RuntimeError("out of memory")
        return ["yes"] * len(prompts), [10] * len(prompts)

    run_benchmark(failing_on_first, bench, tmp_path, limit=4, progress=False)
    metrics = run_benchmark(lambda p, i, m: (["no"] * len(p), [5] * len(p)), bench, tmp_path, limit=2,
                            retry_failed=True, progress=False)
    records = read_predictions(tmp_path / "predictions.jsonl")
    assert metrics["n_samples"] == 2 and metrics["n_failed"] == 0
    assert [r["prediction"] for r in records] == ["no", "yes", "yes", "yes"]  # records beyond limit=2 are kept

def _script(args, cache, tmp_path, script="eval.py"):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               DYMU_CACHE_DIR=str(cache), DYMU_OUTPUT_DIR=str(tmp_path / "outputs"))
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_eval_script_records_a_corrupt_image_and_finishes(cache, tmp_path):
    data = write_benchmark(tmp_path / "data", {"chelsea": None, "corrupt": truncated(tmp_path / "t.jpg"),
                                                "coffee": None})
    result = _script(["model=llava15_tiny", "dymu=mid", "benchmark=sample", f"benchmark.task.data_dir={data}",
                      "batch_size=3", "max_new_tokens=2", "wandb.mode=disabled"], cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "outputs" / "eval" / "llava15_tiny" / "mid" / "sample"
    records = read_predictions(out / "predictions.jsonl")
    assert [r.get("error") is not None for r in records] == [False, True, False]
    assert records[1]["prediction"] is None and "corrupt.jpg" in records[1]["error"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_samples"] == 3 and metrics["n_failed"] == 1 and "accuracy" in metrics["metrics"]


def _eval_cfg(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "hydra_conf"), version_base="1.3"):
        # a model that does not exist: reaching the model loader would raise OSError instead of the expected error
        return compose(config_name="eval", overrides=[
            "model=llava15_tiny", "dymu=off", f"model.name_or_path={tmp_path}/no-model", "model.build=null",
            f"output_dir={tmp_path}/out", "wandb.mode=disabled", *overrides])


def test_bad_configuration_fails_before_the_model_loads(tmp_path):
    for override, error, message in [("batch_size=0", ValueError, "batch_size must be an integer >= 1"),
                                     ("limit=-1", ValueError, "limit must be null"),
                                     ("max_new_tokens=0", ValueError, "max_new_tokens must be null")]:
        with pytest.raises(error, match=message):
            evaluate(_eval_cfg(tmp_path, override))
    data = write_benchmark(tmp_path / "data", {"chelsea": None, "coffee": None})
    (data / "images" / "coffee.jpg").unlink()  # a data folder missing an image: a data error, named
    with pytest.raises(ValueError, match=r"coffee\.jpg does not exist"):
        evaluate(_eval_cfg(tmp_path, f"benchmark.task.data_dir={data}"))
    with pytest.raises(OSError, match="could not load LLaVA checkpoint"):  # the loader is the next step
        evaluate(_eval_cfg(tmp_path))


# --------------------------------------------------------------------------------------- overwrite guards
def test_eval_with_resume_false_refuses_existing_predictions_before_any_work(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.jsonl").write_text('{"id": "q0", "prediction": "yes"}\n')
    with pytest.raises(FileExistsError, match="resume=true to continue it"):
        evaluate(_eval_cfg(tmp_path, "resume=false"))
    with pytest.raises(FileExistsError):
        check_config(_eval_cfg(tmp_path, "resume=false"))
    assert (out / "predictions.jsonl").read_text() == '{"id": "q0", "prediction": "yes"}\n'  # nothing lost


def test_find_thresholds_refuses_an_existing_file_unless_overwrite(cache, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from eval.calibrate import calibrate_from_config

    images = tmp_path / "images"
    images.mkdir()
    for name in ("chelsea", "coffee", "astronaut", "moon"):
        shutil.copy(SAMPLE_IMAGES / f"{name}.jpg", images)
    output = tmp_path / "low.json"
    output.write_text("my earlier thresholds\n")

    def cfg(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(REPO / "hydra_conf"), version_base="1.3"):
            return compose(config_name="find_thresholds", overrides=[
                "model=llava15_tiny", f"model.name_or_path={cache}/llava15_tiny", "model.build=null", "variant=low",
                f"data.images={images}", f"output={output}", "batch_size=4", "realised_max_images=0", *overrides])

    with pytest.raises(FileExistsError, match="overwrite=true"):
        calibrate_from_config(cfg())
    assert output.read_text() == "my earlier thresholds\n"
    calibrate_from_config(cfg("overwrite=true"))
    t = Thresholds.load(output)
    assert t.target_tokens == 94 and t.num_images == 4 and all(0 <= v <= 1 for v in t.values)


def test_benchmark_script_refuses_existing_results_unless_overwrite(tmp_path):
    from eval.speed import run_from_config

    out = tmp_path / "speed"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}\n')
    cfg = {"output_dir": str(out), "overwrite": False, "shape": "llava15_tiny", "vision_layers": 2, "llm_layers": 1,
           "dtype": "float32", "device": "cpu", "attn_implementation": "sdpa", "seed": 0, "threads": None,
           "variants": ["off"], "images": ["coffee"], "prompt": "Describe.", "decode_tokens": 1, "rounds": 1,
           "progress": False, "calibration": {"targets": {}, "max_images": 4, "batch_size": 4}}
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run_from_config(cfg)
    assert (out / "results.json").read_text() == '{"earlier": true}\n' and not (out / "results.md").exists()
    run_from_config({**cfg, "overwrite": True})
    payload = json.loads((out / "results.json").read_text())
    assert "earlier" not in payload and payload["setup"]["images"] == ["coffee"]


def test_make_table_refuses_existing_tables_unless_overwrite(tmp_path):
    run = tmp_path / "outputs" / "eval" / "llava15" / "mid" / "gqa"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"benchmark": "gqa", "n_samples": 2, "metrics": {"accuracy": 50.0},
                                                  "visual_tokens": {"mean": 100.0, "std": 0.0}}))
    tables = tmp_path / "outputs" / "tables"
    tables.mkdir()
    (tables / "results_llava15.md").write_text("hand-edited table\n")
    env = dict(os.environ, DYMU_OUTPUT_DIR=str(tmp_path / "outputs"))
    script = [sys.executable, str(REPO / "scripts" / "make_table.py"), "model_name=llava15"]
    refused = subprocess.run(script, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "refusing to overwrite" in refused.stderr and "overwrite=true" in refused.stderr
    assert (tables / "results_llava15.md").read_text() == "hand-edited table\n"
    assert not (tables / "results_llava15.csv").exists()
    done = subprocess.run([*script, "overwrite=true"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| llava15 mid | 100 ± 0 | 50.0 |" in (tables / "results_llava15.md").read_text()


# ------------------------------------------------------------------------------------------ safe files
PACKAGE_DIRS = ("dymu", "llava", "eval", "scripts")
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_calls(source: str) -> list[str]:
    """What the package must never do: import a pickling module, ``torch.load`` without ``weights_only=True``,
    pass ``trust_remote_code=True`` or ``allow_pickle=True`` itself (passing on a user's own setting is fine), or
    call ``*.read_pickle``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLING_MODULES:
            found.append(f"from {node.module} import")
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            keywords = {k.arg: k.value for k in node.keywords}
            if name == "load" and isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "torch":
                weights_only = keywords.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append("torch.load without weights_only=True")
            if name == "read_pickle":
                found.append("read_pickle")
            for key in ("trust_remote_code", "allow_pickle"):
                value = keywords.get(key)
                if isinstance(value, ast.Constant) and value.value is True:
                    found.append(f"{key}=True")
    return found


def test_the_unsafe_file_checker_catches_what_it_looks_for():
    bad = ("import pickle\nfrom joblib import load\nimport torch\nx = torch.load('m.pt')\n"
           "y = torch.load('m.pt', weights_only=False)\nz = torch.load('m.pt', weights_only=True)\n"
           "AutoModel.from_pretrained('x', trust_remote_code=True)\nnp.load('a.npy', allow_pickle=True)\n"
           "pd.read_pickle('f')\nAutoModel.from_pretrained('x', trust_remote_code=False)\n"
           "AutoModel.from_pretrained('x', trust_remote_code=user_choice)\n")
    assert sorted(unsafe_calls(bad)) == sorted(["import pickle", "from joblib import", "read_pickle",
                                                "torch.load without weights_only=True",
                                                "torch.load without weights_only=True", "trust_remote_code=True",
                                                "allow_pickle=True"])


def test_package_source_has_no_pickle_no_unsafe_torch_load_and_no_remote_code():
    files = [p for d in PACKAGE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 30
    problems = {str(p.relative_to(REPO)): unsafe_calls(p.read_text(encoding="utf-8")) for p in files}
    assert {k: v for k, v in problems.items() if v} == {}
    assert not [p for d in PACKAGE_DIRS for p in (REPO / d).rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".bin")]
