"""DToMe on transformers' Dinov2Model (the testbed's tower): CLS protected, LayerScale on both branches."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Dinov2Config, Dinov2Model

import dymu
from conftest import assert_batch_equals_singles
from dymu.merge import TokenState, bipartite_match, merge_tokens
from dymu.patch import encoder_spec, vision_token_count
from dymu.thresholds import weights_identity

IMAGE, PATCH, LAYERS = 56, 14, 3
N0 = (IMAGE // PATCH) ** 2 + 1  # 17, CLS included


def dinov2(attn: str = "eager", seed: int = 0) -> Dinov2Model:
    """A tiny random DINOv2 with LayerScale values far from 1, so a wrong LayerScale placement shows."""
    torch.manual_seed(seed)
    cfg = Dinov2Config(image_size=IMAGE, patch_size=PATCH, hidden_size=32, num_hidden_layers=LAYERS,
                       num_attention_heads=4, mlp_ratio=2, layerscale_value=0.5, attn_implementation=attn)
    model = Dinov2Model(cfg).eval()
    with torch.no_grad():
        for layer in model.encoder.layer:  # per-channel LayerScale, as trained models have
            layer.layer_scale1.lambda1.uniform_(0.1, 2.0)
            layer.layer_scale2.lambda1.uniform_(0.1, 2.0)
    return model


def pixels(n: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 2, 2, generator=g)
    return torch.nn.functional.interpolate(coarse, size=IMAGE, mode="nearest") + 0.05 * torch.randn(
        n, 3, IMAGE, IMAGE, generator=g)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_nothing_merged_reproduces_unpatched(attn, feature_layer):
    model = dinov2(attn)
    x = pixels()
    with torch.no_grad():
        ref = model(x, output_hidden_states=True)
        dymu.apply_dtome(model, dymu.ThresholdRule([1.0] * LAYERS), feature_layer=feature_layer)
        out = model(x, output_hidden_states=True)
    assert vision_token_count(model) == (N0, True)
    assert out.last_hidden_state.shape == (3, N0, 32)
    torch.testing.assert_close(out.last_hidden_state, ref.hidden_states[feature_layer], atol=1e-5, rtol=0)
    n_run = LAYERS + 1 + feature_layer + 1 if feature_layer < 0 else feature_layer
    for mine, theirs in zip(out.hidden_states, ref.hidden_states[: n_run + 1]):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    if feature_layer == -1:  # pooled CLS = layernorm of the final CLS token, as the host's
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)
    dymu.remove(model)
    assert type(model) is Dinov2Model and all(type(b).__name__ == "Dinov2Layer" for b in model.encoder.layer)
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, ref.last_hidden_state, atol=0, rtol=0)


def reference_dtome(model: Dinov2Model, x: torch.Tensor, thresholds: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """DToMe on one image written out straightforwardly over the unpatched modules: per layer, the attention with
    ``log s`` added to every key's logit (eager maths), the bipartite merge of ``x + ls1(attn)`` with the keys as
    metric (CLS kept), then the MLP branch. Returns the final tokens and the group ids."""
    assert x.shape[0] == 1
    h = model.embeddings(x)
    state = TokenState.initial(1, h.shape[1])
    for i, layer in enumerate(model.encoder.layer):
        att = layer.attention
        z = layer.norm1(h)
        n = z.shape[1]
        q, k, v = (proj(z).view(1, n, -1, att.head_dim).transpose(1, 2) for proj in (att.q_proj, att.k_proj, att.v_proj))
        logits = q @ k.transpose(-1, -2) * att.scaling + state.sizes.log()[:, None, None, :]
        a = (logits.softmax(-1) @ v).transpose(1, 2).reshape(1, n, -1)
        h = h + layer.layer_scale1(att.o_proj(a))
        scores, dst = bipartite_match(k.mean(1), None, protect_first=True)
        h, state = merge_tokens(h, state, scores > thresholds[i], dst)
        h = h + layer.layer_scale2(layer.mlp(layer.norm2(h)))
    return h, state.group_ids


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_merging_equals_a_straightforward_computation_and_protects_cls(attn):
    model = dinov2(attn)
    x = pixels(3)
    thresholds = [0.2, 0.1, 0.0]
    with torch.no_grad():
        expected = [reference_dtome(model, x[b : b + 1], thresholds) for b in range(3)]
        dymu.apply_dtome(model, dymu.ThresholdRule(thresholds), feature_layer=-1)
        out = model(x)
    lengths = out.padding_mask.sum(-1) if out.padding_mask is not None else torch.full((3,), out.last_hidden_state.shape[1])
    assert (lengths < N0).all(), "these thresholds must merge something, or the test shows nothing"
    for b, (tokens, groups) in enumerate(expected):
        assert torch.equal(out.group_ids[b], groups[0])
        torch.testing.assert_close(out.last_hidden_state[b, : tokens.shape[1]], tokens[0], atol=1e-5, rtol=0)
    assert (out.token_sizes[:, 0] == 1).all() and (out.group_ids[:, 0] == 0).all()  # CLS never merges
    assert torch.equal(out.token_sizes.sum(-1), torch.full((3,), float(N0)))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batch_equals_single(attn):
    model = dymu.apply_dtome(dinov2(attn), dymu.ThresholdRule([0.8, 0.7, 0.6]))
    x = torch.cat([pixels(2, seed=3), torch.randn(1, 3, IMAGE, IMAGE)])  # smooth images and noise merge differently
    with torch.no_grad():
        out = model(x)
        singles = [model(x[b : b + 1]) for b in range(3)]
    lengths = out.padding_mask.sum(-1) if out.padding_mask is not None else [out.last_hidden_state.shape[1]] * 3
    assert len({int(n) for n in lengths}) > 1, "the images must merge to different lengths, or padding is untested"
    assert_batch_equals_singles(out, singles, lengths)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(-1.0, 1.0), min_size=LAYERS, max_size=LAYERS), st.integers(0, 2**16))
def test_any_thresholds_keep_the_merge_bookkeeping_consistent(thresholds, seed):
    """For random thresholds: sizes sum to N0 over real tokens, each group id points at a real token, lower
    thresholds never keep more tokens, CLS stays alone at index 0."""
    model = dymu.apply_dtome(dinov2(), dymu.ThresholdRule(thresholds))
    x = pixels(2, seed=seed)
    with torch.no_grad():
        out = model(x)
        lower = model(x, merge_rule=dymu.ThresholdRule([t - 0.2 for t in thresholds]))
    sizes, groups = out.token_sizes, out.group_ids
    real = out.padding_mask if out.padding_mask is not None else torch.ones_like(sizes, dtype=torch.bool)
    assert torch.equal(sizes.sum(-1), torch.full((2,), float(N0)))
    assert (sizes[~real] == 0).all() and (sizes[real] >= 1).all()
    assert real.gather(1, groups).all()
    counts = torch.zeros_like(sizes).scatter_add_(1, groups, torch.ones_like(groups, dtype=sizes.dtype))
    assert torch.equal(counts, sizes)
    assert (groups[:, 0] == 0).all() and (sizes[:, 0] == 1).all()
    lower_real = lower.padding_mask.sum(-1) if lower.padding_mask is not None else torch.full((2,), lower.last_hidden_state.shape[1])
    assert (lower_real <= real.sum(-1)).all()


def test_spec_thresholds_and_weights_identity():
    model = dinov2()
    spec = encoder_spec(model)
    assert (spec.num_layers, spec.num_tokens, spec.has_cls) == (LAYERS, N0, True)
    assert spec.fingerprint == f"dinov2-h32-l{LAYERS}-p{PATCH}-s{IMAGE}"
    ident = weights_identity(model, LAYERS)
    assert ident is not None and ident != weights_identity(dinov2(seed=1), LAYERS)
    data = [pixels(4, seed=5), pixels(4, seed=6)]
    t = dymu.find_thresholds(model, data, target_tokens=9, progress=False, realised_batches=data)
    assert t.schedule == [3, 3, 2] and t.target_tokens == 9 and t.weights_sha256 == ident
    dymu.apply_dtome(model, t)
    with torch.no_grad():
        assert dymu.dtome_settings(model).protect_first
        out = model(torch.cat(data))
    mean_tokens = out.token_sizes.gt(0).sum(-1).float().mean().item()
    assert 5 <= mean_tokens <= 13, mean_tokens  # near the target on the calibration images themselves
