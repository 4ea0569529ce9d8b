"""The OpenPCDet detection scripts (DESIGN §11): flags, calibration frames, curves, allocation
and evaluation of a pcdet detector, behind ``openpcdet/generate_rd_curves_batch.py`` and
``openpcdet/generate_DP_frontier_batch_act_nchan.py``.

pcdet is imported only inside functions (through :mod:`rdoq.adapters.openpcdet`). The curves and
the allocation use the classification machinery unchanged: the detector is wrapped in a
:class:`rdoq.adapters.sparse.FrameRunner` whose calibration tensor is the frame indices and whose
output is the tensor distortion is measured on (the dense BEV feature, or the head's raw maps),
so curve sets and allocation files have the classification formats (DESIGN §5).

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
import contextlib
import copy
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from rdoq.adapters.base import InputError, file_sha256
from rdoq.cli import (
    DEFAULT_STEPS,
    POINTS_HINT,
    RESUME_HINT,
    add_scale_flags,
    check_outdir,
    default_workers,
    resolve_device,
    script_entry,
    setup_logging,
    shrink_mode,
)
from rdoq.shrink import DEFAULT_FOLDS
from rdoq.steps import STEP_MODES

log = logging.getLogger("rdoq")

# The paper's defaults (authors' tools/ scripts), relative to OpenPCDet's tools/ directory.
PAPER_CFG = "cfgs/nuscenes_models/cbgs_voxel0075_voxelnext.yaml"
PAPER_CHECKPOINT = "../output/nuscene_models/voxelnext_nuscenes_kernel1.pth"
DIST_TENSORS = ("bev", "head")
DATA_SOURCES = ("pcdet", "synthetic")
# Calibration frames when neither --calib_frames nor --calib_num_iters is given.
DEFAULT_CALIB_FRAMES = 4
# Points per synthetic frame (--points_per_frame): about a nuScenes 10-sweep frame's third.
DEFAULT_SYNTHETIC_POINTS = 100_000
# Exit status of the allocation script when mAP/NDS could not be computed (no GPU).
EXIT_NEEDS_GPU = 3
# Paper flags the authors' scripts parse but never read: accepted so their commands run.
DEAD_CURVE_FLAGS = ("--launcher", "--keys_dist")
DEAD_ALLOC_FLAGS = ("--launcher", "--bitrangemin", "--bitrangemax", "--msqe", "--bit_rate",
                    "--relu_bitwidth", "--maxsteps")


def _positive_int(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text}")
        return value
    return parse


def _layer_sets(text: str) -> tuple[str, ...]:
    from rdoq.adapters.openpcdet import LAYER_SETS

    sets = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in sets if s not in LAYER_SETS]
    if unknown or not sets:
        raise argparse.ArgumentTypeError(f"--layers {text!r}: unknown set(s) {unknown}; choose "
                                         f"comma-separated from {', '.join(LAYER_SETS)}")
    return sets


# ------------------------------------------------------------------------------------ flags


def add_detector_flags(p: argparse.ArgumentParser, evaluation: bool) -> None:
    """Model, data and device flags shared by both detection scripts (paper names first).
    ``evaluation``: the allocation script, where data flags default to the curve set's."""
    g = p.add_argument_group("detector (OpenPCDet)")
    g.add_argument("--cfg_file", type=Path, default=Path(PAPER_CFG),
                   help="OpenPCDet model config, relative to the current directory or to "
                        "--pcdet_tools (default: %(default)s)")
    g.add_argument("--pretrained_model", type=Path, default=Path(PAPER_CHECKPOINT),
                   help="checkpoint in OpenPCDet's format ({'model_state': ...}), relative to "
                        "the current directory or to --pcdet_tools (default: %(default)s)")
    g.add_argument("--set", dest="set_cfgs", nargs=argparse.REMAINDER, default=[],
                   help="config overrides KEY VALUE ..., as in OpenPCDet's tools (must come "
                        "last), e.g. --set DATA_CONFIG.POINT_CLOUD_RANGE '[-54,-54,-5,54,54,3]'")
    g.add_argument("--pcdet_tools", type=Path, default=None,
                   help="OpenPCDet's tools/ directory (default: the current directory when it "
                        "is one, as the paper runs); pcdet is imported from its parent")
    g.add_argument("--pcdet_src", type=Path, default=None,
                   help="OpenPCDet checkout holding pcdet/ (default: the parent of "
                        "--pcdet_tools, else an installed pcdet)")
    if not evaluation:  # the allocation quantizes the curve set's layers
        g.add_argument("--layers", type=_layer_sets, default=("backbone_3d",),
                       help="quantized layer sets, comma-separated: backbone_3d (the paper's 3-D "
                            "sparse convs), backbone_2d (2-D sparse convs / BEV layers), head, "
                            "vfe (default: backbone_3d)")
    d = p.add_argument_group("calibration data")
    sub = " (default: the curve set's)" if evaluation else ""
    d.add_argument("--data", choices=DATA_SOURCES, default=None if evaluation else "pcdet",
                   help="calibration frames: pcdet = the config's dataset, TRAIN split, read "
                        "by pcdet's build_dataloader; synthetic = random nuScenes-shaped "
                        "frames (tests, machines without nuScenes)"
                        + (sub or " (default: pcdet)"))
    d.add_argument("--calib_frames", type=_positive_int("--calib_frames"), default=None,
                   help=f"calibration frames (default: --calib_num_iters x --batch_size when "
                        f"--calib_num_iters is given, else {DEFAULT_CALIB_FRAMES})" + sub)
    d.add_argument("--calib_num_iters", type=_positive_int("--calib_num_iters"), default=None,
                   help="the paper's calibration size in batches of --batch_size frames")
    d.add_argument("--points_per_frame", type=_positive_int("--points_per_frame"), default=None,
                   help=f"points per synthetic frame (default: {DEFAULT_SYNTHETIC_POINTS})"
                        + sub)
    d.add_argument("--seed", type=int, default=None,
                   help="seed of the synthetic frames and of pcdet's sweep choice (default: 0)"
                        + sub)
    d.add_argument("--dist", choices=DIST_TENSORS, default=None if evaluation else "bev",
                   help="tensor distortion is measured on: bev = the dense BEV feature the "
                        "head consumes, head = the head's raw prediction maps"
                        + (sub or " (default: bev)"))
    d.add_argument("--batch_size", type=_positive_int("--batch_size"),
                   default=4 if evaluation else 2,
                   help=("frames per evaluation batch" if evaluation else
                         "frames per gradient batch of the second-order estimator; the "
                         "measured engine runs one frame at a time") + " (default: %(default)s)")
    d.add_argument("--workers", type=int, default=default_workers() if evaluation else 1,
                   help="DataLoader workers of the evaluation (frames for curves are read once "
                        "in this process) (default: %(default)s)")
    o = p.add_argument_group("device and output")
    o.add_argument("--gpuid", type=int, default=0, help="CUDA device index when CUDA exists")
    o.add_argument("--device", default=None, help="torch device (cpu, cuda, cuda:1)")
    o.add_argument("--precision", choices=("auto", "float64", "float32"), default="auto",
                   help="arithmetic of the distortion measurement: auto = float64 on CPU, "
                        "float32 on CUDA (spconv's CUDA kernels have no float64)")
    o.add_argument("--quiet", "--mute-print", dest="quiet", action="store_true",
                   help="no progress bars, warnings only")
    o.add_argument("--fix_random_seed", action="store_true",
                   help="accepted for paper compatibility; everything here is seeded")


