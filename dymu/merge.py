"""DToMe kernels: bipartite matching, edge selection, size-weighted merging, group bookkeeping.

Pure tensor functions (torch only), host-agnostic. Method: DyMU paper (arXiv 2504.17040) Sec. 3.1 and
``docs/dymu-method.md`` Sec. 1; the bipartite split and size-weighted mean follow ToMe (Bolya et al., 2023).

Shapes used throughout:
    B   images (or crops) in the batch
    N   current tokens per image (padded to the longest image in the batch)
    N0  tokens per image before any merging (577 for CLIP ViT-L/14-336, CLS included)
    Na  A-set size = ceil(N / 2) (even positions), Nb = floor(N / 2) (odd positions)
    C   channels, D metric width

A :class:`TokenState` travels with the hidden states through the encoder. Padding is always at the end
of each image's row, so the even/odd split of the valid prefix is the same with or without padding.

What batching guarantees, exactly:

- The logic is per image: every decision (best partner, which edges merge, the new order, sizes and group
  ids) is a function of that image's own scores; padding tokens get ``-inf`` scores, zero size and a dump
  slot, so their values never matter, however long the padding and whatever the other images hold.
- The *scores* themselves are not bit-identical across batch shapes: the batched matmul ``A_n @ B_n^T`` of
  :func:`bipartite_match` may round differently (by an ulp or so) for another batch size or padded length.
  So when two B-partners of an A-token score within float rounding of each other (a near-tie, e.g. within
  2.4e-7 in float32), or an edge lies within rounding of the threshold, the argmax / comparison can flip,
  and that image can end with different groups (and a different token count) in another batch. Away from
  such near-ties the groups are identical and the features agree to float tolerance. Real encoders do meet
  near-ties occasionally (one image of 84 changed its count in a batch with real CLIP weights); float64
  scores (float64 towers) make them far rarer but not impossible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = [
    "TokenState",
    "bipartite_match",
    "select_above_threshold",
    "select_top_r",
    "select_batch_top",
    "merge_tokens",
    "accumulation_dtype",
    "attention_bias",
    "MergeRule",
    "ThresholdRule",
    "FixedRRule",
    "BoundedRule",
    "min_reachable_tokens",
    "constant_schedule",
]


@dataclass
class TokenState:
    """Bookkeeping for the current (merged) tokens of a batch.

    Attributes:
        sizes: ``(B, N)`` float32, how many original tokens each current token holds (1 before merging;
            0 for padding). Sums to ``N0`` per image.
        group_ids: ``(B, N0)`` long, for every original token the index of the current token holding it.
            The groups partition the original tokens.
        padding_mask: ``(B, N)`` bool, True for real tokens; ``None`` while no image has padding.
        merged: True once any token of the batch has been merged (from then on attention gets the
            proportional log-size bias).
    """

    sizes: torch.Tensor
    group_ids: torch.Tensor
    padding_mask: torch.Tensor | None = None
    merged: bool = False

    @classmethod
    def initial(cls, batch_size: int, num_tokens: int, device: torch.device | str | None = None) -> "TokenState":
        """State of an unmerged batch: every token its own group of size 1, no padding."""
        sizes = torch.ones(batch_size, num_tokens, device=device, dtype=torch.float32)
        group_ids = torch.arange(num_tokens, device=device).expand(batch_size, num_tokens).clone()
        return cls(sizes=sizes, group_ids=group_ids)

    @property
    def lengths(self) -> torch.Tensor:
        """``(B,)`` long, number of real tokens per image."""
        if self.padding_mask is None:
            return torch.full((self.sizes.shape[0],), self.sizes.shape[1], device=self.sizes.device, dtype=torch.long)
        return self.padding_mask.sum(-1)


def bipartite_match(
    metric: torch.Tensor,
    padding_mask: torch.Tensor | None = None,
    protect_first: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best B-partner of every A-token (A = even positions, B = odd positions).

    Args:
        metric: ``(B, N, D)`` similarity features (DToMe: attention keys averaged over heads). They are
            L2-normalised here, so scores are cosine similarities, clamped to ``[-1, 1]``.
        padding_mask: ``(B, N)`` bool, True for real tokens, or None.
        protect_first: never merge token 0 (CLIP's CLS token).

    Returns:
        ``(scores, dst)``: ``(B, Na)`` best score of each A-token (``-inf`` for protected or padded
        A-tokens, and for A-tokens with no real B-token), float32, or float64 for a float64 metric (see
        :func:`accumulation_dtype`); and ``(B, Na)`` long index into the B-set of that best partner.
    """
    metric = metric.to(accumulation_dtype(metric.dtype))  # float32, or float64 for float64 metrics
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = metric[:, ::2], metric[:, 1::2]  # (B, Na, D), (B, Nb, D)
    if b.shape[1] == 0:  # a single token: nothing to match
        shape = a.shape[:2]
        return a.new_full(shape, -torch.inf), torch.zeros(shape, dtype=torch.long, device=a.device)
    scores = (a @ b.transpose(-1, -2)).clamp_(-1.0, 1.0)  # (B, Na, Nb)
    if padding_mask is not None:
        scores.masked_fill_(~padding_mask[:, None, 1::2], -torch.inf)
    best, dst = scores.max(dim=-1)  # (B, Na)
    if padding_mask is not None:
        best = best.masked_fill(~padding_mask[:, ::2], -torch.inf)
    if protect_first:
        best[:, 0] = -torch.inf
    return best, dst


