"""Environment glue that must run before transformers is imported (torch-only imports here)."""

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
    operators exist. Called by ``import dymu``; call it yourself before importing transformers or open_clip
    in such an environment if they come first.

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
