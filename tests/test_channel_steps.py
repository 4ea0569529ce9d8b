"""Per-channel steps (DESIGN §4): base steps, the exhaustive scale search, never worse than the
uniform per-channel baseline, the non-unimodal case that trapped the paper's search, and the
allocation → apply round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from rdoq.allocation import build_table
from rdoq.allocfile import make_allocation
from rdoq.apply import quantized_weight
from rdoq.backends import quantized_group
from rdoq.curves import CurveJob, generate_curves, layer_backend, layer_steps, plan_layers
from rdoq.groups import WeightGroups, group_bounds
from rdoq.hessian import GradientSweep, HessianSettings
from rdoq.hessian_backends import HessianWeightBackend
from rdoq.naive import NaiveEvaluator
from rdoq.parts import PartSpec
from rdoq.quantizers import (
    channel_deadzones,
    deadzone_threshold,
    mse_steps,
    quantize_deadzone,
    quantize_uniform,
    quantize_weight,
    signed_bounds,
)
from rdoq.search import Candidate, ScaleChain, ScaleSettings, run_chains, scale_grid
from rdoq.slots import SlotGrid
from rdoq.steps import ChannelSteps, candidate_params
from rdoq.store import CurveStore

INFO = {"arch": "toy", "weights_source": "test", "checkpoint_sha256": None}
CALIB = {"size": 16, "seed": 0, "source": "test", "sha256": "x", "items": []}


def _job(**kw) -> CurveJob:
    base = dict(
        kind="weight",
        group_size=4,
        nr=9,
        ndz=2,
        max_steps=24,
        step_grid=1,
        max_batch=64,
        progress=False,
    )
    return CurveJob(**{**base, **kw})


def test_mse_steps_minimise_each_channels_error_on_the_grid():
    torch.manual_seed(0)
    x = torch.randn(3, 200).double() * torch.tensor([[1.0], [1e-6], [30.0]])
    signed = torch.ones(3, dtype=torch.bool)
    for bits in (2, 4):
        got = mse_steps(x, bits, signed)
        lo, hi = signed_bounds(bits)
        for c in range(3):
            err = float((quantize_uniform(x[c], 2.0 ** float(got[c]), lo, hi) - x[c]).pow(2).mean())
            for r in np.linspace(-3, 3, 61):  # no step on a coarse sweep does better
                step = 2.0 ** (float(got[c]) + r)
                other = float((quantize_uniform(x[c], step, lo, hi) - x[c]).pow(2).mean())
                assert err <= other * (1 + 1e-9)


def test_dead_zone_mse_steps_and_thresholds():
    torch.manual_seed(1)
    w = torch.randn(4, 100).double()
    w[3] = 0.0  # an all-zero channel
    w[2, :60] = 0.0  # more exact zeros than the ratio
    phi = channel_deadzones(w, 0.25)
    assert (phi > 0).all()
    for c in (0, 1):  # the same exact quantile as the group threshold
        assert float(phi[c]) == deadzone_threshold(w[c], 0.25)
    assert float(phi[2]) == pytest.approx(float(w[2, 60:].abs().min()) / 2)
    assert torch.equal(channel_deadzones(w, 0.0), torch.zeros(4, dtype=torch.float64))
    steps = mse_steps(w, 3, torch.ones(4, dtype=torch.bool), phi)
    for c in (0, 1):
        err = float(
            (quantize_deadzone(w[c], 2.0 ** float(steps[c]), float(phi[c]), 3) - w[c]).pow(2).mean()
        )
        for r in np.linspace(-2, 2, 41):
            q = quantize_deadzone(w[c], 2.0 ** (float(steps[c]) + r), float(phi[c]), 3)
            assert err <= float((q - w[c]).pow(2).mean()) * (1 + 1e-9)
    # 1 bit leaves the dead-zone quantizer no level: no step.
    assert torch.isnan(mse_steps(w, 1, torch.ones(4, dtype=torch.bool), phi)).all()


def test_per_channel_weight_quantizer_matches_channel_by_channel():
    torch.manual_seed(2)
    w = torch.randn(3, 2, 5).double()
    steps = torch.tensor([-3.0, -1.25, -5.5], dtype=torch.float64)
    phi = torch.tensor([0.1, 0.2, 0.05], dtype=torch.float64)
    got = quantize_weight(w, 4, steps, phi)
    for c in range(3):
        assert torch.equal(got[c], quantize_weight(w[c], 4, float(steps[c]), float(phi[c])))
    mixed = quantize_weight(w, 4, steps, torch.tensor([0.0, 0.2, 0.0], dtype=torch.float64))
    assert torch.equal(mixed[0], quantize_weight(w[0], 4, -3.0, 0.0))
    assert torch.equal(mixed[1], quantize_weight(w[1], 4, -1.25, 0.2))


def test_scale_grid_and_chain():
    assert scale_grid(1.0, 4) == (0.0, -1.0, -0.75, -0.5, -0.25, 0.25, 0.5, 0.75, 1.0)
    with pytest.raises(ValueError, match="include 0"):
        ScaleSettings((0, 1), (0.5,))
    # Distortion not unimodal in the scale: the exhaustive chain still finds the minimum.
    table = {-1.0: 1.0, -0.5: 5.0, 0.0: 3.0, 0.5: 0.5, 1.0: 4.0}
    chain = ScaleChain(0, 1, 0.5, ScaleSettings((0, 1, 2, 3), tuple(sorted(table, key=abs))))

    def evaluate(cands):
        return np.array([7.0 if c.is_zero else table[c.step_log2] / c.bits for c in cands]), None

    run_chains([chain], evaluate, max_batch=3)
    assert chain.done
    # 0 bits and the 1-bit dead-zone quantizer are all zeros (one shared candidate).
    assert chain.best_dist == [7.0, 7.0, 0.25, 0.5 / 3]
    assert chain.best_step[2:] == [0.5, 0.5] and math.isnan(chain.best_step[0])


class DeadChannelNet(nn.Module):
    """A conv whose 4-channel group holds a near-dead channel that BatchNorm then amplifies
    (as in EfficientNet-Lite's first depthwise convs), then a linear readout."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4, eps=1e-14)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.conv.weight[1] *= 1e-7  # near-dead channel
            self.bn.running_var.copy_(torch.tensor([1.0, 1e-14, 1.0, 1.0]))
            self.bn.running_mean.zero_()

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _curves(tmp_path, model, x, job, name):
    root = tmp_path / name
    generate_curves(model, x, INFO, CALIB, job, root, PartSpec(0, 1), torch.device("cpu"))
    return CurveStore.load(root)


def test_near_dead_channel_does_not_trap_the_search(tmp_path):
    # One step per group cannot serve a channel 1e7 times smaller than the others, and the
    # paper's warm-started search leaves the curve flat; per-channel steps keep improving with
    # every bit, and each point is at most the uniform per-channel baseline's distortion.
    model = DeadChannelNet().double().eval()
    torch.manual_seed(1)
    x = torch.randn(16, 2, 6, 6, dtype=torch.float64)
    group = _curves(tmp_path, model, x, _job(step_mode="group", ndz=1), "group")
    chan = _curves(tmp_path, model, x, _job(ndz=1), "chan")
    dg = group.read_layer("conv").dist[0, 0]  # (B,)
    dc = chan.read_layer("conv").dist[0, 0]
    assert dg[8] > 0.5 * dg[4]  # the paper's quantizer: flat from 4 to 8 bits
    assert dc[8] < 0.05 * dc[4]  # per-channel steps: still falling
    assert dc[8] < 1e-3 * dg[8]
    naive = NaiveEvaluator(model, x, 16)
    w = model.conv.weight.detach()
    for bits in range(1, 9):
        steps = mse_steps(w.reshape(4, -1), bits, torch.ones(4, dtype=torch.bool))
        orig = w.clone()
        with torch.no_grad():
            model.conv.weight.copy_(quantize_weight(orig, bits, steps, 0.0))
            uniform = naive.dist()
            model.conv.weight.copy_(orig)
        assert dc[bits] <= uniform * (1 + 1e-9) + 1e-300, bits


def test_curve_points_are_exact_and_allocation_applies_them(tmp_path):
    # Measured per-channel curve points equal a plain forward with the group quantized as
    # stored, and the allocation made from the curves quantizes exactly like that.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    model = model.double().eval()
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    job = _job(nr=5, ndz=2, scales_log2=scale_grid(0.5, 4))
    store = _curves(tmp_path, model, x, job, "c")
    assert store.meta["steps"] == "channel" and store.meta["scales_log2"][0] == 0.0
    naive = NaiveEvaluator(model, x, 8)
    for name in ("0", "3"):
        c = store.read_layer(name)
        module = dict(model.named_modules())[name]
        w = module.weight.detach()
        steps = ChannelSteps(c.extra["channel_step_log2"], c.extra["channel_deadzone"])
        bounds = group_bounds(w.shape[0], 4)
        for g in range(len(bounds)):
            for d in range(2):
                for b in (2, 4):
                    cand = Candidate(g, b, float(c.step_log2[g, d, b]), d / 2, dz_index=d)
                    orig = w.clone()
                    with torch.no_grad():
                        c0, c1 = bounds[g]
                        module.weight[c0:c1] = quantized_group(orig, bounds, cand, steps)
                        assert c.dist[g, d, b] == pytest.approx(naive.dist(), rel=1e-9)
                        module.weight.copy_(orig)
    table = build_table(store, None)
    for col in (2, 3):
        choice = np.full(len(table.kind), col)
        alloc = make_allocation(table, choice, target_bits=float(col), solver="test")
        for layer in table.layers:
            e = alloc["weights"][layer.name]
            assert e["steps"] == "channel" and len(e["step_log2"]) == layer.channels
            w = dict(model.named_modules())[layer.name].weight.detach()
            got = quantized_weight(w, e)
            c = store.read_layer(layer.name)
            steps = ChannelSteps(c.extra["channel_step_log2"], c.extra["channel_deadzone"])
            bounds = group_bounds(layer.channels, layer.group_size)
            for g, r in enumerate(range(layer.rows.start, layer.rows.stop)):
                d = int(table.dz_index[r, col])
                cand = Candidate(g, col, float(table.step_log2[r, col]), d / 2, dz_index=d)
                c0, c1 = bounds[g]
                assert torch.equal(got[c0:c1], quantized_group(w, bounds, cand, steps))


def test_hessian_and_measured_backends_quantize_per_channel_identically():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3)).double().eval()
    x = torch.randn(10, 6, dtype=torch.float64)
    job = _job(ndz=3, nr=4, group_size=3)
    plan = plan_layers(model, x[:1], job)[0]
    steps = layer_steps(model[0].weight, job)
    cands = [
        Candidate(g, b, s, d / 3, dz_index=d)
        for g in (2, 0)
        for b in (1, 2, 3)
        for s in (-0.5, 0.0, 0.25)
        for d in range(3)
    ]
    sweep = GradientSweep(model, x, ["0"], "weight", HessianSettings(nprobes=2), batch_size=4)
    be = HessianWeightBackend(sweep, WeightGroups("0", plan.bounds, steps))
    dist, mse = be(cands)
    w = model[0].weight.detach()
    for k, c in enumerate(cands):
        c0, c1 = plan.bounds[c.group]
        delta = quantized_group(w, plan.bounds, c, steps) - w[c0:c1]
        assert dist[k] == pytest.approx(
            be.dist_of(c.group, delta.reshape(-1, 1))[0], rel=1e-12, abs=1e-300
        )
        assert mse[k] == pytest.approx(float(delta.pow(2).mean()), rel=1e-12, abs=1e-300)
    # The measured path gives the same quantized groups (and refuses mixed-up modes).
    naive = layer_backend(NaiveEvaluator(model, x, 10), plan, job, None)
    assert len(naive(cands[:2])[0]) == 2
    with pytest.raises(ValueError, match="ChannelSteps"):
        candidate_params(cands[:1], plan.bounds, 3, None)
    assert SlotGrid.of(cands).width == len(cands) // 2