def select_above_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """DToMe rule: merge every A-token whose best score is strictly above ``threshold``.

    Args:
        scores: ``(B, Na)`` from :func:`bipartite_match`.
        threshold: the layer's similarity threshold ``tau_l``.

    Returns:
        ``(B, Na)`` bool merge mask.

    Compared in float64: a float32 comparison would round ``threshold`` to float32 first, e.g. a
    threshold just below 1 to 1, and then identical tokens (score exactly 1) would not merge.
    """
    return scores.double() > threshold


def select_top_r(scores: torch.Tensor, r: int) -> torch.Tensor:
    """Fixed-r ToMe rule: merge each image's ``r`` best edges (fewer if it has fewer candidates).

    Ties are broken by ``torch.topk`` (deterministic for a given input).

    Args:
        scores: ``(B, Na)`` from :func:`bipartite_match`; ``-inf`` entries are never selected.
        r: edges to merge per image.

    Returns:
        ``(B, Na)`` bool merge mask.
    """
    r = min(int(r), scores.shape[1])
    selected = torch.zeros_like(scores, dtype=torch.bool)
    if r <= 0:
        return selected
    idx = scores.topk(r, dim=-1).indices
    selected.scatter_(1, idx, True)
    return selected & torch.isfinite(scores)


def select_batch_top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration rule: merge the batch-wide top ``k`` edges (``k = B * r_l``).

    Redundant images take more of the budget than busy ones. The batch's threshold for the layer is the
    score of the best edge that was *not* merged (the ``(k+1)``-th largest), clamped to ``>= 0``
    (DyMU Sec. 3.1, threshold finding; ``docs/dymu-method.md`` Sec. 2).

    Args:
        scores: ``(B, Na)`` from :func:`bipartite_match`.
        k: total edges to merge in the batch.

    Returns:
        ``((B, Na) bool merge mask, () float32 batch threshold)``. If every candidate merges, the
        threshold is 0.
    """
    flat = scores.reshape(-1)
    k = max(0, min(int(k), flat.numel()))
    top = flat.topk(min(k + 1, flat.numel()))
    selected = torch.zeros_like(flat, dtype=torch.bool)
    selected[top.indices[:k]] = True
    selected &= torch.isfinite(flat)
    threshold = top.values[k] if top.values.numel() > k else flat.new_tensor(-torch.inf)
    threshold = torch.nan_to_num(threshold, neginf=0.0).clamp_min(0.0)
    return selected.view_as(scores), threshold


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype to accumulate in for inputs of ``dtype``: at least float32, and never less precise than the input.

    fp16 / bf16 / float32 -> float32 (sums of many half-precision tokens would lose precision or overflow);
    float64 -> float64.
    """
    return torch.promote_types(dtype, torch.float32)


