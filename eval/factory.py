"""Config -> model: a DyMU pipeline from plain config mappings (the Hydra ``model`` / ``dymu`` groups).

No Hydra import here: any mapping with the documented keys works.

``model`` keys: ``name``, ``name_or_path``, ``build`` (``"tiny_llava15"`` / ``"tiny_llava_onevision"`` to
create an embedded tiny model and its thresholds on first use, else null), ``dtype``, ``attn_implementation``,
``thresholds`` (variant -> file or packaged name), and the families' own options, passed to
:func:`llava.load_model` when set (:func:`llava.loading.family_options`: ``image_aspect_ratio`` for LLaVA-1.5,
``layout`` and ``video_pooling`` for LLaVA-OneVision).
``dymu`` keys: ``name``, ``mode`` (``off`` | ``threshold`` | ``tome``), ``variant`` (threshold mode),
``target_tokens`` (tome mode), ``vtu`` (bool), ``vtu_cache`` (``merged`` | ``expanded``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from dymu.budget import VisualBudget
from dymu.thresholds import PACKAGED_DIR, ThresholdsError
from llava import load_model
from llava.loading import family_options
from llava.pipeline import DyMUPipeline

from .tiny import ensure_embedded

__all__ = ["load_from_config", "thresholds_source", "DTYPES"]

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
"""``model.dtype`` config value -> the ``dtype`` :func:`llava.load_model` gets (``"auto"``: the checkpoint's)."""


def thresholds_source(model_cfg: Mapping, variant: str) -> str:
    """The thresholds file (or packaged name) of a model config for ``variant``.

    Raises:
        ThresholdsError: the model config has no such variant, or its file does not exist (the message
            gives the ``find_thresholds.py`` command that creates it).
    """
    table = model_cfg.get("thresholds") or {}
    if variant not in table or table[variant] in (None, ""):
        raise ThresholdsError(f"model '{model_cfg.get('name')}' defines no thresholds for dymu variant '{variant}'; "
                              f"known: {sorted(table)}.")
    source = str(table[variant])
    if not source.endswith(".json") and (PACKAGED_DIR / f"{source}.json").is_file():
        return source
    if not Path(source).is_file():
        raise ThresholdsError(
            f"thresholds for {model_cfg.get('name')} dymu={variant} not found at {source}. Calibrate them once with:\n"
            f"  python scripts/find_thresholds.py model={model_cfg.get('name')} variant={variant} "
            f"data.images=<folder of images or LLaVA JSON list>\n"
            f"(it writes {source}); or point model.thresholds.{variant}=<file>."
        )
    return source


def load_from_config(model_cfg: Mapping, dymu_cfg: Mapping, device: str = "cpu",
                     budget: Mapping | None = None, build_thresholds: bool = True) -> DyMUPipeline:
    """Load the model a ``model`` config describes, with the DyMU variant a ``dymu`` config describes.

    ``budget`` (the Hydra ``budget`` group: ``threshold_scale``, ``max_visual_tokens``, ``min_visual_tokens``)
    becomes the pipeline's default :class:`~dymu.budget.VisualBudget`; it is validated here, before any work. An
    embedded tiny model (``model.build``) is built on first use (:func:`eval.tiny.ensure_embedded`), with its
    thresholds unless ``build_thresholds=False`` (calibration builds its own).

    Raises:
        ValueError: unknown ``dymu.mode`` or ``model.dtype``.
        ThresholdsError / OSError: see :func:`thresholds_source` and :func:`llava.load_model`.
    """
    path = str(model_cfg["name_or_path"])
    if model_cfg.get("build"):
        ensure_embedded(model_cfg, thresholds=build_thresholds)
    mode = dymu_cfg.get("mode", "off")
    dtype = DTYPES.get(str(model_cfg.get("dtype", "auto")))
    if dtype is None:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {model_cfg.get('dtype')!r}.")
    kwargs = dict(
        vtu=bool(dymu_cfg.get("vtu", mode != "off")),
        vtu_cache=str(dymu_cfg.get("vtu_cache", "merged")),
        dtype=dtype,
        device=device,
        attn_implementation=model_cfg.get("attn_implementation"),
        **{key: model_cfg[key] for key in sorted(family_options()) if model_cfg.get(key) is not None},
        budget=VisualBudget.coerce(budget),
    )
    if mode == "off":
        return load_model(path, dymu=None, **kwargs)
    if mode == "threshold":
        return load_model(path, dymu=thresholds_source(model_cfg, str(dymu_cfg["variant"])), **kwargs)
    if mode == "tome":
        return load_model(path, tome_target=int(dymu_cfg["target_tokens"]), **kwargs)
    raise ValueError(f"dymu.mode must be off, threshold or tome; got {mode!r}.")
