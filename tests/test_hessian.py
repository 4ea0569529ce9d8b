"""The second-order estimator: quadratic form, per-sample pairing, exactness on linear models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rdoq.actstats import ActGroupStats
from rdoq.groups import WeightGroups, group_bounds
from rdoq.hessian import GradientSweep, HessianSettings
from rdoq.hessian_backends import HessianActBackend, HessianWeightBackend
from rdoq.search import Candidate


class Linear2(nn.Module):
    """Two linear layers without a nonlinearity: the linearisation is exact."""

    def __init__(self, k_out: int = 1):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, k_out)

    def forward(self, x):
        return self.b(self.a(x))


class Gated(nn.Module):
    """F(x) = Σ_c h_c · x_c with h = a(x): ∂F/∂h differs per sample (= x_n), and F is linear in
    h, so the quadratic model of an activation perturbation is exact."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return (self.a(x) * x).sum(-1, keepdim=True)


@pytest.fixture(autouse=True)
def _double():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def seeded(cls, *args):
    torch.manual_seed(0)
    return cls(*args).eval()


def test_weight_estimate_is_exact_on_a_linear_model_with_scalar_output():
    model = seeded(Linear2)
    x = torch.randn(7, 6)
    sweep = GradientSweep(model, x, ["a"], "weight", HessianSettings(nprobes=3), batch_size=3)
    bounds = group_bounds(5, 2)
    be = HessianWeightBackend(sweep, WeightGroups("a", bounds))
    delta = torch.randn(2, 6) * 0.1
    est = be.dist_of(0, delta.reshape(-1, 1))[0]
    with torch.no_grad():
        y0 = model(x)
        model.a.weight[0:2] += delta
        y1 = model(x)
    assert est == pytest.approx(float(((y1 - y0) ** 2).mean()), rel=1e-10)


def test_random_probes_estimate_the_output_mse_for_vector_outputs():
    model = seeded(Linear2, 8)
    x = torch.randn(10, 6)
    sweep = GradientSweep(model, x, ["a"], "weight", HessianSettings(nprobes=400), batch_size=4)
    be = HessianWeightBackend(sweep, WeightGroups("a", group_bounds(5, 5)))
    delta = torch.randn(5, 6) * 0.1
    est = be.dist_of(0, delta.reshape(-1, 1))[0]
    with torch.no_grad():
        y0 = model(x)
        model.a.weight += delta
        true = float(((model(x) - y0) ** 2).mean())
    assert est == pytest.approx(true, rel=0.15)


def test_quadratic_in_the_perturbation_and_zero_at_zero():
    model = seeded(Linear2, 3)
    x = torch.randn(6, 6)
    for settings in (
        HessianSettings(nprobes=2, kappa=0.3),
        HessianSettings(probe="norm", kappa=0.1),
    ):
        be = HessianWeightBackend(
            GradientSweep(model, x, ["a", "b"], "weight", settings),
            WeightGroups("a", group_bounds(5, 3)),
        )
        d = torch.randn(3 * 6, 1)
        one, two, zero = (be.dist_of(0, d * s)[0] for s in (1.0, 2.0, 0.0))
        assert zero == 0.0 and one > 0 and two == pytest.approx(4 * one, rel=1e-12)
    # With the paper's first-order term: linear part doubles, quadratic part quadruples.
    sweep = GradientSweep(
        model, x, ["a"], "weight", HessianSettings(probe="norm", first_order=True)
    )
    be = HessianWeightBackend(sweep, WeightGroups("a", group_bounds(5, 3)))
    d = torch.randn(18, 1)
    f1, f2, fm = (be.dist_of(0, d * s)[0] for s in (1.0, 2.0, -1.0))
    lin, quad = (f1 - fm) / 2, (f1 + fm) / 2
    assert f2 == pytest.approx(2 * lin + 4 * quad, rel=1e-10)


