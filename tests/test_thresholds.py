"""Thresholds file format and calibration (DyMU Sec. 3.1, docs/dymu-method.md Sec. 2)."""

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import CLIPVisionConfig, CLIPVisionModel

import dymu
from dymu.merge import bipartite_match
from dymu.calibration import BatchBudgetRule
from dymu.thresholds import Thresholds, ThresholdsError, encoder_fingerprint


def tiny_clip(layers: int = 4) -> CLIPVisionModel:
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(image_size=112, patch_size=14, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=layers, num_attention_heads=4)
    return CLIPVisionModel(cfg).eval()


def batches(n_batches: int = 6, batch_size: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # smooth random images (low-frequency noise upsampled) so some patches are similar and some are not
    out = []
    for _ in range(n_batches):
        coarse = torch.rand(batch_size, 3, 4, 4, generator=g)
        out.append(torch.nn.functional.interpolate(coarse, size=112, mode="bilinear") + 0.05 * torch.randn(
            batch_size, 3, 112, 112, generator=g))
    return out


def example(values=(0.9, 0.8)) -> Thresholds:
    cfg = tiny_clip(2).config
    return Thresholds(values=list(values), encoder=encoder_fingerprint(cfg), num_layers=2, feature_layer=-1,
                      schedule=[5, 5], target_tokens=55, num_images=8, dtype="float32",
                      realised_tokens={"mean": 50.0, "std": 3.0, "num_images": 8}, source="test", extra={"seed": 0})


# ------------------------------------------------------------------------------------------ files
def test_round_trip_is_lossless_json(tmp_path):
    t = example()
    path = t.save(tmp_path / "sub" / "t.json")
    payload = json.loads(path.read_text())
    assert payload["format"] == "dymu-thresholds" and payload["version"] == 1
    assert Thresholds.load(path) == t


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not valid JSON"),
        ('{"values": [0.5]}', "not a DyMU thresholds file"),
        ('{"format": "dymu-thresholds", "version": 99}', "version 99"),
        ('{"format": "dymu-thresholds", "version": 1, "values": [0.5], "foo": 1}', "unknown fields"),
        ('{"format": "dymu-thresholds", "version": 1, "values": [0.5]}', "missing required fields"),
        ('{"format": "dymu-thresholds", "version": 1, "values": [NaN], "encoder": "e", "num_layers": 1,'
         ' "feature_layer": -1}', "finite"),
    ],
)
def test_malformed_files_fail_clearly(tmp_path, content, message):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(ThresholdsError, match=message):
        Thresholds.load(path)


def test_missing_file_says_how_to_create_it(tmp_path):
    with pytest.raises(ThresholdsError, match="find_thresholds"):
        Thresholds.load(tmp_path / "nope.json")


def test_check_against_the_model():
    cfg = tiny_clip(2).config
    example().check(cfg, layers_run=2)
    three = tiny_clip(3).config
    too_few = Thresholds(values=[0.5, 0.5], encoder=encoder_fingerprint(three), num_layers=3, feature_layer=-1)
    with pytest.raises(ThresholdsError, match="DToMe runs 3"):
        too_few.check(three, layers_run=3)
    other = CLIPVisionConfig(image_size=224, patch_size=14, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ThresholdsError, match="calibrated for encoder"):
        example().check(other, layers_run=2)


def test_published_clip_large_thresholds_ship_with_their_source():
    t = Thresholds.packaged("clip-vit-large-patch14-336_openai_low_published")
    large = CLIPVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                             image_size=336)
    t.check(large, layers_run=23)  # LLaVA-1.5 runs 23 of 24 layers
    assert len(t.values) == 24 and t.values[0] == 0.996 and t.values[-1] == 0.816
    assert t.schedule == [21] * 24 and "2504.17040" in t.source


