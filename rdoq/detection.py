"""The OpenPCDet detection scripts (DESIGN §11): their flags and the two entry points (curves;
allocation, applied, measured and evaluated per target) behind
``openpcdet/generate_rd_curves_batch.py`` and ``openpcdet/generate_DP_frontier_batch_act_nchan.py``.

The detector, its calibration frames and its evaluation come from the OpenPCDet adapter
(:class:`rdoq.adapters.detector.OpenPCDetAdapter`, the third implementation of
:class:`rdoq.adapters.base.Adapter`; pcdet is imported only inside its functions). Its model is a
:class:`rdoq.adapters.sparse.FrameRunner` whose calibration tensor is the frame indices and whose
output is the tensor distortion is measured on (the dense BEV feature, or the head's raw maps),
so the curves and the allocation use the classification machinery unchanged and curve sets and
allocation files have the classification formats (DESIGN §5).

Its length (about 710 lines): some 230 lines are the two scripts' own flags (the authors', kept
with their meaning, and ours) with their help texts, the flags they share with the
classification scripts coming from :mod:`rdoq.cli`; the rest are the two entry points, of which
the allocation's applies, measures, saves and evaluates every target.

What the authors' detection scripts got wrong and this module does differently
(``../shared/reference/authors_code_digest.md`` §9):

- calibration frames come from the *train* split, are read once with point shuffling off and
  a seeded sweep choice, collated once and kept on the device, so the reference and every
  candidate see identical voxels;
- ``--num_parts`` defaults to 1 (every layer), parts are balanced by cost and cover all layers;
- every target rate is applied to a copy of the full-precision detector, never to the
  previous target's quantized weights; the DP works in float64;
- mAP/NDS come from pcdet's ``eval_one_epoch`` and are written to ``results.jsonl``; without a
  GPU (pcdet's NMS is CUDA-only) the allocation files and distortions are written first and
  the script then stops with an error naming them.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rdoq.adapters.base import InputError
from rdoq.adapters.detector import (
    DATA_SOURCES,
    DEFAULT_CALIB_FRAMES,
    DEFAULT_SYNTHETIC_POINTS,
    DIST_TENSORS,
    OpenPCDetAdapter,
    evaluation_blocker,
)
from rdoq.cli import (
    DEFAULT_STEPS,
    POINTS_HINT,
    RESUME_HINT,
    add_act_mode_flag,
    add_constraint_flags,
    add_curve_input_flag,
    add_curve_output_flags,
    add_curve_use_flags,
    add_deadzone_flags,
    add_device_flags,
    add_fill_shrink_flags,
    add_folds_flag,
    add_nprobes_flag,
    add_outdir_flag,
    add_part_flags,
    add_precision_flag,
    add_quiet_flag,
    add_scale_flags,
    add_sort_flag,
    add_steps_flags,
    add_target_flags,
    check_curve_use,
    check_outdir,
    default_workers,
    max_bits_of,
    positive,
    resolve_device,
    script_entry,
    setup_logging,
)
from rdoq.shrink import DEFAULT_FOLDS

log = logging.getLogger("rdoq")

# The paper's defaults (authors' tools/ scripts), relative to OpenPCDet's tools/ directory.
PAPER_CFG = "cfgs/nuscenes_models/cbgs_voxel0075_voxelnext.yaml"
PAPER_CHECKPOINT = "../output/nuscene_models/voxelnext_nuscenes_kernel1.pth"
# Exit status of the allocation script when mAP/NDS could not be computed (no GPU).
EXIT_NEEDS_GPU = 3
# Paper flags the authors' scripts parse but never read: accepted so their commands run.
DEAD_CURVE_FLAGS = ("--launcher", "--keys_dist")
DEAD_ALLOC_FLAGS = (
    "--launcher",
    "--bitrangemin",
    "--bitrangemax",
    "--msqe",
    "--bit_rate",
    "--relu_bitwidth",
    "--maxsteps",
)


def _layer_sets(text: str) -> tuple[str, ...]:
    from rdoq.adapters.openpcdet import LAYER_SETS

    sets = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in sets if s not in LAYER_SETS]
    if unknown or not sets:
        raise argparse.ArgumentTypeError(
            f"--layers {text!r}: unknown set(s) {unknown}; choose "
            f"comma-separated from {', '.join(LAYER_SETS)}"
        )
    return sets


# ------------------------------------------------------------------------------------ flags


def add_detector_flags(p: argparse.ArgumentParser, evaluation: bool) -> None:
    """Model, data and device flags shared by both detection scripts (paper names first).
    ``evaluation``: the allocation script, where data flags default to the curve set's."""
    g = p.add_argument_group("detector (OpenPCDet)")
    g.add_argument(
        "--cfg_file",
        type=Path,
        default=Path(PAPER_CFG),
        help="OpenPCDet model config, relative to the current directory or to "
        "--pcdet_tools (default: %(default)s)",
    )
    g.add_argument(
        "--pretrained_model",
        type=Path,
        default=Path(PAPER_CHECKPOINT),
        help="checkpoint in OpenPCDet's format ({'model_state': ...}), relative to "
        "the current directory or to --pcdet_tools (default: %(default)s)",
    )
    g.add_argument(
        "--set",
        dest="set_cfgs",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides KEY VALUE ..., as in OpenPCDet's tools (must come "
        "last), e.g. --set DATA_CONFIG.POINT_CLOUD_RANGE '[-54,-54,-5,54,54,3]'",
    )
    g.add_argument(
        "--pcdet_tools",
        type=Path,
        default=None,
        help="OpenPCDet's tools/ directory (default: the current directory when it "
        "is one, as the paper runs); pcdet is imported from its parent",
    )
    g.add_argument(
        "--pcdet_src",
        type=Path,
        default=None,
        help="OpenPCDet checkout holding pcdet/ (default: the parent of "
        "--pcdet_tools, else an installed pcdet)",
    )
    if not evaluation:  # the allocation quantizes the curve set's layers
        g.add_argument(
            "--layers",
            type=_layer_sets,
            default=("backbone_3d",),
            help="quantized layer sets, comma-separated: backbone_3d (the paper's 3-D "
            "sparse convs), backbone_2d (2-D sparse convs / BEV layers), head, "
            "vfe (default: backbone_3d)",
        )
    d = p.add_argument_group("calibration data")
    sub = " (default: the curve set's)" if evaluation else ""
    d.add_argument(
        "--data",
        choices=DATA_SOURCES,
        default=None if evaluation else "pcdet",
        help="calibration frames: pcdet = the config's dataset, TRAIN split, read "
        "by pcdet's build_dataloader; synthetic = random nuScenes-shaped "
        "frames (tests, machines without nuScenes)" + (sub or " (default: pcdet)"),
    )
    for flag, what in (
        (
            "--calib_frames",
            f"calibration frames (default: --calib_num_iters x --batch_size when "
            f"--calib_num_iters is given, else {DEFAULT_CALIB_FRAMES})" + sub,
        ),
        ("--calib_num_iters", "the paper's calibration size in batches of --batch_size frames"),
        (
            "--points_per_frame",
            f"points per synthetic frame (default: {DEFAULT_SYNTHETIC_POINTS})" + sub,
        ),
    ):
        d.add_argument(flag, type=positive(int, flag), default=None, help=what)
    d.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the synthetic frames and of pcdet's sweep choice (default: 0)" + sub,
    )
    d.add_argument(
        "--dist",
        choices=DIST_TENSORS,
        default=None if evaluation else "bev",
        help="tensor distortion is measured on: bev = the dense BEV feature the "
        "head consumes, head = the head's raw prediction maps" + (sub or " (default: bev)"),
    )
    d.add_argument(
        "--batch_size",
        type=positive(int, "--batch_size"),
        default=4 if evaluation else 2,
        help=(
            "frames per evaluation batch"
            if evaluation
            else "frames per gradient batch of the second-order estimator; the "
            "measured engine runs one frame at a time"
        )
        + " (default: %(default)s)",
    )
    d.add_argument(
        "--workers",
        type=int,
        default=default_workers() if evaluation else 1,
        help="DataLoader workers of the evaluation (frames for curves are read once "
        "in this process) (default: %(default)s)",
    )
    o = p.add_argument_group("device and output")
    add_device_flags(o)
    add_precision_flag(
        o,
        "auto",
        "arithmetic of the distortion measurement: auto = float64 on CPU, float32 on CUDA "
        "(spconv's CUDA kernels have no float64)",
    )
    add_quiet_flag(o)
    o.add_argument(
        "--fix_random_seed",
        action="store_true",
        help="accepted for paper compatibility; everything here is seeded",
    )


