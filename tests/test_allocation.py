"""Allocation library: item table, constraints, targets, apply, corrections, evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rdoq.allocation import (
    ACT,
    WEIGHT,
    build_table,
    choice_columns,
    restrict,
    solve_recorded,
    target_range,
)
from rdoq.allocfile import load_allocation, make_allocation, save_allocation
from rdoq.apply import (
    act_quantizer,
    apply_allocation,
    check_model,
    estimate_corrections,
    load_quantized,
    quantized_weight,
    save_quantized,
)
from rdoq.curves import CurveJob, build_meta, plan_layers
from rdoq.evaluate import TensorBatches, bit_report, evaluate, reference_outputs, topk_scores
from rdoq.groups import group_bounds
from rdoq.quantizers import quantize_uniform, quantize_weight, signed_bounds, unsigned_bounds
from rdoq.solvers import solve_ilp
from rdoq.store import CurveStore, LayerCurves, open_curve_set


class TinyNet(nn.Module):
    """Conv → ReLU → conv → pool → linear → ReLU → linear: convs, linears, partial groups."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=False)
        self.f1 = nn.Linear(5, 7)
        self.f2 = nn.Linear(7, 4)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.f2(torch.relu(self.f1(x.mean((2, 3)))))


INFO = {"arch": "tinynet", "weights_source": "test", "checkpoint_sha256": None}
CALIB = {"size": 8, "seed": 0, "source": "test", "sha256": "x", "items": list(range(8))}


def fake_curve_set(
    root, model, kind, nr=5, ndz=2, group_size=2, act_mode=None, seed=0, model_name="tinynet"
):
    """A complete curve set with random decreasing curves for ``model``."""
    rng = np.random.default_rng(seed)
    job = CurveJob(
        kind=kind,
        act_mode=act_mode,
        group_size=group_size,
        nr=nr,
        ndz=ndz if kind == "weight" else 1,
        max_steps=4,
        step_grid=1,
        step_mode="group",
    )
    x1 = torch.randn(1, 3, 8, 8)
    plans = plan_layers(model, x1, job)
    store = CurveStore.open(root, build_meta(job, {**INFO, "arch": model_name}, CALIB, plans))
    d = job.ndz
    for p in plans:
        g = len(p.bounds)
        scale = rng.uniform(0.5, 2.0, size=(g, d, 1))
        dist = scale * 4.0 ** -np.arange(nr)[None, None, :] * rng.uniform(0.8, 1.2, (g, d, nr))
        dist[:, :, 0] = scale[:, :, 0]
        step = rng.integers(-6, -1, size=(g, d, nr)).astype(float)
        dz = np.zeros((g, d, nr))
        if kind == "weight":
            dz[:, 1:, :] = 0.01
        extra = {"signed": rng.random(g) < 0.5} if kind == "act" else {}
        store.write_layer(p.name, LayerCurves(dist, step, dz, p.numel, extra))
    return store


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def stores(tmp_path, net):
    w = fake_curve_set(tmp_path / "w", net, "weight")
    a = fake_curve_set(tmp_path / "a", net, "act", act_mode="out", group_size=3)
    return w, a


def test_table_takes_best_dead_zone_and_counts_elements(stores, net):
    w, a = stores
    t = build_table(w, a)
    first = w.read_layer("c1")
    assert t.dist.shape == (len(t.kind), 5)
    np.testing.assert_array_equal(t.dist[t.layers[0].rows], first.dist.min(axis=1))
    best = first.dist.argmin(axis=1)  # (G, B)
    np.testing.assert_array_equal(
        t.step_log2[t.layers[0].rows], np.take_along_axis(first.step_log2, best[:, None], 1)[:, 0]
    )
    # Rates: bits × elements; weights first, then activation groups per sample.
    np.testing.assert_array_equal(t.rate[:, 3], 3 * t.numel)
    assert t.part_numel(WEIGHT) == sum(m.weight.numel() for m in (net.c1, net.c2, net.f1, net.f2))
    assert (t.kind[: t.layers[4].rows.start] == WEIGHT).all() and (
        t.kind[t.layers[4].rows] == ACT
    ).all()
    # f1 output: 7 channels in groups of 3 → 3, 3, 1.
    f1 = next(lay for lay in t.layers if lay.kind == ACT and lay.name == "f1")
    np.testing.assert_array_equal(t.numel[f1.rows], [3, 3, 1])