def test_rows_are_per_sample_not_per_batch():
    # F = w·x with samples of opposite sign: a per-batch gradient (Σ_n x_n = 0) would predict no
    # distortion at all.
    model = nn.Linear(2, 1, bias=False).eval()
    x = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [3.0, 1.0], [-3.0, -1.0]])
    sweep = GradientSweep(model, x, [""], "weight", HessianSettings(nprobes=1), batch_size=4)
    be = HessianWeightBackend(sweep, WeightGroups("", group_bounds(1, 1)))
    delta = torch.tensor([[0.5], [-0.25]])
    expected = float(((x @ delta) ** 2).mean())
    assert be.dist_of(0, delta)[0] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("batch_size", [1, 3, 6])
def test_activation_perturbations_meet_their_own_sample(batch_size):
    model = seeded(Gated)
    x = torch.randn(6, 4)
    sweep = GradientSweep(
        model, x, ["a"], "act", HessianSettings(nprobes=2), mode="out", batch_size=batch_size
    )
    stats = ActGroupStats(
        np.zeros(2), np.array([True, True]), 4, np.full(2, -np.inf), np.full(2, np.inf)
    )
    be = HessianActBackend(sweep, "a", group_bounds(4, 2), stats)
    with torch.no_grad():
        h = model.a(x)
    delta = torch.randn(6, 2) * 0.1  # a different perturbation per sample
    true = float(((delta * x[:, 0:2]).sum(-1) ** 2).mean())
    assert be.dist_of(0, delta.unsqueeze(-1))[0] == pytest.approx(true, rel=1e-10)
    # The same through a quantization candidate.
    cand = Candidate(1, 3, -4.0, 0.0)
    from rdoq.quantizers import quantize_uniform, signed_bounds

    dq = quantize_uniform(h[:, 2:4], 2.0**-4, *signed_bounds(3)) - h[:, 2:4]
    true_q = float(((dq * x[:, 2:4]).sum(-1) ** 2).mean())
    assert be([cand])[0][0] == pytest.approx(true_q, rel=1e-10)


