"""Merged KV cache for VTU: the cache scales with the merged length ``L_m``, not the virtual length ``L``.

The simple VTU cache stores the expanded, rotated K and V of all ``L`` virtual prompt positions, so it is as
large as the unmodified model's. Both can be kept merged (``docs/dymu-method.md`` Sec. 3):

- **V merged, exactly**: ``o = sum_p' P[p'] v_{g(p')} = sum_b (sum_{p' in G_b} P[p']) v_b``; the attention
  probabilities of each key group are summed, then multiplied by the ``L_m`` merged values.
- **K merged**: a singleton group's key has one position, so it is stored rotated there and read like any
  cached key; a multi-member group's key is stored before RoPE, with the group map and the RoPE tables of its
  members' positions, and its logits are formed at those positions when read (one rotation per member): by
  expanding and rotating the keys, or by the RoPE frequency decomposition (:func:`virtual_logits`). Decode
  cost thus scales with the rows plus the members of multi-member groups, not with ``L_m + L``.

Decode tokens are ordinary (groups of size 1) and are stored after the prompt, rotated, as in any cache.

This module holds the kernels only: pure functions of tensors (and of :class:`VirtualPrompt`, a dataclass of
tensors), importing nothing but torch. The transformers cache layer that keeps the rows and calls them is
:class:`dymu.patch.cache.MergedKVLayer` (host glue).

Shapes: B batch, H query heads, H_kv key/value heads, D head dim, L virtual prompt length, L_m merged prompt
length, S decode tokens cached so far (current step included), T query tokens of the current step, G multi-member
groups and P their virtual positions (padded over the batch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from .vtu import expand

__all__ = ["VirtualPrompt", "rotate_singletons", "virtual_logits", "decode_bias", "merged_decode_attention"]


def _rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """The host's RoPE arithmetic (``x cos + rotate_half(x) sin``) with ``rope = [cos half | sin half]``.

    Args:
        x: ``(B, H, N, D)``. rope: ``(B, N, D)``.
    """
    half = x.shape[-1] // 2
    c, s = rope.chunk(2, dim=-1)
    cos, sin = torch.cat([c, c], dim=-1)[:, None], torch.cat([s, s], dim=-1)[:, None]
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@dataclass
class VirtualPrompt:
    """The virtual layout of a cached prompt, shared by every layer of one merged cache
    (:class:`dymu.patch.cache.MergedKVLayer`).

    Merged rows fall in three kinds: **singletons** (one virtual position: most rows at high token counts),
    **multi-member groups**, and padding. A singleton's key has one rotation, so the cache stores it rotated
    and decode reads it like any cached key; only the positions of multi-member groups need their logits
    formed at the virtual positions (:func:`virtual_logits`).

    Attributes:
        group_index: ``(B, L)`` long, merged row of each virtual position.
        attention_mask: ``(B, L)`` bool, real virtual positions.
        row_rope: ``(B, L_m, D)`` the rotation each merged row is stored with, as ``[cos | sin]`` halves of the
            host's ``rotate_half``-layout tables (``cos = [c, c]``, ``sin = [s, s]``, model dtype): a singleton's
            position, the identity (``cos = 1, sin = 0``) for other rows.
        row_bias: ``(B, L_m)`` float32 additive decode mask of the stored rows: 0 for singletons, ``finfo.min``
            for multi-member and padding rows (those are read through their virtual positions).
        multi_rows: ``(B, G)`` long, the merged rows of the multi-member groups (padded with row 0).
        multi_index: ``(B, P)`` long, for each virtual position of a multi-member group, its group in ``[0, G)``.
        multi_rope: ``(B, P, D)`` ``[cos | sin]`` at those positions.
        multi_bias: ``(B, P)`` float32, 0 for real positions, ``finfo.min`` for padding.
    """

    group_index: torch.Tensor
    attention_mask: torch.Tensor
    row_rope: torch.Tensor
    row_bias: torch.Tensor
    multi_rows: torch.Tensor
    multi_index: torch.Tensor
    multi_rope: torch.Tensor
    multi_bias: torch.Tensor

    @classmethod
    def from_host(cls, group_index: torch.Tensor, attention_mask: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, merged_length: int | None = None) -> VirtualPrompt:
        """From the host's ``(B, L, D)`` RoPE tables (``rotate_half`` layout: both halves equal).

        Args:
            group_index: ``(B, L)`` merged row of each virtual position.
            attention_mask: ``(B, L)`` real virtual positions.
            cos, sin: the host's tables at the virtual positions.
            merged_length: ``L_m`` (default: the largest row index + 1).
        """
        b, length = group_index.shape
        half = cos.shape[-1] // 2
        rope = torch.cat([cos[..., :half], sin[..., :half]], dim=-1)  # (B, L, D)
        mask = attention_mask.bool()
        lm = int(group_index.max()) + 1 if merged_length is None else int(merged_length)
        device = group_index.device
        members = torch.zeros(b, lm, dtype=torch.long, device=device).scatter_add_(1, group_index, mask.long())
        single = members == 1
        positions = torch.arange(length, device=device).expand(b, length)
        first = torch.zeros(b, lm, dtype=torch.long, device=device).scatter_add_(1, group_index, positions * mask)
        first = first.masked_fill(~single, 0)  # a singleton's one position (a sum of positions for others)
        identity = torch.cat([torch.ones_like(rope[:, :1, :half]), torch.zeros_like(rope[:, :1, :half])], dim=-1)
        row_rope = torch.where(single[..., None], rope.gather(1, first[..., None].expand(b, lm, rope.shape[-1])),
                               identity)
        minimum = torch.finfo(torch.float32).min
        row_bias = torch.zeros(b, lm, device=device).masked_fill_(~single, minimum)
        multi = members >= 2  # (B, L_m)
        in_multi = mask & multi.gather(1, group_index)  # (B, L)
        rows = [m.nonzero().flatten() for m in multi]
        spots = [m.nonzero().flatten() for m in in_multi]
        g, p = max(r.numel() for r in rows), max(q.numel() for q in spots)
        multi_rows = torch.zeros(b, g, dtype=torch.long, device=device)
        multi_index = torch.zeros(b, p, dtype=torch.long, device=device)
        multi_rope = rope.new_zeros(b, p, rope.shape[-1])
        multi_bias = torch.full((b, p), minimum, device=device)
        for i, (r, q) in enumerate(zip(rows, spots)):
            compact = torch.zeros(lm, dtype=torch.long, device=device)
            compact[r] = torch.arange(r.numel(), device=device)
            multi_rows[i, : r.numel()] = r
            multi_index[i, : q.numel()] = compact[group_index[i, q]]
            multi_rope[i, : q.numel()] = rope[i, q]
            multi_bias[i, : q.numel()] = 0.0
        return cls(group_index, mask, row_rope, row_bias, multi_rows, multi_index, multi_rope, multi_bias)

    @property
    def merged_length(self) -> int:
        """``L_m``, the merged prompt rows a cache layer stores first."""
        return self.row_bias.shape[1]

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> VirtualPrompt:
        """A copy with ``fn`` applied along the batch dimension of every field (beam search, batch selection)."""
        return VirtualPrompt(*(fn(t) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """All fields, in declaration order (for memory accounting and batch edits)."""
        return tuple(getattr(self, f.name) for f in fields(self))


def rotate_singletons(keys: torch.Tensor, prompt: VirtualPrompt) -> torch.Tensor:
    """The merged prompt keys as a merged cache stores them: each singleton row rotated at its one virtual
    position, the other rows (multi-member groups, padding) left before RoPE (identity rotation).

    Args:
        keys: ``(B, H_kv, L_m, D)`` the prefill's merged keys, before RoPE.
        prompt: their layout.

    Returns:
        ``(B, H_kv, L_m, D)`` in ``keys.dtype``.
    """
    return _rotate(keys, prompt.row_rope.to(keys.dtype))


def virtual_logits(q: torch.Tensor, keys: torch.Tensor, index: torch.Tensor, rope: torch.Tensor,
                   method: str = "auto") -> torch.Tensor:
    """Unscaled logits of queries against merged keys placed at virtual positions (each rotated there).

    Two exact ways, chosen by the cost of the rows they expand to ``P`` positions:

    - ``"keys"``: expand the keys to the positions and rotate them there (``k cos + rotate_half(k) sin``, the
      host's arithmetic); ``H_kv`` rows per position.
    - ``"frequency"``: per query and merged key, ``alpha_i = q1 k1 + q2 k2`` and ``beta_i = q2 k1 - q1 k2`` per
      RoPE frequency ``i < D/2``; the logit at position ``p`` is ``sum_i alpha_i c_i(p) + beta_i s_i(p)``
      (``docs/dymu-method.md`` Sec. 3), one ``index_select`` and one ``bmm``; ``H * T`` rows per position.

    ``"auto"`` takes ``"frequency"`` when ``H * T <= 2 * H_kv`` (multi-head or mild GQA decode steps, e.g.
    Llama-7B), else ``"keys"`` (e.g. Qwen2's 7 query heads per KV head): fewer passes over ``P``-row tensors.

    Args:
        q: ``(B, H, T, D)`` queries after RoPE (at their own positions).
        keys: ``(B, H_kv, G, D)`` merged keys before RoPE.
        index: ``(B, P)`` long, the key in ``[0, G)`` at each position.
        rope: ``(B, P, D)`` ``[cos | sin]`` halves at the positions (see :class:`VirtualPrompt`).
        method: ``"auto"``, ``"keys"`` or ``"frequency"``.

    Returns:
        ``(B, H_kv, rep * T, P)`` float logits (``rep = H / H_kv``; query heads sharing a KV head side by side).

    Raises:
        ValueError: unknown ``method``.
    """
    b, h, t, d = q.shape
    g, h_kv, length = keys.shape[2], keys.shape[1], index.shape[1]
    if method == "auto":
        method = "frequency" if h * t <= 2 * h_kv else "keys"
    if method == "keys":
        k = torch.stack([keys[i].index_select(1, index[i]) for i in range(b)])  # (B, H_kv, P, D)
        return (q.reshape(b, h_kv, -1, d) @ _rotate(k, rope.to(k.dtype)).transpose(-1, -2)).float()
    if method != "frequency":
        raise ValueError(f"virtual_logits method must be 'auto', 'keys' or 'frequency', got {method!r}.")
    half = d // 2
    if h != h_kv:
        keys = keys.repeat_interleave(h // h_kv, dim=1)
    q = q[:, :, :, None]  # (B, H, T, 1, D)
    k = keys[:, :, None]  # (B, H, 1, G, D)
    q1, q2, k1, k2 = q[..., :half], q[..., half:], k[..., :half], k[..., half:]
    ab = torch.cat([q1 * k1 + q2 * k2, q2 * k1 - q1 * k2], dim=-1)  # (B, H, T, G, D)
    ab = expand(ab.permute(0, 3, 1, 2, 4).reshape(b, g, h * t, d), index)  # (B, P, H*T, D)
    logits = torch.bmm(ab.view(b * length, h * t, d), rope.reshape(b * length, d, 1).to(ab.dtype))
    return logits.view(b, length, h_kv, -1).permute(0, 2, 3, 1).float()  # (B, H_kv, rep*T, P)


def decode_bias(prompt: VirtualPrompt, tail_allowed: torch.Tensor) -> torch.Tensor:
    """The ``(B, T, L_m + S + P)`` float32 additive mask :func:`merged_decode_attention` takes.

    Args:
        prompt: the cache's layout.
        tail_allowed: ``(B, T, S)`` bool, which decode rows each new token may see (padding, causality).
    """
    b, t, _ = tail_allowed.shape
    tail = torch.zeros(tail_allowed.shape, device=tail_allowed.device).masked_fill_(
        ~tail_allowed, torch.finfo(torch.float32).min)
    return torch.cat([prompt.row_bias[:, None].expand(b, t, -1), tail,
                      prompt.multi_bias[:, None].expand(b, t, -1)], dim=-1)


def merged_decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    prompt: VirtualPrompt,
    bias: torch.Tensor,
    scaling: float,
    method: str = "auto",
) -> torch.Tensor:
    """Attention of decode tokens over a merged cache, V aggregated per key group (exact).

    One matmul gives the logits of every cached row: singleton prompt rows (stored rotated) and decode rows are
    exact; multi-member rows are masked by ``bias`` and read instead at their virtual positions
    (:func:`virtual_logits`). Softmax in float32 over ``[rows, positions]``; the positions' probabilities are
    summed into their group's row (``docs/dymu-method.md`` Sec. 3: ``sum_b (sum_{p in G_b} P[p]) v_b``) and one
    matmul with the cached values gives the output (in the values' dtype, as the host's eager attention).
    With nothing merged this is the host's decode attention plus an empty position set.

    Args:
        q: ``(B, H, T, D)`` queries after RoPE.
        keys: ``(B, H_kv, L_m + S, D)`` the cached keys, this step's included: the merged prompt's rows as
            :func:`rotate_singletons` leaves them, then the decode rows (after RoPE).
        values: ``(B, H_kv, L_m + S, D)`` the cached values (merged prompt rows, then decode rows).
        prompt: the layout of the ``L_m`` prompt rows.
        bias: ``(B, T, L_m + S + P)`` from :func:`decode_bias`.
        scaling: logit scale.
        method: see :func:`virtual_logits`.

    Returns:
        ``(B, T, H, D)`` in ``q.dtype``.
    """
    b, h, t, d = q.shape
    lm = prompt.merged_length
    h_kv, rows = keys.shape[1], keys.shape[2]
    logits = (q.reshape(b, h_kv, -1, d) @ keys.transpose(-1, -2)).float()  # (B, H_kv, rep*T, L_m + S)
    n_multi = prompt.multi_index.shape[1]
    if n_multi:
        grouped = torch.stack([keys[i, :, :lm].index_select(1, prompt.multi_rows[i]) for i in range(b)])
        logits = torch.cat([logits, virtual_logits(q, grouped, prompt.multi_index, prompt.multi_rope, method)],
                           dim=-1)
    logits = logits * scaling
    logits = (logits.view(b, h_kv, -1, t, logits.shape[-1]) + bias[:, None, None]).view_as(logits)
    probs = logits.softmax(-1)
    weights = probs[..., :rows]
    if n_multi:
        target = prompt.multi_rows.gather(1, prompt.multi_index)  # (B, P) row of each position
        weights = weights.clone()
        weights[..., :lm].scatter_add_(-1, target[:, None, None].expand(b, h_kv, probs.shape[2], n_multi),
                                       probs[..., rows:])
    out = weights.to(values.dtype) @ values  # (B, H_kv, rep*T, D)
    return out.reshape(b, h, t, d).transpose(1, 2).to(q.dtype)
