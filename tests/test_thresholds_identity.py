"""Thresholds record the identity of the weights they were calibrated on; other weights of the same geometry warn."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

import dymu
from dymu.thresholds import PACKAGED_DIR, Thresholds, ThresholdsError, weights_identity

IMAGE, PATCH, LAYERS, WIDTH = 32, 4, 3, 32

pytestmark = pytest.mark.usefixtures("one_thread")


def _config() -> CLIPVisionConfig:
    return CLIPVisionConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                            num_attention_heads=4, intermediate_size=64)


def _clip(seed: int) -> CLIPVisionModel:
    torch.manual_seed(seed)
    return CLIPVisionModel(_config()).eval()


def _batches(n: int = 2, size: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [F.interpolate(torch.rand(size, 3, 4, 4, generator=g), size=IMAGE, mode="bilinear") for _ in range(n)]


@pytest.fixture(scope="module")
def calibrated() -> Thresholds:
    return dymu.find_thresholds(_clip(0), _batches(), schedule=[6, 4], feature_layer=-2, progress=False)


def _warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("dymu")]


def test_calibration_records_the_weights_identity_and_it_survives_a_strict_json_round_trip(calibrated, tmp_path):
    expected = weights_identity(_clip(0), 2)  # two layers run (feature layer -2 of 3)
    assert calibrated.weights_sha256 == expected
    assert isinstance(expected, str) and len(expected) == 64 and int(expected, 16) >= 0
    assert weights_identity(_clip(1), 2) != expected
    path = calibrated.save(tmp_path / "t.json")
    payload = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert payload["weights_sha256"] == expected
    assert Thresholds.load(path) == calibrated


def test_other_weights_of_the_same_geometry_warn_with_both_identities(calibrated, caplog):
    other = _clip(1)
    theirs = weights_identity(other, len(calibrated.values))
    with caplog.at_level(logging.INFO, logger="dymu"):
        dymu.apply_dtome(other, calibrated, feature_layer=-2)  # a warning, not an error: it is applied
    assert dymu.is_patched(other)
    warnings = _warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    message = warnings[0].getMessage()
    assert calibrated.weights_sha256 in message and theirs in message
    assert "recalibrate" in message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_same_weights_do_not_warn_in_any_dtype(calibrated, caplog, dtype):
    same = _clip(0).to(dtype)
    with caplog.at_level(logging.INFO, logger="dymu"):
        dymu.apply_dtome(same, calibrated, feature_layer=-2)
    assert _warnings(caplog) == []
    assert calibrated.check_weights(same) is True


def test_the_identity_covers_the_first_and_last_calibrated_layers_keys_and_the_patch_embedding():
    base = _clip(0)
    ref = weights_identity(base, 2)
    changed = {}
    for name in ("embeddings.patch_embedding.weight", "encoder.layers.0.self_attn.k_proj.weight",
                 "encoder.layers.1.self_attn.k_proj.weight", "encoder.layers.2.self_attn.k_proj.weight",
                 "encoder.layers.0.self_attn.q_proj.weight"):
        model = _clip(0)
        with torch.no_grad():
            model.get_parameter(name).add_(0.05)
        changed[name] = weights_identity(model, 2) != ref
    assert changed == {
        "embeddings.patch_embedding.weight": True,
        "encoder.layers.0.self_attn.k_proj.weight": True,
        "encoder.layers.1.self_attn.k_proj.weight": True,  # the last of the 2 calibrated layers
        "encoder.layers.2.self_attn.k_proj.weight": False,  # not run, not hashed
        "encoder.layers.0.self_attn.q_proj.weight": False,
    }


class _FusedTower(torch.nn.Module):
    """Parameters named like open_clip's ``VisionTransformer`` (``conv1``, fused ``in_proj_weight`` = [q; k; v])
    or timm's (``patch_embed.proj``, ``blocks.i.attn.qkv``), holding a transformers CLIP's weights."""

    def __init__(self, clip: CLIPVisionModel, layout: str):
        super().__init__()
        layers = clip.encoder.layers
        fused = [torch.cat([b.self_attn.q_proj.weight, b.self_attn.k_proj.weight, b.self_attn.v_proj.weight])
                 for b in layers]
        embed = clip.embeddings.patch_embedding.weight.detach().clone()
        if layout == "open_clip":
            self.conv1 = torch.nn.Conv2d(3, WIDTH, PATCH, PATCH, bias=False)
            self.conv1.weight.data = embed
            self.transformer = torch.nn.Module()
            self.transformer.resblocks = torch.nn.ModuleList(_Wrap(torch.nn.MultiheadAttention(WIDTH, 4))
                                                             for _ in layers)
            for block, w in zip(self.transformer.resblocks, fused):
                block.attn.in_proj_weight.data = w.detach().clone()
        else:
            self.patch_embed = torch.nn.Module()
            self.patch_embed.proj = torch.nn.Conv2d(3, WIDTH, PATCH, PATCH)
            self.patch_embed.proj.weight.data = embed
            self.blocks = torch.nn.ModuleList()
            for w in fused:
                block = torch.nn.Module()
                block.attn = torch.nn.Module()
                block.attn.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
                block.attn.qkv.weight.data = w.detach().clone()
                self.blocks.append(block)


class _Wrap(torch.nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn


@pytest.mark.parametrize("layout", ["open_clip", "timm"])
def test_fused_qkv_layouts_hash_their_key_rows(layout):
    """open_clip / timm towers (optional extras) are found by parameter name; the key third of a fused weight is
    what is hashed, so the same weights give the transformers tower's identity, and only key rows matter."""
    clip = _clip(0)
    tower = _FusedTower(clip, layout)
    assert weights_identity(tower, 3) == weights_identity(clip, 3)
    fused = (tower.transformer.resblocks[2].attn.in_proj_weight if layout == "open_clip"
             else tower.blocks[2].attn.qkv.weight)
    with torch.no_grad():
        fused[:WIDTH].add_(1.0)  # query rows
    assert weights_identity(tower, 3) == weights_identity(clip, 3)
    with torch.no_grad():
        fused[WIDTH : 2 * WIDTH].add_(1.0)  # key rows
    assert weights_identity(tower, 3) != weights_identity(clip, 3)