def add_curve_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("curves (paper flags)")
    g.add_argument(
        "--nchannelbatch",
        type=positive(int, "--nchannelbatch"),
        default=128,
        help="output channels per group (default: %(default)s, the paper's; every "
        "VoxelNeXt layer is then one group)",
    )
    g.add_argument(
        "--maxrates", type=int, default=11, help="bit widths 0..maxrates-1 (default: %(default)s)"
    )
    add_deadzone_flags(g)
    g.add_argument(
        "--maxsteps",
        type=int,
        default=16,
        help="step candidates per bit width (default: %(default)s, the paper's detection value)",
    )
    add_part_flags(g, paper_parts=6)
    g.add_argument(
        "-bcw",
        "--bias_corr_weight",
        action="store_true",
        help="weight curves of the layer after the bias correction the allocation "
        "deploys with -bcw (measured estimator; the paper's detection curves "
        "use none)",
    )
    g.add_argument(
        "--kind",
        choices=("weight", "act"),
        default="weight",
        help="weight curves (the paper's) or activation curves of the layers' "
        "outputs (--act-mode in: inputs), the features of the sparse tensors "
        "(measured estimator) (default: weight)",
    )
    add_act_mode_flag(g, "activation curves: of each layer's output or input (default: out)")
    add_sort_flag(g)
    add_curve_output_flags(g)
    e = p.add_argument_group("estimator")
    e.add_argument(
        "--estimator",
        choices=("measured", "hessian"),
        default="measured",
        help="measured (first order: a forward per candidate) or hessian (second "
        "order: one gradient sweep, then a quadratic model) (default: measured)",
    )
    e.add_argument(
        "--hessian",
        dest="estimator",
        action="store_const",
        const="hessian",
        help="same as --estimator hessian",
    )
    add_nprobes_flag(e, "frame")
    add_folds_flag(
        e, DEFAULT_FOLDS, "second order only; a frame is one unit, at most one fold per frame"
    )
    add_steps_flags(e, ", ".join(f"{v} for {k}s" for k, v in DEFAULT_STEPS.items()))
    add_scale_flags(e, "1 measured, 0 second order")
    for flag in DEAD_CURVE_FLAGS:
        p.add_argument(
            flag, nargs="*", default=None, help="accepted for paper compatibility; no effect"
        )


