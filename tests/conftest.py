"""Shared fixtures: offline settings and the embedded tiny LLaVA-1.5 (built once per session)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = REPO / "eval" / "data" / "sample" / "images"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A DYMU cache dir holding the tiny LLaVA-1.5 checkpoint and its calibrated thresholds."""
    from llava.tiny import ensure_tiny_llava15, ensure_tiny_thresholds

    cache = tmp_path_factory.mktemp("dymu_cache")
    path = ensure_tiny_llava15(cache / "llava15_tiny")
    ensure_tiny_thresholds(path)
    return cache


@pytest.fixture(scope="session")
def tiny_path(tiny_cache) -> Path:
    return tiny_cache / "llava15_tiny"


@pytest.fixture(scope="session")
def tiny_ov_path(tmp_path_factory) -> Path:
    """The embedded tiny LLaVA-OneVision checkpoint (random weights)."""
    from llava.tiny import build_tiny_llava_onevision

    return build_tiny_llava_onevision(tmp_path_factory.mktemp("tiny_ov") / "llava_ov_tiny")
