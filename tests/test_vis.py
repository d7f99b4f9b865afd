"""Merge maps (dymu.vis), DyMUPipeline.merge_map and scripts/chat.py."""

import numpy as np
import pytest
import torch
from PIL import Image

import llava
from conftest import REPO, SAMPLE_IMAGES, uniform_thresholds
from dymu import dtome_settings, vis
from test_scripts import run_script

IMAGES = [SAMPLE_IMAGES / "astronaut.jpg", SAMPLE_IMAGES / "moon.jpg", SAMPLE_IMAGES / "text.jpg"]


@pytest.fixture(scope="module")
def pipe(tiny_path):
    return llava.load_model(tiny_path, dymu=tiny_path / "thresholds" / "mid.json", dtype=torch.float32)


def test_feature_layer_groups_are_the_tokens_the_llm_gets(pipe):
    pixels = pipe.preprocess(IMAGES)
    groups = vis.merge_groups(pipe.tower, pixels)
    encoded = pipe.encode_images(pixels)
    assert groups.layer == dtome_settings(pipe.tower).num_layers - 1 and groups.has_cls
    assert groups.num_groups == encoded.num_tokens and groups.num_tokens == [k + 1 for k in encoded.num_tokens]
    for labels, group_index in zip(groups.labels, encoded.group_index):
        # same partition of the 24 x 24 patches, and both numbered by first patch in raster order
        assert torch.equal(labels.flatten(), group_index)


def test_groups_coarsen_layer_by_layer(pipe):
    pixels = pipe.preprocess(IMAGES[:2])
    n_run = dtome_settings(pipe.tower).num_layers
    per_layer = [vis.merge_groups(pipe.tower, pixels, layer) for layer in range(n_run)]
    assert [g.layer for g in per_layer] == list(range(n_run))
    assert vis.merge_groups(pipe.tower, pixels, -1).num_groups == per_layer[-1].num_groups
    for finer, coarser in zip(per_layer, per_layer[1:]):
        for a, b in zip(finer.labels.flatten(1), coarser.labels.flatten(1)):
            # every group of layer l lies inside one group of layer l + 1 (merges are never undone)
            pairs = torch.unique(torch.stack([a, b]), dim=1)
            assert pairs.shape[1] == int(a.max()) + 1
        assert all(c <= f for f, c in zip(finer.num_groups, coarser.num_groups))


def test_merge_groups_errors(pipe, tiny_path):
    pixels = pipe.preprocess(IMAGES[:1])
    n_run = dtome_settings(pipe.tower).num_layers
    with pytest.raises(ValueError, match=rf"layer must be in \[-{n_run}, {n_run - 1}\]"):
        vis.merge_groups(pipe.tower, pixels, n_run)
    with pytest.raises(ValueError, match="patched with dymu.apply_dtome"):
        vis.merge_groups(pipe.model, pixels)
    stock = llava.load_model(tiny_path, dymu=None, vtu=False)
    with pytest.raises(ValueError, match="merge maps need DToMe"):
        stock.merge_map(IMAGES[0])


def test_mean_fill_paints_each_group_its_mean_colour():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8))
    labels = torch.tensor([[0, 0, 1], [2, 1, 1]])  # 2 x 3 patches of 4 x 4 pixels
    drawn = np.asarray(vis.draw_merge_map(image, labels, fill="mean", borders=False)).astype(int)
    pix = np.asarray(image).astype(float)
    patch_of = np.kron(labels.numpy(), np.ones((4, 4), dtype=int))
    for g in range(3):
        expected = pix[patch_of == g].mean(0).round()
        assert (drawn[patch_of == g] == expected).all()
    bordered = np.asarray(vis.draw_merge_map(image, labels, fill="mean", border_colour=(255, 0, 255)))
    edge = (bordered == (255, 0, 255)).all(-1)
    assert edge[:, 4].sum() == 4 and edge[4, :].sum() >= 8 and not edge[0, :4].any()  # between groups only
    distinct = np.asarray(vis.draw_merge_map(image, labels, fill="distinct", borders=False))
    assert len({tuple(distinct[patch_of == g][0]) for g in range(3)}) == 3
    captioned = vis.draw_merge_map(image, labels, caption="3 tokens")
    assert captioned.width == 12 and captioned.height > 8
    with pytest.raises(ValueError, match="fill must be"):
        vis.draw_merge_map(image, labels, fill="rainbow")


def test_pipeline_merge_map_png_llava15_and_onevision_crops(pipe, tiny_ov_path, tmp_path):
    png = pipe.merge_map(IMAGES[0], layers=[0, -1])
    assert png.width > 2 * 336 and png.height > 336  # two layers side by side with captions
    path = vis.save_png(png, tmp_path / "maps" / "astronaut.png")
    assert Image.open(path).format == "PNG"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        vis.save_png(png, path, overwrite=False)

    vision = llava.load_model(tiny_ov_path, vtu=False).model.config.vision_config
    thresholds = uniform_thresholds(vision, 0.6, feature_layer=-1)
    ov = llava.load_model(tiny_ov_path, dymu=thresholds)
    crops = ov.crops(IMAGES[0])
    groups = vis.merge_groups(ov.tower, crops)
    assert not groups.has_cls and groups.labels.shape[0] == crops.shape[0] > 1
    assert groups.num_tokens == groups.num_groups
    grid = ov.merge_map(IMAGES[0], layers=[0, -1])
    assert grid.height > 2 * crops.shape[-1] and grid.width > crops.shape[0] * crops.shape[-1]  # rows of crops


def test_chat_script_answers_reports_tokens_and_never_overwrites_a_map(tiny_cache, tmp_path):
    args = [str(REPO / "scripts" / "chat.py"), "model=llava15_tiny", "dymu=mid", f"image={IMAGES[0]}",
            "prompt=What is in the image?", "max_new_tokens=3", "budget.max_visual_tokens=50"]
    first = run_script(args, tiny_cache, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "visual tokens: 50 (unmodified model: 576, 9%)" in first.stdout
    png = tmp_path / "outputs" / "chat" / "llava15_tiny" / "mid" / "merge_map.png"
    assert f"merge map: {png}" in first.stdout and Image.open(png).format == "PNG"
    second = run_script(args, tiny_cache, tmp_path)
    assert second.returncode == 0 and png.with_name("merge_map-1.png").is_file()
    bad = run_script(args[:4] + ["prompt=  "], tiny_cache, tmp_path)
    assert bad.returncode != 0 and "prompt is empty" in bad.stderr
