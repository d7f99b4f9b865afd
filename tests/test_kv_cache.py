"""The merged KV cache's read path (dymu.kv_cache) against the host's RoPE on expanded keys."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from dymu.kv_cache import MergedKVLayer, VirtualPrompt, prompt_logits


def _layer(b=2, h_kv=2, lm=7, length=15, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    config = LlamaConfig(hidden_size=d * 4, num_attention_heads=4, head_dim=d, rope_theta=10000.0)
    positions = torch.arange(length).expand(b, length) + torch.tensor([[0], [3]])[:b]
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float64), positions)
    group_index = torch.randint(0, lm, (b, length), generator=g)
    prompt = VirtualPrompt.from_host(group_index, torch.ones(b, length), cos.double(), sin.double())
    layer = MergedKVLayer(prompt, lm)
    layer.update(torch.randn(b, h_kv, lm, d, generator=g, dtype=torch.float64),
                 torch.randn(b, h_kv, lm, d, generator=g, dtype=torch.float64))
    return layer, cos.double(), sin.double()


@pytest.mark.parametrize("heads,t", [(2, 1), (4, 1), (8, 1), (8, 3)])  # MHA, GQA 2 / 4, multi-token
@pytest.mark.parametrize("method", ["keys", "frequency", "auto"])
def test_prompt_logits_equal_rotated_expanded_keys(heads, t, method):
    layer, cos, sin = _layer()
    b, h_kv, _, d = layer.keys.shape
    q = torch.randn(b, heads, t, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    keys = layer.keys.gather(2, layer.prompt.group_index[:, None, :, None].expand(b, h_kv, -1, d))
    _, rotated = apply_rotary_pos_emb(keys, keys, cos, sin)  # what the expanded cache stores
    expected = q.reshape(b, h_kv, -1, d) @ rotated.transpose(-1, -2)  # (B, H_kv, rep*T, L)
    torch.testing.assert_close(prompt_logits(q, layer, method).double(), expected, rtol=1e-6, atol=1e-6)  # float32 out


def test_prompt_logits_rejects_unknown_method():
    layer, _, _ = _layer()
    with pytest.raises(ValueError, match="method"):
        prompt_logits(torch.zeros(2, 2, 1, 16, dtype=torch.float64), layer, "fast")


def test_merged_cache_cannot_be_cropped_into_its_prompt():
    layer, _, _ = _layer()
    layer.update(torch.zeros(2, 2, 2, 16, dtype=torch.float64), torch.zeros(2, 2, 2, 16, dtype=torch.float64))
    layer.crop(-2)  # the decode rows may go
    assert layer.get_seq_length() == 7
    with pytest.raises(ValueError, match="prompt"):
        layer.crop(-1)


def test_first_update_must_be_the_merged_prompt():
    prompt = VirtualPrompt(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 4, 8))
    with pytest.raises(ValueError, match="3 merged prompt rows"):
        MergedKVLayer(prompt, 3).update(torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 8))
