"""Merged KV cache for VTU: the cache scales with the merged length ``L_m``, not the virtual length ``L``.

The simple VTU cache stores the expanded, rotated K and V of all ``L`` virtual prompt positions, so it is as
large as the unmodified model's. Both can be kept merged (``docs/dymu-method.md`` Sec. 3):

- **V merged, exactly**: ``o = sum_p' P[p'] v_{g(p')} = sum_b (sum_{p' in G_b} P[p']) v_b``; the attention
  probabilities of each key group are summed, then multiplied by the ``L_m`` merged values.
- **K merged and before RoPE**, with the group map and the RoPE tables of the virtual positions; the keys are
  expanded and rotated at their virtual positions when read (each member of a group sits at its own position,
  so a merged key has one rotation per member).

Decode tokens are ordinary (groups of size 1) and are stored after the prompt, rotated, as in any cache.

Shapes: B batch, H query heads, H_kv key/value heads, D head dim, L virtual prompt length, L_m merged prompt
length, S decode tokens cached so far (current step included), T query tokens of the current step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["VirtualPrompt", "MergedKVLayer", "merged_decode_attention", "kv_cache_bytes"]


@dataclass
class VirtualPrompt:
    """The virtual layout of a cached prompt, shared by every :class:`MergedKVLayer` of one cache.

    Attributes:
        group_index: ``(B, L)`` long, merged slot of each virtual position.
        attention_mask: ``(B, L)`` bool, real virtual positions.
        cos, sin: ``(B, L, D)`` the host's RoPE tables at the virtual positions (model dtype).
    """

    group_index: torch.Tensor
    attention_mask: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> VirtualPrompt:
        """A copy with ``fn`` applied along the batch dimension of every field (beam search, batch selection)."""
        return VirtualPrompt(fn(self.group_index), fn(self.attention_mask), fn(self.cos), fn(self.sin))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """All fields (for memory accounting)."""
        return self.group_index, self.attention_mask, self.cos, self.sin


class MergedKVLayer(DynamicLayer):
    """One decoder layer's merged KV cache (a transformers ``DynamicLayer``).

    ``keys`` / ``values`` are ``(B, H_kv, L_m + S, D)``: the first ``L_m`` rows are the merged prompt's keys
    **before RoPE** and its values; the ``S`` rows after them belong to decode tokens, keys after RoPE, as in
    an ordinary cache. ``get_seq_length()`` is ``L_m + S``, which is also the length of the 2-D attention mask
    ``generate`` keeps for merged inputs.

    Args:
        prompt: the virtual layout (shared between layers).
        merged_length: ``L_m``.
    """

    def __init__(self, prompt: VirtualPrompt, merged_length: int):
        super().__init__()
        self.prompt = prompt
        self.merged_length = merged_length

    @property
    def has_prompt(self) -> bool:
        """True once the prefill has stored the merged prompt."""
        return self.is_initialized and self.keys.shape[-2] >= self.merged_length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append K/V: the prefill's merged ``(B, H_kv, L_m, D)`` (keys before RoPE), then decode rows (rotated).

        Raises:
            ValueError: the first update is not ``L_m`` rows long.
        """
        if not self.has_prompt and key_states.shape[-2] != self.merged_length:
            raise ValueError(f"MergedKVLayer expects the {self.merged_length} merged prompt rows first, "
                             f"got {key_states.shape[-2]}.")
        return super().update(key_states, value_states)

    def prompt_keys_rotated(self, rotate_half: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Prompt keys expanded to the virtual positions and rotated there: ``(B, H_kv, L, D)``.

        Same arithmetic as the host's ``apply_rotary_pos_emb`` on the key (``k cos + rotate_half(k) sin``), so
        the result equals what the expanded cache would have stored.
        """
        k = self.keys[:, :, : self.merged_length]
        b, h, _, d = k.shape
        index = self.prompt.group_index[:, None, :, None].expand(b, h, self.prompt.group_index.shape[1], d)
        k = k.gather(2, index)
        return k * self.prompt.cos[:, None] + rotate_half(k) * self.prompt.sin[:, None]

    # batch / length edits keep the layout in step with the rows
    def crop(self, tokens_to_remove: int) -> None:
        """Drop decode rows from the end (``tokens_to_remove < 0``); the merged prompt cannot be cropped.

        Raises:
            ValueError: cropping would cut into the prompt.
        """
        if tokens_to_remove < 0 and self.is_initialized and self.keys.shape[-2] + tokens_to_remove < self.merged_length:
            raise ValueError("cannot crop a merged VTU cache into its prompt; use vtu cache='expanded'.")
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.prompt = self.prompt.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.prompt = self.prompt.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.prompt = self.prompt.map_batch(lambda t: t[indices])


def merged_decode_attention(
    q: torch.Tensor,
    layer: MergedKVLayer,
    allowed: torch.Tensor,
    scaling: float,
    rotate_half: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Attention of decode tokens over a merged cache, V aggregated per key group (exact).

    Logits are ``q . k`` over the ``L`` virtual prompt positions (keys rotated when read) and the ``S`` decode
    rows; softmax in float32; the prompt probabilities are summed per group and multiplied by the ``L_m``
    merged values (``docs/dymu-method.md`` Sec. 3), the decode ones by their own values.

    Args:
        q: ``(B, H, T, D)`` queries after RoPE.
        layer: the cache layer, already updated with this step's rows.
        allowed: ``(B, T, L + S)`` bool, which keys each query may see (padding and causality).
        scaling: logit scale.
        rotate_half: the host module's ``rotate_half``.

    Returns:
        ``(B, T, H, D)`` in ``q.dtype``.
    """
    b, h, t, d = q.shape
    lm = layer.merged_length
    h_kv = layer.keys.shape[1]
    rep = h // h_kv
    qg = q.reshape(b, h_kv, rep * t, d)  # GQA: query heads sharing a KV head side by side
    prompt_k = layer.prompt_keys_rotated(rotate_half)  # (B, H_kv, L, D)
    tail_k, tail_v = layer.keys[:, :, lm:], layer.values[:, :, lm:]  # (B, H_kv, S, D)
    logits = torch.cat([qg @ prompt_k.transpose(-1, -2), qg @ tail_k.transpose(-1, -2)], dim=-1).float() * scaling
    length = prompt_k.shape[2]
    mask = allowed[:, None, None].expand(b, h_kv, rep, t, allowed.shape[-1]).reshape(b, h_kv, rep * t, -1)
    probs = logits.masked_fill(~mask, torch.finfo(torch.float32).min).softmax(-1)  # (B, H_kv, rep*T, L + S)
    index = layer.prompt.group_index[:, None, None, :].expand(b, h_kv, rep * t, length)
    grouped = probs.new_zeros(b, h_kv, rep * t, lm).scatter_add_(-1, index, probs[..., :length])
    out = grouped @ layer.values[:, :, :lm].float() + probs[..., length:] @ tail_v.float()  # (B, H_kv, rep*T, D)
    return out.reshape(b, h, t, d).transpose(1, 2).to(q.dtype)


def kv_cache_bytes(cache: Cache) -> int:
    """Bytes held by a transformers cache: every layer's keys and values, plus (once) a merged cache's layout.

    Args:
        cache: a ``DynamicCache`` (plain or holding :class:`MergedKVLayer` s).

    Returns:
        Total bytes of the distinct tensors the cache keeps alive.
    """
    seen: dict[int, int] = {}
    for layer in cache.layers:
        tensors = [layer.keys, layer.values]
        if isinstance(layer, MergedKVLayer):
            tensors += list(layer.prompt.tensors())
        for tensor in tensors:
            if tensor is not None and tensor.numel():
                seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(seen.values())