def add_curve_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("curves (paper flags)")
    g.add_argument("--nchannelbatch", type=_positive_int("--nchannelbatch"), default=128,
                   help="output channels per group (default: %(default)s, the paper's; every "
                        "VoxelNeXt layer is then one group)")
    g.add_argument("--maxrates", type=int, default=11,
                   help="bit widths 0..maxrates-1 (default: %(default)s)")
    g.add_argument("--maxdeadzones", type=int, default=10,
                   help="dead-zone ratios 0, 1/ndz, ... (default: %(default)s)")
    g.add_argument("--disable-deadzone", action="store_true", help="same as --maxdeadzones 1")
    g.add_argument("--maxsteps", type=int, default=16,
                   help="step candidates per bit width (default: %(default)s, the paper's "
                        "detection value)")
    g.add_argument("--part_id", type=int, default=None,
                   help="this process's part (default: torchrun RANK, else 0)")
    g.add_argument("--num_parts", type=int, default=None,
                   help="number of parts (default: torchrun WORLD_SIZE, else 1 = every layer; "
                        "the paper's default of 6 left 5/6 of the layers undone)")
    g.add_argument("-bcw", "--bias_corr_weight", action="store_true",
                   help="weight curves of the layer after the bias correction the allocation "
                        "deploys with -bcw (measured estimator; the paper's detection curves "
                        "use none)")
    g.add_argument("--kind", choices=("weight", "act"), default="weight",
                   help="weight curves (the paper's) or activation curves of the layers' "
                        "outputs (--act-mode in: inputs), the features of the sparse tensors "
                        "(measured estimator) (default: weight)")
    g.add_argument("--act-mode", choices=("out", "in"), default="out",
                   help="activation curves: of each layer's output or input (default: out)")
    g.add_argument("--sort_channels", action="store_true",
                   help="the paper's channel sorting: not supported (refused)")
    g.add_argument("--outdir", type=Path, default=Path("."),
                   help="directory that receives the curve set (default: current directory)")
    g.add_argument("--pathrdcurve", type=Path, default=None,
                   help="explicit curve-set directory (default: the paper's name under --outdir)")
    e = p.add_argument_group("estimator")
    e.add_argument("--estimator", choices=("measured", "hessian"), default="measured",
                   help="measured (first order: a forward per candidate) or hessian (second "
                        "order: one gradient sweep, then a quadratic model) (default: measured)")
    e.add_argument("--hessian", dest="estimator", action="store_const", const="hessian",
                   help="same as --estimator hessian")
    e.add_argument("--nprobes", type=_positive_int("--nprobes"), default=4,
                   help="second order: random output probes per frame (default: 4)")
    e.add_argument("--folds", type=int, default=DEFAULT_FOLDS,
                   help=f"second order: also store the curves of this many calibration folds "
                        f"(one frame is one unit; at most one fold per frame) for the "
                        f"allocation's --shrink; 0: none (default: {DEFAULT_FOLDS})")
    e.add_argument("--steps", choices=STEP_MODES, default=None,
                   help="channel = a per-channel MSE-optimal step times a searched group "
                        "scale; group = the paper's one power-of-two step per group (default: "
                        + ", ".join(f"{v} for {k}s" for k, v in DEFAULT_STEPS.items()) + ")")
    e.add_argument("--group-step", dest="steps", action="store_const", const="group",
                   help="same as --steps group")
    add_scale_flags(e, "1 measured, 0 second order")
    for flag in DEAD_CURVE_FLAGS:
        p.add_argument(flag, nargs="*", default=None,
                       help="accepted for paper compatibility; no effect")


