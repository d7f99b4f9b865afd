"""Per-request token budgets: threshold scale and exact max / min visual tokens per image (dymu.budget)."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dymu
import llava
from conftest import REPO, SAMPLE_IMAGES, uniform_thresholds
from dymu.merge import BoundedRule, min_reachable_tokens
from dymu.patch import vision_token_count
from test_scripts import run_script

IMAGES = sorted(SAMPLE_IMAGES.glob("*.jpg"))[:6]


@pytest.fixture(scope="module")
def pipe(tiny_path):
    return llava.load_model(tiny_path, dymu=tiny_path / "thresholds" / "mid.json", dtype=torch.float32)


@pytest.fixture(scope="module")
def pixels(pipe):
    return pipe.preprocess(IMAGES)


@pytest.fixture(scope="module")
def plain(pipe, pixels):
    """Visual tokens and features of plain DToMe-mid (no budget)."""
    return pipe.encode_images(pixels)


def geometry(pipe):
    n0, has_cls = vision_token_count(pipe.tower)
    return dict(num_tokens=n0, num_layers=dymu.dtome_settings(pipe.tower).num_layers, has_cls=has_cls)


def test_bounded_rule_that_never_binds_is_plain_dtome(pipe, pixels):
    """BoundedRule with bounds that never bind merges exactly the edges above the thresholds."""
    geo = geometry(pipe)
    batch = pixels.shape[0]
    rule = BoundedRule(dymu.dtome_settings(pipe.tower).rule, max_tokens=torch.full((batch,), geo["num_tokens"]),
                       min_tokens=torch.zeros(batch, dtype=torch.long), num_layers=geo["num_layers"],
                       has_cls=geo["has_cls"])
    with torch.no_grad():
        ref = pipe.tower(pixels)
        out = pipe.tower(pixels, merge_rule=rule)
    assert torch.equal(out.group_ids, ref.group_ids)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=0, rtol=0)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bounds_hold_exactly_and_leave_in_bound_images_untouched(pipe, pixels, plain, data):
    geo = geometry(pipe)
    floor = min_reachable_tokens(**geo) - 1  # in visual tokens (the CLS token is dropped)
    n = pixels.shape[0]
    hi = data.draw(st.lists(st.integers(floor, 576), min_size=n, max_size=n), label="max")
    lo = [data.draw(st.integers(0, h), label="min") for h in hi]
    out = pipe.encode_images(pixels, budget={"max_visual_tokens": hi, "min_visual_tokens": lo})
    for i, (k, k0) in enumerate(zip(out.num_tokens, plain.num_tokens)):
        assert lo[i] <= k <= hi[i]
        assert out.group_index[i].numel() == 576 and sorted(out.group_index[i].unique().tolist()) == list(range(k))
        if lo[i] <= k0 <= hi[i]:  # already within bounds: encoded exactly as without a budget
            assert k == k0 and torch.equal(out.features[i], plain.features[i])
            assert torch.equal(out.group_index[i], plain.group_index[i])


def test_tightest_max_is_reached_exactly(pipe, pixels):
    """At the fewest tokens the encoder can reach, every image lands exactly there (feasibility planning)."""
    floor = min_reachable_tokens(**geometry(pipe)) - 1
    assert pipe.encode_images(pixels, budget={"max_visual_tokens": floor}).num_tokens == [floor] * len(IMAGES)


def test_max_only_changes_images_above_it_and_picks_the_most_similar_pairs(pipe, pixels, plain):
    cap = sorted(plain.num_tokens)[len(IMAGES) // 2]
    out = pipe.encode_images(pixels, budget=llava.VisualBudget(max_visual_tokens=cap))
    for k, k0 in zip(out.num_tokens, plain.num_tokens):
        assert k == k0 if k0 <= cap else k <= cap


def test_threshold_scale_moves_token_counts_monotonically(pipe, pixels, plain):
    fewer = pipe.encode_images(pixels, budget={"threshold_scale": 0.9}).num_tokens
    more = pipe.encode_images(pixels, budget={"threshold_scale": 1.1}).num_tokens
    assert all(a <= b <= c for a, b, c in zip(fewer, plain.num_tokens, more))
    assert sum(fewer) < sum(plain.num_tokens) < sum(more)
    # calibrated thresholds are >= 0, so a scale past 1 / min(tau) merges nothing at all
    taus = [t for t in dymu.dtome_settings(pipe.tower).rule.thresholds if t > 0]
    assert pipe.encode_images(pixels, budget={"threshold_scale": 1.01 / min(taus)}).num_tokens == [576] * len(IMAGES)


def test_request_budget_in_generate_and_pipeline_default(tiny_path, pipe):
    answers, inputs = pipe.generate(["What is it?"] * 2, IMAGES[:2], max_new_tokens=2,
                                    budget={"max_visual_tokens": [7, 30]})
    assert len(answers) == 2 and inputs.visual_tokens == [7, 30] and inputs.unmerged_visual_tokens == [576, 576]
    capped = llava.load_model(tiny_path, dymu=tiny_path / "thresholds" / "mid.json", dtype=torch.float32,
                              budget={"max_visual_tokens": 12})
    _, inputs = capped.generate(["What is it?"], IMAGES[:1], max_new_tokens=1)
    assert inputs.visual_tokens == [12]
    _, inputs = capped.generate(["What is it?"], IMAGES[:1], max_new_tokens=1, budget={"max_visual_tokens": 20})
    assert inputs.visual_tokens == [20]  # the request's budget replaces the default


@pytest.mark.parametrize("budget, match", [
    ({"max_visual_tokens": 1}, "cannot be met"),
    ({"max_visual_tokens": 10, "min_visual_tokens": 11}, "min_tokens > max_tokens"),
    ({"max_visual_tokens": [10, 20]}, "has 2 entries but the request has 6 images"),
    ({"min_visual_tokens": 600}, r"must be in \[0, 577\]"),
    ({"max_visual_tokens": 12.5}, "must be an int, a list of ints"),
    ({"threshold_scale": 0.0}, "positive finite"),
    ({"threshold_scale": float("nan")}, "positive finite"),
    ({"max_tokens": 5}, "unknown budget keys"),
])
def test_bad_budgets_fail_clearly_before_encoding(pipe, pixels, budget, match):
    with pytest.raises(ValueError, match=match):
        pipe.encode_images(pixels, budget=budget)


def test_budget_needs_dtome_and_scale_needs_thresholds(tiny_path):
    with pytest.raises(ValueError, match="needs DToMe"):
        llava.load_model(tiny_path, dymu=None, budget={"max_visual_tokens": 64})
    tome = llava.load_model(tiny_path, tome_target=209, vtu=False)
    with pytest.raises(ValueError, match="threshold_scale needs a threshold rule"):
        tome.encode_images(tome.preprocess(IMAGES[:1]), budget={"threshold_scale": 1.1})
    assert tome.encode_images(tome.preprocess(IMAGES[:2]), budget={"max_visual_tokens": 50}).num_tokens == [50, 50]


def test_a_request_budget_on_a_model_without_dtome_is_refused_not_ignored(tiny_path):
    """Before the budget became one entry, a per-request budget on the unmodified encoder was dropped silently."""
    plain = llava.load_model(tiny_path, dymu=None, vtu=False)
    with pytest.raises(ValueError, match="needs DToMe"):
        plain.generate(["What is it?"], IMAGES[:1], max_new_tokens=1, budget={"max_visual_tokens": 64})
    with pytest.raises(ValueError, match="needs DToMe"):
        plain.encode_images(plain.preprocess(IMAGES[:1]), budget={"threshold_scale": 1.1})
    assert plain.encode_images(plain.preprocess(IMAGES[:1])).num_tokens == [576]  # no budget: the stock encoder


def test_threshold_scale_takes_any_real_number_and_is_stored_as_float():
    import numpy as np

    assert llava.VisualBudget(threshold_scale=np.float32(1.25)).threshold_scale == 1.25
    assert type(llava.VisualBudget(threshold_scale=2).threshold_scale) is float
    for bad in ("1.1", True, float("inf"), -1.0):
        with pytest.raises(ValueError, match="positive finite"):
            llava.VisualBudget(threshold_scale=bad)


def test_onevision_takes_threshold_scale_only(tiny_ov_path):
    vision = llava.load_model(tiny_ov_path, vtu=False).model.config.vision_config
    thresholds = uniform_thresholds(vision, 0.6, feature_layer=-1)
    pipe = llava.load_model(tiny_ov_path, dymu=thresholds, vtu=True)
    image = SAMPLE_IMAGES / "coffee.jpg"
    prompt = [pipe.prompt("What is it?")]
    runs = [pipe.build_inputs(prompt, [[image]], budget={"threshold_scale": s}) for s in (1.0, 1.4, 1.7)]
    tokens = [r.visual_tokens[0] for r in runs]
    assert tokens[0] < tokens[1] < tokens[2] <= runs[0].unmerged_visual_tokens[0], tokens
    assert llava.load_model(tiny_ov_path, dymu=thresholds, budget={"threshold_scale": 1.4}).build_inputs(
        prompt, [[image]]).visual_tokens == [tokens[1]]  # as the pipeline's default
    with pytest.raises(NotImplementedError, match="LLaVA-1.5 only"):
        pipe.build_inputs(prompt, [[image]], budget={"max_visual_tokens": 100})


def test_eval_script_budget_bounds_tokens_and_gets_its_own_folder(tiny_cache, tmp_path):
    args = [str(REPO / "scripts" / "eval.py"), "model=llava15_tiny", "dymu=mid", "benchmark=sample", "limit=3",
            "wandb.mode=disabled", "max_new_tokens=2", "budget.max_visual_tokens=40", "budget.min_visual_tokens=35"]
    result = run_script(args, tiny_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out_dir = tmp_path / "outputs" / "eval" / "llava15_tiny" / "mid-max40-min35" / "sample"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n_samples"] == 3 and 35 <= metrics["visual_tokens"]["min"] <= metrics["visual_tokens"]["max"] <= 40
    assert not (tmp_path / "outputs" / "eval" / "llava15_tiny" / "mid").exists()
    bad = run_script(args[:-2] + ["dymu=off", "budget.max_visual_tokens=40"], tiny_cache, tmp_path)
    assert bad.returncode != 0 and "needs DToMe" in bad.stderr