def merge_tokens(
    x: torch.Tensor,
    state: TokenState,
    merge_a: torch.Tensor,
    dst: torch.Tensor,
) -> tuple[torch.Tensor, TokenState]:
    """Merge the selected A-tokens into their B-partners and compact the sequence.

    Size-weighted mean: ``s_b' = s_b + sum_{a->b} s_a`` and ``x_b' = (s_b x_b + sum s_a x_a) / s_b'``
    (several A-tokens may merge into one B-token). New order per image (ToMe's convention):
    ``[A-tokens not merged, in order] + [B-tokens, in order]``, padding last; token 0 (CLS) stays first
    because it is A-token 0 and never merges. An image that merges nothing keeps its order.

    Args:
        x: ``(B, N, C)`` hidden states.
        state: the batch's :class:`TokenState` (sizes ``(B, N)``).
        merge_a: ``(B, Na)`` bool, which A-tokens merge (False for padding / protected tokens).
        dst: ``(B, Na)`` long, B-set index of each A-token's partner.

    Returns:
        ``(x', state')`` with ``x'`` of shape ``(B, N', C)`` and ``x.dtype``, ``N'`` the longest new length in
        the batch. If nothing merges anywhere, ``x`` and ``state`` are returned unchanged (same objects).
        The weighted sums accumulate in :func:`accumulation_dtype` (float32 for fp16 / bf16 / float32 inputs,
        float64 for float64), then the result is rounded to ``x.dtype`` once.

    Note:
        One host synchronisation (to size the output) per call; nothing else leaves the device.
    """
    bsz, n, c = x.shape
    device = x.device
    valid = state.padding_mask if state.padding_mask is not None else torch.ones(bsz, n, dtype=torch.bool, device=device)
    merge_a = merge_a & valid[:, ::2]
    n_merged = merge_a.sum(-1)  # (B,)
    new_len = valid.sum(-1) - n_merged  # (B,)
    stats = torch.stack([new_len.max(), new_len.min(), n_merged.sum()]).tolist()  # the one host sync
    n_new, n_min, total_merged = (int(v) for v in stats)
    if total_merged == 0:
        return x, state

    pos = torch.arange(n, device=device)
    is_a = pos % 2 == 0  # (N,)
    # Destination of every current token in the new layout, for images that merge.
    keep = valid.clone()
    keep[:, ::2] &= ~merge_a  # merged A-tokens disappear
    kept_a = keep & is_a  # (B, N)
    n_kept_a = kept_a.sum(-1, keepdim=True)  # (B, 1)
    rank_a = kept_a.cumsum(-1) - 1  # rank among kept A-tokens
    rank_b = (valid & ~is_a).cumsum(-1) - 1  # rank among real B-tokens
    dest = torch.where(is_a, rank_a, n_kept_a + rank_b)  # (B, N)
    # Images that merge nothing keep their order (ToMe does the same when it merges nothing).
    dest = torch.where((n_merged > 0)[:, None], dest, pos.expand(bsz, n))
    # Merged A-tokens follow their B-partner (B-token j sits at position 2j + 1).
    partner_pos = 2 * dst + 1  # (B, Na)
    dest_a = torch.where(merge_a, dest.gather(1, partner_pos), dest[:, ::2])
    dest = dest.clone()
    dest[:, ::2] = dest_a
    dest = torch.where(valid, dest, n_new)  # padding goes to a dump slot

    # Size-weighted sums in at least float32 (float64 inputs stay float64), accumulated into the partner
    # slots, then compacted.
    sizes = state.sizes
    acc = accumulation_dtype(x.dtype)
    weighted = x.to(acc) * sizes[..., None].to(acc)  # (B, N, C)
    out = x.new_zeros(bsz, n_new + 1, c, dtype=acc)
    out.scatter_add_(1, dest[..., None].expand(bsz, n, c), weighted)
    new_sizes = sizes.new_zeros(bsz, n_new + 1)
    new_sizes.scatter_add_(1, dest, sizes)
    out, new_sizes = out[:, :n_new], new_sizes[:, :n_new]
    new_valid = torch.arange(n_new, device=device) < new_len[:, None]
    x_new = (out / new_sizes.clamp_min(1.0)[..., None].to(acc)).to(x.dtype)
    new_state = TokenState(
        sizes=new_sizes,
        group_ids=dest.gather(1, state.group_ids),
        padding_mask=new_valid if n_min < n_new else None,
        merged=True,
    )
    return x_new, new_state


