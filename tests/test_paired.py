"""Paired comparison of two quantized models on the same samples (rdoq.evaluate.
paired_comparison) and ``evaluate_allocation.py --paired``."""

from __future__ import annotations

import json

import pytest
import torch
from scipy.stats import binomtest

from rdoq import cli_eval
from rdoq.evaluate import paired_comparison


def test_identical_models_do_not_differ():
    ref = torch.randn(50, 10, dtype=torch.float64)
    out = ref + 0.1 * torch.randn(50, 10, dtype=torch.float64)
    labels = ref.argmax(1)
    res = paired_comparison(out, out.clone(), ref, labels)
    assert res["mse_diff"] == 0 and res["mse_diff_ci95"] == [0.0, 0.0]
    assert (res["only_a_right"], res["only_b_right"], res["mcnemar_p"]) == (0, 0, 1.0)


def test_counts_p_value_and_interval():
    n, k = 40, 4
    labels = torch.zeros(n, dtype=torch.long)
    ref = torch.zeros(n, k, dtype=torch.float64)
    ref[:, 0] = 1.0
    a = ref.clone()
    b = ref.clone() + 0.5  # a constant shift: B's MSE is larger on every sample
    # A wrong on samples 0-2 (only there), B wrong on samples 3-11 (only there).
    a[:3, 1] = 2.0
    b[3:12, 2] = 3.0
    res = paired_comparison(a, b, ref, labels, n_boot=500)
    assert (res["only_a_right"], res["only_b_right"]) == (9, 3)
    assert res["mcnemar_p"] == pytest.approx(binomtest(9, 12).pvalue)
    lo, hi = res["mse_diff_ci95"]
    assert lo <= res["mse_diff"] <= hi < 0  # A is better on output MSE, and clearly so
    # Without labels: only the output-MSE part.
    assert "mcnemar_p" not in paired_comparison(a, b, ref, None, n_boot=10)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="different shapes"):
        paired_comparison(torch.zeros(3, 2), torch.zeros(3, 3), torch.zeros(3, 2), None)


def test_evaluate_allocation_paired(tmp_path):
    res = cli_eval.uniform_main(
        [
            "--archname",
            "digits_cnn",
            "--target_rates",
            "3",
            "8",
            "--calibsize",
            "2",
            "--testsize",
            "64",
            "--batchsize",
            "32",
            "--quiet",
            "--no-plots",
            "--no-acts",
            "--outdir",
            str(tmp_path),
        ]
    )
    paths = [str(tmp_path / r["allocation"]) for r in res["rows"]]
    out = cli_eval.evaluate_main(
        [
            *paths,
            "--testsize",
            "64",
            "--batchsize",
            "32",
            "--quiet",
            "--paired",
            "--outdir",
            str(tmp_path / "eval"),
        ]
    )
    first, second = out["rows"]
    assert "paired" not in first
    p = second["paired"]
    assert p["n"] == 64 and p["vs"].endswith("allocation_3.json")
    # 8 bits against 3 bits: lower output MSE on the same samples, an interval below 0.
    assert p["mse_diff"] < 0 and p["mse_diff_ci95"][1] < 0
    assert p["only_a_right"] + p["only_b_right"] >= 0 and 0 <= p["mcnemar_p"] <= 1
    assert "paired with the first allocation" in out["table"]
    row = json.loads((tmp_path / "eval" / "results.jsonl").read_text().splitlines()[1])
    assert row["paired"]["mse_diff"] == p["mse_diff"]
