"""Bit allocation on a padded item table (DESIGN §8): Lagrangian, dynamic programming, ILP.

Every solver takes ``dist (I, K)`` float64, with ``np.inf`` where a choice is not allowed, and
``rate (I, K)`` non-negative, in the unit of the budget (bits: ``bits × numel``). An item is one
channel group of one weight or activation tensor; column ``k`` is one candidate (usually ``bits =
k``). Solvers return ``choice (I,)``: the chosen *original* column of every item, with
``rate[i, choice[i]]`` summing to at most the budget.

- **Joint weight + activation budget** (the paper): stack weight and activation items into one
  table and call any solver once.
- **Separate weight / activation budgets**: :func:`solve_separate` solves one independent
  problem per part (for several targets per part from one table each, call
  :func:`solve_dp_multi` on each part's rows).
- **Hardware constraints**: :func:`constrain` disallows columns (allowed bit set, min / max bits,
  per item if needed); :func:`merge_layers` / :func:`expand_layers` make every group of a layer
  take the same bit width by solving over one merged item per layer.

:func:`solve_lagrangian` returns points on the lower convex hull of the total (rate, dist)
trade-off (exact breakpoints, no slope bisection tolerance). :func:`solve_dp` and
:func:`solve_dp_multi` are exact up to a stated budget resolution (rates rounded *up*, so the
budget always holds). :func:`solve_ilp` is the exact reference (HiGHS via ``scipy.optimize.milp``).

Its length (about 720 lines): every solver of the padded table and the validation, constraints,
monotone fit and budget fill they share are kept in one module, so that the solvers' contract
(the table's shape, ``inf`` columns, original column indices, rates rounded up) lives in one
place.
"""

from __future__ import annotations

import heapq
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

# Default limit on the DP table, items × budget cells: the argmin table costs at most one byte a
# cell (≈ 0.5 GB; about 0.3 GB and 5 s on a DeiT-B-sized instance, benchmarks/bench_solvers.py).
DP_MAX_CELLS = 1 << 29
# Budget cells per item at most, whatever the number of items: three float64 rows of this length
# are live at a time, and a few items need no finer unit than a millionth of their range.
DP_MAX_ROW = 1 << 20

Solver = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


# --------------------------------------------------------------------------------------------
# Validation and shared helpers


