"""VTU on transformers' ``LlamaForCausalLM`` (``dymu.apply_vtu``), eager and SDPA.

Layouts are left-padded batches: per sample ``[text prefix] + [image positions merged into random,
non-contiguous groups] + [text suffix]``; text tokens are groups of size 1.
"""

from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import dymu
from conftest import output_cache
from dymu import VTUInputs

WIDTH = 64

# "<decoder family>-<attention kernel>": every property runs on Llama (LLaVA-1.5) and Qwen2 (LLaVA-OV)
pytestmark = pytest.mark.parametrize("attn", ["llama-eager", "llama-sdpa", "qwen2-eager", "qwen2-sdpa"])

_FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def _model(attn: str, layers: int = 2, seed: int = 0):
    family, kernel = attn.split("-")
    config_cls, model_cls = _FAMILIES[family]
    config = config_cls(
        hidden_size=WIDTH,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        num_hidden_layers=layers,
        vocab_size=128,
        max_position_embeddings=256,
        attn_implementation=kernel,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    assert model.config._attn_implementation == kernel
    return model


@dataclass
class Layout:
    embeds: torch.Tensor  # (B, L_m, C) merged inputs
    mask: torch.Tensor  # (B, L_m) merged attention mask
    positions: torch.Tensor  # (B, L_m) virtual position of each merged token's first member
    group_index: torch.Tensor  # (B, L)
    virtual_mask: torch.Tensor  # (B, L)

    @property
    def merged_length(self) -> int:
        return self.embeds.shape[1]

    def vtu(self, **kwargs) -> VTUInputs:
        return VTUInputs(group_index=self.group_index, attention_mask=self.virtual_mask,
                         merged_length=self.merged_length, **kwargs)

    def full(self):
        """``E_full = M E`` with its mask and positions (what the unmodified model would see)."""
        c = self.embeds.shape[-1]
        e_full = self.embeds.gather(1, self.group_index[..., None].expand(-1, -1, c))
        return e_full, self.virtual_mask, (self.virtual_mask.cumsum(-1) - 1).clamp_min(0)

    def group_mean(self, virtual: torch.Tensor) -> torch.Tensor:
        """Average ``(B, L, C)`` virtual rows over each group -> ``(B, L_m, C)`` (padding ignored)."""
        b, _, c = virtual.shape
        w = self.virtual_mask[..., None].to(virtual.dtype)
        idx = self.group_index[..., None].expand(-1, -1, c)
        total = virtual.new_zeros(b, self.merged_length, c).scatter_add_(1, idx, virtual * w)
        count = virtual.new_zeros(b, self.merged_length, 1).scatter_add_(1, self.group_index[..., None], w)
        return total / count.clamp_min(1)


def _layout(specs, seed: int = 0, identity: bool = False) -> Layout:
    """``specs``: per sample ``(prefix, image positions, image groups, suffix)``."""
    g = torch.Generator().manual_seed(seed)
    groups, merged_lengths = [], []
    for prefix, n_img, n_groups, suffix in specs:
        if identity:
            n_groups = n_img
        assign = torch.cat([torch.arange(n_groups), torch.randint(0, n_groups, (n_img - n_groups,), generator=g)])
        assign = assign[torch.randperm(n_img, generator=g)]
        # relabel groups by first appearance (raster order, as llava builds them)
        first = {int(a): None for a in assign}
        relabel = {old: new for new, old in enumerate(first)}
        assign = torch.tensor([relabel[int(a)] for a in assign], dtype=torch.long)
        gi = torch.cat([
            torch.arange(prefix),
            prefix + assign,
            prefix + n_groups + torch.arange(suffix),
        ])
        groups.append(gi)
        merged_lengths.append(prefix + n_groups + suffix)
    bsz, lm, length = len(specs), max(merged_lengths), max(len(x) for x in groups)
    group_index = torch.zeros(bsz, length, dtype=torch.long)
    virtual_mask = torch.zeros(bsz, length, dtype=torch.long)
    mask = torch.zeros(bsz, lm, dtype=torch.long)
    for b, (gi, n) in enumerate(zip(groups, merged_lengths)):
        group_index[b, length - len(gi):] = gi + (lm - n)
        virtual_mask[b, length - len(gi):] = 1
        mask[b, lm - n:] = 1
    embeds = torch.randn(bsz, lm, WIDTH, generator=g)
    vpos = (virtual_mask.cumsum(-1) - 1).clamp_min(0)
    big = torch.iinfo(torch.long).max
    first_pos = torch.full((bsz, lm), big).scatter_reduce_(1, group_index, vpos.masked_fill(virtual_mask == 0, big),
                                                           reduce="amin")
    positions = first_pos.masked_fill(mask == 0, 0)
    return Layout(embeds, mask, positions, group_index, virtual_mask)


MERGED = [(3, 20, 6, 4), (2, 14, 9, 2)]  # two samples of different lengths -> left padding in both views


def _valid(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return t[mask.bool()]


# --------------------------------------------------------------------------- no merging == unpatched


def test_identity_groups_reproduce_unpatched(attn):
    model = _model(attn)
    lay = _layout(MERGED, identity=True)
    assert lay.group_index.shape == lay.mask.shape and not lay.mask.all()
    with torch.no_grad():
        ref = model(inputs_embeds=lay.embeds, attention_mask=lay.mask, position_ids=lay.positions).logits
        dymu.apply_vtu(model)
        out = model(inputs_embeds=lay.embeds, attention_mask=lay.mask, position_ids=lay.positions, vtu=lay.vtu()).logits
    assert out.shape == ref.shape
    torch.testing.assert_close(_valid(out, lay.mask), _valid(ref, lay.mask), rtol=0, atol=1e-5)


def test_without_vtu_patched_equals_unpatched_and_remove_restores(attn):
    model = _model(attn)
    lay = _layout(MERGED)
    classes = {name: type(m) for name, m in model.named_modules()}
    keys = list(model.state_dict())
    kwargs = dict(inputs_embeds=lay.embeds, attention_mask=lay.mask)
    with torch.no_grad():
        ref = model(**kwargs).logits
        dymu.apply_vtu(model)
        assert type(model) is not classes[""]
        assert type(model.model.layers[0].self_attn) is not classes["model.layers.0.self_attn"]
        assert list(model.state_dict()) == keys
        out = model(**kwargs).logits
        dymu.remove(model)
        assert {name: type(m) for name, m in model.named_modules()} == classes
        assert not any(hasattr(m, "_dymu_original_class") for m in model.modules())
        after = model(**kwargs).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(after, ref, rtol=0, atol=0)


# --------------------------------------------------------------------------- real merges


def test_expand_equals_exact(attn):
    model = dymu.apply_vtu(_model(attn))
    lay = _layout(MERGED, seed=1)
    with torch.no_grad():
        fast = model(inputs_embeds=lay.embeds, attention_mask=lay.mask, vtu=lay.vtu()).logits
        exact = model(inputs_embeds=lay.embeds, attention_mask=lay.mask, vtu=lay.vtu(mode="exact")).logits
        identity = model(inputs_embeds=lay.embeds, attention_mask=lay.mask, position_ids=lay.positions).logits
    assert lay.vtu().counts.max() > 1
    torch.testing.assert_close(_valid(fast, lay.mask), _valid(exact, lay.mask), rtol=0, atol=1e-5)
    assert (_valid(fast, lay.mask) - _valid(identity, lay.mask)).abs().max() > 1e-3  # VTU really acted


def test_batch_equals_single(attn):
    model = dymu.apply_vtu(_model(attn))
    lay = _layout(MERGED, seed=2)
    with torch.no_grad():
        batch = model(inputs_embeds=lay.embeds, attention_mask=lay.mask, vtu=lay.vtu()).logits
        for b in range(len(MERGED)):
            # the same sample alone: its rows of the batch layout, without the padding
            n = int(lay.mask[b].sum())
            length = int(lay.virtual_mask[b].sum())
            gi = lay.group_index[b:b + 1, -length:] - (lay.merged_length - n)
            v = VTUInputs(group_index=gi, attention_mask=torch.ones(1, length, dtype=torch.long), merged_length=n)
            single = model(inputs_embeds=lay.embeds[b:b + 1, -n:], vtu=v).logits
            torch.testing.assert_close(single[0], batch[b, -n:], rtol=0, atol=1e-5)


def test_padding_positions_may_point_anywhere(attn):
    """``VTUInputs`` documents that padding slots of ``group_index`` may point anywhere."""
    model = dymu.apply_vtu(_model(attn))
    lay = _layout(MERGED, seed=3)
    pointing = lay.group_index.clone()
    pointing[lay.virtual_mask == 0] = lay.merged_length - 1  # a real (text) group of every sample
    v = VTUInputs(group_index=pointing, attention_mask=lay.virtual_mask, merged_length=lay.merged_length)
    with torch.no_grad():
        ref = model(inputs_embeds=lay.embeds, attention_mask=lay.mask, vtu=lay.vtu()).logits
        out = model(inputs_embeds=lay.embeds, attention_mask=lay.mask, vtu=v).logits
    assert torch.isfinite(_valid(out, lay.mask)).all()
    torch.testing.assert_close(_valid(out, lay.mask), _valid(ref, lay.mask), rtol=0, atol=1e-5)


def test_duplicated_tokens_first_layer_is_exact(attn):
    """Full sequence ``E_full = M E``: layer-1 attention outputs averaged per group == VTU's."""
    full_model = _model(attn)
    vtu_model = dymu.apply_vtu(_model(attn))
    lay = _layout(MERGED, seed=4)
    e_full, vmask, vpos = lay.full()
    seen = {}
    full_model.model.layers[0].self_attn.register_forward_hook(lambda m, a, o: seen.__setitem__("full", o[0]))
    vtu_model.model.layers[0].self_attn.register_forward_hook(lambda m, a, o: seen.__setitem__("vtu", o[0]))
    with torch.no_grad():
        full_model(inputs_embeds=e_full, attention_mask=vmask, position_ids=vpos)
        vtu_model(inputs_embeds=lay.embeds, attention_mask=lay.mask, vtu=lay.vtu())
    assert seen["full"].shape[1] == e_full.shape[1] and seen["vtu"].shape[1] == lay.merged_length
    expected = lay.group_mean(seen["full"])
    torch.testing.assert_close(_valid(seen["vtu"], lay.mask), _valid(expected, lay.mask), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- generate


def _greedy(model, max_new_tokens: int = 8, **kwargs):
    return model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                          output_logits=True, return_dict_in_generate=True)


def test_generate_identity_equals_unpatched(attn):
    model = _model(attn)
    lay = _layout(MERGED, identity=True, seed=5)
    kwargs = dict(inputs_embeds=lay.embeds, attention_mask=lay.mask, position_ids=lay.positions)
    with torch.no_grad():
        ref = _greedy(model, **kwargs)
        dymu.apply_vtu(model)
        out = _greedy(model, **kwargs, vtu=lay.vtu())
    assert out.sequences.shape == (2, 8)
    assert torch.equal(out.sequences, ref.sequences)
    for step_out, step_ref in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(step_out, step_ref, rtol=0, atol=1e-5)


def test_generate_one_layer_duplicates_equals_full_sequence(attn):
    """One layer: K/V of every virtual position equal the full model's, so prefill and decode are exact."""
    model = _model(attn, layers=1, seed=6)
    lay = _layout(MERGED, seed=6)
    e_full, vmask, vpos = lay.full()
    with torch.no_grad():
        ref = _greedy(model, inputs_embeds=e_full, attention_mask=vmask, position_ids=vpos)
        dymu.apply_vtu(model)
        out = _greedy(model, inputs_embeds=lay.embeds, attention_mask=lay.mask, position_ids=lay.positions,
                      vtu=lay.vtu())
    assert lay.vtu().counts.max() > 1
    torch.testing.assert_close(out.logits[0], ref.logits[0], rtol=0, atol=1e-5)  # first generated token
    assert torch.equal(out.sequences, ref.sequences)
    for step_out, step_ref in zip(out.logits, ref.logits, strict=True):  # and every decode step
        torch.testing.assert_close(step_out, step_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cache", ["merged", "expanded"])
def test_generate_without_position_ids_continues_each_sample_at_its_own_length(attn, cache):
    """Issue 12 item 6: ``generate`` without ``position_ids`` on a left-padded batch. The expanded cache placed the
    decode steps at the padded length + t (logits off by up to ~5); each sample must continue at its own virtual
    length, as the unmodified model on the full sequence does (it derives positions from its mask)."""
    model = _model(attn, layers=2, seed=18)
    lay = _layout(MERGED, seed=18)
    e_full, vmask, _ = lay.full()
    assert (vmask == 0).any()  # a left-padded sample
    with torch.no_grad():
        ref = _greedy(model, inputs_embeds=e_full, attention_mask=vmask, max_new_tokens=6)
        dymu.apply_vtu(model)
        out = _greedy(model, inputs_embeds=lay.embeds, attention_mask=lay.mask, vtu=lay.vtu(cache=cache),
                      max_new_tokens=6)
    assert torch.equal(out.sequences, ref.sequences)
    for step_out, step_ref in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(step_out, step_ref, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- merged KV cache


def test_merged_cache_generates_like_expanded_cache_for_20_steps(attn):
    """Issue 5 item 3: merged K (before RoPE) / V (aggregated per group) == the expanded cache, 20 greedy steps."""
    model = dymu.apply_vtu(_model(attn, layers=2, seed=11))
    lay = _layout(MERGED, seed=11)
    kwargs = dict(inputs_embeds=lay.embeds, attention_mask=lay.mask, position_ids=lay.positions, max_new_tokens=20)
    with torch.no_grad():
        expanded = _greedy(model, **kwargs, vtu=lay.vtu(cache="expanded"))
        merged = _greedy(model, **kwargs, vtu=lay.vtu(cache="merged"))
    from dymu.patch.cache import MergedKVLayer

    assert lay.vtu().counts.max() > 1
    assert isinstance(output_cache(merged).layers[0], MergedKVLayer)
    assert not isinstance(output_cache(expanded).layers[0], MergedKVLayer)
    assert torch.equal(merged.sequences, expanded.sequences)
    assert len(merged.logits) == 20
    for step_merged, step_expanded in zip(merged.logits, expanded.logits, strict=True):
        torch.testing.assert_close(step_merged, step_expanded, rtol=0, atol=1e-4)


def test_merged_cache_holds_merged_rows_only(attn):
    """After prefill each layer keeps L_m rows, the expanded cache L: bytes scale with the merged length."""
    from transformers import DynamicCache

    from dymu.patch.cache import MergedKVLayer, kv_cache_bytes

    model = dymu.apply_vtu(_model(attn, seed=12))
    lay = _layout(MERGED, seed=12)
    sizes = {}
    with torch.no_grad():
        for cache in ("merged", "expanded"):
            past = DynamicCache(config=model.config)
            model(inputs_embeds=lay.embeds, attention_mask=lay.mask, position_ids=lay.positions,
                  past_key_values=past, use_cache=True, vtu=lay.vtu(cache=cache))
            sizes[cache] = past
    merged, expanded = sizes["merged"], sizes["expanded"]
    assert all(isinstance(layer, MergedKVLayer) for layer in merged.layers)
    assert not any(isinstance(layer, MergedKVLayer) for layer in expanded.layers)
    assert merged.layers[0].keys.shape[2] == lay.merged_length < expanded.layers[0].keys.shape[2] == lay.group_index.shape[1]
    kv_merged = sum(layer.keys.nbytes + layer.values.nbytes for layer in merged.layers)
    kv_expanded = sum(layer.keys.nbytes + layer.values.nbytes for layer in expanded.layers)
    assert kv_merged * lay.group_index.shape[1] == kv_expanded * lay.merged_length
    layout = sum(t.nbytes for t in merged.layers[0].prompt.tensors())  # shared once by all layers
    assert kv_cache_bytes(merged) == kv_merged + layout
    assert kv_cache_bytes(expanded) == kv_expanded


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_given_cache_is_the_one_decode_steps_fill_and_read(attn, keyword):
    """Issue 12: a cache passed as ``cache=`` (transformers >= 5.24) or ``past_key_values=`` (before) is filled by
    the prefill and read by the decode step, on either release; none is dropped for a fresh one.

    Fails if the patches drop the cache: the decode step would then see an empty cache (an error, or the logits
    of a prompt-less step), the given cache would not grow, and zeroing its values would change nothing."""
    from transformers import DynamicCache

    from dymu.patch.cache import MergedKVLayer

    model = dymu.apply_vtu(_model(attn, seed=15))
    lay = _layout(MERGED, seed=15)
    new = torch.randint(0, 128, (2, 1), generator=torch.Generator().manual_seed(15))
    next_pos = lay.virtual_mask.sum(-1, keepdim=True)
    mask = torch.cat([lay.mask, torch.ones(2, 1, dtype=torch.long)], dim=1)

    def prefill(cache_layout: str) -> DynamicCache:
        past = DynamicCache(config=model.config)
        model(inputs_embeds=lay.embeds, attention_mask=lay.mask, position_ids=lay.positions, use_cache=True,
              vtu=lay.vtu(cache=cache_layout), **{keyword: past})
        return past

    def step(past: DynamicCache, cache_layout: str) -> torch.Tensor:
        return model(input_ids=new, attention_mask=mask, position_ids=next_pos, use_cache=True,
                     vtu=lay.vtu(cache=cache_layout), **{keyword: past}).logits

    with torch.no_grad():
        merged, expanded, emptied = prefill("merged"), prefill("expanded"), prefill("merged")
        assert all(isinstance(layer, MergedKVLayer) for layer in merged.layers)
        assert merged.get_seq_length() == lay.merged_length
        assert expanded.get_seq_length() == lay.group_index.shape[1]
        for layer in emptied.layers:
            layer.values.zero_()
        logits = step(merged, "merged")
        reference = step(expanded, "expanded")
        perturbed = step(emptied, "merged")
    assert merged.get_seq_length() == lay.merged_length + 1  # the decode row went into the given cache
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-4)
    assert (logits - perturbed).abs().max() > 1e-2  # the decode step read the prompt's values from that cache


def test_two_different_caches_are_refused(attn):
    """``cache=`` and ``past_key_values=`` naming two caches: the host would keep one and drop the other silently."""
    from transformers import DynamicCache

    model = dymu.apply_vtu(_model(attn, seed=16))
    lay = _layout(MERGED, seed=16)
    with pytest.raises(ValueError, match="two different caches"):
        model(inputs_embeds=lay.embeds, attention_mask=lay.mask, position_ids=lay.positions, use_cache=True,
              vtu=lay.vtu(), cache=DynamicCache(config=model.config),
              past_key_values=DynamicCache(config=model.config))


def test_generate_fills_the_cache_it_was_given(attn):
    """``generate(..., <host cache keyword>=cache)`` with VTU: the merged cache is the given object, grown by every
    decode step (L_m + new tokens - 1 rows: the last token is not fed back)."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import LlamaModel

    from dymu.patch.cache import MergedKVLayer
    from dymu.patch._host import cache_keyword

    model = dymu.apply_vtu(_model(attn, seed=17))
    lay = _layout(MERGED, seed=17)
    past = DynamicCache(config=model.config)
    with torch.no_grad():
        out = _greedy(model, inputs_embeds=lay.embeds, attention_mask=lay.mask, position_ids=lay.positions,
                      vtu=lay.vtu(), max_new_tokens=5, **{cache_keyword(LlamaModel.forward): past})
    assert output_cache(out) is past
    assert all(isinstance(layer, MergedKVLayer) for layer in past.layers)
    assert past.get_seq_length() == lay.merged_length + 5 - 1


def test_merged_cache_multi_token_continuation_equals_expanded(attn):
    """A second forward of 3 tokens at once over the cache (causal among them) matches the expanded cache."""
    from transformers import DynamicCache

    model = dymu.apply_vtu(_model(attn, seed=13))
    lay = _layout(MERGED, seed=13)
    new = torch.randint(0, 128, (2, 3), generator=torch.Generator().manual_seed(13))
    next_pos = lay.virtual_mask.sum(-1, keepdim=True) + torch.arange(3)
    logits = {}
    with torch.no_grad():
        for cache in ("merged", "expanded"):
            past, vtu = DynamicCache(config=model.config), lay.vtu(cache=cache)
            model(inputs_embeds=lay.embeds, attention_mask=lay.mask, position_ids=lay.positions,
                  past_key_values=past, use_cache=True, vtu=vtu)
            mask = torch.cat([lay.mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
            logits[cache] = model(input_ids=new, attention_mask=mask, position_ids=next_pos, past_key_values=past,
                                  use_cache=True, vtu=vtu).logits
    torch.testing.assert_close(logits["merged"], logits["expanded"], rtol=0, atol=1e-4)


def test_merged_cache_beam_search_equals_expanded(attn):
    """Beam search reorders and repeats cache rows; the merged cache's layout follows them."""
    model = dymu.apply_vtu(_model(attn, seed=14))
    lay = _layout(MERGED, seed=14)
    kwargs = dict(inputs_embeds=lay.embeds, attention_mask=lay.mask, position_ids=lay.positions, max_new_tokens=6,
                  num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expanded = model.generate(**kwargs, vtu=lay.vtu(cache="expanded"))
        merged = model.generate(**kwargs, vtu=lay.vtu(cache="merged"))
    assert torch.equal(merged, expanded)


# --------------------------------------------------------------------------- bad inputs


def test_group_index_out_of_range_raises_value_error(attn):
    model = dymu.apply_vtu(_model(attn))
    lay = _layout(MERGED, seed=7)
    for bad_value in (lay.merged_length, -1):
        bad = lay.group_index.clone()
        bad[0, -3] = bad_value
        with pytest.raises(ValueError, match="group_index"):
            v = VTUInputs(group_index=bad, attention_mask=lay.virtual_mask, merged_length=lay.merged_length)
            model(inputs_embeds=lay.embeds, attention_mask=lay.mask, vtu=v)


def test_merged_length_mismatch_raises_value_error(attn):
    model = dymu.apply_vtu(_model(attn))
    lay = _layout(MERGED, seed=8)
    with pytest.raises(ValueError, match="merged"):
        model(inputs_embeds=lay.embeds[:, 1:], attention_mask=lay.mask[:, 1:], vtu=lay.vtu())


def test_qwen2_sliding_window_layers_identity(attn):
    """Qwen2 layers with a sliding window shorter than the prompt: all-size-1 groups still equal the host."""
    if not attn.startswith("qwen2"):
        pytest.skip("sliding windows are a Qwen2 feature")
    torch.manual_seed(3)
    config = Qwen2Config(hidden_size=WIDTH, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=128, use_sliding_window=True, sliding_window=5,
                         max_window_layers=1, attn_implementation=attn.split("-")[1])
    assert "sliding_attention" in config.layer_types
    model = Qwen2ForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        dymu.apply_vtu(model)
        vtu = VTUInputs(group_index=torch.arange(12).expand(2, 12), attention_mask=mask, merged_length=12)
        out = model(input_ids=ids, attention_mask=mask, vtu=vtu).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)
