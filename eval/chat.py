"""One-shot chat: answer a prompt about an image, report the visual tokens, save the merge map.

What ``scripts/chat.py`` runs; takes plain mappings (the Hydra ``chat`` config), no Hydra import.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dymu.vis import save_png
from llava import load_image

from .factory import load_from_config

__all__ = ["ChatArgumentError", "ChatResult", "chat_from_config", "check_chat_args", "free_path"]

logger = logging.getLogger(__name__)

EXAMPLE = ('python scripts/chat.py model=llava15_tiny dymu=mid image=eval/data/sample/images/coffee.jpg '
           'prompt="What is this?"')
_MISSING = "???"  # OmegaConf's mandatory-value marker, as ``OmegaConf.to_container`` leaves it


class ChatArgumentError(ValueError):
    """A required chat argument (``image``, ``prompt``) is missing or empty; the message names it."""


def check_chat_args(cfg: Mapping) -> None:
    """Fail before the model loads when ``image`` or ``prompt`` is absent, empty or Hydra's unset ``???``.

    Raises:
        ChatArgumentError: naming every missing argument, with an example command.
    """
    problems = []
    for key in ("image", "prompt"):
        value = cfg.get(key)
        if value is None or str(value).strip() == _MISSING:
            problems.append(f"{key}= is missing")
        elif not str(value).strip():
            problems.append(f"{key} is empty")
    if problems:
        raise ChatArgumentError(f"{' and '.join(problems)}: pass the image path (image=PATH) and the question "
                                f'(prompt="..."), e.g.\n  {EXAMPLE}')


@dataclass
class ChatResult:
    """What one chat turn produced.

    Attributes:
        answer: the model's answer.
        visual_tokens: visual tokens the LLM got for the image.
        unmerged_visual_tokens: what the unmodified model would get (576 for LLaVA-1.5).
        merge_map: the saved PNG, or None (``merge_map=null``, or no DToMe in the tower).
    """

    answer: str
    visual_tokens: int
    unmerged_visual_tokens: int
    merge_map: Path | None

    def report(self) -> str:
        """The lines the script prints."""
        ratio = self.visual_tokens / self.unmerged_visual_tokens
        lines = [self.answer, "",
                 f"visual tokens: {self.visual_tokens} (unmodified model: {self.unmerged_visual_tokens}, {ratio:.0%})"]
        if self.merge_map is not None:
            lines.append(f"merge map: {self.merge_map}")
        return "\n".join(lines)


def free_path(path: Path, overwrite: bool) -> Path:
    """``path`` itself if it is free (or ``overwrite``), else the first free ``stem-1.png``, ``stem-2.png``, ..."""
    if overwrite or not path.exists():
        return path
    k = 1
    while (candidate := path.with_name(f"{path.stem}-{k}{path.suffix}")).exists():
        k += 1
    return candidate


def chat_from_config(cfg: Mapping) -> ChatResult:
    """Run one chat turn described by the ``chat`` config (see ``hydra_conf/chat.yaml``).

    Keys: ``model``, ``dymu``, ``budget`` (config groups as in ``eval``), ``image`` (path), ``prompt``,
    ``max_new_tokens``, ``device``, ``merge_map`` (PNG path; null: none), ``overwrite`` (replace an existing
    PNG; otherwise a free name ``<stem>-<k>.png`` is used and nothing is lost).

    Raises:
        ChatArgumentError: (a ValueError) ``image`` or ``prompt`` missing or empty (:func:`check_chat_args`).
        ValueError: an unreadable image (named) or a bad budget; before the model loads where possible.
        FileNotFoundError: the image does not exist.
    """
    check_chat_args(cfg)
    prompt = str(cfg["prompt"]).strip()
    image_path = Path(str(cfg["image"]))
    if not image_path.is_file():
        raise FileNotFoundError(f"image {image_path} does not exist; pass image=PATH to an image file.")
    image = load_image(image_path)  # fails clearly on a corrupt file before the model loads
    pipe = load_from_config(cfg["model"], cfg["dymu"], device=str(cfg.get("device", "cpu")), budget=cfg.get("budget"))
    answers, inputs = pipe.generate([prompt], [image], max_new_tokens=int(cfg.get("max_new_tokens", 128)))
    saved = None
    if cfg.get("merge_map"):
        import dymu

        if dymu.is_patched(pipe.tower):
            png = pipe.merge_map(image, layers=list(cfg.get("merge_map_layers") or []) or None)
            saved = save_png(png, free_path(Path(str(cfg["merge_map"])), bool(cfg.get("overwrite", False))))
        else:
            logger.warning("no merge map: dymu=%s runs the unmodified vision tower", cfg["dymu"].get("name"))
    return ChatResult(answers[0], inputs.visual_tokens[0], inputs.unmerged_visual_tokens[0], saved)