def test_closedeadzone_keeps_only_the_uniform_quantizer(stores):
    w, _ = stores
    t = build_table(w, None, uniform_only=True)
    np.testing.assert_array_equal(t.dist[t.layers[0].rows], w.read_layer("c1").dist[:, 0])
    assert (t.deadzone == 0).all()


def test_fp_act_layers_are_listed_and_have_no_items(stores):
    w, a = stores
    t = build_table(w, a, fp_act_layers=["c1", "f2"])
    assert t.fp_acts == ["c1", "f2"]
    assert [lay.name for lay in t.layers if lay.kind == ACT] == ["c2", "f1"]
    with pytest.raises(ValueError, match="nope"):
        build_table(w, a, fp_act_layers=["nope"])


def test_missing_layers_and_other_models_are_refused(tmp_path, net, stores):
    w, _ = stores
    (w.root / "layers" / "f1.npz").unlink()
    with pytest.raises(ValueError, match=r"misses layers \['f1'\]"):
        open_curve_set(w.root, "weight")
    other = fake_curve_set(tmp_path / "o", net, "act", act_mode="out", model_name="othernet")
    w2 = fake_curve_set(tmp_path / "w2", net, "weight")
    with pytest.raises(ValueError, match="differ in model"):
        build_table(w2, other)
    with pytest.raises(ValueError, match="activation curves of layer outputs"):
        open_curve_set(other.root, "act", "in")


def test_nan_curves_are_refused(tmp_path, net):
    w = fake_curve_set(tmp_path / "w", net, "weight")
    c = w.read_layer("c2")
    c.dist[0, :, 2] = np.inf
    c.dist[0, :, 0] = np.inf
    w.write_layer("c2", c)
    with pytest.raises(ValueError, match="non-finite"):
        build_table(w, None)


def test_smoothing_never_pays_for_useless_bits():
    # One item whose curve rises at 2 bits: smoothing makes 2 bits cost 1 bit's distortion and the
    # chosen column falls back to 1 bit.
    from rdoq.allocation import ItemTable, LayerEntry

    dist = np.array([[1.0, 0.3, 0.5, 0.1]])
    t = ItemTable(
        dist=dist,
        rate=np.arange(4.0)[None] * 10,
        numel=np.array([10.0]),
        kind=np.array([WEIGHT]),
        layer=np.array([0]),
        step_log2=np.zeros((1, 4)),
        deadzone=np.zeros((1, 4)),
        source=np.arange(4)[None].copy(),
        dz_index=np.zeros((1, 4), dtype=np.int64),
        bits=np.arange(4),
        layers=[LayerEntry(WEIGHT, "x", "Linear", (1, 10), 1, 1, slice(0, 1))],
        model="m",
        curve_sets={},
        act_mode=None,
    )
    s = restrict(t, smooth=True)
    np.testing.assert_array_equal(s.dist[0], [1.0, 0.3, 0.3, 0.1])
    np.testing.assert_array_equal(choice_columns(s, np.array([2])), [1])
    # Smoothing respects the allowed set: with only {0, 2, 3}, 2 bits keeps its own point.
    s = restrict(t, allowed_bits=[0, 2, 3], smooth=True)
    assert s.dist[0, 1] == np.inf and s.dist[0, 2] == 0.5


@pytest.mark.parametrize("solver", ["dp", "lg"])
def test_joint_and_separate_budgets_hold(stores, solver):
    w, a = stores
    t = build_table(w, a)
    choices = solve_recorded(t, [2.0, 3.5], solver).choices
    idx = np.arange(len(t.kind))
    for c, target in zip(choices, [2.0, 3.5], strict=True):
        assert t.rate[idx, c].sum() <= target * t.numel.sum() + 1e-9
    sep = solve_recorded(t, [2.0, 3.0], solver, act_targets=[4.0]).choices
    for c, tw in zip(sep, [2.0, 3.0], strict=True):
        w_rows, a_rows = t.kind == WEIGHT, t.kind == ACT
        assert t.rate[idx, c][w_rows].sum() <= tw * t.part_numel(WEIGHT) + 1e-9
        assert t.rate[idx, c][a_rows].sum() <= 4.0 * t.part_numel(ACT) + 1e-9
    if solver == "dp":
        # Exact: the DP reaches the ILP optimum of the joint problem.
        best = solve_ilp(t.dist, t.rate, 3.5 * t.numel.sum())
        assert t.dist[idx, choices[1]].sum() <= t.dist[idx, best].sum() * (1 + 1e-9) + 1e-12


