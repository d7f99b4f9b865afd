"""LLaVA adapters for DyMU: thin layers over transformers' ``Llava*`` classes (nothing vendored).

Note: this package's import name equals upstream LLaVA's; do not install both in one environment.
"""

from .conversation import build_prompt
from .model import DyMULlava, EncodedImages, LlavaInputs, Video, VisualBudget, expand_to_square, load_image, load_model

__all__ = ["load_model", "DyMULlava", "Video", "VisualBudget", "EncodedImages", "LlavaInputs", "build_prompt",
           "expand_to_square", "load_image"]