def test_unknown_layout_or_unloaded_weights_have_no_identity():
    assert weights_identity(torch.nn.Linear(2, 2), 1) is None
    with torch.device("meta"):
        meta = CLIPVisionModel(_config())
    assert weights_identity(meta, 2) is None
    with pytest.raises(ValueError, match="num_layers >= 1"):
        weights_identity(_clip(0), 0)


def test_published_and_older_files_without_an_identity_load_and_apply_without_a_warning(calibrated, tmp_path,
                                                                                         caplog):
    with caplog.at_level(logging.INFO, logger="dymu"):
        published = Thresholds.packaged("clip-vit-large-patch14-336_openai_low_published")
        assert published.weights_sha256 is None
        with torch.device("meta"):  # CLIP ViT-L/14-336 geometry, no weights materialised
            large = CLIPVisionModel(CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024,
                                                     intermediate_size=4096, num_hidden_layers=24,
                                                     num_attention_heads=16))
        dymu.apply_dtome(large, published, feature_layer=-2)
        # a file written before the identity was recorded (no "weights_sha256" key at all)
        payload = json.loads(calibrated.save(tmp_path / "new.json").read_text())
        del payload["weights_sha256"]
        (tmp_path / "old.json").write_text(json.dumps(payload))
        old = Thresholds.load(tmp_path / "old.json")
        assert old.weights_sha256 is None and old.values == calibrated.values
        dymu.apply_dtome(_clip(1), old, feature_layer=-2)
    assert _warnings(caplog) == []
    assert "weights_sha256" not in json.loads((PACKAGED_DIR / "clip-vit-large-patch14-336_openai_low_published.json")
                                              .read_text())


@pytest.mark.parametrize("bad", ["abc", "G" * 64, 123, "A" * 64])
def test_a_malformed_identity_is_refused(calibrated, tmp_path, bad):
    payload = json.loads(calibrated.save(tmp_path / "t.json").read_text())
    payload["weights_sha256"] = bad
    (tmp_path / "bad.json").write_text(json.dumps(payload))
    with pytest.raises(ThresholdsError, match="weights_sha256"):
        Thresholds.load(tmp_path / "bad.json")


def test_saving_non_finite_metadata_fails_instead_of_writing_non_strict_json(calibrated, tmp_path):
    bad = Thresholds(values=calibrated.values, encoder=calibrated.encoder, num_layers=LAYERS, feature_layer=-2,
                     extra={"loss": float("nan")})
    with pytest.raises(ThresholdsError, match="NaN or infinity"):
        bad.save(tmp_path / "nan.json")
    assert not (tmp_path / "nan.json").exists()


def test_find_thresholds_docstring_names_every_supported_tower_family():
    """find_thresholds calibrates transformers CLIP / SigLIP and open_clip / timm towers; its docstring says so,
    with the shapes it takes and the NotImplementedError an unsupported tower raises."""
    doc = " ".join(dymu.find_thresholds.__doc__.split())
    for name in ("CLIPVisionModel", "SiglipVisionModel", "open_clip", "timm", "VisionTransformer"):
        assert name in doc, name
    assert "(B, 3, H, W)" in doc
    raises = doc.split("Raises:")[1]
    assert "NotImplementedError" in raises and "ValueError" in raises
    with pytest.raises(NotImplementedError, match="Linear"):
        dymu.find_thresholds(torch.nn.Linear(2, 2), _batches(1), schedule=[1], progress=False)


def test_siglip_towers_have_an_identity_too():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    def siglip(seed):
        torch.manual_seed(seed)
        return SiglipVisionModel(SiglipVisionConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=WIDTH,
                                                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))

    ids = [weights_identity(siglip(seed), 2) for seed in (0, 0, 1)]
    assert ids[0] is not None and ids[0] == ids[1] != ids[2]
