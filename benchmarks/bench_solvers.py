"""Bit-allocation benchmark: DP, Lagrangian and the exact ILP on a DeiT-B-sized item table.

The instance mimics DeiT-B at 64 channels per group: 662 weight groups (589 of 98,304 weights,
72 of 393,216, one of 79,872) and 662 activation groups of about 25,000 elements, 11 bit widths
(0..10, rate = bits × numel), random convex-ish curves ``dist(b) = a · 4**-b · (1 + noise)`` with
``a`` log-uniform. For each target average bit width (budget = target × total numel) we time the
DP (all targets from one table), the Lagrangian and HiGHS, and report each one's relative gap
``(dist - ilp_dist) / ilp_dist`` to the ILP. HiGHS runs under a time limit per target: where it
stops before proving optimality the gap is to its best solution, and ``*_gap_vs_bound`` bounds
the true gap from above with its proven lower bound. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdoq.solvers import (  # noqa: E402
    DP_MAX_CELLS,
    choice_totals,
    solve_dp_multi,
    solve_ilp_result,
    solve_lagrangian,
)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--target_rates",
        default="4,6,8",
        help="comma-separated target average bit widths (bits per element)",
    )
    p.add_argument(
        "--ilp-time-limit", type=float, default=30.0, help="HiGHS time limit per target (seconds)"
    )
    p.add_argument(
        "--ilp-gap",
        type=float,
        default=1e-9,
        help="HiGHS relative optimality gap at which it stops (fraction)",
    )
    p.add_argument(
        "--max-cells", type=int, default=DP_MAX_CELLS, help="DP table limit (items × budget cells)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random curves")
    return p.parse_args(argv)


def deit_b_instance(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``dist (I, K)``, ``rate (I, K)`` in bits and ``numel (I,)`` of a DeiT-B-sized table."""
    rng = np.random.default_rng(seed)
    weights = np.array([98_304] * 589 + [393_216] * 72 + [79_872])
    acts = rng.integers(24_000, 26_001, size=662)
    numel = np.concatenate([weights, acts]).astype(np.int64)  # (I,)
    bits = np.arange(11)  # (K,)
    scale = np.exp(rng.uniform(np.log(1e-6), np.log(1e-2), size=numel.size)) * numel / 1e5
    noise = 1 + 0.05 * rng.standard_normal((numel.size, bits.size))  # (I, K)
    dist = scale[:, None] * 4.0 ** (-bits[None, :]) * noise  # (I, K)
    rate = (bits[None, :] * numel[:, None]).astype(np.float64)  # (I, K)
    return dist, rate, numel


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1: HiGHS prints stray debug lines from C++ (HiGHS issue #2783)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    targets = [float(t) for t in args.target_rates.split(",")]
    dist, rate, numel = deit_b_instance(args.seed)
    total = int(numel.sum())
    budgets = [t * total for t in targets]

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    dp = solve_dp_multi(dist, rate, budgets, max_cells=args.max_cells)
    dp_seconds = time.perf_counter() - t0
    dp_peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024

    t0 = time.perf_counter()
    lag = [solve_lagrangian(dist, rate, b) for b in budgets]
    lag_seconds = time.perf_counter() - t0

    ilp, ilp_times = [], []
    for b in budgets:
        t0 = time.perf_counter()
        with quiet_stdout():
            ilp.append(
                solve_ilp_result(
                    dist, rate, b, time_limit=args.ilp_time_limit, mip_rel_gap=args.ilp_gap
                )
            )
        ilp_times.append(time.perf_counter() - t0)

    rows = []
    for t, b, c_dp, c_lag, res, sec in zip(
        targets, budgets, dp.choices, lag, ilp, ilp_times, strict=True
    ):
        r_dp, d_dp = choice_totals(dist, rate, c_dp)
        r_lag, d_lag = choice_totals(dist, rate, c_lag)
        assert r_dp <= b and r_lag <= b and choice_totals(dist, rate, res.choice)[0] <= b
        rows.append(
            {
                "target_bits": t,
                "ilp_dist": res.objective,
                "ilp_bound": res.bound,
                "ilp_optimal": res.optimal,
                "ilp_seconds": sec,
                "dp_gap": (d_dp - res.objective) / res.objective,
                "dp_gap_vs_bound": (d_dp - res.bound) / res.bound,
                "dp_bits": r_dp / total,
                "lagrangian_gap": (d_lag - res.objective) / res.objective,
                "lagrangian_gap_vs_bound": (d_lag - res.bound) / res.bound,
                "lagrangian_bits": r_lag / total,
            }
        )

    print(
        f"{dist.shape[0]} items, {total:,} elements, {dist.shape[1]} bit widths; "
        f"DP resolution {dp.resolution:g} bits, {dp.cells:,} cells per item, "
        f"slack {dp.slack:.4g} bits ({dp.slack / total:.2e} bits per element)"
    )
    print(
        f"{'target':>6} {'ILP dist':>12} {'ILP s':>7} {'proven':>6} {'DP gap':>10} "
        f"{'DP bits':>8} {'LG gap':>10} {'LG bits':>8}"
    )
    for r in rows:
        print(
            f"{r['target_bits']:6g} {r['ilp_dist']:12.6e} {r['ilp_seconds']:7.2f} "
            f"{'yes' if r['ilp_optimal'] else 'no':>6} {r['dp_gap']:10.2e} "
            f"{r['dp_bits']:8.5f} {r['lagrangian_gap']:10.2e} {r['lagrangian_bits']:8.5f}"
        )
    print(
        f"DP {dp_seconds:.2f} s for all {len(targets)} targets from one table "
        f"(peak RSS +{dp_peak_mb:.0f} MB); Lagrangian {lag_seconds:.2f} s; "
        f"ILP {sum(ilp_times):.2f} s (time limit {args.ilp_time_limit:g} s per target"
        + (
            ""
            if all(r["ilp_optimal"] for r in rows)
            else "; reached, gaps are to HiGHS's best solution, *_vs_bound to its lower bound"
        )
        + ")"
    )
    summary = {
        "dp_seconds": dp_seconds,
        "dp_max_gap": max(r["dp_gap"] for r in rows),
        "dp_max_gap_vs_bound": max(r["dp_gap_vs_bound"] for r in rows),
        "dp_resolution": dp.resolution,
        "dp_slack_bits": dp.slack,
        "dp_cells": dp.cells,
        "dp_peak_rss_mb": dp_peak_mb,
        "lagrangian_seconds": lag_seconds,
        "lagrangian_max_gap": max(r["lagrangian_gap"] for r in rows),
        "lagrangian_max_gap_vs_bound": max(r["lagrangian_gap_vs_bound"] for r in rows),
        "ilp_seconds": sum(ilp_times),
        "ilp_time_limit": args.ilp_time_limit,
        "ilp_all_optimal": all(r["ilp_optimal"] for r in rows),
        "items": dist.shape[0],
        "numel": total,
        "seed": args.seed,
        "targets": rows,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
