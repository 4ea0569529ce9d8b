"""The allocation scripts end to end on test_vit, with curves from the curve scripts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rdoq.allocfile import load_allocation
from rdoq.cli_alloc import allocate_main
from rdoq.cli_eval import evaluate_main
from tests.conftest import run_script

DP = "classification/generate_DP_batch_distortion_act_out_nchan.py"
LG = "classification/generate_LG_batch_distortion_act_out_nchan.py"
FRONTIER = "classification/generate_RD_frontier_batch_distortion_act_out_nchan.py"
EVAL = "classification/evaluate_allocation.py"
MODEL = ["--archname", "test_vit", "--random-init", "--dataset", "synthetic"]

# Every test here needs curves from the curve scripts (a subprocess run of about 40 s).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def curves(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("curves")
    common = [
        *MODEL,
        "--testsize",
        "2",
        "--nchannelbatch",
        "64",
        "--maxrates",
        "5",
        "--quiet",
        "--outdir",
        str(out),
    ]
    run_script(
        "classification/generate_RD_curves_batch.py",
        *common,
        "--maxdeadzones",
        "2",
        "--maxsteps",
        "6",
    )
    run_script("classification/generate_RD_curves_act_out_nchan.py", *common, "--maxsteps", "10")
    weight = next(p for p in out.iterdir() if p.name.endswith("_channelwise_opt_dist"))
    return {"root": out, "weight": weight}


def flags(curves, outdir: Path, *extra: str) -> list[str]:
    return [
        *MODEL,
        "--pathrdcurve",
        str(curves["weight"]),
        "--act_curve_root_dir",
        str(curves["root"]),
        "--testsize",
        "8",
        "--batchsize",
        "4",
        "--quiet",
        "--outdir",
        str(outdir),
        *extra,
    ]


def test_dp_script_writes_allocations_results_and_plots(tmp_path, curves):
    out = tmp_path / "dp"
    proc = run_script(
        DP,
        *flags(curves, out, "--target_rates", "2", "3.5", "--save-model", "--maxslopesteps", "196"),
    )
    assert "target" in proc.stdout and "W bits" in proc.stdout
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["target_bits"] for r in rows] == [2.0, 3.5]
    for r in rows:
        assert r["avg_bits"] <= r["target_bits"] + 1e-9 and r["top1"] is None
        assert r["out_mse"] > 0 and r["pred_dist"] > 0 and r["size_mb"] < r["fp_size_mb"]
        # First and last activations stay in full precision by default, and are listed.
        assert {"patch_embed.proj", "head"} <= set(r["fp_act_layers"])
        alloc = load_allocation(out / r["allocation"])
        assert alloc["solver"] == "dp" and "head" not in alloc["acts"]
    assert rows[1]["out_mse"] < rows[0]["out_mse"]
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"target_bits", "w_bits", "a_bits", "out_mse", "size_mb"} <= set(header)
    for f in ("results.png", "dp/bits_2.png", "dp/bits_3.5.png", "dp/model_2.pth"):
        assert (out / f).stat().st_size > 0, f
    blob = torch.load(out / "dp/model_2.pth", weights_only=True)
    assert blob["act_quantizers"] and blob["act_mode"] == "out"


def test_lg_and_frontier_agree_with_dp(tmp_path, curves):
    dp = allocate_main("dp", argv=flags(curves, tmp_path / "dp", "--target_rates", "3"))
    lg = allocate_main("lg", argv=flags(curves, tmp_path / "lg", "--target_rates", "3"))
    d, g = dp["rows"][0], lg["rows"][0]
    assert g["avg_bits"] <= 3 + 1e-9
    # DP is exact: never worse than the Lagrangian's hull point at the same budget.
    assert d["pred_dist"] <= g["pred_dist"] * (1 + 1e-12)
    fr = allocate_main(
        "frontier", argv=flags(curves, tmp_path / "fr", "--maxslopesteps", "60", "--no-plots")
    )
    pts = sorted(fr["rows"], key=lambda r: r["avg_bits"])
    assert len(pts) > 5 and len({r["allocation"] for r in pts}) == len(pts)
    preds = [r["pred_dist"] for r in pts]
    assert all(a >= b for a, b in zip(preds, preds[1:], strict=False))
    # The target-rate Lagrangian point is on the same lower hull: no sweep point with fewer bits
    # predicts less distortion.
    below = [r for r in pts if r["avg_bits"] <= g["avg_bits"] + 1e-12]
    assert below and all(r["pred_dist"] >= g["pred_dist"] * (1 - 1e-12) for r in below)


def test_separate_budgets_layerwise_and_corrections(tmp_path, curves):
    res = allocate_main(
        "dp",
        argv=flags(
            curves,
            tmp_path / "s",
            "--target_rates",
            "3",
            "--act-target-rates",
            "4",
            "--layerwise",
            "-bcw",
            "-bca",
            "--bit_list",
            "0",
            "2",
            "3",
            "4",
            "--no-plots",
            "--precision",
            "float64",
        ),
    )
    r = res["rows"][0]
    assert r["method"] == "dp+bcw+bca+layerwise"
    assert r["w_bits"] <= 3 + 1e-9 and r["a_bits"] <= 4 + 1e-9
    alloc = load_allocation(tmp_path / "s" / r["allocation"])
    for part in ("weights", "acts"):
        for e in alloc[part].values():
            assert len(set(e["bits"])) == 1 and set(e["bits"]) <= {0, 2, 3, 4}
    assert set(alloc["corrections"]) == {"bcw", "bca"}
    assert set(alloc["corrections"]["bca"]) == set(alloc["acts"])


def test_evaluate_allocation_reproduces_the_run(tmp_path, curves):
    res = allocate_main(
        "lg", argv=flags(curves, tmp_path / "lg", "--target_rates", "2.5", "-bca", "--no-plots")
    )
    path = tmp_path / "lg" / res["rows"][0]["allocation"]
    proc = run_script(
        EVAL,
        str(path),
        "--random-init",
        "--dataset",
        "synthetic",
        "--testsize",
        "8",
        "--batchsize",
        "4",
        "--quiet",
        "--outdir",
        str(tmp_path / "ev"),
    )
    assert "eval:lg" in proc.stdout
    row = json.loads((tmp_path / "ev" / "results.jsonl").read_text())
    assert row["out_mse"] == pytest.approx(res["rows"][0]["out_mse"], rel=1e-6)
    assert row["w_bits"] == res["rows"][0]["w_bits"]


@pytest.mark.parametrize(
    "extra,expect",
    [
        (["--target_rates", "9"], "--target_rates 9.0 is outside"),
        (["--nchannelbatch", "16"], "--nchannelbatch 16 contradicts"),
        (["--maxrates", "12"], "--maxrates 12 is outside 2..5"),
        (["--maxrates", "1"], "--maxrates 1 is outside 2..5"),
        (["--maxdeadzones", "3"], "--maxdeadzones 3 contradicts"),
        (["--target_rates", "3", "--act-target-rates", "2", "3"], "one value or one per"),
        (["--bit_list", "3", "9"], "allowed bit widths [9]"),
        (["--minrate", "5"], "no allowed choice"),
    ],
)
def test_bad_allocation_flags_write_nothing(tmp_path, curves, capsys, extra, expect):
    out = tmp_path / "never"
    with pytest.raises(SystemExit):
        allocate_main("dp", argv=flags(curves, out, *extra))
    assert expect in capsys.readouterr().err
    assert not out.exists()


def test_missing_layer_and_other_model_are_named(tmp_path, curves, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(curves["weight"], broken)
    (broken / "layers" / "blocks.0.mlp.fc1.npz").unlink()
    args = flags(curves, tmp_path / "x")
    args[args.index("--pathrdcurve") + 1] = str(broken)
    with pytest.raises(SystemExit):
        allocate_main("dp", argv=args)
    assert "misses layers ['blocks.0.mlp.fc1']" in capsys.readouterr().err
    args = flags(curves, tmp_path / "x")
    args[args.index("test_vit")] = "test_resnet"
    with pytest.raises(SystemExit):
        allocate_main("dp", argv=args)
    assert "model='test_vit'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_evaluate_allocation_refuses_another_model(tmp_path, curves, capsys):
    res = allocate_main(
        "dp", argv=flags(curves, tmp_path / "dp", "--target_rates", "3", "--no-plots")
    )
    path = tmp_path / "dp" / res["rows"][0]["allocation"]
    with pytest.raises(SystemExit):
        evaluate_main(
            [
                str(path),
                "--archname",
                "test_resnet",
                "--random-init",
                "--dataset",
                "synthetic",
                "--quiet",
            ]
        )
    assert "allocation for test_vit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main(
            [str(path), "--random-init", "--seed", "1", "--dataset", "synthetic", "--quiet"]
        )
    assert "weights_source='random-init:seed=0'" in capsys.readouterr().err


def test_another_allocation_is_never_overwritten(tmp_path, curves, capsys):
    out = tmp_path / "dp"
    allocate_main("dp", argv=flags(curves, out, "--target_rates", "3", "--no-plots"))
    path = out / "dp" / "allocation_3.json"
    before = path.read_text()
    # The same settings again: allowed (same allocation); its result row replaces the old one.
    allocate_main("dp", argv=flags(curves, out, "--target_rates", "3", "--no-plots"))
    with pytest.raises(SystemExit):
        allocate_main(
            "dp", argv=flags(curves, out, "--target_rates", "3", "--minrate", "2", "--no-plots")
        )
    assert "holds another allocation" in capsys.readouterr().err
    assert path.read_text() == before
    assert len((out / "results.jsonl").read_text().splitlines()) == 1


def test_uniform_baseline_script(tmp_path):
    out = tmp_path / "u"
    proc = run_script(
        "classification/uniform_baseline.py",
        *MODEL,
        "--testsize",
        "8",
        "--calibsize",
        "2",
        "--target_rates",
        "3",
        "6",
        "--act-target-rates",
        "8",
        "--quiet",
        "--outdir",
        str(out),
        "--no-plots",
    )
    assert "uniform" in proc.stdout
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["w_bits"], r["a_bits"]) for r in rows] == [(3.0, 8.0), (6.0, 8.0)]
    assert rows[1]["out_mse"] < rows[0]["out_mse"]
    assert (out / "uniform/allocation_3_a8.json").is_file()
