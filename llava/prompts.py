"""Prompt formats: the checkpoint's own chat template where it ships one, hand-written fallbacks otherwise.

A pipeline asks :func:`chat_prompt` first: it renders the processor's (or tokenizer's) ``chat_template``
with ``apply_chat_template``, as transformers users do. Checkpoints without a template get the
hand-written formats below, which tests check equal to the templates the embedded tiny checkpoints ship
(written to match the formats the models were trained with):

- LLaVA-1.5: the "vicuna_v1" template it was instruction-tuned with (LLaVA-1.5 paper / release): a fixed
  system sentence, turns marked ``USER:`` and ``ASSISTANT:``, each image placeholder ``<image>`` followed by a
  newline before the question.
- LLaVA-OneVision: Qwen2's chat format (``<|im_start|>role\n...<|im_end|>``) with the system message
  "You are a helpful assistant." (the one lmms-eval's LLaVA-OneVision uses).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

__all__ = ["SYSTEM_VICUNA_V1", "QWEN_SYSTEM", "IMAGE_PLACEHOLDER", "VIDEO_PLACEHOLDER", "build_prompt",
           "build_onevision_prompt", "chat_prompt", "chat_template_of", "check_text", "require_question"]

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
QWEN_SYSTEM = "You are a helpful assistant."

SYSTEM_VICUNA_V1 = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def require_question(question: object) -> None:
    """A question must be a non-blank str, whichever format renders it.

    Raises:
        TypeError: not a str.
        ValueError: empty or blank.
    """
    if not isinstance(question, str):
        raise TypeError(f"the question is {type(question).__name__} ({question!r:.60}), not a string; pass the text "
                        "as a str.")
    if not question or not question.strip():
        raise ValueError("the question is empty; pass the text to ask about the image.")


def build_prompt(question: str, num_images: int = 1, system: str = SYSTEM_VICUNA_V1) -> str:
    """One-turn LLaVA-1.5 prompt ending with ``ASSISTANT:`` (the model's answer follows).

    Args:
        question: the user's text. If it already contains ``<image>`` placeholders they are kept as
            they are (their count must match the images passed later; the tokenizer reads every
            ``<image>`` as an image slot, so the literal text cannot be asked about); otherwise
            ``num_images`` placeholders are put before it, each followed by a newline, as LLaVA-1.5 does.
            (``DyMUPipeline.prompt`` also refuses a question whose placeholders do not match its images.)
        num_images: images the prompt refers to.
        system: the system sentence.

    Raises:
        TypeError: ``question`` is not a str.
        ValueError: empty question.
    """
    require_question(question)
    if IMAGE_PLACEHOLDER not in question:
        question = (IMAGE_PLACEHOLDER + "\n") * num_images + question
    return f"{system} USER: {question} ASSISTANT:"


def build_onevision_prompt(question: str, placeholders: int | Sequence[str] = 1, system: str = QWEN_SYSTEM) -> str:
    """One-turn LLaVA-OneVision (Qwen2 chat) prompt ending where the assistant's answer starts.

    Args:
        question: the user's text; if it already contains ``<image>`` / ``<video>`` placeholders it is used
            as it is.
        placeholders: how many ``<image>`` placeholders to put before the question, or the placeholders
            themselves in order (e.g. ``["<video>"]``); each is followed by a newline.
        system: the system message.

    Raises:
        TypeError: ``question`` is not a str.
        ValueError: empty question.
    """
    require_question(question)
    if isinstance(placeholders, int):
        placeholders = ["<image>"] * placeholders
    if "<image>" not in question and "<video>" not in question:
        question = "".join(f"{p}\n" for p in placeholders) + question
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


def chat_template_of(processor) -> str | None:
    """The chat template a checkpoint ships: its processor's ``chat_template``, else its tokenizer's; None if
    neither has one."""
    for owner in (processor, getattr(processor, "tokenizer", None)):
        template = getattr(owner, "chat_template", None)
        if isinstance(template, str) and template:
            return template
    return None


def chat_prompt(processor, question: str, placeholders: Sequence[str], system: str | None = None,
                marks: Sequence[str] = (IMAGE_PLACEHOLDER,)) -> str | None:
    """One-turn prompt rendered with the checkpoint's own chat template, ending where the answer starts.

    The conversation is the one transformers' multimodal templates take: an optional system message, then a
    user message whose content is one ``{"type": "image"}`` / ``{"type": "video"}`` item per placeholder (in
    order) and the question as a text item; rendered with ``add_generation_prompt=True``, untokenised. A
    question that already holds its placeholders (any of ``marks``) gets no visual items (the template would
    add more).

    The rendered prompt must hold exactly ``placeholders``, in order (the slots the inputs fill). Templates that
    group items by type (llava-hf's LLaVA-OneVision template writes every ``<image>`` before every ``<video>``)
    cannot place a prompt of images and videos interleaved; then None is returned and the caller uses its
    hand-written format, which keeps the input order (logged once per template).

    Args:
        processor: the checkpoint's processor (or any object with ``.tokenizer``); its ``chat_template`` is
            used, else the tokenizer's.
        question: the user's text.
        placeholders: ``"<image>"`` / ``"<video>"`` per visual input, in order.
        system: the system message, or None for none.
        marks: the placeholders the family's tokenizer reads as slots (LLaVA-1.5: ``<image>`` only).

    Returns:
        The prompt, or None when the checkpoint ships no chat template or its template cannot place the inputs
        in order (use the hand-written format then).
    """
    template = chat_template_of(processor)
    if template is None:
        return None
    has_own = any(mark in question for mark in marks)
    items = [] if has_own else [{"type": p.strip("<>")} for p in placeholders]
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system is not None else []
    messages.append({"role": "user", "content": [*items, {"type": "text", "text": question}]})
    rendered = processor.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                       add_generation_prompt=True)
    expected = _slots(question, marks) if has_own else list(placeholders)
    if _slots(rendered, marks) != expected:
        if template not in _MISPLACING:
            _MISPLACING.add(template)
            logger.warning("the checkpoint's chat template does not place %s in input order (it wrote %s); "
                           "such prompts use the hand-written format", expected, _slots(rendered, marks))
        return None
    return rendered


_MISPLACING: set[str] = set()  # templates already reported by chat_prompt


def _slots(text: str, marks: Sequence[str]) -> list[str]:
    """The placeholders in ``text``, in order of appearance."""
    pattern = "|".join(re.escape(mark) for mark in marks)
    return re.findall(pattern, text) if pattern else []


def check_text(name: str, text: object) -> None:
    """``text`` (a question or prompt, ``name`` says which) must be a ``str`` of valid Unicode.

    The tokenizers fail on anything else with a raw ``TypeError`` that names neither the prompt nor the cause.

    Raises:
        TypeError: not a ``str``.
        ValueError: it holds a lone surrogate (``"\\ud800"``), which is not Unicode text and cannot be encoded.
    """
    if not isinstance(text, str):
        hint = " (decode bytes first: text.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ""
        raise TypeError(f"{name} is {type(text).__name__} ({text!r:.60}), not a string; pass the text as a str{hint}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{name} holds a lone surrogate U+{ord(text[err.start]):04X} at character {err.start} "
            f"({text[:err.start][-30:]!r} precedes it), which is not valid Unicode text (typically text decoded with errors='surrogateescape' or a "
            "JSON '\\ud83d' escape without its pair); repair the text, e.g. text.encode('utf-8', "
            "'replace').decode('utf-8') puts '?' in its place."
        ) from None
