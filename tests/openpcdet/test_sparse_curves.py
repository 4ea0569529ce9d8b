"""Curves of a network whose calibration samples are point-cloud frames (DESIGN §11).

A small VoxelNeXt-like network written here from spconv layers, on synthetic point clouds
voxelized by spconv's ``PointToVoxel``, wrapped in :class:`rdoq.adapters.sparse.FrameRunner` and
run through the same ``rdoq`` code as the classifiers: ``generate_curves`` with both estimators,
the curve store, the DP allocation and ``apply_allocation``. Tests that need spconv are skipped
without it (``pip install -e .[pcdet]``); the dense-model test of the one-sample gradient path
is not.
"""

from __future__ import annotations

import contextlib
import copy
import time

import numpy as np
import pytest
import torch
from torch import nn

from rdoq import hessian
from rdoq.adapters import sparse
from rdoq.allocation import build_table, solve_recorded
from rdoq.allocfile import make_allocation
from rdoq.apply import apply_allocation
from rdoq.backends import quantized_group
from rdoq.curves import CurveJob, generate_curves
from rdoq.engine import MeasuredEngine
from rdoq.groups import find_layers, group_bounds
from rdoq.hessian import GradientSweep, HessianSettings
from rdoq.parts import PartSpec
from rdoq.search import Candidate
from rdoq.steps import ChannelSteps
from rdoq.store import CurveStore

# spconv's SparseConvTensor.dense() indexes with a list (a torch deprecation warning, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

RANGE_XYZ = (0.0, 0.0, 0.0, 6.4, 6.4, 3.2)  # metres: x0, y0, z0, x1, y1, z1
VOXEL = 0.4  # metres
SPATIAL = (8, 16, 16)  # (D, H, W) = (z, y, x) voxels
GROUP_SIZE = 8
N_FRAMES = 6
INFO = {"arch": "tiny-voxelnext", "weights_source": "test", "checkpoint_sha256": None}


@pytest.fixture(scope="module")
def sp():
    """``spconv.pytorch`` with rdoq's CPU fixes, or a skip naming the install command."""
    pytest.importorskip("spconv.pytorch", reason="spconv not installed: pip install -e .[pcdet]")
    return sparse.require_spconv()


class TinyVoxelNeXt(nn.Module):
    """VoxelNeXt's shape in miniature: a biased SubMConv3d input layer, a strided SparseConv3d,
    a SubMConv3d wider than a group (40 = 5 groups of 8), BatchNorm1d on the features, the BEV
    collapse (``.dense()`` and a reshape of depth into channels) and a dense Conv2d on the BEV
    map, whose output ``(B, 16, H/2, W/2)`` is what distortion is measured on."""

    def __init__(self, sp) -> None:
        super().__init__()
        self.conv_input = sp.SparseSequential(
            sp.SubMConv3d(4, 16, 3, padding=1, bias=True, indice_key="subm1"),
            nn.BatchNorm1d(16),
            nn.ReLU(),
        )
        self.conv2 = sp.SparseSequential(
            sp.SparseConv3d(16, 24, 3, stride=2, padding=1, bias=False, indice_key="spconv2"),
            nn.BatchNorm1d(24),
            nn.ReLU(),
            sp.SubMConv3d(24, 40, 3, padding=1, bias=False, indice_key="subm2"),
            nn.BatchNorm1d(40),
            nn.ReLU(),
        )
        depth = SPATIAL[0] // 2
        self.shared_conv = nn.Conv2d(40 * depth, 16, 3, padding=1)

    def forward(self, x) -> torch.Tensor:
        y = self.conv2(self.conv_input(x)).dense()  # (B, 40, D/2, H/2, W/2)
        bev = y.reshape(y.shape[0], -1, *y.shape[3:])  # (B, 40·D/2, H/2, W/2)
        return self.shared_conv(bev)  # (B, 16, H/2, W/2)


