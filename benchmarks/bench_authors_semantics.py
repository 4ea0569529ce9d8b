"""What each of the authors' rules (``--authors-semantics``) changes, on the bundled digits models
(CPU, offline).

Every deviation is measured alone against this project's rule, on the paper's one-step-per-group
quantizer (``--steps group``, which the authors' dead-zone rule and search belong to), with the
demo's curve settings (64 calibration images, 8 channels per group, bits 0-8, 4 dead-zone
ratios) and the DP at the same targets, applied and evaluated on the digits test split:

- ``deadzone``: the round-based dead-zone quantizer with 2^b + 1 levels, weights only;
- ``search``: the warm start and early stop of the step search, weights only;
- ``bcw``: ``-bcw`` as the per-channel affine map (theirs) or the foldable bias correction
  (ours), both inside the curves and deployed, weights only;
- ``bca``: ``-bca`` as the oracle offset from the evaluated batch (theirs, on activation curves
  measured without it, as the authors' curve scripts ignored it) or offsets from the
  calibration set (ours, on activation curves measured after it, as this project deploys it),
  with activations (output curves, W and A each at the target);
- all four together against the default (per-channel steps), weights only except ``bca``.

The scripts run in-process with the flags a user would type; every number is read from the
rows they return. It prints a table, then, as its last line, one JSON object
``{"rows": [{"model", "option", "target", "w_bits", "a_bits", "top1", "out_mse",
"pred_dist"}, …], "seconds"}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_paper_options import curve_set, table  # noqa: E402
from benchmarks.bench_paper_options import main as bench_main  # noqa: E402
from rdoq.cli_alloc import allocate_main  # noqa: E402
from rdoq.cli_curves import curves_main  # noqa: E402

GROUP = ["--steps", "group"]
AUTHORS = "--authors-semantics"
# (label, weight curve flags, activation curve flags or None for weights only, DP flags).
OPTIONS: list[tuple[str, list[str], list[str] | None, list[str]]] = [
    ("ours (--steps group)", GROUP, None, []),
    ("theirs: deadzone", [*GROUP, AUTHORS, "deadzone"], None, [AUTHORS, "deadzone"]),
    ("theirs: search", [*GROUP, AUTHORS, "search"], None, [AUTHORS, "search"]),
    ("ours: -bcw (bias)", [*GROUP, "-bcw"], None, ["-bcw"]),
    ("theirs: -bcw (affine)", [*GROUP, "-bcw", AUTHORS, "bcw"], None, ["-bcw", AUTHORS, "bcw"]),
    ("W+A, no -bca", GROUP, [], []),
    ("W+A, ours: -bca (calibration)", GROUP, ["-bca"], ["-bca"]),
    ("W+A, theirs: -bca (oracle)", GROUP, [], ["-bca", AUTHORS, "bca"]),
    ("default (channel steps), -bcw", ["-bcw"], None, ["-bcw"]),
    ("theirs: all, -bcw", ["-bcw", AUTHORS], None, ["-bcw", AUTHORS]),
]
ROW_KEYS = ("w_bits", "a_bits", "top1", "out_mse", "pred_dist")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--outdir", type=Path, default=Path("runs/bench_authors_semantics"))
    p.add_argument("--archs", nargs="+", default=["digits_cnn", "digits_vit"])
    p.add_argument("--targets", nargs="+", default=["2", "3", "4"], help="average bits")
    p.add_argument("--calib", default="64", help="calibration images (--testsize of the curves)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny counts, one model")
    return p.parse_args(argv)


def curves(
    args: argparse.Namespace, arch: str, kind: str, flags: list[str], made: dict[tuple, Path]
) -> Path:
    """The curve set of ``arch`` made with ``flags`` (made once, remembered in ``made``)."""
    key = (arch, kind, *flags)
    if key not in made:
        out = args.outdir / arch / f"curves_{sum(k[0] == arch for k in made)}"
        size = ["--maxrates", "5", "--maxsteps", "12"] if args.quick else ["--maxrates", "9"]
        extra = ["--maxdeadzones", "4"] if kind == "weight" else []
        curves_main(
            kind,
            None if kind == "weight" else "out",
            ["--archname", arch, "--dataset", "digits", "--quiet", "--testsize", args.calib]
            + ["--nchannelbatch", "8", *size, *extra, "--outdir", str(out), *flags],
        )
        made[key] = curve_set(out)
    return made[key]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    made: dict[tuple, Path] = {}
    for arch in args.archs:
        model = ["--archname", arch, "--dataset", "digits", "--quiet"]
        for label, wflags, aflags, dp_flags in OPTIONS:
            argv = [*model, "--pathrdcurve", str(curves(args, arch, "weight", wflags, made))]
            argv += ["--target_rates", *args.targets, "--testsize", "-1", "--no-plots"]
            if aflags is None:
                argv.append("--weights-only")
            else:
                argv += ["--act_curve_root_dir", str(curves(args, arch, "act", aflags, made))]
                argv += ["--act-target-rates", *args.targets]
            argv += ["--outdir", str(args.outdir / arch / f"alloc_{len(rows)}"), *dp_flags]
            for row in allocate_main("dp", act_mode="out", argv=argv)["rows"]:
                rows.append(
                    {
                        "model": arch,
                        "option": label,
                        "target": row["target_bits"],
                        **{k: row.get(k) for k in ROW_KEYS},
                    }
                )
    return rows


COLUMNS = [
    ("model", "model", 11, ""),
    ("option", "option", 32, ""),
    ("target", "target", 6, "g"),
    ("W bits", "w_bits", 6, ".3f"),
    ("A bits", "a_bits", 6, ".3f"),
    ("top-1 %", "top1", 7, ".2f"),
    ("out MSE", "out_mse", 9, ".3e"),
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main(argv, parse, run, lambda rows: table(rows, COLUMNS))


if __name__ == "__main__":
    main()
