"""OpenPCDet detectors (DESIGN §11): importing pcdet, building a detector, its layers and the
tensors distortion is measured on.

OpenPCDet is not on PyPI and is never copied into this repository: :func:`import_pcdet` makes
``pcdet`` importable from a user's checkout (or an installed pcdet), in-process and without writing
into the tree. Everything here imports pcdet inside functions; the core (``rdoq/*.py``) never does.

pcdet on a machine without its compiled CUDA ops (measured with the unmodified source of
``../shared/third_party/``, spconv 2.3.8's CPU wheel):

- ``pcdet/version.py`` is written by its ``setup.py``: without it the module is provided in
  ``sys.modules``.
- ``import pcdet.models`` imports all seven compiled extensions. Those not built are replaced in
  ``sys.modules`` by stand-ins whose attributes raise a RuntimeError naming the fix when called,
  never at import: VoxelNeXt's backbone and head build and run without them; NMS and box IoU
  (evaluation) do not.
- ``import pcdet.datasets`` imports every dataset, among them Argoverse 2 (av2, kornia, pandas)
  and ONCE (cv2) that a LiDAR nuScenes detector never uses: only when one of their packages is
  missing is that pcdet module replaced by a stand-in (never the third-party package itself, so
  other code's ``import pandas`` still fails as it should).
- ``VoxelNeXtHead.__init__`` moves tensors with ``.cuda()``: without CUDA :func:`build_detector`
  builds the network with ``Tensor.cuda`` returning the tensor itself, restored afterwards.
- A CUDA op called with CPU tensors ends the process (``exit(-1)``, cannot be caught): the full
  ``model(batch)`` eval path (NMS) is only run by :func:`predict_boxes`, which refuses without a
  GPU. :func:`bev_feature` and :func:`head_maps` stop before any post-processing.
- The spconv fixes (CPU stream, biased sparse convs in eval mode, one thread) live in
  :mod:`rdoq.adapters.sparse`.

Its length (about 630 lines): what pcdet needs to be imported and built without its compiled
ops (the stand-ins above), checkpoint checks, synthetic frames and the distortion tensors are
kept together, as each is a fact about one pcdet commit (8caccce) that changes with it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rdoq.adapters.base import InputError, load_torch_file
from rdoq.adapters.sparse import eval_on_cpu, require_spconv
from rdoq.groups import LayerInfo, find_layers

logger = logging.getLogger(__name__)

_INSTALL_HINT = "pip install -e .[pcdet]"

# pcdet's compiled extensions (its setup.py, commit 8caccce): package, module name.
CUDA_EXTENSIONS = (
    ("pcdet.ops.iou3d_nms", "iou3d_nms_cuda"),
    ("pcdet.ops.roiaware_pool3d", "roiaware_pool3d_cuda"),
    ("pcdet.ops.roipoint_pool3d", "roipoint_pool3d_cuda"),
    ("pcdet.ops.pointnet2.pointnet2_stack", "pointnet2_stack_cuda"),
    ("pcdet.ops.pointnet2.pointnet2_batch", "pointnet2_batch_cuda"),
    ("pcdet.ops.bev_pool", "bev_pool_ext"),
    ("pcdet.ops.ingroup_inds", "ingroup_inds_cuda"),
)

# pcdet modules that import packages a LiDAR nuScenes detector never uses: the module, the
# packages it needs, the names pcdet imports from it.
OPTIONAL_DATASET_MODULES = (
    ("pcdet.datasets.argo2.argo2_dataset", ("av2", "kornia", "pandas"), ("Argo2Dataset",)),
    ("pcdet.datasets.once.once_toolkits", ("cv2",), ("Octopus",)),
)

# The quantizable layer sets of a detector (``detector_layers``); the paper quantizes the first.
LAYER_SETS = ("backbone_3d", "backbone_2d", "head", "vfe")
_HEAD_MODULES = ("dense_head", "point_head", "roi_head")
_BACKBONE_2D_MODULES = ("map_to_bev_module", "backbone_2d")
# Batch entries that stay as they are when a batch is moved to a device (pcdet's
# load_data_to_gpu skips the same ones).
_NON_TENSOR_KEYS = (
    "frame_id",
    "metadata",
    "calib",
    "image_paths",
    "ori_shape",
    "img_process_infos",
)
# A checkpoint must set at least this fraction of the model's floating-point weights.
MIN_LOADED_FRACTION = 0.5


def _needs_gpu_message(what: str) -> str:
    return (
        f"{what} needs OpenPCDet's compiled CUDA ops and a GPU: pcdet's NMS and box IoU "
        f"exist only as CUDA kernels (built by `python setup.py develop` in the OpenPCDet "
        f"checkout on a CUDA machine), and one called with CPU tensors ends the process. "
        f"RD curves and allocation run on the CPU; run evaluation on a GPU machine"
    )


@dataclass(frozen=True)
class _Unavailable:
    """What a stand-in module hands out for any attribute: raises when called."""

    name: str
    reason: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.name}: {self.reason}")


class _StandInModule(types.ModuleType):
    """A module that imports fine and whose every public attribute raises when called."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(name, f"rdoq stand-in: {reason}")
        self._rdoq_reason = reason

    def __getattr__(self, attr: str) -> _Unavailable:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self.__name__}.{attr}", self._rdoq_reason)


