"""Per-layer DToMe thresholds: the data type, its small JSON file format, validation and the weights identity.

A :class:`Thresholds` holds ``tau_l`` per encoder layer plus how it was made; :class:`EncoderSpec` and
:func:`encoder_fingerprint` say which encoder it fits, :func:`weights_identity` which weights. Calibration (making
thresholds from images, DyMU Sec. 3.1) lives in :mod:`dymu.calibration`. This module needs torch only: it does not
import :mod:`dymu.patch` (which imports it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import write_text_atomic

__all__ = ["Thresholds", "ThresholdsError", "encoder_fingerprint", "EncoderSpec", "weights_identity"]

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
    ("embeddings.patch_embeddings.projection.weight", "encoder.layer.{i}.attention.k_proj.weight", None),  # DINOv2
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
    ``_IDENTITY_NAMES`` is covered: transformers ``CLIPVisionModel`` / ``SiglipVisionModel`` / ``Dinov2Model`` and open_clip /
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
