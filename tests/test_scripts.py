"""The curve scripts end to end: outputs, resume after a kill, parts, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rdoq.cli_curves import curves_main, show_main
from rdoq.store import CurveStore
from tests.conftest import ROOT, run_script

WEIGHTS = "classification/generate_RD_curves_batch.py"
ACT_OUT = "classification/generate_RD_curves_act_out_nchan.py"
ACT_IN = "classification/generate_RD_curves_act_nchan.py"
SMALL = [
    "--random-init",
    "--dataset",
    "synthetic",
    "--testsize",
    "2",
    "--nchannelbatch",
    "64",
    "--maxrates",
    "3",
    "--quiet",
]
SMALL_W = [*SMALL, "--maxdeadzones", "2", "--maxsteps", "6"]
SMALL_A = [*SMALL, "--maxsteps", "12"]


def only_dir(path: Path) -> Path:
    dirs = [p for p in path.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def load_all(curve_set: Path) -> dict[str, dict[str, np.ndarray]]:
    store = CurveStore.load(curve_set)
    out = {}
    for name in store.layer_names():
        c = store.read_layer(name)
        out[name] = {
            "dist": c.dist,
            "step_log2": c.step_log2,
            "deadzone": c.deadzone,
            "numel": c.numel,
        }
    return out


# A curve-script run in a subprocess (about 15 s): its users are `slow`.
@pytest.fixture(scope="module")
def vit_weight_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vitw")
    run_script(WEIGHTS, "--archname", "test_vit", *SMALL_W, "--outdir", str(out))
    return only_dir(out)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["test_vit", "test_resnet"])
@pytest.mark.parametrize(
    "script,extra,kind,mode",
    [
        (WEIGHTS, SMALL_W, "weight", None),
        (ACT_OUT, SMALL_A, "act", "out"),
        (ACT_IN, SMALL_A, "act", "in"),
    ],
)
def test_scripts_end_to_end(tmp_path, arch, script, extra, kind, mode):
    proc = run_script(script, "--archname", arch, *extra, "--outdir", str(tmp_path))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    curve_set = only_dir(tmp_path)
    suffix = {
        "weight": "_rdcurves_channelwise_opt_dist",
        "out": "_rdcurves_out_channelwise_opt_dist_act",
        "in": "_rdcurves_channelwise_opt_dist_act",
    }[mode or kind]
    assert curve_set.name.startswith(f"{arch}_") and curve_set.name.endswith(suffix)
    assert "_nf_0064_" in curve_set.name and "_ns_0002_" in curve_set.name
    meta = json.loads((curve_set / "meta.json").read_text())
    assert meta["kind"] == kind and meta["act_mode"] == mode and meta["estimator"] == "measured"
    assert meta["group_size"] == 64 and meta["bits"] == [0, 1, 2]
    assert meta["calib"]["items"] == [0, 1] and len(meta["calib"]["sha256"]) == 64
    assert summary["layers_written"] == len(meta["layers"]) == summary["layers_total"]
    curves = load_all(curve_set)
    ratios = []
    for layer in meta["layers"]:
        c = curves[layer["name"]]
        g = layer["groups"]
        assert c["dist"].shape == (g, 2 if kind == "weight" else 1, 3)
        assert int(c["numel"].sum()) == layer["numel"]
        assert np.all(np.isfinite(c["dist"])) and np.all(c["dist"] >= 0)
        # timm zero-inits the last BN of each ResNet block: those groups cannot distort at all.
        live = c["dist"][:, :, 0] > 0
        ratios.append(c["dist"][:, :, 2][live] / c["dist"][:, :, 0][live])
    # More bits help: measured curves are not guaranteed monotone (the step search is local),
    # but two bits beat pruning (0 bits) for the typical group.
    assert np.median(np.concatenate(ratios)) < 0.5


def _wait_for_layers(proc: subprocess.Popen, layers_dir: Path, n: int, what: str) -> None:
    """Wait (at most 300 s) until a running curve script has written ``n`` layer files; it must
    still be running then, so that it can be ``what`` (killed, interrupted) mid-run."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if layers_dir.is_dir() and len(list(layers_dir.glob("*.npz"))) >= n:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run finished before it could be {what}"


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_curves(tmp_path, vit_weight_run):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    cmd = [
        sys.executable,
        str(ROOT / WEIGHTS),
        "--archname",
        "test_vit",
        *SMALL_W,
        "--outdir",
        str(tmp_path),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    layers_dir = tmp_path / vit_weight_run.name / "layers"
    _wait_for_layers(proc, layers_dir, 3, "killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = CurveStore.load(tmp_path / vit_weight_run.name)
    done_before = {
        n: store.layer_path(n).stat().st_mtime_ns for n in store.layer_names() if store.has_layer(n)
    }
    assert 3 <= len(done_before) < len(store.layer_names())
    run_script(WEIGHTS, "--archname", "test_vit", *SMALL_W, "--outdir", str(tmp_path))
    assert store.missing_layers() == []
    for name, mtime in done_before.items():
        assert store.layer_path(name).stat().st_mtime_ns == mtime, f"{name} was recomputed"
    assert not list(layers_dir.glob(".*.tmp")), "temp files left behind"
    resumed, fresh = load_all(store.root), load_all(vit_weight_run)
    for name in fresh:
        for key in fresh[name]:
            np.testing.assert_array_equal(resumed[name][key], fresh[name][key], err_msg=name)


@pytest.mark.slow
def test_truncated_layer_file_is_recomputed_on_resume(tmp_path, vit_weight_run):
    from rdoq.store import open_curve_set

    curve_set = tmp_path / vit_weight_run.name
    shutil.copytree(vit_weight_run, curve_set)
    store = CurveStore.load(curve_set)
    broken = store.layer_names()[len(store.layer_names()) // 2]
    path = store.layer_path(broken)
    path.write_bytes(path.read_bytes()[:300])  # a copy or a full disk stopped half way
    mtimes = {n: store.layer_path(n).stat().st_mtime_ns for n in store.layer_names()}
    # The allocation and show_curves see a missing layer instead of crashing.
    with pytest.raises(ValueError, match=broken):
        open_curve_set(curve_set, "weight")
    assert "missing layers: 1" in show_main([str(curve_set)])
    summary = curves_main(
        "weight", None, ["--archname", "test_vit", *SMALL_W, "--outdir", str(tmp_path)]
    )
    assert summary["layers_written"] == 1 and summary["missing_layers"] == 0
    for name, mtime in mtimes.items():
        if name != broken:
            assert store.layer_path(name).stat().st_mtime_ns == mtime, f"{name} was recomputed"
    assert not list(path.parent.glob(".*.tmp"))
    resumed, fresh = load_all(curve_set), load_all(vit_weight_run)
    for key in fresh[broken]:
        np.testing.assert_array_equal(resumed[broken][key], fresh[broken][key])


@pytest.mark.slow
def test_parts_are_disjoint_and_complete(tmp_path, vit_weight_run):
    written = []
    for part in (0, 1):
        proc = run_script(
            WEIGHTS,
            "--archname",
            "test_vit",
            *SMALL_W,
            "--outdir",
            str(tmp_path),
            "--part_id",
            str(part),
            "--num_parts",
            "2",
        )
        written.append(json.loads(proc.stdout.strip().splitlines()[-1])["layers_written"])
    curve_set = tmp_path / vit_weight_run.name
    store = CurveStore.load(curve_set)
    assert store.missing_layers() == []
    assert sum(written) == len(store.layer_names()) and min(written) > 0
    parted, fresh = load_all(curve_set), load_all(vit_weight_run)
    for name in fresh:
        np.testing.assert_array_equal(parted[name]["dist"], fresh[name]["dist"], err_msg=name)


@pytest.mark.slow
def test_torchrun_environment_selects_the_part(tmp_path, monkeypatch, vit_weight_run):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    summary = curves_main(
        "weight",
        None,
        ["--archname", "test_vit", *SMALL_W, "--outdir", str(tmp_path), "--device", "cpu"],
    )
    assert summary["layers_part"] < summary["layers_total"]
    run = json.loads((tmp_path / vit_weight_run.name / "run_part001.json").read_text())
    assert 0 < run["summary"]["layers_written"] < run["summary"]["layers_total"]


def bad(capsys, tmp_path, kind, argv) -> str:
    """Run a curve script in-process with bad flags; return its error message."""
    with pytest.raises(SystemExit) as exc:
        curves_main(kind, "out" if kind == "act" else None, [*argv, "--outdir", str(tmp_path)])
    assert exc.value.code != 0
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,expect",
    [
        (
            ["--datapath", "/nonexistent/imagenet"],
            "--datapath /nonexistent/imagenet does not exist",
        ),
        (["--nchannelbatch", "0"], "--nchannelbatch must be > 0, got 0"),
        (["--maxrates", "1"], "--maxrates must be >= 2"),
        (["--testsize", "0"], "--testsize must be > 0, got 0"),
        (["--part_id", "2", "--num_parts", "2"], "--part_id 2 is outside 0..1"),
        (["--maxsteps", "2"], "--maxsteps >= 3"),
    ],
)
def test_bad_flags_are_refused_and_write_nothing(tmp_path, capsys, argv, expect):
    base = ["--archname", "test_vit", "--random-init", "--quiet"]
    if "--datapath" not in argv:
        base += ["--dataset", "synthetic"]
    err = bad(capsys, tmp_path, "weight", [*base, *argv])
    assert expect in err, err
    assert list(tmp_path.iterdir()) == []


def test_datapath_problems(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    base = ["--archname", "test_vit", "--random-init", "--quiet"]
    assert "is empty" in bad(capsys, out, "weight", [*base, "--datapath", str(empty)])
    (empty / "val").mkdir()
    assert "has no train/ folder" in bad(capsys, out, "weight", [*base, "--datapath", str(empty)])
    assert not out.exists()


def test_unknown_arch_suggests_names(tmp_path, capsys):
    err = bad(
        capsys,
        tmp_path,
        "weight",
        ["--archname", "deit_tiny_patch16_22", "--random-init", "--dataset", "synthetic"],
    )
    assert "unknown --archname 'deit_tiny_patch16_22'" in err
    assert "deit_tiny_patch16_224" in err


def test_unreachable_pretrained_weights_name_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    err = bad(capsys, tmp_path, "weight", ["--archname", "test_vit", "--dataset", "synthetic"])
    assert "pass --checkpoint FILE or --random-init" in err
    assert time.time() - t0 < 60
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_existing_curve_set_with_other_settings_is_refused(tmp_path, capsys, vit_weight_run):
    target = tmp_path / vit_weight_run.name
    target.mkdir()
    (target / "meta.json").write_text((vit_weight_run / "meta.json").read_text())
    before = sorted(p.name for p in target.rglob("*"))
    err = bad(capsys, tmp_path, "weight", ["--archname", "test_vit", *SMALL_W[:-1], "7"])
    assert "max_steps=6" in err and "max_steps=7" in err
    assert sorted(p.name for p in target.rglob("*")) == before


def test_torchrun_rank_picks_the_part_when_only_num_parts_is_given(monkeypatch):
    from rdoq.parts import resolve_part

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_part(None, 4).part_id == 2
    assert resolve_part(None, None).num_parts == 4
    assert resolve_part(1, 3).part_id == 1


@pytest.mark.parametrize(
    "argv,expect",
    [
        (["--max-batch", "0"], "--max-batch must be > 0"),
        (["--mem-budget-mb", "-1"], "--mem-budget-mb must be > 0"),
        (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
        (["--checkpoint", "x.pth"], "--checkpoint and --random-init contradict"),
    ],
)
def test_more_bad_flags(tmp_path, capsys, argv, expect):
    err = bad(
        capsys,
        tmp_path,
        "weight",
        ["--archname", "test_vit", "--random-init", "--dataset", "synthetic", "--quiet", *argv],
    )
    assert expect in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage",
    [
        "not json",
        "no kind",
        "old schema",
        "layer without groups",
        "layers not a list",
        "bits not ints",
    ],
)
def test_show_curves_names_a_bad_meta_json(tmp_path, capsys, vit_weight_run, damage):
    meta = json.loads((vit_weight_run / "meta.json").read_text())
    if damage == "no kind":
        del meta["kind"]
    elif damage == "old schema":
        meta["schema"] = "rdoq.curves/1"
    elif damage == "layer without groups":
        del meta["layers"][0]["groups"]
    elif damage == "layers not a list":
        meta["layers"] = {"blocks.0.attn.qkv": 3}
    elif damage == "bits not ints":
        meta["bits"] = "0..2"
    curve_set = tmp_path / "set"
    curve_set.mkdir()
    path = curve_set / "meta.json"
    path.write_text("{not json" if damage == "not json" else json.dumps(meta))
    with pytest.raises(SystemExit) as exc:
        show_main([str(tmp_path)])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0], err


@pytest.mark.parametrize(
    "main,args,hint",
    [
        ("curves_main", ("weight",), "re-run the same command to resume"),
        ("allocate_main", ("dp",), "results.jsonl"),
        ("uniform_main", (), "results.jsonl"),
        ("evaluate_main", (), "results.jsonl"),
        ("show_main", (), "interrupted"),
        ("results_main", (), "interrupted"),
        ("train_digits", (), "interrupted"),
    ],
)
def test_ctrl_c_exits_with_one_line_and_code_130(monkeypatch, capsys, main, args, hint):
    import argparse
    import importlib.util

    from rdoq import cli_alloc, cli_curves, cli_eval

    if main == "train_digits":
        spec = importlib.util.spec_from_file_location(
            "train_digits", ROOT / "classification/train_digits.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        main = module.main
    else:
        main = next(getattr(m, main) for m in (cli_curves, cli_alloc, cli_eval) if hasattr(m, main))

    def interrupted(self, argv=None, namespace=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(*args, argv=["x"])
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and hint in err, err


@pytest.mark.slow
def test_ctrl_c_in_a_curve_run_keeps_finished_layers(tmp_path, vit_weight_run):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    cmd = [
        sys.executable,
        str(ROOT / WEIGHTS),
        "--archname",
        "test_vit",
        *SMALL_W,
        "--outdir",
        str(tmp_path),
    ]
    # A test run started in the background inherits SIGINT ignored, and Python then keeps it
    # ignored in the child: give the script the default disposition a terminal would.
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    layers_dir = tmp_path / vit_weight_run.name / "layers"
    _wait_for_layers(proc, layers_dir, 2, "interrupted")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines() == [
        "generate_RD_curves_batch.py: interrupted; finished layers are kept, re-run the same "
        "command to resume"
    ], err
    store = CurveStore.load(tmp_path / vit_weight_run.name)
    assert 2 <= len(store.layer_names()) - len(store.missing_layers())
    assert not list(layers_dir.glob(".*.tmp"))