def test_conv_per_sample_gradients_match_autograd():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).eval()
    model = nn.Sequential(conv, nn.Flatten()).eval()
    x = torch.randn(3, 4, 7, 7)
    sweep = GradientSweep(model, x, ["0"], "weight", HessianSettings(probe="norm"), batch_size=2)
    sweep.ensure("0")
    for n in range(3):
        w = conv.weight
        (g,) = torch.autograd.grad(model(x[n : n + 1]).norm(), [w])
        torch.testing.assert_close(sweep.rows["0"][n], g.reshape(6, -1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layer", ["same", "subclass"])
def test_convs_that_pad_inside_forward_get_exact_per_sample_gradients(layer):
    # timm's Conv2dSame pads inside forward (every tf_* model); a subclass with its own forward
    # is differentiated through that forward (torch.func), not through the stock conv formula.
    from timm.layers import Conv2dSame

    class Scaled(nn.Conv2d):
        def forward(self, x):
            return super().forward(x * 2.0)

    torch.manual_seed(5)
    conv = (
        Conv2dSame(3, 4, 3, stride=2, groups=1) if layer == "same" else Scaled(3, 4, 3, padding=1)
    ).double()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(5, 3, 9, 9, dtype=torch.float64)
    model(x[:1])
    model.eval()
    m = 2
    sweep = GradientSweep(
        model, x, ["0"], "weight", HessianSettings(nprobes=m, seed=1), batch_size=3
    )
    sweep.ensure("0")
    gen = torch.Generator().manual_seed(1)
    zs = torch.randint(0, 2, (5, m, 2), generator=gen, dtype=torch.int8).double() * 2 - 1
    for n in range(5):
        for j in range(m):
            (g,) = torch.autograd.grad((zs[n, j] * model(x[n : n + 1])[0]).sum(), [conv.weight])
            row = sweep.rows["0"][n * m + j]
            torch.testing.assert_close(row, g.reshape(row.shape), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["weight", "act"])
def test_in_place_op_after_the_layer_changes_nothing(kind):
    # Conv → ReLU(inplace=True) → Linear: the ReLU must not overwrite what the sweep captured
    # (before the fix the conv's rows were off by a relative 1.56 and its stored outputs were the
    # rectified ones).
    torch.manual_seed(7)
    model = (
        nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)
        )
        .double()
        .eval()
    )
    ref = nn.Sequential(model[0], nn.ReLU(), model[2], model[3]).eval()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    sweep = GradientSweep(
        model,
        x,
        ["0"],
        kind,
        HessianSettings(probe="norm"),
        mode="out" if kind == "act" else None,
        batch_size=3,
    )
    sweep.ensure("0")
    for n in range(4):
        if kind == "weight":
            (g,) = torch.autograd.grad(ref(x[n : n + 1]).norm(), [model[0].weight])
            torch.testing.assert_close(sweep.rows["0"][n], g.reshape(3, -1), rtol=1e-10, atol=1e-12)
        else:
            h = model[0](x[n : n + 1]).detach().requires_grad_(True)
            (g,) = torch.autograd.grad(ref[1:](h).norm(), [h])
            torch.testing.assert_close(sweep.acts["0"][n], h[0].detach(), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(sweep.grads["0"][n, 0], g[0], rtol=1e-10, atol=1e-12)


def test_input_activation_estimate_excludes_the_skip_path():
    # y = head(x + lin(x)), exactly linear, one output: with random ±1 probes the second-order
    # estimate of quantizing lin's input is exact — if only lin sees the perturbation. Through
    # the identity too the estimate was 13× the truth on such a toy.
    from rdoq.quantizers import quantize_uniform, signed_bounds

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)
            self.head = nn.Linear(6, 1)

        def forward(self, x):
            return self.head(x + self.lin(x))

    torch.manual_seed(8)
    model = Res().double().eval()
    with torch.no_grad():
        model.lin.weight.mul_(0.1)
    x = torch.randn(7, 6, dtype=torch.float64)
    sweep = GradientSweep(
        model, x, ["lin"], "act", HessianSettings(nprobes=2), mode="in", batch_size=3
    )
    bounds = group_bounds(6, 3)
    stats = ActGroupStats(np.zeros(2), np.array([True, True]), 6, -np.ones(2), np.ones(2))
    be = HessianActBackend(sweep, "lin", bounds, stats)
    cand = Candidate(1, 2, -1.0)
    est = be([cand])[0][0]
    xq = x.clone()
    xq[:, 3:] = quantize_uniform(x[:, 3:], 0.5, *signed_bounds(2))
    with torch.no_grad():
        true = float(((model.head(x + model.lin(xq)) - model(x)) ** 2).mean())
    assert est == pytest.approx(true, rel=1e-10)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="--first-order needs --probe norm"):
        HessianSettings(first_order=True)
    with pytest.raises(ValueError, match="--nprobes must be >= 1"):
        HessianSettings(nprobes=0)
    with pytest.raises(ValueError, match="--probe must be one of"):
        HessianSettings(probe="fisher")


@pytest.mark.parametrize("arch", ["conv", "linear"])
def test_stats_from_stored_activations_equal_the_hooked_ones(arch):
    from rdoq.actstats import act_group_stats, act_group_stats_of
    from rdoq.groups import channel_dim

    if arch == "conv":
        model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten()).eval()
        x, name = torch.randn(6, 3, 6, 6), "0"
    else:
        model = seeded(Gated)
        x, name = torch.randn(6, 4), "a"
    module = dict(model.named_modules())[name]
    with torch.no_grad():
        values = module(x if arch == "linear" else x)
    bounds = group_bounds(values.shape[channel_dim(module)], 2)
    a = act_group_stats(model, x, name, "out", bounds, rows=4, keep_rows=True)
    b = act_group_stats_of(values, channel_dim(module), bounds, keep_rows=True)
    for key in ("rms_log2", "signed", "vmin", "vmax"):
        np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=1e-12)
    assert a.channels == b.channels
    # The per-channel step sample does not depend on how the forwards were batched.
    assert torch.equal(a.rows, b.rows) and a.rows.shape[0] == a.channels