class ConvHead(nn.Module):
    """Conv (bias) → ReLU → pool → linear: a layer whose -bcw shift changes the output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4, bias=False)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_measured_curves_with_bcw_see_the_corrected_layer(tmp_path):
    # With -bcw each stored point is the distortion after the output channels' bias is shifted
    # by the calibration mean of (W − Ŵ)x — recomputed here by plain forwards.
    torch.manual_seed(5)
    model = ConvHead().double().eval()
    x = torch.randn(12, 3, 6, 6, dtype=torch.float64) + 0.5  # a non-zero mean input
    job = _job(nr=4, ndz=2, group_size=2, bias_corr=True, scales_log2=scale_grid(0.5, 2))
    store = _curves(tmp_path, model, x, job, "bcw")
    assert store.meta["bias_corr"] is True
    plain = _curves(
        tmp_path, model, x, _job(nr=4, ndz=2, group_size=2, scales_log2=scale_grid(0.5, 2)), "plain"
    )
    with torch.no_grad():
        y0 = model(x)
    conv = model.conv
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    c = store.read_layer("conv")
    steps = ChannelSteps(c.extra["channel_step_log2"], c.extra["channel_deadzone"])
    bounds = group_bounds(5, 2)
    better = 0
    for g in range(len(bounds)):
        for d in range(2):
            for b in (1, 2, 3):
                cand = Candidate(g, b, float(c.step_log2[g, d, b]), d / 2, dz_index=d)
                c0, c1 = bounds[g]
                wq = w0.clone()
                wq[c0:c1] = quantized_group(w0, bounds, cand, steps)
                with torch.no_grad():
                    shift = (nn.functional.conv2d(x, w0 - wq, None, padding=1)).mean((0, 2, 3))
                    conv.weight.copy_(wq)
                    conv.bias.copy_(b0 + shift)
                    dist = float(((model(x) - y0) ** 2).mean())
                    conv.weight.copy_(w0)
                    conv.bias.copy_(b0)
                assert c.dist[g, d, b] == pytest.approx(dist, rel=1e-9, abs=1e-300)
                better += c.dist[g, d, b] <= plain.read_layer("conv").dist[g, d, b]
    assert better >= 12  # the correction mostly helps (the searches differ only by it)


def test_second_order_rows_with_bcw_are_gradients_of_the_corrected_layer():
    # Row (n, j) with -bcw = per-sample gradient of zᵀF(x_n) where the layer's bias follows its
    # weight as b + (W0 − W)·mean input: G_w − G_b·mean.
    torch.manual_seed(6)
    model = ConvHead().double().eval()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) + 0.3
    m = 2
    sweep = GradientSweep(
        model,
        x,
        ["conv"],
        "weight",
        HessianSettings(nprobes=m, seed=2),
        batch_size=3,
        bias_corr=True,
    )
    be = HessianWeightBackend(sweep, WeightGroups("conv", group_bounds(5, 5)))
    mean = sweep.input_means["conv"]  # (out, in·k·k)
    cols = nn.functional.unfold(x, 3, padding=1)  # (N, 27, L)
    torch.testing.assert_close(mean, cols.mean((0, 2)).expand(5, -1), rtol=1e-12, atol=1e-14)
    gen = torch.Generator().manual_seed(2)
    zs = torch.randint(0, 2, (4, m, 4), generator=gen, dtype=torch.int8).double() * 2 - 1
    w0, b0 = model.conv.weight.detach().clone(), model.conv.bias.detach().clone()

    def out(w, xn):
        b = b0 + ((w0 - w).reshape(5, -1) * mean).sum(1)
        h = nn.functional.conv2d(xn, w, b, padding=1)
        return model.fc(torch.relu(h).mean((2, 3)))[0]

    for n in range(4):
        for j in range(m):
            w = w0.clone().requires_grad_(True)
            (g,) = torch.autograd.grad((zs[n, j] * out(w, x[n : n + 1])).sum(), [w])
            torch.testing.assert_close(be.rows[0, n * m + j], g.reshape(-1), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- activations


class ActNet(nn.Module):
    """Conv → ReLU → linear whose conv output channels differ in range by up to 1e4."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():
            self.conv.weight.mul_(torch.tensor([1.0, 1e-4, 3.0, 0.01, 1.0, 30.0]).view(6, 1, 1, 1))

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _act_job(**kw) -> CurveJob:
    return _job(
        **{
            "kind": "act",
            "act_mode": "out",
            "ndz": 1,
            "nr": 6,
            "step_grid": 4,
            "max_steps": 24,
            "group_size": 4,
            **kw,
        }
    )


