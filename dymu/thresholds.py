"""Per-layer DToMe thresholds: a small JSON file format, validation, and calibration.

Calibration follows DyMU Sec. 3.1 ("threshold finding") exactly as written in
``docs/dymu-method.md`` Sec. 2: per batch and layer, merge the batch-wide top ``B * r_l`` edges, record
the best edge that was not merged (clamped at 0), and average those per-batch values over all batches in
float64; under ``torch.distributed`` sums and counts are all-reduced so N ranks equal one rank over the
same batches.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import numbers
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .atomic import write_text_atomic
from .checkpoint import CalibrationCheckpoint, CheckpointError
from .merge import ThresholdRule, constant_schedule, select_batch_top

__all__ = ["Thresholds", "ThresholdsError", "BatchBudgetRule", "find_thresholds", "encoder_fingerprint", "EncoderSpec",
           "weights_identity"]

logger = logging.getLogger(__name__)

FORMAT = "dymu-thresholds"
VERSION = 1
PACKAGED_DIR = Path(__file__).parent / "data" / "thresholds"


class ThresholdsError(ValueError):
    """A thresholds file is missing, malformed, or does not fit the model it is applied to."""


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON ``true`` is not 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A real number that is not a bool; strings (``"0.99"``) are not numbers."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def encoder_fingerprint(vision_config: Any) -> str:
    """Identify an encoder's geometry, e.g. ``clip_vision_model-h1024-l24-p14-s336`` for CLIP ViT-L/14-336.

    Thresholds are only meaningful for the encoder (and weights) they were calibrated on; the geometry
    catches the common mistakes (another encoder family, size or resolution), and :func:`weights_identity`
    (recorded as ``Thresholds.weights_sha256``) tells checkpoints of one geometry apart.

    Args:
        vision_config: a transformers vision config, or an :class:`EncoderSpec` (its fingerprint is returned).
    """
    if isinstance(vision_config, EncoderSpec):
        return vision_config.fingerprint
    c = vision_config
    return f"{c.model_type}-h{c.hidden_size}-l{c.num_hidden_layers}-p{c.patch_size}-s{c.image_size}"


# Parameter names of the tensors :func:`weights_identity` hashes, per supported tower family (names relative to
# the tower): (patch embedding, key projection of block {i}, row third of a fused q/k/v weight holding the keys
# or None). transformers CLIP / SigLIP; open_clip VisionTransformer; timm VisionTransformer (open_clip TimmModel).
_IDENTITY_NAMES = (
    ("embeddings.patch_embedding.weight", "encoder.layers.{i}.self_attn.k_proj.weight", None),
    ("conv1.weight", "transformer.resblocks.{i}.attn.in_proj_weight", 1),
    ("patch_embed.proj.weight", "blocks.{i}.attn.qkv.weight", 1),
)


def _identity_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of ``t`` rounded to bfloat16 (via float32, on the CPU)."""
    t = t.detach().to("cpu", torch.float32).to(torch.bfloat16).contiguous()
    return t.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()