def make_net(sp, seed: int = 0) -> TinyVoxelNeXt:
    """The network with non-trivial BatchNorm statistics, in eval mode (sparse convs in train
    mode, as spconv's CPU kernels need for biases)."""
    torch.manual_seed(seed)
    net = TinyVoxelNeXt(sp)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return sparse.eval_on_cpu(net)


def point_cloud(seed: int) -> torch.Tensor:
    """``(P, 4)`` points (x, y, z, intensity): a noisy ground plane and three box-shaped
    objects at random places."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = torch.tensor(RANGE_XYZ[:3]), torch.tensor(RANGE_XYZ[3:])
    ground = torch.rand(300, 3, generator=g) * (hi - lo) + lo
    ground[:, 2] = 0.1 + 0.05 * torch.randn(300, generator=g).abs()
    parts = [ground]
    for _ in range(3):
        size = torch.tensor([0.8, 0.8, 1.6]) * (0.5 + torch.rand(3, generator=g))
        corner = torch.rand(3, generator=g) * (hi - lo - size) + lo
        corner[2] = 0.0
        parts.append(corner + torch.rand(150, 3, generator=g) * size)
    xyz = torch.cat(parts)  # (P, 3)
    intensity = torch.rand(xyz.shape[0], 1, generator=g)
    return torch.cat([xyz, intensity], 1)  # (P, 4)


def voxel_frame(sp, points: torch.Tensor):
    """One frame: the points voxelized by spconv's PointToVoxel, the mean of each voxel's
    points as its features, a SparseConvTensor of batch size 1."""
    from spconv.pytorch.utils import PointToVoxel

    cap = 4096  # more than the grid holds: no voxel is dropped, whatever the point order
    gen = PointToVoxel(
        vsize_xyz=[VOXEL] * 3,
        coors_range_xyz=list(RANGE_XYZ),
        num_point_features=4,
        max_num_voxels=cap,
        max_num_points_per_voxel=16,
    )
    voxels, coords, counts = gen(points)  # (V, 16, 4), (V, 3) zyx, (V,)
    assert 0 < voxels.shape[0] < cap
    features = voxels.sum(1) / counts.unsqueeze(1).to(voxels)  # (V, 4) mean of the points
    indices = torch.cat([torch.zeros_like(coords[:, :1]), coords], 1).int()  # (V, 4) b, z, y, x
    return sp.SparseConvTensor(features, indices, list(SPATIAL), 1)


def run(model: nn.Module, frame) -> torch.Tensor:
    """The adapter's ``run``: the BEV map of one frame ``(1, 16, H/2, W/2)``."""
    return model(frame)


def frames_of(sp, n: int = N_FRAMES) -> list:
    return [voxel_frame(sp, point_cloud(seed)) for seed in range(n)]


def plain_forward(sp, net: nn.Module, frames: list) -> torch.Tensor:
    """``(N, O)`` outputs of ``net`` on each frame, in float64, without the FrameRunner."""
    outs = []
    with sparse.one_thread(), torch.no_grad():
        for f in frames:
            x = sp.SparseConvTensor(f.features.double(), f.indices, f.spatial_shape, 1)
            outs.append(net(x).reshape(1, -1))
    return torch.cat(outs)


def calib_meta(runner: sparse.FrameRunner) -> dict:
    return {
        "size": len(runner.frames),
        "seed": 0,
        "source": "synthetic point clouds",
        "sha256": runner.sha256(),
        "items": [],
    }


def job(estimator: str = "measured", **kw) -> CurveJob:
    base = dict(
        kind="weight",
        group_size=GROUP_SIZE,
        nr=6,
        ndz=2,
        max_steps=8,
        step_grid=4,
        max_batch=8,
        use_cuts=False,
        progress=False,
        estimator=estimator,
        hessian=HessianSettings(nprobes=16, seed=0) if estimator == "hessian" else None,
        sweep_batch=4,
    )
    return CurveJob(**{**base, **kw})


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).double() ** 2).mean())


def rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two vectors without ties."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


# ---------------------------------------------------------------------------------------------
# FrameRunner and the measured engine