@pytest.mark.parametrize("split", [False, True])
def test_batched_weight_quantization_equals_one_call_per_candidate(split):
    from rdoq.hessian_backends import quantize_weights_batched
    from rdoq.quantizers import quantize_weight
    from rdoq.slots import SlotGrid

    torch.manual_seed(3)
    w = torch.randn(3, 50)  # three groups
    cands = [
        Candidate(g, b, s, dz)
        for b in (0, 1, 2, 3, 5)
        for s in (-4.0, -2.5, 0.0)
        for dz in (0.0, 0.3)
        for g in (2, 0)
    ] + [Candidate(2, 0, float("nan"), 0.0)]
    slots = SlotGrid.of(cands, split=[c.deadzone > 0 for c in cands] if split else None)
    assert list(slots.groups) == [0, 2]
    # Split: group 2 has 16 uniform candidates (15 + the NaN-step one) then 15 dead-zone ones.
    assert (slots.width, slots.split_col) == ((31, 16) if split else (31, 31))
    bounds = group_bounds(3, 1)  # one 50-element channel per group
    out = quantize_weights_batched(
        w[slots.groups].unsqueeze(1), cands, slots, slice(None), bounds
    )  # (2, 31, 50)
    for k, c in enumerate(cands):
        got = out[slots.rows[k], slots.cols[k]]
        assert torch.equal(got, quantize_weight(w[c.group], c.bits, c.step_log2, c.deadzone)), c
    # Only dead-zone candidates (an empty uniform block when split).
    dz_only = [c for c in cands if c.deadzone > 0]
    slots = SlotGrid.of(dz_only, split=[True] * len(dz_only) if split else None)
    out = quantize_weights_batched(
        w[slots.groups].unsqueeze(1), dz_only, slots, slice(None), bounds
    )
    for k, c in enumerate(dz_only):
        got = out[slots.rows[k], slots.cols[k]]
        assert torch.equal(got, quantize_weight(w[c.group], c.bits, c.step_log2, c.deadzone)), c


def test_slot_runs_are_consecutive_groups_within_the_memory_cap(monkeypatch):
    from rdoq import slots as slots_module
    from rdoq.slots import SlotGrid

    cands = [Candidate(g, 2, -1.0) for g in (5, 0, 1, 2, 7, 6, 1)]
    slots = SlotGrid.of(cands)
    assert list(slots.groups) == [0, 1, 2, 5, 6, 7] and slots.width == 2
    runs = slots.runs(per_group_elements=10)
    assert [(r.start, r.stop) for r in runs] == [(0, 3), (3, 6)]
    assert slots.group_range(runs[1]) == slice(5, 8)
    monkeypatch.setattr(slots_module, "_MAX_DELTA_ELEMENTS", 40)  # two groups of 10×2 per run
    assert [(r.start, r.stop) for r in slots.runs(10)] == [(0, 2), (2, 3), (3, 5), (5, 6)]


