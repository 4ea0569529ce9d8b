"""The curve scripts' entry points: ``classification/generate_RD_curves*.py`` (measured and
second-order, weights and activations) and ``classification/show_curves.py``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rdoq.adapters import adapter_registry, get_adapter
from rdoq.adapters.base import Adapter, InputError
from rdoq.authors import CURVE_PARTS, CURVE_RULES, curve_parts
from rdoq.cli import (
    DEFAULT_STEPS,
    RESUME_HINT,
    add_curve_flags,
    add_folds_flag,
    add_model_data_flags,
    add_nprobes_flag,
    check_outdir,
    load_model_and_calib,
    resolve_dataset,
    resolve_device,
    scale_octaves,
    script_entry,
    setup_logging,
)
from rdoq.curves import CurveJob, generate_curves, job_dict
from rdoq.hessian import PAPER_KAPPA, PAPER_PROBE, PROBES, HessianSettings
from rdoq.parts import PartSpec, resolve_part
from rdoq.search import scale_grid
from rdoq.shrink import DEFAULT_FOLDS
from rdoq.store import atomic_write_json, curve_set_name

log = logging.getLogger("rdoq")


@script_entry(RESUME_HINT)
def curves_main(
    kind: str,
    act_mode: str | None = None,
    argv: list[str] | None = None,
    estimator: str = "measured",
    adapters: Mapping[str, Adapter] | None = None,
) -> dict[str, Any]:
    """Entry point of the curve scripts (weights, activations in/out; measured or second-order
    estimator); returns the run summary (the script prints it as one JSON line). Bad flags exit
    via argparse. ``adapters``: the ``--dataset`` choices (default: the built-in adapters)."""
    adapters = adapter_registry() if adapters is None else adapters
    what = "weight" if kind == "weight" else f"activation ({act_mode}put)"
    how = "Measured (first-order)" if estimator == "measured" else "Second-order (Hessian)"
    p = argparse.ArgumentParser(
        description=f"{how} {what} RD curves, one file per layer, resumable."
    )
    add_model_data_flags(p, datasets=adapters)
    add_curve_flags(p, kind)
    if estimator == "hessian":
        h = p.add_argument_group("second-order estimator")
        h.add_argument(
            "--paper-hessian",
            action="store_true",
            help=f"the paper's eq. 18/21 settings in one flag: --probe {PAPER_PROBE} "
            f"--kappa {PAPER_KAPPA:g} (recorded as preset 'paper' in meta.json). "
            f"An explicit --probe/--kappa that differs is an error "
            f"(default: off; the random probes measured better on the digits "
            f"demo)",
        )
        # None = not given, so that a value contradicting --paper-hessian is caught.
        h.add_argument(
            "--probe",
            choices=PROBES,
            default=None,
            help="gradient rows: random output probes (unbiased output-MSE estimate) "
            "or the paper's per-sample output norm (default: random)",
        )
        add_nprobes_flag(h, "calibration sample")
        h.add_argument(
            "--kappa",
            type=float,
            default=None,
            help="weight of the κ/2·‖Δ‖² term, ‖Δ‖² per weight group or, for "
            "activations, per calibration sample (default: 0)",
        )
        h.add_argument(
            "--first-order",
            action="store_true",
            help="add the first-order term 1ᵀP/N (with --probe norm)",
        )
        p.set_defaults(outdir=Path("hessian_curves"))
    # Free for the second-order estimator (its rows are per sample); the measured engine
    # evaluates every chosen point once more, so it is off there unless asked for.
    folds = DEFAULT_FOLDS if estimator == "hessian" else 0
    cost = "free here" if folds else "costs one more evaluation of each chosen point"
    add_folds_flag(p, folds, f"crops of one image stay in one fold; {cost}")
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    ndz = 1 if kind == "act" or args.disable_deadzone else args.maxdeadzones
    bias_corr = args.bias_corr_weight if kind == "weight" else args.bias_corr_act
    authors = curve_parts(kind, args.authors_semantics, bias_corr)
    idle = [p for p in args.authors_semantics if p in CURVE_PARTS[kind] and p not in authors]
    if idle:
        log.info(
            "--authors-semantics %s: no effect on these curves without %s",
            ",".join(idle),
            "-bcw" if kind == "weight" else "-bca",
        )
    steps = args.steps or (
        "group" if any(p in CURVE_RULES for p in authors) else DEFAULT_STEPS[kind]
    )
    # Named after --archname as given, so later paper commands with the same name find it.
    root = args.pathrdcurve or args.outdir / curve_set_name(
        Path(args.archname).name,
        kind,
        ndz,
        args.maxrates,
        args.testsize,
        args.nchannelbatch,
        act_mode,
        getattr(args, "sort_channels", None),
        authors,
        getattr(args, "group_axis", "out"),
    )
    try:
        check_outdir(root, "--pathrdcurve" if args.pathrdcurve else "--outdir")
        args.dataset = resolve_dataset(args.archname, args.dataset)
        part = resolve_part(args.part_id, args.num_parts)
        device = resolve_device(args, part.local_rank)
        on_cuda = device.type == "cuda"
        job = CurveJob(
            **curve_job_common(args, kind, act_mode, ndz, estimator, argv),
            step_grid=args.step_grid,
            precision=args.precision,
            # The quadratic model prices a batch of candidates at one matmul, on any device.
            max_batch=args.max_batch or (256 if estimator == "hessian" else 64 if on_cuda else 1),
            max_lookahead=args.lookahead or (4 if estimator == "hessian" or on_cuda else 1),
            mem_budget_mb=args.mem_budget_mb or _default_budget(device, estimator),
            use_cuts=not args.no_prefix_cache,
            sweep_batch=args.batchsize,
            step_mode=steps,
            bias_corr=bias_corr,
            hessian=HessianSettings.from_flags(
                "paper" if args.paper_hessian else None,
                args.probe,
                args.kappa,
                args.nprobes,
                args.first_order,
                args.seed,
            )
            if estimator == "hessian"
            else None,
            folds=args.folds,
            authors=authors,
            group_axis=getattr(args, "group_axis", "out"),
        )
        job.search_settings()
        model, info, calib = load_model_and_calib(args, get_adapter(args.dataset, adapters))
    except (InputError, ValueError) as e:
        p.error(str(e))
    try:
        summary = generate_curves(
            model, calib.x, vars(info), calib.meta(), job, root, part, device, units=calib.units
        )
    except ValueError as e:
        p.error(str(e))
    write_run_record(root, part, job, device, summary, args)
    return summary


def curve_job_common(
    args: argparse.Namespace,
    kind: str,
    act_mode: str | None,
    ndz: int,
    estimator: str,
    argv: list[str] | None,
) -> dict[str, Any]:
    """The :class:`rdoq.curves.CurveJob` settings that every curve script (classification and
    detection) reads from the same flags; ``argv``: the script's arguments (None: sys.argv)."""
    return {
        "kind": kind,
        "act_mode": act_mode,
        "group_size": args.nchannelbatch,
        "nr": args.maxrates,
        "ndz": ndz,
        "max_steps": args.maxsteps,
        "progress": not args.quiet,
        "estimator": estimator,
        "argv": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
        "scales_log2": scale_grid(scale_octaves(args.scale_octaves, estimator), args.scale_steps),
        "sort_channels": getattr(args, "sort_channels", None),
    }


