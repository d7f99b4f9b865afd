"""Shared fixtures: offline settings and the embedded tiny LLaVA-1.5 (built once per session)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from dymu import prepare_cpu_torchvision  # noqa: E402 - after the settings above, before transformers is imported

prepare_cpu_torchvision()  # CPU-only torch + PyPI torchvision: lets transformers' image classes and open_clip import

REPO = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = REPO / "eval" / "data" / "sample" / "images"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A DYMU cache dir holding the tiny LLaVA-1.5 checkpoint and its calibrated thresholds."""
    from eval.tiny import ensure_tiny_llava15, ensure_tiny_thresholds

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
    from eval.tiny import build_tiny_llava_onevision

    return build_tiny_llava_onevision(tmp_path_factory.mktemp("tiny_ov") / "llava_ov_tiny")


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread: a second barely helps and stalls badly on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_batch_equals_singles(out, singles, lengths) -> None:
    """Each image encoded alone (``singles``, DToMe tower outputs of batch 1) equals its row of the batched
    output ``out``: same groups and sizes, features and pooled output within 1e-5."""
    import torch

    for i, single in enumerate(singles):
        n = int(lengths[i])
        assert single.padding_mask is None and single.last_hidden_state.shape[1] == n
        assert torch.equal(single.group_ids[0], out.group_ids[i])
        assert torch.equal(single.token_sizes[0], out.token_sizes[i, :n])
        torch.testing.assert_close(single.last_hidden_state[0], out.last_hidden_state[i, :n], rtol=0, atol=1e-5)
        torch.testing.assert_close(single.pooler_output[0], out.pooler_output[i], rtol=0, atol=1e-5)


def uniform_thresholds(vision_config, value: float, feature_layer: int):
    """``dymu.Thresholds`` with the same ``value`` at every layer of the encoder ``vision_config`` describes
    (1.0 merges nothing: scores are clamped to [-1, 1] and the rule is strict)."""
    import dymu
    from dymu.thresholds import encoder_fingerprint

    n = vision_config.num_hidden_layers
    return dymu.Thresholds(values=[value] * n, encoder=encoder_fingerprint(vision_config), num_layers=n,
                           feature_layer=feature_layer)


def output_cache(out):
    """The KV cache a transformers output carries, under the field name of the installed release (``cache`` from
    transformers 5.24, ``past_key_values`` before; reading the old name on 5.24 warns)."""
    from dymu.patch._host import output_cache_field

    return getattr(out, output_cache_field(type(out)))


# Test modules that reach into transformers' internals (patched forwards, VTU, KV cache, LLaVA / OneVision glue,
# generation). CI runs them again on the oldest supported transformers release: `pytest -m host_internals`.
# Not here: torch-only kernels (test_merge*), input handling (test_robustness), the speed benchmark and merge
# maps, which reach transformers only through the modules below.
HOST_INTERNALS = {
    "test_budget", "test_calibrate", "test_compat", "test_determinism", "test_dtome_clip", "test_dtome_dinov2", "test_dtome_siglip",
    "test_float64", "test_hostile_prompts", "test_kv_cache", "test_llava", "test_onevision", "test_thresholds_identity",
    "test_tiny_llava", "test_vtu",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "host_internals: touches transformers internals; CI also runs it on the "
                                       "oldest supported transformers release")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ in HOST_INTERNALS:
            item.add_marker("host_internals")
