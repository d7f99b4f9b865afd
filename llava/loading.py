"""One call from a checkpoint to a DyMU pipeline: :func:`load_model`.

It reads the checkpoint's ``config.model_type``, picks the family that serves it (:func:`llava.pipeline.family_for`:
the families register themselves), loads the processor and model with transformers, applies DToMe / VTU, and
builds the family's pipeline. Nothing here names a family.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoConfig

from dymu import apply_dtome, apply_vtu
from dymu.budget import VisualBudget
from dymu.merge import constant_schedule
from dymu.patch import layers_to_run, vision_token_count
from dymu.thresholds import PACKAGED_DIR, Thresholds, ThresholdsError

from .pipeline import FAMILIES, DyMUPipeline, family_for

__all__ = ["load_model", "resolve_thresholds", "family_options"]


def resolve_thresholds(dymu: Thresholds | str | os.PathLike | None) -> Thresholds | None:
    """Thresholds from an object, a JSON file, or a packaged name; None for ``None`` / ``"off"``.

    Raises:
        ThresholdsError: neither a readable thresholds file nor a packaged name (the message lists them).
    """
    if dymu is None or (isinstance(dymu, str) and dymu == "off"):
        return None
    if isinstance(dymu, Thresholds):
        return dymu
    path = Path(dymu)
    if path.suffix == ".json" or path.exists():
        return Thresholds.load(path)
    try:
        return Thresholds.packaged(str(dymu))
    except ThresholdsError as err:
        raise ThresholdsError(
            f"dymu={dymu!r} is neither a thresholds file nor a packaged thresholds name; packaged: "
            f"{sorted(p.stem for p in PACKAGED_DIR.glob('*.json'))}."
        ) from err


def family_options() -> set[str]:
    """The constructor keywords of every registered family (what :func:`load_model` takes as ``**options``)."""
    return {name for family in FAMILIES.values() for name in family.options}


def load_model(
    name_or_path: str | os.PathLike,
    dymu: Thresholds | str | os.PathLike | None = None,
    *,
    tome_r: Sequence[int] | None = None,
    tome_target: int | None = None,
    vtu: bool = True,
    vtu_cache: str = "merged",
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    budget: VisualBudget | dict | None = None,
    local_files_only: bool | None = None,
    **options,
) -> DyMUPipeline:
    """Load a LLaVA-1.5 or LLaVA-OneVision checkpoint (hub id or local path) with DyMU applied.

    Args:
        name_or_path: e.g. ``"llava-hf/llava-1.5-7b-hf"``, ``"llava-hf/llava-onevision-qwen2-7b-ov-hf"`` or a
            local directory from ``save_pretrained``.
        dymu: thresholds (object, JSON path, or packaged name such as
            ``"clip-vit-large-patch14-336_openai_low_published"``); ``None`` / ``"off"`` for no merging.
        tome_r: instead of thresholds, the fixed-r ToMe baseline (per-layer ``r``).
        tome_target: ToMe with the budget ``N0 - tome_target`` spread evenly over the layers run (e.g. 94 /
            209 / 393 for LLaVA-1.5: r = 21 / 16 / 8 over 23 layers).
        vtu: use virtual token unmerging in the LLM (DyMU); ``False`` feeds merged tokens at consecutive
            positions (the ablation "DToMe without VTU").
        vtu_cache: ``"merged"`` (default; KV cache of ``L_m`` rows) or ``"expanded"`` (``L`` rows), see
            :class:`~dymu.vtu.VTUInputs`.
        dtype: weights dtype (``"auto"``: as saved).
        device: where to put the model.
        attn_implementation: ``"eager"`` / ``"sdpa"`` / ... (default: transformers' choice).
        budget: default per-request :class:`~dymu.budget.VisualBudget` (threshold scale, max / min visual tokens
            per image).
        local_files_only: never contact the Hub (default: True when ``HF_HUB_OFFLINE=1``).
        options: the family's own settings, passed to its pipeline: LLaVA-1.5 ``image_aspect_ratio``
            (``"pad"`` / ``"crop"``, see :class:`~llava.llava15.DyMULlava`); LLaVA-OneVision ``layout``
            (``"faithful"`` / ``"paper"``) and ``video_pooling`` (``"merge"`` / ``"pool"``, see
            :class:`~llava.onevision.DyMULlavaOnevision`). A setting of another family is ignored, so one
            config can name them all.

    Returns:
        The family's pipeline: :class:`~llava.llava15.DyMULlava` or :class:`~llava.onevision.DyMULlavaOnevision`.

    Raises:
        OSError: the checkpoint cannot be found; the message says how to pass a local path.
        ThresholdsError: thresholds do not fit the encoder.
        NotImplementedError: a checkpoint of a model type no family serves.
        TypeError: an option no family takes.
    """
    unknown = sorted(set(options) - family_options())
    if unknown:
        raise TypeError(f"load_model got unknown keyword arguments {unknown}; family options are "
                        f"{sorted(family_options())}.")
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    kwargs = dict(local_files_only=local_files_only)
    try:
        family = family_for(AutoConfig.from_pretrained(name_or_path, **kwargs).model_type)
        processor = family.load_processor(name_or_path, **kwargs)
        model = family.model_class.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn_implementation,
                                                   **kwargs)
    except OSError as err:
        raise OSError(
            f"could not load LLaVA checkpoint '{name_or_path}': it is not a local directory and could not be "
            f"fetched from the Hugging Face Hub ({type(err).__name__}: {err}). On an offline machine download it "
            "elsewhere (e.g. `hf download llava-hf/llava-1.5-7b-hf --local-dir DIR`), copy DIR here and pass "
            "the local path (Hydra: model.name_or_path=DIR)."
        ) from err
    model.to(device).eval()
    thresholds = resolve_thresholds(dymu)
    if tome_target is not None:
        vision = model.config.vision_config
        n0, _ = vision_token_count(model.model.vision_tower)
        n_run = layers_to_run(vision.num_hidden_layers, model.config.vision_feature_layer)
        tome_r = constant_schedule(n0 - int(tome_target), n_run)
    if thresholds is not None or tome_r is not None:
        apply_dtome(model, thresholds, tome_r=list(tome_r) if tome_r is not None else None)
    if vtu:
        apply_vtu(model)
    own = {k: v for k, v in options.items() if k in family.options}
    return family(model, processor, vtu=vtu, vtu_cache=vtu_cache, budget=budget, **own)