def _quantize_channels(
    t: torch.Tensor, c0: int, c1: int, step_log2: np.ndarray, bits: int, signed: bool
) -> torch.Tensor:
    """``t (n, C, …)`` with channels c0:c1 quantized by one step per channel, by hand."""
    lo, hi = signed_bounds(bits) if signed else (0, 2**bits - 1)
    out = t.clone()
    for i, c in enumerate(range(c0, c1)):
        out[:, c] = quantize_uniform(t[:, c], float(2.0 ** step_log2[i]) if bits else 1.0, lo, hi)
    return out


def test_activation_base_steps_are_each_channels_mse_optimal_step():
    from rdoq.steps import act_rows

    t = torch.randn(5, 3, 40, dtype=torch.float64) * torch.tensor([1.0, 1e-3, 50.0]).view(1, 3, 1)
    rows = act_rows(t, 1)  # (C, rows): at most 64 positions per sample
    assert rows.shape == (3, 5 * 40)
    long = torch.randn(2, 3, 1000, dtype=torch.float64)
    assert act_rows(long, 1).shape == (3, 2 * 63)  # stride ceil(1000 / 64) = 16: 63 per sample
    assert torch.equal(act_rows(torch.cat([t, t]), 1), torch.cat([rows, rows], 1))
    signed = torch.tensor([True, False, True])
    steps = ChannelSteps.of_acts(rows, signed, 5)
    assert steps.step_log2.shape == (3, 1, 5) and np.isnan(steps.step_log2[:, 0, 0]).all()
    for b in range(1, 5):
        np.testing.assert_array_equal(steps.step_log2[:, 0, b], mse_steps(rows, b, signed).numpy())
    # The channels' own steps follow their ranges (a shared step could not).
    assert steps.step_log2[2, 0, 4] - steps.step_log2[1, 0, 4] > 10


