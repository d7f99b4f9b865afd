"""What a new user meets first: the README's promises (Python version, extras, the example metrics.json, the
offline failure of the real model) and the scripts' answers to the usual first mistakes (chat without
``image=`` / ``prompt=``, an invalid budget override). Scripts run as subprocesses, offline, as a user runs them."""

import ast
import json
import os
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from eval import budget_tag, check_budget

README = (REPO / "README.md").read_text(encoding="utf-8")


def run_script(args, tmp_path, **env):
    """Run a script from a fresh folder with empty cache / output dirs (nothing built before)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               DYMU_CACHE_DIR=str(tmp_path / "cache"), DYMU_OUTPUT_DIR=str(tmp_path / "outputs"),
               HF_HOME=str(tmp_path / "hf"), **env)
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def setup_kwargs() -> dict:
    """The literal keyword arguments of setup() in setup.py (read, not executed)."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords
            if k.arg in ("python_requires", "extras_require")}


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower()


def readme_metrics_example() -> dict:
    """The example metrics.json of the README's "What a healthy tiny run looks like"."""
    section = README[README.index("### What a healthy tiny run looks like"):]
    return json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))


def test_readme_states_the_python_version_setup_py_requires():
    assert setup_kwargs()["python_requires"] == ">=3.10"
    assert "Python 3.10+ (tested on 3.11)" in README


def test_readme_install_covers_cpu_only_and_gpu_machines():
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in README
    assert re.search(r"^pip install torch +# GPU machine", README, re.M)


def test_every_extra_the_readme_names_exists_and_its_table_row_lists_setup_py():
    extras = setup_kwargs()["extras_require"]
    named = {name for group in re.findall(r'\.\[([a-z,]+)\]', README) for name in group.split(",")}
    assert named and named <= set(extras), named - set(extras)
    table = README[README.index("Extras (`pip install"):README.index("`openclip` and `lmms` need torchvision")]
    rows = dict(re.findall(r"^\| `([a-z]+)` \| ([^|]+) \|", table, re.M))
    assert set(rows) == set(extras)
    for extra, adds in rows.items():
        shown = {a.split()[0].lower() for a in adds.split(",")}
        assert shown == {requirement_name(r) for r in extras[extra]}, extra


def test_readme_points_hub_data_at_the_extra_that_installs_datasets():
    extras = setup_kwargs()["extras_require"]
    assert "datasets" in {requirement_name(r) for r in extras["eval"]}
    assert "datasets" not in {requirement_name(r) for r in extras["dev"]}  # so the README must say `eval`
    assert 'benchmark.task.data_dir=null`; needs the `eval` extra: `pip install -e ".[dev,eval]"`' in README


def test_readme_metrics_example_is_a_healthy_tiny_run():
    example = readme_metrics_example()  # its fields are checked against a real run in test_scripts.py
    assert example["benchmark"] == "sample" and example["n_failed"] == 0 and example["n_samples"] == 29
    tokens = example["visual_tokens"]
    assert 1 <= tokens["min"] <= tokens["mean"] <= tokens["max"] <= 576