def is_stand_in(module: types.ModuleType | None) -> bool:
    """Whether ``module`` is one of :func:`import_pcdet`'s stand-ins."""
    return isinstance(module, _StandInModule)


def _has_extension(package_dir: Path, name: str) -> bool:
    return any(
        (package_dir / f"{name}{suffix}").is_file()
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )


def _setup_version(pkg_dir: Path) -> str:
    """The version pcdet's setup.py would write, read from it (``0.6.0+unbuilt``)."""
    setup = pkg_dir.parent / "setup.py"
    text = setup.read_text() if setup.is_file() else ""
    match = re.search(r"version\s*=\s*'(\d+(?:\.\d+)*)", text)
    return f"{match.group(1) if match else '0'}+unbuilt"


def _provide_stand_ins(pkg_dir: Path) -> None:
    """``pcdet.version`` and stand-ins for unbuilt CUDA ops and unusable optional datasets."""
    if not (pkg_dir / "version.py").is_file() and "pcdet.version" not in sys.modules:
        version = types.ModuleType("pcdet.version", "pcdet's version (its setup.py not run)")
        version.__version__ = _setup_version(pkg_dir)
        sys.modules["pcdet.version"] = version
    for package, name in CUDA_EXTENSIONS:
        full = f"{package}.{name}"
        rel = Path(*package.split(".")[1:])
        if full not in sys.modules and not _has_extension(pkg_dir / rel, name):
            sys.modules[full] = _StandInModule(full, _needs_gpu_message(full))
    for module, needs, names in OPTIONAL_DATASET_MODULES:
        missing = [n for n in needs if importlib.util.find_spec(n) is None]
        if missing and module not in sys.modules:
            reason = (
                f"needs {', '.join(missing)} (not installed), which rdoq does not need for "
                f"LiDAR nuScenes detectors; install them to use this dataset"
            )
            stand_in = _StandInModule(module, reason)
            for n in names:
                setattr(stand_in, n, _Unavailable(f"{module}.{n}", reason))
            sys.modules[module] = stand_in


def import_pcdet(src: Path | str | None = None) -> types.ModuleType:
    """``pcdet`` imported from the OpenPCDet checkout ``src`` (the directory holding ``pcdet/``
    and ``tools/``), or the installed one when ``src`` is None, with :mod:`pcdet.models` and
    :mod:`pcdet.datasets` importable on a machine without its CUDA ops (module docstring)."""
    if src is not None:
        src = Path(src).resolve()
        if not (src / "pcdet" / "__init__.py").is_file():
            raise ImportError(
                f"{src} is not an OpenPCDet checkout (no pcdet/__init__.py in it); "
                f"pass the directory that holds pcdet/ and tools/"
            )
    if "pcdet" in sys.modules:  # imported before: by an earlier call, or by the caller
        pkg_dir = Path(sys.modules["pcdet"].__file__).resolve().parent
        if src is not None and pkg_dir.parent != src:
            raise InputError(
                f"pcdet is already imported from {pkg_dir.parent}, not from {src}; "
                f"use one OpenPCDet checkout per process"
            )
    else:
        if src is not None and str(src) not in sys.path:
            sys.path.insert(0, str(src))
        spec = importlib.util.find_spec("pcdet")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "OpenPCDet (pcdet) is not importable: pass the OpenPCDet checkout "
                "(--pcdet_tools DIR/tools, or PCDET_SRC=DIR for the tests) or "
                "install it (https://github.com/open-mmlab/OpenPCDet, INSTALL.md)"
            )
        pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    require_spconv()  # pcdet imports spconv itself; this names the install and fixes the CPU path
    _provide_stand_ins(pkg_dir)
    try:
        importlib.import_module("pcdet.models")
        importlib.import_module("pcdet.datasets")
    except ModuleNotFoundError as e:
        raise ImportError(
            f"pcdet needs the package {e.name!r}, which is not installed: "
            f"{_INSTALL_HINT} installs pcdet's pure-Python dependencies"
        ) from e
    return importlib.import_module("pcdet")