def test_activation_curve_points_are_exact_and_allocation_applies_them(tmp_path):
    from rdoq.apply import act_quantizer

    torch.manual_seed(5)
    model = ActNet().double().eval()
    x = torch.randn(6, 2, 7, 7, dtype=torch.float64)
    chan = _curves(tmp_path, model, x, _act_job(scales_log2=scale_grid(0.5, 4)), "chan")
    group = _curves(tmp_path, model, x, _act_job(step_mode="group"), "group")
    assert chan.meta["steps"] == "channel" and group.meta["steps"] == "group"
    c = chan.read_layer("conv")
    base = c.extra["channel_step_log2"]  # (C, 1, B)
    assert base.shape == (6, 1, 6)
    with torch.no_grad():
        ref = model(x)
        y = model.conv(x)
    bounds = group_bounds(6, 4)
    for g, (c0, c1) in enumerate(bounds):
        signed = bool(c.extra["signed"][g])
        for b in (2, 4, 5):
            steps = base[c0:c1, 0, b] + c.step_log2[g, 0, b]
            yq = _quantize_channels(y, c0, c1, steps, b, signed)
            with torch.no_grad():
                out = model.fc(torch.relu(yq).mean((2, 3)))
            assert c.dist[g, 0, b] == pytest.approx(float((out - ref).pow(2).mean()), rel=1e-9)
    # Per-channel steps serve channels 1e4 apart; one step per group cannot.
    g_best = group.read_layer("conv").dist[:, 0]  # (G, B)
    assert np.all(c.dist[:, 0, 3:] <= g_best[:, 3:] * (1 + 1e-9))
    assert c.dist[0, 0, 5] < 0.5 * g_best[0, 5]
    # The allocation carries one step per channel, and its quantizer is the curves'.
    weights = _curves(tmp_path, model, x, _job(ndz=1, nr=6), "w")
    table = build_table(weights, chan)
    for col in (2, 4):
        alloc = make_allocation(
            table, np.full(len(table.kind), col), target_bits=col, solver="test"
        )
        e = alloc["acts"]["conv"]
        assert e["steps"] == "channel" and len(e["step_log2"]) == 6 and "deadzone" not in e
        assert e["signed"] == [bool(s) for s in c.extra["signed"]]
        got = act_quantizer(model.conv, e)(y)
        for g, (c0, c1) in enumerate(bounds):
            steps = base[c0:c1, 0, col] + c.step_log2[g, 0, col]
            want = _quantize_channels(y, c0, c1, steps, col, bool(c.extra["signed"][g]))
            assert torch.equal(got[:, c0:c1], want[:, c0:c1]), (col, g)
    # Allocation files keep them, and refuse a per-channel list of the wrong length.
    from rdoq.allocfile import load_allocation, save_allocation

    save_allocation(tmp_path / "a.json", alloc)
    assert load_allocation(tmp_path / "a.json")["acts"]["conv"]["step_log2"] == e["step_log2"]
    alloc["acts"]["conv"]["step_log2"] = e["step_log2"][:2]
    save_allocation(tmp_path / "b.json", alloc)
    with pytest.raises(ValueError, match="wrong length"):
        load_allocation(tmp_path / "b.json")


