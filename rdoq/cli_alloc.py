"""The allocation scripts' flags and entry point: DP, Lagrangian and slope-sweep allocation
(``classification/generate_{DP,LG,RD_frontier}_*``) from weight and activation curve sets, then
``rdoq.pipeline.run_points`` (correct, apply, evaluate, record)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rdoq.adapters import adapter_registry, get_adapter
from rdoq.adapters.base import Adapter, InputError
from rdoq.authors import act_curve_rules, check_curve_rules, effective_parts
from rdoq.authors import add_flag as add_authors_flag
from rdoq.cli import (
    PAPER_BIT_RATE,
    POINTS_HINT,
    RATE_FLAGS,
    add_act_mode_flag,
    add_constraint_flags,
    add_curve_input_flag,
    add_curve_use_flags,
    add_eval_data_flags,
    add_eval_device_flags,
    add_fill_shrink_flags,
    add_fp_act_flag,
    add_model_flags,
    add_outdir_flag,
    add_quiet_flag,
    add_target_flags,
    build_any_model,
    check_curves_match,
    check_outdir,
    eval_data_for,
    fp_act_layers,
    max_bits_of,
    method_name,
    positive,
    rebuild_calib,
    resolve_dataset,
    resolve_device,
    script_entry,
    setup_logging,
    warn_correction_mismatch,
)
from rdoq.retrain import RetrainSpec
from rdoq.store import curve_set_name

log = logging.getLogger("rdoq")


# The paper's slope grid of the output-activation frontier: log2 λ = -35 + 0.5 j.
FRONTIER_SLOPE0, FRONTIER_SLOPE_STEP = -35.0, 0.5


def add_alloc_flags(
    p: argparse.ArgumentParser, method: str, datasets: Mapping[str, Adapter] | None = None
) -> None:
    """Flags of the allocation scripts (paper names first)."""
    g = p.add_argument_group("model and data")
    add_model_flags(g, datasets=datasets)
    add_eval_data_flags(g)
    if method == "uniform":
        u = p.add_argument_group("uniform baseline")
        add_target_flags(u, uniform=True)
        u.add_argument(
            "--no-acts",
            action="store_true",
            help="keep every activation in full precision (weights only)",
        )
        add_act_mode_flag(u, "quantize layer outputs (as the act_out_nchan curves) or inputs")
        u.add_argument(
            "--calibsize",
            type=positive(int, "--calibsize"),
            default=64,
            help="calibration samples for activation steps and corrections",
        )
        add_fp_act_flag(u)
        s = p.add_argument_group("corrections")
    else:
        c = p.add_argument_group("curves")
        add_curve_input_flag(c, "weight curve set (directory with meta.json)")
        c.add_argument(
            "--act_curve_root_dir",
            type=Path,
            default=None,
            help="activation curve set, or a directory holding it (found by model and "
            "act mode); none found is an error (default: the current "
            "directory, as in the paper)",
        )
        c.add_argument(
            "--weights-only",
            action="store_true",
            help="quantize weights only: no activation curves are looked for and "
            "every activation stays in full precision (default: off)",
        )
        add_curve_use_flags(c)
        c.add_argument(
            "--smooth-dists",
            action="store_true",
            help="running minimum of each curve over bits (a group never pays for bits "
            "that do not lower its distortion)",
        )
        c.add_argument(
            "--monotone",
            choices=("auto", "on", "off"),
            default="auto",
            help="fit each curve by its least-squares non-increasing version over "
            "bits, so estimation noise that makes a wider width look worse "
            "cannot steer the allocation: on, off (the paper), or auto = the "
            "weight curves when they were measured with -bcw (default: auto)",
        )
        add_fill_shrink_flags(c, fill=method != "frontier")
        add_fp_act_flag(c)
        s = p.add_argument_group("allocation")
        if method == "frontier":
            s.add_argument(
                "--maxslopesteps",
                type=positive(int, "--maxslopesteps"),
                default=192,
                help="slopes log2 λ = -35 + 0.5 j, j < maxslopesteps (default: 192)",
            )
            s.add_argument(
                "--slopes",
                type=float,
                nargs="+",
                default=None,
                help="explicit log2 λ values (dist per bit) instead of the grid",
            )
        else:
            add_target_flags(s)
            s.add_argument(
                "--maxslopesteps",
                type=int,
                default=None,
                help="accepted so the paper's README command runs; no effect here",
            )
        add_constraint_flags(s)
        s.add_argument(
            "--rate",
            choices=RATE_FLAGS,
            default=None,
            help="what a group's rate counts, in bits: 'bits' = bit width × "
            "elements (fixed-width code), 'entropy' = empirical entropy of its "
            "quantized symbols × elements (entropy-coded; weights only, needs "
            "--weights-only); targets are then average entropy bits per weight "
            "(default: bits)",
        )
        s.add_argument(
            "--bit_rate",
            type=int,
            choices=(0, 1),
            default=None,
            help="the paper's spelling of --rate: 1 = bits, 0 = entropy (the paper's "
            "default was 0; here the default is 1 = --rate bits)",
        )
    s.add_argument(
        "-bcw",
        "--bias_corr_weight",
        action="store_true",
        help="per-channel bias correction of weight quantization, estimated on the "
        "calibration set and stored in the allocation",
    )
    s.add_argument(
        "-bca",
        "--bias_corr_act",
        action="store_true",
        help="per-channel offset correcting the mean activation quantization error, "
        "estimated on the calibration set (never on evaluated data)",
    )
    if method != "uniform":
        add_authors_flag(
            s,
            "deadzone and search must be those the curves were measured with; bcw makes -bcw "
            "the per-channel affine weight map, bca makes -bca the oracle that reads the "
            "evaluated batch",
        )
    add_retrain_flags(p)
    o = p.add_argument_group("output and device")
    add_outdir_flag(o, "results directory (default: ./<archname>_<method>_results)")
    o.add_argument(
        "--save-model",
        action="store_true",
        help="also save model_<target>.pth: fake-quantized weights + activation quantizers",
    )
    add_eval_device_flags(o)
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    add_quiet_flag(o)


def add_retrain_flags(p: argparse.ArgumentParser) -> None:
    """The paper's fine-tuning flags: each allocated point is also fine-tuned on the
    calibration set and recorded as its own point (rdoq.retrain)."""
    r = p.add_argument_group("fine-tuning after allocation (on the calibration set only)")
    for flag, what in (
        (
            "--re-calibrate",
            "also record each point with its biases and normalisation affine parameters tuned "
            "toward the full-precision outputs on the calibration set (method +rc; the tuned "
            "state is saved as model_<target>.pth beside its allocation)",
        ),
        (
            "--re-train",
            "also record each point with every parameter tuned, the quantized weights through "
            "the allocation's fixed quantizers with a straight-through estimator (method +rt)",
        ),
    ):
        r.add_argument(flag, action="store_true", help=what)
        r.add_argument(
            f"{flag}-lr",
            type=float,
            default=1e-4,
            help=f"Adam learning rate of {flag} (default: %(default)s, the paper's)",
        )
    r.add_argument(
        "--re-train-iter",
        type=int,
        default=20,
        help="fine-tuning steps of --batchsize calibration samples (default: %(default)s, the "
        "paper's)",
    )
    r.add_argument(
        "--re-train-epoch",
        type=int,
        default=1,
        help="with a value > 1: that many passes over the calibration set instead of "
        "--re-train-iter steps, as in the paper (default: 1)",
    )


def retrain_specs(args: argparse.Namespace, n_calib: int) -> list[RetrainSpec]:
    """The fine-tunings the flags ask for (none without --re-calibrate / --re-train)."""
    iters = args.re_train_iter
    if args.re_train_epoch > 1:
        iters = args.re_train_epoch * -(-n_calib // args.batchsize)
    asked = [("calibrate", args.re_calibrate, args.re_calibrate_lr)]
    asked.append(("train", args.re_train, args.re_train_lr))
    try:
        return [RetrainSpec(m, lr, iters, args.batchsize, args.seed) for m, on, lr in asked if on]
    except ValueError as e:
        raise InputError(f"{e} (--re-train-iter, --re-calibrate-lr / --re-train-lr)") from e


def _resolve_rate(args: argparse.Namespace) -> str:
    """``--rate``, or its paper spelling ``--bit_rate``; contradicting values are refused."""
    paper = PAPER_BIT_RATE.get(args.bit_rate) if args.bit_rate is not None else None
    if args.rate is not None and paper is not None and args.rate != paper:
        raise InputError(
            f"--rate {args.rate} contradicts --bit_rate {args.bit_rate} (= --rate "
            f"{paper}); pass one of them"
        )
    return args.rate or paper or "bits"


def _act_curve_set(
    args: argparse.Namespace, arch: str, act_mode: str, wmeta: dict[str, Any]
) -> Path:
    """The activation curve set under ``--act_curve_root_dir`` (default: the current directory,
    as the paper's scripts had it). None there is an InputError naming the directory searched,
    the curve set expected and the fixes: a joint target without activation curves would
    silently quantize weights only."""
    from rdoq.store import find_act_curve_set

    given = args.act_curve_root_dir is not None
    root = args.act_curve_root_dir if given else Path(".")
    rules = act_curve_rules(args.authors_semantics)
    try:
        return find_act_curve_set(root, arch, act_mode, args.nchannelbatch, rules)
    except FileNotFoundError as e:
        # The paper's name; nr and ns as the weight curves', nf unknown unless --nchannelbatch.
        nf = args.nchannelbatch or 0
        expected = curve_set_name(
            Path(args.archname).name,
            "act",
            1,
            len(wmeta["bits"]),
            int(wmeta["calib"]["size"]),
            nf,
            act_mode,
            authors=rules,
        )
        if not args.nchannelbatch:
            expected = expected.replace("_nf_0000_", "_nf_*_")
        script = (
            "generate_RD_curves_act_out_nchan.py"
            if act_mode == "out"
            else "generate_RD_curves_act_nchan.py"
        )
        where = f"{root} ({root.resolve()})" if given else f"the current directory {Path.cwd()}"
        if not root.is_dir():
            where += ", which does not exist"
        made = f" made with the authors' rules {list(rules)}" if rules else ""
        raise InputError(
            f"no {act_mode}put activation curve set of {arch}{made} in {where} "
            f"(searched by --act_curve_root_dir{'' if given else ', default .'}): "
            f"expected a directory like {expected} with its meta.json. Make it "
            f"with classification/{script} --outdir DIR and pass "
            f"--act_curve_root_dir DIR, or pass --weights-only to keep every "
            f"activation in full precision"
        ) from e


@script_entry(POINTS_HINT)
def allocate_main(
    method: str,
    act_mode: str = "out",
    argv: list[str] | None = None,
    adapters: Mapping[str, Adapter] | None = None,
) -> dict[str, Any]:
    """Entry point of the DP (``method="dp"``), Lagrangian-target (``"lg"``) and slope-sweep
    (``"frontier"``) scripts: solve, apply, evaluate, write artifacts. Returns the rows and the
    printed table. ``adapters``: the ``--dataset`` choices (default: the built-in adapters)."""
    from rdoq.allocation import ACT, frontier_choices
    from rdoq.pipeline import (
        SolvedPoint,
        TableSpec,
        distinct_columns,
        run_points,
        solve_targets_shrunk,
    )
    from rdoq.store import open_curve_set

    titles = {
        "dp": "dynamic programming",
        "lg": "Lagrangian (target rates)",
        "frontier": "Lagrangian slope sweep",
    }
    p = argparse.ArgumentParser(
        description=f"Bit allocation by {titles[method]} from measured "
        "curves, then apply and evaluate."
    )
    adapters = adapter_registry() if adapters is None else adapters
    add_alloc_flags(p, method, adapters)
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    outdir = args.outdir or Path(f"{Path(args.archname).name}_{method}_results")
    try:
        if args.weights_only and args.act_curve_root_dir is not None:
            raise InputError(
                f"--weights-only and --act_curve_root_dir {args.act_curve_root_dir} "
                f"contradict each other; drop one of them"
            )
        args.rate = _resolve_rate(args)
        check_outdir(outdir, "--outdir")
        args.dataset = resolve_dataset(args.archname, args.dataset)
        adapter = get_adapter(args.dataset, adapters)
        device = resolve_device(args, None)
        dtype = getattr(torch, args.precision)
        model, info = build_any_model(args, adapter)
        wstore = open_curve_set(args.pathrdcurve, "weight")
        check_curves_match(args, info, wstore.meta, args.pathrdcurve)
        check_curve_rules(wstore.meta, args.authors_semantics, "--authors-semantics")
        astore = None
        if not args.weights_only:
            aroot = _act_curve_set(args, info.arch, act_mode, wstore.meta)
            astore = open_curve_set(aroot, "act", act_mode)
            check_curves_match(args, info, astore.meta, aroot)
            check_curve_rules(astore.meta, args.authors_semantics, "--authors-semantics")
        idle = [
            f"{p} (without {flag})"
            for p, flag, on in (
                ("bcw", "-bcw", args.bias_corr_weight),
                ("bca", "-bca and activations", args.bias_corr_act and astore is not None),
            )
            if p in args.authors_semantics and not on
        ]
        if idle:
            log.info("--authors-semantics: no effect of %s", ", ".join(idle))
        # The parts in effect, as the allocations and results record them.
        args.authors_semantics = effective_parts(
            args.authors_semantics,
            [wstore.meta] + ([astore.meta] if astore else []),
            args.bias_corr_weight,
            args.bias_corr_act and astore is not None,
        )
        fp_acts = fp_act_layers(args.fp_act_layers, astore.layer_names() if astore else [])
        modules = dict(model.named_modules())
        dims = {
            n: adapter.channel_axis(modules[n])
            for n in (astore.layer_names() if astore else [])
            if n in modules
        }
        max_bits = max_bits_of(args)
        spec = TableSpec(
            wstore,
            astore,
            fp_acts,
            dims,
            uniform_only=bool(args.closedeadzone),
            rate=args.rate,
            monotone=args.monotone,
            allowed_bits=args.bit_list,
            min_bits=args.minrate,
            max_bits=max_bits,
            smooth=args.smooth_dists,
        )
        if method == "frontier":
            if args.shrink not in ("auto", "off"):
                raise InputError(
                    f"--shrink {args.shrink} needs target rates: the slope sweep "
                    f"has none to cross-validate at; use the DP or LG script"
                )
            table = spec.table()
            slopes = args.slopes or [
                FRONTIER_SLOPE0 + FRONTIER_SLOPE_STEP * j for j in range(args.maxslopesteps)
            ]
            sweep, solve_s = frontier_choices(table, slopes, args.layerwise)
            solved = [
                SolvedPoint(c, table, {}, tags) for c, tags in distinct_columns(sweep, slopes)
            ]
            solve_s /= max(len(solved), 1)
        else:
            solved, solve_s = solve_targets_shrunk(
                spec,
                args.target_rates,
                args.act_target_rates,
                method,
                args.layerwise,
                fill=not args.no_fill,
                shrink=args.shrink,
            )
            table = solved[0].table
        fit = spec.monotone_mask(table)
        # What the fit covered, for the results: "weights", "all" or "none".
        args.monotone_applied = "none" if not fit.any() else "all" if fit.all() else "weights"
        calib = None
        theirs = args.authors_semantics
        warn_correction_mismatch(wstore, "-bcw", args.bias_corr_weight, "bcw" in theirs)
        warn_correction_mismatch(astore, "-bca", args.bias_corr_act, "bca" in theirs)
        if args.bias_corr_weight or args.bias_corr_act or args.re_calibrate or args.re_train:
            calib = rebuild_calib(args, model, wstore.meta, adapter).x
            calib = calib.to(device=device, dtype=dtype)
            args.retrain_specs = retrain_specs(args, calib.shape[0])
        model = model.to(device=device, dtype=dtype).eval()
        data = eval_data_for(args, model, adapter)
        name = method_name(method, args)
        allocs = [(point.allocation(method), point.tags) for point in solved]
        log.info(
            "%s: %d items (%d activation groups), %d points to evaluate",
            name,
            len(table.kind),
            int((table.kind == ACT).sum()),
            len(allocs),
        )
        return run_points(
            args, adapter, model, info, data, calib, outdir, name, allocs, solve_s, device
        )
    except (InputError, ValueError, FileNotFoundError) as e:
        p.error(str(e))
