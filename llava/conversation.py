"""LLaVA-1.5's conversation prompt (the "vicuna_v1" template it was instruction-tuned with).

Facts from the LLaVA-1.5 paper / release: a fixed system sentence, turns marked ``USER:`` and
``ASSISTANT:``, the image placeholder ``<image>`` followed by a newline before the question, and for
short-answer benchmarks the instruction "Answer the question using a single word or phrase."
"""

from __future__ import annotations

__all__ = ["SYSTEM_VICUNA_V1", "IMAGE_PLACEHOLDER", "build_prompt"]

SYSTEM_VICUNA_V1 = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_PLACEHOLDER = "<image>"


def build_prompt(question: str, num_images: int = 1, system: str = SYSTEM_VICUNA_V1) -> str:
    """One-turn LLaVA-1.5 prompt ending with ``ASSISTANT:`` (the model's answer follows).

    Args:
        question: the user's text. If it already contains ``<image>`` placeholders they are kept as
            they are (their count must match the images passed later; the tokenizer reads every
            ``<image>`` as an image slot, so the literal text cannot be asked about); otherwise
            ``num_images`` placeholders are put before it, each followed by a newline, as LLaVA-1.5 does.
            (``DyMULlava.prompt`` also refuses a question whose placeholders do not match its images.)
        num_images: images the prompt refers to.
        system: the system sentence.

    Raises:
        TypeError: ``question`` is not a str.
        ValueError: empty question.
    """
    if not isinstance(question, str):
        raise TypeError(f"the question is {type(question).__name__} ({question!r:.60}), not a string; pass the text "
                        "as a str.")
    if not question or not question.strip():
        raise ValueError("the question is empty; pass the text to ask about the image.")
    if IMAGE_PLACEHOLDER not in question:
        question = (IMAGE_PLACEHOLDER + "\n") * num_images + question
    return f"{system} USER: {question} ASSISTANT:"
