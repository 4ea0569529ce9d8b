"""Property-based tests of the quantizers (DESIGN §4) with hypothesis: idempotence, level counts,
error bounds, the dead zone, symmetry and the in-place forms against the reference ones.

Inputs are drawn in units of the step (ties at half steps included) over a little more than the
quantizer's range, so that rounding, clipping and the dead zone are all exercised. Steps, dead
zones and values stay within a few decades of each other: the properties are about the
quantizer, not about float64 running out of mantissa when φ/Δ reaches 2^52.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rdoq.quantizers import (
    channel_deadzones,
    deadzone_magnitudes,
    deadzone_threshold,
    quantize_deadzone,
    quantize_deadzone_fast,
    quantize_uniform,
    quantize_uniform_fast,
    quantize_weight_steps,
    signed_bounds,
    unsigned_bounds,
)

# Reproducible in CI (no example database, a fixed seed) and a fraction of a second per test.
PROPERTY = settings(max_examples=100, deadline=None, derandomize=True, database=None)

DTYPES = st.sampled_from([torch.float32, torch.float64])
BITS = st.integers(min_value=0, max_value=8)
# Steps from 2^-12 to 16, arbitrary mantissas (not only powers of two).
STEPS = st.floats(min_value=2.0**-12, max_value=16.0, allow_nan=False, allow_infinity=False)


def _exact(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype``, so that a Python scalar and a tensor hold the same number."""
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


def _units(reach: float, max_size: int = 48) -> st.SearchStrategy[list[float]]:
    """Values in units of the step within ``±reach``: arbitrary floats, integers and half-integer
    ties (the rounding edge cases), and exact zeros of both signs."""
    k = int(math.ceil(2 * reach))
    unit = st.one_of(
        st.floats(min_value=-reach, max_value=reach, allow_nan=False, allow_infinity=False),
        st.integers(min_value=-k, max_value=k).map(lambda h: h / 2),
        st.sampled_from([0.0, -0.0]),
    )
    return st.lists(unit, min_size=1, max_size=max_size)


@st.composite
def uniform_cases(draw, signed: bool | None = None):
    """``(x (n,), step, qmin, qmax, bits)`` for the signed or unsigned uniform quantizer."""
    dtype = draw(DTYPES)
    bits = draw(BITS)
    signed = draw(st.booleans()) if signed is None else signed
    qmin, qmax = signed_bounds(bits) if signed else unsigned_bounds(bits)
    step = _exact(draw(STEPS), dtype)
    units = draw(_units(max(abs(qmin), qmax, 1) + 2.0))
    x = (torch.tensor(units, dtype=torch.float64) * step).to(dtype)  # (n,)
    return x, step, qmin, qmax, bits


@st.composite
def deadzone_cases(draw):
    """``(x (n,), step, φ, M, bits)`` for the dead-zone quantizer; φ from 0 to 40 steps."""
    dtype = draw(DTYPES)
    bits = draw(BITS)
    mags = deadzone_magnitudes(bits)
    step = _exact(draw(STEPS), dtype)
    phi = _exact(draw(st.floats(min_value=0.0, max_value=40.0)) * step, dtype)
    units = draw(_units(phi / step + mags + 2.0))
    x = (torch.tensor(units, dtype=torch.float64) * step).to(dtype)  # (n,)
    return x, step, phi, mags, bits


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values and equal signs of zero."""
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


def _tol(x: torch.Tensor, step: float) -> torch.Tensor:
    """Round-off allowance of one divide, one round and one multiply in ``x``'s dtype."""
    return 4 * torch.finfo(x.dtype).eps * (x.double().abs() + step)


# ---------------------------------------------------------------------------------------------
# uniform quantizer


@PROPERTY
@given(uniform_cases())
def test_uniform_is_idempotent(case):
    x, step, qmin, qmax, _ = case
    q = quantize_uniform(x, step, qmin, qmax)
    assert _same_bits(quantize_uniform(q, step, qmin, qmax), q)


@PROPERTY
@given(uniform_cases())
def test_uniform_levels_are_integer_steps_within_the_bounds(case):
    x, step, qmin, qmax, bits = case
    q = quantize_uniform(x, step, qmin, qmax)
    assert torch.unique(q).numel() <= 2**bits
    k = torch.round(q.double() / step)
    assert bool(((k >= qmin) & (k <= qmax)).all())
    assert torch.equal((k.to(x.dtype) * step), q)


