"""Calibration under hostile conditions: unreadable images, kills and resumes, ranks that disagree, concurrent
writers of a thresholds file, wrongly typed thresholds files and bad settings (issue 13)."""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dymu
from conftest import REPO
from dymu.thresholds import Thresholds, ThresholdsError

CONF = REPO / "hydra_conf"
GOOD = 20  # readable images per test folder: 5 batches of 4


def composed(overrides: list[str]) -> dict:
    """The find_thresholds config as the script composes it, resolved to plain data."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="find_thresholds", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def tiny_cfg(tiny_cache: Path, images: Path, output: Path, *extra: str) -> dict:
    return composed(["model=llava15_tiny", "variant=low", f"paths.cache_dir={tiny_cache}", f"data.images={images}",
                     f"output={output}", "batch_size=4", "realised_max_images=0", *extra])


def good_images(tiny_path: Path, folder: Path, n: int = GOOD) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((tiny_path / "calibration_images").glob("*.jpg"))[:n]
    return [Path(shutil.copy(p, folder / f"img_{i:02d}.jpg")) for i, p in enumerate(sources)]


def broken_images(folder: Path, fifo: bool = False) -> list[str]:
    """Unreadable files with image names: garbage bytes, a truncated JPEG, and optionally a FIFO (which would hang a
    plain open)."""
    (folder / "garbage.jpg").write_bytes(b"this is not an image" * 10)
    real = next(folder.glob("img_*.jpg")).read_bytes()
    (folder / "truncated.jpg").write_bytes(real[:300])
    names = ["garbage.jpg", "truncated.jpg"]
    if fifo:
        os.mkfifo(folder / "pipe.jpg")
        names.append("pipe.jpg")
    return names


def run_script(args, tiny_cache, cwd, timeout=420):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               DYMU_CACHE_DIR=str(tiny_cache), DYMU_OUTPUT_DIR=str(cwd / "outputs"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "scripts" / "find_thresholds.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pipe(tiny_path, one_thread):
    import llava

    return llava.load_model(tiny_path, dymu=None, vtu=False, dtype=torch.float32)


# ------------------------------------------------------------------------------------------- unreadable images
def test_unreadable_images_are_skipped_counted_and_recorded(tiny_cache, tiny_path, tmp_path, pipe):
    """A garbage file, a truncated JPEG and a FIFO among the images: the script skips them (it does not hang or
    abort), logs how many and which, records them in the file, and the thresholds equal a calibration on the readable
    images alone (the batches depend only on the readable set)."""
    from eval.calibrate import calibrate

    folder = tmp_path / "images"
    good = good_images(tiny_path, folder)
    bad = broken_images(folder, fifo=True)
    out = tmp_path / "low.json"
    try:
        result = run_script(["model=llava15_tiny", "variant=low", f"data.images={folder}", f"output={out}",
                             "batch_size=4", "realised_max_images=0", "++max_unreadable_fraction=0.2"], tiny_cache,
                            tmp_path, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("calibration hung on an unreadable image (a FIFO)")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr  # Hydra logs to stdout
    assert f"skipping 3 unreadable of {GOOD + 3} calibration images" in log, log[-3000:]
    assert all(name in log for name in bad)
    t = Thresholds.load(out)
    record = t.extra["unreadable_images"]
    assert record["count"] == 3 and record["max_unreadable_fraction"] == 0.2
    assert sorted(Path(f["path"]).name for f in record["first"]) == sorted(bad)
    assert all(f["error"] for f in record["first"])
    assert t.extra["images"] == t.num_images == GOOD and t.extra["images_listed"] == GOOD + 3
    assert sorted(t.extra["image_list"]) == sorted(p.name for p in good)  # what was actually used
    assert not list(tmp_path.glob("low.json.partial*")), "the checkpoint outlived the final file"

    alone = calibrate(pipe, good, 94, batch_size=4, realised_max_images=0, progress=False)
    assert t.values == pytest.approx(alone.values, abs=1e-6)
    assert t.extra["image_list_sha256"] == alone.extra["image_list_sha256"]


def test_too_many_unreadable_images_fail_naming_them(tiny_cache, tiny_path, tmp_path, one_thread):
    """2 unreadable of 22 is more than the default max_unreadable_fraction of 0.01: a clear error with the count and
    the files, and nothing is written."""
    from eval.calibrate import calibrate_from_config

    folder = tmp_path / "images"
    good_images(tiny_path, folder)
    bad = broken_images(folder)
    out = tmp_path / "low.json"
    with pytest.raises(ValueError, match=r"2 of 22 calibration images \(9\.09%\) are unreadable, more than "
                                         r"max_unreadable_fraction=0\.01 allows \(0 images\)") as err:
        calibrate_from_config(tiny_cfg(tiny_cache, folder, out))
    assert all(name in str(err.value) for name in bad)
    assert not out.exists() and not list(tmp_path.glob("low.json.partial*"))


# ------------------------------------------------------------------------------------------- kill and resume
class _Killed(Exception):
    pass


def _stop_after(k: int):
    def on_batch(done: int) -> None:
        if done == k:
            raise _Killed(f"killed after {k} batches")
    return on_batch


def test_a_killed_calibration_resumes_to_the_same_thresholds(tiny_path, tmp_path, pipe):
    """Interrupted after 2 of 5 batches, the checkpoint holds those 2; the rerun computes only the 3 others and its
    thresholds equal an uninterrupted run's exactly."""
    from eval.calibrate import calibrate

    images = good_images(tiny_path, tmp_path / "images")
    reference = calibrate(pipe, images, 94, batch_size=4, realised_max_images=0, progress=False)
    partial = tmp_path / "low.json.partial.json"
    with pytest.raises(_Killed):
        calibrate(pipe, images, 94, batch_size=4, realised_max_images=0, progress=False, checkpoint=partial,
                  on_batch=_stop_after(2))
    saved = json.loads(partial.read_text())
    assert saved["batches_done"] == 2 and saved["run"]["seed"] == 0 and saved["run"]["images"] == GOOD
    assert saved["run"]["image_list_sha256"] == reference.extra["image_list_sha256"]
    assert saved["model"]["weights_sha256"] == reference.weights_sha256

    seen = []
    resumed = calibrate(pipe, images, 94, batch_size=4, realised_max_images=0, progress=False, checkpoint=partial,
                        on_batch=seen.append)
    assert seen == [3, 4, 5]  # the 2 checkpointed batches were not run again
    assert resumed.values == reference.values  # exactly, not approximately
    assert resumed.num_images == reference.num_images == GOOD