@pytest.mark.parametrize("given, missing", [
    (["prompt=What is this?"], ["image"]),
    (["image=photo.jpg"], ["prompt"]),
    ([], ["image", "prompt"]),
    (["image=photo.jpg", "prompt=  "], []),  # empty, not missing
])
def test_chat_without_image_or_prompt_exits_naming_it(tmp_path, given, missing):
    result = run_script([str(REPO / "scripts" / "chat.py"), "model=llava15_tiny", "dymu=mid", *given], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    for key in ("image", "prompt"):
        assert (f"{key}= is missing" in result.stderr) == (key in missing), result.stderr
    if not missing:
        assert "prompt is empty" in result.stderr
    assert "e.g.\n  python scripts/chat.py model=llava15_tiny dymu=mid image=" in result.stderr  # an example
    assert "Traceback" not in result.stderr and "visual tokens" not in result.stdout
    assert not (tmp_path / "cache").exists()  # failed before the tiny model was built or loaded


BAD_BUDGETS = [
    (["budget.max_visual_tokens=-3"], "budget.max_visual_tokens must be null, an int >= 1"),
    (["budget.max_visual_tokens=abc"], "budget.max_visual_tokens must be null, an int >= 1"),
    (["budget.min_visual_tokens=100", "budget.max_visual_tokens=50"],
     "budget.min_visual_tokens > budget.max_visual_tokens (100 > 50)"),
    (["budget.max_visual_tokens=[64,128]", "budget.min_visual_tokens=100"],
     "budget.min_visual_tokens > budget.max_visual_tokens"),
    (["budget.threshold_scale=0"], "budget.threshold_scale must be a positive number"),
]


@pytest.mark.parametrize("overrides, message", BAD_BUDGETS)
def test_invalid_budget_fails_before_any_output_folder_exists(tmp_path, overrides, message):
    result = run_script([str(REPO / "scripts" / "eval.py"), "model=llava15_tiny", "dymu=mid", "benchmark=sample",
                         *overrides], tmp_path)
    assert result.returncode != 0
    assert f"invalid budget: {message}" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr  # the message, not OmegaConf's resolver internals
    assert not (tmp_path / "outputs").exists()  # no arm folder, no .hydra/, no eval.log
    assert not (tmp_path / "cache").exists()  # nor was the model built


def test_invalid_budget_in_a_multirun_creates_no_arm_folder(tmp_path):
    result = run_script([str(REPO / "scripts" / "eval.py"), "-m", "model=llava15_tiny", "dymu=mid",
                         "budget.max_visual_tokens=-3"], tmp_path)
    assert "invalid budget: budget.max_visual_tokens" in result.stderr, result.stderr[-3000:]
    made = {p.relative_to(tmp_path / "outputs").as_posix() for p in (tmp_path / "outputs").rglob("*")}
    assert made <= {"eval", "eval/multirun", "eval/multirun/multirun.yaml"}, made  # the sweep's record only


@pytest.mark.parametrize("budget, tag", [
    ({"threshold_scale": 1.0, "max_visual_tokens": None, "min_visual_tokens": None}, ""),
    ({"threshold_scale": 1.1, "max_visual_tokens": 64, "min_visual_tokens": 0}, "-s1.1-max64-min0"),
    ({"threshold_scale": 1.0, "max_visual_tokens": [64, 128], "min_visual_tokens": 32}, "-max64_128-min32"),
    ({"threshold_scale": 1.0, "max_visual_tokens": [64, 128], "min_visual_tokens": [64, 100]}, "-max64_128-min64_100"),
])
def test_valid_budgets_pass_the_check_and_name_the_run(budget, tag):
    node = OmegaConf.create(budget)
    check_budget(node)
    assert budget_tag(node) == tag


@pytest.mark.parametrize("budget", [
    {"max_visual_tokens": 0}, {"min_visual_tokens": -1}, {"max_visual_tokens": True}, {"max_visual_tokens": 6.5},
    {"max_visual_tokens": []}, {"max_visual_tokens": [64, None]}, {"threshold_scale": "abc"},
    {"threshold_scale": float("inf")}, {"max_visual_tokens": [64, 128], "min_visual_tokens": [1, 2, 3]},
])
def test_invalid_budgets_raise_value_error_naming_the_key(budget):
    with pytest.raises(ValueError, match=r"invalid budget: budget\.((max|min)_visual_tokens|threshold_scale)"):
        check_budget(OmegaConf.create(budget))


def test_real_model_offline_fails_fast_saying_how_to_get_it(tmp_path):
    """The README's "The real model offline": HF_HUB_OFFLINE=1, no local copy -> a quick, clear failure."""
    result = run_script([str(REPO / "scripts" / "eval.py"), "model=llava15", "dymu=low",
                         "model.name_or_path=llava-hf/llava-1.5-7b-hf", "wandb.mode=disabled"], tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()
    assert any("could not load LLaVA checkpoint 'llava-hf/llava-1.5-7b-hf'" in line for line in last[-6:]), last[-6:]
    assert "hf download llava-hf/llava-1.5-7b-hf --local-dir DIR" in result.stderr
    assert "model.name_or_path=DIR" in result.stderr and "Retrying" not in result.stderr