@contextlib.contextmanager
def _working_dir(path: Path) -> Iterator[None]:
    """Run the enclosed code in ``path`` (pcdet resolves ``_BASE_CONFIG_`` against the cwd)."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _cuda_calls_stay_on_cpu() -> Iterator[None]:
    """Without CUDA, ``Tensor.cuda()`` returns the tensor itself inside the block (pcdet's head
    constructors call it); with CUDA nothing changes."""
    if torch.cuda.is_available():
        yield
        return
    # torch.Tensor inherits cuda from its C base: restore exactly what Tensor's own dict held.
    own = vars(torch.Tensor).get("cuda")

    def stay(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    torch.Tensor.cuda = stay
    try:
        yield
    finally:
        if own is None:
            del torch.Tensor.cuda
        else:
            torch.Tensor.cuda = own


def _base_configs(node: Any) -> list[str]:
    """Every ``_BASE_CONFIG_`` path in a loaded yaml tree."""
    if not isinstance(node, Mapping):
        return []
    found = [str(node["_BASE_CONFIG_"])] if "_BASE_CONFIG_" in node else []
    for value in node.values():
        found += _base_configs(value)
    return found


def tools_dir(cfg_file: Path) -> Path:
    """The directory pcdet must run in for ``cfg_file``: the cwd when its ``_BASE_CONFIG_``
    paths resolve there (the authors run from ``tools/``), else the nearest parent of the
    config where they do."""
    import yaml

    bases = _base_configs(yaml.safe_load(cfg_file.read_text()))
    for d in (Path.cwd(), *cfg_file.resolve().parents):
        if all((d / b).is_file() for b in bases):
            return d
    raise InputError(
        f"--cfg_file {cfg_file}: its _BASE_CONFIG_ {bases} is found neither in the "
        f"current directory nor above the config; run from OpenPCDet's tools/ "
        f"directory or pass --pcdet_tools"
    )


def load_cfg(
    cfg_file: Path | str, set_cfgs: Sequence[str] = (), pcdet_src: Path | str | None = None
) -> Any:
    """pcdet's config (an EasyDict) of ``cfg_file`` with ``--set KEY VALUE ...`` applied, read
    by pcdet's own ``cfg_from_yaml_file`` / ``cfg_from_list`` into a fresh dict (pcdet's module
    global ``cfg`` is left alone)."""
    import_pcdet(pcdet_src)
    from easydict import EasyDict
    from pcdet.config import cfg as pcdet_cfg
    from pcdet.config import cfg_from_list, cfg_from_yaml_file

    cfg_file = Path(cfg_file).resolve()
    if not cfg_file.is_file():
        raise InputError(
            f"--cfg_file {cfg_file} does not exist; pass an OpenPCDet model config "
            f"such as tools/cfgs/nuscenes_models/cbgs_voxel0075_voxelnext.yaml"
        )
    if len(set_cfgs) % 2:
        raise InputError(f"--set takes KEY VALUE pairs, got {len(set_cfgs)} items: {set_cfgs}")
    cfg = EasyDict(ROOT_DIR=pcdet_cfg.ROOT_DIR, LOCAL_RANK=0)
    with _working_dir(tools_dir(cfg_file)):
        cfg_from_yaml_file(str(cfg_file), cfg)
    cfg.TAG = cfg_file.stem
    try:
        cfg_from_list(list(set_cfgs), cfg)
    except (AssertionError, ValueError, KeyError) as e:
        raise InputError(
            f"--set {' '.join(set_cfgs)}: {e}; keys are dotted paths of the config "
            f"(e.g. DATA_CONFIG.POINT_CLOUD_RANGE) and values keep their type"
        ) from e
    return cfg


def deterministic_data_cfg(data_cfg: Any) -> Any:
    """A copy of pcdet's ``DATA_CONFIG`` with point shuffling off in both modes, so that the same
    points always give the same voxels (the voxel cap keeps the first points)."""
    data_cfg = copy.deepcopy(data_cfg)
    for step in data_cfg.get("DATA_PROCESSOR", []):
        if step.NAME == "shuffle_points":
            step.SHUFFLE_ENABLED = {"train": False, "test": False}
    return data_cfg


class SyntheticFrames(torch.utils.data.Dataset):
    """Random LiDAR frames shaped like the config's dataset (nuScenes: x, y, z, intensity, time
    lag), processed and collated by pcdet's own code.

    ``template`` is a pcdet ``DatasetTemplate`` in test mode built from ``cfg.DATA_CONFIG`` with
    shuffling off: what ``build_network`` reads (class names, point encoder, grid and voxel
    size) and what voxelizes the points (spconv's point-to-voxel through pcdet's
    ``DataProcessor``). Frame ``i`` of seed ``s`` is the same points, hence voxels, every time.
    """

    def __init__(
        self, cfg: Any, num_frames: int = 2, points_per_frame: int = 20000, seed: int = 0
    ) -> None:
        from pcdet.datasets.dataset import DatasetTemplate

        self.template = DatasetTemplate(
            dataset_cfg=deterministic_data_cfg(cfg.DATA_CONFIG),
            class_names=list(cfg.CLASS_NAMES),
            training=False,
        )
        self.num_frames = num_frames
        self.points_per_frame = points_per_frame
        self.seed = seed

    def __len__(self) -> int:
        return self.num_frames

    def points(self, index: int) -> np.ndarray:
        """Frame ``index``'s raw points ``(P, F)`` float32 in the point cloud range, features in
        the order of the config's ``src_feature_list``."""
        rng = np.random.default_rng([self.seed, index])
        pcr = self.template.point_cloud_range  # (6,) x0, y0, z0, x1, y1, z1
        names = list(self.template.dataset_cfg.POINT_FEATURE_ENCODING.src_feature_list)
        n = self.points_per_frame
        cols = []
        for i, name in enumerate(names):
            if i < 3:  # x, y, z
                cols.append(rng.uniform(pcr[i], pcr[i + 3], n))
            elif name == "intensity":  # nuScenes: 0..255
                cols.append(rng.uniform(0.0, 255.0, n))
            elif name == "timestamp":  # time lag of one of 10 sweeps at 20 Hz, in s
                cols.append(rng.integers(0, 10, n) * 0.05)
            else:
                cols.append(rng.uniform(0.0, 1.0, n))
        return np.stack(cols, 1).astype(np.float32)  # (P, F)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_frames:
            raise IndexError(f"frame {index} of {self.num_frames}")
        return self.template.prepare_data(
            {"points": self.points(index), "frame_id": f"synthetic_{self.seed}_{index}"}
        )

    def collate_batch(self, frames: list[dict[str, Any]]) -> dict[str, Any]:
        """pcdet's ``collate_batch`` (numpy arrays; :func:`to_device` makes tensors)."""
        return self.template.collate_batch(frames)

    def batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """Frames ``indices`` processed and collated into one pcdet batch."""
        return self.collate_batch([self[i] for i in indices])


