"""Per-layer DToMe thresholds: a small JSON file format, validation, and calibration.

Calibration follows DyMU Sec. 3.1 ("threshold finding") exactly as written in
``docs/dymu-method.md`` Sec. 2: per batch and layer, merge the batch-wide top ``B * r_l`` edges, record
the best edge that was not merged (clamped at 0), and average those per-batch values over all batches in
float64; under ``torch.distributed`` sums and counts are all-reduced so N ranks equal one rank over the
same batches.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .merge import ThresholdRule, constant_schedule, select_batch_top

__all__ = ["Thresholds", "ThresholdsError", "BatchBudgetRule", "find_thresholds", "encoder_fingerprint", "EncoderSpec"]

logger = logging.getLogger(__name__)

FORMAT = "dymu-thresholds"
VERSION = 1
PACKAGED_DIR = Path(__file__).parent / "data" / "thresholds"


class ThresholdsError(ValueError):
    """A thresholds file is missing, malformed, or does not fit the model it is applied to."""


def encoder_fingerprint(vision_config: Any) -> str:
    """Identify an encoder's geometry, e.g. ``clip_vision_model-h1024-l24-p14-s336`` for CLIP ViT-L/14-336.

    Thresholds are only meaningful for the encoder (and weights) they were calibrated on; the geometry
    catches the common mistakes (another encoder family, size or resolution).

    Args:
        vision_config: a transformers vision config, or an :class:`EncoderSpec` (its fingerprint is returned).
    """
    if isinstance(vision_config, EncoderSpec):
        return vision_config.fingerprint
    c = vision_config
    return f"{c.model_type}-h{c.hidden_size}-l{c.num_hidden_layers}-p{c.patch_size}-s{c.image_size}"


@dataclass(frozen=True)
class EncoderSpec:
    """What thresholds and budgets need to know about a vision encoder.

    Attributes:
        fingerprint: geometry id (:func:`encoder_fingerprint`).
        num_layers: transformer blocks in the encoder.
        num_tokens: tokens per image before merging, ``N0`` (577 for CLIP ViT-L/14-336).
        has_cls: token 0 is a CLS token that never merges.
    """

    fingerprint: str
    num_layers: int
    num_tokens: int
    has_cls: bool

    @classmethod
    def from_config(cls, vision_config: Any, has_cls: bool | None = None) -> "EncoderSpec":
        """Spec of a transformers vision config (CLIP-style configs have a CLS token, SigLIP's do not)."""
        if has_cls is None:
            has_cls = not vision_config.model_type.startswith("siglip")
        grid = vision_config.image_size // vision_config.patch_size
        return cls(encoder_fingerprint(vision_config), vision_config.num_hidden_layers, grid * grid + int(has_cls),
                   has_cls)


@dataclass
class Thresholds:
    """Per-layer similarity thresholds plus the metadata of how they were made.

    Attributes:
        values: ``tau_l`` for encoder layers ``0 .. len(values) - 1`` (cosine similarities).
        encoder: :func:`encoder_fingerprint` of the calibration encoder.
        num_layers: the encoder's total layer count.
        feature_layer: hidden-state index whose output feeds the LLM (e.g. -2 for LLaVA-1.5).
        schedule: per-layer merge budget ``r_l`` used for calibration (per image).
        target_tokens: tokens per image the schedule leaves at the feature layer (CLS included).
        num_images: encoder inputs seen during calibration (images; crops for AnyRes models, whose image
            count is then in ``extra["images"]``).
        dtype: calibration dtype.
        realised_tokens: ``{"mean", "std", "num_images"}`` tokens per encoder input (image or crop) at the
            feature layer (CLS included) when these thresholds are applied to calibration inputs.
        source: where the values come from (calibration run, or a publication).
        extra: anything else worth recording (model path, seed, image list, date).
    """

    values: list[float]
    encoder: str
    num_layers: int
    feature_layer: int
    schedule: list[int] | None = None
    target_tokens: int | None = None
    num_images: int | None = None
    dtype: str | None = None
    realised_tokens: dict[str, float] | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Validate the fields.

        Raises:
            ThresholdsError: ``values`` is not a non-empty list of finite numbers in ``[-1, 1]`` (thresholds
                are cosine similarities; calibrated ones lie in ``[0, 1]``), or there are more values than
                ``num_layers``.
        """
        if isinstance(self.values, (str, bytes, dict)) or not hasattr(self.values, "__iter__"):
            raise ThresholdsError(f"thresholds 'values' must be a list of numbers, got {self.values!r}.")
        try:
            self.values = [float(v) for v in self.values]
        except (TypeError, ValueError) as err:
            raise ThresholdsError(f"thresholds 'values' must be numbers ({err}): {self.values!r}.") from err
        if not self.values:
            raise ThresholdsError("thresholds 'values' is empty; it needs one value per encoder layer.")
        bad = [i for i, v in enumerate(self.values) if not math.isfinite(v)]
        if bad:
            raise ThresholdsError(f"thresholds must be finite numbers; layers {bad} are not: {self.values}")
        bad = [i for i, v in enumerate(self.values) if not -1.0 <= v <= 1.0]
        if bad:
            raise ThresholdsError(
                f"thresholds are cosine similarities and must lie in [-1, 1]; layers {bad} hold "
                f"{[self.values[i] for i in bad]}. Re-create the file with scripts/find_thresholds.py "
                "(calibrated thresholds lie in [0, 1]); 1.0 merges nothing."
            )
        if not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) or self.num_layers < 1:
            raise ThresholdsError(f"thresholds 'num_layers' must be a positive integer, got {self.num_layers!r}.")
        if len(self.values) > self.num_layers:
            raise ThresholdsError(f"{len(self.values)} thresholds for an encoder of {self.num_layers} layers; the "
                                  "file is inconsistent: re-create it with scripts/find_thresholds.py.")

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the thresholds as JSON (never pickle). Creates parent folders. Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT, "version": VERSION, **asdict(self)}
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Thresholds":
        """Read a thresholds JSON file.

        Raises:
            ThresholdsError: the file is missing, not JSON, not a DyMU thresholds file, has missing /
                unknown fields, or invalid values (see :class:`Thresholds`; the message names the file).
        """
        path = Path(path)
        if not path.is_file():
            raise ThresholdsError(
                f"thresholds file {path} does not exist; create it with scripts/find_thresholds.py "
                "(see README.md, 'Thresholds')."
            )
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ThresholdsError(f"thresholds file {path} is not valid JSON ({err}); re-create it with "
                                  "scripts/find_thresholds.py.") from err
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ThresholdsError(f"{path} is not a DyMU thresholds file (expected \"format\": \"{FORMAT}\").")
        if payload.get("version") != VERSION:
            raise ThresholdsError(f"{path} has thresholds format version {payload.get('version')}; "
                                  f"this DyMU reads version {VERSION}.")
        payload = {k: v for k, v in payload.items() if k not in ("format", "version")}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(payload) - known)
        if unknown:
            raise ThresholdsError(f"{path} has unknown fields {unknown}.")
        try:
            return cls(**payload)
        except TypeError as err:
            raise ThresholdsError(f"{path} is missing required fields: {err}") from err
        except ThresholdsError as err:
            raise ThresholdsError(f"{path}: {err}") from err

    @classmethod
    def packaged(cls, name: str) -> "Thresholds":
        """Load a thresholds file shipped with DyMU (``dymu/data/thresholds/<name>.json``)."""
        return cls.load(PACKAGED_DIR / f"{name}.json")

    # ------------------------------------------------------------ validation
    def check(self, encoder: Any, layers_run: int) -> None:
        """Fail clearly if these thresholds do not fit an encoder.

        Args:
            encoder: the encoder's :class:`EncoderSpec`, or its transformers config.
            layers_run: encoder layers DToMe will run (up to the feature layer).

        Raises:
            ThresholdsError: another encoder geometry, or fewer thresholds than layers run.
        """
        spec = encoder if isinstance(encoder, EncoderSpec) else EncoderSpec.from_config(encoder)
        if spec.fingerprint != self.encoder:
            raise ThresholdsError(
                f"these thresholds were calibrated for encoder '{self.encoder}' but the model's encoder is "
                f"'{spec.fingerprint}'; calibrate thresholds for this model with scripts/find_thresholds.py."
            )
        if self.num_layers != spec.num_layers:
            raise ThresholdsError(f"thresholds record {self.num_layers} encoder layers, the model has {spec.num_layers}.")
        if len(self.values) < layers_run:
            raise ThresholdsError(
                f"{len(self.values)} thresholds but DToMe runs {layers_run} encoder layers (feature layer "
                f"{self.feature_layer}); calibrate with the same feature layer as deployment."
            )


class BatchBudgetRule:
    """Calibration merge rule: batch-level top ``B * r_l`` per layer, recording each batch's threshold.

    Per-batch thresholds are accumulated on the device in float64 (sum and count per layer); nothing
    is synchronised to the host during the forward pass.

    Args:
        schedule: per-layer budget ``r_l`` (per image).
        device: where the accumulators live.
    """

    def __init__(self, schedule: Sequence[int], device: torch.device | str | None = None):
        self.schedule = [int(r) for r in schedule]
        self.sums = torch.zeros(len(self.schedule), dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(self.schedule), dtype=torch.float64, device=device)

    def __call__(self, layer: int, scores: torch.Tensor) -> torch.Tensor:
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
) -> Thresholds:
    """Calibrate per-layer DToMe thresholds on a stream of image batches.

    Give either ``target_tokens`` (tokens per image, CLS included, to leave at the feature layer; the
    budget ``N0 - target`` is spread with :func:`~dymu.merge.constant_schedule`) or an explicit
    per-layer ``schedule``. Under an initialised ``torch.distributed`` process group each rank passes
    its own share of batches; the per-layer sums and counts are all-reduced, so the result equals one
    process over all batches (every rank must call this function).

    Args:
        vision_model: a ``CLIPVisionModel`` or ``SiglipVisionModel`` (patched or not; left as it was).
        batches: iterable of ``(B, 3, H, W)`` preprocessed pixel batches (preprocess as at deployment).
        target_tokens: tokens per image at the feature layer (CLS included where the encoder has one).
        schedule: per-layer ``r_l`` (length = layers run).
        feature_layer: hidden-state index of the feature layer (-2 for LLaVA-1.5: 23 of 24 layers run).
        realised_batches: batches on which to measure the token count with the new thresholds
            (default: none, the field stays empty).
        progress: show tqdm progress bars (rank 0 only).
        source, extra: recorded in the result.

    Returns:
        :class:`Thresholds`.

    Raises:
        ValueError: neither or both of ``target_tokens`` / ``schedule``; a schedule of the wrong length
            or one that asks more merges than a layer can make; no batches; a batch with NaN / inf pixels.
    """
    from .patch import apply_dtome, encoder_spec, is_patched, layers_to_run, remove  # patch imports us

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
    if was_patched and vision_model._dymu.num_layers != n_run:
        raise ValueError(
            f"the vision model is already patched to run {vision_model._dymu.num_layers} layers, but "
            f"feature_layer={feature_layer} needs {n_run}; pass the same feature_layer or call dymu.remove(model)."
        )
    rule = BatchBudgetRule(schedule, device=device)
    if not was_patched:
        apply_dtome(vision_model, rule, feature_layer=feature_layer)
    try:
        n_images = torch.zeros((), dtype=torch.float64, device=device)
        for pixels in tqdm(batches, desc="calibrating thresholds", unit="batch", disable=not (progress and rank0)):
            _check_finite(pixels)
            vision_model.dtome_forward(pixels.to(device=device, dtype=dtype), merge_rule=rule)
            n_images += pixels.shape[0]
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
    )