def weights_identity(vision_model: torch.nn.Module, num_layers: int) -> str | None:
    """Identity of the weights of a vision tower, for thresholds: a sha256 hex digest over three fixed tensors.

    Hashed, in this order, each as a label, its shape and its values: the patch embedding weight, and the key
    projection weight (for fused q/k/v weights, their key rows) of block ``0`` and of block ``num_layers - 1``
    (the first and last layers the thresholds cover, i.e. the first and last layers run at calibration). They
    are found by parameter name (``named_parameters``, relative to the tower), so any tower family in
    ``_IDENTITY_NAMES`` is covered: transformers ``CLIPVisionModel`` / ``SiglipVisionModel`` and open_clip /
    timm ``VisionTransformer`` towers. Cost: one CPU copy and hash of three ``~C^2``-sized tensors (~2.6M values
    for ViT-L).

    Dtype choice: values are rounded to bfloat16 (through float32, on the CPU) before hashing, so a checkpoint
    stored in fp32, fp16 or bf16 gives the same identity whether it is loaded in float32, float64 or bfloat16,
    and a fp16 / bf16 checkpoint in any of float32 / float64 / fp16 / bf16 (bf16 values outside fp16's range
    aside). One case differs: an fp32 checkpoint
    loaded in fp16 (double rounding changes some bf16 values), which can only cause a spurious warning.

    Args:
        vision_model: the tower (patched or not: class swaps keep parameter names).
        num_layers: how many leading blocks the thresholds cover (``len(thresholds.values)``), >= 1.

    Returns:
        64 hex characters, or ``None`` when the tower has none of the known parameter layouts or its weights
        are not materialised (``meta`` device), so no identity can be computed.

    Raises:
        ValueError: ``num_layers < 1``.
    """
    if num_layers < 1:
        raise ValueError(f"weights_identity needs num_layers >= 1, got {num_layers}.")
    params = dict(vision_model.named_parameters())
    for embed_name, key_name, third in _IDENTITY_NAMES:
        names = [embed_name, key_name.format(i=0), key_name.format(i=num_layers - 1)]
        if not all(n in params for n in names):
            continue
        tensors = [params[n] for n in names]
        if any(t.is_meta for t in tensors):
            return None
        if third is not None:  # fused [q; k; v] rows
            tensors[1:] = [t.chunk(3, dim=0)[third] for t in tensors[1:]]
        digest = hashlib.sha256(b"dymu-weights-identity-v1\n")
        for label, t in zip(("patch_embedding", "layer0.key", f"layer{num_layers - 1}.key"), tensors):
            digest.update(f"{label}:{tuple(t.shape)}\n".encode())
            digest.update(_identity_bytes(t))
        return digest.hexdigest()
    return None


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
        weights_sha256: :func:`weights_identity` of the calibration tower's weights (64 hex characters), or
            ``None`` (published values, files written before it was recorded): then applying the thresholds
            cannot check the weights (see :meth:`check_weights`).
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
    weights_sha256: str | None = None

    def __post_init__(self) -> None:
        """Validate the fields.

        Raises:
            ThresholdsError: ``values`` is not a non-empty list of finite numbers in ``[-1, 1]`` (thresholds
                are cosine similarities; calibrated ones lie in ``[0, 1]``), or there are more values than
                ``num_layers``; ``weights_sha256`` is neither None nor 64 lowercase hex characters; any field
                has the wrong type (booleans and strings are not numbers, floats are not integers: e.g.
                ``"feature_layer": "abc"``, a NaN ``target_tokens``, ``true`` as a threshold); the message names
                the field.
        """
        if isinstance(self.values, (str, bytes, dict)) or not hasattr(self.values, "__iter__"):
            raise ThresholdsError(f"thresholds 'values' must be a list of numbers, got {self.values!r}.")
        self.values = list(self.values)
        bad = [i for i, v in enumerate(self.values) if not _is_number(v)]
        if bad:  # true would silently become 1.0 (DyMU off), "0.99" a number: both are refused
            raise ThresholdsError(f"thresholds 'values' must be numbers (not booleans or strings); layers {bad} hold "
                                  f"{[self.values[i] for i in bad]!r}.")
        self.values = [float(v) for v in self.values]
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
        if not _is_int(self.num_layers) or self.num_layers < 1:
            raise ThresholdsError(f"thresholds 'num_layers' must be a positive integer, got {self.num_layers!r}.")
        self._check_types()
        if len(self.values) > self.num_layers:
            raise ThresholdsError(f"{len(self.values)} thresholds for an encoder of {self.num_layers} layers; the "
                                  "file is inconsistent: re-create it with scripts/find_thresholds.py.")
        w = self.weights_sha256
        if w is not None and not (isinstance(w, str) and len(w) == 64 and all(ch in "0123456789abcdef" for ch in w)):
            raise ThresholdsError(f"thresholds 'weights_sha256' must be null or a sha256 hex digest (64 lowercase hex "
                                  f"characters), got {w!r}; re-create the file with scripts/find_thresholds.py.")

    def _check_types(self) -> None:
        """Strict types of the fields besides ``values`` / ``num_layers`` (see :meth:`__post_init__`)."""
        def fail(name: str, want: str, value: Any) -> None:
            raise ThresholdsError(f"thresholds field '{name}' must be {want}, got {value!r} "
                                  f"({type(value).__name__}); re-create the file with scripts/find_thresholds.py.")

        if not isinstance(self.encoder, str) or not self.encoder:
            fail("encoder", "a non-empty string (the encoder fingerprint)", self.encoder)
        if not _is_int(self.feature_layer):
            fail("feature_layer", "an integer hidden-state index (e.g. -2)", self.feature_layer)
        if self.schedule is not None:
            if not isinstance(self.schedule, (list, tuple)) or not all(_is_int(r) and r >= 0 for r in self.schedule):
                fail("schedule", "null or a list of non-negative integers", self.schedule)
            self.schedule = list(self.schedule)
        for name in ("target_tokens", "num_images"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and value >= 0):
                fail(name, "null or a non-negative integer", value)
        for name in ("dtype",):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                fail(name, "null or a string", value)
        if not isinstance(self.source, str):
            fail("source", "a string", self.source)
        if not isinstance(self.extra, dict):
            fail("extra", "an object (dict)", self.extra)
        r = self.realised_tokens
        if r is not None:
            if not isinstance(r, dict):
                fail("realised_tokens", 'null or an object {"mean", "std", "num_images"}', r)
            for key, value in r.items():
                if not (_is_number(value) and math.isfinite(value) and value >= 0):
                    fail(f"realised_tokens.{key}", "a finite non-negative number", value)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the thresholds as strict JSON (never pickle). Creates parent folders. Returns the path.

        The file is replaced atomically (written under a unique temporary name in the same folder, then
        ``os.replace``): concurrent readers see the old or the new file, and concurrent writers never fail.

        Raises:
            ThresholdsError: a field (e.g. in ``extra``) holds NaN / infinity, which strict JSON cannot hold.
        """
        path = Path(path)
        payload = {"format": FORMAT, "version": VERSION, **asdict(self)}
        try:
            text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
        except ValueError as err:
            raise ThresholdsError(f"cannot save thresholds to {path}: {err} (a field holds NaN or infinity).") from err
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)  # unique temporary name + os.replace: concurrent writers and readers are safe
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

    def check_weights(self, vision_model: torch.nn.Module) -> bool:
        """Warn if these thresholds were calibrated on other weights than ``vision_model``'s.

        :meth:`check` only compares the geometry, which every checkpoint of an architecture shares; thresholds
        are calibrated on one checkpoint's similarity statistics. This compares ``weights_sha256`` with
        :func:`weights_identity` of the tower over ``len(values)`` layers and logs a WARNING naming both
        identities when they differ (a warning, not an error: fine-tuned weights may still work, and a
        dtype round trip can rarely change the identity, see :func:`weights_identity`). A file without an
        identity (published values, older files) is accepted with an INFO log.

        Args:
            vision_model: the tower the thresholds are applied to.

        Returns:
            False if the identities differ, True otherwise (same weights, or nothing to compare).
        """
        if self.weights_sha256 is None:
            logger.info("thresholds (%s) record no weights identity; cannot check they were calibrated for these "
                        "weights", self.source or self.encoder)
            return True
        actual = weights_identity(vision_model, len(self.values))
        if actual is None:
            logger.info("cannot compute the weights identity of %s (unknown layout or weights not loaded); "
                        "thresholds weights check skipped", type(vision_model).__name__)
            return True
        if actual != self.weights_sha256:
            logger.warning(
                "thresholds (%s) were calibrated on other weights: their weights identity is %s but the model's "
                "is %s (same encoder geometry %s). Token counts will not match the calibration; recalibrate "
                "for this model with scripts/find_thresholds.py.",
                self.source or "unnamed", self.weights_sha256, actual, self.encoder,
            )
            return False
        return True


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
            transformers ``CLIPVisionModel`` (CLS token) or ``SiglipVisionModel`` (no CLS); open_clip's
            ``VisionTransformer`` (``CLIP.visual``, CLS token); or timm's ``VisionTransformer`` (e.g. the trunk
            of open_clip's ``TimmModel`` SigLIP towers, ``model.visual.trunk``; CLS token if it has one
            prefix token). Not a LLaVA model: pass its vision tower. open_clip / timm towers need the
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
