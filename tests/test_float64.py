"""float64 DToMe: a float64 CLIP tower with padding runs and is batch-independent; merging keeps float64 precision."""

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

import dymu
from conftest import assert_batch_equals_singles
from dymu.merge import TokenState, attention_bias, merge_tokens
from dymu.thresholds import encoder_fingerprint

IMAGE, PATCH, LAYERS = 32, 4, 4
N0 = (IMAGE // PATCH) ** 2 + 1  # 65, CLS included

pytestmark = pytest.mark.usefixtures("one_thread")


def _clip64(attn: str) -> CLIPVisionModel:
    config = CLIPVisionConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=32, num_hidden_layers=LAYERS,
                              num_attention_heads=4, intermediate_size=64, attn_implementation=attn)
    torch.manual_seed(0)
    return CLIPVisionModel(config).eval().to(torch.float64)


def _two_images() -> torch.Tensor:
    """A busy image (noise) and a redundant one (flat with a square): they keep different token counts."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, IMAGE, IMAGE, generator=g)
    flat = torch.full((3, IMAGE, IMAGE), 0.3)
    flat[:, 8:20, 10:26] = -1.0
    return torch.stack([noise, flat]).double()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_float64_clip_with_padding_runs_and_batch_equals_single(attn):
    model = _clip64(attn)
    thresholds = dymu.Thresholds(values=[0.9, 0.8, 0.7, 0.6], encoder=encoder_fingerprint(model.config),
                                 num_layers=LAYERS, feature_layer=-1)
    dymu.apply_dtome(model, thresholds)
    pixels = _two_images()
    with torch.no_grad():
        out = model(pixels)  # raised "value cannot be converted to type float without overflow" before the fix
        singles = [model(pixels[i : i + 1]) for i in range(2)]
    assert out.last_hidden_state.dtype == torch.float64 and out.pooler_output.dtype == torch.float64
    assert out.padding_mask is not None, "the two images should end with different token counts"
    lengths = out.padding_mask.sum(-1)
    assert lengths[0] != lengths[1]
    assert torch.equal(out.token_sizes.sum(-1), torch.full((2,), float(N0)))
    assert_batch_equals_singles(out, singles, lengths)


def test_attention_bias_float64_masks_padding_with_the_float64_minimum():
    state = TokenState(sizes=torch.tensor([[1.0, 3.0, 0.0]]), group_ids=torch.tensor([[0, 1, 1, 1]]),
                       padding_mask=torch.tensor([[True, True, False]]), merged=True)
    bias = attention_bias(state, torch.float64)
    assert bias.dtype == torch.float64 and bias.shape == (1, 1, 1, 3)
    assert bias[0, 0, 0, 2] == torch.finfo(torch.float64).min
    assert abs(float(bias[0, 0, 0, 1]) - 1.0986122886681098) < 1e-15  # log 3 in float64


def test_merge_tokens_float64_equals_the_float64_mean_of_the_members():
    # Values 1 + O(1e-9): a float32 accumulation rounds them all to 1 (error ~1e-9), float64 keeps them.
    g = torch.Generator().manual_seed(0)
    x = 1.0 + 1e-9 * torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    state = TokenState.initial(2, 9)
    # image 0: A-positions 2, 4, 6 -> B-position 1 (B-index 0); image 1: A-position 8 -> B-position 7 (index 3)
    merge_a = torch.tensor([[False, True, True, True, False], [False, False, False, False, True]])
    dst = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 0, 3]])
    y, new = merge_tokens(x, state, merge_a, dst)
    assert y.dtype == torch.float64
    for b in range(2):
        n = int(new.lengths[b])
        for j in range(n):
            members = (new.group_ids[b] == j).nonzero()[:, 0]
            expected = x[b, members].mean(0)
            assert float((y[b, j] - expected).abs().max()) < 1e-12, (b, j, members.tolist())
    # the merged groups really hold several members with distinct values (the test is sensitive)
    assert int(new.sizes.max()) == 4


def test_vtu_remerge_float64_equals_the_float64_group_mean():
    """VTU's re-merge keeps float64 outputs in float64 (it summed in float32: errors ~1e-9 on values 1 + 1e-9)."""
    from dymu import VTUInputs
    from dymu.vtu import remerge

    g = torch.Generator().manual_seed(0)
    group_index = torch.tensor([[0, 1, 1, 1, 2, 2, 3]])
    out = 1 + 1e-9 * torch.randn(1, 7, 8, generator=g, dtype=torch.float64)
    vtu = VTUInputs(group_index=group_index, attention_mask=torch.ones(1, 7, dtype=torch.long), merged_length=4)
    merged = remerge(out, vtu)
    assert merged.dtype == torch.float64
    for j in range(4):
        torch.testing.assert_close(merged[0, j], out[0, group_index[0] == j].mean(0), rtol=0, atol=1e-13)
