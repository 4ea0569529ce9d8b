"""The main job's driver (scripts/run_digits_demo.sh) end to end with reduced settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # the demo driver in a subprocess


def test_digits_demo_driver_reduced(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "PY": sys.executable,
        "OUT": str(tmp_path / "demo"),
        "ARCHS": "digits_cnn",
        "CALIB": "16",
        "NF": "16",
        "NR": "5",
        "NDZ": "1",
        "TARGETS": "2 4",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/run_digits_demo.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for method in ("dp", "lg", "uniform"):
        assert method in out
    rows = [
        json.loads(x) for x in (tmp_path / "demo/digits_cnn/results.jsonl").read_text().splitlines()
    ]
    assert sorted((r["method"], r["target_bits"]) for r in rows) == [
        ("dp", 2.0),
        ("dp", 4.0),
        ("lg", 2.0),
        ("lg", 4.0),
        ("uniform", 2.0),
        ("uniform", 4.0),
    ]
    for r in rows:
        # Separate budgets: weights and activations each within the target.
        assert r["w_bits"] <= r["target_bits"] + 1e-9 and r["a_bits"] <= r["target_bits"] + 1e-9
        assert 0 <= r["top1"] <= 100 and r["fp_top1"] > 97 and r["n_eval"] == 540
    dp4 = next(r for r in rows if r["method"] == "dp" and r["target_bits"] == 4.0)
    assert dp4["top1"] > 90
    assert (tmp_path / "demo/digits_cnn/results.csv").is_file()
    for method in ("dp", "lg", "uniform"):
        assert (tmp_path / f"demo/digits_cnn/{method}/allocation_2_a2.json").is_file()
    assert (tmp_path / "demo/results_digits_cnn.png").stat().st_size > 0