def test_frame_runner_stacks_each_frames_run_and_keeps_the_networks_layer_names(sp):
    net, frames = make_net(sp), frames_of(sp, 3)
    runner = sparse.FrameRunner(net, frames, run).double().eval()
    assert (
        [lay.name for lay in find_layers(runner)]
        == [lay.name for lay in find_layers(net)]
        == ["conv_input.0", "conv2.0", "conv2.3", "shared_conv"]
    )
    assert net.conv_input[0].weight.dtype == torch.float64  # conversions reach the network
    assert not net.training and not net.conv_input[1].training
    assert net.conv_input[0].training  # biased sparse conv: train mode on CPU
    x = runner.indices()
    assert x.shape == (3, 1)
    with torch.no_grad():
        y = runner(x[[2, 0]])
    assert y.shape == (2, 16, 8, 8)
    assert torch.equal(y.reshape(2, -1), plain_forward(sp, net, [frames[2], frames[0]]))
    with pytest.raises(ValueError, match=r"one row \(1, …\) per frame"):
        sparse.FrameRunner(net, frames, lambda m, f: m(f)[0])(x[:1])

    def scaling_run(model: nn.Module, frame) -> torch.Tensor:
        frame.features.mul_(0.5)  # a run that writes into its input
        return model(frame)

    writer = sparse.FrameRunner(net, frames, scaling_run)
    with torch.no_grad():
        assert torch.equal(writer(x), writer(x))  # each run gets a fresh copy of the frame


def test_second_order_bias_correction_of_spconv_layers_is_refused_by_name(sp, tmp_path):
    # (The measured engine's -bcw on spconv layers: tests/openpcdet/test_sparse_acts.py.)
    runner = sparse.FrameRunner(make_net(sp), frames_of(sp, 2), run)
    with pytest.raises(ValueError, match=r"spconv layers \['conv_input.0'.*-bcw"):
        generate_curves(
            runner,
            runner.indices(),
            INFO,
            calib_meta(runner),
            job("hessian", bias_corr=True),
            tmp_path / "c",
            PartSpec(0, 1),
            torch.device("cpu"),
        )


def test_unperturbed_candidate_has_exactly_zero_distortion_and_no_slot_batching(sp):
    net = make_net(sp)
    runner = sparse.FrameRunner(net, frames_of(sp, 3), run).double().eval()
    x = runner.indices().double()
    engine = MeasuredEngine(runner, x, max_rows=2, use_cuts=False)
    assert torch.equal(engine.reference, plain_forward(sp, net, runner.frames))
    for lay in find_layers(runner):
        # Frames run one at a time, so no layer call holds K candidate slots: every layer,
        # the dense Conv2d too, swaps weights in place.
        assert not engine.slot_forward_ok(lay.name)
        dist = engine.measure(lay.name, 1, lambda identity: contextlib.nullcontext())
        assert dist.tolist() == [0.0], lay.name


# ---------------------------------------------------------------------------------------------
# Curves by both estimators, the store, the allocation


@pytest.fixture(scope="module")
def curve_sets(sp, tmp_path_factory):
    """Measured and second-order weight curve sets of one network on the same frames, and
    the seconds each took."""
    root = tmp_path_factory.mktemp("sparse_curves")
    net, frames = make_net(sp), frames_of(sp)
    out = {"net": net, "frames": frames, "seconds": {}}
    for estimator in ("measured", "hessian"):
        runner = sparse.FrameRunner(net, frames, run)
        t0 = time.perf_counter()
        summary = generate_curves(
            runner,
            runner.indices(),
            INFO,
            calib_meta(runner),
            job(estimator),
            root / estimator,
            PartSpec(0, 1),
            torch.device("cpu"),
        )
        out["seconds"][estimator] = time.perf_counter() - t0
        assert summary["layers_written"] == 4 and summary["missing_layers"] == 0
        out[estimator] = CurveStore.load(root / estimator)
    return out


