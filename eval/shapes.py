"""Random-weight LLaVA models at the real checkpoints' shapes, built in memory (speed and memory benchmarks).

Weights cannot be downloaded here, and speed depends on shapes, not on weight values: the same transformers
classes at the published widths give the real FLOPs, memory traffic and kernel shapes. Token counts after
DToMe do depend on the weights, so thresholds for these models are calibrated on them (``find_thresholds``
code, :func:`eval.calibrate.calibrate`). The tokenizer is the tiny BPE one (:mod:`eval.tiny`); its ids fit
any vocab, and the LM head keeps the real vocab width.

Widths are those of the Hugging Face ports' ``config.json`` (``llava-hf/llava-1.5-7b-hf``,
``llava-hf/llava-onevision-qwen2-{0.5b,7b}-ov-hf``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from transformers import LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

from llava import DyMULlava, DyMULlavaOnevision, DyMUPipeline
from llava.onevision import OnevisionProcessor

from . import tiny

__all__ = ["Shape", "SHAPES", "build_random"]


@dataclass(frozen=True)
class Shape:
    """Widths of one LLaVA family member.

    Attributes:
        family: ``"llava15"`` (CLIP + Llama) or ``"onevision"`` (SigLIP + Qwen2, AnyRes).
        vision: ``CLIPVisionConfig`` / ``SiglipVisionConfig`` overrides of the tiny widths.
        text: ``LlamaConfig`` / ``Qwen2Config`` overrides.
    """

    family: str
    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)


_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   projection_dim=768)
_SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16)

SHAPES: dict[str, Shape] = {
    "llava15_7b": Shape("llava15", _CLIP_L_336, dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)),
    "llava15_tiny": Shape("llava15"),
    "llava_ov_0.5b": Shape("onevision", _SIGLIP_SO400M, dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936)),
    "llava_ov_7b": Shape("onevision", _SIGLIP_SO400M, dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152128)),
    "llava_ov_tiny": Shape("onevision"),
}
"""Named shapes: the 7B / 0.5B checkpoints' widths, and the embedded tiny models' (for tests)."""


def build_random(
    shape: str | Shape,
    *,
    vision_layers: int | None = None,
    llm_layers: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> DyMUPipeline:
    """A random-weight LLaVA model at ``shape``, without DyMU applied (apply it with :mod:`dymu`).

    Args:
        shape: a key of :data:`SHAPES` or a :class:`Shape`.
        vision_layers: encoder layers (default: the shape's); the feature layer keeps its relative index
            (LLaVA-1.5: second-to-last, OneVision: last).
        llm_layers: decoder layers (default: the shape's; e.g. 4 to fit a 7B-wide model on a small machine).
        dtype: weights dtype (allocated directly in it).
        device: where to build it.
        attn_implementation: ``"sdpa"`` / ``"eager"`` / ...
        seed: weights seed (the caller's RNG state is restored).

    Returns:
        :class:`~llava.llava15.DyMULlava` (or :class:`~llava.onevision.DyMULlavaOnevision`) in eval mode, no
        gradients.

    Raises:
        KeyError: unknown shape name (lists the known ones).
    """
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise KeyError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}.")
        shape = SHAPES[shape]
    vision = {**shape.vision, **({"num_hidden_layers": vision_layers} if vision_layers else {})}
    text = {**shape.text, **({"num_hidden_layers": llm_layers} if llm_layers else {})}
    if shape.family == "llava15":
        tokenizer = tiny.build_tiny_tokenizer()
        config, cls = tiny.llava15_config(tokenizer, vision, text), LlavaForConditionalGeneration
        processor = tiny.llava15_processor(tokenizer)
    elif shape.family == "onevision":
        tokenizer = tiny.onevision_tokenizer()
        config, cls = tiny.onevision_config(tokenizer, vision, text), LlavaOnevisionForConditionalGeneration
        processor = OnevisionProcessor(tokenizer, tiny.onevision_image_processor())
    else:
        raise ValueError(f"Shape.family must be 'llava15' or 'onevision', got {shape.family!r}.")
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = cls._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.eval().requires_grad_(False)
    if shape.family == "onevision":
        return DyMULlavaOnevision(model, processor, vtu=False)
    return DyMULlava(model, processor, vtu=False)
