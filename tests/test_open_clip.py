"""DToMe on open_clip's own VisionTransformer (optional extra: skipped unless open_clip is installed).

Run in an environment with ``pip install -e ".[dev,openclip]"`` (CI does, in a separate venv).
"""

import pytest
import torch

import dymu  # conftest.py calls dymu.prepare_cpu_torchvision() first, so torchvision (needed by open_clip) imports
from dymu.patch import encoder_spec
from dymu.thresholds import EncoderSpec

open_clip = pytest.importorskip("open_clip")
from open_clip.transformer import VisionTransformer  # noqa: E402


def tower(pool_type: str = "tok", final_ln_after_pool: bool = False, layers: int = 3) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(image_size=56, patch_size=14, width=64, layers=layers, heads=4, mlp_ratio=4.0,
                             output_dim=32, pool_type=pool_type, final_ln_after_pool=final_ln_after_pool).eval()


def pixels(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(n, 3, 2, 2, generator=g)
    return torch.nn.functional.interpolate(coarse, size=56, mode="nearest") + 0.02 * torch.randn(n, 3, 56, 56, generator=g)


@pytest.mark.parametrize("pool_type, final_ln", [("tok", False), ("tok", True), ("avg", False), ("avg", True)])
def test_nothing_merged_reproduces_unpatched_features(pool_type, final_ln):
    visual = tower(pool_type, final_ln)
    x = pixels()
    with torch.no_grad():
        ref = visual(x)
        dymu.apply_dtome(visual, dymu.ThresholdRule([1.0] * 3))
        out = visual(x)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        dymu.remove(visual)
        assert type(visual) is VisionTransformer
        torch.testing.assert_close(visual(x), ref, atol=0, rtol=0)


def test_spec_and_thresholds_validation():
    visual = tower()
    spec = encoder_spec(visual)
    assert spec == EncoderSpec("open_clip_vit-h64-l3-p14-s56", 3, 17, True)
    other = dymu.Thresholds(values=[0.5] * 3, encoder="clip_vision_model-h64-l3-p14-s56", num_layers=3, feature_layer=-1)
    with pytest.raises(dymu.ThresholdsError, match="calibrated for encoder"):
        dymu.apply_dtome(visual, other)


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_merging_batch_equals_single_and_avg_pool_is_size_weighted(pool_type):
    visual = dymu.apply_dtome(tower(pool_type), dymu.ThresholdRule([0.9, 0.9, 0.9]))  # lengths 10 / 12 / 9
    x = pixels()
    with torch.no_grad():
        out = visual.dtome_forward(x)
        assert out.padding_mask is not None and torch.equal(out.token_sizes.sum(-1), torch.full((3,), 17.0))
        for b in range(3):
            single = visual.dtome_forward(x[b : b + 1])
            assert torch.equal(single.group_ids[0], out.group_ids[b])
            torch.testing.assert_close(single.pooler_output[0], out.pooler_output[b], atol=1e-5, rtol=0)
        if pool_type == "avg":  # mean over original patches, each carrying its group's (normalised) feature
            per_patch = out.last_hidden_state.gather(1, out.group_ids[..., None].expand(-1, -1, 64))[:, 1:]
            torch.testing.assert_close(out.pooler_output, per_patch.mean(1) @ visual.proj, atol=1e-5, rtol=0)


def test_zero_shot_classification_on_merged_tokens():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=3, width=64, head_width=16, patch_size=14, image_size=56),
                 text_cfg=CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=4, layers=2)).eval()
    text = torch.randint(1, 99, (5, 16))
    images = pixels(4)
    with torch.no_grad():
        text_features = torch.nn.functional.normalize(model.encode_text(text), dim=-1)
        reference = torch.nn.functional.normalize(model.encode_image(images), dim=-1) @ text_features.T
        dymu.apply_dtome(model, dymu.ThresholdRule([1.0] * 3))  # finds model.visual
        same = torch.nn.functional.normalize(model.encode_image(images), dim=-1) @ text_features.T
        dymu.remove(model)
        dymu.apply_dtome(model, dymu.ThresholdRule([0.5] * 3))
        merged = torch.nn.functional.normalize(model.encode_image(images), dim=-1) @ text_features.T
    torch.testing.assert_close(same, reference, atol=1e-5, rtol=0)
    assert merged.shape == (4, 5) and torch.isfinite(merged).all()
    assert model.visual.dtome_forward(images).last_hidden_state.shape[1] < 17  # the logits came from fewer tokens


