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


def test_bench_paper_options_runs_every_option_and_ends_with_its_json_summary(tmp_path):
    proc = run_script(
        "benchmarks/bench_paper_options.py", "--quick", "--outdir", str(tmp_path / "out")
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    from benchmarks.bench_paper_options import OPTIONS

    first = OPTIONS[0][0]
    tuned = [f"{first} --re-calibrate", f"{first} --re-train"]
    assert [r["option"] for r in summary["rows"]] == [first, *tuned] + [
        o for o, _, _ in OPTIONS[1:]
    ]
    by = {r["option"]: r for r in summary["rows"]}
    for label in tuned:  # fine-tuned on the calibration set: its loss went down
        assert by[label]["calib_loss_after"] < by[label]["calib_loss_before"]
        assert by[label]["w_bits"] == by[first]["w_bits"]
    # Same targets; an entropy budget lets the fixed-width bits exceed it, the others do not.
    assert all(r["target"] == 3.0 and 0 < r["top1"] <= 100 for r in summary["rows"])
    assert by["--rate entropy"]["w_entropy_bits"] <= 3.0 + 1e-9
    assert all(r["w_bits"] <= 3.0 + 1e-9 for o, r in by.items() if o != "--rate entropy")
    # Six curve sets: sorting and the step mode change the curves, the entropy rate does not.
    assert len(list((tmp_path / "out" / "digits_cnn").glob("curves_*"))) == 6


def test_bench_authors_semantics_measures_each_rule_and_ends_with_its_json_summary(tmp_path):
    proc = run_script(
        "benchmarks/bench_authors_semantics.py", "--quick", "--outdir", str(tmp_path / "out")
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    from benchmarks.bench_authors_semantics import OPTIONS

    assert [r["option"] for r in summary["rows"]] == [o[0] for o in OPTIONS]
    by = {r["option"]: r for r in summary["rows"]}
    assert all(r["target"] == 3.0 and r["w_bits"] <= 3.0 + 1e-9 for r in summary["rows"])
    assert all((r["a_bits"] is None) == ("W+A" not in o) for o, r in by.items())
    # The oracle changes the evaluated outputs of the same allocation.
    plain, theirs = by["W+A, no -bca"], by["W+A, theirs: -bca (oracle)"]
    assert (plain["w_bits"], plain["a_bits"]) == (theirs["w_bits"], theirs["a_bits"])
    assert plain["out_mse"] != theirs["out_mse"]
    # Curve sets: each rule that changes the curves has its own (7 weight, 2 activation).
    assert len(list((tmp_path / "out" / "digits_cnn").glob("curves_*"))) == 9