def test_a_checkpoint_from_other_settings_is_refused(tiny_path, tmp_path, pipe):
    """A checkpoint of seed 0 is refused by a seed-1 run, naming the setting and the way out; restart=True discards
    it; a garbage checkpoint is refused too."""
    from dymu.checkpoint import CheckpointError
    from eval.calibrate import calibrate

    images = good_images(tiny_path, tmp_path / "images")
    partial = tmp_path / "low.json.partial.json"
    with pytest.raises(_Killed):
        calibrate(pipe, images, 94, batch_size=4, realised_max_images=0, progress=False, checkpoint=partial,
                  on_batch=_stop_after(1))
    with pytest.raises(CheckpointError, match=r"written with other settings: seed: checkpoint 0, now 1\. .*"
                                              r"restart=true"):
        calibrate(pipe, images, 94, seed=1, batch_size=4, realised_max_images=0, progress=False, checkpoint=partial)
    with pytest.raises(CheckpointError, match="batch_size: checkpoint 4, now 5"):
        calibrate(pipe, images, 94, batch_size=5, realised_max_images=0, progress=False, checkpoint=partial)
    with pytest.raises(CheckpointError, match="images: checkpoint 20, now 19"):
        calibrate(pipe, images[:-1], 94, batch_size=4, realised_max_images=0, progress=False, checkpoint=partial)
    assert json.loads(partial.read_text())["batches_done"] == 1  # refusing leaves it as it was

    seen = []
    calibrate(pipe, images, 94, seed=1, batch_size=4, realised_max_images=0, progress=False, checkpoint=partial,
              restart=True, on_batch=seen.append)
    assert seen == [1, 2, 3, 4, 5] and json.loads(partial.read_text())["run"]["seed"] == 1  # started over

    partial.write_text("{torn")
    with pytest.raises(CheckpointError, match="is unreadable .*restart=true"):
        calibrate(pipe, images, 94, batch_size=4, realised_max_images=0, progress=False, checkpoint=partial)