# ------------------------------------------------------------------------------------ calibration
class RecordingRule(BatchBudgetRule):
    """BatchBudgetRule that also keeps every layer's scores and merge mask, to check the rule by hand."""

    def __init__(self, schedule):
        super().__init__(schedule)
        self.seen = []

    def __call__(self, layer, scores, lengths=None):
        before = self.sums[layer].clone()
        selected = super().__call__(layer, scores, lengths)
        self.seen.append((layer, scores.clone(), selected.clone(), (self.sums[layer] - before).item()))
        return selected


def test_batch_budget_rule_follows_the_paper_exactly():
    model = tiny_clip(3)
    schedule = [7, 5, 3]
    rule = RecordingRule(schedule)
    dymu.apply_dtome(model, rule)
    pixels = batches(1, batch_size=4)[0]
    with torch.no_grad():
        out = model(pixels)
    assert rule.sums.dtype == torch.float64
    for layer, scores, selected, threshold in rule.seen:
        k = 4 * schedule[layer]
        assert selected.sum().item() == k  # batch-wide top B*r edges
        flat = scores.flatten().sort(descending=True).values
        assert selected.flatten()[scores.flatten() > flat[k - 1]].all()  # they are the best ones
        assert threshold == pytest.approx(max(flat[k].item(), 0.0))  # (B*r+1)-th largest, clamped at 0
    # images absorb different shares of the budget, but the batch total is exact
    lengths = out.padding_mask.sum(-1) if out.padding_mask is not None else torch.full((4,), out.last_hidden_state.shape[1])
    assert lengths.sum().item() == 4 * (65 - sum(schedule))


def test_find_thresholds_is_the_float64_mean_of_per_batch_thresholds():
    model = tiny_clip(3)
    data = batches(5)
    result = dymu.find_thresholds(model, data, schedule=[6, 4, 2], progress=False, realised_batches=data[:2])
    per_batch = []
    for pixels in data:
        rule = BatchBudgetRule([6, 4, 2])
        dymu.apply_dtome(model, rule)
        with torch.no_grad():
            model(pixels)
        dymu.remove(model)
        per_batch.append(rule.sums)
    expected = torch.stack(per_batch).mean(0).tolist()
    assert result.values == pytest.approx(expected, abs=1e-12)
    assert result.num_images == 20 and result.target_tokens == 65 - 12 and result.schedule == [6, 4, 2]
    assert result.realised_tokens["num_images"] == 8 and 1 < result.realised_tokens["mean"] <= 65
    assert not dymu.is_patched(model)  # left as it was


def test_find_thresholds_rejects_impossible_budgets():
    with pytest.raises(ValueError, match="at most about half"):
        dymu.find_thresholds(tiny_clip(2), batches(1), schedule=[40, 10], progress=False)
    with pytest.raises(ValueError, match="exactly one of"):
        dymu.find_thresholds(tiny_clip(2), batches(1), progress=False)


def test_find_thresholds_on_a_tower_patched_for_another_feature_layer_says_so():
    model = dymu.apply_dtome(tiny_clip(3), dymu.ThresholdRule([1.0] * 3), feature_layer=-2)
    with pytest.raises(ValueError, match="already patched to run 2 layers"):
        dymu.find_thresholds(model, batches(1), schedule=[2, 2, 2], feature_layer=-1, progress=False)


def _calibrate_rank(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shard = batches(5)[rank::world]  # whole batches per rank, as eval.calibrate shards them
        result = dymu.find_thresholds(tiny_clip(3), shard, schedule=[6, 4, 2], progress=False,
                                      realised_batches=batches(2)[rank::world])
        if rank == 0:
            result.save(out_file)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tmp_path):
    single = dymu.find_thresholds(tiny_clip(3), batches(5), schedule=[6, 4, 2], progress=False,
                                  realised_batches=batches(2))
    out = tmp_path / "dist.json"
    mp.spawn(_calibrate_rank, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    both = Thresholds.load(out)
    assert both.values == pytest.approx(single.values, abs=1e-12)
    assert both.num_images == single.num_images == 20
    assert both.realised_tokens["mean"] == pytest.approx(single.realised_tokens["mean"])
    assert math.isclose(both.realised_tokens["std"], single.realised_tokens["std"], abs_tol=1e-9)