@pytest.mark.parametrize("kind", ["weight", "act"])
def test_batched_backend_equals_one_group_at_a_time(kind):
    # Uneven groups (7 channels in groups of 3: the last is padded), candidates of several
    # groups and widths in one call, against the single-group estimate of each candidate.
    from rdoq.quantizers import quantize_uniform, quantize_weight, signed_bounds, unsigned_bounds

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).eval()
    x = torch.randn(9, 5)
    bounds = group_bounds(7, 3)
    cands = [
        Candidate(g, b, s, dz if kind == "weight" else 0.0)
        for g in (2, 0, 1)
        for b in (0, 2, 3)
        for s in (-3.0, -1.5)
        for dz in (0.0, 0.2)
    ]
    cands = list({c.key(): c for c in cands}.values())
    layer = "0" if kind == "weight" else "1"
    sweep = GradientSweep(
        model,
        x,
        [layer],
        kind,
        HessianSettings(nprobes=3),
        mode="out" if kind == "act" else None,
        batch_size=4,
    )
    if kind == "weight":
        be = HessianWeightBackend(sweep, WeightGroups(layer, bounds))
        w = model[0].weight.detach()
        dist, mse = be(cands)
        for k, c in enumerate(cands):
            c0, c1 = bounds[c.group]
            d = quantize_weight(w[c0:c1], c.bits, c.step_log2, c.deadzone) - w[c0:c1]
            assert dist[k] == pytest.approx(
                be.dist_of(c.group, d.reshape(-1, 1))[0], rel=1e-12, abs=1e-300
            )
            assert mse[k] == pytest.approx(float(d.pow(2).mean()), rel=1e-12, abs=1e-300)
    else:
        with torch.no_grad():
            h = model[1](model[0](x))
        signed = np.array([False, True, False])  # one group on the signed grid
        stats = ActGroupStats(np.zeros(3), signed, 7, np.zeros(3), np.ones(3))
        be = HessianActBackend(sweep, layer, bounds, stats)
        dist, _ = be(cands)
        for k, c in enumerate(cands):
            c0, c1 = bounds[c.group]
            lo, hi = (signed_bounds if signed[c.group] else unsigned_bounds)(c.bits)
            step = 2.0**c.step_log2 if c.bits else 1.0
            d = quantize_uniform(h[:, c0:c1], step, lo, hi) - h[:, c0:c1]
            assert dist[k] == pytest.approx(
                be.dist_of(c.group, d.unsqueeze(-1))[0], rel=1e-12, abs=1e-300
            )


def test_sweeps_split_by_memory_give_the_same_rows():
    model = seeded(Linear2, 3)
    x = torch.randn(5, 6)
    one = GradientSweep(model, x, ["a", "b"], "weight", HessianSettings(nprobes=2))
    split = GradientSweep(
        model, x, ["a", "b"], "weight", HessianSettings(nprobes=2), mem_budget_mb=1e-6
    )
    assert one.n_sweeps == 1 and split.n_sweeps == 2
    for name in ("a", "b"):
        one.ensure(name)
        split.ensure(name)
        assert set(split.rows) == {name}  # the other chunk's rows were released
        # The budget also shrinks the sweep batch: equal up to the rounding of other batching.
        torch.testing.assert_close(split.rows[name], one.rows[name], rtol=1e-12, atol=1e-15)


def test_sweep_batch_fits_the_memory_budget_and_never_changes_the_rows():
    # A budget below one batch's forward/backward shrinks the sweep batch (down to one sample);
    # the random probes belong to (sample, probe), so the rows are identical.
    model = seeded(Linear2, 4)
    x = torch.randn(6, 6)
    big = GradientSweep(model, x, ["a", "b"], "weight", HessianSettings(nprobes=3), batch_size=4)
    small = GradientSweep(
        model,
        x,
        ["a", "b"],
        "weight",
        HessianSettings(nprobes=3),
        batch_size=4,
        mem_budget_mb=big._per_sample_bytes * 2.5 / 2**20,
    )
    assert big.batch_size == 4 and small.batch_size == 2
    tiny = GradientSweep(
        model, x, ["a", "b"], "weight", HessianSettings(nprobes=3), batch_size=4, mem_budget_mb=1e-9
    )
    assert tiny.batch_size == 1
    for name in ("a", "b"):
        for sweep in (big, small, tiny):
            sweep.ensure(name)
        for sweep in (small, tiny):
            torch.testing.assert_close(sweep.rows[name], big.rows[name], rtol=1e-12, atol=1e-15)