# ------------------------------------------------------------------------------------------- torchrun
def _calibrate_rank(rank: int, world: int, init_file: str, cfgs: list, outcome_dir: str) -> None:
    from eval.calibrate import calibrate_from_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        calibrate_from_config(cfgs[rank])
        outcome = "ok"
    except Exception as err:  # noqa: BLE001 - recorded for the test to read
        outcome = f"{type(err).__name__}: {err}"
    finally:
        dist.destroy_process_group()
    Path(outcome_dir, f"rank{rank}.txt").write_text(outcome)


def _spawn(cfgs: list, tmp_path: Path, name: str) -> list[str]:
    outcomes = tmp_path / name
    outcomes.mkdir()
    mp.spawn(_calibrate_rank, args=(2, str(tmp_path / f"{name}.init"), cfgs, str(outcomes)), nprocs=2, join=True)
    return [(outcomes / f"rank{r}.txt").read_text() for r in range(2)]


def test_ranks_with_different_image_lists_fail(tiny_cache, tiny_path, tmp_path):
    """Two gloo ranks, one listing 21 images and the other 2: both fail, naming each rank's list; nothing is
    written. With the same list (one unreadable image) the file records the 20 images actually used."""
    folder = tmp_path / "images"
    good_images(tiny_path, folder)
    (folder / "garbage.jpg").write_bytes(b"not an image")
    out = tmp_path / "low.json"
    base = tiny_cfg(tiny_cache, folder, out, "++max_unreadable_fraction=0.1")
    fewer = json.loads(json.dumps(base))
    fewer["data"]["max_images"] = 2
    outcomes = _spawn([base, fewer], tmp_path, "differ")
    for outcome in outcomes:
        assert "ValueError: the ranks were given different calibration image lists" in outcome, outcome
        assert "rank 0: 21 images" in outcome and "rank 1: 2 images" in outcome
    assert not out.exists()

    assert _spawn([base, base], tmp_path, "same") == ["ok", "ok"]
    t = Thresholds.load(out)
    assert t.extra["world_size"] == 2 and t.extra["images"] == t.num_images == GOOD
    assert t.extra["images_listed"] == GOOD + 1 and t.extra["unreadable_images"]["count"] == 1
    assert not list(tmp_path.glob("low.json.partial*")), "a rank's checkpoint outlived the final file"


# ------------------------------------------------------------------------------------------- thresholds files
def test_concurrent_thresholds_saves_never_tear_or_fail(tmp_path):
    """Two threads saving different thresholds to one file while a third reads it: no save fails, and every read
    parses to one of the two."""
    path = tmp_path / "t.json"
    versions = [Thresholds(values=[0.5 + 0.01 * w] * 4, encoder="e", num_layers=4, feature_layer=-1,
                           extra={"writer": w, "padding": "x" * (5000 * (w + 1))}) for w in range(2)]
    versions[0].save(path)
    errors, reads, stop = [], [], threading.Event()

    def write(w: int) -> None:
        for _ in range(600):
            try:
                versions[w].save(path)
            except Exception as err:  # noqa: BLE001 - the assertion below reports it
                errors.append(f"writer {w}: {type(err).__name__}: {err}")

    def read() -> None:
        while not stop.is_set():
            try:
                reads.append(Thresholds.load(path))
            except Exception as err:  # noqa: BLE001
                errors.append(f"reader: {type(err).__name__}: {err}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads finely
    try:
        writers = [threading.Thread(target=write, args=(w,)) for w in range(2)]
        reader = threading.Thread(target=read)
        reader.start()
        for t in writers:
            t.start()
        for t in writers:
            t.join()
        stop.set()
        reader.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [], f"{len(errors)} failures, e.g. {errors[:3]}"
    assert reads and all(r in versions for r in reads)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]  # no temporary file left behind


