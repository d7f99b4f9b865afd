"""LLaVA adapters for DyMU: thin layers over transformers' VLM classes (nothing vendored).

One shared pipeline (:mod:`llava.pipeline`) and one module per model family: LLaVA-1.5 (:mod:`llava.llava15`)
and LLaVA-OneVision (:mod:`llava.onevision`); images and videos (:mod:`llava.images`) and prompt formats
(:mod:`llava.prompts`) in their own modules; :func:`load_model` (:mod:`llava.loading`) picks the family from
the checkpoint's config.

Note: this package's import name equals upstream LLaVA's; do not install both in one environment.
"""

from dymu.budget import VisualBudget

from . import llava15, onevision  # noqa: F401 - the families register themselves with the pipeline
from .images import Video, expand_to_square, load_image
from .llava15 import DyMULlava
from .loading import load_model
from .onevision import DyMULlavaOnevision
from .pipeline import DyMUPipeline, EncodedImages, LlavaInputs
from .prompts import build_prompt

__all__ = ["load_model", "DyMUPipeline", "DyMULlava", "DyMULlavaOnevision", "Video", "VisualBudget",
           "EncodedImages", "LlavaInputs", "build_prompt", "expand_to_square", "load_image"]
