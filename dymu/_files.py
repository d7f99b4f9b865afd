"""Atomic file writes shared by DyMU and its evaluation code (one implementation: ``eval.jsonio`` re-exports it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_text_atomic"]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a uniquely named temporary file in the same folder, then replace.

    Readers see the old or the new content, never a torn file; two writers never share a temporary name
    (the last ``os.replace`` wins). The file gets the usual ``0666 & ~umask`` permissions.

    Raises:
        OSError: the folder does not exist or is not writable (the temporary file is removed).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would stick to the replaced file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
