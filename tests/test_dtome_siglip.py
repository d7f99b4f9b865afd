"""DToMe on transformers' SiglipVisionModel (LLaVA-OneVision's tower): no CLS, attention-pooling head."""

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

import dymu
from dymu.patch import vision_token_count
from dymu.patch.vit import _attention_pool

pytestmark = pytest.mark.parametrize("attn", ["eager", "sdpa"])


def siglip(attn: str, layers: int = 3) -> SiglipVisionModel:
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(image_size=84, patch_size=14, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=layers, num_attention_heads=4, attn_implementation=attn)
    return SiglipVisionModel(cfg).eval()


def pixels(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(n, 3, 3, 3, generator=g)
    return torch.nn.functional.interpolate(coarse, size=84, mode="nearest") + 0.02 * torch.randn(n, 3, 84, 84, generator=g)


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_nothing_merged_reproduces_unpatched(attn, feature_layer):
    model = siglip(attn)
    x = pixels()
    with torch.no_grad():
        ref = model(x, output_hidden_states=True)
        dymu.apply_dtome(model, dymu.ThresholdRule([1.0] * 3), feature_layer=feature_layer)
        out = model(x)
    assert vision_token_count(model) == (36, False)
    torch.testing.assert_close(out.last_hidden_state, ref.hidden_states[feature_layer], atol=1e-5, rtol=0)
    if feature_layer == -1:
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)
    dymu.remove(model)
    assert type(model) is SiglipVisionModel


def test_batch_equals_single_and_every_token_may_merge(attn):
    model = dymu.apply_dtome(siglip(attn), dymu.ThresholdRule([0.3, 0.3, 0.3]))
    x = pixels()
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out.token_sizes.sum(-1), torch.full((3,), 36.0))
        # token 0 is not protected: some image merges original patch 0 with others
        sizes_of_patch0 = out.token_sizes.gather(1, out.group_ids[:, :1])
        assert (sizes_of_patch0 > 1).any()
        for b in range(3):
            single = model(x[b : b + 1])
            n = single.last_hidden_state.shape[1]
            assert torch.equal(single.group_ids[0], out.group_ids[b])
            torch.testing.assert_close(single.last_hidden_state[0], out.last_hidden_state[b, :n], atol=1e-5, rtol=0)
            torch.testing.assert_close(single.pooler_output[0], out.pooler_output[b], atol=1e-5, rtol=0)


def test_pooling_head_size_bias_equals_attending_over_duplicates(attn):
    """Proportional attention is exact for duplicates: a token of size s pools like s copies of it."""
    head = siglip(attn).head
    torch.manual_seed(2)
    merged = torch.randn(2, 5, 32)
    sizes = torch.tensor([[1.0, 3.0, 2.0, 1.0, 4.0], [2.0, 2.0, 1.0, 1.0, 5.0]])
    expanded = [merged[b].repeat_interleave(sizes[b].long(), dim=0) for b in range(2)]  # (11, 32) each
    with torch.no_grad():
        reference = torch.stack([head(e[None])[0] for e in expanded])
        bias = sizes.log()[:, None, None, :]
        pooled = _attention_pool(head, merged, bias)
        without_bias = _attention_pool(head, merged, None)
    torch.testing.assert_close(pooled, reference, atol=1e-5, rtol=0)
    assert (without_bias - reference).abs().max() > 1e-3  # the bias matters


def test_find_thresholds_on_siglip_has_no_cls_budget(attn):
    model = siglip(attn)
    data = [pixels(4), pixels(4) * 0.5]
    t = dymu.find_thresholds(model, data, target_tokens=12, progress=False, realised_batches=data)
    assert t.target_tokens == 12 and t.schedule == [8, 8, 8]  # 36 - 12 over 3 layers, no CLS
    assert t.encoder.startswith("siglip_vision_model") and len(t.values) == 3
    with pytest.raises(ValueError, match="at most about half"):
        dymu.find_thresholds(model, data, schedule=[19, 1, 1], progress=False)  # |A| = 18 for 36 tokens
