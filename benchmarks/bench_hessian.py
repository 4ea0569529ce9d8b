"""Second-order vs measured curves, side by side in one run: time, agreement, and what they buy.

For each model, weight and output-activation curves are generated both ways (same groups, search,
data, dtype and threads; measured with this machine's default engine settings), then:

* ``speedup``: measured seconds / second-order seconds over both curve kinds (the gradient sweep
  included), summed over the models (``speedup_min``: the smallest per-model ratio);
* ``rank_corr``: Spearman rank correlation of the curve values, over all (group, bits ≥ 2) points
  (weights: best dead zone per bit) — bits 0 and 1 are mostly the clipping regime where the
  quadratic model is known to be weak, and are reported separately as ``rank_corr_low``;
* with labels (digits): top-1 and output MSE of the DP allocation from each kind of curve at the
  same targets (separate W/A budgets, as in the demo), and ``max_top1_gap`` over the 3- and 4-bit
  targets.

Models: the bundled digits CNN and ViT, and a timm model on synthetic data (timing and rank
correlation only). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdoq.adapters.digits import build_digits_model, digits_calib, digits_eval  # noqa: E402
from rdoq.adapters.timm_imagenet import build_model, synthetic_calib  # noqa: E402
from rdoq.allocation import build_table, solve_recorded  # noqa: E402
from rdoq.allocfile import make_allocation  # noqa: E402
from rdoq.apply import apply_allocation  # noqa: E402
from rdoq.curves import CurveJob, generate_curves  # noqa: E402
from rdoq.evaluate import TensorBatches, evaluate, reference_outputs  # noqa: E402
from rdoq.groups import channel_dim  # noqa: E402
from rdoq.hessian import HessianSettings  # noqa: E402
from rdoq.parts import PartSpec  # noqa: E402
from rdoq.store import CurveStore  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models",
        default="digits_cnn,digits_vit,test_vit",
        help="digits_cnn, digits_vit and/or a timm name (synthetic data)",
    )
    p.add_argument("--testsize", type=int, default=64, help="calibration samples")
    p.add_argument("--nchannelbatch", type=int, default=8, help="channels per group")
    p.add_argument("--maxrates", type=int, default=9, help="bit widths 0..maxrates-1")
    p.add_argument("--maxdeadzones", type=int, default=4, help="dead-zone ratios (weights)")
    p.add_argument(
        "--targets",
        type=float,
        nargs="+",
        default=[2.0, 3.0, 4.0, 6.0],
        help="DP targets (weights and activations alike)",
    )
    p.add_argument("--nprobes", type=int, default=4, help="random probes per sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the random output probes")
    p.add_argument(
        "--timm-testsize",
        type=int,
        default=8,
        help="calibration samples of the timm model (synthetic data)",
    )
    p.add_argument(
        "--timm-nchannelbatch", type=int, default=32, help="channels per group of the timm model"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument(
        "--min-seconds",
        type=float,
        default=3.0,
        help="repeat each side's curve generation until it has run this long and "
        "report the mean (only sub-second runs repeat)",
    )
    return p.parse_args(argv)


def make_curves(
    model, x, info, calib_meta, root: Path, estimator: str, args, group_size: int
) -> float:
    """Weight + output-activation curves into ``root``; returns seconds per generation.

    Timed like ``timeit``'s autorange: generations from scratch are repeated until they have
    taken ``--min-seconds`` in all, and the mean is returned — a sub-second run is otherwise
    dominated by one scheduler hiccup or first-call warm-up, while a long run averages them out.
    """
    seconds, runs = 0.0, 0
    while runs == 0 or seconds < args.min_seconds:
        run_root = root if runs == 0 else root.with_name(f"{root.name}_rep{runs}")
        for kind in ("weight", "act"):
            job = CurveJob(
                kind=kind,
                act_mode="out" if kind == "act" else None,
                group_size=group_size,
                nr=args.maxrates,
                ndz=args.maxdeadzones if kind == "weight" else 1,
                max_steps=48 if kind == "weight" else 32,
                step_grid=1 if kind == "weight" else 4,
                # The scripts' CPU defaults of each estimator.
                max_batch=256 if estimator == "hessian" else 1,
                max_lookahead=4 if estimator == "hessian" else 1,
                sweep_batch=64,
                progress=False,
                argv=["bench_hessian"],
                estimator=estimator,
                hessian=HessianSettings(nprobes=args.nprobes, seed=args.seed)
                if estimator == "hessian"
                else None,
            )
            t0 = time.perf_counter()
            generate_curves(
                model,
                x,
                info,
                calib_meta,
                job,
                run_root / kind,
                PartSpec(0, 1),
                torch.device("cpu"),
            )
            seconds += time.perf_counter() - t0
        if run_root != root:
            shutil.rmtree(run_root)
        runs += 1
    return seconds / runs


def curve_points(root: Path) -> dict[str, np.ndarray]:
    """Per kind, all (group, bit) values: best dead zone per bit for weights ``(G·B,)``."""
    out = {}
    for kind in ("weight", "act"):
        store = CurveStore.load(root / kind)
        out[kind] = np.concatenate(
            [store.read_layer(n).dist.min(axis=1) for n in store.layer_names()]
        )  # (G, B)
    return out


def dp_scores(model, root: Path, data, ref, targets: list[float]) -> list[dict]:
    w, a = CurveStore.load(root / "weight"), CurveStore.load(root / "act")
    modules = dict(model.named_modules())
    names = a.layer_names()
    dims = {n: channel_dim(modules[n]) for n in names}
    table = build_table(w, a, [names[0], names[-1]], act_channel_dims=dims)
    choices = solve_recorded(table, targets, "dp", act_targets=targets).choices
    out = []
    for t, c in zip(targets, choices, strict=True):
        alloc = make_allocation(table, c, target_bits=t, solver="dp")
        m = evaluate(apply_allocation(model, alloc), data, ref, torch.device("cpu"))
        out.append({"target": t, "top1": m["top1"], "out_mse": m["out_mse"]})
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    summary: dict = {"models": {}}
    for name in args.models.split(","):
        if name.startswith("digits_"):
            model, info = build_digits_model(name)
            calib = digits_calib(args.testsize)
            x_eval, y_eval = digits_eval()
            data = TensorBatches(x_eval.double(), y_eval, 256)
        else:
            model, info = build_model(name, random_init=True)
            calib = synthetic_calib(args.timm_testsize, model)
            data = None
        group_size = args.nchannelbatch if name.startswith("digits_") else args.timm_nchannelbatch
        model = model.double().eval()
        x = calib.x.double()
        with tempfile.TemporaryDirectory() as tmp:
            roots = {e: Path(tmp) / e for e in ("measured", "hessian")}
            secs = {
                e: make_curves(model, x, vars(info), calib.meta(), roots[e], e, args, group_size)
                for e in roots
            }
            pts = {e: curve_points(roots[e]) for e in roots}
            m = np.concatenate([pts["measured"][k][:, 2:].ravel() for k in ("weight", "act")])
            h = np.concatenate([pts["hessian"][k][:, 2:].ravel() for k in ("weight", "act")])
            ml = np.concatenate([pts["measured"][k][:, :2].ravel() for k in ("weight", "act")])
            hl = np.concatenate([pts["hessian"][k][:, :2].ravel() for k in ("weight", "act")])
            res = {
                "measured_s": secs["measured"],
                "hessian_s": secs["hessian"],
                "speedup": secs["measured"] / secs["hessian"],
                "rank_corr": float(spearmanr(m, h).statistic),
                "rank_corr_low": float(spearmanr(ml, hl).statistic),
                "median_ratio_hess_over_meas": float(np.median(h / np.maximum(m, 1e-300))),
            }
            if data is not None:
                ref, _ = reference_outputs(model, data, torch.device("cpu"))
                res["dp"] = {e: dp_scores(model, roots[e], data, ref, args.targets) for e in roots}
        summary["models"][name] = res
        print(
            f"{name}: measured {res['measured_s']:.1f} s, second-order {res['hessian_s']:.1f} s "
            f"({res['speedup']:.1f}x); rank correlation {res['rank_corr']:.3f} over bits >= 2 "
            f"({res['rank_corr_low']:.3f} over bits 0-1)"
        )
        for e, rows in res.get("dp", {}).items():
            print(
                f"  DP from {e:8s} curves: "
                + "  ".join(
                    f"{r['target']:g} bits: top-1 {r['top1']:.2f} % MSE {r['out_mse']:.2e}"
                    for r in rows
                )
            )
        sys.stdout.flush()
    models = summary["models"].values()
    gaps = [
        abs(a["top1"] - b["top1"])
        for r in models
        if "dp" in r
        for a, b in zip(r["dp"]["measured"], r["dp"]["hessian"], strict=True)
        if a["target"] in (3.0, 4.0)
    ]
    summary.update(
        # Total measured time over total second-order time; per model in "models".
        speedup=sum(r["measured_s"] for r in models) / sum(r["hessian_s"] for r in models),
        speedup_min=min(r["speedup"] for r in models),
        rank_corr=min(r["rank_corr"] for r in models),
        max_top1_gap=max(gaps) if gaps else None,
    )
    return summary


if __name__ == "__main__":
    print(json.dumps(main()))