def test_fast_uniform_quantizer_is_bitwise_the_reference_one():
    from rdoq.quantizers import quantize_uniform, quantize_uniform_fast

    torch.manual_seed(4)
    x = torch.randn(3, 1, 40) * 3  # (G, 1, n), candidates broadcast on the middle axis
    x[0, 0, :4] = torch.tensor([0.5, 1.5, -2.5, 2.0]) * 2.0**-1.25  # ties at one step
    step = 2.0 ** torch.tensor([-1.25, -0.5, 0.0, 1.0]).repeat(3, 1).unsqueeze(-1)  # (3, 4, 1)
    lo = torch.tensor([-4.0, 0.0, -1.0, -128.0]).repeat(3, 1).unsqueeze(-1)
    hi = torch.tensor([3.0, 0.0, 0.0, 127.0]).repeat(3, 1).unsqueeze(-1)
    assert torch.equal(quantize_uniform_fast(x, step, lo, hi), quantize_uniform(x, step, lo, hi))


@pytest.mark.parametrize("batch_size", [3, 8, 64])
def test_random_probe_rows_are_signed_per_sample_gradients(batch_size):
    # Scalar output: a Rademacher probe makes row (n, j) = ±∂F(x_n)/∂W, whatever batching of
    # samples × probes the sweep used; a row paired with the wrong sample would not match.
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 1)).eval()
    x = torch.randn(5, 2, 5, 5)
    m = 3
    sweep = GradientSweep(
        model, x, ["0", "3"], "weight", HessianSettings(nprobes=m), batch_size=batch_size
    )
    sweep.ensure("0")
    for name, w in (("0", conv.weight), ("3", model[3].weight)):
        for n in range(5):
            (g,) = torch.autograd.grad(model(x[n : n + 1]).sum(), [w])
            for j in range(m):
                row = sweep.rows[name][n * m + j]
                sign = 1.0 if torch.dot(row.flatten(), g.flatten()) > 0 else -1.0
                torch.testing.assert_close(row, sign * g.reshape(row.shape), rtol=1e-10, atol=1e-12)


def test_fast_deadzone_quantizer_is_bitwise_the_reference_one():
    from rdoq.quantizers import quantize_deadzone, quantize_deadzone_fast

    torch.manual_seed(5)
    x = torch.randn(2, 1, 60) * 2  # (G, 1, n)
    x[0, 0, :5] = torch.tensor([0.0, -0.0, 0.3, -0.3, 0.3 + 0.25 * 3])  # zero, at φ, on a cell edge
    step = torch.tensor([0.25, 0.5, 1.0, 2.0]).repeat(2, 1).unsqueeze(-1)  # (2, 4, 1)
    dz = torch.tensor([0.3, 0.0, 0.1, 5.0]).repeat(2, 1).unsqueeze(-1)
    mags = torch.tensor([3.0, 7.0, 0.0, 1.0]).repeat(2, 1).unsqueeze(-1)
    got = quantize_deadzone_fast(x, step, dz, mags)
    want = quantize_deadzone(x, step, dz, mags)
    assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))