@pytest.mark.slow
def test_curve_sets_of_both_estimators_are_written_and_readable(curve_sets):
    for estimator in ("measured", "hessian"):
        store = curve_sets[estimator]
        assert store.meta["estimator"] == estimator
        assert store.meta["calib"]["size"] == N_FRAMES
        assert [e["name"] for e in store.meta["layers"]] == [
            "conv_input.0",
            "conv2.0",
            "conv2.3",
            "shared_conv",
        ]
        assert store.missing_layers() == []
        for e in store.meta["layers"]:
            c = store.read_layer(e["name"])
            g = len(group_bounds(e["shape"][0], GROUP_SIZE))
            assert c.dist.shape == (g, 2, 6) and np.isfinite(c.dist).all()
            assert (c.dist >= 0).all()
            assert (c.dist[:, 0, 5] < c.dist[:, 0, 1]).all()  # 5 bits beat 1 bit
    assert curve_sets["measured"].read_layer("conv2.3").dist.shape[0] == 5  # 40 channels


@pytest.mark.slow
def test_measured_curve_points_equal_a_plain_forward_with_the_group_quantized(sp, curve_sets):
    net, frames = curve_sets["net"], curve_sets["frames"]
    store = curve_sets["measured"]
    ref = plain_forward(sp, net, frames)
    modules = dict(net.named_modules())
    checked = 0
    for e in store.meta["layers"]:
        c = store.read_layer(e["name"])
        module = modules[e["name"]]
        w = module.weight.detach()
        steps = ChannelSteps(c.extra["channel_step_log2"], c.extra["channel_deadzone"])
        bounds = group_bounds(w.shape[0], GROUP_SIZE)
        for g in range(len(bounds)):
            for d in range(2):
                for b in (0, 2, 4):
                    cand = Candidate(g, b, float(c.step_log2[g, d, b]), d / 2, dz_index=d)
                    orig = w.clone()
                    c0, c1 = bounds[g]
                    with torch.no_grad():
                        module.weight[c0:c1] = quantized_group(orig, bounds, cand, steps)
                    try:
                        got = mse(plain_forward(sp, net, frames), ref)
                    finally:
                        with torch.no_grad():
                            module.weight.copy_(orig)
                    assert c.dist[g, d, b] == pytest.approx(got, rel=1e-9, abs=1e-300), (
                        e["name"],
                        g,
                        d,
                        b,
                    )
                    checked += 1
    assert checked == 12 * 2 * 3


@pytest.mark.slow
def test_second_order_curves_rank_groups_like_the_measured_ones(curve_sets):
    per_bits = {}
    for b in (2, 3, 4):
        vals = {}
        for estimator in ("measured", "hessian"):
            store = curve_sets[estimator]
            vals[estimator] = np.concatenate(
                [store.read_layer(e["name"]).dist[:, :, b].min(1) for e in store.meta["layers"]]
            )  # (G,)
        per_bits[b] = rank_corr(vals["measured"], vals["hessian"])
        ratio = vals["hessian"] / vals["measured"]
        print(
            f"bits {b}: rank correlation {per_bits[b]:.3f}, hessian/measured "
            f"{ratio.min():.2f}..{ratio.max():.2f} (median {np.median(ratio):.2f}) over "
            f"{len(ratio)} groups"
        )
    print(f"seconds: {curve_sets['seconds']}")
    assert min(per_bits.values()) > 0.8, per_bits


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["measured", "hessian"])
def test_dp_allocation_applies_end_to_end_with_the_predicted_distortion(sp, curve_sets, estimator):
    net, frames = curve_sets["net"], curve_sets["frames"]
    ref = plain_forward(sp, net, frames)
    table = build_table(curve_sets[estimator], None)
    targets = [2.0, 4.0]
    solved = solve_recorded(table, targets, "dp")
    applied = []
    for target, choice, record in zip(targets, solved.choices, solved.records, strict=True):
        alloc = make_allocation(table, choice, target_bits=target, solver="dp", record=record)
        assert alloc["summary"]["w_bits"] <= target + 1e-9
        q = apply_allocation(net, alloc)
        assert set(alloc["weights"]) == {lay.name for lay in find_layers(net)}
        # The quantized network through the runner, as an evaluation would run it.
        runner = sparse.FrameRunner(q, frames, run)
        with torch.no_grad():
            got = mse(runner(runner.indices()).reshape(len(frames), -1), ref)
        pred = alloc["summary"]["pred_dist"]
        print(
            f"{estimator} curves, target {target} bits: w_bits "
            f"{alloc['summary']['w_bits']:.3f}, predicted {pred:.3e}, applied {got:.3e} "
            f"(ratio {got / pred:.2f})"
        )
        assert 0.5 * pred < got < 2.0 * pred
        applied.append(got)
    assert applied[1] < applied[0]  # more bits, less distortion
    for name, p in net.state_dict().items():  # the full-precision network is untouched
        assert torch.equal(p, curve_sets["net"].state_dict()[name])


