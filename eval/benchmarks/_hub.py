"""Shared helpers for benchmarks that can load their data from the Hugging Face Hub.

``datasets`` is an optional dependency: it is imported only when a benchmark loads from the Hub, and a
missing package is reported with what to install and what to pass instead (a local ``data_dir``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["default_cache", "hub_image_feature", "load_dataset"]


def default_cache(name: str) -> Path:
    """``$DYMU_CACHE_DIR/benchmarks/<name>`` (default cache dir ``~/.cache/dymu``, as in hydra_conf/paths).

    The folder where benchmark ``name`` writes the images it decodes from Hub data (not created here).
    """
    root = os.environ.get("DYMU_CACHE_DIR") or str(Path.home() / ".cache" / "dymu")
    return Path(root) / "benchmarks" / name


def _missing_datasets(hub_id: str, local_hint: str) -> ImportError:
    return ImportError(f"loading {hub_id} needs the 'datasets' package (pip install datasets), "
                       f"or pass data_dir= {local_hint}")


def load_dataset(hub_id: str, *args: Any, local_hint: str, **kwargs: Any) -> Any:
    """``datasets.load_dataset(hub_id, *args, **kwargs)``, importing ``datasets`` only now.

    Args:
        hub_id: the dataset id on the Hub.
        *args, **kwargs: passed on to ``datasets.load_dataset`` (config name, ``split=``, ...).
        local_hint: what to pass as ``data_dir`` instead, for the error message (e.g. "a local copy of GQA").

    Raises:
        ImportError: ``datasets`` is not installed; the message says to install it or pass ``data_dir=``.
    """
    try:
        from datasets import load_dataset as hf_load_dataset
    except ImportError as exc:
        raise _missing_datasets(hub_id, local_hint) from exc
    return hf_load_dataset(hub_id, *args, **kwargs)


def hub_image_feature(hub_id: str, local_hint: str) -> Any:
    """The ``datasets.Image`` feature class (to cast an image column), with :func:`load_dataset`'s error."""
    try:
        from datasets import Image
    except ImportError as exc:
        raise _missing_datasets(hub_id, local_hint) from exc
    return Image