class Twice(nn.Module):
    """One Linear applied twice (weight sharing): its rows sum both calls' gradients."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.a(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("probe", ["norm", "random"])
def test_rows_of_a_layer_called_twice_sum_both_calls(probe):
    model = seeded(Twice)
    x = torch.randn(5, 4)
    m = 1 if probe == "norm" else 2
    sweep = GradientSweep(
        model, x, ["a"], "weight", HessianSettings(probe=probe, nprobes=m), batch_size=2
    )
    sweep.ensure("a")
    for n in range(5):
        y = model(x[n : n + 1])
        if probe == "norm":
            (g,) = torch.autograd.grad(y.norm(), [model.a.weight])
            torch.testing.assert_close(sweep.rows["a"][n], g, rtol=1e-10, atol=1e-12)
        else:
            # Each row is the gradient of z·F for some z in {±1}²: match one of the four.
            grads = [
                torch.autograd.grad(
                    (torch.tensor(z) * y).sum(), [model.a.weight], retain_graph=True
                )[0]
                for z in ([1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0])
            ]
            for j in range(m):
                row = sweep.rows["a"][n * m + j]
                assert any(torch.allclose(row, g, rtol=1e-10, atol=1e-12) for g in grads)


def test_activation_kappa_term_does_not_grow_with_the_calibration_size():
    # The calibration set twice over is the same data distribution: every per-sample mean, and
    # so every term of δ̂ (κ/2·‖Δ‖² included), must come out as from the set once.
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    x = torch.randn(8, 5)
    bounds = group_bounds(6, 3)
    stats = ActGroupStats(
        np.zeros(2), np.array([True, True]), 6, np.full(2, -np.inf), np.full(2, np.inf)
    )
    cands = [Candidate(g, b, s, 0.0) for g in (0, 1) for b in (0, 2, 4) for s in (-3.0, -1.0)]
    dist, single = {}, {}
    for copies in (1, 2):
        xs = torch.cat([x] * copies)
        for kappa in (0.0, 0.5):
            sweep = GradientSweep(
                model,
                xs,
                ["1"],
                "act",
                HessianSettings(probe="norm", kappa=kappa),
                mode="out",
                batch_size=4,
            )
            be = HessianActBackend(sweep, "1", bounds, stats)
            dist[copies, kappa] = be(cands)[0]
            delta = torch.full((xs.shape[0], 3, 1), 0.1)  # 0.1 on every element of group 0
            single[copies, kappa] = be.dist_of(0, delta)[0]
    np.testing.assert_allclose(dist[2, 0.5], dist[1, 0.5], rtol=1e-10)
    # The κ term alone is κ/2 times the per-sample mean of ‖Δa_n‖² (= 3·0.1² here).
    for copies in (1, 2):
        assert single[copies, 0.5] - single[copies, 0.0] == pytest.approx(0.25 * 0.03, rel=1e-9)


def test_paper_preset_sets_the_papers_probe_and_kappa():
    from rdoq.hessian import PAPER_KAPPA

    s = HessianSettings.from_flags("paper", None, None)
    assert (s.probe, s.kappa, s.preset, s.first_order) == ("norm", PAPER_KAPPA, "paper", False)
    assert PAPER_KAPPA == 1e-7 and s.params()["preset"] == "paper"
    # Explicit values that agree with the preset are accepted; others are refused, naming both.
    assert HessianSettings.from_flags("paper", "norm", 1e-7) == s
    for probe, kappa, named in (("random", None, "--probe random"), (None, 0.0, "--kappa 0.0")):
        with pytest.raises(ValueError, match=f"--paper-hessian sets .*contradicts {named}"):
            HessianSettings.from_flags("paper", probe, kappa)
    # Without a preset: the defaults, or the flags as given.
    assert HessianSettings.from_flags(None, None, None) == HessianSettings()
    assert HessianSettings.from_flags(None, "norm", 1e-7).preset is None
    with pytest.raises(ValueError, match="preset 'paper' needs probe 'norm'"):
        HessianSettings(preset="paper")


def test_paper_preset_lands_in_meta_and_is_not_resumed_without_it(tmp_path, capsys):
    import json

    from rdoq.cli_curves import curves_main

    argv = [
        "--archname",
        "digits_cnn",
        "--testsize",
        "4",
        "--nchannelbatch",
        "16",
        "--maxrates",
        "3",
        "--maxdeadzones",
        "1",
        "--outdir",
        str(tmp_path),
        "--quiet",
    ]
    curves_main("weight", None, [*argv, "--paper-hessian"], estimator="hessian")
    (meta_path,) = tmp_path.glob("*/meta.json")
    params = json.loads(meta_path.read_text())["estimator_params"]
    assert (params["preset"], params["probe"], params["kappa"]) == ("paper", "norm", 1e-7)
    # The same directory without the preset, and with the paper's values given by hand: both
    # are other settings, refused on resume.
    for other in ([], ["--probe", "norm", "--kappa", "1e-7"]):
        with pytest.raises(SystemExit):
            curves_main("weight", None, [*argv, *other], estimator="hessian")
        assert "estimator_params" in capsys.readouterr().err
    # A contradicting flag is refused before any work.
    with pytest.raises(SystemExit):
        curves_main(
            "weight", None, [*argv, "--paper-hessian", "--probe", "random"], estimator="hessian"
        )
    assert "contradicts --probe random" in capsys.readouterr().err
