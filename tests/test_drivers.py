"""The end-to-end bash drivers on the digits default with small variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # bash drivers in subprocesses

SMALL = {
    "MODELNAME": "digits_cnn",
    "TESTSIZE": "16",
    "NCHANNELBATCH": "16",
    "MAXRATES": "5",
    "MAXDEADZONES": "1",
    "TARGET_RATES": "3 4",
    "EVALSIZE": "200",
}


def run_driver(name: str, outdir, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(
        HF_HUB_OFFLINE="1",
        OMP_WAIT_POLICY="PASSIVE",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
        PY=sys.executable,
        OUTDIR=str(outdir),
    )
    env.update({**SMALL, **extra})
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / name)], env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.parametrize(
    "driver,estimator",
    [
        ("gen_rd_hessian_curves_digits_all.sh", "hessian"),
        ("gen_rd_curves_digits_all.sh", "measured"),
    ],
)
def test_digits_drivers_end_to_end(tmp_path, driver, estimator):
    proc = run_driver(driver, tmp_path, CPU_PARTS="2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 part(s)" in proc.stdout and "dp" in proc.stdout
    metas = [json.loads(p.read_text()) for p in (tmp_path / "curves").glob("*/meta.json")]
    assert sorted(m["kind"] for m in metas) == ["act", "weight"]
    assert {m["estimator"] for m in metas} == {estimator}
    # Both parts wrote their own run file into each curve set.
    for d in (tmp_path / "curves").iterdir():
        assert sorted(p.name for p in d.glob("run_part*.json")) == [
            "run_part000.json",
            "run_part001.json",
        ]
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["target_bits"] for r in rows] == [3.0, 4.0]
    assert all(r["avg_bits"] <= r["target_bits"] + 1e-9 and r["n_eval"] == 200 for r in rows)


def test_a_failing_part_fails_the_driver(tmp_path):
    proc = run_driver(
        "gen_rd_hessian_curves_digits_all.sh", tmp_path, NCHANNELBATCH="0", CPU_PARTS="2"
    )
    assert proc.returncode != 0
    assert "part 0 of generate_rd_curves_batch_hessian.py failed" in proc.stderr
    assert not (tmp_path / "results.jsonl").exists()


def test_paper_driver_runs_on_a_tiny_timm_model(tmp_path):
    proc = run_driver(
        "gen_rd_hessian_curves_deit_b_224_all.sh",
        tmp_path,
        MODELNAME="test_vit",
        DATAKIND="synthetic",
        MODEL_FLAGS="--random-init",
        NCHANNELBATCH="64",
        TESTSIZE="4",
        BATCHSIZE="2",
        MAXRATES="5",
        MAXDEADZONES="2",
        TARGET_RATES="3",
        EVALSIZE="8",
        SOLVER="lg",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["method"] == "lg+bcw+bca" and rows[0]["avg_bits"] <= 3
    # The paper's run makes its curves with the paper's eq. 18/21 settings.
    metas = [json.loads(p.read_text()) for p in (tmp_path / "curves").glob("*/meta.json")]
    assert len(metas) == 2
    assert all(m["estimator_params"]["preset"] == "paper" for m in metas)