def test_second_order_activation_estimate_with_channel_steps_is_that_of_the_perturbation():
    from rdoq.actstats import act_group_stats
    from rdoq.hessian_backends import HessianActBackend
    from rdoq.steps import candidate_params

    torch.manual_seed(6)
    model = ActNet().double().eval()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    bounds = group_bounds(6, 4)
    stats = act_group_stats(model, x, "conv", "out", bounds, rows=5, keep_rows=True)
    steps = ChannelSteps.of_acts(stats.rows, stats.channel_signed(bounds), 5)
    sweep = GradientSweep(
        model, x, ["conv"], "act", HessianSettings(nprobes=2), mode="out", batch_size=2
    )
    be = HessianActBackend(sweep, "conv", bounds, stats, steps)
    cands = [
        Candidate(g, b, s, 0.0, dz_index=0)
        for g in (1, 0)
        for b in (0, 2, 4)
        for s in (-0.25, 0.0, 0.5)
    ]
    dist, _ = be(cands)
    with torch.no_grad():
        y = model.conv(x)
    for k, cand in enumerate(cands):
        c0, c1 = bounds[cand.group]
        step = candidate_params([cand], bounds, 4, steps)[0][0, : c1 - c0]
        yq = _quantize_channels(y, c0, c1, np.log2(step), cand.bits, bool(stats.signed[cand.group]))
        delta = (yq - y)[:, c0:c1].movedim(1, -1).unsqueeze(-1)  # (N, …, c_g, 1)
        assert dist[k] == pytest.approx(be.dist_of(cand.group, delta)[0], rel=1e-10, abs=1e-300)


