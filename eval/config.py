"""Typed schemas of the scripts' primary configs (``hydra_conf/{eval,speed,make_table}.yaml``).

Each yaml names its schema first in its defaults list, so Hydra checks every value's type while it composes the
config, before any folder is created or any model is loaded, and the error names the key:
``batch_size=1.5`` or ``batch_size=abc`` fail (``Value 'abc' of type 'str' could not be converted to Integer ...
full_key: batch_size``), a key that does not exist fails instead of being silently ignored, and booleans follow
OmegaConf's rules (``resume=no`` / ``false`` / ``off`` are false; ``resume=maybe`` fails) where a plain ``bool()``
would take any non-empty string as true. Value ranges (``batch_size >= 1`` ...) are checked by each script's
own check, which names the allowed range. Config groups (``model``, ``dymu``, ``benchmark``, ``budget``,
``paths``) are left untyped here: they have checks of their own (:func:`eval.check_budget`,
``dymu.Thresholds``, the benchmark constructors).

Importing :mod:`eval` registers the schemas in Hydra's ``ConfigStore``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

__all__ = ["WandbMode", "WandbConfig", "EvalConfig", "SpeedConfig", "SpeedCalibrationConfig", "MakeTableConfig",
           "register"]


class WandbMode(str, Enum):
    """``wandb.mode``: ``offline`` (default; ``wandb sync`` uploads later), ``online`` or ``disabled``."""

    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class WandbConfig:
    """``wandb`` section of ``eval.yaml`` (see :func:`eval.tracking.init_wandb`)."""

    mode: WandbMode = WandbMode.offline
    project: str = "dymu"
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    id: Optional[str] = None
    dir: str = "outputs"
    data_dir: Optional[str] = None
    cache_dir: Optional[str] = None
    layer_tokens_samples: Optional[int] = 256


@dataclass
class EvalConfig:
    """``hydra_conf/eval.yaml`` (``scripts/eval.py``): the run's own keys typed, the config groups open."""

    paths: Any = None
    model: Any = None
    dymu: Any = None
    benchmark: Any = None
    budget: Any = None
    task_name: str = "eval"
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 4
    max_new_tokens: Optional[int] = None
    limit: Optional[int] = None
    resume: bool = True
    retry_failed: bool = False
    run_name: str = "???"
    output_dir: str = "???"
    wandb: WandbConfig = field(default_factory=WandbConfig)
    threshold_set: Optional[str] = None  # experiment=ablation_threshold_data: the swept calibration image set


@dataclass
class SpeedCalibrationConfig:
    """``calibration`` section of ``speed.yaml``: thresholds for the random weights."""

    targets: dict[str, int] = field(default_factory=dict)
    max_images: int = 24
    batch_size: int = 8


@dataclass
class SpeedConfig:
    """``hydra_conf/speed.yaml`` (``scripts/benchmark.py``)."""

    paths: Any = None
    task_name: str = "speed"
    shape: str = "llava15_7b"
    vision_layers: Optional[int] = None
    llm_layers: Optional[int] = 4
    dtype: str = "bfloat16"
    device: str = "cpu"
    attn_implementation: str = "sdpa"
    seed: int = 0
    threads: Optional[int] = None
    variants: list[Any] = field(default_factory=list)  # YAML reads a bare `off` as false (eval.speed maps it back)
    images: list[str] = field(default_factory=list)
    prompt: str = "Describe the image in detail."
    decode_tokens: int = 16
    rounds: int = 3
    progress: bool = True
    calibration: SpeedCalibrationConfig = field(default_factory=SpeedCalibrationConfig)
    output_dir: str = "???"
    overwrite: bool = False


@dataclass
class MakeTableConfig:
    """``hydra_conf/make_table.yaml`` (``scripts/make_table.py``)."""

    paths: Any = None
    root: str = "outputs/eval"
    model_name: Optional[str] = None
    with_paper: bool = True
    out_dir: str = "outputs/tables"
    overwrite: bool = False


_SCHEMAS = {"eval_schema": EvalConfig, "speed_schema": SpeedConfig, "make_table_schema": MakeTableConfig}


def register() -> None:
    """Store the schemas in Hydra's ``ConfigStore`` (idempotent), as the yaml files' defaults lists expect."""
    store = ConfigStore.instance()
    for name, node in _SCHEMAS.items():
        store.store(name=name, node=node)


register()
