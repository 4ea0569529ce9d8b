"""The OpenPCDet adapter (DESIGN §2, §11): a pcdet detector with its calibration frames and
its mAP/NDS evaluation, the third implementation of :class:`rdoq.adapters.base.Adapter`.

The detection scripts (:mod:`rdoq.detection`) call it as the classification scripts call
theirs; what differs, and why:

- ``build`` also reads the calibration frames (train split, point shuffling off, sweep choice
  seeded, collated once and kept on the device: the reference and every candidate see identical
  voxels) and returns the detector wrapped in a :class:`DetectorRunner`, a
  :class:`rdoq.adapters.sparse.FrameRunner` whose calibration "tensor" is the frame indices and
  whose output is the tensor distortion is measured on (``--dist``: the dense BEV feature or the
  head's raw maps). The curve engines, ``apply_allocation`` and the corrections take it as any
  model; its layer names are the detector's.
- ``calib`` returns those frame indices; the calibration set's ``sha256`` is the frames'.
- ``eval_data`` names the evaluation batch size and workers (:class:`EvalSplit`); ``evaluate``
  runs pcdet's ``eval_utils.eval_one_epoch`` on the config's evaluation split and returns
  mAP, NDS and per-class metrics. It needs a GPU (pcdet's NMS is CUDA-only):
  :func:`evaluation_blocker` says why it cannot run in this process.
- ``layers`` are those of the ``--layers`` sets (the paper's: the 3-D backbone's sparse convs).

It is not in the ``--dataset`` registry (:func:`rdoq.adapters.adapter_registry`): the detection
scripts have their own flags (the authors' OpenPCDet ones). Importing pcdet and building the
detector live in :mod:`rdoq.adapters.openpcdet`, spconv's CPU fixes in
:mod:`rdoq.adapters.sparse`; pcdet is imported only inside functions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from rdoq.adapters.base import Adapter, CalibSet, InputError, ModelInfo, file_sha256
from rdoq.adapters.sparse import FrameRunner
from rdoq.groups import LayerInfo

log = logging.getLogger("rdoq")

DIST_TENSORS = ("bev", "head")
DATA_SOURCES = ("pcdet", "synthetic")
# Calibration frames when neither --calib_frames nor --calib_num_iters is given.
DEFAULT_CALIB_FRAMES = 4
# Points per synthetic frame (--points_per_frame): about a nuScenes 10-sweep frame's third.
DEFAULT_SYNTHETIC_POINTS = 100_000


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
    raise InputError(
        f"{flag} {path} does not exist (tried {', '.join(map(str, tried))}); pass "
        f"{what}, run from OpenPCDet's tools/ directory or pass --pcdet_tools"
    )


@dataclass
class CalibSpec:
    """How the calibration frames were made (stored in the curve set's ``meta.calib``)."""

    data: str
    frames: int
    seed: int
    points_per_frame: int | None
    dist: str

    def source(self) -> str:
        return (
            f"synthetic frames ({self.points_per_frame} points)"
            if self.data == "synthetic"
            else "pcdet dataset, train split (no shuffling, seeded sweep choice)"
        )


def calib_spec(args: argparse.Namespace, stored: dict[str, Any] | None = None) -> CalibSpec:
    """The calibration of the flags, missing values from ``stored`` (a curve set's calib)."""
    stored = stored or {}
    frames = args.calib_frames
    if frames is None and args.calib_num_iters is not None:
        frames = args.calib_num_iters * args.batch_size
    data = args.data or stored.get("data") or "pcdet"
    points = args.points_per_frame or stored.get("points_per_frame")
    if data == "synthetic" and points is None:
        points = DEFAULT_SYNTHETIC_POINTS
    return CalibSpec(
        data=data,
        frames=frames or int(stored.get("size", DEFAULT_CALIB_FRAMES)),
        seed=args.seed if args.seed is not None else int(stored.get("seed", 0)),
        points_per_frame=points if data == "synthetic" else None,
        dist=args.dist or stored.get("dist") or "bev",
    )


def _train_split_cfg(data_cfg: Any) -> Any:
    """pcdet's DATA_CONFIG reading the train split in test mode (no augmentation, no CBGS
    resampling) with point shuffling off."""
    from rdoq.adapters.openpcdet import deterministic_data_cfg

    data_cfg = deterministic_data_cfg(data_cfg)
    for key in ("DATA_SPLIT", "INFO_PATH"):
        if key in data_cfg and "train" in data_cfg[key]:
            data_cfg[key]["test"] = copy.deepcopy(data_cfg[key]["train"])
    return data_cfg


def _pcdet_dataset(
    cfg: Any, data_cfg: Any, batch_size: int, workers: int, training_split: bool
) -> tuple[Any, Any]:
    """pcdet's (dataset, dataloader) from ``build_dataloader`` in test mode, unshuffled."""
    from pcdet.datasets import build_dataloader

    if training_split:
        data_cfg = _train_split_cfg(data_cfg)
    dataset, loader, _ = build_dataloader(
        dataset_cfg=data_cfg,
        class_names=cfg.CLASS_NAMES,
        batch_size=batch_size,
        dist=False,
        workers=workers,
        logger=log,
        training=False,
    )
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
        raise InputError(
            f"--calib_frames {n} but the train split ({where}) holds {n_available} "
            f"frames; use fewer frames, create the dataset's info files (OpenPCDet's "
            f"docs/GETTING_STARTED.md) or pass --data synthetic"
        )
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
    """Import pcdet, build the detector of the flags on ``--device`` (a torch device the script
    resolved), and read the calibration frames (collated once, as tensors on the device);
    calibration flags not given are taken from ``stored_calib`` (a curve set's)."""
    from rdoq.adapters.openpcdet import SyntheticFrames, build_detector, import_pcdet, to_device

    src, tools = _pcdet_paths(args)
    cfg_file = _find(args.cfg_file, tools, "--cfg_file", "an OpenPCDet model config")
    checkpoint = _find(
        args.pretrained_model, tools, "--pretrained_model", "a checkpoint in OpenPCDet's format"
    )
    device = torch.device(args.device or "cpu")  # resolved by the script
    spec = calib_spec(args, stored_calib)
    import_pcdet(src)
    made: dict[str, Any] = {}

    def make_dataset(cfg: Any) -> Any:
        if spec.data == "synthetic":
            made["frames"] = SyntheticFrames(cfg, spec.frames, spec.points_per_frame, spec.seed)
            return made["frames"].template
        made["frames"], _ = _pcdet_dataset(cfg, cfg.DATA_CONFIG, 1, 0, training_split=True)
        return made["frames"]

    det = build_detector(
        cfg_file,
        checkpoint,
        args.set_cfgs,
        make_dataset=make_dataset,
        pcdet_src=src,
        device=device,
        seed=spec.seed,
    )
    data = made["frames"]
    if spec.data == "synthetic":
        items = list(range(spec.frames))
        batches = [data.batch([i]) for i in items]
    else:
        dcfg = det.cfg.DATA_CONFIG
        items = _frame_indices(
            len(data), spec.frames, f"{data.root_path} {list(dcfg.INFO_PATH.get('train', []))}"
        )
        batches = []
        for i in items:
            with _numpy_seed([spec.seed, i]):  # the same sweeps every run
                batches.append(data.collate_batch([data[i]]))
    frames = [to_device(b, device) for b in batches]
    frame_ids = [str(np.asarray(b["frame_id"]).ravel()[0]) for b in batches]
    info = {
        "arch": det.cfg.MODEL.NAME,
        "weights_source": f"pcdet:{checkpoint.name}",
        "checkpoint_sha256": file_sha256(checkpoint),
    }
    return Setup(
        det.model,
        det.cfg,
        cfg_file,
        checkpoint,
        info,
        frames,
        frame_ids,
        spec,
        device,
        tools,
        list(args.set_cfgs),
    )


def distortion_run(dist: str) -> Callable[[nn.Module, Any], torch.Tensor]:
    """``run(model, frame)`` of :class:`rdoq.adapters.sparse.FrameRunner` for ``--dist``."""
    from rdoq.adapters.openpcdet import bev_feature, head_maps

    return bev_feature if dist == "bev" else head_maps


def evaluate_detection(setup: Setup, model: nn.Module, split: EvalSplit) -> dict[str, Any]:
    """mAP, NDS and per-class AP of ``model`` on the config's evaluation split by pcdet's
    ``eval_utils.eval_one_epoch`` (needs a GPU and pcdet's CUDA ops)."""
    from rdoq.adapters.openpcdet import require_gpu, tools_dir

    require_gpu("mAP/NDS evaluation")
    tools = setup.tools or tools_dir(setup.cfg_file)
    if str(tools) not in sys.path:
        sys.path.insert(0, str(tools))
    from eval_utils import eval_utils  # OpenPCDet's tools/eval_utils

    from rdoq.adapters.openpcdet import deterministic_data_cfg

    _, loader = _pcdet_dataset(
        setup.cfg,
        deterministic_data_cfg(setup.cfg.DATA_CONFIG),
        split.batch_size,
        split.workers,
        training_split=False,
    )
    model.eval()
    ret = eval_utils.eval_one_epoch(
        setup.cfg,
        SimpleNamespace(save_to_file=False),
        model,
        loader,
        epoch_id="rdoq",
        logger=log,
        dist_test=False,
        result_dir=split.result_dir,
    )
    per_class = {
        k: float(v)
        for k, v in ret.items()
        if isinstance(v, (int, float)) and k not in ("mAP", "NDS")
    }
    return {
        "mAP": float(ret["mAP"]) if "mAP" in ret else None,
        "NDS": float(ret["NDS"]) if "NDS" in ret else None,
        "metrics": per_class,
    }


def evaluation_blocker(spec: CalibSpec) -> str | None:
    """Why mAP/NDS cannot be computed in this process, or None."""
    from rdoq.adapters.openpcdet import is_stand_in

    stand_ins = [n for n, m in sys.modules.items() if n.startswith("pcdet.ops.") and is_stand_in(m)]
    if not torch.cuda.is_available():
        return "no CUDA device"
    if stand_ins:
        return f"pcdet's CUDA ops are not built ({', '.join(sorted(stand_ins)[:2])}, …)"
    if spec.data != "pcdet":
        return "--data synthetic frames have no labels: mAP/NDS need --data pcdet"
    return None


class DetectorRunner(FrameRunner):
    """A built detector and its calibration frames as a model of the frame indices
    (:class:`rdoq.adapters.sparse.FrameRunner`), with how they were made (``setup``) and the
    layer sets it quantizes."""

    def __init__(self, setup: Setup, layer_sets: Sequence[str] = ("backbone_3d",)):
        super().__init__(setup.model, setup.frames, distortion_run(setup.spec.dist))
        self.setup = setup
        self.layer_sets = tuple(layer_sets)


@dataclass
class EvalSplit:
    """What :meth:`OpenPCDetAdapter.evaluate` reads: the config's evaluation split in batches
    of ``batch_size`` frames, read by ``workers`` DataLoader workers; pcdet's output goes to
    ``result_dir``."""

    batch_size: int
    workers: int
    result_dir: Path | None = None


class OpenPCDetAdapter(Adapter):
    """pcdet detectors on their dataset, built from the detection scripts' flags (see the
    module docstring for what differs from the classifiers' adapters)."""

    name: ClassVar[str] = "openpcdet"

    def build(self, args: argparse.Namespace) -> tuple[DetectorRunner, ModelInfo]:
        """The detector of ``--cfg_file``/``--pretrained_model`` (a checkpoint that leaves most
        weights random is refused) with its calibration frames, on ``--device``; calibration
        flags not given come from ``args.stored_calib`` when the script set it (the curve
        set's)."""
        setup = build_setup(args, getattr(args, "stored_calib", None))
        runner = DetectorRunner(setup, getattr(args, "layers", None) or ("backbone_3d",))
        return runner, ModelInfo(**setup.info)

    def example_input(self, model: nn.Module, count: int, seed: int) -> torch.Tensor:
        """The first ``count`` frame indices (the frames are the detector's only inputs)."""
        return model.indices()[:count]  # (count, 1)

    def calib(self, args: argparse.Namespace, model: nn.Module, size: int, seed: int) -> CalibSet:
        """The frames read by :meth:`build` as their indices ``(N, 1)``; ``size`` and ``seed``
        must be theirs."""
        s = model.setup
        if (size, seed) != (len(s.frames), s.spec.seed):
            raise ValueError(
                f"the detector was built with {len(s.frames)} calibration frames "
                f"(seed {s.spec.seed}), not {size} (seed {seed})"
            )
        spec = s.spec
        extra = {
            "sha256": model.sha256(),
            "data": spec.data,
            "points_per_frame": spec.points_per_frame,
            "dist": spec.dist,
            "cfg_file": str(s.cfg_file),
            "set": s.cfg_set,
        }
        return CalibSet(model.indices(), spec.source(), s.frame_ids, spec.seed, extra)

    def eval_data(self, args: argparse.Namespace, model: nn.Module) -> EvalSplit:
        """The config's evaluation split in batches of ``--batch_size`` (read when evaluated)."""
        return EvalSplit(args.batch_size, args.workers)

    def evaluate(
        self, model: nn.Module, data: EvalSplit, ref: torch.Tensor | None, device: torch.device
    ) -> dict[str, Any]:
        """mAP, NDS and ``metrics`` (per-class AP, recalls) by pcdet's ``eval_one_epoch``
        (needs a GPU and pcdet's CUDA ops); ``ref`` is not used (no output distortion on the
        evaluation split)."""
        return evaluate_detection(model.setup, model.net, data)

    def layers(self, model: nn.Module) -> list[LayerInfo]:
        """The layers of the runner's layer sets
        (:func:`rdoq.adapters.openpcdet.detector_layers`)."""
        from rdoq.adapters.openpcdet import detector_layers

        return detector_layers(model.net, model.layer_sets)