def test_curve_scripts_default_steps_per_kind_and_take_either(tmp_path):
    from rdoq.cli import DEFAULT_STEPS
    from rdoq.cli_curves import curves_main

    argv = [
        "--archname",
        "digits_cnn",
        "--testsize",
        "8",
        "--nchannelbatch",
        "16",
        "--maxrates",
        "3",
        "--quiet",
        "--folds",
        "0",
    ]
    for kind, mode in (("weight", None), ("act", "out")):
        default = curves_main(
            kind,
            mode,
            [*argv, "--maxdeadzones", "1", "--outdir", str(tmp_path / kind / "d")],
            estimator="hessian",
        )
        assert CurveStore.load(default["curve_set"]).meta["steps"] == DEFAULT_STEPS[kind]
        for steps in ("channel", "group"):
            got = curves_main(
                kind,
                mode,
                [
                    *argv,
                    "--maxdeadzones",
                    "1",
                    "--steps",
                    steps,
                    "--outdir",
                    str(tmp_path / kind / steps),
                ],
                estimator="hessian",
            )
            assert CurveStore.load(got["curve_set"]).meta["steps"] == steps
        alias = curves_main(
            kind,
            mode,
            [
                *argv,
                "--maxdeadzones",
                "1",
                "--group-step",
                "--outdir",
                str(tmp_path / kind / "alias"),
            ],
            estimator="hessian",
        )
        assert CurveStore.load(alias["curve_set"]).meta["steps"] == "group"


# ----------------------------------------------------------------------------- -bca inside


