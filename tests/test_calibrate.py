"""Calibration inputs: image lists (folder or LLaVA JSON) and batch sharding over ranks."""

import json
import shutil

import pytest

from conftest import SAMPLE_IMAGES
from llava.calibrate import _batches_for_rank, list_images


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
