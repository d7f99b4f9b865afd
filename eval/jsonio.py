"""Strict JSON for every file the evaluation writes: no NaN / Infinity (invalid JSON that many parsers reject and
that reads like a number at a glance), and atomic replacement under a unique temporary name.

A value that is not finite becomes ``null``: a mean over no samples is unknown, not a number.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["finite", "dumps", "read_json", "write_json_atomic", "write_text_atomic"]


def finite(value: Any) -> Any:
    """``value`` with every float that is NaN or infinite (at any depth of dicts / lists / tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """``json.dumps`` of :func:`finite` ``(value)`` with ``allow_nan=False`` (so nothing non-standard can slip out)."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file strictly (``NaN`` / ``Infinity`` raise).

    Raises:
        ValueError: invalid or non-standard JSON (names the file).
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or delete it.") from err


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a uniquely named temporary file in the same folder, then replace.

    Readers see the old or the new content, never a torn file; two writers never share a temporary name.
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


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
    """:func:`write_text_atomic` of ``dumps(value, indent=2)`` plus a newline."""
    write_text_atomic(path, dumps(value, indent=2) + "\n")