def to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """A collated pcdet batch with its arrays as tensors on ``device`` (pcdet's
    ``load_data_to_gpu`` for any device: float32, ``image_shape`` int)."""
    out: dict[str, Any] = {}
    for key, val in batch.items():
        if not isinstance(val, np.ndarray) or key in _NON_TENSOR_KEYS:
            out[key] = val
        elif key == "image_shape":
            out[key] = torch.from_numpy(val).int().to(device)
        else:
            out[key] = torch.from_numpy(val).float().to(device)
    return out


@dataclass
class Detector:
    """A built pcdet detector: the model (eval mode, on its device), the config it was built
    from, the dataset object ``build_network`` saw, and how much of the checkpoint loaded."""

    model: nn.Module
    cfg: Any
    dataset: Any
    loaded_tensors: tuple[int, int] | None = None  # (loaded, in the model); None: random init


def _read_model_state(path: Path) -> dict[str, torch.Tensor]:
    """``model_state`` of a pcdet checkpoint, read without executing code."""
    expected = (
        "expected a checkpoint in OpenPCDet's format, a dict with 'model_state' (as "
        "tools/train.py saves)"
    )
    ckpt = load_torch_file(path, "--pretrained_model", expected)
    state = ckpt.get("model_state") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        keys = sorted(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise InputError(
            f"--pretrained_model {path} has no 'model_state' (found {keys}); {expected}"
        )
    return state


def _loadable(
    model_state: Mapping[str, torch.Tensor], ckpt_state: Mapping[str, torch.Tensor]
) -> list[str]:
    """Model keys pcdet's loader sets from ``ckpt_state``: same name and shape, or a spconv 1.x
    weight whose axes pcdet permutes into the model's shape."""
    keys = []
    for key, val in model_state.items():
        disk = ckpt_state.get(key)
        if not isinstance(disk, torch.Tensor):
            continue
        if disk.shape == val.shape or (
            disk.dim() == 5 and val.dim() == 5 and sorted(disk.shape) == sorted(val.shape)
        ):
            keys.append(key)
    return keys


def _check_checkpoint(path: Path, model: nn.Module, cfg_file: Path) -> tuple[int, int]:
    """(loaded, total) tensors of ``model`` that ``path`` sets; refuses a checkpoint that leaves
    most of its weights random."""
    model_state = model.state_dict()
    ckpt_state = _read_model_state(path)
    loaded = set(_loadable(model_state, ckpt_state))
    floats = {k: v.numel() for k, v in model_state.items() if v.is_floating_point()}
    w_total = sum(floats.values())
    w_loaded = sum(n for k, n in floats.items() if k in loaded)
    counts = (
        f"{len(loaded)}/{len(model_state)} tensors, {w_loaded:,}/{w_total:,} weights of the model"
    )
    if w_loaded < MIN_LOADED_FRACTION * w_total:
        missing = [k for k in model_state if k not in loaded][:3]
        unused = [k for k in ckpt_state if k not in model_state][:3]
        raise InputError(
            f"--pretrained_model {path} sets only {counts} built from {cfg_file} "
            f"(e.g. not set: {missing}; checkpoint keys the model lacks: {unused}); "
            f"pass the checkpoint trained with this config"
        )
    if len(loaded) < len(model_state):
        logger.warning(
            "--pretrained_model %s sets %s; the rest keeps its initial values", path, counts
        )
    return len(loaded), len(model_state)


def build_detector(
    cfg_file: Path | str,
    checkpoint: Path | str | None,
    set_cfgs: Sequence[str] = (),
    *,
    make_dataset: Callable[[Any], Any] | None = None,
    pcdet_src: Path | str | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Detector:
    """The detector of ``cfg_file`` (``--set`` pairs applied) built by pcdet's ``build_network``,
    weights from ``checkpoint`` by ``load_params_from_file`` (None: the random initialisation
    seeded by ``seed``, never implicitly), in eval mode on ``device``.

    ``make_dataset(cfg)`` gives the dataset object ``build_network`` reads (e.g. pcdet's
    ``build_dataloader(...)[0]``); default: :class:`SyntheticFrames` of the config. On CPU the
    sparse convs are left in train mode (:func:`rdoq.adapters.sparse.eval_on_cpu`).
    """
    cfg_file = Path(cfg_file).resolve()
    cfg = load_cfg(cfg_file, set_cfgs, pcdet_src)
    from pcdet.models import build_network

    dataset = make_dataset(cfg) if make_dataset is not None else SyntheticFrames(cfg).template
    torch.manual_seed(seed)
    with _cuda_calls_stay_on_cpu():
        model = build_network(model_cfg=cfg.MODEL, num_class=len(cfg.CLASS_NAMES), dataset=dataset)
    loaded = None
    if checkpoint is not None:
        checkpoint = Path(checkpoint).resolve()
        loaded = _check_checkpoint(checkpoint, model, cfg_file)
        model.load_params_from_file(filename=str(checkpoint), logger=logger, to_cpu=True)
    device = torch.device(device)
    model.to(device)
    if device.type == "cpu":
        eval_on_cpu(model)
    else:
        model.eval()
    return Detector(model, cfg, dataset, loaded)


def detector_layers(model: nn.Module, include: Sequence[str] = ("backbone_3d",)) -> list[LayerInfo]:
    """The quantizable layers of a pcdet detector in the sets ``include`` (of
    :data:`LAYER_SETS`), in ``named_modules`` order:

    - ``backbone_3d``: the 3-D sparse convs of the 3-D backbone (the paper's set);
    - ``backbone_2d``: the 2-D layers between it and the head (VoxelNeXt's ``conv_out`` and
      ``shared_conv`` sparse convs inside ``backbone_3d``; ``map_to_bev_module``,
      ``backbone_2d``);
    - ``head``: the dense head (and point / RoI heads);
    - ``vfe``: the voxel feature encoder (e.g. PointPillars' linear layers).
    """
    unknown = sorted(set(include) - set(LAYER_SETS))
    if unknown or not include:
        raise InputError(
            f"layer sets {unknown or list(include)} unknown; choose from {', '.join(LAYER_SETS)}"
        )

    def layer_set(info: LayerInfo) -> str | None:
        top = info.name.split(".", 1)[0]
        if top == "backbone_3d":  # 3-D kernels have 5-D weights (Cout, kD, kH, kW, Cin)
            return "backbone_3d" if len(info.shape) == 5 else "backbone_2d"
        if top in _BACKBONE_2D_MODULES:
            return "backbone_2d"
        if top in _HEAD_MODULES:
            return "head"
        return "vfe" if top == "vfe" else None

    layers = [info for info in find_layers(model) if layer_set(info) in include]
    if not layers:
        raise InputError(
            f"{type(model).__name__} has no quantizable layer in {list(include)}; "
            f"choose from {', '.join(LAYER_SETS)}"
        )
    return layers


def _run_to_head(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The detector's modules before its heads on a copy of ``batch`` (tensors on the model's
    device): the batch dict the dense head would receive."""
    heads = [getattr(model, n, None) for n in _HEAD_MODULES]
    out = dict(batch)  # the modules add keys; the caller's batch stays as it was
    for module in model.module_list:
        if any(module is h for h in heads if h is not None):
            break
        out = module(out)
    return out


def bev_feature(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The dense BEV feature ``(B, C, H, W)`` the detection head consumes: ``spatial_features_2d``
    for dense-BEV detectors, VoxelNeXt's sparse ``encoded_spconv_tensor`` densified (zeros at
    inactive sites). No post-processing runs."""
    out = _run_to_head(model, batch)
    if "spatial_features_2d" in out:
        return out["spatial_features_2d"]
    sparse = out.get("encoded_spconv_tensor")
    if sparse is None:
        raise InputError(
            f"{type(model).__name__} gives neither spatial_features_2d nor "
            f"encoded_spconv_tensor before its head; use --dist head"
        )
    dense = sparse.dense()  # (B, C, *spatial)
    if dense.dim() != 4:
        raise InputError(
            f"{type(model).__name__}'s head consumes a sparse tensor of "
            f"{dense.dim() - 2} spatial dims, not a BEV map; use --dist head"
        )
    return dense


def head_maps(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The head's raw prediction maps ``(B, K, H, W)`` before decoding and NMS, concatenated over
    its heads and their outputs in their fixed order: CenterPoint's ``CenterHead`` maps, or
    VoxelNeXt's sparse ones densified on the BEV grid (zeros at inactive sites, which are the same
    for every candidate: the active set follows the voxels, not the weights)."""
    out = _run_to_head(model, batch)
    head = getattr(model, "dense_head", None)
    kind = type(head).__name__
    if kind == "VoxelNeXtHead":
        x = out["encoded_spconv_tensor"]  # features (N_active, C) on a (H, W) grid
        maps = [h(x) for h in head.heads_list]  # per head: {name: (N_active, c)}
        features = torch.cat([m[k] for m in maps for k in m], dim=1)  # (N_active, K)
        # The heads are submanifold convs: their outputs sit at x's sites, in x's order.
        return x.replace_feature(features).dense()  # (B, K, H, W)
    if kind == "CenterHead":
        x = head.shared_conv(out["spatial_features_2d"])  # (B, C, H, W)
        maps = [h(x) for h in head.heads_list]  # per head: {name: (B, c, H, W)}
        return torch.cat([m[k] for m in maps for k in m], dim=1)  # (B, K, H, W)
    raise InputError(
        f"--dist head supports VoxelNeXtHead and CenterHead, not {kind}; use --dist bev"
    )


def require_gpu(what: str) -> None:
    """Refuse ``what`` unless CUDA and pcdet's compiled CUDA ops are both there."""
    stand_ins = [
        name
        for name, mod in sys.modules.items()
        if name.startswith("pcdet.ops.") and is_stand_in(mod)
    ]
    if not torch.cuda.is_available() or stand_ins:
        missing = (
            "no CUDA device"
            if not torch.cuda.is_available()
            else f"not built: {', '.join(sorted(stand_ins))}"
        )
        raise RuntimeError(f"{_needs_gpu_message(what)} ({missing})")


def predict_boxes(model: nn.Module, batch: Mapping[str, Any]) -> tuple[list[dict], dict]:
    """pcdet's full eval forward on a collated batch: ``(pred_dicts, recall_dict)`` after NMS.
    Needs a GPU (:func:`require_gpu`), checked before anything runs."""
    require_gpu("box prediction (pcdet's eval forward with NMS)")
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        return model(to_device(batch, device))
