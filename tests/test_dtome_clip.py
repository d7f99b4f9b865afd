"""DToMe on transformers' ``CLIPVisionModel`` (``dymu.apply_dtome`` / ``dymu.remove``), eager and SDPA."""

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

import dymu
from conftest import assert_batch_equals_singles
from dymu import Thresholds, ThresholdsError
from dymu.patch.vit import DToMeVisionOutput
from dymu.thresholds import encoder_fingerprint

IMAGE, PATCH, LAYERS = 32, 4, 4
N0 = (IMAGE // PATCH) ** 2 + 1  # 65, CLS included

pytestmark = pytest.mark.parametrize("attn", ["eager", "sdpa"])


def _model(attn: str, seed: int = 0) -> CLIPVisionModel:
    config = CLIPVisionConfig(
        image_size=IMAGE,
        patch_size=PATCH,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    model = CLIPVisionModel(config).eval()
    assert model.config._attn_implementation == attn
    return model


def _images() -> torch.Tensor:
    """Four images of very different redundancy: noise, smooth noise, stripes, a flat square."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, IMAGE, IMAGE, generator=g)
    smooth = 3 * F.avg_pool2d(torch.randn(1, 3, IMAGE, IMAGE, generator=g), 9, 1, 4, count_include_pad=False)[0]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, IMAGE), torch.linspace(-1, 1, IMAGE), indexing="ij")
    stripes = torch.stack([torch.sin(6 * xx), torch.cos(4 * yy), xx * yy])
    flat = torch.full((3, IMAGE, IMAGE), 0.3)
    flat[:, 8:20, 10:26] = -1.0
    return torch.stack([noise, smooth, stripes, flat])


def _thresholds(model, values, feature_layer=-1) -> Thresholds:
    return Thresholds(
        values=list(values),
        encoder=encoder_fingerprint(model.config),
        num_layers=model.config.num_hidden_layers,
        feature_layer=feature_layer,
    )


def _lengths(out) -> torch.Tensor:
    if out.padding_mask is None:
        return torch.full((out.last_hidden_state.shape[0],), out.last_hidden_state.shape[1])
    return out.padding_mask.sum(-1)


def _check_bookkeeping(out):
    lengths = _lengths(out)
    sizes, gid = out.token_sizes, out.group_ids
    b = sizes.shape[0]
    assert gid.shape == (b, N0)
    assert torch.equal(sizes.sum(-1), torch.full((b,), float(N0)))
    assert ((gid >= 0) & (gid < lengths[:, None])).all()
    counts = torch.zeros_like(sizes).scatter_add_(1, gid, torch.ones(b, N0))
    assert torch.equal(counts, sizes)
    assert (gid[:, 0] == 0).all() and (sizes[:, 0] == 1).all()  # CLS never merges, stays first


# --------------------------------------------------------------------------- no merging == unpatched


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_no_merge_thresholds_reproduce_unpatched(attn, feature_layer):
    model = _model(attn)
    pixels = _images()
    with torch.no_grad():
        ref = model(pixels, output_hidden_states=True)
        n_run = LAYERS + 1 + feature_layer
        dymu.apply_dtome(model, _thresholds(model, [1.0] * n_run, feature_layer), feature_layer=feature_layer)
        out = model(pixels, output_hidden_states=True)
    assert isinstance(out, DToMeVisionOutput)
    assert out.last_hidden_state.shape == (4, N0, 32)
    assert out.padding_mask is None
    assert torch.equal(out.token_sizes, torch.ones(4, N0))
    assert torch.equal(out.group_ids, torch.arange(N0).expand(4, N0))
    torch.testing.assert_close(out.last_hidden_state, ref.hidden_states[feature_layer], rtol=0, atol=1e-5)
    assert len(out.hidden_states) == n_run + 1
    for i in range(n_run + 1):
        torch.testing.assert_close(out.hidden_states[i], ref.hidden_states[i], rtol=0, atol=1e-5)
    if feature_layer == -1:
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=0, atol=1e-5)


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_layers_after_feature_layer_are_not_run(attn, feature_layer):
    model = _model(attn)
    dymu.apply_dtome(model, _thresholds(model, [0.9] * LAYERS, feature_layer), feature_layer=feature_layer)
    calls = []
    model.encoder.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(_images())
    assert len(calls) == (1 if feature_layer == -1 else 0)


# --------------------------------------------------------------------------- remove / state dict


def test_remove_restores_classes_and_outputs(attn):
    model = _model(attn)
    pixels = _images()
    classes = {name: type(m) for name, m in model.named_modules()}
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(pixels, output_hidden_states=True)
    dymu.apply_dtome(model, _thresholds(model, [0.8] * LAYERS))
    patched = {name for name, m in model.named_modules() if type(m) is not classes[name]}
    assert "encoder" in patched and "encoder.layers.0.self_attn" in patched
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        merged = model(pixels)
    assert merged.last_hidden_state.shape[1] < N0  # it really merged
    dymu.remove(model)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert list(model.state_dict()) == keys
    assert not any(hasattr(m, "_dymu_original_class") for m in model.modules())
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True)
    assert type(out) is type(ref)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=0, atol=0)


# --------------------------------------------------------------------------- merging: batch independence


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_batch_equals_single_image(attn, feature_layer):
    model = _model(attn)
    pixels = _images()
    dymu.apply_dtome(model, _thresholds(model, [0.9, 0.8, 0.7, 0.6], feature_layer), feature_layer=feature_layer)
    with torch.no_grad():
        out = model(pixels)
        singles = [model(pixels[i : i + 1]) for i in range(4)]
    _check_bookkeeping(out)
    lengths = _lengths(out)
    assert len(set(lengths.tolist())) > 1, "images should keep different lengths"
    assert out.padding_mask is not None and (out.token_sizes[~out.padding_mask] == 0).all()
    assert_batch_equals_singles(out, singles, lengths)


def test_token_count_decreases_with_threshold(attn):
    model = _model(attn)
    pixels = _images()
    totals = []
    for tau in [1.0, 0.95, 0.85, 0.7, 0.4, -1.0]:
        dymu.apply_dtome(model, _thresholds(model, [tau] * LAYERS))
        with torch.no_grad():
            out = model(pixels)
        _check_bookkeeping(out)
        totals.append(int(_lengths(out).sum()))
        dymu.remove(model)
    assert totals[0] == 4 * N0
    assert all(a > b for a, b in zip(totals, totals[1:])), totals
    # threshold -1: (almost) every A-token merges in every layer: 65 -> 33 -> 17 -> 9 -> 5
    assert totals[-1] == 4 * 5


# --------------------------------------------------------------------------- proportional attention


def test_proportional_attention_adds_log_size_before_softmax(attn):
    model = _model(attn)
    pixels = _images()[[0, 3]]  # a busy and a redundant image: different lengths -> padding
    dymu.apply_dtome(model, _thresholds(model, [0.9] * LAYERS))
    layer = model.encoder.layers[1]
    seen = {}

    def pre_hook(module, args):
        seen["x"], seen["state"] = args[0], args[2]

    def attn_hook(module, args, output):
        seen["attn"] = output[0]

    layer.register_forward_pre_hook(pre_hook)
    layer.self_attn.register_forward_hook(attn_hook)
    with torch.no_grad():
        model(pixels)
        state = seen["state"]
        assert state.merged and state.sizes.max() > 1
        assert state.padding_mask is not None and not state.padding_mask.all()
        sa = layer.self_attn
        h = layer.layer_norm1(seen["x"])
        b, n, _ = h.shape
        split = lambda t: t.view(b, n, sa.num_heads, sa.head_dim).transpose(1, 2)  # (B, H, N, D)
        q, k, v = split(sa.q_proj(h)), split(sa.k_proj(h)), split(sa.v_proj(h))
        logits = q @ k.transpose(-1, -2) * sa.scale  # (B, H, N, N)
        pad = (~state.padding_mask)[:, None, None, :]

        def attend(bias):
            p = (logits + bias).masked_fill(pad, -torch.inf).softmax(-1)
            return sa.out_proj((p @ v).transpose(1, 2).reshape(b, n, -1))

        expected = attend(state.sizes.clamp_min(1).log()[:, None, None, :])
        without_bias = attend(torch.zeros(()))
    valid = state.padding_mask
    torch.testing.assert_close(seen["attn"][valid], expected[valid], rtol=0, atol=1e-5)
    assert (seen["attn"][valid] - without_bias[valid]).abs().max() > 1e-3  # the check is sensitive


# --------------------------------------------------------------------------- fixed-r ToMe


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_fixed_r_tome(attn, feature_layer):
    model = _model(attn)
    pixels = _images()
    n_run = LAYERS + 1 + feature_layer
    r = 7
    dymu.apply_dtome(model, tome_r=[r] * n_run, feature_layer=feature_layer)
    with torch.no_grad():
        out = model(pixels)
        single = model(pixels[2:3])
    assert out.last_hidden_state.shape == (4, N0 - r * n_run, 32)
    assert out.padding_mask is None
    _check_bookkeeping(out)
    assert torch.equal(single.group_ids[0], out.group_ids[2])
    torch.testing.assert_close(single.last_hidden_state[0], out.last_hidden_state[2], rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        dymu.apply_dtome(_model(attn), tome_r=[r] * (n_run + 1), feature_layer=feature_layer)


# --------------------------------------------------------------------------- Thresholds.check


def test_thresholds_for_another_encoder_are_rejected(attn):
    model = _model(attn)
    classes = [type(m) for m in model.modules()]
    other = Thresholds(values=[0.9] * 24, encoder="clip_vision_model-h1024-l24-p14-s336", num_layers=24, feature_layer=-2)
    with pytest.raises(ThresholdsError, match="calibrated for encoder"):
        dymu.apply_dtome(model, other)
    with pytest.raises(ThresholdsError):
        dymu.apply_dtome(model, _thresholds(model, [0.9] * (LAYERS - 1), feature_layer=-1))
    # enough values for the layers that run (feature layer -2 runs LAYERS - 1 layers)
    assert [type(m) for m in model.modules()] == classes  # failed applies patch nothing
    dymu.apply_dtome(model, _thresholds(model, [0.9] * (LAYERS - 1), feature_layer=-2), feature_layer=-2)