def add_alloc_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("allocation (paper flags)")
    g.add_argument("--pathrdcurve", type=Path, default=Path("./rd_curves"),
                   help="weight curve set (directory with meta.json) (default: %(default)s)")
    g.add_argument("--target_rates", type=float, nargs="+", default=[4.0, 6.0, 8.0],
                   help="target average bits per quantized weight (default: 4 6 8)")
    g.add_argument("--solver", choices=("dp", "lg"), default="dp",
                   help="dp = dynamic programming (exact up to its budget resolution, "
                        "float64), lg = Lagrangian (points on the convex hull) (default: dp)")
    g.add_argument("--nchannelbatch", type=int, default=None,
                   help="checked against the curve set's group size")
    g.add_argument("--maxrates", type=int, default=None,
                   help="use bit widths 0..maxrates-1 of the curves (default: all)")
    g.add_argument("--maxdeadzones", type=int, default=None,
                   help="checked against the curve set's dead-zone ratios")
    g.add_argument("--closedeadzone", type=int, choices=(0, 1), default=0,
                   help="1: uniform quantizer only (dead-zone ratio 0)")
    g.add_argument("--bit_list", type=int, nargs="+", default=None,
                   help="allowed bit widths (hardware constraint), e.g. 0 2 4 8")
    g.add_argument("--minrate", type=int, default=None, help="smallest bit width allowed")
    g.add_argument("--layerwise", action="store_true",
                   help="one bit width per layer (all groups of a layer alike)")
    g.add_argument("--no-fill", action="store_true",
                   help="leave the budget the solver does not spend (the paper)")
    g.add_argument("--shrink", type=shrink_mode, default="auto",
                   help="pool each group's curve toward its layer's: cv (cross-validated over "
                        "the curves' calibration folds), a weight in [0, 1], off (the paper), "
                        "auto = cv for -bcw curves with folds, which detectors do not have yet, "
                        "else off (default: auto)")
    g.add_argument("-bcw", "--bias_corr_weight", action="store_true",
                   help="weight bias correction: per output channel, the mean output error "
                        "E[(W-Ŵ)x] over the calibration frames' active sites is added to the "
                        "layer's bias (created if missing)")
    g.add_argument("--act_curve_root_dir", type=Path, default=None,
                   help="activation curve set (or a directory holding one) of the same "
                        "detector and frames: joint weight/activation allocation (default: "
                        "weights only, as the paper)")
    g.add_argument("--act-mode", choices=("out", "in"), default="out",
                   help="which activation curve set --act_curve_root_dir holds (default: out)")
    g.add_argument("--act-target-rates", type=float, nargs="+", default=None,
                   help="average activation bits, one value or one per --target_rates "
                        "(default: one joint budget, --target_rates bits per weight and "
                        "activation element)")
    g.add_argument("--outdir", type=Path, default=None,
                   help="results directory (default: ./<arch>_<solver>_results)")
    g.add_argument("--save_checkpoint_dir", type=Path, default=None,
                   help="also save each quantized detector as {'model_state': ...} in this "
                        "directory, relative to --outdir (default: none)")
    g.add_argument("--skip-eval", action="store_true",
                   help="write allocations and distortions only, without mAP/NDS (which need "
                        "a GPU and nuScenes); exit 0")
    for flag in DEAD_ALLOC_FLAGS:
        p.add_argument(flag, nargs="*", default=None,
                       help="accepted for paper compatibility; no effect")


# ------------------------------------------------------------------------------ resolution


