"""scripts/make_table.py: finished runs -> the paper's table layout (Markdown and CSV), paper rows beside ours."""

import csv
import io
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from eval.tables import collect


def write_run(root, model, run, benchmark, metrics, n, mean, std):
    path = root / model / run / benchmark
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({
        "benchmark": benchmark, "n_samples": n, "metrics": metrics,
        "visual_tokens": {"mean": mean, "std": std, "min": 0, "max": 0}}))


@pytest.fixture()
def runs(tmp_path):
    root = tmp_path / "outputs" / "eval"
    write_run(root, "llava15", "mid", "gqa", {"accuracy": 60.0}, n=10, mean=100.0, std=0.0)
    write_run(root, "llava15", "mid", "mme", {"perception": 1500.0, "total": 1800.0}, n=30, mean=200.0, std=0.0)
    write_run(root, "llava15", "off", "gqa", {"accuracy": 62.0}, n=10, mean=576.0, std=0.0)
    write_run(root, "other", "off", "gqa", {"accuracy": 1.0}, n=1, mean=1.0, std=0.0)
    return tmp_path


def test_rows_pool_tokens_and_average_by_hand(runs):
    rows = {r.method: r for r in collect(runs / "outputs" / "eval", model="llava15")}
    assert set(rows) == {"llava15 mid", "llava15 off"}
    mid = rows["llava15 mid"]
    # pooled over 10 samples at 100 and 30 at 200: mean 175, std sqrt(0.25*75^2 + 0.75*25^2) = 43.3
    assert mid.tokens == "175 ± 43"
    assert mid.values["GQA"] == 60.0 and mid.values["MME-P"] == 1500.0 and mid.values["MME"] == 1800.0
    assert mid.average == pytest.approx((60.0 + 1500.0 / 20) / 2)  # MME perception as % of 2000; MME total skipped
    assert rows["llava15 off"].values["MMB"] is None


def test_make_table_script_writes_markdown_and_csv(runs):
    env = dict(os.environ, DYMU_OUTPUT_DIR=str(runs / "outputs"))
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "make_table.py"), "model_name=llava15"],
                            cwd=runs, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    md = (runs / "outputs" / "tables" / "results_llava15.md").read_text()
    assert "| DyMU-mid (paper) | 195 ± 47 | 61.7 |" in md and "| llava15 mid | 175 ± 43 | 60.0 |" in md
    table = list(csv.DictReader(io.StringIO((runs / "outputs" / "tables" / "results_llava15.csv").read_text())))
    assert [r["method"] for r in table][-2:] == ["llava15 mid", "llava15 off"]
    assert table[0]["method"] == "LLaVA-1.5-7B (paper)" and table[0]["MME"] == "1862"


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run scripts/eval.py first"):
        collect(tmp_path)
