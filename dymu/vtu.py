"""Virtual Token Unmerging (VTU): expand / re-merge ops and the exact reference attention.

The LLM runs its per-token layers on the ``L_m`` merged tokens; attention sees the ``L`` virtual
(full-length) sequence ``E_full = M E`` with ``M[p, g(p)] = 1``. Method: DyMU Sec. 3.2 and
``docs/dymu-method.md`` Sec. 3.

Shapes:
    B batch, L virtual length (padded), L_m merged length (padded), H query heads, H_kv key/value heads,
    D head dim, C = H * D.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = ["VTUInputs", "expand", "remerge", "exact_attention"]


@dataclass
class VTUInputs:
    """What VTU attention needs for one prefill: the virtual layout of every sequence in the batch.

    Passed as the ``vtu=`` keyword through the model's forward (and ``generate``), never stored on
    modules.

    Attributes:
        group_index: ``(B, L)`` long, ``g(p)``: the merged slot (in ``[0, L_m)``) each virtual position
            belongs to. Text tokens are their own groups. Padding slots may point anywhere.
        attention_mask: ``(B, L)`` 0/1, real virtual positions (left or right padding).
        merged_length: ``L_m``, the padded length of the merged sequence fed to the model.
        position_ids: ``(B, L)`` long RoPE positions of the virtual sequence; by default
            ``cumsum(attention_mask) - 1`` (0 on padding), i.e. what the unmodified model uses.
        mode: ``"expand"`` (gather Q/K/V to ``L`` rows and call the host's attention kernel) or
            ``"exact"`` (the RoPE decomposition reference, slow; for tests).
        cache: KV cache layout for generation. ``"merged"`` (default): ``L_m`` merged rows per layer, keys
            before RoPE, rotated at the virtual positions when read, values aggregated per group
            (kernels: :mod:`dymu.kv_cache`; cache layer: :class:`dymu.patch.cache.MergedKVLayer`);
            ``"expanded"``: the ``L`` expanded, rotated rows, so decode steps run the host's attention unchanged
            (as large as the unmodified model's cache). Decoders with sliding-window layers always use
            ``"expanded"``.
    """

    group_index: torch.Tensor
    attention_mask: torch.Tensor
    merged_length: int
    position_ids: torch.Tensor | None = None
    mode: Literal["expand", "exact"] = "expand"
    cache: Literal["merged", "expanded"] = "merged"
    counts: torch.Tensor = field(init=False, repr=False)
    flat_index: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.group_index.ndim != 2 or self.group_index.shape != self.attention_mask.shape:
            raise ValueError(
                f"VTUInputs: group_index {tuple(self.group_index.shape)} and attention_mask "
                f"{tuple(self.attention_mask.shape)} must both be (B, L)."
            )
        if self.mode not in ("expand", "exact"):
            raise ValueError(f"VTUInputs.mode must be 'expand' or 'exact', got {self.mode!r}.")
        if self.cache not in ("merged", "expanded"):
            raise ValueError(f"VTUInputs.cache must be 'merged' or 'expanded', got {self.cache!r}.")
        self.group_index = self.group_index.long()
        self.check()
        if self.position_ids is None:
            self.position_ids = (self.attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        weights = self.attention_mask.to(torch.float32)
        counts = weights.new_zeros(self.group_index.shape[0], self.merged_length)
        self.counts = counts.scatter_add_(1, self.group_index, weights)  # (B, L_m) real members per group
        b, lm = self.group_index.shape[0], self.merged_length
        flat = self.group_index + torch.arange(b, device=self.group_index.device)[:, None] * lm
        self.flat_index = flat.masked_fill(self.attention_mask == 0, b * lm).reshape(-1)  # padding -> spare row

    def repeat_interleave(self, repeats: int) -> VTUInputs:
        """Each sample ``repeats`` times in a row (what ``generate`` does to inputs for beam search and
        ``num_return_sequences``)."""
        return VTUInputs(
            group_index=self.group_index.repeat_interleave(repeats, dim=0),
            attention_mask=self.attention_mask.repeat_interleave(repeats, dim=0),
            merged_length=self.merged_length,
            position_ids=self.position_ids.repeat_interleave(repeats, dim=0),
            mode=self.mode,
            cache=self.cache,
        )

    @property
    def virtual_length(self) -> int:
        """``L``."""
        return self.group_index.shape[1]

    def check(self) -> None:
        """Validate index ranges (one host sync; runs once, when the inputs are built).

        Raises:
            ValueError: a group index outside ``[0, merged_length)``.
        """
        if self.group_index.numel() == 0:
            return
        lo, hi = torch.stack([self.group_index.min(), self.group_index.max()]).tolist()
        if lo < 0 or hi >= self.merged_length:
            raise ValueError(f"VTUInputs.group_index must lie in [0, {self.merged_length}), found [{lo}, {hi}].")


def expand(x: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """Gather merged rows to virtual positions: ``out[b, p] = x[b, g(p)]`` (one flat ``index_select``; a
    broadcast ``gather`` index is about ten times slower on CPU).

    Args:
        x: ``(B, L_m, ...)`` merged rows (e.g. ``(B, L_m, C)`` projections).
        group_index: ``(B, L)``.

    Returns:
        ``(B, L, ...)``.
    """
    b, m = x.shape[:2]
    flat = (group_index + torch.arange(b, device=x.device)[:, None] * m).reshape(-1)
    return x.reshape(b * m, *x.shape[2:]).index_select(0, flat).view(b, group_index.shape[1], *x.shape[2:])


def remerge(out: torch.Tensor, vtu: VTUInputs) -> torch.Tensor:
    """Average virtual outputs over each group: ``o_j = (1 / n_j) * sum_{p in G_j} o_p``.

    Padding positions contribute nothing (they are summed into a discarded row); groups with no real member
    give 0. Accumulates in float32 (float64 for float64 inputs; ``index_add_``, no torch_scatter needed).

    Args:
        out: ``(B, L, C)`` attention outputs at virtual positions.
        vtu: the layout.

    Returns:
        ``(B, L_m, C)`` in ``out.dtype``.
    """
    b, length, c = out.shape
    lm = vtu.merged_length
    acc = torch.promote_types(out.dtype, torch.float32)  # float32 for half types, float64 stays float64
    summed = out.new_zeros(b * lm + 1, c, dtype=acc).index_add_(0, vtu.flat_index, out.reshape(b * length, c).to(acc))
    return (summed[:-1].view(b, lm, c) / vtu.counts.clamp_min(1.0)[..., None]).to(out.dtype)


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    vtu: VTUInputs,
    scaling: float,
) -> torch.Tensor:
    """Reference VTU attention by the RoPE decomposition, without expanding Q or K.

    For frequency ``i < D/2`` and merged tokens ``a, b``:
    ``alpha_i = q_a[i] k_b[i] + q_a[i+D/2] k_b[i+D/2]``, ``beta_i = q_a[i] k_b[i+D/2] - q_a[i+D/2] k_b[i]``;
    the virtual logit is ``sum_i alpha_i(g(p), g(p')) cos(theta_i (p - p')) + beta_i sin(theta_i (p - p'))``
    (times ``scaling``). Probabilities are summed per key group and multiplied by the merged ``v``, so V is
    never expanded (``docs/dymu-method.md`` Sec. 3). Materialises ``(B, H, L, L, D/2)``: tests only.

    Args:
        q: ``(B, H, L_m, D)`` merged queries before RoPE.
        k, v: ``(B, H_kv, L_m, D)`` merged keys (before RoPE) and values.
        cos, sin: ``(B, L, D)`` the host's RoPE tables at the virtual positions (``rotate_half`` layout,
            attention scaling included).
        vtu: the layout (causal + padding mask over virtual positions).
        scaling: logit scale (``D ** -0.5``).

    Returns:
        ``(B, L, H, D)`` attention output at every virtual position (before re-merging).
    """
    b, h, lm, d = q.shape
    dtype = q.dtype
    rep = h // k.shape[1]
    k = k.repeat_interleave(rep, dim=1).float()
    v = v.repeat_interleave(rep, dim=1).float()
    q = q.float()
    half = d // 2
    q1, q2, k1, k2 = q[..., :half], q[..., half:], k[..., :half], k[..., half:]
    alpha = q1[:, :, :, None] * k1[:, :, None] + q2[:, :, :, None] * k2[:, :, None]  # (B, H, Lm, Lm, D/2)
    beta = q1[:, :, :, None] * k2[:, :, None] - q2[:, :, :, None] * k1[:, :, None]
    g = vtu.group_index
    length = g.shape[1]
    bi = torch.arange(b, device=q.device)[:, None, None]
    alpha = alpha.permute(0, 2, 3, 1, 4)[bi, g[:, :, None], g[:, None, :]]  # (B, L, L, H, D/2)
    beta = beta.permute(0, 2, 3, 1, 4)[bi, g[:, :, None], g[:, None, :]]
    c, s = cos[..., :half].float(), sin[..., :half].float()  # (B, L, D/2)
    cos_diff = c[:, :, None] * c[:, None] + s[:, :, None] * s[:, None]  # cos(theta (p - p')) (B, L, L, D/2)
    sin_diff = s[:, :, None] * c[:, None] - c[:, :, None] * s[:, None]  # sin(theta (p - p'))
    logits = (alpha * cos_diff[:, :, :, None] + beta * sin_diff[:, :, :, None]).sum(-1) * scaling  # (B, L, L, H)
    logits = logits.permute(0, 3, 1, 2)  # (B, H, L, L)
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    allowed = causal[None] & vtu.attention_mask.bool()[:, None, :]  # (B, L, L)
    logits = logits.masked_fill(~allowed[:, None], torch.finfo(logits.dtype).min)
    probs = logits.softmax(-1)  # (B, H, L, L)
    grouped = probs.new_zeros(b, h, length, lm).scatter_add_(3, g[:, None, None, :].expand(b, h, length, length), probs)
    out = grouped @ v  # (B, H, L, D)
    return out.transpose(1, 2).to(dtype)
