"""Bit-allocation solvers against brute force and the exact ILP (DESIGN §8)."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest

from rdoq.solvers import (
    choice_totals,
    constrain,
    dp_resolution,
    expand_layers,
    lagrangian_frontier,
    merge_layers,
    solve_dp,
    solve_dp_multi,
    solve_ilp,
    solve_lagrangian,
    solve_separate,
)

SOLVERS = {"dp": solve_dp, "lagrangian": solve_lagrangian, "ilp": solve_ilp}


def all_choices(dist: np.ndarray) -> np.ndarray:
    """Every combination of allowed columns, (M, I)."""
    per_item = [np.flatnonzero(np.isfinite(row)) for row in dist]
    return np.array(list(itertools.product(*per_item)))


def brute_force(dist: np.ndarray, rate: np.ndarray, budget: float) -> float:
    """Smallest total dist with total rate <= budget (inf if none)."""
    combos = all_choices(dist)  # (M, I)
    idx = np.arange(dist.shape[0])
    tot_rate = rate[idx, combos].sum(axis=1)
    tot_dist = dist[idx, combos].sum(axis=1)
    ok = tot_rate <= budget
    return float(tot_dist[ok].min()) if ok.any() else np.inf


def random_table(
    rng: np.random.Generator, n_items: int, n_cols: int, *, integer: bool, p_inf: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """Random curves: decreasing-ish dist per item, rates bits × numel (or random integers)."""
    if integer:
        rate = rng.integers(0, 21, size=(n_items, n_cols)).astype(float)  # (I, K)
    else:
        numel = rng.uniform(50, 150, size=n_items)
        rate = np.arange(n_cols)[None, :] * numel[:, None]  # (I, K)
    dist = rng.exponential(1.0, size=(n_items, n_cols))  # (I, K)
    dist = np.sort(dist, axis=1)[:, ::-1] * rng.uniform(0.5, 1.5, size=(n_items, n_cols))
    dist[rng.random((n_items, n_cols)) < p_inf] = np.inf
    for i in range(n_items):
        if not np.isfinite(dist[i]).any():
            dist[i, rng.integers(n_cols)] = rng.exponential()
    return dist, rate


def random_budget(rng: np.random.Generator, dist: np.ndarray, rate: np.ndarray) -> float:
    lo = np.where(np.isfinite(dist), rate, np.inf).min(axis=1).sum()
    hi = np.where(np.isfinite(dist), rate, -np.inf).max(axis=1).sum()
    return float(rng.uniform(lo, hi))


def assert_valid(dist: np.ndarray, rate: np.ndarray, choice: np.ndarray, budget: float) -> None:
    assert choice.shape == (dist.shape[0],)
    assert np.all(np.isfinite(dist[np.arange(len(choice)), choice])), "chose a disallowed column"
    assert choice_totals(dist, rate, choice)[0] <= budget


# --------------------------------------------------------------------------------------------
# DP


def test_dp_equals_brute_force_on_random_small_instances() -> None:
    rng = np.random.default_rng(0)
    for _ in range(250):
        dist, rate = random_table(
            rng, int(rng.integers(2, 6)), int(rng.integers(2, 5)), integer=True
        )
        budgets = [random_budget(rng, dist, rate) for _ in range(3)]
        res = solve_dp_multi(dist, rate, budgets)
        assert res.slack == 0, "integer rates at their gcd must make the DP exact"
        for budget, choice in zip(budgets, res.choices, strict=True):
            assert_valid(dist, rate, choice, budget)
            best = brute_force(dist, rate, budget)
            assert choice_totals(dist, rate, choice)[1] == pytest.approx(best, rel=1e-12)
        single = solve_dp(dist, rate, budgets[0])
        assert choice_totals(dist, rate, single) == choice_totals(dist, rate, res.choices[0])


def test_dp_matches_ilp_within_its_resolution() -> None:
    rng = np.random.default_rng(1)
    for trial in range(8):
        dist, rate = random_table(rng, 30, 6, integer=False, p_inf=0.1)
        # Half the trials use integer rates (bits × integer numel) and an integer unit: the
        # exact-integer rounding path; the others float rates and a float unit.
        unit = 7.3 if trial % 2 else 64.0
        if not trial % 2:
            rate = np.round(rate)
        budgets = [random_budget(rng, dist, rate) for _ in range(2)]
        res = solve_dp_multi(dist, rate, budgets, resolution=unit)
        assert res.resolution == unit and res.slack > 0
        allowed = np.isfinite(dist)
        min_rate = np.where(allowed, rate, np.inf).min(axis=1)
        # The problem the DP solves exactly: rates above each item's minimum rounded up to the
        # unit, and the budget rounded down to whole units.
        units = np.ceil(np.where(allowed, rate - min_rate[:, None], 0) / res.resolution)
        rounded = min_rate[:, None] + units * res.resolution
        for budget, choice in zip(budgets, res.choices, strict=True):
            assert_valid(dist, rate, choice, budget)
            got = choice_totals(dist, rate, choice)[1]
            exact = choice_totals(dist, rate, solve_ilp(dist, rate, budget))[1]
            cells = np.floor((budget - min_rate.sum()) / res.resolution)
            on_grid = choice_totals(
                dist, rounded, solve_ilp(dist, rounded, min_rate.sum() + cells * res.resolution)
            )[1]
            assert got >= exact * (1 - 1e-9), "beat the exact optimum: the ILP or DP is wrong"
            assert got <= on_grid * (1 + 1e-9), "not optimal for its own rounded problem"
            if budget - res.slack >= min_rate.sum():
                worse = solve_ilp(dist, rate, budget - res.slack)
                assert got <= choice_totals(dist, rate, worse)[1] * (1 + 1e-9)


def test_dp_default_resolution_is_gcd_or_fits_the_cell_limit() -> None:
    rng = np.random.default_rng(2)
    dist, _ = random_table(rng, 6, 5, integer=True, p_inf=0.0)
    rate = np.arange(5)[None, :] * np.array([64, 128, 192, 64, 320, 256])[:, None]
    assert dp_resolution(dist, rate, 1000.0) == 64.0
    big = rate * 1e6 + 1.0  # gcd 1 but a huge range: the unit must coarsen
    unit = dp_resolution(dist, big, 5e8, max_cells=10_000)
    assert unit > 1
    res = solve_dp_multi(dist, big, [5e8], max_cells=10_000)
    assert res.resolution == unit and dist.shape[0] * res.cells <= 10_000
    assert_valid(dist, big, res.choices[0], 5e8)
    with pytest.raises(ValueError, match="max_cells"):
        solve_dp(dist, big, 5e8, resolution=1.0, max_cells=10_000)


def test_dp_never_exceeds_budget_at_exact_float_sums() -> None:
    rng = np.random.default_rng(3)
    for _ in range(10):
        dist, rate = random_table(rng, 12, 5, integer=False, p_inf=0.0)
        rate = rate * 1.0000001 + 0.1  # awkward floats
        pick = rng.integers(0, 5, size=12)
        budget = choice_totals(dist, rate, pick)[0]  # a budget met exactly by one combination
        for solver in (solve_dp, functools.partial(solve_dp, resolution=3.7), solve_lagrangian):
            assert_valid(dist, rate, solver(dist, rate, budget), budget)


# --------------------------------------------------------------------------------------------
# Lagrangian


def lower_hull(points: np.ndarray) -> np.ndarray:
    """Vertices (H, 2) of the decreasing lower convex hull of (rate, dist) points, by rate."""
    pts = points[np.lexsort((points[:, 1], points[:, 0]))]
    hull: list[np.ndarray] = []
    for p in pts:
        if hull and p[1] >= hull[-1][1]:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]) > 0:
                break
            hull.pop()
        hull.append(p)
    return np.array(hull)


def test_lagrangian_points_lie_on_the_lower_convex_hull() -> None:
    rng = np.random.default_rng(4)
    for _ in range(60):
        dist, rate = random_table(
            rng, int(rng.integers(2, 6)), int(rng.integers(2, 5)), integer=True
        )
        combos = all_choices(dist)
        idx = np.arange(dist.shape[0])
        points = np.stack([rate[idx, combos].sum(1), dist[idx, combos].sum(1)], axis=1)
        hull = lower_hull(points)  # (H, 2)
        for _ in range(3):
            budget = random_budget(rng, dist, rate)
            choice = solve_lagrangian(dist, rate, budget)
            assert_valid(dist, rate, choice, budget)
            r, d = choice_totals(dist, rate, choice)
            assert d == pytest.approx(np.interp(r, hull[:, 0], hull[:, 1]), rel=1e-9, abs=1e-12)
            # As far along the hull as the budget allows: no hull vertex within it is skipped.
            assert r >= hull[hull[:, 0] <= budget, 0].max()


def test_lagrangian_is_optimal_at_its_own_rate_and_prices_each_items_rate() -> None:
    # Items of very different sizes: pricing bits per element instead of per group would fail.
    rng = np.random.default_rng(5)
    for _ in range(10):
        dist, rate = random_table(rng, 25, 6, integer=False, p_inf=0.1)
        rate = rate * rng.choice([1.0, 4.0, 16.0], size=(25, 1))
        choice = solve_lagrangian(dist, rate, random_budget(rng, dist, rate))
        r, d = choice_totals(dist, rate, choice)
        assert d == pytest.approx(choice_totals(dist, rate, solve_ilp(dist, rate, r))[1], rel=1e-9)


def test_lagrangian_dist_never_rises_with_the_budget() -> None:
    rng = np.random.default_rng(6)
    dist, rate = random_table(rng, 40, 8, integer=False, p_inf=0.1)
    lo, hi = random_budget(rng, dist, rate), random_budget(rng, dist, rate)
    totals = [
        choice_totals(dist, rate, solve_lagrangian(dist, rate, b))
        for b in np.linspace(min(lo, hi), max(lo, hi) * 1.2, 60)
    ]
    rates, dists = np.array(totals).T
    assert np.all(np.diff(dists) <= 0) and np.all(np.diff(rates) >= 0)
    assert dists[-1] < dists[0]


def test_solvers_map_choices_to_original_columns() -> None:
    # Shuffle each item's columns: the chosen (rate, dist) must not change. Mapping back by a
    # sorted index (the authors' defect) would pick other columns.
    rng = np.random.default_rng(7)
    dist, rate = random_table(rng, 5, 4, integer=True)
    perm = np.argsort(rng.random(dist.shape), axis=1)
    d2, r2 = np.take_along_axis(dist, perm, 1), np.take_along_axis(rate, perm, 1)
    budget = random_budget(rng, dist, rate)
    for name, solver in SOLVERS.items():
        a, b = solver(dist, rate, budget), solver(d2, r2, budget)
        assert choice_totals(dist, rate, a) == pytest.approx(choice_totals(d2, r2, b)), name
        assert_valid(d2, r2, b, budget)


def test_frontier_is_monotone_and_minimises_the_lagrangian() -> None:
    rng = np.random.default_rng(8)
    dist, rate = random_table(rng, 20, 7, integer=False, p_inf=0.2)
    slopes = np.concatenate([[0.0], np.geomspace(1e-5, 10, 50), [np.inf]])
    choices = lagrangian_frontier(dist, rate, slopes)  # (I, S)
    assert choices.shape == (20, slopes.size)
    idx = np.arange(20)[:, None]
    chosen_rate, chosen_dist = rate[idx, choices], dist[idx, choices]  # (I, S)
    assert np.all(np.diff(chosen_rate, axis=1) <= 0)
    assert np.all(np.diff(chosen_dist, axis=1) >= 0)
    finite = slopes[1:-1]
    cost = dist[:, :, None] + rate[:, :, None] * finite[None, None, :]  # (I, K, S)
    got = chosen_dist[:, 1:-1] + chosen_rate[:, 1:-1] * finite[None, :]
    np.testing.assert_allclose(got, cost.min(axis=1), rtol=1e-12)
    min_rate = np.where(np.isfinite(dist), rate, np.inf).min(axis=1)
    np.testing.assert_array_equal(chosen_rate[:, -1], min_rate)
    with pytest.raises(ValueError, match="slopes"):
        lagrangian_frontier(dist, rate, [-1.0])


# --------------------------------------------------------------------------------------------
# Budgets and constraints


def test_joint_and_separate_budgets() -> None:
    rng = np.random.default_rng(9)
    dist_w, rate_w = random_table(rng, 4, 4, integer=True)
    dist_a, rate_a = random_table(rng, 3, 4, integer=True)
    dist, rate = np.vstack([dist_w, dist_a]), np.vstack([rate_w, rate_a])
    part = np.array([0] * 4 + [1] * 3)
    b_w, b_a = random_budget(rng, dist_w, rate_w), random_budget(rng, dist_a, rate_a)
    joint_choice = solve_dp(dist, rate, b_w + b_a)
    joint = choice_totals(dist, rate, joint_choice)[1]
    assert joint == pytest.approx(brute_force(dist, rate, b_w + b_a))
    for solver in (solve_dp, solve_ilp):
        sep = solve_separate(dist, rate, part, [b_w, b_a], solver=solver)
        assert choice_totals(dist_w, rate_w, sep[:4])[0] <= b_w
        assert choice_totals(dist_a, rate_a, sep[4:])[0] <= b_a
        sep_dist = choice_totals(dist, rate, sep)[1]
        assert sep_dist == pytest.approx(
            brute_force(dist_w, rate_w, b_w) + brute_force(dist_a, rate_a, b_a)
        )
        assert joint <= sep_dist + 1e-12  # the joint budget is the looser constraint
    lag = solve_separate(dist, rate, part, [b_w, b_a], solver=solve_lagrangian)
    assert choice_totals(dist_w, rate_w, lag[:4])[0] <= b_w
    assert choice_totals(dist_a, rate_a, lag[4:])[0] <= b_a
    # Separate budgets set to the joint optimum's split reproduce it.
    split = [
        choice_totals(dist_w, rate_w, joint_choice[:4])[0],
        choice_totals(dist_a, rate_a, joint_choice[4:])[0],
    ]
    again = solve_separate(dist, rate, part, split)
    assert choice_totals(dist, rate, again)[1] == pytest.approx(joint)
    with pytest.raises(ValueError, match="part"):
        solve_separate(dist, rate, part, [b_w])


def test_bit_constraints_are_respected_by_every_solver() -> None:
    rng = np.random.default_rng(10)
    bits = np.arange(9)
    dist, rate = random_table(rng, 12, 9, integer=False, p_inf=0.0)
    min_bits = np.array([2] * 6 + [4] * 6)  # e.g. weights >= 2 bits, activations >= 4
    cons = constrain(dist, bits, allowed_bits={0, 2, 4, 6, 8}, min_bits=min_bits, max_bits=6)
    assert np.isfinite(dist).all(), "constrain must not modify its input"
    budget = random_budget(rng, cons, rate)
    for name, solver in SOLVERS.items():
        choice = solver(cons, rate, budget)
        b = bits[choice]
        assert np.all(np.isin(b, [2, 4, 6])), name
        assert np.all(b >= min_bits) and np.all(b <= 6), name
        assert_valid(cons, rate, choice, budget)
    expect = brute_force(cons, rate, budget)
    assert choice_totals(cons, rate, solve_dp(cons, rate, budget))[1] == pytest.approx(expect)
    with pytest.raises(ValueError, match="item 3 has no allowed choice"):
        constrain(dist, bits, min_bits=np.array([0, 0, 0, 9] + [0] * 8))


def test_whole_layer_allocation_merges_and_expands() -> None:
    rng = np.random.default_rng(11)
    dist, rate = random_table(rng, 7, 5, integer=True, p_inf=0.1)
    layer = np.array(["b", "a", "b", "c", "a", "b", "c"])
    dist_l, rate_l, item_layer = merge_layers(dist, rate, layer)
    np.testing.assert_allclose(dist_l[1], dist[[0, 2, 5]].sum(0))  # layer "b"
    assert dist_l.shape == (3, 5)
    budget = random_budget(rng, dist_l, rate_l)
    for name, solver in SOLVERS.items():
        choice = expand_layers(solver(dist_l, rate_l, budget), item_layer)
        assert choice.shape == (7,)
        for label in "abc":
            assert len(set(choice[layer == label])) == 1, name
        assert_valid(dist, rate, choice, budget)
        if name != "lagrangian":
            # Brute force over uniform-per-layer allocations of the original items.
            best = np.inf
            for cols in itertools.product(range(5), repeat=3):
                c = np.array(cols)[item_layer]
                r, d = choice_totals(dist, rate, c)
                if r <= budget:
                    best = min(best, d)
            assert choice_totals(dist, rate, choice)[1] == pytest.approx(best), name
    split = np.ones_like(dist)
    split[0, :2], split[2, 2:] = np.inf, np.inf  # two groups of "b" share no allowed column
    with pytest.raises(ValueError, match="layer 'b' has no bit width"):
        merge_layers(split, rate, layer)


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_bad_input_errors(name: str) -> None:
    solver = SOLVERS[name]
    dist = np.array([[1.0, 0.5, 0.1], [2.0, 1.0, 0.2]])
    rate = np.array([[0.0, 10.0, 20.0], [5.0, 15.0, 30.0]])
    with pytest.raises(ValueError, match=r"budget 4 is below the smallest achievable rate 5"):
        solver(dist, rate, 4.0)
    bad = dist.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"dist\[1, 2\] is NaN"):
        solver(bad, rate, 30.0)
    bad = dist.copy()
    bad[1] = np.inf
    with pytest.raises(ValueError, match="item 1 has no allowed choice"):
        solver(bad, rate, 30.0)
    with pytest.raises(ValueError, match="budget is NaN"):
        solver(dist, rate, np.nan)
    with pytest.raises(ValueError, match="one shape"):
        solver(dist, rate[:, :2], 30.0)
