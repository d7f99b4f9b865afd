"""The tested transformers range: declared once, enforced when patching, equal in setup.py (issue 12)."""

import re

import pytest
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import dymu
from conftest import REPO
from dymu.patch import TESTED_TRANSFORMERS, check_transformers_version


def test_installed_release_is_in_the_tested_range():
    low, high = TESTED_TRANSFORMERS
    assert Version(low) <= Version(Version(transformers.__version__).base_version) < Version(high)


def test_setup_py_declares_the_tested_range_with_an_upper_bound():
    text = (REPO / "setup.py").read_text(encoding="utf-8")
    spec = SpecifierSet(re.search(r'"transformers([^"]+)"', text).group(1))
    low, high = TESTED_TRANSFORMERS
    assert spec == SpecifierSet(f">={low},<{high}")


@pytest.mark.parametrize("version", ["5.23.0", "5.23.4", "5.24.0", "5.24.9"])
def test_tested_releases_pass(version):
    check_transformers_version(version)


@pytest.mark.parametrize("version", ["5.22.2", "5.25.0", "5.25.0.dev0", "6.0.0", "4.57.6"])
def test_untested_releases_fail_naming_the_range(version, monkeypatch):
    monkeypatch.delenv("DYMU_ALLOW_UNTESTED_TRANSFORMERS", raising=False)
    low, high = TESTED_TRANSFORMERS
    with pytest.raises(RuntimeError, match=re.escape(f">={low},<{high}")) as err:
        check_transformers_version(version)
    assert version in str(err.value) and "pip install" in str(err.value)


def test_opt_in_turns_the_error_into_a_warning(monkeypatch):
    monkeypatch.setenv("DYMU_ALLOW_UNTESTED_TRANSFORMERS", "1")
    with pytest.warns(RuntimeWarning, match="at your own risk"):
        check_transformers_version("5.25.0")


def test_patching_on_an_untested_release_fails_before_touching_the_model(monkeypatch):
    """apply_vtu / apply_dtome check the installed release first: the model keeps its stock classes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.delenv("DYMU_ALLOW_UNTESTED_TRANSFORMERS", raising=False)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                         num_key_value_heads=2, num_hidden_layers=1, vocab_size=64))
    monkeypatch.setattr("dymu.patch._host.installed_transformers_version", lambda: "5.25.0")
    with pytest.raises(RuntimeError, match="tested on transformers"):
        dymu.apply_vtu(model)
    assert type(model) is LlamaForCausalLM and not dymu.is_patched(model.model)


def test_host_internals_marker_names_existing_modules():
    """CI's oldest-release job runs `-m host_internals`: a renamed module must not silently drop out of it."""
    from conftest import HOST_INTERNALS

    modules = {p.stem for p in (REPO / "tests").glob("test_*.py")}
    assert HOST_INTERNALS <= modules, HOST_INTERNALS - modules
    assert {"test_vtu", "test_kv_cache", "test_llava", "test_onevision"} <= HOST_INTERNALS
