"""Imported first by every script: a script's folder is sys.path[0], and ``scripts/eval.py`` would shadow the
``eval`` package there. Put the repository root in its place (also makes the scripts work uninstalled), then call
:func:`dymu.prepare_cpu_torchvision` before anything imports transformers (a no-op unless torchvision meets a
CPU-only torch)."""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from dymu import prepare_cpu_torchvision  # noqa: E402 - the repository root must be on sys.path first

prepare_cpu_torchvision()
