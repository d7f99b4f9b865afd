"""Joining the torchrun process group, shared by evaluation and calibration."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

__all__ = ["process_group"]


@contextmanager
def process_group(device: str) -> Iterator[str]:
    """Under torchrun (``WORLD_SIZE > 1``) join the default process group for the block: gloo on CPU, nccl on
    CUDA with one GPU per rank (``LOCAL_RANK``); outside torchrun, or with a group already joined, do nothing.

    Args:
        device: the configured device (``"cpu"``, ``"cuda"``, ...).

    Yields:
        The device this rank uses (``cuda:<LOCAL_RANK>`` for a CUDA device under torchrun).

    The group is left (``destroy_process_group``) when the block ends, also on an error, if it was joined here.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield device
        return
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    try:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        yield device
    finally:
        dist.destroy_process_group()
