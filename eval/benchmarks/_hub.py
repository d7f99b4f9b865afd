"""Shared helpers for benchmarks that can load their data from the Hugging Face Hub.

``datasets`` is an optional dependency: it is imported only when a benchmark loads from the Hub, and a
missing package is reported with what to install and what to pass instead (a local ``data_dir``).

Images decoded from Hub rows are cached under a file name made from the row's id by :func:`cache_file_name`,
which never leaves the cache folder whatever the id holds.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from dymu.atomic import write_bytes_atomic

__all__ = ["cache_dir", "cache_file", "cache_file_name", "cache_image_bytes", "default_cache", "hub_image_feature",
           "load_dataset"]

# Ids used as file names unchanged (so caches written before stay valid): letters, digits, "_", "-" and
# ".", not starting with "." (no hidden files, no "." / ".."), at most 128 characters.
_PLAIN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def default_cache(name: str) -> Path:
    """``$DYMU_CACHE_DIR/benchmarks/<name>`` (default cache dir ``~/.cache/dymu``, as in hydra_conf/paths).

    The folder where benchmark ``name`` writes the images it decodes from Hub data (not created here).
    """
    root = os.environ.get("DYMU_CACHE_DIR") or str(Path.home() / ".cache" / "dymu")
    return Path(root) / "benchmarks" / name


def cache_dir(image_cache_dir: str | os.PathLike[str] | None, name: str) -> Path:
    """The folder where benchmark ``name`` writes the images it decodes from Hub data: ``image_cache_dir`` when
    given (not empty), else :func:`default_cache` ``(name)``; not resolved, not created."""
    return Path(image_cache_dir) if image_cache_dir else default_cache(name)


def cache_file_name(row_id: object, suffix: str) -> str:
    """A file name for the cached file of a Hub row with id ``row_id``: a single name, never a path.

    An ordinary id (letters, digits, ``_``, ``-``, ``.`` not leading; at most 128 characters) gives
    ``f"{row_id}{suffix}"``, as before. Any other id (``../../x``, ``/abs``, spaces, empty, very long)
    gives a readable stem (unsafe runs replaced by ``_``, at most 48 characters) plus the first 16 hex digits
    of the id's SHA-256, e.g. ``"../../tmp/x"`` -> ``"tmp_x-<hash>.jpg"``: distinct ids keep distinct names.

    Args:
        row_id: the row's id (anything; ``str()`` of it is used).
        suffix: the file extension with its dot, e.g. ``".jpg"``; must itself be a plain extension.

    Raises:
        ValueError: ``suffix`` is not of the form ``.ext`` (letters and digits).
    """
    if not re.fullmatch(r"\.[A-Za-z0-9]+", suffix):
        raise ValueError(f"cache_file_name: suffix must look like '.jpg', got {suffix!r}")
    text = str(row_id)
    if _PLAIN_ID.fullmatch(text):
        return text + suffix
    stem = _UNSAFE.sub("_", text).strip("_")[:48] or "id"
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{stem}-{digest}{suffix}"


def cache_file(folder: Path, row_id: object, suffix: str) -> Path:
    """``folder / cache_file_name(row_id, suffix)``: the cache path of a Hub row, always directly in ``folder``.

    Raises:
        ValueError: a bad ``suffix`` (see :func:`cache_file_name`).
    """
    return Path(folder) / cache_file_name(row_id, suffix)


def cache_image_bytes(folder: Path, row_id: object, image: object, where: str, suffix: str = ".jpg") -> Path:
    """Write an undecoded Hub image (``{"bytes", "path"}``, as ``datasets.Image(decode=False)`` gives it) to
    :func:`cache_file` ``(folder, row_id, suffix)`` unless that file exists; its path.

    The row is checked first: nothing (not even ``folder``) is written for a row that fails. The file is
    written to a temporary name and then renamed, so an interrupted run leaves no truncated image behind.

    Args:
        folder: the cache folder (created when needed).
        row_id: the row's id, turned into a safe file name by :func:`cache_file_name`.
        image: the row's image value.
        where: the row's location for error messages, e.g. ``"lmms-lab/GQA row 3"``.
        suffix: the file extension.

    Raises:
        ValueError: ``image`` is not a mapping with non-empty ``bytes`` or a ``path``.
    """
    if not isinstance(image, dict) or not (image.get("bytes") or image.get("path")):
        got = "neither bytes nor a path" if isinstance(image, dict) else type(image).__name__
        raise ValueError(f"{where}: 'image' must hold the image's bytes (or a path), got {got}; "
                         "the dataset is not in the expected layout")
    path = cache_file(folder, row_id, suffix)
    if not path.is_file():
        data = image.get("bytes") or Path(image["path"]).read_bytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)  # unique temporary name: concurrent loaders never collide
    return path


def _missing_datasets(hub_id: str, local_hint: str) -> ImportError:
    return ImportError(f"loading {hub_id} needs the 'datasets' package (pip install datasets), "
                       f"or pass data_dir= {local_hint}")


def load_dataset(hub_id: str, *args: Any, local_hint: str, **kwargs: Any) -> Any:
    """``datasets.load_dataset(hub_id, *args, **kwargs)``, importing ``datasets`` only now.

    Args:
        hub_id: the dataset id on the Hub.
        *args, **kwargs: passed on to ``datasets.load_dataset`` (config name, ``split=``, ...).
        local_hint: what to pass as ``data_dir`` instead, for the error message (e.g. "a local copy of GQA").

    Raises:
        ImportError: ``datasets`` is not installed; the message says to install it or pass ``data_dir=``.
    """
    try:
        from datasets import load_dataset as hf_load_dataset
    except ImportError as exc:
        raise _missing_datasets(hub_id, local_hint) from exc
    return hf_load_dataset(hub_id, *args, **kwargs)


def hub_image_feature(hub_id: str, local_hint: str) -> Any:
    """The ``datasets.Image`` feature class (to cast an image column), with :func:`load_dataset`'s error."""
    try:
        from datasets import Image
    except ImportError as exc:
        raise _missing_datasets(hub_id, local_hint) from exc
    return Image
