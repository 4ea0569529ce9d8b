"""CUDA paths: curves, allocation and evaluation on a GPU agree with the CPU; drivers use GPUs.

Skipped without CUDA (CI has none); run with ``python -m pytest -m gpu tests/test_gpu.py`` on a
GPU machine (``benchmarks/gpu_checks.sh`` runs these and the GPU benchmarks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rdoq.store import CurveStore
from tests.conftest import ROOT, run_script

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

DIGITS = ["--archname", "digits_cnn", "--dataset", "digits"]
CURVE_FLAGS = [*DIGITS, "--testsize", "32", "--nchannelbatch", "8", "--maxrates", "7", "--quiet"]
SCRIPTS = {
    ("measured", "weight"): "classification/generate_RD_curves_batch.py",
    ("measured", "act"): "classification/generate_RD_curves_act_out_nchan.py",
    ("hessian", "weight"): "classification/generate_rd_curves_batch_hessian.py",
    ("hessian", "act"): "classification/generate_RD_curves_act_out_nchan_hessian.py",
}


def curve_set(out: Path, estimator: str, kind: str, device: str) -> CurveStore:
    extra = ["--maxdeadzones", "2"] if kind == "weight" else []
    run_script(
        SCRIPTS[estimator, kind], *CURVE_FLAGS, *extra, "--device", device, "--outdir", str(out)
    )
    (root,) = [p for p in out.iterdir() if (p / "meta.json").exists()]
    return CurveStore.load(root)


@pytest.mark.parametrize("estimator", ["measured", "hessian"])
@pytest.mark.parametrize("kind", ["weight", "act"])
def test_cuda_curves_equal_cpu_curves(tmp_path, estimator, kind):
    cpu = curve_set(tmp_path / "cpu", estimator, kind, "cpu")
    gpu = curve_set(tmp_path / "gpu", estimator, kind, "cuda")
    assert gpu.layer_names() == cpu.layer_names()
    for name in cpu.layer_names():
        a, b = cpu.read_layer(name), gpu.read_layer(name)
        # float64 on both devices (TF32 off): the same steps win, distortions agree closely.
        np.testing.assert_allclose(b.dist, a.dist, rtol=1e-6, atol=1e-12, err_msg=name)
        assert np.array_equal(np.isnan(a.step_log2), np.isnan(b.step_log2)), name
        np.testing.assert_array_equal(
            np.nan_to_num(b.step_log2), np.nan_to_num(a.step_log2), err_msg=name
        )


def test_cuda_allocation_and_evaluation_equal_cpu(tmp_path):
    curves = tmp_path / "curves"
    curve_set(curves, "measured", "weight", "cpu")
    run_script(SCRIPTS["measured", "act"], *CURVE_FLAGS, "--device", "cpu", "--outdir", str(curves))
    weight = next(p for p in curves.iterdir() if p.name.endswith("_channelwise_opt_dist"))
    rows = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        run_script(
            "classification/generate_DP_batch_distortion_act_out_nchan.py",
            *DIGITS,
            "--pathrdcurve",
            str(weight),
            "--act_curve_root_dir",
            str(curves),
            "--target_rates",
            "4",
            "--testsize",
            "-1",
            "--quiet",
            "--no-plots",
            "-bcw",
            "-bca",
            "--device",
            device,
            "--outdir",
            str(out),
        )
        rows[device] = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    cpu, gpu = rows["cpu"], rows["cuda"]
    assert gpu["w_bits"] == cpu["w_bits"] and gpu["a_bits"] == cpu["a_bits"]
    assert abs(gpu["top1"] - cpu["top1"]) <= 0.2  # at most one of 540 images flips
    assert gpu["out_mse"] == pytest.approx(cpu["out_mse"], rel=1e-3)


def test_resolve_device_turns_tf32_off():
    from argparse import Namespace

    from rdoq.cli import resolve_device

    torch.backends.cuda.matmul.allow_tf32 = True
    device = resolve_device(Namespace(device="cuda", gpuid=0), None)
    assert device.type == "cuda"
    assert not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32


def test_driver_runs_one_part_per_visible_gpu(tmp_path):
    # The same GPU listed twice: two parts, each in its own process on "its" GPU.
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "PY": sys.executable,
        "OUTDIR": str(tmp_path),
        "CUDA_VISIBLE_DEVICES": f"{gpu},{gpu}",
        "MODELNAME": "digits_cnn",
        "TESTSIZE": "16",
        "NCHANNELBATCH": "16",
        "MAXRATES": "5",
        "MAXDEADZONES": "1",
        "TARGET_RATES": "3 4",
        "EVALSIZE": "200",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_rd_hessian_curves_digits_all.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 part(s)" in proc.stdout
    for d in (tmp_path / "curves").iterdir():
        runs = [json.loads(p.read_text()) for p in sorted(d.glob("run_part*.json"))]
        assert len(runs) == 2
        assert all(r["device"] == "cuda:0" for r in runs), runs
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["target_bits"] for r in rows] == [3.0, 4.0]