def add_alloc_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("allocation (paper flags)")
    add_curve_input_flag(
        g, "weight curve set (directory with meta.json) (default: %(default)s)", "./rd_curves"
    )
    add_target_flags(g)
    g.add_argument(
        "--solver",
        choices=("dp", "lg"),
        default="dp",
        help="dp = dynamic programming (exact up to its budget resolution, "
        "float64), lg = Lagrangian (points on the convex hull) (default: dp)",
    )
    add_curve_use_flags(g)
    add_constraint_flags(g)
    add_fill_shrink_flags(g)
    g.add_argument(
        "-bcw",
        "--bias_corr_weight",
        action="store_true",
        help="weight bias correction: per output channel, the mean output error "
        "E[(W-Ŵ)x] over the calibration frames' active sites is added to the "
        "layer's bias (created if missing)",
    )
    g.add_argument(
        "--act_curve_root_dir",
        type=Path,
        default=None,
        help="activation curve set (or a directory holding one) of the same "
        "detector and frames: joint weight/activation allocation (default: "
        "weights only, as the paper)",
    )
    add_act_mode_flag(g, "which activation curve set --act_curve_root_dir holds (default: out)")
    add_outdir_flag(g, "results directory (default: ./<arch>_<solver>_results)")
    g.add_argument(
        "--save_checkpoint_dir",
        type=Path,
        default=None,
        help="also save each quantized detector as {'model_state': ...} in this "
        "directory, relative to --outdir (default: none)",
    )
    g.add_argument(
        "--skip-eval",
        action="store_true",
        help="write allocations and distortions only, without mAP/NDS (which need "
        "a GPU and nuScenes); exit 0",
    )
    for flag in DEAD_ALLOC_FLAGS:
        p.add_argument(
            flag, nargs="*", default=None, help="accepted for paper compatibility; no effect"
        )


