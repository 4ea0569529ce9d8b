"""The paper's remaining options against the default, on the bundled digits models (CPU, offline).

For each digits model the weight curves are made with the demo's settings (64 calibration images,
8 channels per group, bits 0-8, 4 dead-zone ratios) in four variants: per-channel steps (the
default) and the paper's one step per group (``--steps group``), each with the channels in their
own order and sorted by their signed maximum (``--sort_channels``, the paper's) or their RMS
(``--sort_channels rms``). Each curve set is allocated by the DP for weights alone (activations in
full precision) at the same targets, and each allocation is applied and evaluated on the digits
test split; the default curves are also allocated with entropy rates (``--rate entropy``, the
paper's ``--bit_rate 0``), whose budget counts the entropy of the quantized weights, not their
fixed-width bits, and their DP allocations are fine-tuned on the calibration images
(``--re-calibrate``: biases and BatchNorm/LayerNorm affines; ``--re-train``: every parameter,
the weights through their fixed quantizers), 200 steps each (``RETRAIN``).

The scripts run in-process (the entry points of ``rdoq.cli_curves`` / ``rdoq.cli_alloc``, with
the flags a user would type) and every number is read from the rows they return. It prints a
table, then, as its last line, one JSON object ``{"rows": [{"model", "option", "target",
"w_bits", "w_entropy_bits", "top1", "out_mse", "pred_dist", "calib_loss_before",
"calib_loss_after"}, …], "seconds"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdoq.cli_alloc import allocate_main  # noqa: E402
from rdoq.cli_curves import curves_main  # noqa: E402

# The fine-tuning runs of the table: 200 full-batch steps on the 64 calibration images (the
# paper's defaults, 20 steps at 1e-4, barely move a digits model).
RETRAIN = ["--re-train-iter", "200", "--re-calibrate-lr", "1e-3", "--re-train-lr", "1e-4"]
# (label, curve flags, allocation flags); the first is the default everything is compared with.
# An allocation with --re-calibrate / --re-train also yields the tuned points (label + suffix).
OPTIONS: list[tuple[str, list[str], list[str]]] = [
    ("default (channel steps)", [], ["--re-calibrate", "--re-train", *RETRAIN]),
    ("--sort_channels max", ["--sort_channels", "max"], []),
    ("--sort_channels rms", ["--sort_channels", "rms"], []),
    ("--rate entropy", [], ["--rate", "entropy"]),
    ("--steps group (paper)", ["--steps", "group"], []),
    ("--steps group --sort_channels max", ["--steps", "group", "--sort_channels", "max"], []),
    ("--steps group --sort_channels rms", ["--steps", "group", "--sort_channels", "rms"], []),
]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--outdir", type=Path, default=Path("runs/bench_paper_options"))
    p.add_argument("--archs", nargs="+", default=["digits_cnn", "digits_vit"])
    p.add_argument("--targets", nargs="+", default=["2", "3", "4"], help="average weight bits")
    p.add_argument("--calib", default="64", help="calibration images (--testsize of the curves)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny counts, one model")
    return p.parse_args(argv)


def curve_set(root: Path) -> Path:
    (found,) = [d for d in root.iterdir() if (d / "meta.json").is_file()]
    return found


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for arch in args.archs:
        model = ["--archname", arch, "--dataset", "digits", "--quiet"]
        made: dict[tuple[str, ...], Path] = {}
        for label, curve_flags, alloc_flags in OPTIONS:
            key = tuple(curve_flags)
            if key not in made:
                out = args.outdir / arch / f"curves_{len(made)}"
                size = ["--maxrates", "5", "--maxsteps", "8"] if args.quick else ["--maxrates", "9"]
                curves_main(
                    "weight",
                    None,
                    [*model, "--testsize", args.calib, "--nchannelbatch", "8", *size]
                    + ["--maxdeadzones", "4", "--outdir", str(out), *curve_flags],
                )
                made[key] = curve_set(out)
            res = allocate_main(
                "dp",
                argv=[*model, "--pathrdcurve", str(made[key]), "--weights-only"]
                + ["--target_rates", *args.targets, "--testsize", "-1", "--no-plots"]
                + ["--outdir", str(args.outdir / arch / f"alloc_{len(rows)}"), *alloc_flags],
            )
            for row in res["rows"]:
                suffix = {"calibrate": " --re-calibrate", "train": " --re-train"}
                rows.append(
                    {
                        "model": arch,
                        "option": label + suffix.get(row.get("fine_tune"), ""),
                        "target": row["target_bits"],
                        **{
                            k: row.get(k)
                            for k in (
                                "w_bits",
                                "w_entropy_bits",
                                "top1",
                                "out_mse",
                                "pred_dist",
                                "calib_loss_before",
                                "calib_loss_after",
                            )
                        },
                    }
                )
    return rows


# (header, row key, width, number format) of the printed table; str columns are left-aligned.
COLUMNS = [
    ("model", "model", 11, ""),
    ("option", "option", 48, ""),
    ("target", "target", 6, "g"),
    ("W bits", "w_bits", 6, ".3f"),
    ("W ent", "w_entropy_bits", 6, ".3f"),
    ("top-1 %", "top1", 7, ".2f"),
    ("out MSE", "out_mse", 9, ".3e"),
]


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, int, str]] = COLUMNS) -> str:
    """The rows as a fixed-width table ("-" where a value is None)."""

    def cell(v: Any, width: int, fmt: str) -> str:
        text = "-" if v is None else format(v, fmt)
        return f"{text:<{width}}" if not fmt else f"{text:>{width}}"

    lines = [" ".join(cell(h, w, f and ">") for h, _, w, f in columns)]
    lines += [" ".join(cell(r[k], w, f) for _, k, w, f in columns) for r in rows]
    return "\n".join(lines)


def main(
    argv: list[str] | None = None,
    parse: Any = parse,
    run: Any = run,
    table: Any = table,
) -> dict[str, Any]:
    """Run the benchmark (``--quick``: one model, one target, 16 calibration images), print its
    table and, as the last line, its JSON summary."""
    args = parse(argv)
    if args.quick:
        args.archs, args.targets, args.calib = args.archs[:1], ["3"], "16"
    t0 = time.perf_counter()
    rows = run(args)
    result = {"rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    print(table(rows))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
