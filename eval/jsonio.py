"""Strict JSON for every file the evaluation writes: no NaN / Infinity (invalid JSON that many parsers reject and
that reads like a number at a glance), and atomic replacement under a unique temporary name.

A value that is not finite becomes ``null``: a mean over no samples is unknown, not a number.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dymu.atomic import write_text_atomic  # the one implementation (dymu cannot import eval)

__all__ = ["finite", "dumps", "loads", "read_json", "write_json_atomic", "write_text_atomic"]


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


def loads(text: str) -> Any:
    """``json.loads`` that refuses the non-standard constants ``NaN`` / ``Infinity``.

    Raises:
        ValueError: invalid or non-standard JSON (``json.JSONDecodeError`` is a ValueError).
    """
    return json.loads(text, parse_constant=_reject_constant)


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file strictly (``NaN`` / ``Infinity`` raise).

    Raises:
        ValueError: invalid or non-standard JSON (names the file).
    """
    path = Path(path)
    try:
        return loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or delete it.") from err


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
    """:func:`write_text_atomic` of ``dumps(value, indent=2)`` plus a newline."""
    write_text_atomic(path, dumps(value, indent=2) + "\n")