def _check_table(dist: np.ndarray, rate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``dist`` and ``rate`` as float64, or ValueError naming the first bad entry."""
    dist = np.asarray(dist, dtype=np.float64)
    rate = np.asarray(rate, dtype=np.float64)
    if dist.ndim != 2 or dist.shape != rate.shape:
        raise ValueError(
            f"dist and rate must both be (I, K) arrays of one shape, got "
            f"{dist.shape} and {rate.shape}"
        )
    if dist.shape[0] == 0 or dist.shape[1] == 0:
        raise ValueError(f"empty item table {dist.shape}: need at least one item and one choice")
    nan = np.argwhere(np.isnan(dist))
    if nan.size:
        i, k = nan[0]
        raise ValueError(
            f"dist[{i}, {k}] is NaN ({len(nan)} NaN entries); fix the curve or set "
            "the entry to np.inf to disallow that choice"
        )
    if np.any(dist == -np.inf):
        i, k = np.argwhere(dist == -np.inf)[0]
        raise ValueError(
            f"dist[{i}, {k}] is -inf; distortions must be finite or +inf (= not allowed)"
        )
    allowed = np.isfinite(dist)
    none = np.flatnonzero(~allowed.any(axis=1))
    if none.size:
        raise ValueError(
            f"item {none[0]} has no allowed choice (every dist is inf; "
            f"{none.size} such items); relax the bit constraints for it"
        )
    bad = allowed & ~(np.isfinite(rate) & (rate >= 0))
    if bad.any():
        i, k = np.argwhere(bad)[0]
        raise ValueError(
            f"rate[{i}, {k}] = {rate[i, k]} for an allowed choice; rates must be finite and >= 0"
        )
    return dist, rate


def _min_rates(dist: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """Smallest allowed rate per item, (I,)."""
    return np.where(np.isfinite(dist), rate, np.inf).min(axis=1)


def _check_budget(budget: float, min_rate: float) -> float:
    budget = float(budget)
    if math.isnan(budget):
        raise ValueError("budget is NaN; pass a number in the unit of rate (bits)")
    if budget < min_rate:
        raise ValueError(
            f"budget {budget:.6g} is below the smallest achievable rate "
            f"{min_rate:.6g}; raise the target or relax the min-bits / allowed-bits "
            "constraints"
        )
    return budget


def choice_totals(dist: np.ndarray, rate: np.ndarray, choice: np.ndarray) -> tuple[float, float]:
    """``(total rate, total dist)`` of a choice."""
    idx = np.arange(len(choice))
    return float(np.asarray(rate)[idx, choice].sum()), float(np.asarray(dist)[idx, choice].sum())


# --------------------------------------------------------------------------------------------
# Constraints


def constrain(
    dist: np.ndarray,
    bits: np.ndarray,
    *,
    allowed_bits: Iterable[int] | None = None,
    min_bits: float | np.ndarray | None = None,
    max_bits: float | np.ndarray | None = None,
) -> np.ndarray:
    """A copy of ``dist`` with ``inf`` in every column whose bit width breaks a constraint.

    ``bits`` is the bit width of each column, ``(K,)`` or ``(I, K)``; ``min_bits`` / ``max_bits``
    are a number or one per item ``(I,)`` (e.g. different floors for weights and activations).
    Works for every solver, since all of them read ``inf`` as "not allowed".
    """
    out = np.array(dist, dtype=np.float64)  # (I, K)
    if out.ndim != 2:
        raise ValueError(f"dist must be an (I, K) array, got shape {out.shape}")
    bits = np.broadcast_to(np.asarray(bits), out.shape)  # (I, K)
    ok = np.ones(out.shape, dtype=bool)  # (I, K)
    if allowed_bits is not None:
        allowed = np.asarray(sorted(set(allowed_bits)))
        if allowed.size == 0:
            raise ValueError("allowed_bits is empty; give at least one bit width")
        ok &= np.isin(bits, allowed)
    if min_bits is not None:
        ok &= bits >= np.asarray(min_bits, dtype=np.float64).reshape(-1, 1)
    if max_bits is not None:
        ok &= bits <= np.asarray(max_bits, dtype=np.float64).reshape(-1, 1)
    out[~ok] = np.inf
    none = np.flatnonzero(~np.isfinite(out).any(axis=1))
    if none.size:
        i = none[0]
        raise ValueError(
            f"item {i} has no allowed choice under the constraints (its bit widths "
            f"{sorted(set(bits[i].tolist()))}, allowed_bits={allowed_bits}, "
            f"min_bits={min_bits}, max_bits={max_bits}); relax them"
        )
    return out


def monotone_fit(dist: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """Each item's least-squares fit that never rises with the rate (pool adjacent violators).

    A finer quantizer of the same kind never distorts more *in expectation*; an estimated curve
    that rises from one width to the next (calibration noise: a few weights whose rounding
    happens to suit the calibration data, second-order probe noise) would let the solver buy
    distortion that does not carry over to other data. The fit replaces each run of violating
    columns by its mean, over the finite (allowed) columns in order of rate; ``inf`` columns
    stay ``inf``. Rows already non-increasing are returned unchanged, bit for bit.
    """
    dist, rate = _check_table(dist, rate)
    out = dist.copy()  # (I, K)
    order = np.argsort(rate, axis=1, kind="stable")  # (I, K) columns by rate
    d_sorted = np.take_along_axis(dist, order, axis=1)  # (I, K)
    finite = np.isfinite(d_sorted)
    # A rise between consecutive finite columns: compare each finite value with the last finite
    # value before it (inf columns skipped), found by a running maximum of positions.
    pos = np.where(finite, np.arange(dist.shape[1]), -1)  # (I, K)
    prev = np.maximum.accumulate(pos, axis=1)  # (I, K) last finite column at or before k
    prev = np.concatenate([np.full((dist.shape[0], 1), -1), prev[:, :-1]], axis=1)
    prev_val = np.take_along_axis(d_sorted, np.maximum(prev, 0), axis=1)
    rises = finite & (prev >= 0) & (d_sorted > prev_val)  # (I, K)
    for i in np.flatnonzero(rises.any(axis=1)):
        cols = order[i][finite[i]]
        out[i, cols] = _pool_non_increasing(dist[i, cols])
    return out


def _pool_non_increasing(y: np.ndarray) -> np.ndarray:
    """The least-squares non-increasing sequence closest to ``y`` (equal weights)."""
    means: list[float] = []
    sizes: list[int] = []
    for v in y.tolist():
        means.append(v)
        sizes.append(1)
        while len(means) > 1 and means[-2] < means[-1]:
            m, n = means.pop(), sizes.pop()
            means[-1] = (means[-1] * sizes[-1] + m * n) / (sizes[-1] + n)
            sizes[-1] += n
    return np.repeat(np.asarray(means), sizes)


def fill_budget(
    dist: np.ndarray, rate: np.ndarray, choice: np.ndarray, budget: float
) -> np.ndarray:
    """Spend what a solution leaves of ``budget`` on upgrades that do not raise any distortion.

    Greedy: while some item can move to a costlier column whose distortion is not higher and
    whose extra rate fits in what is left, take the move with the largest distortion drop per
    extra bit (ties: the smaller extra rate, then the lower item index). The total distortion
    never rises and the budget still holds. This recovers the rate a DP leaves in its rounding
    slack, and, after :func:`monotone_fit` (which ties a violating run of widths), gives a group
    the wider of two tied widths when the budget allows: a user who asks for 8 bits gets 8 bits
    wherever the estimates cannot tell 7 from 8.
    """
    dist, rate = _check_table(dist, rate)
    choice = np.asarray(choice, dtype=np.int64).copy()
    idx = np.arange(len(choice))
    left = float(budget) - float(rate[idx, choice].sum())
    if left < 0:
        raise ValueError(
            f"the choice spends {float(rate[idx, choice].sum()):.6g} bits, over "
            f"the budget {budget:.6g}"
        )
    finite = np.isfinite(dist)
    heap: list[tuple[float, float, int, int, int]] = []

    def push(rows: np.ndarray) -> None:
        cur = choice[rows]
        extra = rate[rows] - rate[rows, cur][:, None]  # (n, K)
        d0 = dist[rows, cur][:, None]  # (n, 1)
        ok = finite[rows] & (extra > 0) & (extra <= left) & (dist[rows] <= d0)
        for r, k in np.argwhere(ok).tolist():
            e = float(extra[r, k])
            heapq.heappush(
                heap,
                (-float(d0[r, 0] - dist[rows[r], k]) / e, e, int(rows[r]), int(k), int(cur[r])),
            )

    push(idx)
    # Pop the best move; a stale one (its item moved since) or one that no longer fits (what is
    # left only shrinks) is dropped; after a move, the item's next moves are pushed.
    while heap:
        _, e, i, k, c = heapq.heappop(heap)
        if choice[i] != c or e > left:
            continue
        choice[i] = k
        left -= e
        push(np.array([i]))
    return choice


def merge_layers(
    dist: np.ndarray, rate: np.ndarray, layer: Sequence | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge the groups of each layer into one item, for whole-layer (uniform) allocation.

    ``layer (I,)`` labels each item with its layer (any hashable values). Returns ``(dist_L,
    rate_L, item_layer)``: dist and rate summed per column over a layer's items ``(L, K)`` — a
    column disallowed for one group is disallowed for the layer — and ``item_layer (I,)``, the
    merged row of each item, for :func:`expand_layers`. Column ``k`` must mean the same bit
    width for every item of a layer.
    """
    dist, rate = _check_table(dist, rate)
    layer = np.asarray(layer)
    if layer.shape != (dist.shape[0],):
        raise ValueError(
            f"layer must have one label per item ({dist.shape[0]}), got shape {layer.shape}"
        )
    labels, item_layer = np.unique(layer, return_inverse=True)
    n_layers = int(item_layer.max()) + 1
    dist_l = np.zeros((n_layers, dist.shape[1]))  # (L, K)
    rate_l = np.zeros((n_layers, dist.shape[1]))  # (L, K)
    np.add.at(dist_l, item_layer, dist)
    np.add.at(rate_l, item_layer, np.where(np.isfinite(dist), rate, 0.0))
    none = np.flatnonzero(~np.isfinite(dist_l).any(axis=1))
    if none.size:
        raise ValueError(
            f"layer {labels.tolist()[none[0]]!r} has no bit width allowed for all its "
            "groups; relax the constraints or allocate it per group"
        )
    return dist_l, rate_l, item_layer


def expand_layers(choice_l: np.ndarray, item_layer: np.ndarray) -> np.ndarray:
    """Per-item choice ``(I,)`` from a per-layer choice ``(L,)`` of :func:`merge_layers`."""
    return np.asarray(choice_l)[np.asarray(item_layer)]


def solve_separate(
    dist: np.ndarray,
    rate: np.ndarray,
    part: np.ndarray,
    budgets: Sequence[float],
    solver: Solver | None = None,
) -> np.ndarray:
    """Solve one independent problem per part, each with its own budget.

    ``part (I,)`` holds the part index of every item in ``0..P-1`` (e.g. 0 = weights,
    1 = activations) and ``budgets`` one budget per part. ``solver(dist, rate, budget) -> choice``
    defaults to :func:`solve_dp`; use ``functools.partial`` to pass its options.
    """
    dist, rate = _check_table(dist, rate)
    part = np.asarray(part)
    if part.shape != (dist.shape[0],):
        raise ValueError(
            f"part must have one entry per item ({dist.shape[0]}), got shape {part.shape}"
        )
    if part.size and (part.min() < 0 or part.max() >= len(budgets)):
        raise ValueError(
            f"part values must lie in 0..{len(budgets) - 1} (one budget each), got "
            f"{part.min()}..{part.max()}"
        )
    solver = solve_dp if solver is None else solver
    choice = np.zeros(dist.shape[0], dtype=np.int64)
    for p, budget in enumerate(budgets):
        rows = np.flatnonzero(part == p)
        if rows.size:
            choice[rows] = solver(dist[rows], rate[rows], budget)
    return choice


# --------------------------------------------------------------------------------------------
# Lagrangian


@dataclass(frozen=True)
class _Hull:
    """Per-item lower convex hulls, vertices in order of increasing rate."""

    cols: list[np.ndarray]  # original column of each vertex, per item
    slopes: list[np.ndarray]  # dist saved per unit of rate between vertices, non-increasing


def _hulls(dist: np.ndarray, rate: np.ndarray) -> _Hull:
    cols, slopes = [], []
    for d_i, r_i in zip(dist, rate, strict=True):
        ks = np.flatnonzero(np.isfinite(d_i))
        ks = ks[np.lexsort((d_i[ks], r_i[ks]))]  # by rate, then dist
        hull: list[int] = []
        best = np.inf
        for k in ks:
            # A point that does not lower the distortion is never chosen at a positive slope.
            if d_i[k] >= best:
                continue
            best = d_i[k]
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                cross = (r_i[b] - r_i[a]) * (d_i[k] - d_i[a]) - (d_i[b] - d_i[a]) * (
                    r_i[k] - r_i[a]
                )
                if cross > 0:
                    break
                hull.pop()  # b lies on or above the chord a-k
            hull.append(int(k))
        h = np.asarray(hull)
        s = -np.diff(d_i[h]) / np.diff(r_i[h])
        # Rounding may break the strict decrease of slopes; the global order relies on it.
        cols.append(h)
        slopes.append(np.minimum.accumulate(s) if s.size else s)
    return _Hull(cols, slopes)


def lagrangian_frontier(
    dist: np.ndarray, rate: np.ndarray, slopes: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Choices ``(I, len(slopes))`` minimising ``dist + slope × rate`` per item, per slope.

    Ties go to the lower rate, so the rate of every item never rises as the slope grows.
    ``slope = inf`` gives the minimum-rate choice.
    """
    dist, rate = _check_table(dist, rate)
    slopes = np.asarray(slopes, dtype=np.float64).reshape(-1)  # (S,)
    if np.any(np.isnan(slopes)) or np.any(slopes < 0):
        raise ValueError(f"slopes must be >= 0 (dist per unit of rate), got {slopes.min()}")
    hull = _hulls(dist, rate)
    out = np.empty((dist.shape[0], slopes.size), dtype=np.int64)  # (I, S)
    for i, (h, s) in enumerate(zip(hull.cols, hull.slopes, strict=True)):
        # Vertex index = number of breakpoints steeper than the slope (s is non-increasing).
        n_steeper = s.size - np.searchsorted(s[::-1], slopes, side="right")
        out[i] = h[n_steeper]
    return out


def solve_lagrangian(dist: np.ndarray, rate: np.ndarray, budget: float) -> np.ndarray:
    """The largest-rate point of the lower convex hull of the total trade-off within ``budget``.

    Equivalent to bisecting the slope of ``argmin_k dist + slope × rate`` to the budget, but on
    the exact breakpoints: all hull segments of all items, steepest first, are taken while the
    total rate fits. The choice minimises ``dist + slope × rate`` for the slope at which it stops,
    so no allocation with at most its total rate has less distortion; it reaches at least the
    rate of every vertex of the total hull within the budget, and its distortion never rises as
    the budget grows.
    """
    dist, rate = _check_table(dist, rate)
    budget = _check_budget(budget, float(_min_rates(dist, rate).sum()))
    n_items = dist.shape[0]
    hull = _hulls(dist, rate)
    seg_item = np.concatenate([np.full(s.size, i) for i, s in enumerate(hull.slopes)])
    seg_pos = np.concatenate([np.arange(s.size) for s in hull.slopes])
    seg_slope = np.concatenate(hull.slopes)
    starts = np.array([h[0] for h in hull.cols])
    seg_rate = np.concatenate([np.diff(rate[i, h]) for i, h in enumerate(hull.cols)])
    # Steepest first; equal slopes keep each item's own vertex order.
    order = np.lexsort((seg_pos, seg_item, -seg_slope))
    base = float(rate[np.arange(n_items), starts].sum())
    cum = base + np.cumsum(seg_rate[order])
    n_taken = int(np.searchsorted(cum, budget, side="right"))
    while True:
        taken = np.bincount(seg_item[order[:n_taken]], minlength=n_items)
        choice = np.array([h[t] for h, t in zip(hull.cols, taken, strict=True)])
        # The cumulative sum and the per-choice sum may round differently at the last bit.
        if choice_totals(dist, rate, choice)[0] <= budget or n_taken == 0:
            return choice
        n_taken -= 1


# --------------------------------------------------------------------------------------------
# Dynamic programming


@dataclass(frozen=True)
class DPResult:
    """Result of :func:`solve_dp_multi`.

    ``choices[t]`` is the ``(I,)`` choice for ``budgets[t]``. Rates were rounded up to whole
    multiples of ``resolution`` (after subtracting each item's smallest rate), so each choice is
    at least as good as the exact optimum at ``budgets[t] - slack``, and exactly optimal when
    ``slack == 0`` (integer rates at their gcd). ``cells`` is the number of budget cells.
    """

    choices: tuple[np.ndarray, ...]
    resolution: float
    slack: float
    cells: int


def _integral(x: np.ndarray) -> bool:
    return bool(np.all(x == np.round(x)) and (x.size == 0 or x.max() < 2.0**53))


def _offset_rates(dist: np.ndarray, rate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rates above each item's smallest allowed rate (0 where not allowed) and those minima."""
    min_rate = _min_rates(dist, rate)  # (I,)
    extra = np.where(np.isfinite(dist), rate - min_rate[:, None], 0.0)  # (I, K)
    return extra, min_rate


def dp_resolution(
    dist: np.ndarray,
    rate: np.ndarray,
    budgets: Sequence[float] | float,
    max_cells: int = DP_MAX_CELLS,
) -> float:
    """The budget unit :func:`solve_dp` uses by default.

    The gcd of all (integer) rates above each item's minimum when the table fits — ``I × cells
    <= max_cells`` and ``cells <= DP_MAX_ROW`` — then the DP is exact; otherwise the smallest unit
    (a multiple of that gcd for integer rates) whose table, including the window of up to ``I + 2``
    cells that recovers the rounding slack, fits.
    """
    dist, rate = _check_table(dist, rate)
    extra, min_rate = _offset_rates(dist, rate)
    n_items = dist.shape[0]
    top_budget = max(np.atleast_1d(np.asarray(budgets, dtype=np.float64))) - min_rate.sum()
    top = min(top_budget, extra.max(axis=1).sum())
    positive = extra[np.isfinite(dist) & (extra > 0)]
    if top <= 0 or positive.size == 0:
        return 1.0
    gcd = int(np.gcd.reduce(positive.astype(np.int64))) if _integral(positive) else None
    row = min(max_cells // n_items, DP_MAX_ROW)
    if gcd is not None and top // gcd + 1 <= row:
        return float(gcd)
    # Each item may round up by almost one unit: keep I + 2 cells of the row for that window.
    per_item = row - (n_items + 2)
    if per_item < 16:
        raise ValueError(
            f"max_cells={max_cells} is too small for {n_items} items; allow at "
            f"least {n_items * (n_items + 18)} cells"
        )
    unit = top / per_item
    if gcd is not None:
        unit = math.ceil(unit / gcd) * gcd
    return float(unit)


def _rate_units(extra: np.ndarray, allowed: np.ndarray, unit: float) -> np.ndarray:
    """Rates in whole units, rounded up so that ``units × unit >= rate`` holds exactly."""
    if _integral(extra[allowed]) and float(unit).is_integer():
        u = int(unit)
        units = -(-extra.astype(np.int64) // u)  # ceil division in exact integers
    else:
        units = np.ceil(extra / unit).astype(np.int64)
        units[units * unit < extra] += 1
    return np.where(allowed, units, 0)


def solve_dp_multi(
    dist: np.ndarray,
    rate: np.ndarray,
    budgets: Sequence[float],
    resolution: float | None = None,
    max_cells: int = DP_MAX_CELLS,
) -> DPResult:
    """Exact multiple-choice knapsack by DP (paper eq. 24) for several budgets from one table.

    ``S[i, j] = min_k dist[i, k] + S[i-1, j - units[i, k]]`` over budget cells ``j`` of
    ``resolution`` each (default :func:`dp_resolution`), float64, vectorised over ``j``. Rates are
    rounded *up* to cells, so no choice exceeds its real budget; of the backtracked solutions in
    the few cells above each budget (which the rounding may have priced too high) the best one
    whose real rate fits is returned. The argmin table is stored as uint8 per cell (uint16 for
    more than 256 columns), only up to each prefix of items' largest rate.
    """
    dist, rate = _check_table(dist, rate)
    n_items, n_cols = dist.shape
    allowed = np.isfinite(dist)  # (I, K)
    extra, min_rate = _offset_rates(dist, rate)  # (I, K), (I,)
    base = float(min_rate.sum())
    budgets = [_check_budget(b, base) for b in np.atleast_1d(np.asarray(budgets, float))]
    if resolution is None:
        resolution = dp_resolution(dist, rate, budgets, max_cells)
    unit = float(resolution)
    if not (unit > 0 and math.isfinite(unit)):
        raise ValueError(f"resolution must be a positive number in the unit of rate, got {unit}")
    units = _rate_units(extra, allowed, unit)  # (I, K)
    max_units = units.max(axis=1)  # (I,)
    slack = float(np.where(allowed, units * unit - extra, 0.0).max(axis=1).sum())

    # Per budget: the cell that guarantees the budget, and the last cell whose solutions may
    # still fit once their rounding is undone.
    top = float(max_units.sum()) * unit  # every rounded combination fits under base + top
    spans = []
    for b in budgets:
        first = math.floor(min(b - base, top) / unit)
        while first > 0 and first * unit > b - base:
            first -= 1
        spans.append((max(first - 2, 0), math.floor(min(b - base + slack, top) / unit)))
    n_cells = int(min(max(last for _, last in spans), max_units.sum())) + 1
    if n_items * n_cells > max_cells:
        raise ValueError(
            f"resolution {unit:.6g} needs {n_items} × {n_cells} DP cells, more "
            f"than max_cells={max_cells}; use resolution >= "
            f"{dp_resolution(dist, rate, budgets, max_cells):.6g} or raise max_cells"
        )

    # Small items first: the prefix of items can reach only the sum of their largest rates, so
    # the rows stay short for most of the sweep.
    order = np.argsort(max_units, kind="stable")
    caps = np.minimum(np.cumsum(max_units[order]), n_cells - 1)  # (I,)
    arg_dtype = np.uint8 if n_cols <= 256 else np.uint16
    prev = np.zeros(n_cells)  # S[i-1, :], constant past its cap
    cur = np.empty(n_cells)
    tmp = np.empty(n_cells)
    better = np.empty(n_cells, dtype=bool)
    args: list[np.ndarray] = []
    prev_cap = 0
    for pos, i in enumerate(order):
        n = int(caps[pos]) + 1
        prev[prev_cap + 1 : n] = prev[prev_cap]
        row = cur[:n]
        row.fill(np.inf)
        arg = np.zeros(n, dtype=arg_dtype)
        ks = np.flatnonzero(allowed[i])
        # Lower rate first: a strict "<" then breaks ties toward the cheaper choice.
        for k in ks[np.argsort(units[i, ks], kind="stable")]:
            r = int(units[i, k])
            if r >= n:
                continue
            m = n - r
            np.add(prev[:m], dist[i, k], out=tmp[:m])
            np.less(tmp[:m], row[r:], out=better[:m])
            np.copyto(row[r:], tmp[:m], where=better[:m])
            np.copyto(arg[r:], arg_dtype(k), where=better[:m])
        args.append(arg)
        prev, cur = cur, prev
        prev_cap = n - 1
    final = prev[: prev_cap + 1]

    choices = []
    idx = np.arange(n_items)
    for b, (lo, hi) in zip(budgets, spans, strict=True):
        cells = np.arange(min(lo, n_cells - 1), min(hi, n_cells - 1) + 1)
        cells = cells[np.isfinite(final[np.minimum(cells, prev_cap)])]
        cand = np.empty((n_items, cells.size), dtype=np.int64)  # (I, M)
        j = cells.copy()
        for pos in range(n_items - 1, -1, -1):
            i = order[pos]
            j = np.minimum(j, caps[pos])
            k = args[pos][j].astype(np.int64)
            cand[i] = k
            j = j - units[i, k]
        assert np.all(j >= 0), "DP backtrack left the table"
        cand_rate = rate[idx[:, None], cand].sum(axis=0)  # (M,)
        cand_dist = dist[idx[:, None], cand].sum(axis=0)  # (M,)
        picked = None
        for m in np.lexsort((cells, cand_rate, cand_dist)):
            if choice_totals(dist, rate, cand[:, m])[0] <= b:
                picked = cand[:, m]
                break
        if picked is None:
            raise ValueError(
                f"budget {b:.6g} is too close to the smallest rate {base:.6g} for "
                f"resolution {unit:.6g}; pass a finer resolution"
            )
        choices.append(picked)
    return DPResult(tuple(choices), unit, slack, n_cells)


def solve_dp(
    dist: np.ndarray,
    rate: np.ndarray,
    budget: float,
    resolution: float | None = None,
    max_cells: int = DP_MAX_CELLS,
) -> np.ndarray:
    """One-budget :func:`solve_dp_multi`; the unit it uses is ``dp_resolution(dist, rate,
    budget, max_cells)`` unless ``resolution`` is given."""
    return solve_dp_multi(dist, rate, [budget], resolution, max_cells).choices[0]


# --------------------------------------------------------------------------------------------
# ILP reference


@dataclass(frozen=True)
class ILPResult:
    """Result of :func:`solve_ilp_result`: the choice, whether HiGHS proved it optimal, its
    total dist, the proven lower bound on the optimum, and HiGHS's message."""

    choice: np.ndarray
    optimal: bool
    objective: float
    bound: float
    message: str


def solve_ilp_result(
    dist: np.ndarray,
    rate: np.ndarray,
    budget: float,
    *,
    time_limit: float | None = None,
    mip_rel_gap: float = 1e-9,
) -> ILPResult:
    """Exact multiple-choice knapsack with HiGHS: binary ``x[i, k]``, one choice per item."""
    dist, rate = _check_table(dist, rate)
    n_items = dist.shape[0]
    min_rate = _min_rates(dist, rate)
    budget = _check_budget(budget, float(min_rate.sum()))
    rows, cols = np.nonzero(np.isfinite(dist))
    # HiGHS stops at an absolute gap of 1e-6 too: shift each item's best dist to 0 and scale by
    # a good feasible objective (the Lagrangian's) so that the relative gap is the one that acts.
    row_min = np.where(np.isfinite(dist), dist, np.inf).min(axis=1)
    c = dist[rows, cols] - row_min[rows]
    ref = choice_totals(dist, rate, solve_lagrangian(dist, rate, budget))[1] - row_min.sum()
    scale = ref if ref > 0 else 1.0
    r = rate[rows, cols]
    r_scale = max(float(r.max()), 1.0)
    one_each = csr_array(
        (np.ones(rows.size), (rows, np.arange(rows.size))), shape=(n_items, rows.size)
    )
    rhs = budget / r_scale
    options = {"mip_rel_gap": mip_rel_gap}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    for _ in range(5):
        res = milp(
            c / scale,
            integrality=np.ones(rows.size),
            bounds=Bounds(0, 1),
            constraints=[
                LinearConstraint(one_each, 1, 1),
                LinearConstraint((r / r_scale)[None, :], -np.inf, rhs),
            ],
            options=options,
        )
        if res.x is None:
            raise RuntimeError(f"HiGHS found no solution for budget {budget:.6g}: {res.message}")
        # The largest x of each item is its choice (x is 0/1 up to HiGHS's tolerance); rows are
        # grouped by item, so the last entry of each group after sorting by (item, x) is it.
        by_item = np.lexsort((res.x, rows))
        last = np.searchsorted(rows[by_item], np.arange(n_items), side="right") - 1
        choice = cols[by_item[last]].astype(np.int64)
        total_rate, total_dist = choice_totals(dist, rate, choice)
        if total_rate <= budget:
            break
        # HiGHS's feasibility tolerance let the rate pass the budget by a hair: tighten, resolve.
        rhs -= (total_rate - budget) / r_scale + 1e-7
    else:
        raise RuntimeError(f"HiGHS kept exceeding budget {budget:.6g} by its tolerance")
    optimal = res.status == 0
    bound_scaled = getattr(res, "mip_dual_bound", None)
    bound = (float(bound_scaled) * scale + row_min.sum()) if bound_scaled is not None else -np.inf
    return ILPResult(choice, optimal, total_dist, bound, str(res.message))


def solve_ilp(dist: np.ndarray, rate: np.ndarray, budget: float, **highs: float) -> np.ndarray:
    """Exact reference choice by ILP (HiGHS, ``highs``: :func:`solve_ilp_result`'s
    ``time_limit`` / ``mip_rel_gap``); warns if the time limit stopped it early."""
    res = solve_ilp_result(dist, rate, budget, **highs)
    if not res.optimal:
        warnings.warn(
            f"ILP not proven optimal ({res.message}); dist {res.objective:.6g}, lower "
            f"bound {res.bound:.6g}",
            RuntimeWarning,
            stacklevel=2,
        )
    return res.choice
