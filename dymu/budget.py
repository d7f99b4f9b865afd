"""Per-request visual-token budgets for DToMe: a threshold scale and exact per-image token bounds.

DToMe's token count follows image content (DyMU Sec. 3.1). A user who needs a tighter cost bound, or more
detail, per request can

- scale the thresholds: layer ``l`` merges the edges scoring above ``scale * tau_l`` (``scale < 1`` merges
  more, ``> 1`` less; with the calibrated ``tau_l >= 0`` a scale ``>= 1 / min(tau)`` merges nothing);
- bound the tokens each image keeps: ``min_visual_tokens <= count <= max_visual_tokens``, exactly.

One type says what the user wants (:class:`VisualBudget`, validated once when made) and one entry meets it
(:func:`encode_under_budget`): it encodes the batch with the (scaled) rule, then encodes again, under
:class:`~dymu.merge.BoundedRule`, only the images whose count lies outside their bounds. An image already
within its bounds is thus left exactly as plain (scaled) DToMe encodes it; one outside them meets its bounds
inside the encoder by the same bipartite merges (the bounded rule takes the next most similar pairs, so a
tight ``max_visual_tokens`` degrades like fixed-r ToMe rather than cutting tokens arbitrarily). Nothing here
keeps state between calls: the rules are values and the entry takes the budget as an argument.

Counts: the budget counts the visual tokens the host model gets per image; the encoder counts its own tokens,
CLS included. ``dropped_tokens`` is the difference (1 where the host drops CLIP's CLS token after the encoder,
as LLaVA-1.5 does; 0 where it keeps every token).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .merge import BoundedRule, MergeRule, ThresholdRule, min_reachable_tokens
from .patch import dtome_settings, is_patched, vision_token_count

__all__ = ["VisualBudget", "BudgetedOutput", "encode_under_budget", "check_budget", "out_of_bounds"]

PerImage = int | Sequence[int] | None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class VisualBudget:
    """Per-request control of the visual tokens DToMe leaves per image.

    Attributes:
        threshold_scale: multiplies every layer's DToMe threshold (``< 1`` merges more, ``> 1`` less; 1.0 =
            as calibrated); a positive finite number. Needs a threshold rule (DyMU low / mid / high), not
            fixed-r ToMe.
        max_visual_tokens: at most this many visual tokens per image reach the host model, exactly; one int
            for all images or a sequence with one per image of the request (in request order). None: no bound.
        min_visual_tokens: at least this many (same forms); None: no bound.

    Counts are what the host model gets per image (LLaVA-1.5: merged patches, the CLS token dropped). The
    bounds are met inside the encoder by merging the most similar pairs (raising) or fewer pairs (lowering)
    than the thresholds pick, so nothing is truncated or padded.

    Raises:
        ValueError: a bound that is not an int, a sequence of ints or None; a ``threshold_scale`` that is not
            a positive finite number. Bounds the encoder cannot reach are refused when the budget is applied
            (:func:`encode_under_budget`, :func:`check_budget`), where the encoder's geometry is known.
    """

    threshold_scale: float = 1.0
    max_visual_tokens: PerImage = None
    min_visual_tokens: PerImage = None

    def __post_init__(self) -> None:
        for name in ("max_visual_tokens", "min_visual_tokens"):
            value = getattr(self, name)
            items = [value] if value is None or isinstance(value, int) else value
            if isinstance(value, (str, bytes)) or not isinstance(items, Sequence) or not all(
                    v is None or _is_int(v) for v in items):
                raise ValueError(f"{name} must be an int, a list of ints (one per image) or None; got {value!r}.")
            if value is not None and not isinstance(value, int):
                object.__setattr__(self, name, tuple(value))  # frozen and hashable
        scale = self.threshold_scale
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (0 < float(scale) < math.inf):
            raise ValueError(f"threshold_scale must be a positive finite number, got {scale!r}.")
        object.__setattr__(self, "threshold_scale", float(scale))

    @classmethod
    def coerce(cls, value: "VisualBudget | Mapping | None") -> "VisualBudget":
        """A :class:`VisualBudget` from itself, a mapping of its fields (e.g. a Hydra node), or None (default).

        Raises:
            ValueError: a mapping with unknown keys, or invalid values (see the class).
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown budget keys {unknown}; use {sorted(cls.__dataclass_fields__)}.")
        fields = {k: (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v) for k, v in value.items()}
        return cls(**{k: v for k, v in fields.items() if v is not None})

    @property
    def is_default(self) -> bool:
        """True when the budget changes nothing (scale 1, no bounds)."""
        return self.threshold_scale == 1.0 and not self.has_bounds

    @property
    def has_bounds(self) -> bool:
        """True when ``max_visual_tokens`` or ``min_visual_tokens`` is set."""
        return self.max_visual_tokens is not None or self.min_visual_tokens is not None