def test_find_thresholds_on_open_clip_tower():
    visual = tower()
    t = dymu.find_thresholds(visual, [pixels(4), pixels(4) * 0.5], target_tokens=8, progress=False)
    assert t.encoder == "open_clip_vit-h64-l3-p14-s56" and t.schedule == [3, 3, 3] and len(t.values) == 3
    assert not dymu.is_patched(visual)


# ------------------------------------------------------------------ timm trunks (open_clip's SigLIP towers)
def timm_tower(global_pool: str = "map", class_token: bool = False):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(0)
    return TimmViT(img_size=56, patch_size=14, embed_dim=64, depth=3, num_heads=4, class_token=class_token,
                   global_pool=global_pool, num_classes=0, fc_norm=False).eval()


@pytest.mark.parametrize("global_pool, class_token", [("map", False), ("avg", False), ("token", True)])
def test_timm_nothing_merged_reproduces_unpatched(global_pool, class_token):
    trunk = timm_tower(global_pool, class_token)
    x = pixels()
    with torch.no_grad():
        ref = trunk(x)
        dymu.apply_dtome(trunk, dymu.ThresholdRule([1.0] * 3))
        torch.testing.assert_close(trunk(x), ref, atol=1e-5, rtol=0)
        assert encoder_spec(trunk).has_cls == class_token
        dymu.remove(trunk)
        torch.testing.assert_close(trunk(x), ref, atol=0, rtol=0)


def test_timm_map_head_batch_equals_single_and_uses_the_size_bias():
    trunk = dymu.apply_dtome(timm_tower("map"), dymu.ThresholdRule([0.9] * 3))
    x = pixels()
    with torch.no_grad():
        out = trunk.dtome_forward(x)
        assert out.padding_mask is not None  # images keep different lengths
        for b in range(3):
            single = trunk.dtome_forward(x[b : b + 1])
            torch.testing.assert_close(single.pooler_output[0], out.pooler_output[b], atol=1e-5, rtol=0)
        # the pooled feature equals pooling over the unmerged-equivalent sequence (each patch carries its
        # group's feature) with the host's head: proportional attention is exact for duplicates
        per_patch = out.last_hidden_state.gather(1, out.group_ids[..., None].expand(-1, -1, 64))
        torch.testing.assert_close(out.pooler_output, trunk.attn_pool(per_patch), atol=1e-5, rtol=0)


def test_open_clip_siglip_zero_shot_on_merged_tokens():
    model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None).eval()
    images = torch.nn.functional.interpolate(pixels(2), size=224, mode="nearest")
    with torch.no_grad():
        reference = model.encode_image(images)
        dymu.apply_dtome(model, dymu.ThresholdRule([1.0] * 12))  # finds the timm trunk inside TimmModel
        torch.testing.assert_close(model.encode_image(images), reference, atol=1e-4, rtol=1e-4)
        assert encoder_spec(model.visual.trunk) == EncoderSpec("timm_vit-h768-l12-p16-s224", 12, 196, False)
        dymu.remove(model)
        dymu.apply_dtome(model, dymu.ThresholdRule([0.99] * 12))
        merged = model.encode_image(images)
        n_tokens = model.visual.trunk.dtome_forward(images).last_hidden_state.shape[1]
    assert merged.shape == reference.shape and torch.isfinite(merged).all() and n_tokens < 196


def test_openai_vit_l_14_336_architecture():
    """The architecture LLaVA-1.5's tower comes from (random weights): spec and exact identity."""
    model = open_clip.create_model("ViT-L-14-336", pretrained=None).eval()
    images = torch.nn.functional.interpolate(pixels(1), size=336, mode="nearest")
    with torch.no_grad():
        reference = model.encode_image(images)
        dymu.apply_dtome(model, dymu.ThresholdRule([1.0] * 24))
        assert encoder_spec(model.visual) == EncoderSpec("open_clip_vit-h1024-l24-p14-s336", 24, 577, True)
        torch.testing.assert_close(model.encode_image(images), reference, atol=1e-4, rtol=1e-4)
