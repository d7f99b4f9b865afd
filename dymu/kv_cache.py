"""Merged KV cache for VTU: the cache scales with the merged length ``L_m``, not the virtual length ``L``.

The simple VTU cache stores the expanded, rotated K and V of all ``L`` virtual prompt positions, so it is as
large as the unmodified model's. Both can be kept merged (``docs/dymu-method.md`` Sec. 3):

- **V merged, exactly**: ``o = sum_p' P[p'] v_{g(p')} = sum_b (sum_{p' in G_b} P[p']) v_b``; the attention
  probabilities of each key group are summed, then multiplied by the ``L_m`` merged values.
- **K merged and before RoPE**, with the group map and the RoPE tables of the virtual positions; logits are
  formed at the virtual positions when read (each member of a group sits at its own position, so a merged key
  has one rotation per member): by expanding and rotating the keys, or by the RoPE frequency decomposition
  (:func:`prompt_logits`).

Decode tokens are ordinary (groups of size 1) and are stored after the prompt, rotated, as in any cache.

Shapes: B batch, H query heads, H_kv key/value heads, D head dim, L virtual prompt length, L_m merged prompt
length, S decode tokens cached so far (current step included), T query tokens of the current step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .vtu import expand

__all__ = ["VirtualPrompt", "MergedKVLayer", "prompt_logits", "merged_decode_attention", "kv_cache_bytes"]


@dataclass
class VirtualPrompt:
    """The virtual layout of a cached prompt, shared by every :class:`MergedKVLayer` of one cache.

    Attributes:
        group_index: ``(B, L)`` long, merged slot of each virtual position.
        attention_mask: ``(B, L)`` bool, real virtual positions.
        rope: ``(B, L, D)`` ``[cos | sin]`` of the RoPE frequencies at the virtual positions (model dtype): the
            first halves of the host's ``rotate_half``-layout tables (``cos = [c, c]``, ``sin = [s, s]``).
    """

    group_index: torch.Tensor
    attention_mask: torch.Tensor
    rope: torch.Tensor

    @classmethod
    def from_host(cls, group_index: torch.Tensor, attention_mask: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> VirtualPrompt:
        """From the host's ``(B, L, D)`` RoPE tables (``rotate_half`` layout: both halves equal)."""
        half = cos.shape[-1] // 2
        return cls(group_index, attention_mask.bool(), torch.cat([cos[..., :half], sin[..., :half]], dim=-1))

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The host's ``(B, L, D)`` ``cos``, ``sin`` tables."""
        c, s = self.rope.chunk(2, dim=-1)
        return torch.cat([c, c], dim=-1), torch.cat([s, s], dim=-1)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> VirtualPrompt:
        """A copy with ``fn`` applied along the batch dimension of every field (beam search, batch selection)."""
        return VirtualPrompt(fn(self.group_index), fn(self.attention_mask), fn(self.rope))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """All fields (for memory accounting)."""
        return self.group_index, self.attention_mask, self.rope


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


