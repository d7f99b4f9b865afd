"""One writer per output folder: an exclusive lock (``filelock``) held while a run writes there.

Two identical ``scripts/eval.py`` commands started together would otherwise both find no predictions and both
evaluate every sample into one ``predictions.jsonl``. The lock is an OS file lock (``flock``) on
``<folder>/.dymu.lock``, so it is released when the holder exits, even when it is killed, and a stale lock file
left behind blocks nobody. The holder (host, pid, start time, command) is written beside it
(``.dymu.lock.owner.json``), so the second run can say who holds the folder.

The lock is reentrant within a process (the runner takes it again inside ``eval.main``'s hold). It protects
folders on a local disk; network file systems may not implement ``flock`` faithfully.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .jsonio import dumps, write_text_atomic

__all__ = ["OutputLockedError", "output_lock", "LOCK_NAME"]

LOCK_NAME = ".dymu.lock"
OWNER_NAME = ".dymu.lock.owner.json"

_held: dict[Path, int] = {}  # folder -> nesting depth of this process's hold


class OutputLockedError(RuntimeError):
    """Another process is writing into the output folder."""


OWNER_WAIT_S = 2.0
"""How long a refused run waits for the holder's owner file: the holder writes it just after taking the lock."""


def _owner(folder: Path, wait_s: float = OWNER_WAIT_S) -> str:
    """Who holds ``folder``, from its owner file; read again for up to ``wait_s`` seconds while it is missing or
    partial (the holder may have taken the lock and not written it yet)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            owner = json.loads((folder / OWNER_NAME).read_text(encoding="utf-8"))
            return (f"pid {owner['pid']} on {owner['host']}, started {owner['started']}: "
                    f"{owner['command']}")
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() >= deadline:
                return "another process (its owner file is unreadable)"
            time.sleep(0.05)


@contextmanager
def output_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock of ``folder`` (created if missing) for the ``with`` block; fail at once if taken.

    Raises:
        OutputLockedError: another process holds the folder; the message names it (pid, host, start, command)
            and what to do. Nothing in the folder is touched.
    """
    folder = Path(folder).absolute()
    if _held.get(folder):
        _held[folder] += 1
        try:
            yield
        finally:
            _held[folder] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputLockedError(
            f"{folder} is in use by {_owner(folder)}. Two runs must not write into one output folder: wait for "
            "it to finish (then re-run to resume), or choose another output_dir.") from None
    _held[folder] = 1
    try:
        write_text_atomic(folder / OWNER_NAME, dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": shlex.join(sys.orig_argv)[:500]}) + "\n")
        yield
    finally:
        del _held[folder]
        (folder / OWNER_NAME).unlink(missing_ok=True)  # no stale owner for the next refused run to report
        lock.release()
