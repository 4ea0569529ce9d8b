"""The detection scripts (``openpcdet/*.py``) and their driver end to end against the real,
unmodified OpenPCDet source (``conftest.pcdet_src``), on CPU.

The stock ``cbgs_voxel0075_voxelnext.yaml`` with the point cloud range cropped by ``--set`` to
4.8 m x 4.8 m x 3 m (a 64 x 64 BEV grid at 0.075 m) and synthetic frames of 500 points, so
that one forward takes about 0.07 s; a random checkpoint saved in pcdet's format. The full-size
layer shapes do not depend on the range: discovery still finds the paper's 30 backbone layers
and 7,066,224 weights.
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

from rdoq.allocfile import load_allocation
from rdoq.report import read_results
from rdoq.store import CurveStore

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.cuda.amp.custom_fwd:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning"),
    pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
CURVES = ROOT / "openpcdet" / "generate_rd_curves_batch.py"
ALLOCATE = ROOT / "openpcdet" / "generate_DP_frontier_batch_act_nchan.py"
DRIVER = ROOT / "scripts" / "gen_rd_curves_voxelnext_all.sh"
CFG = "cfgs/nuscenes_models/cbgs_voxel0075_voxelnext.yaml"  # the paper's, relative to tools/
RANGE = "[-2.4,-2.4,-2.0,2.4,2.4,1.0]"
CROP = ["--set", "DATA_CONFIG.POINT_CLOUD_RANGE", RANGE]
PAPER_LAYERS = 30
PAPER_WEIGHTS = 7_066_224
# Small curves: 3 widths, no dead zone, the MSE-optimal steps alone: 3 candidates per layer.
FAST = [
    "--data",
    "synthetic",
    "--calib_frames",
    "2",
    "--points_per_frame",
    "500",
    "--maxrates",
    "3",
    "--maxdeadzones",
    "1",
    "--maxsteps",
    "4",
    "--scale-octaves",
    "0",
    "--quiet",
]


def run(
    script: Path, args: list[str], cwd: Path, timeout: int = 300
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tools(pcdet_src: Path) -> Path:
    return pcdet_src / "tools"


@pytest.fixture(scope="module")
def checkpoint(pcdet_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random VoxelNeXt checkpoint in pcdet's format (what train_utils.save_checkpoint
    writes, less the optimizer)."""
    from rdoq.adapters.openpcdet import build_detector

    det = build_detector(
        pcdet_src / "tools" / CFG,
        None,
        ("DATA_CONFIG.POINT_CLOUD_RANGE", RANGE),
        pcdet_src=pcdet_src,
        seed=0,
    )
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_epoch_1.pth"
    torch.save(
        {
            "epoch": 1,
            "it": 0,
            "model_state": det.model.state_dict(),
            "optimizer_state": None,
            "version": "pcdet+0.6.0",
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def measured(tools: Path, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """A measured curve set made from anywhere with --pcdet_tools, and its run summary."""
    out = tmp_path_factory.mktemp("measured")
    proc = run(
        CURVES,
        [
            "--pcdet_tools",
            str(tools),
            "--pretrained_model",
            str(checkpoint),
            *FAST,
            "--outdir",
            str(out),
            *CROP,
        ],
        cwd=out,
    )
    summary = summary_of(proc)
    return Path(summary["curve_set"]), summary


@pytest.mark.slow
def test_curve_script_covers_the_papers_30_layers_and_a_rerun_resumes(
    measured, tools: Path, checkpoint: Path
):
    root, summary = measured
    # The paper's curve-set name (ns = calibration frames, nf = group size).
    assert root.name == "VoxelNeXt_ndz_0001_nr_0003_ns_0002_nf_0128_rdcurves_channelwise_opt_dist"
    assert summary["layers_total"] == summary["layers_written"] == PAPER_LAYERS
    assert summary["missing_layers"] == 0 and summary["weights_total"] == PAPER_WEIGHTS
    store = CurveStore.load(root)
    meta = store.meta
    assert meta["model"] == "VoxelNeXt" and meta["estimator"] == "measured"
    assert len(meta["layers"]) == PAPER_LAYERS
    assert sum(e["numel"] for e in meta["layers"]) == PAPER_WEIGHTS
    assert all(e["name"].startswith("backbone_3d.") for e in meta["layers"])
    calib = meta["calib"]
    assert (calib["data"], calib["size"], calib["dist"]) == ("synthetic", 2, "bev")
    assert calib["items"] == ["synthetic_0_0", "synthetic_0_1"]
    for e in meta["layers"]:
        c = store.read_layer(e["name"])
        assert c.dist.shape == (1, 1, 3) and np.isfinite(c.dist).all() and (c.dist >= 0).all()
    # The classification tools read it.
    shown = subprocess.run(
        [sys.executable, str(ROOT / "classification" / "show_curves.py"), str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "30 layers, 30 groups of 128 channels, missing layers: 0" in shown.stdout
    # The paper's way: from tools/, the default --cfg_file relative to it; finished layers
    # are skipped.
    again = summary_of(
        run(
            CURVES,
            ["--pretrained_model", str(checkpoint), *FAST, "--outdir", str(root.parent), *CROP],
            cwd=tools,
        )
    )
    assert again["curve_set"] == str(root)
    assert (again["layers_skipped"], again["layers_written"]) == (PAPER_LAYERS, 0)


@pytest.mark.slow
def test_second_order_curve_script(tools: Path, checkpoint: Path, tmp_path: Path):
    summary = summary_of(
        run(
            CURVES,
            [
                "--pcdet_tools",
                str(tools),
                "--pretrained_model",
                str(checkpoint),
                *FAST,
                "--hessian",
                "--pathrdcurve",
                str(tmp_path / "h"),
                *CROP,
            ],
            cwd=tmp_path,
        )
    )
    assert summary["layers_written"] == PAPER_LAYERS and summary["missing_layers"] == 0
    store = CurveStore.load(tmp_path / "h")
    assert store.meta["estimator"] == "hessian"
    assert sum(e["numel"] for e in store.meta["layers"]) == PAPER_WEIGHTS
    assert all(np.isfinite(store.read_layer(e["name"]).dist).all() for e in store.meta["layers"])
    # One fold per calibration frame, for the allocation's cross-validated --shrink.
    assert store.meta["folds"]["count"] == 2
    first = store.read_layer(store.meta["layers"][0]["name"])
    assert first.extra["dist_folds"].shape == (2, *first.dist.shape)
    out = tmp_path / "dp"
    proc = run(
        ALLOCATE,
        [
            "--pcdet_tools",
            str(tools),
            "--pretrained_model",
            str(checkpoint),
            "--pathrdcurve",
            str(tmp_path / "h"),
            "--target_rates",
            "2",
            "--outdir",
            str(out),
            "--quiet",
            "--skip-eval",
            "--shrink",
            "cv",
            *CROP,
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = read_results(out / "results.jsonl")[0]
    assert 0.0 <= row["shrink_alpha"] <= 1.0
    assert "shrink_cv" in load_allocation(out / row["allocation"])


@pytest.mark.slow
def test_allocation_writes_its_files_then_stops_for_want_of_a_gpu(
    measured, tools: Path, checkpoint: Path, tmp_path: Path
):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: evaluation is a device check, not a CPU test")
    root, _ = measured
    out = tmp_path / "dp"
    proc = run(
        ALLOCATE,
        [
            "--pcdet_tools",
            str(tools),
            "--pretrained_model",
            str(checkpoint),
            "--pathrdcurve",
            str(root),
            "--target_rates",
            "1",
            "2",
            "--outdir",
            str(out),
            "--quiet",
            *CROP,
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "mAP/NDS evaluation needs a GPU" in err and "no CUDA device" in err
    assert str(out / "allocation_2.json") in err and "results.jsonl" in err
    rows = read_results(out / "results.jsonl")
    assert [r["target_bits"] for r in rows] == [1.0, 2.0]
    for r in rows:
        alloc = load_allocation(out / r["allocation"])
        assert len(alloc["weights"]) == PAPER_LAYERS and alloc["solver"] == "dp"
        assert alloc["summary"]["w_bits"] <= r["target_bits"] + 1e-9
        assert r["w_bits"] == alloc["summary"]["w_bits"]
        assert r["mAP"] is None and r["NDS"] is None
        assert np.isfinite(r["out_mse"]) and r["out_mse"] > 0
        assert 0 < r["size_mb"] < r["fp_size_mb"]
    assert rows[1]["pred_dist"] <= rows[0]["pred_dist"]
    assert "dp" in proc.stdout and "W bits" in proc.stdout  # the table came first
    # The Lagrangian solver, evaluation skipped on purpose: exit 0.
    lg = run(
        ALLOCATE,
        [
            "--pcdet_tools",
            str(tools),
            "--pretrained_model",
            str(checkpoint),
            "--pathrdcurve",
            str(root),
            "--target_rates",
            "1",
            "--solver",
            "lg",
            "--maxbits",
            "1",
            "--skip-eval",
            "--outdir",
            str(tmp_path / "lg"),
            "--quiet",
            *CROP,
        ],
        cwd=tmp_path,
    )
    assert lg.returncode == 0, lg.stderr[-3000:]
    lg_alloc = load_allocation(tmp_path / "lg" / "allocation_1.json")
    assert lg_alloc["solver"] == "lg"
    assert max(max(e["bits"]) for e in lg_alloc["weights"].values()) <= 1  # --maxbits, as DP/LG


@pytest.mark.slow
def test_activation_curves_and_joint_allocation_with_bias_correction(
    measured, tools: Path, checkpoint: Path, tmp_path: Path
):
    """Beyond the paper: output-activation curves of the 30 sparse convs (features of the
    sparse tensors), -bcw weight curves, and one joint W/A allocation deployed with -bcw."""
    one = [
        "--pcdet_tools",
        str(tools),
        "--pretrained_model",
        str(checkpoint),
        *FAST,
        "--calib_frames",
        "1",
        "--outdir",
        str(tmp_path),
    ]
    acts = summary_of(
        run(
            CURVES,
            [*one, "--kind", "act", "--maxrates", "2", "--maxsteps", "9", *CROP],
            cwd=tmp_path,
        )
    )
    assert Path(acts["curve_set"]).name == (
        "VoxelNeXt_nr_0002_ns_0001_nf_0128_rdcurves_out_channelwise_opt_dist_act"
    )
    assert acts["layers_written"] == PAPER_LAYERS and acts["missing_layers"] == 0
    astore = CurveStore.load(acts["curve_set"])
    assert astore.meta["kind"] == "act" and astore.meta["act_mode"] == "out"
    for e in astore.meta["layers"]:
        sites, channels = e["shape"]  # the features (N_active, C) of the first frame
        assert sites > 0 and channels in (16, 32, 64, 128) and e["numel"] == sites * channels
    weights = summary_of(run(CURVES, [*one, "-bcw", *CROP], cwd=tmp_path))
    wstore = CurveStore.load(weights["curve_set"])
    assert wstore.meta["bias_corr"] is True and wstore.missing_layers() == []
    out = tmp_path / "joint"
    alloc_args = [
        "--pcdet_tools",
        str(tools),
        "--pretrained_model",
        str(checkpoint),
        "--pathrdcurve",
        weights["curve_set"],
        "--act_curve_root_dir",
        str(tmp_path),
        "--target_rates",
        "2",
        "--act-target-rates",
        "1",
        "-bcw",
        "--skip-eval",
        "--quiet",
    ]
    proc = run(ALLOCATE, [*alloc_args, "--outdir", str(out), *CROP], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = read_results(out / "results.jsonl")
    assert row["method"] == "dp+bcw" and row["allocation"] == "allocation_2_a1.json"
    assert row["a_bits"] <= 1.0 + 1e-9 and row["w_bits"] <= 2.0 + 1e-9
    assert np.isfinite(row["out_mse"]) and row["out_mse"] > 0
    alloc = load_allocation(out / row["allocation"])
    assert len(alloc["acts"]) == len(alloc["weights"]) == PAPER_LAYERS
    assert sorted(alloc["corrections"]["bcw"]) == sorted(alloc["weights"])
    # Activation curves of other calibration frames are refused by name.
    bad = run(
        ALLOCATE,
        [
            *alloc_args[:4],
            "--pathrdcurve",
            str(measured[0]),
            *alloc_args[6:],
            "--outdir",
            str(tmp_path / "bad"),
            *CROP,
        ],
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "other calibration frames" in bad.stderr


def test_openpcdet_adapter_implements_the_adapter_interface(tools: Path, checkpoint: Path):
    """The detection scripts' model, calibration, layers and evaluation come from an Adapter,
    as the classifiers' do."""
    import argparse

    from rdoq.adapters.base import Adapter, ModelInfo
    from rdoq.adapters.detector import EvalSplit, OpenPCDetAdapter
    from rdoq.adapters.sparse import FrameRunner
    from rdoq.detection import add_curve_flags, add_detector_flags

    p = argparse.ArgumentParser()
    add_detector_flags(p, evaluation=False)
    add_curve_flags(p)
    args = p.parse_args(
        [
            "--pcdet_tools",
            str(tools),
            "--pretrained_model",
            str(checkpoint),
            *FAST,
            "--device",
            "cpu",
            *CROP,
        ]
    )
    adapter = OpenPCDetAdapter()
    assert isinstance(adapter, Adapter)
    runner, info = adapter.build(args)
    assert isinstance(runner, FrameRunner) and isinstance(info, ModelInfo)
    assert info.arch == "VoxelNeXt" and info.weights_source == f"pcdet:{checkpoint.name}"
    layers = adapter.layers(runner)
    assert len(layers) == PAPER_LAYERS
    assert sum(int(np.prod(lay.shape)) for lay in layers) == PAPER_WEIGHTS
    calib = adapter.calib(args, runner, 2, 0)
    meta = calib.meta()
    assert calib.x.shape == (2, 1) and meta["sha256"] == runner.sha256()
    assert (meta["items"], meta["data"], meta["dist"]) == (
        ["synthetic_0_0", "synthetic_0_1"],
        "synthetic",
        "bev",
    )
    with pytest.raises(ValueError, match="built with 2 calibration frames"):
        adapter.calib(args, runner, 3, 0)
    assert torch.equal(adapter.example_input(runner, 1, 0), calib.x[:1])
    with torch.no_grad():
        out = adapter.run(runner, calib.x)  # (2, C, H, W) BEV features
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    assert all(
        adapter.channel_axis(dict(runner.named_modules())[lay.name]) == -1 for lay in layers
    )  # sparse features (N_active, C)
    split = adapter.eval_data(args, runner)
    assert isinstance(split, EvalSplit) and split.batch_size == args.batch_size
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="evaluation needs .* a GPU.*no CUDA device"):
            adapter.evaluate(runner, split, None, torch.device("cpu"))


def test_missing_config_is_named(tools: Path, tmp_path: Path, capsys):
    from rdoq.detection import curves_main

    with pytest.raises(SystemExit):
        curves_main(
            [
                "--pcdet_tools",
                str(tools),
                "--cfg_file",
                "cfgs/nope.yaml",
                "--pretrained_model",
                str(tmp_path / "x.pth"),
                "--outdir",
                str(tmp_path),
            ]
        )
    err = capsys.readouterr().err
    assert "--cfg_file cfgs/nope.yaml does not exist" in err and "--pcdet_tools" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_checkpoint_that_loads_nothing_and_second_order_bcw_are_refused(
    tools: Path, checkpoint: Path, tmp_path: Path, capsys
):
    from rdoq.detection import curves_main

    state = torch.load(checkpoint, weights_only=True)["model_state"]
    renamed = tmp_path / "renamed.pth"
    torch.save({"model_state": {f"detector.{k}": v for k, v in state.items()}}, renamed)
    base = ["--pcdet_tools", str(tools), *FAST, "--outdir", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        curves_main([*base, "--pretrained_model", str(renamed), *CROP])
    assert f"renamed.pth sets only 0/{len(state)} tensors" in capsys.readouterr().err
    for flags in (["-bcw", "--hessian"], ["-bcw", "--kind", "act"]):
        with pytest.raises(SystemExit):
            curves_main([*base, "--pretrained_model", str(checkpoint), *flags, *CROP])
        assert "-bcw is offered with measured weight curves only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_driver_is_valid_bash():
    subprocess.run(["bash", "-n", str(DRIVER)], check=True)


@pytest.mark.slow
def test_driver_runs_end_to_end_on_synthetic_frames(tools: Path, checkpoint: Path, tmp_path: Path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "CUDA_VISIBLE_DEVICES": "",
        "PY": sys.executable,
        "PCDET_TOOLS": str(tools),
        "CKPT": str(checkpoint),
        "DATA": "synthetic",
        "CALIB_FRAMES": "1",
        "POINTS_PER_FRAME": "500",
        "MAXRATES": "3",
        "MAXDEADZONES": "1",
        "MAXSTEPS": "4",
        "TARGET_RATES": "1 2",
        "SKIP_EVAL": "1",
        "OUTDIR": str(tmp_path / "run"),
        "EXTRA_CURVE_FLAGS": "--scale-octaves 0",
        "ACT_CURVES": "1",
        "ACT_MAXSTEPS": "9",
        "SET_CFGS": f"DATA_CONFIG.POINT_CLOUD_RANGE {RANGE}",
    }
    proc = subprocess.run(
        ["bash", str(DRIVER)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = CurveStore.load(tmp_path / "run" / "curves")
    assert store.missing_layers() == [] and len(store.meta["layers"]) == PAPER_LAYERS
    acts = CurveStore.load(tmp_path / "run" / "act_curves")
    assert acts.missing_layers() == [] and acts.meta["kind"] == "act"
    rows = read_results(tmp_path / "run" / "results.jsonl")
    assert [r["target_bits"] for r in rows] == [1.0, 2.0]
    assert all(r["a_bits"] is not None for r in rows)  # joint W/A allocation