def attention_bias(state: TokenState, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive attention mask for proportional attention and padding.

    From the first merge on, every key ``j`` gets ``log s_j`` added to its pre-softmax logit (all
    queries, all heads; DyMU follows ToMe's proportional attention). Padding keys get the dtype's
    minimum. Before any merge (all sizes 1, no padding) this returns ``None`` so the host's attention
    runs exactly as unpatched.

    Args:
        state: current :class:`TokenState`.
        dtype: dtype of the attention logits (any floating dtype, float64 included).

    Returns:
        ``(B, 1, 1, N)`` tensor of ``dtype``, or ``None``. ``log s`` is computed in
        :func:`accumulation_dtype` of ``dtype`` and rounded to ``dtype`` once.
    """
    if not state.merged and state.padding_mask is None:
        return None
    bias = state.sizes.to(accumulation_dtype(dtype)).clamp_min(1.0).log().to(dtype)  # log s rounded once
    if state.padding_mask is not None:  # filled in `dtype` itself: its minimum need not fit float32 (float64)
        bias = bias.masked_fill(~state.padding_mask, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def constant_schedule(total: int, num_layers: int) -> list[int]:
    """Split a merge budget evenly over layers: ``total // num_layers`` each, the remainder to the first layers.

    Example: ``constant_schedule(483, 23) == [21] * 23`` (LLaVA-1.5's ToMe-94 / DyMU-low budget).

    Raises:
        ValueError: ``total < 0`` or ``num_layers < 1``.
    """
    if total < 0 or num_layers < 1:
        raise ValueError(f"constant_schedule needs total >= 0 and num_layers >= 1, got {total}, {num_layers}.")
    base, rest = divmod(int(total), int(num_layers))
    return [base + (1 if i < rest else 0) for i in range(num_layers)]


class MergeRule(Protocol):
    """Decides, per encoder layer, which A-tokens merge.

    Called as ``rule(layer, scores, lengths)`` with ``layer`` the 0-based encoder layer, ``scores`` the
    ``(B, Na)`` output of :func:`bipartite_match` and ``lengths`` the ``(B,)`` long count of real tokens each
    image holds entering the merge (:attr:`TokenState.lengths`); returns a ``(B, Na)`` bool mask. A rule gets
    everything it needs for its decision as arguments: its choice depends on no earlier call, so one rule object
    serves any number of forward passes (ToMe's patch keeps per-call counts on the module instead). A rule may
    record what it saw without deciding from it (calibration's :class:`~dymu.calibration.BatchBudgetRule`
    accumulates each layer's threshold).
    """

    def __call__(self, layer: int, scores: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass
class ThresholdRule:
    """DToMe at inference: merge every edge whose score is strictly above ``thresholds[layer]``."""

    thresholds: Sequence[float]

    def __call__(self, layer: int, scores: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return select_above_threshold(scores, float(self.thresholds[layer]))


@dataclass
class FixedRRule:
    """Fixed-r ToMe baseline: merge each image's ``r[layer]`` best edges."""

    r: Sequence[int]

    def __call__(self, layer: int, scores: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return select_top_r(scores, int(self.r[layer]))


def min_reachable_tokens(num_tokens: int, num_layers: int, has_cls: bool) -> int:
    """Fewest tokens an image of ``num_tokens`` can keep after ``num_layers`` merging layers (every A-token
    merged at every layer). 2 for CLIP ViT-L/14-336 over 23 layers (CLS + one patch group)."""
    n = int(num_tokens)
    for _ in range(int(num_layers)):
        n = n // 2 + 1 if has_cls else n // 2
        n = max(n, 2 if has_cls else 1)
    return min(n, int(num_tokens))


@dataclass(frozen=True)
class BoundedRule:
    """Merge rule: ``base``'s choice per image, its edge count clamped so that every image ends within
    ``[min_tokens, max_tokens]`` tokens at the last layer (see :mod:`dymu.budget` for the use).

    At layer ``l`` an image holding ``n`` tokens (``lengths``) merges its ``k`` best edges, ``k`` = the base
    rule's own count, raised to at least ``ceil((n - max_tokens) / R)`` (the excess spread evenly over the
    ``R`` layers left, this one included, as ToMe spreads ``r``) and to what leaves a count the remaining
    layers can still bring under ``max_tokens`` merging at full capacity, then lowered to keep ``n - k >=
    min_tokens``. Where neither bound binds, ``k`` is the base rule's count and its top-``k`` edges are exactly
    the base rule's (for a threshold rule: the edges above the threshold). A layer merges at most every
    A-token (all but a CLS token): ``n -> floor(n / 2) + 1`` with a CLS token, ``floor(n / 2)`` without.

    Stateless: the counts come in as ``lengths``, so one rule object serves any number of passes. Scores of
    padding and CLS tokens are ``-inf`` and never selected.

    Attributes:
        base: the unbounded rule (scaled thresholds for DToMe, :class:`FixedRRule` for ToMe).
        max_tokens: ``(B,)`` long, upper bound per image at the last layer (CLS included).
        min_tokens: ``(B,)`` long, lower bound per image.
        num_layers: layers the encoder runs (the last one is the feature layer).
        has_cls: token 0 is a CLS token that never merges.

    Raises (on call):
        ValueError: ``lengths`` missing, or a batch of another size than the bounds.
    """

    base: MergeRule
    max_tokens: torch.Tensor
    min_tokens: torch.Tensor
    num_layers: int
    has_cls: bool

    def _reachable_from(self, layers: int) -> torch.Tensor:
        """``(B,)`` the largest count from which ``layers`` full-capacity layers reach ``max_tokens``."""
        m, scale = self.max_tokens, 2 ** min(layers, 40)
        return scale * (m - 1) + 1 if self.has_cls else scale * (m + 1) - 1

    def __call__(self, layer: int, scores: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            raise ValueError("BoundedRule needs each image's current token count: call rule(layer, scores, lengths) "
                             "(the DToMe encoder passes TokenState.lengths).")
        if scores.shape[0] != self.max_tokens.shape[0]:
            raise ValueError(f"the budget was made for {self.max_tokens.shape[0]} images, the batch has "
                             f"{scores.shape[0]}.")
        n = lengths.to(device=self.max_tokens.device, dtype=torch.long)  # (B,)
        finite = torch.isfinite(scores)
        wanted = (self.base(layer, scores, lengths) & finite).sum(-1)  # (B,) the base rule's own count
        left = self.num_layers - layer  # layers left, this one included
        excess = (n - self.max_tokens).clamp_min(0)
        need = torch.maximum(-torch.div(-excess, left, rounding_mode="floor"),  # ceil(excess / left)
                             n - self._reachable_from(left - 1))
        k = torch.maximum(wanted, need).minimum(n - self.min_tokens).clamp_min(0).minimum(finite.sum(-1))
        # The k best edges per image. When k == wanted these are exactly the base rule's edges.
        order = scores.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device)
                                                .expand_as(order))
        return (rank < k[:, None].to(rank.device)) & finite