def prompt_logits(q: torch.Tensor, layer: MergedKVLayer, method: str = "auto") -> torch.Tensor:
    """Unscaled logits of queries against the ``L`` virtual prompt keys of a merged cache.

    Two exact ways, chosen by the cost of the rows they expand to ``L``:

    - ``"keys"``: expand the merged keys to the virtual positions and rotate them there
      (``k cos + rotate_half(k) sin``, the host's arithmetic); ``H_kv`` rows per position.
    - ``"frequency"``: per query and merged key, ``alpha_i = q1 k1 + q2 k2`` and ``beta_i = q2 k1 - q1 k2`` per
      RoPE frequency ``i < D/2``; the logit at virtual position ``p`` is ``sum_i alpha_i c_i(p) + beta_i s_i(p)``
      (``docs/dymu-method.md`` Sec. 3), one ``index_select`` and one ``bmm``; ``H * T`` rows per position.

    ``"auto"`` takes ``"frequency"`` when ``H * T <= 2 * H_kv`` (multi-head or mild GQA decode steps, e.g.
    Llama-7B), else ``"keys"`` (e.g. Qwen2's 7 query heads per KV head): fewer passes over ``L``-row tensors.

    Args:
        q: ``(B, H, T, D)`` queries after RoPE (at their own positions).
        layer: the merged cache layer.
        method: ``"auto"``, ``"keys"`` or ``"frequency"``.

    Returns:
        ``(B, H_kv, rep * T, L)`` float logits (``rep = H / H_kv``; query heads sharing a KV head side by side).

    Raises:
        ValueError: unknown ``method``.
    """
    b, h, t, d = q.shape
    lm, h_kv, prompt = layer.merged_length, layer.keys.shape[1], layer.prompt
    length = prompt.group_index.shape[1]
    if method == "auto":
        method = "frequency" if h * t <= 2 * h_kv else "keys"
    if method == "keys":
        keys = layer.keys[:, :, :lm]  # per sample: index_select on the cache layout, no copy of the rows first
        k = torch.stack([keys[i].index_select(1, prompt.group_index[i]) for i in range(b)])  # (B, H_kv, L, D)
        cos, sin = prompt.cos_sin()
        k = k * cos[:, None] + torch.cat([-k[..., d // 2 :], k[..., : d // 2]], dim=-1) * sin[:, None]
        return (q.reshape(b, h_kv, -1, d) @ k.transpose(-1, -2)).float()
    if method != "frequency":
        raise ValueError(f"prompt_logits method must be 'auto', 'keys' or 'frequency', got {method!r}.")
    half = d // 2
    k = layer.keys[:, :, :lm]
    if h != h_kv:
        k = k.repeat_interleave(h // h_kv, dim=1)
    q = q[:, :, :, None]  # (B, H, T, 1, D)
    k = k[:, :, None]  # (B, H, 1, L_m, D)
    q1, q2, k1, k2 = q[..., :half], q[..., half:], k[..., :half], k[..., half:]
    ab = torch.cat([q1 * k1 + q2 * k2, q2 * k1 - q1 * k2], dim=-1)  # (B, H, T, L_m, D)
    ab = expand(ab.permute(0, 3, 1, 2, 4).reshape(b, lm, h * t, d), prompt.group_index)  # (B, L, H*T, D)
    logits = torch.bmm(ab.view(b * length, h * t, d), prompt.rope.reshape(b * length, d, 1).to(ab.dtype))
    return logits.view(b, length, h_kv, -1).permute(0, 2, 3, 1).float()  # (B, H_kv, rep*T, L)


def merged_decode_attention(
    q: torch.Tensor,
    layer: MergedKVLayer,
    bias: torch.Tensor,
    scaling: float,
    method: str = "auto",
) -> torch.Tensor:
    """Attention of decode tokens over a merged cache, V aggregated per key group (exact).

    Logits over the ``L`` virtual prompt positions (:func:`prompt_logits`) and the ``S`` decode rows; softmax in
    float32; the prompt probabilities are summed per group and multiplied by the ``L_m`` merged values
    (``docs/dymu-method.md`` Sec. 3), the decode ones by their own values (in the values' dtype, as the host's
    eager attention does).

    Args:
        q: ``(B, H, T, D)`` queries after RoPE.
        layer: the cache layer, already updated with this step's rows.
        bias: ``(B, T, L + S)`` float32 additive mask (0 allowed, ``finfo.min`` for padding / future keys).
        scaling: logit scale.
        method: see :func:`prompt_logits`.

    Returns:
        ``(B, T, H, D)`` in ``q.dtype``.
    """
    b, h, t, d = q.shape
    lm = layer.merged_length
    h_kv = layer.keys.shape[1]
    tail_k, tail_v = layer.keys[:, :, lm:], layer.values[:, :, lm:]  # (B, H_kv, S, D)
    logits = torch.cat([prompt_logits(q, layer, method), (q.reshape(b, h_kv, -1, d) @ tail_k.transpose(-1, -2)).float()],
                       dim=-1) * scaling  # (B, H_kv, rep*T, L + S)
    logits = (logits.view(b, h_kv, -1, t, logits.shape[-1]) + bias[:, None, None]).view_as(logits)
    probs = logits.softmax(-1)
    length = layer.prompt.group_index.shape[1]
    index = layer.prompt.group_index[:, None, None, :].expand(b, h_kv, probs.shape[2], length)
    grouped = probs.new_zeros(b, h_kv, probs.shape[2], lm).scatter_add_(-1, index, probs[..., :length])
    values = layer.values[:, :, :lm]
    out = grouped.to(values.dtype) @ values + probs[..., length:].to(tail_v.dtype) @ tail_v  # (B, H_kv, rep*T, D)
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