@PROPERTY
@given(uniform_cases())
def test_uniform_error_is_at_most_half_a_step_inside_the_range(case):
    x, step, qmin, qmax, _ = case
    q = quantize_uniform(x, step, qmin, qmax)
    err = (x.double() - q.double()).abs()
    xd = x.double()
    inside = (xd >= qmin * step) & (xd <= qmax * step)
    assert bool((err[inside] <= step / 2 + _tol(x, step)[inside]).all())
    # Outside the range the quantizer saturates at the nearest end level.
    assert bool((q[xd > qmax * step] == _exact(qmax * step, x.dtype)).all())
    assert bool((q[xd < qmin * step] == _exact(qmin * step, x.dtype)).all())


@PROPERTY
@given(uniform_cases(signed=True))
def test_uniform_is_odd_on_the_symmetric_grid(case):
    x, step, _, qmax, _ = case
    # round() breaks ties to even, so with qmin = -qmax the quantizer is exactly odd.
    q = quantize_uniform(x, step, -qmax, qmax)
    assert torch.equal(quantize_uniform(-x, step, -qmax, qmax), -q)


@PROPERTY
@given(uniform_cases(), STEPS)
def test_uniform_at_zero_bits_is_zero_whatever_the_step(case, other_step):
    x, *_ = case
    assert bool((quantize_uniform(x, other_step, 0, 0) == 0).all())
    assert bool((quantize_weight_steps(x, 0, other_step, 0.0) == 0).all())


# ---------------------------------------------------------------------------------------------
# dead-zone quantizer


@PROPERTY
@given(deadzone_cases())
def test_deadzone_is_idempotent(case):
    x, step, phi, mags, _ = case
    q = quantize_deadzone(x, step, phi, mags)
    assert _same_bits(quantize_deadzone(q, step, phi, mags), q)


@PROPERTY
@given(deadzone_cases())
def test_deadzone_levels_are_zero_and_2m_cell_midpoints(case):
    x, step, phi, mags, bits = case
    q = quantize_deadzone(x, step, phi, mags)
    # {0} ∪ {±(φ + (q+½)Δ) : q < M}: 2M + 1 levels, which fit in b bits (one code unused).
    assert torch.unique(q).numel() <= 2 * mags + 1 <= max(2**bits - 1, 1)
    nz = q[q != 0].double()
    cell = (nz.abs() - phi) / step - 0.5
    assert bool(((cell - cell.round()).abs() <= 1e-4).all())
    assert bool(((cell.round() >= 0) & (cell.round() <= mags - 1)).all())


@PROPERTY
@given(deadzone_cases())
def test_deadzone_error_bounds(case):
    x, step, phi, mags, _ = case
    q = quantize_deadzone(x, step, phi, mags)
    mag = x.double().abs()
    err = (x.double() - q.double()).abs()
    dead = mag <= phi
    # In the dead zone the value itself is the error (≤ φ); in the M cells above it, the
    # reconstruction is the cell's midpoint, at most Δ/2 away.
    assert bool((err[dead] == mag[dead]).all())
    assert bool((err[dead] <= phi).all())
    if mags > 0:
        live = ~dead & (mag <= phi + mags * step)
        assert bool((err[live] <= step / 2 + _tol(x, step + phi)[live]).all())


@PROPERTY
@given(deadzone_cases())
def test_deadzone_maps_exactly_the_dead_zone_to_zero_and_keeps_signs(case):
    x, step, phi, mags, _ = case
    q = quantize_deadzone(x, step, phi, mags)
    dead = x.abs() <= phi
    assert bool((q[dead] == 0).all())
    if mags > 0:
        # Outside the dead zone: the sign of x, and at least the first level φ + Δ/2.
        assert bool((torch.sign(q[~dead]) == torch.sign(x[~dead])).all())
        assert bool((q[~dead].abs() >= _exact(phi + step / 2, x.dtype) * (1 - 1e-6)).all())
    else:
        assert bool((q == 0).all())


@PROPERTY
@given(deadzone_cases())
def test_deadzone_is_odd(case):
    x, step, phi, mags, _ = case
    q = quantize_deadzone(x, step, phi, mags)
    assert torch.equal(quantize_deadzone(-x, step, phi, mags), -q)


@PROPERTY
@given(deadzone_cases(), st.floats(min_value=0.0, max_value=0.99))
def test_deadzone_ratio_puts_that_fraction_in_the_dead_zone(case, ratio):
    x, step, _, mags, _ = case
    phi = deadzone_threshold(x, ratio)
    q = quantize_deadzone(x, step, phi, mags)
    n = x.numel()
    # φ is the ceil(ratio·n)-th smallest |x|: at least that many values map to zero, and every
    # value that maps to a non-zero level lies beyond φ.
    assert int((q == 0).sum()) >= (math.ceil(ratio * n) if ratio > 0 else 0)
    assert bool((x[q != 0].abs() > phi).all())