def test_constraints_and_layerwise(stores):
    w, a = stores
    t = restrict(build_table(w, a), allowed_bits=[0, 2, 4], min_bits=2)
    lo, hi = target_range(t, None)
    assert lo == pytest.approx(2.0) and hi == pytest.approx(4.0)
    (c,) = solve_recorded(t, [3.0], "dp", layerwise=True).choices
    assert set(t.bits[c].tolist()) <= {2, 4}
    for layer in t.layers:
        assert len(set(c[layer.rows].tolist())) == 1
    with pytest.raises(ValueError, match=r"--target_rates 1.5 is outside .*\[2, 4\]"):
        solve_recorded(t, [1.5], "dp")
    with pytest.raises(ValueError, match="allowed bit widths \\[7\\] are not in the curves"):
        restrict(build_table(w, a), allowed_bits=[2, 7])


def alloc_for(stores, net, target=3.0, solver="dp"):
    w, a = stores
    t = build_table(w, a)
    (c,) = solve_recorded(t, [target], solver).choices
    return t, make_allocation(t, c, target_bits=target, solver=solver)


def test_apply_quantizes_each_group_as_allocated(stores, net):
    _, alloc = alloc_for(stores, net)
    q = apply_allocation(net, alloc)
    assert q is not net
    for name, e in alloc["weights"].items():
        wq = dict(q.named_modules())[name].weight
        wf = dict(net.named_modules())[name].weight
        for g, (c0, c1) in enumerate(group_bounds(e["channels"], e["group_size"])):
            ref = quantize_weight(
                wf[c0:c1].double(), e["bits"][g], e["step_log2"][g], e["deadzone"][g]
            ).float()
            assert torch.equal(wq[c0:c1], ref), (name, g)


def test_vectorised_act_quantizer_equals_a_loop_over_groups(stores, net):
    _, alloc = alloc_for(stores, net)
    e = alloc["acts"]["c1"]
    q = act_quantizer(net.c1, e)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 3
    out = q(x)
    for g, (c0, c1) in enumerate(group_bounds(e["channels"], e["group_size"])):
        b = e["bits"][g]
        lo, hi = signed_bounds(b) if e["signed"][g] else unsigned_bounds(b)
        ref = quantize_uniform(x[:, c0:c1], 2.0 ** e["step_log2"][g], lo, hi)
        assert torch.equal(out[:, c0:c1], ref)