def _pcdet_paths(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """(checkout holding pcdet/ or None for an installed pcdet, tools dir or None)."""
    tools = args.pcdet_tools
    if tools is not None and not tools.is_dir():
        raise InputError(f"--pcdet_tools {tools} is not a directory; pass OpenPCDet's tools/")
    if tools is None and (Path.cwd().parent / "pcdet" / "__init__.py").is_file():
        tools = Path.cwd()  # run from tools/, as the paper's README does
    src = args.pcdet_src
    if src is None and tools is not None and (tools.parent / "pcdet" / "__init__.py").is_file():
        src = tools.parent
    return src, tools


def _find(path: Path, tools: Path | None, flag: str, what: str) -> Path:
    """``path`` as given, else relative to ``tools``; an InputError naming both otherwise."""
    tried = [path]
    if path.exists():
        return path.resolve()
    if tools is not None and not path.is_absolute():
        tried.append(tools / path)
        if (tools / path).exists():
            return (tools / path).resolve()
    raise InputError(f"{flag} {path} does not exist (tried {', '.join(map(str, tried))}); pass "
                     f"{what}, run from OpenPCDet's tools/ directory or pass --pcdet_tools")


def _precision(args: argparse.Namespace, device: torch.device) -> str:
    if args.precision != "auto":
        return args.precision
    return "float32" if device.type == "cuda" else "float64"


@dataclass
class CalibSpec:
    """How the calibration frames were made (stored in the curve set's ``meta.calib``)."""

    data: str
    frames: int
    seed: int
    points_per_frame: int | None
    dist: str

    def source(self) -> str:
        return (f"synthetic frames ({self.points_per_frame} points)" if self.data == "synthetic"
                else "pcdet dataset, train split (no shuffling, seeded sweep choice)")


def _calib_spec(args: argparse.Namespace, stored: dict[str, Any] | None = None) -> CalibSpec:
    """The calibration of the flags, missing values from ``stored`` (a curve set's calib)."""
    stored = stored or {}
    frames = args.calib_frames
    if frames is None and args.calib_num_iters is not None:
        frames = args.calib_num_iters * args.batch_size
    data = args.data or stored.get("data") or "pcdet"
    points = args.points_per_frame or stored.get("points_per_frame")
    if data == "synthetic" and points is None:
        points = DEFAULT_SYNTHETIC_POINTS
    return CalibSpec(data=data, frames=frames or int(stored.get("size", DEFAULT_CALIB_FRAMES)),
                     seed=args.seed if args.seed is not None else int(stored.get("seed", 0)),
                     points_per_frame=points if data == "synthetic" else None,
                     dist=args.dist or stored.get("dist") or "bev")


def _train_split_cfg(data_cfg: Any) -> Any:
    """pcdet's DATA_CONFIG reading the train split in test mode (no augmentation, no CBGS
    resampling) with point shuffling off."""
    from rdoq.adapters.openpcdet import deterministic_data_cfg

    data_cfg = deterministic_data_cfg(data_cfg)
    for key in ("DATA_SPLIT", "INFO_PATH"):
        if key in data_cfg and "train" in data_cfg[key]:
            data_cfg[key]["test"] = copy.deepcopy(data_cfg[key]["train"])
    return data_cfg


def _pcdet_dataset(cfg: Any, data_cfg: Any, batch_size: int, workers: int,
                   training_split: bool) -> tuple[Any, Any]:
    """pcdet's (dataset, dataloader) from ``build_dataloader`` in test mode, unshuffled."""
    from pcdet.datasets import build_dataloader

    if training_split:
        data_cfg = _train_split_cfg(data_cfg)
    dataset, loader, _ = build_dataloader(dataset_cfg=data_cfg, class_names=cfg.CLASS_NAMES,
                                          batch_size=batch_size, dist=False, workers=workers,
                                          logger=log, training=False)
    return dataset, loader


@contextlib.contextmanager
def _numpy_seed(seed: Sequence[int]):
    """numpy's global RNG seeded inside the block (pcdet picks sweeps with it), restored after."""
    state = np.random.get_state()
    np.random.seed(list(seed))
    try:
        yield
    finally:
        np.random.set_state(state)


def _frame_indices(n_available: int, n: int, where: str) -> list[int]:
    """``n`` frame indices spread evenly over the split (scenes differ along it)."""
    if n_available < n:
        raise InputError(f"--calib_frames {n} but the train split ({where}) holds {n_available} "
                         f"frames; use fewer frames, create the dataset's info files (OpenPCDet's "
                         f"docs/GETTING_STARTED.md) or pass --data synthetic")
    return sorted({int(i) for i in np.linspace(0, n_available - 1, n).round()})


@dataclass
class Setup:
    """A built detector with its calibration frames and everything recorded about them."""

    model: nn.Module
    cfg: Any
    cfg_file: Path
    checkpoint: Path
    info: dict[str, Any]
    frames: list[dict[str, Any]]
    frame_ids: list[str]
    spec: CalibSpec
    device: torch.device
    tools: Path | None
    cfg_set: list[str]


def build_setup(args: argparse.Namespace, stored_calib: dict[str, Any] | None = None) -> Setup:
    """Import pcdet, build the detector of the flags on the device, and read the calibration
    frames (collated once, as tensors on the device)."""
    from rdoq.adapters.openpcdet import SyntheticFrames, build_detector, import_pcdet, to_device

    src, tools = _pcdet_paths(args)
    cfg_file = _find(args.cfg_file, tools, "--cfg_file", "an OpenPCDet model config")
    checkpoint = _find(args.pretrained_model, tools, "--pretrained_model",
                       "a checkpoint in OpenPCDet's format")
    device = resolve_device(args, None)
    spec = _calib_spec(args, stored_calib)
    import_pcdet(src)
    made: dict[str, Any] = {}

    def make_dataset(cfg: Any) -> Any:
        if spec.data == "synthetic":
            made["frames"] = SyntheticFrames(cfg, spec.frames, spec.points_per_frame, spec.seed)
            return made["frames"].template
        made["frames"], _ = _pcdet_dataset(cfg, cfg.DATA_CONFIG, 1, 0, training_split=True)
        return made["frames"]

    det = build_detector(cfg_file, checkpoint, args.set_cfgs, make_dataset=make_dataset,
                         pcdet_src=src, device=device, seed=spec.seed)
    data = made["frames"]
    if spec.data == "synthetic":
        items = list(range(spec.frames))
        batches = [data.batch([i]) for i in items]
    else:
        dcfg = det.cfg.DATA_CONFIG
        items = _frame_indices(len(data), spec.frames,
                               f"{data.root_path} {list(dcfg.INFO_PATH.get('train', []))}")
        batches = []
        for i in items:
            with _numpy_seed([spec.seed, i]):  # the same sweeps every run
                batches.append(data.collate_batch([data[i]]))
    frames = [to_device(b, device) for b in batches]
    frame_ids = [str(np.asarray(b["frame_id"]).ravel()[0]) for b in batches]
    info = {"arch": det.cfg.MODEL.NAME, "weights_source": f"pcdet:{checkpoint.name}",
            "checkpoint_sha256": file_sha256(checkpoint)}
    return Setup(det.model, det.cfg, cfg_file, checkpoint, info, frames, frame_ids, spec, device,
                 tools, list(args.set_cfgs))


def distortion_run(dist: str) -> Callable[[nn.Module, Any], torch.Tensor]:
    """``run(model, frame)`` of :class:`FrameRunner` for ``--dist``."""
    from rdoq.adapters.openpcdet import bev_feature, head_maps

    return bev_feature if dist == "bev" else head_maps


def runner_of(model: nn.Module, setup: Setup) -> nn.Module:
    from rdoq.adapters.sparse import FrameRunner

    return FrameRunner(model, setup.frames, distortion_run(setup.spec.dist))


def calib_meta(setup: Setup, runner: nn.Module) -> dict[str, Any]:
    """``meta.calib`` of a detector curve set: what the allocation script rebuilds and checks."""
    s = setup.spec
    return {"size": len(setup.frames), "seed": s.seed, "source": s.source(),
            "sha256": runner.sha256(), "items": setup.frame_ids, "data": s.data,
            "points_per_frame": s.points_per_frame, "dist": s.dist,
            "cfg_file": str(setup.cfg_file), "set": setup.cfg_set}


# ------------------------------------------------------------------------------ curves


@script_entry(RESUME_HINT)
def curves_main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``openpcdet/generate_rd_curves_batch.py``: weight RD curves of a pcdet
    detector's layers, one file per layer, resumable; returns the run summary."""
    from rdoq.adapters.openpcdet import detector_layers
    from rdoq.cli import _scale_octaves
    from rdoq.curves import CurveJob, generate_curves, job_dict
    from rdoq.hessian import HessianSettings
    from rdoq.parts import resolve_part
    from rdoq.search import scale_grid
    from rdoq.store import atomic_write_json, curve_set_name

    p = argparse.ArgumentParser(description="Weight (or activation) RD curves of an OpenPCDet "
                                            "detector (the paper's "
                                            "tools/generate_rd_curves_batch.py).")
    add_detector_flags(p, evaluation=False)
    add_curve_flags(p)
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    try:
        if args.sort_channels:
            raise InputError("--sort_channels (the paper's channel permutation) is not "
                             "supported; drop it")
        kind, estimator = args.kind, args.estimator
        if args.bias_corr_weight and (kind == "act" or estimator == "hessian"):
            raise InputError("-bcw is offered with measured weight curves only (--kind weight, "
                             "--estimator measured): the second-order estimator has no bias "
                             "correction for spconv layers, and activations take none; drop "
                             "-bcw or the other flag")
        # Activations have no dead-zone quantizer.
        ndz = 1 if args.disable_deadzone or kind == "act" else args.maxdeadzones
        part = resolve_part(args.part_id, args.num_parts)
        spec = _calib_spec(args)
        setup = build_setup(args)
        layers = detector_layers(setup.model, tuple(args.layers))
        act_mode = args.act_mode if kind == "act" else None
        root = args.pathrdcurve or args.outdir / curve_set_name(
            setup.info["arch"], kind, ndz, args.maxrates, spec.frames, args.nchannelbatch,
            act_mode)
        check_outdir(root, "--pathrdcurve" if args.pathrdcurve else "--outdir")
        job = CurveJob(
            kind=kind, act_mode=act_mode, group_size=args.nchannelbatch, nr=args.maxrates,
            ndz=ndz, max_steps=args.maxsteps, step_grid=1 if kind == "weight" else 4,
            precision=_precision(args, setup.device),
            max_batch=256 if estimator == "hessian" else 1,
            max_lookahead=4 if estimator == "hessian" else 1,
            progress=not args.quiet, estimator=estimator, sweep_batch=args.batch_size,
            argv=[Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
            step_mode=args.steps or DEFAULT_STEPS[kind],
            bias_corr=args.bias_corr_weight,
            scales_log2=scale_grid(_scale_octaves(args.scale_octaves, estimator),
                                   args.scale_steps),
            hessian=(HessianSettings(nprobes=args.nprobes, seed=spec.seed)
                     if estimator == "hessian" else None),
            # Folds need two frames; each frame is its own unit (generate_curves' default).
            folds=(min(args.folds, spec.frames) if estimator == "hessian" and spec.frames > 1
                   else 0),
            layers=tuple(lay.name for lay in layers))
        job.search_settings()
    except (InputError, ValueError, ImportError) as e:
        p.error(str(e))
    runner = runner_of(setup.model, setup)
    try:
        summary = generate_curves(runner, runner.indices(), setup.info,
                                  calib_meta(setup, runner), job, root, part, setup.device)
    except ValueError as e:
        p.error(str(e))
    if kind == "weight":
        summary["weights_total"] = int(sum(np.prod(lay.shape) for lay in layers))
    atomic_write_json(Path(root) / f"run_part{part.part_id:03d}.json",
                      {"job": job_dict(job), "device": str(setup.device), "summary": summary,
                       "args": {k: (str(v) if isinstance(v, Path) else v)
                                for k, v in vars(args).items()}})
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
        numel = [weight_numel(tuple(e["shape"]), b) for b in bounds]
        q_bits += sum(b * n for b, n in zip(e["bits"], numel, strict=True))
        q_numel += sum(numel)
    mb = 8 * 2**20
    return (q_bits + 32.0 * (total - q_numel)) / mb, 32.0 * total / mb


def evaluate_detection(setup: Setup, model: nn.Module, args: argparse.Namespace,
                       result_dir: Path) -> dict[str, Any]:
    """mAP, NDS and per-class AP of ``model`` on the config's evaluation split by pcdet's
    ``eval_utils.eval_one_epoch`` (needs a GPU and pcdet's CUDA ops)."""
    from rdoq.adapters.openpcdet import require_gpu, tools_dir

    require_gpu("mAP/NDS evaluation")
    tools = setup.tools or tools_dir(setup.cfg_file)
    if str(tools) not in sys.path:
        sys.path.insert(0, str(tools))
    from eval_utils import eval_utils  # OpenPCDet's tools/eval_utils

    from rdoq.adapters.openpcdet import deterministic_data_cfg

    _, loader = _pcdet_dataset(setup.cfg, deterministic_data_cfg(setup.cfg.DATA_CONFIG),
                               args.batch_size, args.workers, training_split=False)
    model.eval()
    ret = eval_utils.eval_one_epoch(setup.cfg, SimpleNamespace(save_to_file=False), model,
                                    loader, epoch_id="rdoq", logger=log, dist_test=False,
                                    result_dir=result_dir)
    per_class = {k: float(v) for k, v in ret.items()
                 if isinstance(v, (int, float)) and k not in ("mAP", "NDS")}
    return {"mAP": float(ret["mAP"]) if "mAP" in ret else None,
            "NDS": float(ret["NDS"]) if "NDS" in ret else None, "metrics": per_class}


def _needs_gpu_reason(spec: CalibSpec) -> str | None:
    """Why mAP/NDS cannot be computed in this process, or None."""
    from rdoq.adapters.openpcdet import is_stand_in

    stand_ins = [n for n, m in sys.modules.items() if n.startswith("pcdet.ops.")
                 and is_stand_in(m)]
    if not torch.cuda.is_available():
        return "no CUDA device"
    if stand_ins:
        return f"pcdet's CUDA ops are not built ({', '.join(sorted(stand_ins)[:2])}, …)"
    if spec.data != "pcdet":
        return "--data synthetic frames have no labels: mAP/NDS need --data pcdet"
    return None


@script_entry(POINTS_HINT)
def allocate_main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``openpcdet/generate_DP_frontier_batch_act_nchan.py``: allocate bits for
    each target rate from a curve set, apply each to the full-precision weights (restored for
    every target), measure its distortion on the calibration frames and evaluate mAP/NDS (GPU).
    Returns the rows, the printed table and ``stopped`` (why mAP/NDS were not computed, or
    None)."""
    from rdoq.allocation import find_act_curve_set, open_curve_set, save_allocation
    from rdoq.apply import apply_allocation, estimate_corrections, remove_act_quantizers
    from rdoq.cli import warn_correction_mismatch
    from rdoq.groups import channel_dim
    from rdoq.pipeline import TableSpec, point_label, solve_targets_shrunk
    from rdoq.report import append_results, format_table

    p = argparse.ArgumentParser(description="Bit allocation of an OpenPCDet detector from RD "
                                            "curves, then apply and evaluate (the paper's "
                                            "tools/generate_DP_frontier_batch_act_nchan.py).")
    add_detector_flags(p, evaluation=True)
    add_alloc_flags(p)
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    try:
        store = open_curve_set(args.pathrdcurve, "weight")
        meta = store.meta
        astore = None
        if args.act_curve_root_dir is not None:
            aroot = find_act_curve_set(args.act_curve_root_dir, meta["model"], args.act_mode,
                                       meta["group_size"])
            astore = open_curve_set(aroot, "act", args.act_mode)
            if astore.meta["calib"].get("sha256") != meta["calib"].get("sha256"):
                raise InputError(f"the activation curves {aroot} were measured on other "
                                 f"calibration frames than {args.pathrdcurve} (sha256 "
                                 f"{str(astore.meta['calib'].get('sha256'))[:12]}… vs "
                                 f"{str(meta['calib'].get('sha256'))[:12]}…); make both with "
                                 f"the same --data/--calib_frames/--seed/--set")
        elif args.act_target_rates is not None:
            raise InputError("--act-target-rates needs activation curves: pass "
                             "--act_curve_root_dir DIR (made with generate_rd_curves_batch.py "
                             "--kind act)")
        for flag, mine, key in (("--nchannelbatch", args.nchannelbatch, "group_size"),
                                ("--maxdeadzones", args.maxdeadzones, "ndz")):
            if mine is not None and mine != meta[key]:
                raise InputError(f"{flag} {mine} contradicts {args.pathrdcurve}/meta.json "
                                 f"({key} {meta[key]}); drop the flag or use matching curves")
        if args.maxrates is not None and not 2 <= args.maxrates <= len(meta["bits"]):
            raise InputError(f"--maxrates {args.maxrates} is outside 2..{len(meta['bits'])} "
                             f"(the bit widths measured in {args.pathrdcurve})")
        outdir = args.outdir or Path(f"{meta['model']}_{args.solver}_results")
        check_outdir(outdir, "--outdir")
        setup = build_setup(args, meta["calib"])
        for key in ("model", "checkpoint_sha256"):
            mine = setup.info["arch" if key == "model" else key]
            if meta.get(key) != mine:
                raise InputError(f"{args.pathrdcurve} was measured with {key}={meta.get(key)!r}, "
                                 f"this run loads {key}={mine!r}; pass the --cfg_file and "
                                 f"--pretrained_model of the curves")
        names = [e["name"] for e in meta["layers"]]
        max_bits = None if args.maxrates is None else args.maxrates - 1
        modules = dict(setup.model.named_modules())
        dims = ({n: channel_dim(modules[n]) for n in astore.layer_names() if n in modules}
                if astore is not None else None)
        spec = TableSpec(store, astore, act_channel_dims=dims,
                         uniform_only=bool(args.closedeadzone), allowed_bits=args.bit_list,
                         min_bits=args.minrate, max_bits=max_bits)
        points, solve_s = solve_targets_shrunk(spec, list(args.target_rates),
                                               args.act_target_rates, args.solver,
                                               args.layerwise, fill=not args.no_fill,
                                               shrink=args.shrink)
        warn_correction_mismatch(store, "-bcw", args.bias_corr_weight)
    except (InputError, ValueError, FileNotFoundError, ImportError) as e:
        p.error(str(e))
    model = setup.model
    # The curves' arithmetic, so the distortion compares with pred_dist; float32 on CUDA.
    auto = "float32" if setup.device.type == "cuda" else meta.get("precision", "float64")
    dtype = getattr(torch, auto if args.precision == "auto" else args.precision)
    model.to(dtype=dtype)
    runner = runner_of(model, setup)
    if runner.sha256() != meta["calib"].get("sha256"):
        p.error(f"the calibration frames rebuilt here ({setup.spec.source()}, "
                f"{len(setup.frames)} frames) differ from those of {args.pathrdcurve} (sha256 "
                f"{str(meta['calib'].get('sha256'))[:12]}…); pass the --data/--calib_frames/"
                f"--seed/--set of the curves")
    with torch.no_grad():
        reference = runner(runner.indices())  # (N, …)
    stopped = None if args.skip_eval else _needs_gpu_reason(setup.spec)
    method = "+".join([args.solver] + [t for t, on in (("bcw", args.bias_corr_weight),
                                                       ("layerwise", args.layerwise)) if on])
    rows, written = [], []
    # pcdet detectors hold their dataset (spconv's voxel generator cannot be deep-copied), so
    # each target is applied in place to weights restored from this full-precision copy; -bcw
    # creates biases on layers without one, which are removed again.
    fp_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    biasless = [m for m in model.modules() if getattr(m, "bias", 0) is None]
    for target, point in zip(args.target_rates, points, strict=True):
        alloc = point.allocation(args.solver)
        alloc.update(weights_source=setup.info["weights_source"],
                     checkpoint_sha256=setup.info["checkpoint_sha256"],
                     cfg_file=str(setup.cfg_file), set=list(args.set_cfgs))
        # Every target starts from the full-precision detector, never the previous target's.
        remove_act_quantizers(model)
        for m in biasless:
            m.bias = None
        model.load_state_dict(fp_state)
        if args.bias_corr_weight:
            alloc["corrections"] = estimate_corrections(runner, alloc, runner.indices(),
                                                        bcw=True, bca=False, batch_size=1)
        apath = outdir / f"allocation_{point_label(point.tags)}.json"
        save_allocation(apath, alloc)
        written.append(apath)
        q_model = apply_allocation(model, alloc, in_place=True)
        with torch.no_grad():
            out = runner_of(q_model, setup)(runner.indices())
        size_mb, fp_mb = _size_mb(q_model, alloc)
        row = {"model": setup.info["arch"], "method": method, "target_bits": float(target),
               "act_target_bits": point.tags.get("act_target_bits"),
               "w_bits": alloc["summary"]["w_bits"], "a_bits": alloc["summary"].get("a_bits"),
               "mAP": None, "NDS": None,
               "out_mse": _mse(out, reference), "dist": setup.spec.dist,
               "pred_dist": alloc["summary"]["pred_dist"], "size_mb": size_mb,
               "fp_size_mb": fp_mb, "solve_s": solve_s,
               "shrink_alpha": point.record.get("shrink_alpha"),
               "eval_s": None, "layers": len(names), "allocation": str(apath.relative_to(outdir)),
               "created": datetime.now(timezone.utc).isoformat()}
        if args.save_checkpoint_dir is not None:
            cdir = outdir / args.save_checkpoint_dir
            cdir.mkdir(parents=True, exist_ok=True)
            act = point.tags.get("act_target_bits")
            label = f"{target:.2f}" + ("" if act is None else f"_a{act:g}")
            cpath = cdir / f"{setup.info['arch']}_rate={label}.pth"
            blob = {"model_state": {k: v.float() if v.is_floating_point() else v
                                    for k, v in q_model.state_dict().items()}}
            if alloc["acts"]:  # pcdet's loader reads model_state only; the rest is ours
                blob |= {"act_quantizers": {n: q.state() for n, q in
                                            q_model.rdoq_act_quantizers.items()},
                         "act_mode": alloc["act_mode"], "allocation": json.dumps(alloc)}
            torch.save(blob, cpath)
            row["checkpoint"] = str(cpath.relative_to(outdir))
        if not args.skip_eval and stopped is None:
            t0 = time.perf_counter()
            q_model.to(dtype=torch.float32)
            metrics = evaluate_detection(setup, q_model, args, outdir / "eval" / f"{target:g}")
            row |= {"mAP": metrics["mAP"], "NDS": metrics["NDS"],
                    "metrics": metrics["metrics"], "eval_s": time.perf_counter() - t0}
        if not args.skip_eval and stopped is None:
            q_model.to(dtype=dtype)
        rows.append(row)
        append_results(outdir, [row])
        log.info("%s target %g: W %.3f A %s bits, distortion %.3e (predicted %.3e)", method,
                 target, row["w_bits"], "-" if row["a_bits"] is None else f"{row['a_bits']:.3f}",
                 row["out_mse"], row["pred_dist"])
    remove_act_quantizers(model)
    for m in biasless:
        m.bias = None
    model.load_state_dict(fp_state)
    if stopped is not None:
        stopped = (f"mAP/NDS evaluation needs a GPU with OpenPCDet's CUDA ops built and "
                   f"nuScenes (--data pcdet): {stopped}. Written: "
                   f"{', '.join(str(w) for w in written)} and the distortion rows in "
                   f"{outdir / 'results.jsonl'}. To evaluate, run the same command on a GPU "
                   f"machine from OpenPCDet's tools/ directory with --data pcdet; pass "
                   f"--skip-eval to stop here without an error")
    return {"outdir": str(outdir), "rows": rows, "table": format_table(rows),
            "stopped": stopped}
