"""The interface every benchmark implements: samples, their prompts, and scoring."""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ALLOW_EXTERNAL_HINT", "Benchmark", "Sample", "check_data_file", "check_data_folder", "check_limit",
           "data_path", "iter_jsonl", "load_json", "load_local_or_hub"]

T = TypeVar("T")


@dataclass
class Sample:
    """One benchmark question."""

    id: str  # unique within the benchmark
    image_paths: list[str]  # absolute paths of the images the prompt refers to, in order
    question: str  # the question text as in the data file
    answers: list[str]  # acceptable reference answers
    answer_type: str  # task-specific, e.g. "yes_no" | "short" | "multiple_choice" | "open"
    meta: dict  # anything else from the data file (options, category, split, ...)
    video_path: str | None = None  # video tasks: a video file, or a folder of extracted frames


def check_limit(limit: int | None) -> None:
    """Raise ``ValueError`` unless ``limit`` (samples to keep) is None or >= 0."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")


def load_local_or_hub(
    data_dir: str | os.PathLike[str] | None,
    hub_id: str | None,
    load_local: Callable[[Path], T],
    load_hub: Callable[[str], T],
    missing: str,
    *,
    resolve: bool = False,
) -> tuple[T, Path | None]:
    """A benchmark's data from its local folder or, when there is none, from a Hugging Face dataset.

    The choice every benchmark constructor with ``data_dir`` / ``hub_id`` arguments makes: a given
    ``data_dir`` wins (even with ``hub_id`` set); without it a non-empty ``hub_id`` is loaded; with
    neither, nothing is loaded.

    Args:
        data_dir: the local data folder, or None.
        hub_id: the Hugging Face dataset id used when ``data_dir`` is None (None or "" for none).
        load_local: loads the folder (called with ``Path(data_dir)``, resolved when ``resolve``).
        load_hub: loads the dataset (called with ``hub_id``).
        missing: the ``ValueError`` message for neither, naming the benchmark and what to pass.
        resolve: give ``load_local`` (and return) the resolved, absolute folder.

    Returns:
        ``(what the loader returned, the folder given to load_local)``; the folder is None when the data came
        from the Hub.

    Raises:
        ValueError: ``data_dir`` is None and ``hub_id`` is empty (message ``missing``).
        Whatever ``load_local`` / ``load_hub`` raise (missing files, malformed rows, no ``datasets``).
    """
    if data_dir is not None:
        folder = Path(data_dir).resolve() if resolve else Path(data_dir)
        return load_local(folder), folder
    if hub_id:
        return load_hub(hub_id), None
    raise ValueError(missing)


def check_data_folder(data_dir: Path, title: str, download_hint: str, hub_id: str | None) -> None:
    """Raise ``FileNotFoundError`` unless the local data folder ``data_dir`` exists.

    Args:
        data_dir: the folder.
        title: the benchmark's name for the message, e.g. ``"GQA"``.
        download_hint: how to get the data, e.g. ``"download GQA's questions ... from https://..."``.
        hub_id: the benchmark's Hugging Face dataset id; when set, the message offers ``data_dir=null`` to load it.

    Raises:
        FileNotFoundError: ``data_dir`` is not a folder; the message says where to get the data.
    """
    if not data_dir.is_dir():
        hub = f", or set data_dir=null (benchmark.task.data_dir=null) to load {hub_id} from the Hub" if hub_id else ""
        raise FileNotFoundError(f"{title} data folder {data_dir} does not exist; {download_hint} into it{hub}")


def check_data_file(path: Path, data_dir: Path, download_hint: str, hub_id: str | None) -> None:
    """Raise ``FileNotFoundError`` unless ``path``, the data file a benchmark reads from ``data_dir``, exists.

    Args:
        path: the file (in ``data_dir``).
        data_dir: the data folder, named (resolved) in the message as where to put the file.
        download_hint: how to get the file, e.g. ``"download https://.../file.tsv"``.
        hub_id: the Hugging Face dataset loaded with ``data_dir=null`` instead, for the message.

    Raises:
        FileNotFoundError: ``path`` is not a file; the message says where to get it and the Hub alternative.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; {download_hint} into {data_dir.resolve()} "
            f"(or pass data_dir=null to load the Hugging Face dataset {hub_id!r})"
        )


