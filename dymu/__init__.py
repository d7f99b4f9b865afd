"""DyMU: Dynamic Merging (DToMe) and Virtual Unmerging (VTU) for efficient vision-language models.

Training-free: DToMe merges similar tokens inside the vision encoder with per-layer similarity
thresholds; VTU lets a RoPE language model run its per-token layers on the merged sequence while
attention reproduces the full-length sequence. Paper: Wang et al., arXiv 2504.17040.

``import dymu`` imports torch and DyMU's torch-only modules, not transformers: the names that need transformers
(the patches, budgets and calibration, from :mod:`dymu.patch`, :mod:`dymu.budget` and :mod:`dymu.calibration`) are imported on first use. So
on a CPU-only torch with PyPI's torchvision, :func:`prepare_cpu_torchvision` can be called after ``import dymu``
and before transformers or open_clip is imported; ``import dymu`` does not call it. The public API is
``__all__``; everything else is imported from its submodule (``dymu.patch``, ``dymu.merge``, ``dymu.thresholds``,
``dymu.calibration``, ``dymu.patch.vit``, ...).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._compat import prepare_cpu_torchvision
from .merge import FixedRRule, ThresholdRule
from .thresholds import Thresholds, ThresholdsError
from .vtu import VTUInputs

if TYPE_CHECKING:  # imported on first use, see __getattr__: these modules import transformers
    from .budget import VisualBudget, encode_under_budget
    from .calibration import find_thresholds
    from .patch import apply_dtome, apply_vtu, dtome_settings, is_patched, remove

__version__ = "0.1.0"

__all__ = [
    "apply_dtome",
    "apply_vtu",
    "remove",
    "is_patched",
    "dtome_settings",
    "Thresholds",
    "ThresholdsError",
    "find_thresholds",
    "VTUInputs",
    "ThresholdRule",
    "FixedRRule",
    "VisualBudget",
    "encode_under_budget",
    "prepare_cpu_torchvision",
]

# public name -> the submodule it comes from, for the names imported on first use
_ON_FIRST_USE = {
    "apply_dtome": "patch",
    "apply_vtu": "patch",
    "remove": "patch",
    "is_patched": "patch",
    "dtome_settings": "patch",
    "find_thresholds": "calibration",
    "VisualBudget": "budget",
    "encode_under_budget": "budget",
}


def __getattr__(name: str):
    """Import a name of ``_ON_FIRST_USE`` from its submodule on first access (then it is a plain attribute).

    Raises:
        AttributeError: ``name`` is not such a name (nor another attribute of the package).
    """
    module = _ON_FIRST_USE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