# ---------------------------------------------------------------------------------------------
# The one-sample gradient path: the same rows as the batched capture (scaling pinned)


class DenseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("probe", ["random", "norm"])
def test_one_sample_gradient_rows_equal_the_batched_capture_on_a_dense_model(
    monkeypatch, tmp_path, probe
):
    torch.manual_seed(0)
    model = DenseNet().double().eval()
    x = torch.randn(7, 3, 6, 6, dtype=torch.float64)
    layers = ["conv", "conv2", "fc"]
    settings = HessianSettings(probe=probe, nprobes=3, seed=1)
    batched = GradientSweep(model, x, layers, "weight", settings, batch_size=3)
    batched.ensure("conv")
    monkeypatch.setattr(hessian, "needs_own_pass", lambda m: True)
    alone = GradientSweep(model, x, layers, "weight", settings, batch_size=3)
    alone.ensure("conv")
    for name in layers:
        assert alone.rows[name].shape == batched.rows[name].shape
        torch.testing.assert_close(alone.rows[name], batched.rows[name], rtol=1e-10, atol=1e-12)
    # Whole curve sets through generate_curves agree too.
    dists = []
    for path in ("alone", "batched"):
        if path == "batched":
            monkeypatch.undo()
        hjob = CurveJob(
            kind="weight",
            group_size=2,
            nr=5,
            ndz=1,
            max_steps=8,
            step_grid=4,
            progress=False,
            estimator="hessian",
            hessian=settings,
        )
        calib = {"size": 7, "seed": 0, "source": "test", "sha256": "x", "items": []}
        generate_curves(
            copy.deepcopy(model),
            x,
            INFO,
            calib,
            hjob,
            tmp_path / path,
            PartSpec(0, 1),
            torch.device("cpu"),
        )
        store = CurveStore.load(tmp_path / path)
        dists.append(np.concatenate([store.read_layer(n).dist.ravel() for n in layers]))
    np.testing.assert_allclose(dists[0], dists[1], rtol=1e-9)


def test_one_sample_gradient_rows_of_the_dense_layer_inside_a_frame_runner(sp, monkeypatch):
    # The dense Conv2d after the BEV collapse goes through the batched capture one frame per
    # forward; forcing the one-sample path on it must give the same rows.
    net = make_net(sp)
    runner = sparse.FrameRunner(net, frames_of(sp, 3), run).double().eval()
    x = runner.indices().double()
    settings = HessianSettings(nprobes=2, seed=0)
    names = ["conv2.3", "shared_conv"]
    captured = GradientSweep(runner, x, names, "weight", settings, batch_size=4)
    captured.ensure("shared_conv")
    monkeypatch.setattr(hessian, "needs_own_pass", lambda m: True)
    alone = GradientSweep(runner, x, names, "weight", settings, batch_size=4)
    alone.ensure("shared_conv")
    for name in names:
        torch.testing.assert_close(alone.rows[name], captured.rows[name], rtol=1e-10, atol=1e-12)
    assert captured.rows["conv2.3"].abs().sum() > 0
