"""Calibration inputs: image lists (folder or LLaVA JSON) and batch sharding over ranks."""

import json
import shutil

import pytest

from conftest import SAMPLE_IMAGES
from eval.calibrate import _batches_for_rank, list_images


def test_folder_listing_is_recursive_and_sorted(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    shutil.copy(SAMPLE_IMAGES / "chelsea.jpg", tmp_path / "a" / "b" / "z.jpg")
    shutil.copy(SAMPLE_IMAGES / "coffee.jpg", tmp_path / "a" / "y.JPG")
    (tmp_path / "notes.txt").write_text("not an image")
    assert list_images(tmp_path) == [tmp_path / "a" / "b" / "z.jpg", tmp_path / "a" / "y.JPG"]


def test_llava_json_list_skips_text_only_entries(tmp_path):
    entries = [{"id": 1, "image": "chelsea.jpg"}, {"id": 2, "conversations": []}, {"id": 3, "image": "coffee.jpg"}]
    (tmp_path / "mix.json").write_text(json.dumps(entries))
    assert list_images(tmp_path / "mix.json", image_root=SAMPLE_IMAGES) == [SAMPLE_IMAGES / "chelsea.jpg",
                                                                              SAMPLE_IMAGES / "coffee.jpg"]
    with pytest.raises(FileNotFoundError, match="image_root"):
        list_images(tmp_path / "mix.json")  # relative to the JSON's folder, where they are not


def test_bad_sources_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "d.json").write_text('{"image": "x.jpg"}')
    with pytest.raises(ValueError, match="JSON list"):
        list_images(tmp_path / "d.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path / "empty")


def test_ranks_get_disjoint_whole_batches_covering_every_image():
    one = _batches_for_rank(23, 4, seed=3, rank=0, world=1)
    two = [_batches_for_rank(23, 4, seed=3, rank=r, world=2) for r in range(2)]
    assert sorted(i for b in one for i in b) == list(range(23))
    assert sorted(map(tuple, two[0] + two[1])) == sorted(map(tuple, one))  # same batches, split between ranks


def test_tiny_calibration_records_the_weights_identity_and_cached_files_without_one_still_load(tiny_path, tmp_path,
                                                                                               caplog):
    """eval.tiny's cached thresholds carry the tiny tower's weights identity and load onto it without a warning;
    a cached file from before the identity was recorded (no ``weights_sha256`` key) loads and applies too."""
    import logging

    import torch

    import dymu
    import llava
    from dymu.thresholds import weights_identity

    cached = tiny_path / "thresholds" / "mid.json"
    thresholds = dymu.Thresholds.load(cached)
    with caplog.at_level(logging.INFO, logger="dymu"):
        pipe = llava.load_model(tiny_path, dymu=cached, dtype=torch.float32)
        assert thresholds.weights_sha256 == weights_identity(pipe.tower, len(thresholds.values))
        payload = json.loads(cached.read_text())
        del payload["weights_sha256"]
        (tmp_path / "old.json").write_text(json.dumps(payload))
        llava.load_model(tiny_path, dymu=tmp_path / "old.json", dtype=torch.float32)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("dymu")] == []