def write_run_record(
    root: Path,
    part: PartSpec,
    job: CurveJob,
    device: torch.device,
    summary: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    """``run_part<NNN>.json`` in the curve set: the job, device, summary and flags of this
    part's run."""
    atomic_write_json(
        Path(root) / f"run_part{part.part_id:03d}.json",
        {
            "job": job_dict(job),
            "device": str(device),
            "summary": summary,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        },
    )


def _default_budget(device: torch.device, estimator: str = "measured") -> float:
    """Memory budget in MiB: 40% of the free GPU memory; on CPU 2 GiB for the measured engine's
    passes, and for second-order sweeps 1/4 of the machine's memory (the gradient rows and,
    separately, one sweep batch's forward/backward each stay within it)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.4 * free / 2**20
    if estimator == "hessian":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return max(total / 4 / 2**20, 2048.0)
    return 2048.0


@script_entry()
def show_main(argv: list[str] | None = None) -> str:
    """A human summary of every curve set under the given directories (the script prints it)."""
    p = argparse.ArgumentParser(description="Summarise curve sets (meta.json + layers/).")
    p.add_argument("paths", nargs="+", type=Path, help="curve-set directories or their parents")
    args = p.parse_args(argv)
    from rdoq.store import summarize

    roots = []
    for path in args.paths:
        if (path / "meta.json").is_file():
            roots.append(path)
        elif path.is_dir():
            roots += sorted(d for d in path.iterdir() if (d / "meta.json").is_file())
    if not roots:
        p.error(f"no curve set (a directory with meta.json) under {[str(x) for x in args.paths]}")
    lines = []
    for root in roots:
        try:
            s = summarize(root)
        except (ValueError, FileNotFoundError) as e:
            # A damaged file, not a bad flag: one line naming it, without the usage text.
            p.exit(2, f"{p.prog}: error: {e}\n")
        what = s["kind"] + (f" ({s['act_mode']}put)" if s["act_mode"] else "")
        ratios = s["median_dist_ratio"]
        lines += [
            s["curve_set"],
            f"  {what}, {s['estimator']}, model {s['model']}, {s['layers']} layers, "
            f"{s['groups']} groups of {s['group_size']} channels, "
            f"missing layers: {len(s['missing_layers'])}",
            "  bits:                 " + " ".join(f"{b:>8d}" for b in ratios),
            "  median dist/dist(0):  "
            + " ".join(f"{v:8.2e}" if v is not None else "       -" for v in ratios.values()),
        ]
    return "\n".join(lines)