BAD_FIELDS = [
    ("values", [True, 0.9, 0.9]),  # true would read as 1.0: DyMU silently off
    ("values", ["0.99", 0.9, 0.9]),
    ("feature_layer", "abc"),
    ("feature_layer", True),
    ("feature_layer", -1.0),
    ("target_tokens", float("nan")),
    ("target_tokens", "94"),
    ("num_images", 1.5),
    ("schedule", [1, "2", 3]),
    ("schedule", "123"),
    ("encoder", 5),
    ("dtype", 32),
    ("source", None),
    ("extra", []),
    ("realised_tokens", {"mean": "90", "std": 1.0, "num_images": 3}),
    ("realised_tokens", [90]),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_thresholds_files_with_wrongly_typed_values_are_refused(tmp_path, field, value):
    good = Thresholds(values=[0.9, 0.9, 0.9], encoder="clip_vision_model-h64-l3-p14-s56", num_layers=3,
                      feature_layer=-1, schedule=[1, 2, 3], target_tokens=10, num_images=8, dtype="float32",
                      realised_tokens={"mean": 9.0, "std": 1.0, "num_images": 8})
    path = good.save(tmp_path / "bad.json")
    payload = json.loads(path.read_text())
    assert Thresholds.load(path) == good  # the untouched file loads
    payload[field] = value
    path.write_text(json.dumps(payload))  # json.dumps writes NaN as the (non-standard) literal NaN
    with pytest.raises(ThresholdsError) as err:
        Thresholds.load(path)
    message = str(err.value)
    assert str(path) in message and f"'{field}" in message, message


# ------------------------------------------------------------------------------------------- settings
BAD_SETTINGS = [
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("batch_size", -3, "batch_size must be an integer >= 1"),
    ("batch_size", 1.5, "batch_size must be an integer >= 1"),
    ("batch_size", "abc", "batch_size must be an integer >= 1"),
    ("data.max_images", 0, r"data.max_images must be an integer >= 1, or null \(all images\)"),
    ("data.max_images", -1, r"data.max_images must be an integer >= 1, or null \(all images\)"),
    ("data.max_images", 2.5, r"data.max_images must be an integer >= 1"),
    ("data.max_images", "abc", r"data.max_images must be an integer >= 1"),
    ("seed", 1.5, "seed must be an integer >= 0"),
    ("num_workers", -1, "num_workers must be an integer >= 0"),
    ("realised_max_images", -1, "realised_max_images must be an integer >= 0"),
    ("target_tokens", 0, "target_tokens must be an integer >= 1"),
    ("target_tokens", "abc", "target_tokens must be an integer >= 1"),
    ("max_unreadable_fraction", 1.5, r"max_unreadable_fraction must be a number in \[0, 1\]"),
    ("max_unreadable_fraction", "abc", r"max_unreadable_fraction must be a number in \[0, 1\]"),
    ("restart", "yes", "restart must be true or false"),
]


def test_bad_calibration_settings_fail_before_the_model_loads(tmp_path):
    """Each bad setting is refused with its key and the allowed range before anything loads (the model path does
    not exist: reaching the loader would raise something else); and from the command line too."""
    from eval.calibrate import calibrate_from_config

    (tmp_path / "images").mkdir()
    for key, value, message in BAD_SETTINGS:
        cfg = composed(["model=llava15", f"output={tmp_path / 'out.json'}", f"data.images={tmp_path / 'images'}",
                        f"model.name_or_path={tmp_path / 'no-such-model'}"])
        section, _, name = key.rpartition(".")
        (cfg[section] if section else cfg)[name] = value
        with pytest.raises(ValueError, match=message):
            calibrate_from_config(cfg)

    result = run_script(["model=llava15", "batch_size=0", f"data.images={tmp_path / 'images'}",
                         f"output={tmp_path / 'out.json'}", f"model.name_or_path={tmp_path / 'no-such-model'}"],
                        tmp_path, tmp_path, timeout=120)
    assert result.returncode != 0
    assert "batch_size must be an integer >= 1; got 0 (int)" in result.stderr, result.stderr[-2000:]
