"""The side-by-side benchmark (scripts/benchmark.py, eval/speed.py) on the tiny shapes.

Timings are never asserted (they are reported by the script); what is asserted is what must hold whatever
the machine: FLOPs and cache bytes that follow from the token counts, and the files a user gets.
"""

import json

import pytest

from conftest import REPO
from eval.speed import Variant, parse_variant
from test_scripts import run_script

VARIANTS = "['off',nomerge,low,low-expanded,low-novtu,tome_94]"


@pytest.fixture(scope="module")
def speed_run(tiny_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speed")
    args = [str(REPO / "scripts" / "benchmark.py"), "shape=llava15_tiny", "llm_layers=2", f"variants={VARIANTS}",
            "images=[astronaut,camera]", "rounds=1", "decode_tokens=3", "calibration.max_images=12",
            "calibration.targets={low: 94}", "progress=false", "dtype=float32"]
    result = run_script(args, tiny_cache, tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    out_dir = tmp / "outputs" / "speed" / "llava15_tiny-float32-cpu"
    return args, tmp, out_dir, json.loads((out_dir / "results.json").read_text())


def _per_image(payload, variant, metric):
    return [row[metric] for row in payload["per_image"][variant].values()]


def test_benchmark_writes_json_table_and_plot(speed_run):
    _, _, out_dir, payload = speed_run
    table = (out_dir / "results.md").read_text()
    for name in ("off", "nomerge", "low", "low-expanded", "low-novtu", "tome_94"):
        assert f"| {name} |" in table
    assert (out_dir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert payload["setup"]["llm_layers"] == 2 and payload["setup"]["images"] == ["astronaut", "camera"]
    assert (out_dir / "thresholds" / "low.json").is_file()  # calibrated on the same random model
    checks = payload["summary"]["variants"]
    assert set(checks["low"]["checks"]) == {"prefill_time_over_flops", "kv_excess", "decode"}
    assert set(checks["nomerge"]["checks"]) == {"bookkeeping"}
    assert checks["tome_94"]["checks"] == {} and checks["off"]["checks"] == {}


def test_unmodified_and_nothing_merged_count_the_same_work(speed_run):
    """VTU with every group of size 1: same rows, same FLOPs (eager) as the unmodified model."""
    payload = speed_run[3]
    assert _per_image(payload, "off", "visual_tokens") == [576, 576]
    assert _per_image(payload, "nomerge", "visual_tokens") == [576, 576]
    assert _per_image(payload, "nomerge", "prefill_flops") == _per_image(payload, "off", "prefill_flops")
    assert _per_image(payload, "off", "virtual_tokens") == _per_image(payload, "off", "llm_tokens")


def test_dymu_rows_flops_and_cache_follow_the_merged_length(speed_run):
    payload = speed_run[3]
    full = _per_image(payload, "off", "llm_tokens")
    assert _per_image(payload, "low", "virtual_tokens") == full  # VTU attends over the full virtual length
    merged = _per_image(payload, "low", "llm_tokens")
    assert all(m < f for m, f in zip(merged, full))
    assert all(d < o for d, o in zip(_per_image(payload, "low", "prefill_flops"), _per_image(payload, "off", "prefill_flops")))
    off_kv = _per_image(payload, "off", "kv_cache_bytes")
    # expanded VTU cache: exactly the unmodified model's; merged cache: L_m rows + the shared layout
    assert _per_image(payload, "low-expanded", "kv_cache_bytes") == off_kv
    for kv, m, f, o in zip(_per_image(payload, "low", "kv_cache_bytes"), merged, full, off_kv):
        assert o * m / f <= kv < o * m / f + f * 1024  # layout: group map, mask, cos / sin tables (< 1 KiB per row)
    # without VTU (and for ToMe) the plain cache holds the merged rows only
    for name in ("low-novtu", "tome_94"):
        for kv, m, f, o in zip(_per_image(payload, name, "kv_cache_bytes"), _per_image(payload, name, "llm_tokens"),
                               full, off_kv):
            assert kv * f == o * m


def test_existing_results_are_not_overwritten(speed_run, tiny_cache):
    args, tmp, out_dir, payload = speed_run
    before = (out_dir / "results.json").read_text()
    again = run_script(args, tiny_cache, tmp)
    assert again.returncode != 0 and "overwrite=true" in again.stderr
    assert (out_dir / "results.json").read_text() == before


def test_parse_variant_forms_and_errors():
    assert parse_variant("off") == Variant("off", "off")
    assert parse_variant("mid-expanded") == Variant("mid-expanded", "threshold", level="mid", vtu=True,
                                                    vtu_cache="expanded")
    assert parse_variant("high-novtu").vtu is False and parse_variant("low").is_dymu
    assert parse_variant("tome_209").target == 209
    for bad in ("medium", "tome_x", "low-fast"):
        with pytest.raises(ValueError, match="unknown benchmark variant"):
            parse_variant(bad)
