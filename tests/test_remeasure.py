"""Measured re-check of second-order curves (rdoq.remeasure, classification/remeasure_curves.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rdoq.adapters.base import InputError
from rdoq.remeasure import MIXED_ESTIMATOR, rank_layers, select_layers
from rdoq.store import CurveStore, LayerCurves

RANKED = [("c", 0.5), ("a", 0.3), ("b", 0.15), ("d", 0.05)]


def test_selection_rules_pick_from_the_ranking_in_order():
    assert select_layers(RANKED, "top:2") == ["c", "a"]
    assert select_layers(RANKED, "top:9") == ["c", "a", "b", "d"]
    assert select_layers(RANKED, "share:0.8") == ["c", "a"]
    assert select_layers(RANKED, "share:0.81") == ["c", "a", "b"]
    assert select_layers(RANKED, "share:1") == ["c", "a", "b", "d"]
    assert select_layers(RANKED, "all") == ["c", "a", "b", "d"]
    assert select_layers(RANKED, "d, a") == ["a", "d"]


@pytest.mark.parametrize(
    "spec,says",
    [
        ("top:0", "top:K"),
        ("top:x", "top:K"),
        ("share:0", "share:F"),
        ("share:1.5", "share:F"),
        ("z", "'z'"),
        (",", "no layer"),
    ],
)
def test_bad_selections_name_the_spec_and_the_choices(spec, says):
    with pytest.raises(InputError) as e:
        select_layers(RANKED, spec)
    assert spec in str(e.value) and says in str(e.value)


def _store(root: Path, scale: dict[str, float]) -> CurveStore:
    """A weight curve set of layers with identical curve shapes scaled by ``scale``."""
    bits = list(range(5))
    layers = [
        {"name": n, "type": "Linear", "shape": [4, 8], "groups": 2, "numel": 32} for n in scale
    ]
    store = CurveStore.open(
        root,
        {
            "kind": "weight",
            "group_size": 2,
            "bits": bits,
            "layers": layers,
            "estimator": "hessian",
            "model": "m",
        },
    )
    base = 4.0 ** -np.arange(5.0)  # (B,)
    for name, s in scale.items():
        dist = np.broadcast_to(s * base, (2, 1, 5)).copy()  # (G, D, B)
        store.write_layer(
            name,
            LayerCurves(dist, np.zeros_like(dist), np.zeros_like(dist), np.array([16, 16]), {}),
        )
    return store


def test_layers_rank_by_their_share_of_the_allocated_distortion(tmp_path):
    store = _store(tmp_path / "s", {"small": 1.0, "big": 50.0, "mid": 5.0})
    ranked = rank_layers(store, [2.0, 3.0])
    assert [n for n, _ in ranked] == ["big", "mid", "small"]
    assert sum(s for _, s in ranked) == pytest.approx(1.0)
    with pytest.raises(InputError, match="--targets"):
        rank_layers(store, [])


ARGV = [
    "--archname",
    "digits_cnn",
    "--testsize",
    "24",
    "--nchannelbatch",
    "8",
    "--maxrates",
    "4",
    "--maxdeadzones",
    "2",
    "--quiet",
]


@pytest.fixture(scope="module")
def hessian_set(tmp_path_factory) -> Path:
    from rdoq.cli_curves import curves_main

    out = tmp_path_factory.mktemp("hessian")
    return Path(
        curves_main(
            "weight", None, [*ARGV, "--outdir", str(out), "--folds", "3"], estimator="hessian"
        )["curve_set"]
    )


def test_remeasured_layers_equal_the_measured_scripts_and_the_rest_is_copied(
    tmp_path, hessian_set, capsys
):
    from rdoq.cli_alloc import allocate_main
    from rdoq.cli_curves import curves_main
    from rdoq.remeasure import remeasure_main

    src = CurveStore.load(hessian_set)
    ranked = rank_layers(src, [2.0, 3.0])
    top = ranked[0][0]
    got = remeasure_main(
        [
            "--archname",
            "digits_cnn",
            "--pathrdcurve",
            str(hessian_set),
            "--outdir",
            str(tmp_path / "re"),
            "--layers",
            "top:1",
            "--targets",
            "2",
            "3",
            "--quiet",
        ]
    )
    assert got["layers_chosen"] == [top] and got["layers_written"] == 1
    assert got["missing_layers"] == 0 and top in got["ratio_measured_to_estimate"]
    new = CurveStore.load(got["curve_set"])
    assert new.meta["estimator"] == MIXED_ESTIMATOR
    assert new.meta["estimator_params"]["remeasured"]["layers"] == [top]
    assert new.meta["folds"] == src.meta["folds"]
    # The measured curve script with the same search (the second-order default scale grid,
    # the same folds) gives the re-measured layer bit for bit.
    measured = CurveStore.load(
        curves_main(
            "weight",
            None,
            [*ARGV, "--outdir", str(tmp_path / "m"), "--folds", "3", "--scale-octaves", "0"],
        )["curve_set"]
    )
    mine, ref = new.read_layer(top), measured.read_layer(top)
    for key in ("dist", "step_log2", "deadzone"):
        np.testing.assert_array_equal(getattr(mine, key), getattr(ref, key))
    np.testing.assert_array_equal(mine.extra["dist_folds"], ref.extra["dist_folds"])
    np.testing.assert_array_equal(mine.extra["dist_second_order"], src.read_layer(top).dist)
    for name in src.layer_names():
        if name != top:
            np.testing.assert_array_equal(new.read_layer(name).dist, src.read_layer(name).dist)
    # A second run resumes; another selection into the same directory is refused.
    again = remeasure_main(
        [
            "--archname",
            "digits_cnn",
            "--pathrdcurve",
            str(hessian_set),
            "--outdir",
            str(tmp_path / "re"),
            "--layers",
            "top:1",
            "--targets",
            "2",
            "3",
            "--quiet",
        ]
    )
    assert again["layers_written"] == 0
    with pytest.raises(SystemExit):
        remeasure_main(
            [
                "--archname",
                "digits_cnn",
                "--pathrdcurve",
                str(hessian_set),
                "--outdir",
                str(tmp_path / "re"),
                "--layers",
                "top:2",
                "--targets",
                "2",
                "3",
                "--quiet",
            ]
        )
    assert f"already holds a re-check of {[top]}" in capsys.readouterr().err
    # The allocation scripts read the new set like any other.
    out = allocate_main(
        "dp",
        argv=[
            "--archname",
            "digits_cnn",
            "--pathrdcurve",
            got["curve_set"],
            "--weights-only",
            "--testsize",
            "32",
            "--no-plots",
            "--quiet",
            "--target_rates",
            "2",
            "--outdir",
            str(tmp_path / "alloc"),
        ],
    )
    assert len(out["rows"]) == 1
    alloc = json.loads((tmp_path / "alloc" / "dp" / "allocation_2.json").read_text())
    assert alloc["curve_sets"]["weight"]["path"] == got["curve_set"]


def test_remeasure_refuses_measured_sets_and_other_calibration(tmp_path, hessian_set, capsys):
    from rdoq.cli_curves import curves_main
    from rdoq.remeasure import remeasure_main

    measured = curves_main("weight", None, [*ARGV, "--outdir", str(tmp_path / "m")])
    with pytest.raises(SystemExit):
        remeasure_main(
            [
                "--archname",
                "digits_cnn",
                "--pathrdcurve",
                measured["curve_set"],
                "--outdir",
                str(tmp_path / "x"),
                "--quiet",
            ]
        )
    assert "applies to second-order (hessian) curve sets" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        remeasure_main(
            [
                "--archname",
                "digits_cnn",
                "--pathrdcurve",
                str(hessian_set),
                "--outdir",
                str(tmp_path / "y"),
                "--testsize",
                "30",
                "--quiet",
            ]
        )
    assert "--testsize 30 differs from the curve set's 24" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        remeasure_main(
            [
                "--archname",
                "digits_vit",
                "--pathrdcurve",
                str(hessian_set),
                "--outdir",
                str(tmp_path / "z"),
                "--quiet",
            ]
        )
    assert "model=" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_list_gives_the_ranking_and_measures_nothing(tmp_path, hessian_set):
    from rdoq.remeasure import remeasure_main

    got = remeasure_main(
        [
            "--archname",
            "digits_cnn",
            "--pathrdcurve",
            str(hessian_set),
            "--outdir",
            str(tmp_path / "l"),
            "--list",
            "--layers",
            "share:0.5",
        ]
    )
    assert [n for n, _ in got["ranking"]][: len(got["chosen"])] == got["chosen"]
    assert "share of the estimated distortion" in got["table"]
    assert all(f"  {n}" in got["table"] for n, _ in got["ranking"])
    assert not (tmp_path / "l").exists()


def test_activation_curves_are_remeasured_like_the_measured_script(tmp_path):
    from rdoq.cli_curves import curves_main
    from rdoq.remeasure import default_targets, remeasure_main

    argv = [
        "--archname",
        "digits_cnn",
        "--testsize",
        "16",
        "--nchannelbatch",
        "8",
        "--maxrates",
        "4",
        "--quiet",
        "--folds",
        "2",
        "--steps",
        "channel",
    ]
    src = curves_main("act", "out", [*argv, "--outdir", str(tmp_path / "h")], estimator="hessian")[
        "curve_set"
    ]
    assert default_targets(CurveStore.load(src).meta) == [3.0]
    got = remeasure_main(
        [
            "--archname",
            "digits_cnn",
            "--pathrdcurve",
            src,
            "--outdir",
            str(tmp_path / "re"),
            "--layers",
            "top:1",
            "--quiet",
        ]
    )
    top = got["layers_chosen"][0]
    ref = CurveStore.load(
        curves_main("act", "out", [*argv, "--outdir", str(tmp_path / "m"), "--scale-octaves", "0"])[
            "curve_set"
        ]
    ).read_layer(top)
    mine = CurveStore.load(got["curve_set"]).read_layer(top)
    for key in ("dist", "step_log2"):
        np.testing.assert_array_equal(getattr(mine, key), getattr(ref, key))
    np.testing.assert_array_equal(mine.extra["signed"], ref.extra["signed"])
    np.testing.assert_array_equal(mine.extra["channel_step_log2"], ref.extra["channel_step_log2"])


def test_no_folds_drops_them_from_every_layer(tmp_path, hessian_set):
    from rdoq.remeasure import remeasure_main

    got = remeasure_main(
        [
            "--archname",
            "digits_cnn",
            "--pathrdcurve",
            str(hessian_set),
            "--outdir",
            str(tmp_path),
            "--layers",
            "top:1",
            "--targets",
            "2",
            "--no-folds",
            "--quiet",
        ]
    )
    store = CurveStore.load(got["curve_set"])
    assert store.meta["folds"] is None
    assert all("dist_folds" not in store.read_layer(n).extra for n in store.layer_names())
