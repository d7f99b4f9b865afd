"""Atomic file writes shared by DyMU and its evaluation code (one implementation: ``eval.jsonio`` re-exports it).

Every file is written to a uniquely named temporary file in the target's folder and then renamed over the target
(``os.replace``): readers see the old or the new content, never a torn file, two writers never share a temporary
name (the last rename wins), and an interrupted write leaves the target as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_bytes_atomic", "write_text_atomic"]


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask can only be read by setting it, which races with other threads


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary path next to ``path`` to write to (e.g. ``image.save(tmp, format="PNG")``); on a clean
    exit it replaces ``path``, on an error it is removed and ``path`` is left as it was.

    The file gets the usual ``0666 & ~umask`` permissions.

    Raises:
        OSError: the folder does not exist or is not writable, or the disk is full; the message names ``path``.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _naming(err, path) from err
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would stick to the replaced file
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(err, path) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring).

    Raises:
        OSError: the folder does not exist or is not writable, or the disk is full; the message names ``path``.
    """
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see the module docstring).

    Raises:
        OSError: the folder does not exist or is not writable, or the disk is full; the message names ``path``.
    """
    write_bytes_atomic(path, text.encode("utf-8"))


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` with a message that names the file being written (ENOSPC / EFBIG name none on their own); an error
    without an errno (e.g. an image encoder's) is not a file-system error and is returned as it is."""
    if err.errno is None or str(path) in str(err):
        return err
    return OSError(err.errno, f"cannot write {path} ({err.strerror or err}); free disk space or fix the folder's "
                              "permissions, then run again")
