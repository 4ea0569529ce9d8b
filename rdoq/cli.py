"""Command-line flags (the paper's names, mapped once to glossary names) and script entry points.

The scripts in ``classification/`` are one-line wrappers around the ``main_*`` functions here.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from rdoq.adapters.timm_imagenet import InputError, build_model, imagenet_calib, synthetic_calib
from rdoq.curves import CurveJob, generate_curves, job_dict
from rdoq.parts import resolve_part
from rdoq.store import atomic_write_json, curve_set_name

log = logging.getLogger("rdoq")

# Paper flags that the authors' scripts parse but never read; accepted so paper commands run.
DEAD_FLAGS = ("--modeid", "--nprocessings", "--numdatareads")


def _positive(kind: type, name: str):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text}")
        return value
    return parse


def add_model_data_flags(p: argparse.ArgumentParser, default_testsize: int = 64) -> None:
    """Model, data and device flags shared by every classification script."""
    g = p.add_argument_group("model and data")
    g.add_argument("--archname", default="mobilenetv2py",
                   help="timm model name (paper zoo names such as resnet50py are mapped); "
                        "default: %(default)s")
    g.add_argument("--checkpoint", "--override-checkpoint", dest="checkpoint", type=Path,
                   default=None, help="state dict / timm checkpoint file to load (weights only)")
    g.add_argument("--random-init", action="store_true",
                   help="use seeded random weights (smoke tests only; never the default)")
    g.add_argument("--dataset", choices=("imagenet", "synthetic"), default="imagenet",
                   help="imagenet: ImageFolder at --datapath; synthetic: seeded randn inputs "
                        "(tests/benchmarks only)")
    g.add_argument("--datapath", type=Path, default=Path("./ImageNet2012/"),
                   help="ImageNet root with train/ and val/ (default: %(default)s)")
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
    else:
        g.add_argument("--maxdeadzones", type=int, default=1,
                       help="accepted so paper command lines run; activations have no dead zone")
        g.add_argument("-bca", "--bias_corr_act", action="store_true",
                       help="accepted for paper compatibility: only changed a directory name there")
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
    e.add_argument("--max-batch", type=_positive(int, "--max-batch"), default=None,
                   help="candidates per pass (default: 1 on CPU, where wider passes measured "
                        "slower per sample; 64 on CUDA)")
    e.add_argument("--lookahead", type=_positive(int, "--lookahead"), default=None,
                   help="speculative steps per search chain when chains are few (default: 1 on "
                        "CPU, 4 on CUDA); never changes the curves")
    e.add_argument("--mem-budget-mb", type=_positive(float, "--mem-budget-mb"), default=None,
                   help="activation memory per pass in MiB (default: 2048 CPU, 40%% of free CUDA)")
    e.add_argument("--no-prefix-cache", action="store_true",
                   help="run every candidate from the network input (for checks)")
    e.add_argument("--mute-print", "--quiet", dest="quiet", action="store_true",
                   help="no progress bars")


def resolve_device(args: argparse.Namespace, local_rank: int | None) -> torch.device:
    """--device, else torchrun's LOCAL_RANK, else cuda:--gpuid when CUDA exists, else CPU."""
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise ValueError(f"--device {args.device!r} is not a torch device ({e}); use e.g. "
                             f"cpu, cuda or cuda:1") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device} but CUDA is not available; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank if local_rank is not None else args.gpuid}")
    return torch.device("cpu")


def load_model_and_calib(args: argparse.Namespace):
    """Build the model and the calibration set named by the flags."""
    if args.checkpoint is not None and args.random_init:
        raise InputError("--checkpoint and --random-init contradict each other; pass one of them")
    model, info = build_model(args.archname, args.checkpoint, args.random_init, args.seed)
    if args.dataset == "synthetic":
        calib = synthetic_calib(args.testsize, model, args.seed)
    else:
        calib = imagenet_calib(args.datapath, args.testsize, model, args.seed)
    return model, info, calib


def setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def curves_main(kind: str, act_mode: str | None = None,
                argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of the measured curve scripts (weights, activations in/out); returns the run
    summary (the script prints it as one JSON line). Bad flags exit via argparse."""
    what = "weight" if kind == "weight" else f"activation ({act_mode}put)"
    p = argparse.ArgumentParser(description=f"Measured (first-order) {what} RD curves, one file "
                                            "per layer, resumable.")
    add_model_data_flags(p)
    add_curve_flags(p, kind)
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    ndz = 1 if kind == "act" or args.disable_deadzone else args.maxdeadzones
    try:
        part = resolve_part(args.part_id, args.num_parts)
        device = resolve_device(args, part.local_rank)
        on_cuda = device.type == "cuda"
        job = CurveJob(
            kind=kind, act_mode=act_mode, group_size=args.nchannelbatch, nr=args.maxrates,
            ndz=ndz, max_steps=args.maxsteps, step_grid=args.step_grid, precision=args.precision,
            max_batch=args.max_batch or (64 if on_cuda else 1),
            max_lookahead=args.lookahead or (4 if on_cuda else 1),
            mem_budget_mb=args.mem_budget_mb or _default_budget(device),
            use_cuts=not args.no_prefix_cache, progress=not args.quiet,
            argv=[Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
        job.search_settings()
        model, info, calib = load_model_and_calib(args)
    except (InputError, ValueError) as e:
        p.error(str(e))
    # Named after --archname as given, so later paper commands with the same name find it.
    root = args.pathrdcurve or args.outdir / curve_set_name(
        Path(args.archname).name, kind, ndz, args.maxrates, args.testsize, args.nchannelbatch,
        act_mode)
    try:
        summary = generate_curves(model, calib.x, vars(info), calib.meta(), job, root, part,
                                  device)
    except ValueError as e:
        p.error(str(e))
    atomic_write_json(Path(root) / f"run_part{part.part_id:03d}.json",
                      {"job": job_dict(job), "summary": summary, "args": _jsonable(vars(args))})
    return summary


def _default_budget(device: torch.device) -> float:
    """Activation memory per pass in MiB: 40% of the free GPU memory, 2 GiB on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.4 * free / 2**20
    return 2048.0


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}



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
        s = summarize(root)
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
