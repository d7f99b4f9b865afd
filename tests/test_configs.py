"""Every Hydra config composes and resolves (lightning-hydra-template style)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import eval  # noqa: F401 - registers the resolvers the configs use (scripts/eval.py imports it too)
from conftest import REPO

CONF = REPO / "hydra_conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
DYMUS = sorted(p.stem for p in (CONF / "dymu").glob("*.yaml"))
BENCHMARKS = sorted(p.stem for p in (CONF / "benchmark").glob("*.yaml"))


def composed(config_name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # lets ${hydra:...} resolve as in a real run
        ours = {key: cfg[key] for key in cfg if key != "hydra"}
        resolved = OmegaConf.to_container(OmegaConf.create(ours), resolve=True, throw_on_missing=True)
    return OmegaConf.create(resolved)


def test_groups_are_not_empty():
    assert {"llava15", "llava15_tiny", "llava_ov_0.5b", "llava_ov_7b", "llava_ov_tiny"} <= set(MODELS)
    assert {"off", "low", "mid", "high", "tome_94", "tome_209", "tome_393"} <= set(DYMUS)
    assert "sample" in BENCHMARKS


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dymu", DYMUS)
@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_eval_config_composes(model, dymu, benchmark, tmp_path):
    cfg = composed("eval", [f"model={model}", f"dymu={dymu}", f"benchmark={benchmark}", f"paths.output_dir={tmp_path}"])
    assert cfg.model.name == model and cfg.dymu.name == dymu and cfg.benchmark.name == benchmark
    assert Path(cfg.output_dir) == tmp_path / "eval" / model / dymu / benchmark
    assert cfg.dymu.mode in ("off", "threshold", "tome")
    if cfg.dymu.mode == "threshold":
        assert cfg.dymu.variant in cfg.model.thresholds


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("variant", ["low", "mid", "high"])
def test_find_thresholds_config_composes(model, variant):
    overrides = [f"model={model}", f"variant={variant}"]
    if not model.endswith("tiny"):
        overrides.append("data.images=/somewhere")
    cfg = composed("find_thresholds", overrides)
    if model == "testbed":  # the testbed's embedded thresholds are calibrated for these targets (eval/tiny.py)
        from eval.tiny import TESTBED_TARGETS as targets
    elif "ov" in model:
        targets = {"low": 102, "mid": 182, "high": 343}
    else:
        targets = {"low": 94, "mid": 209, "high": 393}
    assert cfg.target_tokens == targets[variant]
    assert str(cfg.output) == str(cfg.model.thresholds[variant])


def test_multirun_sweep_dir_resolves_before_any_job(tmp_path):
    """Hydra resolves hydra.sweep.dir before HydraConfig exists: it must not need ${hydra:...}."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["model=llava15_tiny"], return_hydra_config=True)
    HydraConfig.instance().cfg = None  # as at sweep time
    assert str(cfg.hydra.sweep.dir).endswith("eval/multirun")


def test_onevision_checkpoint_switch():
    cfg = composed("eval", ["model=llava_ov_7b", "model.checkpoint=si", "dymu=mid"])
    assert cfg.model.name_or_path == "llava-hf/llava-onevision-qwen2-7b-si-hf"
    assert cfg.model.thresholds.mid.endswith("llava_ov_7b_si_mid.json")


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_with_every_swept_value(experiment, tmp_path):
    """Each experiment composes, and so does every combination its sweeper would launch."""
    base = composed("eval", [f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        raw = compose(config_name="eval", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = raw.hydra.sweeper.params
    assert params, "an experiment must sweep something"
    first = [f"{key}={str(values).split(',')[0]}" for key, values in params.items()]
    last = [f"{key}={str(values).split(',')[-1]}" for key, values in params.items()]
    names = set()
    for overrides in (first, last):
        cfg = composed("eval", [f"experiment={experiment}", f"paths.output_dir={tmp_path}", *overrides])
        names.add(cfg.output_dir)
        assert cfg.wandb.group == experiment.replace(".yaml", "")
    assert len(names) == 2  # different arms never share an output directory
    assert base.model.name in ("llava15", "llava_ov_7b", "testbed")  # real weights, never a tiny random model


def test_ablation_vtu_arms_get_distinct_run_names(tmp_path):
    on = composed("eval", ["experiment=ablation_vtu", "dymu=mid", "dymu.vtu=true", "benchmark=sample"])
    off = composed("eval", ["experiment=ablation_vtu", "dymu=mid", "dymu.vtu=false", "benchmark=sample"])
    assert on.output_dir != off.output_dir and on.wandb.name == "mid-vtu_True-sample"


def test_chat_config_composes_and_budget_names_the_run(tmp_path):
    cfg = composed("chat", ["model=llava15_tiny", "image=x.jpg", "prompt=hi", f"paths.output_dir={tmp_path}"])
    assert cfg.merge_map == f"{tmp_path}/chat/llava15_tiny/mid/merge_map.png" and cfg.budget.max_visual_tokens is None
    plain = composed("eval", ["dymu=mid"])
    assert plain.run_name == "mid"
    budgeted = composed("eval", ["dymu=mid", "budget.threshold_scale=1.1", "budget.max_visual_tokens=64"])
    assert budgeted.run_name == "mid-s1.1-max64" and budgeted.output_dir.endswith("/mid-s1.1-max64/sample")
    ablation = composed("eval", ["experiment=ablation_vtu", "budget.min_visual_tokens=8"])
    assert ablation.run_name.endswith("-min8")
