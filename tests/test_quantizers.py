"""Contract tests of the quantizers (DESIGN §4): zeros at 0 bits, level counts, idempotence,
symmetry, error bounds, dead-zone thresholds, level bounds and the step grid."""

import math

import pytest
import torch

from rdoq.quantizers import (
    deadzone_magnitudes,
    deadzone_threshold,
    grid_floor,
    quantize_deadzone,
    quantize_uniform,
    quantize_weight,
    signed_bounds,
    unsigned_bounds,
)

SEEDS = (0, 1, 2)
SHAPES = ((257,), (8, 33), (4, 3, 5, 5))
STEPS = (2.0**-5, 2.0**-3, 0.3, 1.0)


def _samples():
    """Random tensors of several seeds, shapes and scales (incl. heavy tails)."""
    for seed in SEEDS:
        torch.manual_seed(seed)
        for shape in SHAPES:
            yield torch.randn(shape, dtype=torch.float64) * 0.5
            yield torch.distributions.StudentT(2.0).sample(shape).double() * 0.1


def _n_levels(t):
    return torch.unique(t).numel()


# ---------------------------------------------------------------------------------------------
# bounds


def test_signed_bounds_values():
    assert signed_bounds(0) == (0, 0)
    assert signed_bounds(1) == (-1, 0)
    assert signed_bounds(3) == (-4, 3)
    assert signed_bounds(8) == (-128, 127)
    for b in range(1, 9):
        lo, hi = signed_bounds(b)
        assert hi - lo + 1 == 2**b


def test_unsigned_bounds_values():
    assert unsigned_bounds(0) == (0, 0)
    assert unsigned_bounds(1) == (0, 1)
    assert unsigned_bounds(3) == (0, 7)
    assert unsigned_bounds(8) == (0, 255)


def test_deadzone_magnitudes_fit_in_bits():
    assert deadzone_magnitudes(0) == 0
    assert deadzone_magnitudes(1) == 0
    assert deadzone_magnitudes(2) == 1
    assert deadzone_magnitudes(3) == 3
    for b in range(0, 9):
        m = deadzone_magnitudes(b)
        assert 2 * m + 1 <= max(2**b, 1)
        # as many as fit: one more magnitude per sign would not fit
        if b >= 1:
            assert 2 * (m + 1) + 1 > 2**b


@pytest.mark.parametrize("fn", [signed_bounds, unsigned_bounds, deadzone_magnitudes])
def test_negative_bits_rejected(fn):
    with pytest.raises(ValueError, match="-1"):
        fn(-1)


# ---------------------------------------------------------------------------------------------
# zero bits


def test_zero_bits_give_zeros():
    for x in _samples():
        for step in STEPS:
            lo, hi = signed_bounds(0)
            assert torch.count_nonzero(quantize_uniform(x, step, lo, hi)) == 0
            dz_out = quantize_deadzone(x, step, 0.05, deadzone_magnitudes(0))
            assert torch.count_nonzero(dz_out) == 0
            for dz in (0.0, 0.05):
                out = quantize_weight(x, 0, math.log2(step), dz)
                assert out.shape == x.shape
                assert torch.count_nonzero(out) == 0


def test_one_bit_deadzone_is_all_zero():
    # M = 0 for b = 1: the dead-zone quantizer has only the zero level
    for x in _samples():
        assert torch.count_nonzero(quantize_weight(x, 1, -3.0, 0.01)) == 0


# ---------------------------------------------------------------------------------------------
# level counts


@pytest.mark.parametrize("bits", range(1, 9))
def test_uniform_levels_fit_in_bits(bits):
    lo, hi = signed_bounds(bits)
    for x in _samples():
        for step in STEPS:
            q = quantize_uniform(x, step, lo, hi)
            assert _n_levels(q) <= 2**bits
            ints = torch.round(q / step)
            torch.testing.assert_close(ints * step, q, rtol=0, atol=1e-12)
            assert ints.min() >= lo and ints.max() <= hi


def test_uniform_levels_reach_2_pow_b():
    # a step small enough for the range: all 2^b levels are used (the bound is tight)
    x = torch.linspace(-1.0, 1.0, 10001, dtype=torch.float64)
    for bits in range(1, 9):
        lo, hi = signed_bounds(bits)
        assert _n_levels(quantize_uniform(x, 2.0 / 2**bits, lo, hi)) == 2**bits