def test_allocation_round_trip_gives_the_identical_model(tmp_path, stores, net):
    _, alloc = alloc_for(stores, net)
    x = torch.randn(5, 3, 8, 8)
    calib = torch.randn(8, 3, 8, 8)
    alloc["corrections"] = estimate_corrections(net, alloc, calib, bcw=True, bca=True)
    save_allocation(tmp_path / "allocation_3.json", alloc)
    again = load_allocation(tmp_path / "allocation_3.json")
    q1, q2 = apply_allocation(net, alloc), apply_allocation(net, again)
    with torch.no_grad():
        assert torch.equal(q1(x), q2(x))
    for (n1, p1), (n2, p2) in zip(q1.state_dict().items(), q2.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    # The saved model (weights + activation quantizers) reloads into a fresh network.
    save_quantized(tmp_path / "model.pth", q1, alloc)
    fresh = load_quantized(tmp_path / "model.pth", TinyNet())
    with torch.no_grad():
        assert torch.equal(fresh(x), q1(x))
        assert not torch.equal(net(x), q1(x))


def test_allocation_for_another_model_is_refused(tmp_path, stores, net):
    _, alloc = alloc_for(stores, net)

    class Other(TinyNet):
        def __init__(self):
            super().__init__()
            self.f1 = nn.Linear(5, 9)
            self.f2 = nn.Linear(9, 4)

    with pytest.raises(ValueError, match=r"layer f1 has weight shape \[9, 5\]"):
        check_model(Other(), alloc)
    alloc["weights"]["ghost"] = alloc["weights"]["f1"]
    with pytest.raises(ValueError, match="'ghost'"):
        apply_allocation(net, alloc)
    path = tmp_path / "bad.json"
    path.write_text(
        '{"schema": "rdoq.allocation/2", "model": "m", "weights": {"f1": '
        '{"channels": 7, "group_size": 2, "bits": [1], "step_log2": [0], '
        '"deadzone": [0]}}, "acts": {}}'
    )
    with pytest.raises(ValueError, match="wrong length"):
        load_allocation(path)


def test_bias_corrections_cancel_the_mean_errors_on_the_calibration_set(stores, net):
    _, alloc = alloc_for(stores, net, target=2.0)
    calib = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    net64 = net.double()
    corr = estimate_corrections(net64, alloc, calib, bcw=True, bca=True, batch_size=5)
    assert set(corr) == {"bcw", "bca"} and len(corr["bcw"]["c2"]) == 5
    # -bcw: the corrected layer's mean output on the calibration inputs equals the FP one.
    alloc_w = {**alloc, "acts": {}, "corrections": {"bcw": corr["bcw"]}}
    q = apply_allocation(net64, alloc_w)
    h = torch.relu(net64.c1(calib))
    mean_fp = net64.c2(h).mean((0, 2, 3))
    mean_q = q.c2(h).mean((0, 2, 3))
    torch.testing.assert_close(mean_q, mean_fp, atol=1e-10, rtol=0)
    assert q.c2.bias is not None and net64.c2.bias is None
    # -bca: Q(a) + offset has the FP mean per channel on the calibration activations.
    e = alloc["acts"]["f1"]
    a = net64.f1(torch.relu(net64.c2(torch.relu(net64.c1(calib)))).mean((2, 3)))
    qa = act_quantizer(net64.f1, e, corr["bca"]["f1"])
    torch.testing.assert_close(qa(a).mean(0), a.mean(0), atol=1e-10, rtol=0)


def test_evaluate_and_bit_report(stores, net):
    _, alloc = alloc_for(stores, net)
    x = torch.randn(10, 3, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    data = TensorBatches(x, y, 4)
    ref, labels = reference_outputs(net, data, torch.device("cpu"))
    assert torch.equal(labels, y) and topk_scores(ref, labels)["top1"] == 100.0
    fp = evaluate(net, data, ref, torch.device("cpu"))
    assert fp["top1"] == 100.0 and fp["top5"] == 100.0 and fp["out_mse"] == 0.0
    m = evaluate(apply_allocation(net, alloc), data, ref, torch.device("cpu"))
    assert m["out_mse"] > 0 and m["n_eval"] == 10
    unlabelled = evaluate(net, TensorBatches(x, None, 4), ref, torch.device("cpu"))
    assert unlabelled["top1"] is None
    r = bit_report(net, alloc, x[:1])
    w_numel = sum(m.weight.numel() for m in (net.c1, net.c2, net.f1, net.f2))
    bits = sum(
        b * n
        for e in alloc["weights"].values()
        for b, n in zip(
            e["bits"], [quantized_weight_numel(e, g) for g in range(len(e["bits"]))], strict=True
        )
    )
    assert r["w_numel"] == w_numel and r["w_bits"] == pytest.approx(bits / w_numel)
    assert r["w_bits"] == pytest.approx(alloc["summary"]["w_bits"])
    assert r["a_bits"] == pytest.approx(alloc["summary"]["a_bits"])
    biases = sum(m.bias.numel() for m in (net.c1, net.f1, net.f2))
    assert r["size_mb"] == pytest.approx((bits + 32 * biases) / 8e6)
    assert r["fp_weight_layers"] == [] and r["bops_ratio"] < 1


def quantized_weight_numel(entry, g):
    c0, c1 = group_bounds(entry["channels"], entry["group_size"])[g]
    per = int(np.prod(entry["shape"][1:]))
    return (c1 - c0) * per


def test_quantized_weight_matches_the_curve_quantizer_with_dead_zone():
    w = torch.randn(4, 10)
    e = {
        "channels": 4,
        "group_size": 3,
        "bits": [3, 0],
        "step_log2": [-3.0, 0.0],
        "deadzone": [0.2, 0.0],
    }
    q = quantized_weight(w, e)
    assert torch.equal(q[3:], torch.zeros(1, 10))
    assert torch.equal(q[:3], quantize_weight(w[:3].double(), 3, -3.0, 0.2).float())


def test_uniform_baseline_steps_are_mse_optimal():
    from rdoq.baselines import mse_steps

    torch.manual_seed(1)
    x = torch.cat([torch.randn(1, 3000), torch.rand(1, 3000) * 5])  # (C, n)
    signed = torch.tensor([True, False])
    for bits in (2, 4, 6):
        steps = mse_steps(x, bits, signed)
        for c in range(2):
            lo, hi = signed_bounds(bits) if signed[c] else unsigned_bounds(bits)

            def mse(step, c=c, lo=lo, hi=hi):
                return float((quantize_uniform(x[c].double(), step, lo, hi) - x[c]).pow(2).mean())

            dense = min(mse(s) for s in np.geomspace(1e-4, 10, 3000))
            assert mse(2.0 ** float(steps[c])) <= dense * 1.01, (bits, c)


def test_uniform_allocation_is_an_ordinary_allocation(net):
    from rdoq.baselines import uniform_allocation

    calib = torch.randn(8, 3, 8, 8)
    alloc = uniform_allocation(net, calib, 3, 4, ["c2", "f1"], "out")
    alloc["model"] = "tinynet"
    assert set(alloc["weights"]) == {"c1", "c2", "f1", "f2"} and set(alloc["acts"]) == {"c2", "f1"}
    for e in alloc["weights"].values():
        assert e["group_size"] == 1 and set(e["bits"]) == {3}
    assert set(alloc["acts"]["f1"]["bits"]) == {4} and len(alloc["acts"]["f1"]["signed"]) == 7
    r = bit_report(net, alloc, calib[:1])
    assert r["w_bits"] == 3 and r["a_bits"] == 4
    q = apply_allocation(net, alloc)
    with torch.no_grad():
        assert not torch.equal(q(calib), net(calib))


def test_layerwise_and_smoothing_are_refused_together(stores):
    w, a = stores
    t = build_table(w, a)
    c = w.read_layer("c1")
    t.dist[0, 3] = t.dist[0, 2] * 2  # a rising point, so smoothing moves that group
    s = restrict(t, smooth=True)
    with pytest.raises(ValueError, match="--smooth-dists cannot be combined with --layerwise"):
        solve_recorded(s, [3.0], "dp", layerwise=True)
    assert c.dist.shape[0] == 3


class Blur(nn.Conv2d):
    """A Conv2d subclass whose name does not say so, with weight standardisation in forward
    (like timm's StdConv2d)."""

    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class BlurNet(TinyNet):
    def __init__(self):
        super().__init__()
        self.c1 = Blur(3, 6, 3, padding=1)


def test_conv_subclasses_use_the_model_channel_axis_and_their_own_forward(tmp_path):
    torch.manual_seed(0)
    net = BlurNet().eval()
    w = fake_curve_set(tmp_path / "w", net, "weight")
    a = fake_curve_set(tmp_path / "a", net, "act", act_mode="out", group_size=4)
    net = net.double()
    from rdoq.groups import channel_dim

    dims = {n: channel_dim(m) for n, m in net.named_modules() if n in a.layer_names()}
    t = build_table(w, a, act_channel_dims=dims)
    blur = next(lay for lay in t.layers if lay.kind == ACT and lay.name == "c1")
    assert blur.channels == 6 and blur.rows.stop - blur.rows.start == 2
    # -bcw through the module's own forward: the standardised layer's mean output is restored.
    (c,) = solve_recorded(t, [2.0], "dp").choices
    alloc = make_allocation(t, c, target_bits=2.0, solver="dp")
    alloc["acts"] = {}
    calib = torch.randn(12, 3, 8, 8, dtype=torch.float64)
    alloc["corrections"] = estimate_corrections(net, alloc, calib, bcw=True, bca=False)
    q = apply_allocation(net, alloc)
    torch.testing.assert_close(
        q.c1(calib).mean((0, 2, 3)), net.c1(calib).mean((0, 2, 3)), atol=1e-10, rtol=0
    )


def test_allocation_files_are_strict_json(tmp_path, stores, net):
    import json

    t, _ = alloc_for(stores, net)
    choice = np.zeros(len(t.kind), dtype=np.int64)  # everything pruned: no steps at all
    alloc = make_allocation(t, choice, target_bits=0.0, solver="dp")
    save_allocation(tmp_path / "a.json", alloc)

    def refuse(token):
        raise ValueError(token)

    json.loads((tmp_path / "a.json").read_text(), parse_constant=refuse)
    q = apply_allocation(net, load_allocation(tmp_path / "a.json"))
    assert all(not m.weight.detach().any() for m in (q.c1, q.c2, q.f1, q.f2))
