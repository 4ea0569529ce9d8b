"""The benchmark scripts run end to end on tiny settings (their figures are not asserted)."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_script

pytestmark = pytest.mark.slow  # benchmark scripts in subprocesses


def test_bench_hessian_runs_and_ends_with_its_json_summary():
    proc = run_script(
        "benchmarks/bench_hessian.py",
        "--models",
        "digits_cnn",
        "--testsize",
        "8",
        "--maxrates",
        "4",
        "--maxdeadzones",
        "2",
        "--targets",
        "2",
        "3",
        "--min-seconds",
        "0",
        "--threads",
        "1",
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"speedup", "speedup_min", "rank_corr", "max_top1_gap"} <= set(summary)
    model = summary["models"]["digits_cnn"]
    assert model["measured_s"] > 0 and model["hessian_s"] > 0
    assert -1.0 <= summary["rank_corr"] <= 1.0 and math.isfinite(summary["max_top1_gap"])
    assert [r["target"] for r in model["dp"]["hessian"]] == [2.0, 3.0]


def test_bench_hessian_preset_runs_and_ends_with_its_json_summary():
    proc = run_script(
        "benchmarks/bench_hessian_preset.py",
        "--models",
        "digits_cnn",
        "--seeds",
        "0",
        "--testsize",
        "8",
        "--maxrates",
        "4",
        "--maxdeadzones",
        "1",
        "--targets",
        "3",
        "--threads",
        "1",
    )
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert [(r["setting"], r["target"]) for r in summary["rows"]] == [
        ("default", 3.0),
        ("paper", 3.0),
    ]
    assert summary["comparisons"] == 1 and "digits_cnn@3" in summary["paper_vs_default"]
    assert any(line.startswith("| digits_cnn | paper | 3 |") for line in lines)
