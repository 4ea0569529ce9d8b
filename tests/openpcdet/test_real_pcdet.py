"""The OpenPCDet adapter against the real, unmodified OpenPCDet source (``conftest.pcdet_src``):
pcdet's own configs, ``build_network``, VoxelNeXt and checkpoint loading, on synthetic
nuScenes-shaped frames, without CUDA.

The stock ``cbgs_voxel0075_voxelnext.yaml`` with the point cloud range cropped by ``--set`` to
14.4 m x 14.4 m (a (41, 192, 192) voxel grid) so that a forward of two frames takes about a
second. The full ``model(batch)`` eval path is never run on CPU: its CUDA NMS would end the
process.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from rdoq.adapters.base import InputError
from rdoq.adapters.openpcdet import (
    SyntheticFrames,
    bev_feature,
    build_detector,
    detector_layers,
    head_maps,
    import_pcdet,
    is_stand_in,
    load_cfg,
    predict_boxes,
    to_device,
)
from rdoq.adapters.sparse import one_thread
from rdoq.groups import find_layers, get_group, group_bounds, set_group
from rdoq.quantizers import quantize_weight

pytestmark = [
    # pcdet's own deprecations (torch.cuda.amp.custom_fwd) and spconv's dense() indexing.
    pytest.mark.filterwarnings("ignore:`torch.cuda.amp.custom_fwd:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning"),
    pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning"),
]

CFG = "tools/cfgs/nuscenes_models/cbgs_voxel0075_voxelnext.yaml"
CROP = ("DATA_CONFIG.POINT_CLOUD_RANGE", "[-7.2, -7.2, -5.0, 7.2, 7.2, 3.0]")
POINTS_PER_FRAME = 4000
# The paper's quantized set: the 30 3-D sparse convs of VoxelNeXt's backbone.
PAPER_LAYERS = 30
PAPER_WEIGHTS = 7_066_224


@pytest.fixture(scope="module")
def pcdet(pcdet_src: Path):
    return import_pcdet(pcdet_src)


@pytest.fixture(scope="module")
def cfg_file(pcdet_src: Path, pcdet) -> Path:
    return pcdet_src / CFG


@pytest.fixture(scope="module")
def detector(cfg_file: Path):
    """VoxelNeXt, random initialisation (seed 0), eval mode on CPU."""
    return build_detector(cfg_file, None, CROP, seed=0)


@pytest.fixture(scope="module")
def batch(detector) -> dict:
    """Two synthetic frames, collated by pcdet and as tensors."""
    frames = SyntheticFrames(detector.cfg, num_frames=2, points_per_frame=POINTS_PER_FRAME)
    return to_device(frames.batch([0, 1]), "cpu")


def forward(fn, model, batch) -> torch.Tensor:
    with one_thread(), torch.no_grad():
        return fn(model, batch)


@pytest.fixture(scope="module")
def reference(detector, batch) -> torch.Tensor:
    return forward(bev_feature, detector.model, batch)


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def test_layer_discovery_finds_the_papers_30_backbone_layers(detector):
    layers = detector_layers(detector.model)
    assert len(layers) == PAPER_LAYERS
    assert sum(numel(info.shape) for info in layers) == PAPER_WEIGHTS
    assert all(info.name.startswith("backbone_3d.") for info in layers)
    assert Counter(info.type for info in layers) == {"SubMConv3d": 25, "SparseConv3d": 5}
    # The options add VoxelNeXt's two 2-D sparse convs (conv_out, shared_conv) and the head.
    two_d = detector_layers(detector.model, ("backbone_2d",))
    assert [info.name for info in two_d] == ["backbone_3d.conv_out.0", "backbone_3d.shared_conv.0"]
    head = detector_layers(detector.model, ("head",))
    assert head and all(info.name.startswith("dense_head.") for info in head)
    everything = detector_layers(detector.model, ("backbone_3d", "backbone_2d", "head"))
    assert [i.name for i in everything] == [i.name for i in find_layers(detector.model)]
    with pytest.raises(InputError, match="neck"):
        detector_layers(detector.model, ("neck",))


def test_missing_cuda_ops_are_stand_ins_that_raise_when_called(pcdet, pcdet_src: Path, detector):
    from pcdet.ops.iou3d_nms import iou3d_nms_utils

    op = sys.modules["pcdet.ops.iou3d_nms.iou3d_nms_cuda"]
    if not is_stand_in(op):
        pytest.skip("this OpenPCDet checkout has its CUDA ops built")
    with pytest.raises(RuntimeError, match="needs OpenPCDet's compiled CUDA ops and a GPU"):
        iou3d_nms_utils.nms_gpu(torch.zeros(2, 7), torch.ones(2), 0.5)
    # Provided in-process, never written into the tree; Tensor.cuda is restored after the build.
    assert pcdet.__version__.startswith("0.6.0")
    assert not (pcdet_src / "pcdet" / "version.py").exists()
    assert torch.Tensor.cuda is torch._C.TensorBase.cuda


def test_predict_boxes_without_gpu_raises_the_clear_error(detector, batch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the GPU path is a device check, not a CPU test")
    with pytest.raises(RuntimeError, match="needs OpenPCDet's compiled CUDA ops and a GPU"):
        predict_boxes(detector.model, batch)


def test_random_checkpoint_in_pcdet_format_loads_fully(detector, cfg_file: Path, tmp_path: Path):
    path = tmp_path / "checkpoint_epoch_1.pth"
    # What pcdet's train_utils.save_checkpoint writes, less the optimizer.
    torch.save(
        {
            "epoch": 1,
            "it": 0,
            "model_state": detector.model.state_dict(),
            "optimizer_state": None,
            "version": "pcdet+0.6.0",
        },
        path,
    )
    other = build_detector(cfg_file, path, CROP, seed=1)
    expected = detector.model.state_dict()
    got = other.model.state_dict()
    assert other.loaded_tensors == (len(expected), len(expected))
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not other.model.training  # eval mode, sparse convs left in train mode for CPU biases
    assert other.model.backbone_3d.conv_input[0].training


def test_checkpoint_with_wrong_keys_is_refused(detector, cfg_file: Path, tmp_path: Path):
    state = detector.model.state_dict()
    path = tmp_path / "renamed.pth"
    torch.save({"model_state": {f"detector.{k}": v for k, v in state.items()}}, path)
    with pytest.raises(InputError, match=rf"renamed\.pth sets only 0/{len(state)} tensors"):
        build_detector(cfg_file, path, CROP)
    not_pcdet = tmp_path / "state_dict.pth"
    torch.save(state, not_pcdet)
    with pytest.raises(InputError, match="has no 'model_state'"):
        build_detector(cfg_file, not_pcdet, CROP)


def test_config_resolves_base_configs_from_anywhere(
    pcdet_src: Path, cfg_file: Path, tmp_path: Path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    cfg = load_cfg(cfg_file, CROP)
    assert Path.cwd() == tmp_path  # pcdet ran in tools/; the cwd is restored
    assert cfg.DATA_CONFIG.DATASET == "NuScenesDataset"  # from the _BASE_CONFIG_
    assert cfg.DATA_CONFIG.POINT_CLOUD_RANGE == [-7.2, -7.2, -5.0, 7.2, 7.2, 3.0]
    monkeypatch.chdir(pcdet_src / "tools")  # as the authors run: a path relative to tools/
    assert load_cfg("cfgs/nuscenes_models/cbgs_voxel0075_voxelnext.yaml").CLASS_NAMES[0] == "car"
    with pytest.raises(InputError, match="NOT_A_KEY"):
        load_cfg(cfg_file, ("DATA_CONFIG.NOT_A_KEY", "1"))


def test_import_errors_name_the_fix(tmp_path: Path, pcdet):
    with pytest.raises(ImportError, match="not an OpenPCDet checkout"):
        import_pcdet(tmp_path)


def test_synthetic_frames_are_deterministic(detector):
    frames = SyntheticFrames(detector.cfg, num_frames=2, points_per_frame=POINTS_PER_FRAME)
    a, b = frames[1], frames[1]
    assert np.array_equal(a["voxels"], b["voxels"])
    assert np.array_equal(a["voxel_coords"], b["voxel_coords"])
    again = SyntheticFrames(detector.cfg, num_frames=2, points_per_frame=POINTS_PER_FRAME)
    assert np.array_equal(again[1]["voxels"], a["voxels"])
    assert not np.array_equal(frames[0]["voxel_coords"], a["voxel_coords"])
    points = frames.points(0)  # (P, 5): x, y, z, intensity, time lag
    assert points.shape == (POINTS_PER_FRAME, 5)
    pcr = np.array(CROP[1].strip("[]").split(","), dtype=np.float32)
    assert (points[:, :3] >= pcr[:3]).all() and (points[:, :3] <= pcr[3:]).all()
    shuffle = [s for s in frames.template.dataset_cfg.DATA_PROCESSOR if s.NAME == "shuffle_points"]
    assert shuffle and not any(shuffle[0].SHUFFLE_ENABLED.values())


def test_bev_feature_is_deterministic(detector, batch, reference):
    grid = 192 // 8  # 14.4 m / 0.075 m, at the head's stride 8
    assert reference.shape == (2, 128, grid, grid)
    assert reference.abs().sum() > 0
    assert torch.equal(forward(bev_feature, detector.model, batch), reference)
    assert batch.keys() == {
        "points",
        "frame_id",
        "lidar_aug_matrix",
        "use_lead_xyz",
        "voxels",
        "voxel_coords",
        "voxel_num_points",
        "batch_size",
    }


def test_unperturbed_candidate_has_zero_distortion(detector, batch, reference):
    model = detector.model
    layer = next(i for i in detector_layers(model) if i.type == "SparseConv3d")
    weight = model.get_submodule(layer.name).weight
    saved = weight.detach().clone()  # (Cout, kD, kH, kW, Cin)
    bounds = group_bounds(weight.shape[0], 16)
    try:
        for b in bounds:  # write every group back unchanged
            set_group(weight, b, get_group(saved, b).clone())
        assert torch.sum((forward(bev_feature, model, batch) - reference) ** 2).item() == 0.0
        step_log2 = math.log2(float(saved.abs().max()))
        coarse = quantize_weight(get_group(saved, bounds[0]), 2, step_log2, 0.0)
        set_group(weight, bounds[0], coarse)
        assert torch.sum((forward(bev_feature, model, batch) - reference) ** 2).item() > 0.0
    finally:
        for b in bounds:
            set_group(weight, b, get_group(saved, b))
    assert torch.equal(forward(bev_feature, model, batch), reference)


def test_head_maps_are_the_raw_maps_on_the_bev_grid(detector, batch, reference):
    maps = forward(head_maps, detector.model, batch)
    # 6 heads x (center 2, center_z 1, dim 3, rot 2, vel 2) + 10 class heatmaps.
    assert maps.shape == (2, 70, *reference.shape[2:])
    assert torch.equal(forward(head_maps, detector.model, batch), maps)
    active = reference.abs().sum(1) > 0  # (B, H, W) sites the sparse head predicts at
    assert (maps.abs().sum(1) > 0).logical_and(~active).sum() == 0


def test_importing_the_adapter_does_not_import_pcdet():
    code = """
import importlib.util, sys
import rdoq.adapters.openpcdet as op, rdoq.curves, rdoq.engine, rdoq.backends, rdoq.groups
assert "pcdet" not in sys.modules, "pcdet imported"
if importlib.util.find_spec("pcdet") is None:  # no installed pcdet: the error names the fix
    try:
        op.import_pcdet()
    except ImportError as e:
        assert "pass the OpenPCDet checkout" in str(e), e
    else:
        raise AssertionError("import_pcdet() without pcdet did not raise")
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