def _precision(args: argparse.Namespace, device: torch.device) -> str:
    if args.precision != "auto":
        return args.precision
    return "float32" if device.type == "cuda" else "float64"


# ------------------------------------------------------------------------------ curves


@script_entry(RESUME_HINT)
def parse_detector_args(
    argv: list[str] | None,
    description: str,
    add_flags: Callable[[argparse.ArgumentParser], None],
    evaluation: bool = False,
) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """One detection script's parser and parsed flags: the detector's
    (:func:`add_detector_flags`) and the script's own (``add_flags``); logging is set up from
    ``--quiet``. The parser reports the script's input errors (``p.error``)."""
    p = argparse.ArgumentParser(description=description)
    add_detector_flags(p, evaluation=evaluation)
    add_flags(p)
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    return p, args


def curves_main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``openpcdet/generate_rd_curves_batch.py``: weight RD curves of a pcdet
    detector's layers, one file per layer, resumable; returns the run summary."""
    from rdoq.cli_curves import curve_job_common, write_run_record
    from rdoq.curves import CurveJob, generate_curves
    from rdoq.hessian import HessianSettings
    from rdoq.parts import resolve_part
    from rdoq.store import curve_set_name

    p, args = parse_detector_args(
        argv,
        "Weight (or activation) RD curves of an OpenPCDet detector "
        "(the paper's tools/generate_rd_curves_batch.py).",
        add_curve_flags,
    )
    try:
        kind, estimator = args.kind, args.estimator
        if args.bias_corr_weight and (kind == "act" or estimator == "hessian"):
            raise InputError(
                "-bcw is offered with measured weight curves only (--kind weight, "
                "--estimator measured): the second-order estimator has no bias "
                "correction for spconv layers, and activations take none; drop "
                "-bcw or the other flag"
            )
        # Activations have no dead-zone quantizer.
        ndz = 1 if args.disable_deadzone or kind == "act" else args.maxdeadzones
        part = resolve_part(args.part_id, args.num_parts)
        adapter = OpenPCDetAdapter()
        args.device = str(resolve_device(args, None))
        runner, info = adapter.build(args)
        setup, spec = runner.setup, runner.setup.spec
        calib = adapter.calib(args, runner, spec.frames, spec.seed)
        layers = adapter.layers(runner)
        act_mode = args.act_mode if kind == "act" else None
        root = args.pathrdcurve or args.outdir / curve_set_name(
            info.arch,
            kind,
            ndz,
            args.maxrates,
            spec.frames,
            args.nchannelbatch,
            act_mode,
            args.sort_channels,
        )
        check_outdir(root, "--pathrdcurve" if args.pathrdcurve else "--outdir")
        job = CurveJob(
            **curve_job_common(args, kind, act_mode, ndz, estimator, argv),
            step_grid=1 if kind == "weight" else 4,
            precision=_precision(args, setup.device),
            max_batch=256 if estimator == "hessian" else 1,
            max_lookahead=4 if estimator == "hessian" else 1,
            sweep_batch=args.batch_size,
            step_mode=args.steps or DEFAULT_STEPS[kind],
            bias_corr=args.bias_corr_weight,
            hessian=(
                HessianSettings(nprobes=args.nprobes, seed=spec.seed)
                if estimator == "hessian"
                else None
            ),
            # Folds need two frames; each frame is its own unit (generate_curves' default).
            folds=(
                min(args.folds, spec.frames) if estimator == "hessian" and spec.frames > 1 else 0
            ),
            layers=tuple(lay.name for lay in layers),
        )
        job.search_settings()
    except (InputError, ValueError, ImportError) as e:
        p.error(str(e))
    try:
        summary = generate_curves(
            runner, calib.x, vars(info), calib.meta(), job, root, part, setup.device
        )
    except ValueError as e:
        p.error(str(e))
    if kind == "weight":
        summary["weights_total"] = int(sum(np.prod(lay.shape) for lay in layers))
    write_run_record(root, part, job, setup.device, summary, args)
    return summary


