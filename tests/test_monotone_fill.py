"""Monotone curve fit and budget fill (rdoq.solvers.monotone_fit / fill_budget) and their use by
the allocation: estimation noise that makes a wider width look worse must not cost bits the user
asked for."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from rdoq.allocation import (
    ACT,
    WEIGHT,
    ItemTable,
    LayerEntry,
    monotone_items,
    restrict,
    solve_recorded,
)
from rdoq.solvers import choice_totals, fill_budget, monotone_fit, solve_dp


def test_monotone_fit_is_the_least_squares_non_increasing_fit():
    rng = np.random.default_rng(0)
    dist = rng.exponential(1.0, size=(200, 9))  # (I, K) noisy, often rising
    rate = np.arange(9.0)[None] * rng.uniform(10, 100, size=(200, 1))  # (I, K)
    out = monotone_fit(dist, rate)
    assert (np.diff(out, axis=1) <= 1e-12).all()
    for i in range(0, 200, 17):
        ref = IsotonicRegression(increasing=False).fit_transform(np.arange(9), dist[i])
        np.testing.assert_allclose(out[i], ref, rtol=1e-12, atol=1e-15)


def test_monotone_fit_keeps_good_rows_and_skips_disallowed_columns():
    dist = np.array(
        [
            [4.0, 2.0, 1.0, 0.5],  # already non-increasing: unchanged
            [4.0, np.inf, 1.0, 2.0],  # 1 -> 2 rises across an inf column
            [4.0, 1.0, 2.0, 0.5],
        ]
    )
    rate = np.arange(4.0)[None].repeat(3, 0) * 8
    out = monotone_fit(dist, rate)
    np.testing.assert_array_equal(out[0], dist[0])
    np.testing.assert_array_equal(out[1], [4.0, np.inf, 1.5, 1.5])
    np.testing.assert_array_equal(out[2], [4.0, 1.5, 1.5, 0.5])


def test_fill_spends_leftover_budget_without_raising_distortion():
    rng = np.random.default_rng(1)
    for _ in range(50):
        n, k = int(rng.integers(2, 7)), int(rng.integers(2, 6))
        rate = np.arange(k, dtype=float)[None] * rng.integers(1, 20, size=(n, 1))  # (I, K)
        dist = np.sort(rng.exponential(1.0, size=(n, k)), axis=1)[:, ::-1].copy()
        # Ties between widths (what monotone_fit makes of a rising run) are what fill resolves.
        tie = rng.random((n, k)) < 0.3
        tie[:, 0] = False
        dist = np.where(tie, np.roll(dist, 1, axis=1), dist)
        dist = monotone_fit(dist, rate)
        budget = float(rng.uniform(rate[:, 0].sum(), rate[:, -1].sum()))
        c0 = solve_dp(dist, rate, budget)
        c1 = fill_budget(dist, rate, c0, budget)
        r0, d0 = choice_totals(dist, rate, c0)
        r1, d1 = choice_totals(dist, rate, c1)
        assert r1 <= budget and d1 <= d0 + 1e-12 and r1 >= r0
        # No single move that raises no distortion still fits.
        idx = np.arange(n)
        left = budget - r1
        extra = rate - rate[idx, c1][:, None]
        assert not ((extra > 0) & (extra <= left) & (dist <= dist[idx, c1][:, None])).any()


def test_fill_refuses_a_choice_over_budget():
    with pytest.raises(ValueError, match="over the budget"):
        fill_budget(np.ones((1, 2)), np.array([[0.0, 8.0]]), np.array([1]), 4.0)


def _table(dist: np.ndarray, numel: float = 10.0) -> ItemTable:
    n, k = dist.shape
    return ItemTable(
        dist=dist,
        rate=np.arange(k, dtype=float)[None].repeat(n, 0) * numel,
        numel=np.full(n, numel),
        kind=np.full(n, WEIGHT),
        layer=np.zeros(n, int),
        step_log2=np.zeros((n, k)),
        deadzone=np.zeros((n, k)),
        source=np.arange(k)[None].repeat(n, 0),
        dz_index=np.zeros((n, k), int),
        bits=np.arange(k),
        layers=[LayerEntry(WEIGHT, "x", "Linear", (n, 10), n, 1, slice(0, n))],
        model="m",
        curve_sets={},
        act_mode=None,
    )


def test_top_target_gets_the_top_width_when_an_estimate_rises():
    # Item 1's estimate rises from 2 to 3 bits (noise: a finer grid is not worse in expectation).
    # Asked for 3 bits on average, the old allocation gave it 2 bits and left 10 bits unspent.
    dist = np.array([[8.0, 4.0, 2.0, 1.0], [8.0, 4.0, 0.9, 1.0]])
    t = _table(dist)
    raw = solve_recorded(t, [3.0], "dp").choices[0]
    assert raw.tolist() == [3, 2]  # the behaviour this fixes (the paper's raw curves)
    fixed = solve_recorded(restrict(t, monotone=True), [3.0], "dp", fill=True)
    assert fixed.choices[0].tolist() == [3, 3]
    assert fixed.records[0]["fill_bits"] == pytest.approx(10.0)
    assert fixed.records[0]["rate_bits"] == pytest.approx(60.0)


def test_fill_keeps_layerwise_allocations_whole():
    dist = np.array([[8.0, 4.0, 2.0, 1.0], [8.0, 4.0, 2.0, 1.5], [8.0, 4.0, 2.0, 1.0]])
    t = _table(dist)
    t.layer[:] = [0, 0, 1]
    t.layers = [
        LayerEntry(WEIGHT, "a", "Linear", (2, 10), 2, 1, slice(0, 2)),
        LayerEntry(WEIGHT, "b", "Linear", (1, 10), 1, 1, slice(2, 3)),
    ]
    # Budget 2.5 bits: the DP picks widths per layer; the fill may only move whole layers.
    c = solve_recorded(t, [2.5], "dp", layerwise=True, fill=True).choices[0]
    assert c[0] == c[1]


def test_monotone_modes_choose_the_items():
    dist = np.array([[8.0, 4.0, 0.9, 1.0], [8.0, 4.0, 0.9, 1.0]])
    t = _table(dist)
    t.kind[1] = ACT
    assert monotone_items(t, "on", False).tolist() == [True, True]
    assert monotone_items(t, "off", True).tolist() == [False, False]
    # auto: weight curves measured after -bcw only; activation curves never.
    assert monotone_items(t, "auto", True).tolist() == [True, False]
    assert monotone_items(t, "auto", False).tolist() == [False, False]
    with pytest.raises(ValueError, match="--monotone"):
        monotone_items(t, "yes", True)
    r = restrict(t, monotone=monotone_items(t, "auto", True))
    np.testing.assert_array_equal(r.dist[0], [8.0, 4.0, 0.95, 0.95])
    np.testing.assert_array_equal(r.dist[1], dist[1])
