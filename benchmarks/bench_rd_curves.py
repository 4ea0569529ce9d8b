"""Measured-engine benchmark: our engine vs the naive evaluator, side by side in one run.

The naive evaluator is the authors' algorithm (one full forward of the calibration set per
candidate, calibration tensor kept in memory so image decoding is not charged to it). Both run
the same grid search on the same groups, data, dtype and threads; we report both times, the ratio,
the largest relative difference of the resulting curves, and where our engine spends its time.

By default a representative subset is measured: ``--ngroups`` channel groups per kind (weights,
output activations) drawn as a stratified sample over all groups of the network in order, so every
group of a full curve run is equally likely to be represented and the time ratio estimates that of
a full run. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdoq.cli import add_model_data_flags, load_model_and_calib, resolve_device  # noqa: E402
from rdoq.curves import (  # noqa: E402
    CurveJob,
    layer_backend,
    make_chains,
    max_rows_for,
    plan_layers,
)
from rdoq.engine import MeasuredEngine  # noqa: E402
from rdoq.naive import NaiveEvaluator  # noqa: E402
from rdoq.search import chains_to_arrays, run_chains  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_data_flags(p, default_testsize=8)
    p.add_argument("--nchannelbatch", type=int, default=64, help="channels per group")
    p.add_argument("--maxrates", type=int, default=5, help="bit widths 0..maxrates-1")
    p.add_argument("--maxdeadzones", type=int, default=2, help="dead-zone ratios (weights)")
    p.add_argument(
        "--ngroups",
        type=int,
        default=5,
        help="groups measured per kind, stratified over all groups of the network",
    )
    p.add_argument(
        "--layers",
        default=None,
        help="comma-separated layer names: measure every group of these instead",
    )
    p.add_argument("--kinds", default="weight,act", help="weight and/or act (output side)")
    p.add_argument("--precision", choices=("float64", "float32"), default="float64")
    p.add_argument("--max-batch", type=int, default=None, help="candidates per pass")
    p.add_argument("--lookahead", type=int, default=None, help="speculative steps per chain")
    p.add_argument("--mem-budget-mb", type=float, default=2048.0, help="activation memory")
    return p.parse_args(argv)


def pick_groups(plans: list, layers: str | None, n: int) -> list[tuple]:
    """(plan, [group, ...]) to measure: every group of the named layers, or a stratified sample
    of ``n`` groups over all groups of the network in order."""
    if layers:
        wanted = layers.split(",")
        return [(p, list(range(len(p.bounds)))) for p in plans if p.name in wanted]
    flat = [(i, g) for i, p in enumerate(plans) for g in range(len(p.bounds))]
    chosen: dict[int, list[int]] = {}
    for j in range(n):
        i, g = flat[int((j + 0.5) * len(flat) / n)]
        chosen.setdefault(i, []).append(g)
    return [(plans[i], sorted(set(gs))) for i, gs in sorted(chosen.items())]


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a-b| / |b| over finite entries (0 where both are 0)."""
    mask = np.isfinite(a) & np.isfinite(b)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)):
        return float("inf")
    den = np.maximum(np.abs(b[mask]), 1e-300)
    diff = np.abs(a[mask] - b[mask])
    return float(np.max(np.where(diff == 0, 0.0, diff / den))) if diff.size else 0.0


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.manual_seed(0)
    device = resolve_device(args, None)
    on_cuda = device.type == "cuda"
    model, info, calib = load_model_and_calib(args)
    dtype = getattr(torch, args.precision)
    model = model.to(device=device, dtype=dtype).eval()
    x = calib.x.to(device=device, dtype=dtype)
    max_batch = args.max_batch or (64 if on_cuda else 1)
    lookahead = args.lookahead or (4 if on_cuda else 1)
    rows = max_rows_for(model, x[:1], args.mem_budget_mb)

    t0 = time.perf_counter()
    engine = MeasuredEngine(model, x, max_rows=rows)
    setup_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = NaiveEvaluator(model, x, batch_size=args.batchsize)
    setup_naive = time.perf_counter() - t0

    rows_out = []
    ours_total, naive_total = setup_ours, setup_naive
    n_ours = n_naive = 0
    worst = 0.0
    for kind in args.kinds.split(","):
        job = CurveJob(
            kind=kind,
            act_mode="out" if kind == "act" else None,
            group_size=args.nchannelbatch,
            nr=args.maxrates,
            ndz=args.maxdeadzones if kind == "weight" else 1,
            max_steps=48 if kind == "weight" else 32,
            step_grid=1 if kind == "weight" else 4,
            precision=args.precision,
            max_batch=max_batch,
            max_lookahead=lookahead,
        )
        picks = pick_groups(plan_layers(model, x[:1], job), args.layers, args.ngroups)
        for plan, groups in picks:
            g_all = len(plan.bounds)
            results = {}
            for name in ("ours", "naive"):
                chains, stats = make_chains(model, x, plan, job, rows)
                chains = [c for c in chains if c.group in groups]
                if name == "ours":
                    backend = layer_backend(engine, plan, job, stats)
                else:
                    backend = layer_backend(naive, plan, job, stats)
                t0 = time.perf_counter()
                n = run_chains(
                    chains,
                    backend,
                    max_batch if name == "ours" else 1,
                    max_lookahead=lookahead if name == "ours" else 1,
                )
                dt = time.perf_counter() - t0
                dist, _, _ = chains_to_arrays(chains, g_all, job.ndz, job.nr)
                results[name] = (dist[groups], dt, n)
            d = rel_diff(results["ours"][0], results["naive"][0])
            worst = max(worst, d)
            ours_total += results["ours"][1]
            naive_total += results["naive"][1]
            n_ours += results["ours"][2]
            n_naive += results["naive"][2]
            cut = engine.cut_for(plan.name)
            rows_out.append(
                (
                    kind,
                    f"{plan.name}[{','.join(map(str, groups))}]",
                    str(cut) if cut else "full forward",
                    results["naive"][2],
                    results["naive"][1],
                    results["ours"][1],
                    results["naive"][1] / results["ours"][1],
                    d,
                )
            )

    print(
        f"{'kind':6} {'layer':28} {'cut':28} {'cands':>6} {'naive s':>8} {'ours s':>8} "
        f"{'ratio':>6} {'max rel diff':>12}"
    )
    for r in rows_out:
        print(
            f"{r[0]:6} {r[1]:28} {r[2]:28} {r[3]:6d} {r[4]:8.2f} {r[5]:8.2f} {r[6]:6.2f} "
            f"{r[7]:12.2e}"
        )
    breakdown = {k: round(v, 2) for k, v in engine.seconds.items()}
    # Per-layer setup (capture, cut check, reference pass) is paid once per layer; a full run
    # amortises it over every group and dead zone of the layer, this sample over a few chains.
    per_layer = sum(engine.seconds[k] for k in ("capture", "cut_check", "reference"))
    steady = (naive_total - setup_naive) / (ours_total - setup_ours - per_layer)
    print(
        f"setup: ours {setup_ours:.2f}s, naive {setup_naive:.2f}s; ours spends {breakdown} "
        f"over {engine.passes} passes; the rest is quantization and search bookkeeping"
    )
    print(
        f"speedup {naive_total / ours_total:.2f}x; without per-layer setup (amortised in a full "
        f"run) {steady:.2f}x"
    )
    summary = {
        "model": info.arch,
        "device": str(device),
        "precision": args.precision,
        "testsize": int(x.shape[0]),
        "nchannelbatch": args.nchannelbatch,
        "threads": torch.get_num_threads(),
        "naive_s": round(naive_total, 2),
        "ours_s": round(ours_total, 2),
        "speedup": round(naive_total / ours_total, 3),
        "speedup_without_layer_setup": round(steady, 3),
        "max_rel_diff": worst,
        "candidates_ours": n_ours,
        "candidates_naive": n_naive,
        "ours_breakdown_s": breakdown,
        "ours_passes": engine.passes,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