@dataclass
class BudgetedOutput:
    """Per image of a batch the DToMe tower encoded under a budget (see :func:`encode_under_budget`).

    Attributes:
        tokens: per image ``(n_i, C)`` feature-layer tokens (CLS included where the encoder has one).
        group_ids: per image ``(N0,)`` long, the token in ``[0, n_i)`` holding each original token.
        rule: the rule of the first pass, over the whole batch (the configured one, thresholds scaled).
        reencoded: the images (batch indices) encoded again because their first count lay outside their
            bounds; their entries above come from that pass.
        bounded_rule: the rule of that second pass (its bounds follow ``reencoded``), or None.
    """

    tokens: list[torch.Tensor]
    group_ids: list[torch.Tensor]
    rule: MergeRule
    reencoded: list[int]
    bounded_rule: BoundedRule | None = None

    @property
    def num_tokens(self) -> list[int]:
        """Encoder tokens per image (CLS included)."""
        return [t.shape[0] for t in self.tokens]


def _scaled(base: MergeRule, scale: float) -> MergeRule:
    """``base`` with every threshold multiplied by ``scale`` (``base`` itself at scale 1)."""
    if scale == 1.0:
        return base
    if not isinstance(base, ThresholdRule):
        raise ValueError(f"threshold_scale needs a threshold rule (DyMU low/mid/high); the encoder runs "
                         f"{type(base).__name__}. Use max_visual_tokens / min_visual_tokens to bound fixed-r ToMe.")
    return ThresholdRule([scale * float(t) for t in base.thresholds])


def _per_image(value: PerImage, name: str, batch_size: int, num_tokens: int, floor: int,
               dropped: int) -> list[int]:
    """One validated encoder-token bound per image (``value`` in host tokens; messages in encoder tokens)."""
    if value is None:
        return [num_tokens if name == "max_tokens" else 0] * batch_size
    values = [value] * batch_size if isinstance(value, int) else list(value)
    if len(values) != batch_size:
        raise ValueError(f"{name} has {len(values)} entries but the request has {batch_size} images; give one "
                         "int for all images or one per image.")
    values = [v + dropped for v in values]
    for v in values:
        if name == "max_tokens" and v < floor:
            raise ValueError(f"max_tokens={v} cannot be met: this encoder keeps at least {floor} tokens per image "
                             f"(of {num_tokens}) after its layers; use max_tokens >= {floor} (encoder tokens; "
                             f"{dropped} of them do not reach the host model).")
        if name == "min_tokens" and not 0 <= v <= num_tokens:
            raise ValueError(f"min_tokens={v} must be in [0, {num_tokens}] (encoder tokens per image before "
                             f"merging, {dropped} of which do not reach the host model).")
    return [min(v, num_tokens) for v in values]


@dataclass(frozen=True)
class _Plan:
    """A budget resolved against one tower: the first-pass rule and per-image encoder-token bounds."""

    rule: MergeRule
    max_tokens: list[int]
    min_tokens: list[int]
    num_layers: int
    has_cls: bool

    def outside(self, counts: Sequence[int]) -> list[int]:
        return [i for i, (n, a, b) in enumerate(zip(counts, self.min_tokens, self.max_tokens)) if not a <= n <= b]

    def bounded(self, images: Sequence[int], device) -> BoundedRule:
        as_tensor = lambda v: torch.tensor([v[i] for i in images], dtype=torch.long, device=device)  # noqa: E731
        return BoundedRule(self.rule, as_tensor(self.max_tokens), as_tensor(self.min_tokens),
                           num_layers=self.num_layers, has_cls=self.has_cls)


_NO_DTOME = ("a visual-token budget needs DToMe in the vision tower (dymu.apply_dtome; llava: dymu=low|mid|high or "
             "a ToMe variant); this model runs the unmodified encoder.")


def _plan(tower: torch.nn.Module, budget: VisualBudget, batch_size: int, dropped_tokens: int) -> _Plan:
    if not is_patched(tower):
        raise ValueError(_NO_DTOME)
    settings = dtome_settings(tower)
    n0, has_cls = vision_token_count(tower)
    rule = _scaled(settings.rule, float(budget.threshold_scale))
    floor = min_reachable_tokens(n0, settings.num_layers, has_cls)
    hi = _per_image(budget.max_visual_tokens, "max_tokens", batch_size, n0, floor, dropped_tokens)
    lo = _per_image(budget.min_visual_tokens, "min_tokens", batch_size, n0, floor, dropped_tokens)
    bad = [i for i, (a, b) in enumerate(zip(lo, hi)) if a > b]
    if bad:
        raise ValueError(f"min_tokens > max_tokens for images {bad}: {[lo[i] for i in bad]} > {[hi[i] for i in bad]} "
                         "(encoder tokens).")
    return _Plan(rule, hi, lo, settings.num_layers, has_cls)


