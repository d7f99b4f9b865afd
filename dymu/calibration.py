"""Threshold calibration: :func:`find_thresholds` and its merge rule :class:`BatchBudgetRule`.

Calibration follows DyMU Sec. 3.1 ("threshold finding") exactly as written in
``docs/dymu-method.md`` Sec. 2: per batch and layer, merge the batch-wide top ``B * r_l`` edges, record
the best edge that was not merged (clamped at 0), and average those per-batch values over all batches in
float64; under ``torch.distributed`` sums and counts are all-reduced so N ranks equal one rank over the
same batches.

The result is a :class:`dymu.thresholds.Thresholds`; this module runs the patched encoder, so it sits above both
:mod:`dymu.thresholds` and :mod:`dymu.patch`.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoint import CalibrationCheckpoint, CheckpointError
from .merge import ThresholdRule, constant_schedule, select_batch_top
from .patch import apply_dtome, dtome_settings, encoder_spec, is_patched, layers_to_run, remove
from .thresholds import Thresholds, weights_identity

__all__ = ["BatchBudgetRule", "find_thresholds"]


class BatchBudgetRule:
    """Calibration merge rule: batch-level top ``B * r_l`` per layer, recording each batch's threshold.

    Per-batch thresholds are accumulated on the device in float64 (sum and count per layer); nothing
    is synchronised to the host during the forward pass. Called as a :class:`~dymu.merge.MergeRule`,
    ``rule(layer, scores, lengths)``; ``lengths`` is not used (the budget is batch-wide).

    Args:
        schedule: per-layer budget ``r_l`` (per image).
        device: where the accumulators live.
    """

    def __init__(self, schedule: Sequence[int], device: torch.device | str | None = None):
        self.schedule = [int(r) for r in schedule]
        self.sums = torch.zeros(len(self.schedule), dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(self.schedule), dtype=torch.float64, device=device)

    def __call__(self, layer: int, scores: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        selected, threshold = select_batch_top(scores, scores.shape[0] * self.schedule[layer])
        self.sums[layer] += threshold.to(self.sums)
        self.counts[layer] += 1
        return selected


def _check_finite(pixels: torch.Tensor) -> None:
    """Raise ValueError if a calibration batch holds NaN / inf (checked before it moves to the device)."""
    if not torch.isfinite(pixels).all():
        raise ValueError(f"a calibration batch of shape {tuple(pixels.shape)} holds NaN or infinite pixel values; "
                         "thresholds calibrated on it would be garbage. Check the images and the preprocessing.")


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def find_thresholds(
    vision_model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    target_tokens: int | None = None,
    schedule: Sequence[int] | None = None,
    feature_layer: int = -1,
    realised_batches: Iterable[torch.Tensor] | None = None,
    progress: bool = True,
    source: str = "",
    extra: dict[str, Any] | None = None,
    checkpoint: CalibrationCheckpoint | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Thresholds:
    """Calibrate per-layer DToMe thresholds on a stream of image batches.

    Give either ``target_tokens`` (tokens per image, CLS included, to leave at the feature layer; the
    budget ``N0 - target`` is spread with :func:`~dymu.merge.constant_schedule`) or an explicit
    per-layer ``schedule``. Under an initialised ``torch.distributed`` process group each rank passes
    its own share of batches; the per-layer sums and counts are all-reduced, so the result equals one
    process over all batches (every rank must call this function).

    Args:
        vision_model: any tower :func:`dymu.apply_dtome` supports, patched or not (left as it was):
            transformers ``CLIPVisionModel`` / ``Dinov2Model`` (CLS token) or ``SiglipVisionModel`` (no
            CLS); open_clip's ``VisionTransformer`` (``CLIP.visual``, CLS token); or timm's
            ``VisionTransformer`` (e.g. the trunk of open_clip's ``TimmModel`` SigLIP towers,
            ``model.visual.trunk``; CLS token if it has one prefix token). Not a LLaVA model: pass its vision tower. open_clip / timm towers need the
            ``openclip`` extra.
        batches: iterable of ``(B, 3, H, W)`` preprocessed pixel batches (``H, W`` the tower's image size;
            preprocess as at deployment), moved to the tower's device and dtype here. ``B`` may vary between
            batches; the budget of a batch is ``B * r_l`` edges per layer.
        target_tokens: tokens per image at the feature layer, CLS included where the encoder has one, in
            ``[1, N0]`` (``N0`` = 577 for CLIP ViT-L/14-336, 729 for SigLIP so400m/14-384).
        schedule: per-layer ``r_l`` (length = layers run; at most about half the remaining tokens per layer).
        feature_layer: hidden-state index of the feature layer (-2 for LLaVA-1.5: 23 of 24 layers run).
        realised_batches: ``(B, 3, H, W)`` batches on which to measure the token count with the new
            thresholds (default: none, ``realised_tokens`` stays empty).
        progress: show tqdm progress bars (rank 0 only).
        source, extra: recorded in the result.
        checkpoint: a :class:`dymu.checkpoint.CalibrationCheckpoint` (one per rank) that records the state
            (per-layer float64 sums and counts, inputs seen) after every batch, so a killed run loses at most
            one batch. If it was resumed (``checkpoint.batches_done > 0``), the state starts from it and
            ``batches`` must yield only the batches after those ``batches_done`` (the same batches, in the same
            order, as the uninterrupted run): the result is then exactly that of the uninterrupted run. The
            tower's identity (geometry, weights, feature layer, schedule, dtype) is recorded in it and checked
            on resume. The file is left in place; delete it (``checkpoint.remove()``) once the result is saved.
        on_batch: called with the number of batches done (resumed ones included) after each batch, once the
            checkpoint is written (progress reporting; an exception raised here stops the calibration).

    Returns:
        :class:`Thresholds` with one value per layer run, the encoder fingerprint, the schedule, image count,
        dtype, realised token count, and ``weights_sha256`` (:func:`weights_identity` of ``vision_model``).

    Raises:
        NotImplementedError: ``vision_model`` is not a supported tower (names its class).
        ValueError: neither or both of ``target_tokens`` / ``schedule``; ``target_tokens`` outside
            ``[1, N0]``; a ``feature_layer`` that selects no encoder layer; a schedule of the wrong length
            or one that asks more merges than a layer can make; a tower already patched to run another
            number of layers; no batches; a batch with NaN / inf pixels.
        dymu.checkpoint.CheckpointError: a resumed ``checkpoint`` was written for another tower, schedule or
            dtype (a ValueError).
    """
    spec = encoder_spec(vision_model)
    n_run = layers_to_run(spec.num_layers, feature_layer)
    n0, has_cls = spec.num_tokens, spec.has_cls
    if (target_tokens is None) == (schedule is None):
        raise ValueError("find_thresholds needs exactly one of target_tokens or schedule.")
    if schedule is None:
        if not 1 <= target_tokens <= n0:
            raise ValueError(f"target_tokens must be in [1, {n0}], got {target_tokens}.")
        schedule = constant_schedule(n0 - int(target_tokens), n_run)
    schedule = [int(r) for r in schedule]
    if len(schedule) != n_run:
        raise ValueError(f"schedule has {len(schedule)} entries but {n_run} encoder layers run.")
    remaining = n0
    for i, r in enumerate(schedule):
        if r < 0 or r > (remaining + 1) // 2 - int(has_cls):  # at most |A| (minus a CLS token) per image
            raise ValueError(f"schedule asks {r} merges at layer {i} but only {remaining} tokens remain "
                             "(at most about half can merge per layer).")
        remaining -= r

    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    was_patched = is_patched(vision_model)
    device = next(vision_model.parameters()).device
    dtype = next(vision_model.parameters()).dtype
    if was_patched and dtome_settings(vision_model).num_layers != n_run:
        raise ValueError(
            f"the vision model is already patched to run {dtome_settings(vision_model).num_layers} layers, but "
            f"feature_layer={feature_layer} needs {n_run}; pass the same feature_layer or call dymu.remove(model)."
        )
    identity = weights_identity(vision_model, n_run)
    rule = BatchBudgetRule(schedule, device=device)
    n_images = torch.zeros((), dtype=torch.float64, device=device)
    done = 0
    if checkpoint is not None:
        checkpoint.bind_model({"encoder": spec.fingerprint, "weights_sha256": identity, "feature_layer": feature_layer,
                               "schedule": schedule, "dtype": str(dtype).removeprefix("torch.")})
        if checkpoint.batches_done:
            if len(checkpoint.sums) != len(schedule):
                raise CheckpointError(f"calibration checkpoint {checkpoint.path} holds {len(checkpoint.sums)} layers, "
                                      f"this calibration runs {len(schedule)}; delete it to start over.")
            done = checkpoint.batches_done
            rule.sums = torch.tensor(checkpoint.sums, dtype=torch.float64, device=device)
            rule.counts = torch.tensor(checkpoint.counts, dtype=torch.float64, device=device)
            n_images.fill_(checkpoint.n_images)
    if not was_patched:
        apply_dtome(vision_model, rule, feature_layer=feature_layer)
    try:
        for pixels in tqdm(batches, desc="calibrating thresholds", unit="batch", disable=not (progress and rank0),
                           initial=done):
            _check_finite(pixels)
            vision_model.dtome_forward(pixels.to(device=device, dtype=dtype), merge_rule=rule)
            n_images += pixels.shape[0]
            done += 1
            if checkpoint is not None:  # one host sync per batch: negligible next to the forward pass
                checkpoint.record(rule.sums.tolist(), rule.counts.tolist(), n_images.item(), done)
            if on_batch is not None:
                on_batch(done)
        _all_reduce(rule.sums)
        _all_reduce(rule.counts)
        _all_reduce(n_images)
        if rule.counts.min().item() == 0:
            raise ValueError("find_thresholds got no batches; check the image list.")
        values = (rule.sums / rule.counts).tolist()

        realised = None
        if realised_batches is not None:
            stats = torch.zeros(3, dtype=torch.float64, device=device)  # count, sum, sum of squares
            infer = ThresholdRule(values)
            for pixels in tqdm(realised_batches, desc="measuring token counts", unit="batch",
                               disable=not (progress and rank0)):
                _check_finite(pixels)
                out = vision_model.dtome_forward(pixels.to(device=device, dtype=dtype), merge_rule=infer)
                n = out.padding_mask.sum(-1) if out.padding_mask is not None else torch.full(
                    (pixels.shape[0],), out.last_hidden_state.shape[1], device=device)
                n = n.double()
                stats += torch.stack([n.new_tensor(float(n.numel())), n.sum(), (n * n).sum()])
            _all_reduce(stats)
            count, total, squares = stats.tolist()
            if count > 0:
                mean = total / count
                std = math.sqrt(max(squares / count - mean * mean, 0.0))
                realised = {"mean": mean, "std": std, "num_images": int(count)}
    finally:
        if not was_patched:
            remove(vision_model)

    meta = {"date": _dt.date.today().isoformat(), **(extra or {})}
    return Thresholds(
        values=values,
        encoder=spec.fingerprint,
        num_layers=spec.num_layers,
        feature_layer=feature_layer,
        schedule=schedule,
        target_tokens=n0 - sum(schedule),
        num_images=int(n_images.item()),
        dtype=str(dtype).removeprefix("torch."),
        realised_tokens=realised,
        source=source or "dymu.find_thresholds",
        extra=meta,
        weights_sha256=identity,
    )
