"""The allocation scripts look for activation curves as the paper did (``--act_curve_root_dir``
defaults to the current directory); weights-only runs say so with ``--weights-only``."""

from __future__ import annotations

from pathlib import Path

import pytest

from rdoq.allocfile import load_allocation
from rdoq.cli_alloc import allocate_main
from rdoq.cli_curves import curves_main

MODEL = ["--archname", "test_vit", "--random-init", "--dataset", "synthetic", "--quiet"]

# Every test here needs the weight and activation curve sets of test_vit (about 20 s).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def curves(tmp_path_factory) -> dict[str, Path]:
    """Weight and output-activation curve sets of test_vit side by side in one directory."""
    root = tmp_path_factory.mktemp("curves")
    common = [
        *MODEL,
        "--testsize",
        "2",
        "--nchannelbatch",
        "64",
        "--maxrates",
        "4",
        "--outdir",
        str(root),
    ]
    curves_main("weight", None, [*common, "--maxdeadzones", "1", "--maxsteps", "4"])
    curves_main("act", "out", [*common, "--maxsteps", "10"])
    weight = next(p for p in root.iterdir() if p.name.endswith("_channelwise_opt_dist"))
    return {"root": root, "weight": weight}


def alloc_flags(curves, outdir: Path, *extra: str) -> list[str]:
    return [
        *MODEL,
        "--pathrdcurve",
        str(curves["weight"]),
        "--target_rates",
        "3",
        "--testsize",
        "4",
        "--batchsize",
        "4",
        "--no-plots",
        "--outdir",
        str(outdir),
        *extra,
    ]


def test_no_act_curves_without_weights_only_is_a_clear_error(tmp_path, curves, capsys, monkeypatch):
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    monkeypatch.chdir(empty)
    out = tmp_path / "never"
    with pytest.raises(SystemExit):
        allocate_main("dp", argv=alloc_flags(curves, out))
    err = capsys.readouterr().err
    assert str(empty) in err  # the directory searched
    assert "test_vit_nr_0004_ns_0002_nf_*_rdcurves_out_channelwise_opt_dist_act" in err
    assert "--act_curve_root_dir" in err and "--weights-only" in err  # the fixes
    assert not out.exists()


def test_weights_only_allocates_weights_alone(tmp_path, curves, monkeypatch):
    monkeypatch.chdir(curves["root"])  # act curves are right here and must be ignored
    out = tmp_path / "w"
    res = allocate_main("dp", argv=alloc_flags(curves, out, "--weights-only"))
    row = res["rows"][0]
    assert load_allocation(out / row["allocation"])["acts"] == {}
    assert row["avg_bits"] <= 3 + 1e-9


def test_default_finds_the_act_curves_in_the_current_directory(tmp_path, curves, monkeypatch):
    monkeypatch.chdir(curves["root"])
    out = tmp_path / "wa"
    res = allocate_main("dp", argv=alloc_flags(curves, out))
    assert load_allocation(out / res["rows"][0]["allocation"])["acts"]


def test_weights_only_contradicts_an_act_curve_dir(tmp_path, curves, capsys):
    with pytest.raises(SystemExit):
        allocate_main(
            "dp",
            argv=alloc_flags(
                curves,
                tmp_path / "x",
                "--weights-only",
                "--act_curve_root_dir",
                str(curves["root"]),
            ),
        )
    err = capsys.readouterr().err
    assert "--weights-only" in err and "contradict" in err
