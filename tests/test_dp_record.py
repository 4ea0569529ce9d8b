"""Reported figures state the DP's discretisation: rate resolution and slack (issue 11, item 7a)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rdoq.allocation import build_table, solve_recorded
from rdoq.allocfile import make_allocation
from rdoq.evaluate import TensorBatches
from rdoq.solvers import solve_dp_multi
from tests.test_allocation import TinyNet, fake_curve_set


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def table(tmp_path, tiny):
    w = fake_curve_set(tmp_path / "w", tiny, "weight")
    a = fake_curve_set(tmp_path / "a", tiny, "act", act_mode="out", group_size=3)
    return build_table(w, a)


def test_dp_allocation_records_the_resolution_and_slack_it_used(table):
    targets = [2.0, 3.5]
    solved = solve_recorded(table, targets, "dp")
    n = table.numel.sum()
    ref = solve_dp_multi(table.dist, table.rate, [t * n for t in targets])
    for choice, rec, t in zip(solved.choices, solved.records, targets, strict=True):
        s = make_allocation(table, choice, target_bits=t, solver="dp", record=rec)["summary"]
        assert s["dp_resolution_bits"] == ref.resolution
        assert s["dp_slack_bits"] == ref.slack
        assert s["budget_bits"] == pytest.approx(t * n)
        assert s["rate_bits"] <= s["budget_bits"]
    # A coarser table (fewer cells) is recorded as such, with its slack.
    n_items = len(table.kind)
    coarse = solve_recorded(table, [3.0], "dp", max_cells=n_items * (n_items + 18))
    rec = coarse.records[0]
    assert rec["dp_resolution_bits"] > ref.resolution and rec["dp_slack_bits"] > 0


def test_separate_budgets_and_lagrangian_records(table):
    sep = solve_recorded(table, [3.0], "dp", act_targets=[4.0]).records[0]
    assert {
        "dp_resolution_bits_w",
        "dp_slack_bits_w",
        "dp_resolution_bits_a",
        "dp_slack_bits_a",
        "budget_bits_w",
        "budget_bits_a",
    } <= set(sep)
    lg = solve_recorded(table, [3.0], "lg").records[0]
    # No discretisation: nothing DP-specific is claimed for the Lagrangian.
    assert not any(k.startswith("dp_") for k in lg) and "budget_bits" in lg


def test_result_rows_carry_the_resolution_and_bops_charges(tmp_path, table, tiny):
    from rdoq.adapters import get_adapter
    from rdoq.pipeline import run_points

    solved = solve_recorded(table, [3.0], "dp")
    alloc = make_allocation(
        table, solved.choices[0], target_bits=3.0, solver="dp", record=solved.records[0]
    )
    args = SimpleNamespace(
        quiet=True,
        no_plots=True,
        save_model=False,
        smooth_dists=False,
        bias_corr_weight=False,
        bias_corr_act=False,
        batchsize=4,
    )
    info = SimpleNamespace(arch="tinynet", weights_source="test", checkpoint_sha256=None)
    data = TensorBatches(torch.randn(6, 3, 8, 8), None, 3)
    # Any classification adapter runs the model as model(x); evaluation goes through it.
    adapter = get_adapter("synthetic")
    out = run_points(
        args,
        adapter,
        tiny,
        info,
        data,
        None,
        tmp_path,
        "dp",
        [(alloc, {"target_bits": 3.0})],
        0.0,
        torch.device("cpu"),
    )
    row = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
    assert row == json.loads(json.dumps(out["rows"][0]))
    assert row["dp_resolution_bits"] == solved.records[0]["dp_resolution_bits"]
    assert row["dp_slack_bits"] == solved.records[0]["dp_slack_bits"]
    # TinyNet: c1 <- image, c2 <- relu(c1), f1 <- mean(relu(c2)), f2 <- relu(f1).
    assert (row["bops_inputs_producer"], row["bops_inputs_fp32"], row["bops_inputs_own"]) == (
        2,
        2,
        0,
    )
    charged = {e["layer"]: e for e in row["bops_inputs"]}
    assert charged["c2"]["producer"] == "c1" and charged["f2"]["producer"] == "f1"
    assert charged["c1"]["charged"] == "fp32" and charged["f1"]["charged"] == "fp32"
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert {"dp_resolution_bits", "dp_slack_bits", "bops_inputs_producer"} <= set(header)
    assert np.isfinite(row["bops_ratio"])
