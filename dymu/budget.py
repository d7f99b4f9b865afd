"""Per-request token budgets for DToMe: a threshold scale and exact per-image token bounds.

DToMe's token count follows image content (DyMU Sec. 3.1). A user who needs a tighter cost bound, or more
detail, per request can

- scale the thresholds: layer ``l`` merges the edges scoring above ``scale * tau_l`` (``scale < 1`` merges
  more, ``> 1`` less; with the calibrated ``tau_l >= 0`` a scale ``>= 1 / min(tau)`` merges nothing);
- bound the tokens each image keeps at the feature layer: ``min_tokens <= count <= max_tokens``, exactly.

An image whose (scaled) DToMe count already lies within its bounds is left exactly as DToMe encodes it.
An image outside them is encoded again under :class:`BudgetRule`, which meets the bounds inside the encoder
by the same bipartite merges: at every layer the image merges its ``k`` best edges with ``k`` = the
threshold rule's own count, raised to what keeps ``max_tokens`` reachable and lowered to what keeps
``min_tokens``. Where neither bound binds, ``k`` is exactly the threshold rule's count and its top-``k``
edges are exactly those above the threshold. Raising ``k`` takes the next most similar pairs, so a tight
``max_tokens`` degrades like fixed-r ToMe rather than cutting tokens arbitrarily.

Raising ``k``: with ``g`` tokens still over the bound and ``R`` layers left (this one included), the layer
merges at least ``ceil(g / R)`` (the excess spread evenly, as ToMe spreads ``r``), and at least what leaves
a count the remaining layers can still bring under the bound when merging at full capacity. A layer merges
at most every A-token (all but a CLS token): ``n -> floor(n / 2) + 1`` with a CLS token, ``floor(n / 2)``
without.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .merge import MergeRule, ThresholdRule

__all__ = ["TokenBudget", "BudgetRule", "min_reachable_tokens"]

PerImage = int | Sequence[int] | None


def min_reachable_tokens(num_tokens: int, num_layers: int, has_cls: bool) -> int:
    """Fewest tokens an image of ``num_tokens`` can keep after ``num_layers`` merging layers (every A-token
    merged at every layer). 2 for CLIP ViT-L/14-336 over 23 layers (CLS + one patch group)."""
    n = int(num_tokens)
    for _ in range(int(num_layers)):
        n = n // 2 + 1 if has_cls else n // 2
        n = max(n, 2 if has_cls else 1)
    return min(n, int(num_tokens))


@dataclass(frozen=True)
class TokenBudget:
    """Per-request control of DToMe's token count (encoder tokens at the feature layer, CLS included).

    Use: encode with :meth:`scaled` (the thresholds times ``threshold_scale``); images whose count then lies
    outside the bounds (:meth:`violations`) are encoded again with :meth:`rule`, which meets the bounds
    exactly. An image already within its bounds is thus encoded exactly as plain (scaled) DToMe encodes it.

    Attributes:
        threshold_scale: multiplies every layer's threshold (threshold rules only; 1.0 = as calibrated).
        max_tokens: upper bound per image: one int for all images, or one per image of the batch; None = none.
        min_tokens: lower bound per image (same forms).

    Raises (on :meth:`scaled`, :meth:`bounds`, :meth:`rule`):
        ValueError: a non-positive / non-finite scale, a scale with a non-threshold rule, bounds outside
            what the encoder can reach, ``min > max``, or per-image lists of the wrong length.
    """

    threshold_scale: float = 1.0
    max_tokens: PerImage = None
    min_tokens: PerImage = None

    @property
    def is_default(self) -> bool:
        """True when the budget changes nothing (scale 1, no bounds)."""
        return self.threshold_scale == 1.0 and self.max_tokens is None and self.min_tokens is None

    @property
    def has_bounds(self) -> bool:
        """True when ``max_tokens`` or ``min_tokens`` is set."""
        return self.max_tokens is not None or self.min_tokens is not None

    def scaled(self, base: MergeRule) -> MergeRule:
        """``base`` with every threshold multiplied by ``threshold_scale`` (``base`` itself at scale 1)."""
        scale = float(self.threshold_scale)
        if not (scale > 0 and scale != float("inf")):
            raise ValueError(f"threshold_scale must be a positive finite number, got {self.threshold_scale!r}.")
        if scale == 1.0:
            return base
        if not isinstance(base, ThresholdRule):
            raise ValueError(f"threshold_scale needs a threshold rule (DyMU low/mid/high); the encoder runs "
                             f"{type(base).__name__}. Use max_tokens / min_tokens to bound fixed-r ToMe.")
        return ThresholdRule([scale * float(t) for t in base.thresholds])

    def bounds(self, batch_size: int, num_tokens: int, num_layers: int, has_cls: bool) -> tuple[list[int], list[int]]:
        """Validated per-image ``(max_tokens, min_tokens)`` lists (``num_tokens`` / 0 where unbounded).

        Args:
            batch_size: images (or crops) in the batch.
            num_tokens: ``N0``, tokens per image before merging.
            num_layers: layers the encoder runs (the last one is the feature layer).
            has_cls: token 0 is a CLS token that never merges.
        """
        floor = min_reachable_tokens(num_tokens, num_layers, has_cls)
        hi = _per_image(self.max_tokens, "max_tokens", batch_size, num_tokens, floor)
        lo = _per_image(self.min_tokens, "min_tokens", batch_size, num_tokens, floor)
        bad = [i for i, (a, b) in enumerate(zip(lo, hi)) if a > b]
        if bad:
            raise ValueError(f"min_tokens > max_tokens for images {bad}: {[lo[i] for i in bad]} > "
                             f"{[hi[i] for i in bad]}.")
        return hi, lo

    def violations(self, counts: Sequence[int], *, num_tokens: int, num_layers: int, has_cls: bool) -> list[int]:
        """Indices of the images whose token ``counts`` lie outside their bounds."""
        hi, lo = self.bounds(len(counts), num_tokens, num_layers, has_cls)
        return [i for i, (n, a, b) in enumerate(zip(counts, lo, hi)) if not a <= n <= b]

    def rule(self, base: MergeRule, *, batch_size: int, num_tokens: int, num_layers: int, has_cls: bool,
             images: Sequence[int] | None = None, device: torch.device | str | None = None) -> "BudgetRule":
        """A :class:`BudgetRule` meeting the bounds on top of ``base`` (already :meth:`scaled`).

        Args:
            base: the encoder's rule (scaled thresholds for DToMe, ``FixedRRule`` for ToMe).
            batch_size: images in the request the bounds are given for.
            num_tokens, num_layers, has_cls: as in :meth:`bounds`.
            images: the request's images that this encoder batch holds, in batch order (default: all).
            device: where the per-image bounds live (the encoder's device).

        Returns:
            A fresh :class:`BudgetRule` (single use: one forward pass).
        """
        hi, lo = self.bounds(batch_size, num_tokens, num_layers, has_cls)
        images = list(range(batch_size)) if images is None else list(images)
        as_tensor = lambda v: torch.tensor([v[i] for i in images], dtype=torch.long, device=device)  # noqa: E731
        return BudgetRule(base, as_tensor(hi), as_tensor(lo), num_tokens=num_tokens, num_layers=num_layers,
                          has_cls=has_cls)


def _per_image(value: PerImage, name: str, batch_size: int, num_tokens: int, floor: int) -> list[int]:
    if value is None:
        return [num_tokens if name == "max_tokens" else 0] * batch_size
    values = [value] * batch_size if isinstance(value, int) else list(value)
    if len(values) != batch_size:
        raise ValueError(f"{name} has {len(values)} entries but the request has {batch_size} images; give one "
                         "int for all images or one per image.")
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{name} must hold integers, got {v!r}.")
        if name == "max_tokens" and v < floor:
            raise ValueError(f"max_tokens={v} cannot be met: this encoder keeps at least {floor} tokens per image "
                             f"(of {num_tokens}) after its layers; use max_tokens >= {floor}.")
        if name == "min_tokens" and not 0 <= v <= num_tokens:
            raise ValueError(f"min_tokens={v} must be in [0, {num_tokens}] (tokens per image before merging).")
    return [min(v, num_tokens) for v in values]


class BudgetRule:
    """Merge rule: ``base``'s choice per image, with its edge count clamped to keep per-image bounds.

    Stateful over one forward pass: it tracks every image's token count from the merges it decided (layer 0
    starts at ``num_tokens``). Scores of padding and CLS tokens are ``-inf`` and never selected, so the
    count it tracks is the encoder's.

    Args:
        base: the unbounded rule.
        max_tokens, min_tokens: ``(B,)`` long bounds (CLS included).
        num_tokens: ``N0``. num_layers: layers run. has_cls: token 0 never merges.
    """

    def __init__(self, base: MergeRule, max_tokens: torch.Tensor, min_tokens: torch.Tensor, *, num_tokens: int,
                 num_layers: int, has_cls: bool):
        self.base, self.max_tokens, self.min_tokens = base, max_tokens, min_tokens
        self.num_tokens, self.num_layers, self.has_cls = int(num_tokens), int(num_layers), bool(has_cls)
        self.counts = torch.full_like(max_tokens, self.num_tokens)

    def _reachable_from(self, layers: int) -> torch.Tensor:
        """``(B,)`` the largest count from which ``layers`` full-capacity layers reach ``max_tokens``."""
        m, scale = self.max_tokens, 2 ** min(layers, 40)
        return scale * (m - 1) + 1 if self.has_cls else scale * (m + 1) - 1

    def __call__(self, layer: int, scores: torch.Tensor) -> torch.Tensor:
        if layer == 0:
            self.counts = torch.full_like(self.max_tokens, self.num_tokens)
        if scores.shape[0] != self.counts.shape[0]:
            raise ValueError(f"the budget was made for {self.counts.shape[0]} images, the batch has {scores.shape[0]}.")
        n = self.counts
        finite = torch.isfinite(scores)
        wanted = (self.base(layer, scores) & finite).sum(-1)  # (B,) the base rule's own count
        left = self.num_layers - layer  # layers left, this one included
        excess = (n - self.max_tokens).clamp_min(0)
        need = torch.maximum(-torch.div(-excess, left, rounding_mode="floor"),  # ceil(excess / left)
                             n - self._reachable_from(left - 1))
        k = torch.maximum(wanted, need).minimum(n - self.min_tokens).clamp_min(0).minimum(finite.sum(-1))
        # The k best edges per image. When k == wanted these are exactly the edges above the threshold.
        order = scores.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device)
                                                .expand_as(order))
        selected = (rank < k[:, None]) & finite
        self.counts = n - k
        return selected
