"""DyMU: Dynamic Merging (DToMe) and Virtual Unmerging (VTU) for efficient vision-language models.

Training-free: DToMe merges similar tokens inside the vision encoder with per-layer similarity
thresholds; VTU lets a RoPE language model run its per-token layers on the merged sequence while
attention reproduces the full-length sequence. Paper: Wang et al., arXiv 2504.17040.
"""

from ._compat import prepare_cpu_torchvision

prepare_cpu_torchvision()  # before transformers is imported; a no-op unless torchvision meets a CPU-only torch

from .budget import BudgetRule, TokenBudget
from .merge import FixedRRule, ThresholdRule, TokenState, constant_schedule
from .patch import (
    apply_dtome,
    apply_vtu,
    encoder_spec,
    find_decoder,
    find_vision_tower,
    is_patched,
    layers_to_run,
    remove,
    vision_token_count,
)
from .patch.vit import DToMeEncoderOutput, DToMeVisionOutput
from .thresholds import BatchBudgetRule, EncoderSpec, Thresholds, ThresholdsError, encoder_fingerprint, find_thresholds
from .vtu import VTUInputs

__version__ = "0.1.0"

__all__ = [
    "apply_dtome",
    "prepare_cpu_torchvision",
    "apply_vtu",
    "remove",
    "is_patched",
    "Thresholds",
    "ThresholdsError",
    "find_thresholds",
    "encoder_fingerprint",
    "EncoderSpec",
    "encoder_spec",
    "VTUInputs",
    "TokenState",
    "ThresholdRule",
    "FixedRRule",
    "BatchBudgetRule",
    "TokenBudget",
    "BudgetRule",
    "constant_schedule",
    "layers_to_run",
    "vision_token_count",
    "find_vision_tower",
    "find_decoder",
    "DToMeEncoderOutput",
    "DToMeVisionOutput",
]