def check_budget(tower: torch.nn.Module, budget: VisualBudget | Mapping | None, batch_size: int = 1, *,
                 dropped_tokens: int = 0) -> VisualBudget:
    """Validate ``budget`` against a tower without encoding anything (e.g. a pipeline's default budget).

    Args:
        tower: the vision tower the budget will be applied to (a default budget needs no DToMe).
        budget: the budget (or a mapping of its fields, or None).
        batch_size: images per request the per-image bounds are checked for.
        dropped_tokens: see :func:`encode_under_budget`.

    Returns:
        the budget as a :class:`VisualBudget`.

    Raises:
        ValueError: as :func:`encode_under_budget`.
    """
    budget = VisualBudget.coerce(budget)
    if not budget.is_default:
        _plan(tower, budget, batch_size, dropped_tokens)
    return budget


def out_of_bounds(tower: torch.nn.Module, counts: Sequence[int], budget: VisualBudget | Mapping | None, *,
                  dropped_tokens: int = 0) -> list[int]:
    """The images (indices into ``counts``, encoder tokens per image after a first pass) whose count lies
    outside the budget's bounds: the images :func:`encode_under_budget` encodes a second time.

    Raises:
        ValueError: as :func:`encode_under_budget`.
    """
    budget = VisualBudget.coerce(budget)
    if not budget.has_bounds:
        return []
    return _plan(tower, budget, len(counts), dropped_tokens).outside(counts)


def _per_image_output(out) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image of a DToMe tower output: ``(n_i, C)`` real tokens and ``(N0,)`` group ids."""
    hidden = out.last_hidden_state
    lengths = out.padding_mask.sum(-1).tolist() if out.padding_mask is not None else [hidden.shape[1]] * hidden.shape[0]
    return [hidden[i, :n] for i, n in enumerate(lengths)], list(out.group_ids)


def encode_under_budget(tower: torch.nn.Module, pixel_values: torch.Tensor,
                        budget: VisualBudget | Mapping | None = None, *, dropped_tokens: int = 0) -> BudgetedOutput:
    """Run a DToMe-patched vision tower on a batch of images (or crops) under a budget, both passes inside.

    Pass 1 encodes the whole batch with the configured rule, thresholds times ``budget.threshold_scale``.
    Pass 2, only if the budget has bounds, encodes the images whose pass-1 count lies outside them again
    under :class:`~dymu.merge.BoundedRule`, which meets them exactly; every other image keeps its pass-1
    encoding. Without a budget this is one plain DToMe pass.

    Args:
        tower: a vision tower patched by :func:`dymu.apply_dtome`.
        pixel_values: ``(B, 3, H, W)`` on the tower's device and dtype.
        budget: the request's budget (None: the plain configured rule). Per-image bounds follow the batch.
        dropped_tokens: encoder tokens per image the host model does not get (LLaVA-1.5's dropped CLS: 1); the
            budget's counts are the host's.

    Returns:
        :class:`BudgetedOutput`.

    Raises:
        ValueError: a tower without DToMe; a ``threshold_scale`` other than 1 with a non-threshold
            rule; a ``max_visual_tokens`` below what the encoder can reach, a ``min_visual_tokens`` above its
            token count or above ``max_visual_tokens``; per-image bounds whose number differs from the batch.
            All raised before the tower runs.
    """
    budget = VisualBudget.coerce(budget)
    if not is_patched(tower):
        raise ValueError(_NO_DTOME)
    batch = pixel_values.shape[0]
    if budget.is_default:
        tokens, groups = _per_image_output(tower(pixel_values))
        return BudgetedOutput(tokens, groups, dtome_settings(tower).rule, [])
    plan = _plan(tower, budget, batch, dropped_tokens)
    tokens, groups = _per_image_output(tower(pixel_values, merge_rule=plan.rule))
    redo = plan.outside([t.shape[0] for t in tokens]) if budget.has_bounds else []
    if not redo:
        return BudgetedOutput(tokens, groups, plan.rule, [])
    bounded = plan.bounded(redo, pixel_values.device)
    again_tokens, again_groups = _per_image_output(tower(pixel_values[redo], merge_rule=bounded))
    for i, t, g in zip(redo, again_tokens, again_groups):
        tokens[i], groups[i] = t, g
    return BudgetedOutput(tokens, groups, plan.rule, redo, bounded)