# ------------------------------------------------------------------------------ allocation


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


def _size_mb(model: nn.Module, alloc: dict[str, Any]) -> tuple[float, float]:
    """(quantized, full-precision) parameter size in MB: quantized weights at their bits,
    everything else (biases, BN, layers left in full precision) at 32 bits."""
    from rdoq.groups import group_bounds, weight_numel

    total = sum(p.numel() for p in model.parameters())
    q_bits = q_numel = 0
    for e in alloc["weights"].values():
        bounds = group_bounds(int(e["channels"]), int(e["group_size"]))
        numel = [weight_numel(tuple(e["shape"]), b, e.get("group_axis", "out")) for b in bounds]
        q_bits += sum(b * n for b, n in zip(e["bits"], numel, strict=True))
        q_numel += sum(numel)
    mb = 8 * 2**20
    return (q_bits + 32.0 * (total - q_numel)) / mb, 32.0 * total / mb


@script_entry(POINTS_HINT)
def allocate_main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``openpcdet/generate_DP_frontier_batch_act_nchan.py``: allocate bits for
    each target rate from a curve set, apply each to the full-precision weights (restored for
    every target), measure its distortion on the calibration frames and evaluate mAP/NDS (GPU).
    Returns the rows, the printed table and ``stopped`` (why mAP/NDS were not computed, or
    None)."""
    from rdoq.allocfile import save_allocation
    from rdoq.apply import apply_allocation, estimate_corrections, remove_act_quantizers
    from rdoq.cli import warn_correction_mismatch
    from rdoq.pipeline import TableSpec, point_label, solve_targets_shrunk
    from rdoq.report import append_results, format_table
    from rdoq.store import find_act_curve_set, open_curve_set

    p, args = parse_detector_args(
        argv,
        "Bit allocation of an OpenPCDet detector from RD curves, "
        "then apply and evaluate (the paper's "
        "tools/generate_DP_frontier_batch_act_nchan.py).",
        add_alloc_flags,
        evaluation=True,
    )
    try:
        store = open_curve_set(args.pathrdcurve, "weight")
        meta = store.meta
        astore = None
        if args.act_curve_root_dir is not None:
            aroot = find_act_curve_set(
                args.act_curve_root_dir, meta["model"], args.act_mode, meta["group_size"]
            )
            astore = open_curve_set(aroot, "act", args.act_mode)
            if astore.meta["calib"].get("sha256") != meta["calib"].get("sha256"):
                raise InputError(
                    f"the activation curves {aroot} were measured on other "
                    f"calibration frames than {args.pathrdcurve} (sha256 "
                    f"{str(astore.meta['calib'].get('sha256'))[:12]}… vs "
                    f"{str(meta['calib'].get('sha256'))[:12]}…); make both with "
                    f"the same --data/--calib_frames/--seed/--set"
                )
        elif args.act_target_rates is not None:
            raise InputError(
                "--act-target-rates needs activation curves: pass "
                "--act_curve_root_dir DIR (made with generate_rd_curves_batch.py "
                "--kind act)"
            )
        check_curve_use(args, meta, args.pathrdcurve)
        outdir = args.outdir or Path(f"{meta['model']}_{args.solver}_results")
        check_outdir(outdir, "--outdir")
        adapter = OpenPCDetAdapter()
        args.device = str(resolve_device(args, None))
        args.stored_calib = meta["calib"]  # calibration flags not given: the curves'
        runner, info = adapter.build(args)
        setup = runner.setup
        for key in ("model", "checkpoint_sha256"):
            mine = info.arch if key == "model" else info.checkpoint_sha256
            if meta.get(key) != mine:
                raise InputError(
                    f"{args.pathrdcurve} was measured with {key}={meta.get(key)!r}, "
                    f"this run loads {key}={mine!r}; pass the --cfg_file and "
                    f"--pretrained_model of the curves"
                )
        names = [e["name"] for e in meta["layers"]]
        modules = dict(runner.named_modules())
        dims = (
            {n: adapter.channel_axis(modules[n]) for n in astore.layer_names() if n in modules}
            if astore is not None
            else None
        )
        spec = TableSpec(
            store,
            astore,
            act_channel_dims=dims,
            uniform_only=bool(args.closedeadzone),
            allowed_bits=args.bit_list,
            min_bits=args.minrate,
            max_bits=max_bits_of(args),
        )
        points, solve_s = solve_targets_shrunk(
            spec,
            list(args.target_rates),
            args.act_target_rates,
            args.solver,
            args.layerwise,
            fill=not args.no_fill,
            shrink=args.shrink,
        )
        warn_correction_mismatch(store, "-bcw", args.bias_corr_weight)
    except (InputError, ValueError, FileNotFoundError, ImportError) as e:
        p.error(str(e))
    # The curves' arithmetic, so the distortion compares with pred_dist; float32 on CUDA.
    auto = "float32" if setup.device.type == "cuda" else meta.get("precision", "float64")
    dtype = getattr(torch, auto if args.precision == "auto" else args.precision)
    runner.to(dtype=dtype)
    calib = adapter.calib(args, runner, len(setup.frames), setup.spec.seed)
    if calib.meta()["sha256"] != meta["calib"].get("sha256"):
        p.error(
            f"the calibration frames rebuilt here ({setup.spec.source()}, "
            f"{len(setup.frames)} frames) differ from those of {args.pathrdcurve} (sha256 "
            f"{str(meta['calib'].get('sha256'))[:12]}…); pass the --data/--calib_frames/"
            f"--seed/--set of the curves"
        )
    with torch.no_grad():
        reference = runner(calib.x)  # (N, …)
    stopped = None if args.skip_eval else evaluation_blocker(setup.spec)
    data = adapter.eval_data(args, runner)
    method = "+".join(
        [args.solver]
        + [t for t, on in (("bcw", args.bias_corr_weight), ("layerwise", args.layerwise)) if on]
    )
    rows, written = [], []
    # pcdet detectors hold their dataset (spconv's voxel generator cannot be deep-copied), so
    # each target is applied in place to weights restored from this full-precision copy; -bcw
    # creates biases on layers without one, which are removed again.
    model = runner.net  # the bare detector: its state dict is pcdet's checkpoint format
    fp_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    biasless = [m for m in model.modules() if getattr(m, "bias", 0) is None]
    for target, point in zip(args.target_rates, points, strict=True):
        alloc = point.allocation(args.solver)
        alloc.update(
            weights_source=info.weights_source,
            checkpoint_sha256=info.checkpoint_sha256,
            cfg_file=str(setup.cfg_file),
            set=list(args.set_cfgs),
        )
        # Every target starts from the full-precision detector, never the previous target's.
        remove_act_quantizers(runner)
        for m in biasless:
            m.bias = None
        model.load_state_dict(fp_state)
        if args.bias_corr_weight:
            alloc["corrections"] = estimate_corrections(
                runner, alloc, calib.x, bcw=True, bca=False, batch_size=1
            )
        apath = outdir / f"allocation_{point_label(point.tags)}.json"
        save_allocation(apath, alloc)
        written.append(apath)
        apply_allocation(runner, alloc, in_place=True)
        with torch.no_grad():
            out = runner(calib.x)
        size_mb, fp_mb = _size_mb(model, alloc)
        row = {
            "model": info.arch,
            "method": method,
            "target_bits": float(target),
            "act_target_bits": point.tags.get("act_target_bits"),
            "w_bits": alloc["summary"]["w_bits"],
            "a_bits": alloc["summary"].get("a_bits"),
            "mAP": None,
            "NDS": None,
            "out_mse": _mse(out, reference),
            "dist": setup.spec.dist,
            "pred_dist": alloc["summary"]["pred_dist"],
            "size_mb": size_mb,
            "fp_size_mb": fp_mb,
            "solve_s": solve_s,
            "shrink_alpha": point.record.get("shrink_alpha"),
            "eval_s": None,
            "layers": len(names),
            "allocation": str(apath.relative_to(outdir)),
            "created": datetime.now(timezone.utc).isoformat(),
        }
        if args.save_checkpoint_dir is not None:
            cdir = outdir / args.save_checkpoint_dir
            cdir.mkdir(parents=True, exist_ok=True)
            act = point.tags.get("act_target_bits")
            label = f"{target:.2f}" + ("" if act is None else f"_a{act:g}")
            cpath = cdir / f"{info.arch}_rate={label}.pth"
            blob = {
                "model_state": {
                    k: v.float() if v.is_floating_point() else v
                    for k, v in model.state_dict().items()
                }
            }
            if alloc["acts"]:  # pcdet's loader reads model_state only; the rest is ours
                blob |= {
                    "act_quantizers": {n: q.state() for n, q in runner.rdoq_act_quantizers.items()},
                    "act_mode": alloc["act_mode"],
                    "allocation": json.dumps(alloc),
                }
            torch.save(blob, cpath)
            row["checkpoint"] = str(cpath.relative_to(outdir))
        if not args.skip_eval and stopped is None:
            t0 = time.perf_counter()
            runner.to(dtype=torch.float32)
            data.result_dir = outdir / "eval" / point_label(point.tags)
            metrics = adapter.evaluate(runner, data, None, setup.device)
            row |= {
                "mAP": metrics["mAP"],
                "NDS": metrics["NDS"],
                "metrics": metrics["metrics"],
                "eval_s": time.perf_counter() - t0,
            }
            runner.to(dtype=dtype)
        rows.append(row)
        append_results(outdir, [row])
        log.info(
            "%s target %g: W %.3f A %s bits, distortion %.3e (predicted %.3e)",
            method,
            target,
            row["w_bits"],
            "-" if row["a_bits"] is None else f"{row['a_bits']:.3f}",
            row["out_mse"],
            row["pred_dist"],
        )
    remove_act_quantizers(runner)
    for m in biasless:
        m.bias = None
    model.load_state_dict(fp_state)
    if stopped is not None:
        stopped = (
            f"mAP/NDS evaluation needs a GPU with OpenPCDet's CUDA ops built and "
            f"nuScenes (--data pcdet): {stopped}. Written: "
            f"{', '.join(str(w) for w in written)} and the distortion rows in "
            f"{outdir / 'results.jsonl'}. To evaluate, run the same command on a GPU "
            f"machine from OpenPCDet's tools/ directory with --data pcdet; pass "
            f"--skip-eval to stop here without an error"
        )
    return {"outdir": str(outdir), "rows": rows, "table": format_table(rows), "stopped": stopped}
