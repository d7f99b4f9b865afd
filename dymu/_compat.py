"""Environment glue that must run before transformers is imported (torch-only imports here; nothing runs on import)."""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["prepare_cpu_torchvision"]

_LIBRARY = None


def prepare_cpu_torchvision() -> bool:
    """Let PyPI's (CUDA-built) torchvision import on a CPU-only torch build.

    torchvision's meta registrations expect the ``torchvision::nms`` / ``qnms`` operators that its compiled
    extension provides; with a CPU-only torch the extension does not load and importing torchvision (and so
    transformers' image classes, and open_clip) fails. Defining the two schemas is enough for importing;
    detection ops stay unusable. Does nothing when torch has CUDA, torchvision is not installed, or the
    operators exist, and when called again. ``import dymu`` does not call it (``import dymu`` does not import
    transformers either): call it explicitly, first, in a program that imports transformers' image classes or
    open_clip in such an environment. DyMU's entry points do (``scripts/_bootstrap.py``, ``tests/conftest.py``,
    ``eval/lmms_plugin.py``). It must run before torchvision is first imported; afterwards it is too late.

    Returns:
        True if the schemas were defined by this call.
    """
    global _LIBRARY
    if _LIBRARY is not None or torch.version.cuda is not None or importlib.util.find_spec("torchvision") is None:
        return False
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return False
    except RuntimeError:
        pass
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True