@pytest.mark.parametrize("bits", range(1, 9))
def test_deadzone_levels_fit_in_bits(bits):
    m = deadzone_magnitudes(bits)
    for x in _samples():
        phi = deadzone_threshold(x, 0.3)
        for step in STEPS:
            q = quantize_deadzone(x, step, phi, m)
            assert _n_levels(q) <= 2 * m + 1 <= 2**bits
            qw = quantize_weight(x, bits, math.log2(step), phi)
            assert _n_levels(qw) <= 2**bits


def test_deadzone_levels_reach_2m_plus_1():
    x = torch.linspace(-1.0, 1.0, 10001, dtype=torch.float64)
    for bits in range(2, 9):
        m = deadzone_magnitudes(bits)
        q = quantize_deadzone(x, 0.9 / m, 0.1, m)
        assert _n_levels(q) == 2 * m + 1


# ---------------------------------------------------------------------------------------------
# idempotence and symmetry


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_uniform_idempotent(bits):
    lo, hi = signed_bounds(bits)
    for x in _samples():
        for step in STEPS:
            q = quantize_uniform(x, step, lo, hi)
            assert torch.equal(quantize_uniform(q, step, lo, hi), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_deadzone_idempotent(bits):
    m = deadzone_magnitudes(bits)
    for x in _samples():
        for ratio in (0.0, 0.2, 0.6):
            phi = deadzone_threshold(x, ratio)
            for step in STEPS:
                q = quantize_deadzone(x, step, phi, m)
                torch.testing.assert_close(
                    quantize_deadzone(q, step, phi, m), q, rtol=0, atol=1e-12
                )


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_quantize_weight_idempotent(bits):
    for x in _samples():
        for dz_ratio in (0.0, 0.3):
            phi = deadzone_threshold(x, dz_ratio)
            q = quantize_weight(x, bits, -4.0, phi)
            torch.testing.assert_close(quantize_weight(q, bits, -4.0, phi), q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_deadzone_is_odd(bits):
    m = deadzone_magnitudes(bits)
    for x in _samples():
        phi = deadzone_threshold(x, 0.25)
        for step in STEPS:
            neg = quantize_deadzone(-x, step, phi, m)
            assert torch.equal(neg, -quantize_deadzone(x, step, phi, m))


# ---------------------------------------------------------------------------------------------
# error bounds


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_uniform_error_within_half_step_inside_range(bits):
    lo, hi = signed_bounds(bits)
    for x in _samples():
        for step in STEPS:
            inside = (x >= lo * step) & (x <= hi * step)
            err = (quantize_uniform(x, step, lo, hi) - x).abs()[inside]
            assert err.numel() == 0 or err.max() <= step / 2 * (1 + 1e-12)


def test_uniform_clamps_outside_range():
    lo, hi = signed_bounds(3)
    x = torch.tensor([-100.0, -4.6, 3.6, 100.0], dtype=torch.float64)
    assert quantize_uniform(x, 1.0, lo, hi).tolist() == [-4.0, -4.0, 3.0, 3.0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_deadzone_error_within_half_step_beyond_threshold(bits):
    m = deadzone_magnitudes(bits)
    for x in _samples():
        for ratio in (0.0, 0.1, 0.5):
            phi = deadzone_threshold(x, ratio)
            for step in STEPS:
                q = quantize_deadzone(x, step, phi, m)
                mag = x.abs()
                assert torch.count_nonzero(q[mag <= phi]) == 0
                inside = (mag > phi) & (mag <= phi + m * step)
                err = (q - x).abs()[inside]
                assert err.numel() == 0 or err.max() <= step / 2 * (1 + 1e-9)
                # nothing is reconstructed beyond the last cell
                assert q.abs().max() <= phi + (m - 0.5) * step * (1 + 1e-12)


def test_deadzone_uses_floor_cells_not_round():
    # phi = 1, step = 1, M = 3: (1, 2] -> 1.5, (2, 3] -> 2.5, (3, inf) -> 3.5
    x = torch.tensor([0.5, 1.0, 1.1, 1.9, 2.2, 2.9, 3.4, 9.0], dtype=torch.float64)
    q = quantize_deadzone(x, 1.0, 1.0, deadzone_magnitudes(3))
    assert q.tolist() == [0.0, 0.0, 1.5, 1.5, 2.5, 2.5, 3.5, 3.5]
    assert quantize_deadzone(-x, 1.0, 1.0, 3).tolist() == [-v for v in q.tolist()]


def test_quantize_weight_picks_rule_by_deadzone():
    torch.manual_seed(0)
    x = torch.randn(100, dtype=torch.float64)
    lo, hi = signed_bounds(4)
    assert torch.equal(quantize_weight(x, 4, -2.0, 0.0), quantize_uniform(x, 0.25, lo, hi))
    assert torch.equal(
        quantize_weight(x, 4, -2.0, 0.3), quantize_deadzone(x, 0.25, 0.3, deadzone_magnitudes(4))
    )


# ---------------------------------------------------------------------------------------------
# dead-zone threshold


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.3333, 0.5, 0.9, 0.999])
def test_deadzone_threshold_zeroes_ratio(ratio):
    for x in _samples():
        phi = deadzone_threshold(x, ratio)
        frac = (x.abs() <= phi).double().mean().item()
        assert ratio - 1e-12 <= frac <= ratio + 1.0 / x.numel() + 1e-12
        q = quantize_deadzone(x, 0.01, phi, deadzone_magnitudes(4))
        assert (q == 0).double().mean().item() == pytest.approx(frac)


def test_deadzone_threshold_zero_ratio():
    torch.manual_seed(0)
    assert deadzone_threshold(torch.randn(50), 0.0) == 0.0


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_deadzone_threshold_invalid_ratio(ratio):
    with pytest.raises(ValueError):
        deadzone_threshold(torch.ones(10), ratio)


# ---------------------------------------------------------------------------------------------
# broadcasting


def test_uniform_per_row_steps_equal_row_loop():
    for seed in SEEDS:
        torch.manual_seed(seed)
        x = torch.randn(6, 5, 7, dtype=torch.float64)  # (C, ...)
        steps = 2.0 ** torch.randint(-6, 0, (6,)).double()
        bits = torch.randint(0, 6, (6,))
        lo = torch.tensor([signed_bounds(int(b))[0] for b in bits], dtype=torch.float64)
        hi = torch.tensor([signed_bounds(int(b))[1] for b in bits], dtype=torch.float64)
        out = quantize_uniform(x, steps.view(-1, 1, 1), lo.view(-1, 1, 1), hi.view(-1, 1, 1))
        for c in range(6):
            row = quantize_uniform(x[c], float(steps[c]), int(lo[c]), int(hi[c]))
            assert torch.equal(out[c], row)


def test_deadzone_per_row_tensors_equal_row_loop():
    torch.manual_seed(3)
    x = torch.randn(4, 50, dtype=torch.float64)
    steps = torch.tensor([0.05, 0.1, 0.2, 0.4], dtype=torch.float64).view(-1, 1)
    phis = torch.tensor([0.0, 0.1, 0.3, 0.5], dtype=torch.float64).view(-1, 1)
    mags = torch.tensor([0, 1, 3, 7], dtype=torch.float64).view(-1, 1)
    out = quantize_deadzone(x, steps, phis, mags)
    for c in range(4):
        row = quantize_deadzone(x[c], float(steps[c]), float(phis[c]), int(mags[c]))
        assert torch.equal(out[c], row)


# ---------------------------------------------------------------------------------------------
# step grid


def test_grid_floor_examples():
    assert grid_floor(2.0, 1) == 2.0
    assert grid_floor(2.7, 1) == 2.0
    assert grid_floor(-1.3, 1) == -2.0
    assert grid_floor(0.26, 4) == 0.25
    assert grid_floor(-1.3, 4) == -1.5
    assert grid_floor(-0.25, 4) == -0.25


def test_grid_floor_properties():
    torch.manual_seed(0)
    for value in (torch.rand(200, dtype=torch.float64) * 40 - 20).tolist():
        for grid in (1, 2, 4, 8):
            g = grid_floor(value, grid)
            assert g <= value < g + 1.0 / grid
            assert (g * grid) == round(g * grid)