@PROPERTY
@given(
    st.lists(deadzone_cases(), min_size=1, max_size=4), st.floats(min_value=0.01, max_value=0.99)
)
def test_channel_deadzones_put_the_ratio_of_each_channel_in_its_dead_zone(cases, ratio):
    n = min(c[0].numel() for c in cases)
    w = torch.stack([c[0][:n].double() for c in cases])  # (C, n)
    phi = channel_deadzones(w, ratio)  # (C,)
    assert bool((phi > 0).all())
    k = math.ceil(ratio * n)
    for c in range(w.shape[0]):
        mag = w[c].abs()  # (n,)
        quantile = torch.kthvalue(mag, k).values
        # The ratio's quantile and nothing above it; when that quantile is an exact zero, the
        # zeros alone (φ sits below the smallest non-zero magnitude).
        want = mag <= quantile if quantile > 0 else mag == 0
        assert torch.equal(mag <= phi[c], want)
        assert int(want.sum()) >= k


# ---------------------------------------------------------------------------------------------
# in-place forms against the reference ones


@st.composite
def candidate_grids(draw, deadzone: bool):
    """``(x (1, n), params (k, 1)…)``: k candidates broadcast against one group's values, as the
    engine and the second-order backends call the in-place forms."""
    dtype = draw(DTYPES)
    k = draw(st.integers(min_value=1, max_value=4))
    bits = draw(st.lists(BITS, min_size=k, max_size=k))
    steps = [_exact(s, dtype) for s in draw(st.lists(STEPS, min_size=k, max_size=k))]
    base = steps[0]
    units = draw(_units(2.0 ** (max(bits) - 1) + 2.0 if max(bits) else 2.0))
    x = (torch.tensor(units, dtype=torch.float64) * base).to(dtype)[None]  # (1, n)

    def col(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype)[:, None]  # (k, 1)

    if not deadzone:
        signed = draw(st.lists(st.booleans(), min_size=k, max_size=k))
        b = [
            signed_bounds(q) if s else unsigned_bounds(q) for q, s in zip(bits, signed, strict=True)
        ]
        return x, col(steps), col([lo for lo, _ in b]), col([hi for _, hi in b])
    phis = draw(st.lists(st.floats(min_value=0.0, max_value=8.0), min_size=k, max_size=k))
    return (
        x,
        col(steps),
        col([p * base for p in phis]),
        col([float(deadzone_magnitudes(q)) for q in bits]),
    )


@PROPERTY
@given(candidate_grids(deadzone=False))
def test_fast_uniform_is_bitwise_the_reference(case):
    x, step, lo, hi = case
    before = x.clone()
    got = quantize_uniform_fast(x, step, lo, hi)  # (k, n)
    want = quantize_uniform(x, step, lo, hi)  # (k, n)
    assert torch.equal(got, want)
    # The sign of zero too, except where qmin == 0: see the xfail test below.
    signed = (lo < 0).expand_as(got)
    assert torch.equal(torch.signbit(got)[signed], torch.signbit(want)[signed])
    assert _same_bits(x, before)  # the input is not overwritten


@pytest.mark.xfail(
    strict=False,
    reason=(
        "quantize_uniform_fast's vectorised clamp_min_ turns -0 into +0 when qmin == 0 "
        "(unsigned grid, 0 bits); torch.clamp in quantize_uniform, and the scalar tail, keep -0. "
        "Same values, different sign of zero. Found by test_fast_uniform_is_bitwise_the_reference: "
        "x = 15 × 0.0 then -0.0 (float32), step 1, qmin = qmax = 0."
    ),
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_uniform_keeps_the_sign_of_zero_on_the_unsigned_grid(dtype):
    x = torch.full((1, 64), -0.0, dtype=dtype)  # (1, n): more than one SIMD vector
    step, lo, hi = (torch.tensor([[v]], dtype=dtype) for v in (1.0, 0.0, 7.0))  # (1, 1)
    assert _same_bits(quantize_uniform_fast(x, step, lo, hi), quantize_uniform(x, step, lo, hi))


@PROPERTY
@given(candidate_grids(deadzone=True))
def test_fast_deadzone_is_bitwise_the_reference(case):
    x, step, phi, mags = case
    before = x.clone()
    got = quantize_deadzone_fast(x, step, phi, mags)
    assert _same_bits(got, quantize_deadzone(x, step, phi, mags))
    assert _same_bits(x, before)  # the input is not overwritten
