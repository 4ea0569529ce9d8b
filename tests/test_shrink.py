"""Per-fold second-order curves and the cross-validated shrinkage of group curves (--shrink)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rdoq.actstats import ActGroupStats
from rdoq.allocation import build_table, restrict
from rdoq.curves import CurveJob, assign_folds, build_meta, plan_layers
from rdoq.groups import WeightGroups, group_bounds
from rdoq.hessian import GradientSweep, HessianSettings
from rdoq.hessian_backends import HessianActBackend, HessianWeightBackend
from rdoq.search import Candidate
from rdoq.shrink import (
    ShrunkCurves,
    choose_alpha,
    fold_sizes,
    held_out_items,
    pick_alpha,
    shrink_dist,
    train_dist,
)
from rdoq.store import CurveStore, LayerCurves


@pytest.fixture(autouse=True)
def _double():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).eval()


CANDS = [
    Candidate(g, b, s, dz)
    for g in (2, 0, 1)
    for b in (0, 2, 3)
    for s in (-3.0, -1.5)
    for dz in (0.0, 0.2)
]
CANDS = list({c.key(): c for c in CANDS}.values())


def backend(model, x, kind, settings, folds=None):
    layer = "0" if kind == "weight" else "1"
    sweep = GradientSweep(
        model,
        x,
        [layer],
        kind,
        settings,
        mode="out" if kind == "act" else None,
        batch_size=4,
        folds=folds,
    )
    bounds = group_bounds(7, 3)
    if kind == "weight":
        return HessianWeightBackend(sweep, WeightGroups(layer, bounds))
    stats = ActGroupStats(np.zeros(3), np.array([False, True, False]), 7, np.zeros(3), np.ones(3))
    return HessianActBackend(sweep, layer, bounds, stats)


@pytest.mark.parametrize("kind", ["weight", "act"])
def test_a_folds_estimate_is_the_estimate_of_its_samples_alone(kind):
    # With the deterministic norm probe (and its first-order term) a fold's δ̂ must equal a
    # sweep over that fold's samples only; their size-weighted mean is the all-sample δ̂.
    model = mlp()
    x = torch.randn(11, 5)
    folds = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 2])
    settings = HessianSettings(probe="norm", first_order=True)
    cands = [c for c in CANDS if kind == "weight" or c.deadzone == 0]
    per_fold = backend(model, x, kind, settings, folds).folds(cands)  # (K, F)
    assert per_fold.shape == (len(cands), 3)
    for f in range(3):
        alone, _ = backend(model, x[torch.as_tensor(folds == f)], kind, settings)(cands)
        np.testing.assert_allclose(per_fold[:, f], alone, rtol=1e-10, atol=1e-300)
    whole, _ = backend(model, x, kind, settings)(cands)
    sizes = np.bincount(folds)
    np.testing.assert_allclose(per_fold @ (sizes / sizes.sum()), whole, rtol=1e-10)


def test_random_probe_folds_average_to_the_all_sample_estimate():
    model = mlp()
    x = torch.randn(10, 5)
    folds = np.arange(10) % 4
    be = backend(model, x, "weight", HessianSettings(nprobes=3), folds)
    sizes = np.bincount(folds)
    np.testing.assert_allclose(be.folds(CANDS) @ (sizes / sizes.sum()), be(CANDS)[0], rtol=1e-10)


def test_fold_assignment_keeps_a_units_samples_together():
    units = ["a", "b", "a", "c", "b", "d", "e", "a"]
    fold_of, by = assign_folds(units, 3)
    assert by == "unit"
    for u in set(units):
        assert len({fold_of[i] for i, v in enumerate(units) if v == u}) == 1
    assert sorted(set(fold_of.tolist())) == [0, 1, 2]
    fold_of, by = assign_folds(range(6), 4)
    assert by == "sample" and fold_of.tolist() == [0, 1, 2, 3, 0, 1]
    assert assign_folds(["a", "b", "a"], 5)[0].tolist() == [0, 1, 0]  # fewer units than folds
    with pytest.raises(ValueError, match="at least 2 distinct calibration sources"):
        assign_folds(["a", "a"], 3)


@pytest.mark.parametrize("kind", ["weight", "act"])
def test_measured_fold_distortions_are_those_of_the_folds_samples(kind):
    from rdoq.backends import ActBackend, WeightBackend
    from rdoq.engine import MeasuredEngine

    model = mlp()
    x = torch.randn(11, 5)
    folds = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 2])
    cands = [c for c in CANDS if kind == "weight" or c.deadzone == 0]
    bounds = group_bounds(7, 3)
    stats = ActGroupStats(np.zeros(3), np.array([False, True, False]), 7, np.zeros(3), np.ones(3))

    def backend(xs, fold_of=None):
        engine = MeasuredEngine(model, xs, max_rows=4, folds=fold_of)
        if kind == "weight":
            return WeightBackend(engine, WeightGroups("0", bounds), max_batch=4)
        return ActBackend(engine, "1", "out", bounds, stats, max_batch=4)

    def dist(be):  # a backend takes at most max_batch candidates per call
        return np.concatenate([be(cands[i : i + 4])[0] for i in range(0, len(cands), 4)])

    per_fold = backend(x, folds).folds(cands)  # (K, F)
    for f in range(3):
        alone = dist(backend(x[torch.as_tensor(folds == f)]))
        np.testing.assert_allclose(per_fold[:, f], alone, rtol=1e-9, atol=1e-300)
    whole = dist(backend(x))
    sizes = np.bincount(folds)
    np.testing.assert_allclose(per_fold @ (sizes / sizes.sum()), whole, rtol=1e-9)


def test_folds_are_validated():
    with pytest.raises(ValueError, match="--folds must be 0"):
        CurveJob(
            kind="weight",
            group_size=2,
            nr=3,
            ndz=1,
            max_steps=4,
            step_grid=1,
            folds=1,
            estimator="hessian",
            hessian=HessianSettings(),
        )
    with pytest.raises(ValueError, match="hold no calibration sample"):
        GradientSweep(
            mlp(), torch.randn(4, 5), ["0"], "weight", HessianSettings(), folds=[0, 0, 2, 2]
        )


def test_shrinkage_keeps_the_layer_total_and_pools_at_zero():
    rng = np.random.default_rng(0)
    dist = rng.uniform(0.1, 2.0, (5, 2, 4))  # (G, D, B)
    dist[3, 1, 2] = np.inf  # a point one group lacks stays missing and out of the pool
    numel = np.array([8, 8, 8, 8, 3])
    assert shrink_dist(dist, numel, 1.0) is dist
    for alpha in (0.0, 0.3):
        out = shrink_dist(dist, numel, alpha)
        ok = np.isfinite(dist)
        np.testing.assert_allclose(np.where(ok, out, 0).sum(0), np.where(ok, dist, 0).sum(0))
        assert np.isinf(out[3, 1, 2])
    flat = shrink_dist(dist, numel, 0.0) / numel[:, None, None]
    np.testing.assert_allclose(flat[:3], np.broadcast_to(flat[0], flat[:3].shape))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        shrink_dist(dist, numel, 1.5)


def test_training_curves_leave_the_held_out_fold_out():
    folds = np.stack([np.full((2, 1, 3), v) for v in (1.0, 2.0, 4.0)])  # (F, G, D, B)
    got = train_dist(folds, np.array([1, 1, 2]), held_out=1)
    np.testing.assert_allclose(got, np.full((2, 1, 3), (1.0 + 2 * 4.0) / 3))


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.b = nn.Linear(16, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def fold_curve_set(root, true_scale, noise, n_folds=4, seed=0) -> CurveStore:
    """Weight curves whose groups share a layer curve times ``true_scale`` per group, observed
    per fold with multiplicative noise ``noise`` (log-normal σ); dist = the mean of the folds."""
    rng = np.random.default_rng(seed)
    model = TwoLayer()
    nr = 6
    job = CurveJob(
        kind="weight",
        group_size=2,
        nr=nr,
        ndz=1,
        max_steps=4,
        step_grid=1,
        step_mode="group",
        estimator="hessian",
        hessian=HessianSettings(),
        folds=n_folds,
    )
    plans = plan_layers(model, torch.randn(1, 4), job)
    folds = {"count": n_folds, "by": "sample", "of_sample": [i % n_folds for i in range(8)]}
    calib = {"size": 8, "seed": 0, "source": "test", "sha256": "x", "items": list(range(8))}
    info = {"arch": "twolayer", "weights_source": "test", "checkpoint_sha256": None}
    store = CurveStore.open(root, build_meta(job, info, calib, plans, folds=folds))
    for p in plans:
        g = len(p.bounds)
        base = 4.0 ** -np.arange(nr) * p.numel[:, None]  # (G, B)
        scale = true_scale(rng, g)[:, None]  # (G, 1)
        per_fold = (base * scale)[None, :, None, :] * np.exp(
            noise * rng.standard_normal((n_folds, g, 1, nr))
        )  # (F, G, D, B)
        per_fold[:, :, :, 0] = (base * scale)[None, :, None, 0]
        dist = per_fold.mean(0)
        store.write_layer(
            p.name,
            LayerCurves(
                dist,
                np.full(dist.shape, -3.0),
                np.zeros(dist.shape),
                p.numel,
                {"dist_folds": per_fold},
            ),
        )
    return store


def chosen_alpha(store: CurveStore, target: float = 2.5):
    cache: dict = {}

    def make_table(alpha=1.0, held_out=None):
        view = ShrunkCurves(store, cache, alpha, held_out)
        return restrict(build_table(view, None))

    table = make_table()
    held = held_out_items(
        [(ShrunkCurves(store, cache), store.layer_names())],
        store.meta["folds"]["count"],
        table.dist.shape[1],
        False,
    )
    return choose_alpha(make_table, held, fold_sizes(store), target, None, False), held, table


def test_cross_validation_pools_pure_noise_and_keeps_real_differences(tmp_path):
    # Identical groups seen through heavy noise: any spread is noise, pooling wins.
    noisy, _, _ = chosen_alpha(fold_curve_set(tmp_path / "noise", lambda r, g: np.ones(g), 1.5))
    assert noisy.alpha < 1.0
    assert noisy.cv[noisy.alpha] < noisy.cv[1.0]
    mean, se = noisy.change[noisy.alpha]
    assert mean + se < 0.0  # a gain beyond the folds' noise
    # Groups 100x apart, observed exactly: the raw curves are right and must be kept.
    real, _, _ = chosen_alpha(
        fold_curve_set(tmp_path / "real", lambda r, g: 10.0 ** (2 * r.random(g) - 1), 0.0)
    )
    assert real.alpha == 1.0


def test_held_out_items_follow_the_table_order(tmp_path):
    store = fold_curve_set(tmp_path / "s", lambda r, g: r.uniform(0.5, 2, g), 0.3)
    _, held, table = chosen_alpha(store)
    assert held.shape == (4, len(table.kind), 1, table.dist.shape[1])
    sizes = fold_sizes(store)
    mean = np.tensordot(sizes / sizes.sum(), held, axes=1)[:, 0, :]  # (I, K)
    np.testing.assert_allclose(mean, table.dist, rtol=1e-12)


def test_views_refuse_layer_files_without_the_promised_folds(tmp_path):
    store = fold_curve_set(tmp_path / "s", lambda r, g: np.ones(g), 0.1)
    name = store.layer_names()[0]
    c = store.read_layer(name)
    store.write_layer(name, LayerCurves(c.dist, c.step_log2, c.deadzone, c.numel, {}))
    with pytest.raises(ValueError, match="lacks the 4 fold curves"):
        ShrunkCurves(store, {}, 0.5).read_layer(name)


def test_dp_script_chooses_alpha_per_target_and_records_it(tmp_path, capsys):
    from rdoq.cli_alloc import allocate_main

    cdir = tmp_path / "curves"
    curves_argv = [
        "--archname",
        "digits_cnn",
        "--testsize",
        "20",
        "--nchannelbatch",
        "8",
        "--maxrates",
        "5",
        "--maxdeadzones",
        "2",
        "--outdir",
        str(cdir),
        "--quiet",
    ]
    from rdoq.cli_curves import curves_main

    # -bcw curves: what --shrink auto pools.
    summary = curves_main("weight", None, [*curves_argv, "-bcw"], estimator="hessian")
    meta = json.loads((Path(summary["curve_set"]) / "meta.json").read_text())
    assert meta["folds"]["count"] == 5 and meta["bias_corr"]
    base = [
        "--archname",
        "digits_cnn",
        "--pathrdcurve",
        summary["curve_set"],
        "--weights-only",
        "--testsize",
        "64",
        "--no-plots",
        "--quiet",
        "--target_rates",
        "2",
        "3",
        "-bcw",
    ]
    out = allocate_main("dp", argv=[*base, "--outdir", str(tmp_path / "cv")])
    for row in out["rows"]:
        assert 0.0 <= row["shrink_alpha"] <= 1.0
    alloc = json.loads((tmp_path / "cv" / "dp+bcw" / "allocation_2.json").read_text())
    assert set(alloc["shrink_cv"]) == {"1", "0.75", "0.5", "0.25", "0"}
    cv, change = alloc["shrink_cv"], alloc["shrink_cv_change"]
    chosen = f"{alloc['summary']['shrink_alpha']:g}"
    trusted = [a for a in cv if a == "1" or sum(change[a]) < 0]
    assert chosen in trusted and cv[chosen] == min(cv[a] for a in trusted)
    off = allocate_main("dp", argv=[*base, "--outdir", str(tmp_path / "off"), "--shrink", "off"])
    assert all("shrink_alpha" not in r for r in off["rows"])
    fixed = allocate_main("dp", argv=[*base, "--outdir", str(tmp_path / "fx"), "--shrink", "0"])
    assert all(r["shrink_alpha"] == 0.0 for r in fixed["rows"])
    with pytest.raises(SystemExit):
        allocate_main("dp", argv=[*base, "--outdir", str(tmp_path / "bad"), "--shrink", "2"])
    assert "--shrink takes auto, cv, off or a weight in [0, 1]" in capsys.readouterr().err
    # Curves without -bcw: auto leaves them raw, cv pools them.
    plain = curves_main(
        "weight", None, [*curves_argv, "--outdir", str(tmp_path / "plain")], estimator="hessian"
    )
    base[3] = plain["curve_set"]
    base = base[:-1]
    raw = allocate_main("dp", argv=[*base, "--outdir", str(tmp_path / "raw")])
    assert all("shrink_alpha" not in r for r in raw["rows"])
    forced = allocate_main("dp", argv=[*base, "--outdir", str(tmp_path / "f"), "--shrink", "cv"])
    assert all(0.0 <= r["shrink_alpha"] <= 1.0 for r in forced["rows"])


def test_shrink_cv_needs_folds_and_auto_falls_back(tmp_path, capsys):
    from rdoq.cli_alloc import allocate_main
    from rdoq.cli_curves import curves_main

    cdir = tmp_path / "curves"
    summary = curves_main(
        "weight",
        None,
        [
            "--archname",
            "digits_cnn",
            "--testsize",
            "20",
            "--nchannelbatch",
            "8",
            "--maxrates",
            "4",
            "--maxdeadzones",
            "1",
            "--outdir",
            str(cdir),
            "--quiet",
            "--folds",
            "0",
        ],
        estimator="hessian",
    )
    base = [
        "--archname",
        "digits_cnn",
        "--pathrdcurve",
        summary["curve_set"],
        "--weights-only",
        "--testsize",
        "32",
        "--no-plots",
        "--quiet",
        "--target_rates",
        "2",
    ]
    auto = allocate_main("dp", argv=[*base, "--outdir", str(tmp_path / "auto")])
    assert "shrink_alpha" not in auto["rows"][0]
    with pytest.raises(SystemExit):
        allocate_main("dp", argv=[*base, "--outdir", str(tmp_path / "cv"), "--shrink", "cv"])
    assert "needs curves that store calibration folds" in capsys.readouterr().err


def test_a_gain_inside_the_fold_noise_keeps_the_raw_curves():
    # α = 0.5 is lower on average but wins one fold of three by a lot and loses the other two:
    # within one standard error of no change, so the raw curves are kept.
    w = np.full(3, 1 / 3)
    noisy = pick_alpha({1.0: np.array([1.0, 1.0, 1.0]), 0.5: np.array([0.4, 1.05, 1.05])}, w)
    assert noisy.cv[0.5] < noisy.cv[1.0]
    mean, se = noisy.change[0.5]
    assert mean < 0.0 < mean + se
    assert noisy.alpha == 1.0
    # The same mean gain, consistent over the folds: taken.
    steady = pick_alpha({1.0: np.array([1.0, 1.0, 1.0]), 0.5: np.array([0.83, 0.83, 0.84])}, w)
    assert steady.alpha == 0.5


def test_weight_and_activation_curves_are_pooled_together(tmp_path):
    from rdoq.cli_alloc import allocate_main
    from rdoq.cli_curves import curves_main

    common = [
        "--archname",
        "digits_cnn",
        "--testsize",
        "20",
        "--nchannelbatch",
        "8",
        "--maxrates",
        "5",
        "--outdir",
        str(tmp_path / "c"),
        "--quiet",
    ]
    w = curves_main("weight", None, [*common, "--maxdeadzones", "1"], estimator="hessian")
    a = curves_main("act", "out", common, estimator="hessian")
    ameta = json.loads((tmp_path / "c" / a["curve_set"].split("/")[-1] / "meta.json").read_text())
    assert ameta["folds"]["count"] == 5
    assert "dist_folds" in np.load(
        next((tmp_path / "c" / a["curve_set"].split("/")[-1] / "layers").iterdir())
    )
    out = allocate_main(
        "dp",
        argv=[
            "--archname",
            "digits_cnn",
            "--pathrdcurve",
            w["curve_set"],
            "--act_curve_root_dir",
            str(tmp_path / "c"),
            "--testsize",
            "32",
            "--no-plots",
            "--quiet",
            "--outdir",
            str(tmp_path / "r"),
            "--target_rates",
            "3",
            "--act-target-rates",
            "4",
            "--shrink",
            "cv",
        ],
    )
    assert 0.0 <= out["rows"][0]["shrink_alpha"] <= 1.0
    alloc = json.loads((tmp_path / "r" / "dp" / "allocation_3_a4.json").read_text())
    assert set(alloc["shrink_cv"]) == {"1", "0.75", "0.5", "0.25", "0"}


def test_a_curve_set_made_without_folds_names_the_flag_that_resumes_it(tmp_path, capsys):
    from rdoq.cli_curves import curves_main

    argv = [
        "--archname",
        "digits_cnn",
        "--testsize",
        "16",
        "--nchannelbatch",
        "8",
        "--maxrates",
        "3",
        "--maxdeadzones",
        "1",
        "--outdir",
        str(tmp_path),
        "--quiet",
    ]
    curves_main("weight", None, [*argv, "--folds", "0"], estimator="hessian")
    with pytest.raises(SystemExit):
        curves_main("weight", None, argv, estimator="hessian")
    assert "the same settings (--folds 0) to resume" in capsys.readouterr().err


def test_measured_curve_script_stores_folds_when_asked(tmp_path):
    from rdoq.cli_curves import curves_main

    argv = [
        "--archname",
        "digits_cnn",
        "--testsize",
        "12",
        "--nchannelbatch",
        "8",
        "--maxrates",
        "3",
        "--maxdeadzones",
        "1",
        "--outdir",
        str(tmp_path),
        "--quiet",
    ]
    plain = curves_main("weight", None, [*argv, "--outdir", str(tmp_path / "a")])
    assert CurveStore.load(plain["curve_set"]).meta["folds"] is None  # off by default here
    got = curves_main("weight", None, [*argv, "--outdir", str(tmp_path / "b"), "--folds", "3"])
    store = CurveStore.load(got["curve_set"])
    sizes = fold_sizes(store)
    assert sizes.tolist() == [4, 4, 4]
    for name in store.layer_names():
        c = store.read_layer(name)
        mean = np.tensordot(sizes / sizes.sum(), c.extra["dist_folds"], axes=1)
        np.testing.assert_allclose(mean, c.dist, rtol=1e-9)