def test_activation_curves_with_bca_see_the_corrected_quantizer(tmp_path):
    # Each measured point is the output MSE with the group quantized and its channels' mean
    # calibration error added back — what the allocation scripts' -bca deploys.
    torch.manual_seed(7)
    model = ActNet().double().eval()
    x = torch.randn(6, 2, 7, 7, dtype=torch.float64)
    for steps in ("group", "channel"):
        job = _act_job(step_mode=steps, bias_corr=True, nr=5)
        store = _curves(tmp_path, model, x, job, f"bca_{steps}")
        assert store.meta["bias_corr"] is True
        c = store.read_layer("conv")
        with torch.no_grad():
            ref = model(x)
            y = model.conv(x)
        for g, (c0, c1) in enumerate(group_bounds(6, 4)):
            signed = bool(c.extra["signed"][g])
            for b in (1, 2, 4):
                if steps == "channel":
                    log2 = c.extra["channel_step_log2"][c0:c1, 0, b] + c.step_log2[g, 0, b]
                else:
                    log2 = np.full(c1 - c0, c.step_log2[g, 0, b])
                yq = _quantize_channels(y, c0, c1, log2, b, signed)
                off = (y - yq)[:, c0:c1].mean((0, 2, 3), keepdim=True)
                yq[:, c0:c1] += off
                with torch.no_grad():
                    out = model.fc(torch.relu(yq).mean((2, 3)))
                assert c.dist[g, 0, b] == pytest.approx(
                    float((out - ref).pow(2).mean()), rel=1e-9
                ), (steps, g, b)


def test_second_order_activation_estimate_with_bca_is_that_of_the_centred_perturbation():
    from rdoq.actstats import act_group_stats
    from rdoq.hessian_backends import HessianActBackend

    torch.manual_seed(8)
    model = ActNet().double().eval()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    bounds = group_bounds(6, 4)
    stats = act_group_stats(model, x, "conv", "out", bounds, rows=5)
    sweep = GradientSweep(
        model, x, ["conv"], "act", HessianSettings(nprobes=2, kappa=0.5), mode="out", batch_size=2
    )
    be = HessianActBackend(sweep, "conv", bounds, stats, bias_corr=True)
    plain = HessianActBackend(sweep, "conv", bounds, stats)
    cands = [Candidate(g, b, s, 0.0) for g in (1, 0) for b in (0, 2, 3) for s in (-3.0, -1.0)]
    dist, _ = be(cands)
    with torch.no_grad():
        y = model.conv(x)
    for k, cand in enumerate(cands):
        c0, c1 = bounds[cand.group]
        log2 = np.full(c1 - c0, cand.step_log2)
        yq = _quantize_channels(y, c0, c1, log2, cand.bits, bool(stats.signed[cand.group]))
        delta = (yq - y)[:, c0:c1]
        delta = delta - delta.mean((0, 2, 3), keepdim=True)
        delta = delta.movedim(1, -1).unsqueeze(-1)  # (N, …, c_g, 1)
        assert dist[k] == pytest.approx(be.dist_of(cand.group, delta)[0], rel=1e-10, abs=1e-300)
    assert not np.allclose(dist, plain(cands)[0])


def test_bca_flag_of_the_activation_scripts_is_recorded_and_checked(tmp_path, caplog):
    from rdoq.cli_alloc import allocate_main
    from rdoq.cli_curves import curves_main

    argv = [
        "--archname",
        "digits_cnn",
        "--testsize",
        "8",
        "--nchannelbatch",
        "16",
        "--maxrates",
        "3",
        "--quiet",
        "--folds",
        "0",
    ]
    w = curves_main(
        "weight",
        None,
        [*argv, "--maxdeadzones", "1", "--outdir", str(tmp_path)],
        estimator="hessian",
    )
    a = curves_main("act", "out", [*argv, "-bca", "--outdir", str(tmp_path)], estimator="hessian")
    assert CurveStore.load(a["curve_set"]).meta["bias_corr"] is True
    base = [
        "--archname",
        "digits_cnn",
        "--pathrdcurve",
        w["curve_set"],
        "--act_curve_root_dir",
        str(tmp_path),
        "--testsize",
        "16",
        "--no-plots",
        "--quiet",
        "--target_rates",
        "2",
        "--act-target-rates",
        "2",
        "--fp-act-layers",
        "none",
    ]
    with caplog.at_level("WARNING", logger="rdoq"):
        allocate_main("dp", argv=[*base, "--outdir", str(tmp_path / "off")])
    assert "act curves were measured with -bca" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="rdoq"):
        out = allocate_main("dp", argv=[*base, "-bca", "--outdir", str(tmp_path / "on")])
    assert "-bca" not in caplog.text and out["rows"][0]["method"] == "dp+bca"
