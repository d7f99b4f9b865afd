"""The merged KV cache's read path (dymu.kv_cache) against the host's RoPE attention over expanded keys."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from dymu.kv_cache import VirtualPrompt, decode_bias, virtual_logits
from dymu.patch.cache import MergedKVLayer, layer_decode_attention


def _layout(b=2, lm=7, length=15, d=16, seed=0, singletons=0):
    """Random virtual layout (``singletons`` rows of one member each, the rest grouped) and host RoPE tables;
    sample 1 is left-padded by 3 virtual positions."""
    g = torch.Generator().manual_seed(seed)
    config = LlamaConfig(hidden_size=d * 4, num_attention_heads=4, head_dim=d, rope_theta=10000.0)
    positions = torch.arange(length).expand(b, length) + torch.tensor([[0], [3]])[:b]
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float64), positions)
    group_index = torch.randint(min(singletons, lm - 1), lm, (b, length), generator=g)
    group_index[:, :singletons] = torch.arange(singletons)  # rows 0..singletons-1 get exactly one position
    group_index = group_index[:, torch.randperm(length, generator=g)]
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1, :3] = False
    return group_index, mask, cos.double(), sin.double()


def _layer(b=2, h_kv=2, lm=7, length=15, d=16, seed=0, singletons=0):
    group_index, mask, cos, sin = _layout(b, lm, length, d, seed, singletons)
    layer = MergedKVLayer(VirtualPrompt.from_host(group_index, mask, cos, sin, merged_length=lm), lm)
    g = torch.Generator().manual_seed(seed + 1)
    keys = torch.randn(b, h_kv, lm, d, generator=g, dtype=torch.float64)
    layer.update(keys, torch.randn(b, h_kv, lm, d, generator=g, dtype=torch.float64))
    return layer, keys, cos, sin


@pytest.mark.parametrize("heads,t", [(2, 1), (4, 1), (8, 1), (8, 3)])  # MHA, GQA 2 / 4, multi-token
@pytest.mark.parametrize("method", ["keys", "frequency", "auto"])
def test_virtual_logits_equal_rotated_expanded_keys(heads, t, method):
    group_index, _, cos, sin = _layout()
    b, h_kv, lm, d = 2, 2, 7, 16
    keys = torch.randn(b, h_kv, lm, d, dtype=torch.float64)
    q = torch.randn(b, heads, t, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expanded = keys.gather(2, group_index[:, None, :, None].expand(b, h_kv, -1, d))
    _, rotated = apply_rotary_pos_emb(expanded, expanded, cos, sin)  # what the expanded cache stores
    expected = q.reshape(b, h_kv, -1, d) @ rotated.transpose(-1, -2)  # (B, H_kv, rep*T, L)
    rope = torch.cat([cos[..., : d // 2], sin[..., : d // 2]], dim=-1)
    got = virtual_logits(q, keys, group_index, rope, method)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)  # float32 out


@pytest.mark.parametrize("singletons", [0, 3, 7])  # all grouped, mixed, nothing merged
@pytest.mark.parametrize("heads,t", [(2, 1), (8, 1), (8, 2)])
def test_merged_decode_attention_equals_attention_over_the_expanded_cache(singletons, heads, t):
    b, h_kv, lm, length, d = 2, 2, 7, 15 if singletons < 7 else 7, 16
    layer, keys, cos, sin = _layer(b, h_kv, lm, length, d, singletons=singletons)
    prompt = layer.prompt
    assert int((prompt.row_bias == 0).sum()) >= singletons * b - 3  # singletons are stored rows (padding aside)
    g = torch.Generator().manual_seed(5)
    tail_k, tail_v = (torch.randn(b, h_kv, t, d, generator=g, dtype=torch.float64) for _ in range(2))
    layer.update(tail_k, tail_v)
    q = torch.randn(b, heads, t, d, generator=g, dtype=torch.float64)
    tail_allowed = torch.ones(t, t, dtype=torch.bool).tril()[None].expand(b, t, t)
    out = layer_decode_attention(q, layer, decode_bias(prompt, tail_allowed), scaling=0.25)

    # reference: the expanded cache (every virtual position rotated there), masked softmax, eager arithmetic
    values = layer.values[:, :, :lm]
    gather = lambda x: x.gather(2, prompt.group_index[:, None, :, None].expand(b, h_kv, -1, d))  # noqa: E731
    _, k_virtual = apply_rotary_pos_emb(gather(keys), gather(keys), cos, sin)
    k_all, v_all = torch.cat([k_virtual, tail_k], 2), torch.cat([gather(values), tail_v], 2)
    rep = heads // h_kv
    k_all, v_all = k_all.repeat_interleave(rep, 1), v_all.repeat_interleave(rep, 1)
    logits = (q @ k_all.transpose(-1, -2)) * 0.25  # (B, H, T, L + T)
    allowed = torch.cat([prompt.attention_mask[:, None].expand(b, t, -1), tail_allowed], -1)[:, None]
    expected = (logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v_all).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_nothing_merged_reads_like_an_ordinary_cache():
    """Every row a singleton: the cache holds exactly the host's rotated keys, and no position is read apart."""
    layer, keys, cos, sin = _layer(lm=7, length=7, singletons=7)
    prompt = layer.prompt
    assert prompt.multi_index.shape[1] == 0
    gather = lambda t: t.gather(1, prompt.group_index.argsort(1)[..., None].expand_as(t))  # noqa: E731 - row order
    _, rotated = apply_rotary_pos_emb(keys, keys, gather(cos), gather(sin))
    real = (prompt.row_bias == 0)[:, None, :, None]  # the 3 padded positions of sample 1 leave padding rows
    assert int(real.sum()) == 7 + 4
    torch.testing.assert_close(layer.keys.masked_fill(~real, 0), rotated.masked_fill(~real, 0), atol=0, rtol=0)


def test_virtual_logits_rejects_unknown_method():
    group_index, _, cos, sin = _layout()
    rope = torch.cat([cos[..., :8], sin[..., :8]], dim=-1)
    with pytest.raises(ValueError, match="method"):
        virtual_logits(torch.zeros(2, 2, 1, 16, dtype=torch.float64), torch.zeros(2, 2, 7, 16, dtype=torch.float64),
                       group_index, rope, "fast")


def test_merged_cache_cannot_be_cropped_into_its_prompt():
    layer, _, _, _ = _layer()
    layer.update(torch.zeros(2, 2, 2, 16, dtype=torch.float64), torch.zeros(2, 2, 2, 16, dtype=torch.float64))
    layer.crop(-2)  # the decode rows may go
    assert layer.get_seq_length() == 7
    with pytest.raises(ValueError, match="prompt"):
        layer.crop(-1)


def test_first_update_must_be_the_merged_prompt():
    group_index, mask, cos, sin = _layout(lm=3)
    prompt = VirtualPrompt.from_host(group_index, mask, cos, sin, merged_length=3)
    with pytest.raises(ValueError, match="3 merged prompt rows"):
        MergedKVLayer(prompt, 3).update(torch.zeros(2, 1, 2, 16), torch.zeros(2, 1, 2, 16))