ALLOW_EXTERNAL_HINT = (
    "if you trust this file, pass allow_external_images=True (Hydra: benchmark.task.allow_external_images=true)"
)


def data_path(folder: Path, name: str, data_dir: Path, where: str, *, allow_external: bool = False,
              what: str = "image") -> Path:
    """``folder / name`` for a file ``name`` that a benchmark file names, kept inside ``data_dir``.

    Benchmark files (questions JSON / JSONL, ...) name their images relative to a folder of the data folder.
    A name that is absolute or climbs out with ``..`` would make the benchmark read (and show the model, or
    a judge) any file on the machine, so it is refused unless the user opts in. The check is on the path as
    written (``..`` collapsed, symlinks not followed): a data folder whose ``images/`` is a symlink to a
    shared copy (e.g. COCO's ``val2014``) keeps working.

    Args:
        folder: the folder ``name`` is relative to (``data_dir`` or a folder inside it).
        name: the path as the benchmark file gives it.
        data_dir: the data folder ``name`` must stay in.
        where: the location for the error message, e.g. ``"questions.jsonl:3"``.
        allow_external: accept any path (the user trusts the file): ``allow_external_images=True``.
        what: what the path is, for the message ("image", "video").

    Returns:
        ``folder / name`` (not resolved, not checked for existence).

    Raises:
        ValueError: ``name`` leads outside ``data_dir`` and ``allow_external`` is False; the message names
            ``where``, the path, the data folder and the opt-in.
    """
    path = Path(folder) / name
    if allow_external:
        return path
    root = os.path.abspath(data_dir)
    target = os.path.abspath(path)  # lexical: "a/../b" -> "b"; symlinks untouched
    if os.path.commonpath([root, target]) != root:
        raise ValueError(
            f"{where}: {what} path {name!r} leads outside the data folder {root} (to {target}); benchmark files "
            f"may only name {what}s inside their data folder. Fix the path, or {ALLOW_EXTERNAL_HINT}"
        )
    return path


def load_json(path: Path, fix: str) -> Any:
    """The content of the JSON data file ``path`` (a benchmark's questions, OCR tokens, splits, ...).

    Args:
        path: the file.
        fix: what to do about a broken file, for the message, e.g. ``"use the official file"``.

    Returns:
        The parsed JSON value (not checked for shape).

    Raises:
        ValueError: the file is not valid JSON; ``"<path>:<line>: not valid JSON (<reason>); <fix>"``.
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); {fix}") from exc


def iter_jsonl(path: Path) -> Iterator[tuple[int, str, dict]]:
    """``(line number, "<path>:<line>", object)`` for every non-blank line of a JSONL file.

    Raises:
        ValueError: a line that is not JSON or not a JSON object (the message names file and line).
    """
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg}); write one JSON object per line") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield line_number, where, row


class Benchmark(abc.ABC):
    """A set of questions with a prompt format and a scoring rule.

    Subclasses set ``name`` and implement ``samples``, ``prompt`` and ``score``; they may override
    ``max_new_tokens`` (answer length the task needs) and :meth:`visual_inputs` (e.g. video frames).
    """

    name: str
    max_new_tokens: int = 16

    def samples(self) -> list[Sample]:
        """All samples of the benchmark (after ``limit``), in a fixed order: those the subclass loaded into
        ``self._samples``."""
        return list(self._samples)

    @abc.abstractmethod
    def prompt(self, sample: Sample) -> str:
        """The user turn's text (without the image placeholder), e.g. the question plus an answer-format instruction."""

    def visual_inputs(self, sample: Sample) -> list:
        """What the model sees for a sample, in placeholder order: image paths (default), or e.g.
        ``llava.Video`` frames for video tasks."""
        return list(sample.image_paths)

    @abc.abstractmethod
    def score(self, records: list[dict]) -> dict[str, float | None]:
        """Metrics from prediction records; each record has 'id', 'prediction', 'answers', 'answer_type' and the
        sample's 'meta' (so scores can be grouped by split / category).

        A metric that cannot be computed yet (e.g. an LLM judge without an API key) is ``None``: reported as
        pending, never as zero.
        """
