"""spconv layers as first-class weight layers: layout, discovery, applying an allocation, -bcw.

A small network written here from spconv layers (no OpenPCDet) on random voxels. Tests that need
spconv are skipped without it (``pip install -e .[pcdet]``); the import-hygiene tests are not.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rdoq.adapters import sparse
from rdoq.apply import apply_allocation, load_quantized, save_quantized
from rdoq.curves import CurveJob, plan_layers
from rdoq.groups import channel_dim, find_layers, group_bounds
from rdoq.hessian import HessianSettings
from rdoq.quantizers import deadzone_threshold, quantize_weight
from rdoq.steps import ChannelSteps

# spconv's SparseConvTensor.dense() indexes with a list (a torch deprecation warning, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

SPATIAL = (12, 10, 8)  # (D, H, W) voxel grid
GROUP_SIZE = 16


@pytest.fixture(scope="module")
def sp():
    """``spconv.pytorch`` with rdoq's CPU fixes, or a skip naming the install command."""
    pytest.importorskip("spconv.pytorch", reason="spconv not installed: pip install -e .[pcdet]")
    return sparse.require_spconv()


def sparse_input(
    sp,
    shape: tuple[int, ...] = SPATIAL,
    n: int = 120,
    batch: int = 2,
    cin: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """``n`` distinct random active sites per sample of a ``shape`` grid, random features."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        flat = torch.randperm(math.prod(shape), generator=g)[:n]  # (n,) distinct sites
        coords = torch.stack(torch.unravel_index(flat, shape), 1)  # (n, len(shape))
        rows.append(torch.cat([torch.full((n, 1), b), coords], 1))
    indices = torch.cat(rows).int()  # (batch*n, 1+len(shape)): batch, then spatial axes
    features = torch.randn(indices.shape[0], cin, generator=g, dtype=dtype)  # (N, Cin)
    return sp.SparseConvTensor(features, indices, list(shape), batch)


class TinySparseNet(nn.Module):
    """A VoxelNeXt-like stem: a biased SubMConv3d, a strided SparseConv3d, a SubMConv3d wider
    than a group (40 = 16 + 16 + 8 channels), BatchNorm1d on features, a dense linear head."""

    def __init__(self, sp) -> None:
        super().__init__()
        self.conv_in = sp.SparseSequential(
            sp.SubMConv3d(4, 8, 3, padding=1, bias=True, indice_key="subm1"),
            nn.BatchNorm1d(8),
            nn.ReLU(),
        )
        self.down = sp.SparseSequential(
            sp.SparseConv3d(8, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm1d(16),
            nn.ReLU(),
        )
        self.wide = sp.SubMConv3d(16, 40, 3, padding=1, bias=False, indice_key="subm2")
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        y = self.wide(self.down(self.conv_in(x)))
        return self.head(y.features)  # (N_active, 3)


def make_net(sp, seed: int = 0) -> TinySparseNet:
    """The network with non-trivial BatchNorm statistics, in eval mode (sparse convs in train
    mode, as spconv's CPU kernels need for biases)."""
    torch.manual_seed(seed)
    net = TinySparseNet(sp)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return sparse.eval_on_cpu(net)


def forward(net: nn.Module, x) -> torch.Tensor:
    with sparse.one_thread(), torch.no_grad():
        return net(x)


def active_mask(x) -> torch.Tensor:
    """``(B, 1, *spatial)`` 1 at the active sites of ``x``, else 0."""
    mask = torch.zeros(x.batch_size, 1, *x.spatial_shape, dtype=x.features.dtype)
    idx = x.indices.long()
    mask[(idx[:, 0], 0, *idx[:, 1:].T)] = 1.0
    return mask


# ---------------------------------------------------------------------------------------------
# (a) weight layout (Cout, *kernel, Cin): sparse convs equal dense convs on the densified input


def test_subm_and_strided_sparse_conv3d_equal_dense_conv3d(sp):
    net = make_net(sp).double()
    x = sparse_input(sp, dtype=torch.float64)
    subm, down = net.conv_in[0], net.down[0]
    assert tuple(subm.weight.shape) == (8, 3, 3, 3, 4)
    with sparse.one_thread(), torch.no_grad():
        y = subm(x)
        z = down(y)
    # (Cout, kD, kH, kW, Cin) → F.conv3d's (Cout, Cin, kD, kH, kW)
    dense = F.conv3d(x.dense(), subm.weight.permute(0, 4, 1, 2, 3), subm.bias, padding=1)
    assert torch.equal(y.indices, x.indices)  # submanifold: the active sites stay
    torch.testing.assert_close(y.dense(), dense * active_mask(x), rtol=0, atol=1e-12)
    # A strided sparse conv without bias is the dense conv everywhere (inactive outputs are 0).
    dense = F.conv3d(y.dense(), down.weight.permute(0, 4, 1, 2, 3), stride=2, padding=1)
    assert list(z.spatial_shape) == list(dense.shape[2:])
    torch.testing.assert_close(z.dense(), dense, rtol=0, atol=1e-12)


def test_sparse_conv2d_layers_equal_dense_conv2d(sp):
    torch.manual_seed(1)
    subm = sp.SubMConv2d(3, 5, (3, 1), padding=(1, 0), bias=True).double()
    down = sp.SparseConv2d(5, 6, 2, stride=2, bias=False).double()
    x = sparse_input(sp, shape=(9, 8), n=30, cin=3, dtype=torch.float64)
    assert tuple(subm.weight.shape) == (5, 3, 1, 3)  # (Cout, kH, kW, Cin)
    with sparse.one_thread(), torch.no_grad():
        y = subm(x)
        z = down(y)
    dense = F.conv2d(x.dense(), subm.weight.permute(0, 3, 1, 2), subm.bias, padding=(1, 0))
    torch.testing.assert_close(y.dense(), dense * active_mask(x), rtol=0, atol=1e-12)
    dense = F.conv2d(y.dense(), down.weight.permute(0, 3, 1, 2), stride=2)
    torch.testing.assert_close(z.dense(), dense, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# (b) discovery and groups


def weight_job(group_size: int = GROUP_SIZE, kind: str = "weight") -> CurveJob:
    return CurveJob(
        kind=kind,
        group_size=group_size,
        nr=6,
        ndz=2,
        max_steps=8,
        step_grid=4,
        act_mode="out" if kind == "act" else None,
        progress=False,
    )


def test_discovery_finds_every_spconv_layer_with_its_channels_and_groups(sp):
    net = make_net(sp)
    layers = find_layers(net)
    assert [(lay.name, lay.type, lay.shape) for lay in layers] == [
        ("conv_in.0", "SubMConv3d", (8, 3, 3, 3, 4)),
        ("down.0", "SparseConv3d", (16, 3, 3, 3, 8)),
        ("wide", "SubMConv3d", (40, 3, 3, 3, 16)),
        ("head", "Linear", (3, 40)),
    ]
    plans = {p.name: p for p in plan_layers(net, None, weight_job())}
    assert plans["conv_in.0"].bounds == [(0, 8)]
    assert plans["down.0"].bounds == [(0, 16)]
    assert plans["wide"].bounds == [(0, 16), (16, 32), (32, 40)]  # partial last group
    assert plans["wide"].numel.tolist() == [16 * 27 * 16, 16 * 27 * 16, 8 * 27 * 16]
    modules = dict(net.named_modules())
    assert channel_dim(modules["wide"]) == -1  # features (N_active, C): channels last


def test_discovery_finds_2d_sparse_convs(sp):
    net = sp.SparseSequential(sp.SubMConv2d(3, 5, 3, padding=1), sp.SparseConv2d(5, 7, 2, 2))
    assert [(lay.type, lay.shape) for lay in find_layers(net)] == [
        ("SubMConv2d", (5, 3, 3, 3)),
        ("SparseConv2d", (7, 2, 2, 5)),
    ]


def test_other_weight_layouts_are_refused_naming_the_layer(sp):
    net = make_net(sp)
    w = net.wide.weight  # (Cout, kD, kH, kW, Cin)
    net.wide.weight = nn.Parameter(w.detach().permute(1, 2, 3, 0, 4).contiguous())  # "RSKC"
    with pytest.raises(ValueError, match=r"'wide' \(SubMConv3d\) has weight shape \(3, 3, 3, 40"):
        find_layers(net)


def test_a_non_krsc_spconv_build_is_refused_even_when_shapes_agree(sp, monkeypatch):
    # A layer whose channel counts equal its kernel size: only spconv's own rule tells.
    net = sp.SparseSequential(sp.SubMConv3d(3, 3, 3))
    find_layers(net)
    monkeypatch.setattr(sys.modules["spconv.constants"], "ALL_WEIGHT_IS_KRSC", False)
    with pytest.raises(ValueError, match=r"layer '0' \(SubMConv3d\)"):
        find_layers(net)


def test_second_order_activation_curves_of_spconv_layers_are_refused(sp):
    # (Measured ones are made: tests/openpcdet/test_sparse_acts.py.)
    job = CurveJob(
        kind="act",
        act_mode="out",
        group_size=GROUP_SIZE,
        nr=6,
        ndz=1,
        max_steps=12,
        step_grid=4,
        progress=False,
        estimator="hessian",
        hessian=HessianSettings(),
    )
    with pytest.raises(ValueError, match="second-order activation curves of spconv layers"):
        plan_layers(make_net(sp), None, job)


# ---------------------------------------------------------------------------------------------
# (c) applying an allocation: each group exactly as quantize_weight; the model untouched


def allocation(net: nn.Module, steps: str) -> dict:
    """Per-group bits 0..5 (cycled over the model's groups), one group with a dead zone per
    layer; ``steps`` "group" (one step per group) or "channel" (per-channel MSE steps)."""
    modules = dict(net.named_modules())
    weights = {}
    k = 0
    for lay in find_layers(net):
        w = modules[lay.name].weight.detach()
        bounds = group_bounds(lay.out_channels, GROUP_SIZE)
        bits = []
        for _ in bounds:
            bits.append(k % 6)
            k += 1
        e = {
            "type": lay.type,
            "shape": list(lay.shape),
            "channels": lay.out_channels,
            "group_size": GROUP_SIZE,
            "bits": bits,
            "steps": steps,
        }
        if steps == "group":
            e["step_log2"], e["deadzone"] = [], []
            for g, (c0, c1) in enumerate(bounds):
                peak = float(w[c0:c1].abs().max())
                b = bits[g]
                e["step_log2"].append(None if b == 0 else math.log2(peak / 2 ** max(b - 1, 1)))
                e["deadzone"].append(deadzone_threshold(w[c0:c1], 0.25) if g == 0 else 0.0)
        else:
            cs = ChannelSteps.of(w, ndz=2, nr=6)
            e["step_log2"], e["deadzone"] = [], []
            for g, (c0, c1) in enumerate(bounds):
                d = 1 if g == 0 and bits[g] >= 2 else 0
                for c in range(c0, c1):
                    s = cs.step_log2[c, d, bits[g]]
                    e["step_log2"].append(None if bits[g] == 0 else float(s) + 0.25)
                    e["deadzone"].append(float(cs.deadzone[c, d]))
        weights[lay.name] = e
    return {"schema": 1, "model": "tiny-sparse", "weights": weights, "acts": {}}


@pytest.mark.parametrize("steps", ["group", "channel"])
def test_apply_quantizes_each_spconv_group_exactly_and_leaves_the_model(sp, steps):
    net = make_net(sp)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    alloc = allocation(net, steps)
    q = apply_allocation(net, alloc)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    qmods, fmods = dict(q.named_modules()), dict(net.named_modules())
    for name, e in alloc["weights"].items():
        wq, wf = qmods[name].weight, fmods[name].weight
        for g, (c0, c1) in enumerate(group_bounds(e["channels"], GROUP_SIZE)):
            b = e["bits"][g]
            if steps == "group":
                step = math.nan if e["step_log2"][g] is None else e["step_log2"][g]
                dz = e["deadzone"][g]
            else:
                step = torch.tensor(
                    [math.nan if v is None else v for v in e["step_log2"][c0:c1]],
                    dtype=torch.float64,
                )
                dz = torch.tensor(e["deadzone"][c0:c1], dtype=torch.float64)
            ref = quantize_weight(wf[c0:c1].double(), b, step, dz).float()
            assert torch.equal(wq[c0:c1], ref), (name, g)
            for row in wq[c0:c1].reshape(c1 - c0, -1):  # (n,) one channel's weights
                assert row.unique().numel() <= 2**b
    x = sparse_input(sp)
    assert not torch.equal(forward(q, x), forward(net, x))


def test_uniform_weight_baseline_covers_spconv_layers(sp):
    from rdoq.baselines import uniform_allocation

    net = make_net(sp)
    alloc = uniform_allocation(net, torch.empty(0), 4, None, [])  # weights only: no calibration
    assert {n: e["channels"] for n, e in alloc["weights"].items()} == {
        "conv_in.0": 8,
        "down.0": 16,
        "wide": 40,
        "head": 3,
    }
    q = apply_allocation(net, alloc)
    for row in q.wide.weight.reshape(40, -1):  # (n,) one channel's weights
        assert row.unique().numel() <= 16


# ---------------------------------------------------------------------------------------------
# (d) -bcw bias shift on spconv layers; the quantized model round trip


def test_bcw_shift_has_the_spconv_bias_shape_and_round_trips(sp, tmp_path):
    net = make_net(sp)
    alloc = allocation(net, "group")
    shift_in = [0.01 * (c + 1) for c in range(8)]
    shift_wide = [-0.02 * c for c in range(40)]
    alloc["corrections"] = {"bcw": {"conv_in.0": shift_in, "wide": shift_wide}}
    q = apply_allocation(net, alloc)
    assert net.wide.bias is None  # the full-precision model keeps no bias
    assert q.conv_in[0].bias.shape == (8,) and q.wide.bias.shape == (40,)
    torch.testing.assert_close(
        q.conv_in[0].bias, net.conv_in[0].bias + torch.tensor(shift_in), rtol=0, atol=1e-7
    )
    assert torch.equal(q.wide.bias, torch.tensor(shift_wide))
    # The created bias is added to every active output site, on its channel.
    y = forward(q.down, forward(q.conv_in, sparse_input(sp)))
    with_bias = forward(q.wide, y).features  # (N_active, 40)
    q.wide.bias = None
    without = forward(q.wide, y).features  # (N_active, 40)
    torch.testing.assert_close(with_bias - without, torch.tensor(shift_wide).expand_as(without))
    q.wide.bias = nn.Parameter(torch.tensor(shift_wide))
    save_quantized(tmp_path / "q.pt", q, alloc)
    loaded = sparse.eval_on_cpu(load_quantized(tmp_path / "q.pt", make_net(sp, seed=1)))
    for k, v in q.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = sparse_input(sp)
    assert torch.equal(forward(loaded, x), forward(q, x))


# ---------------------------------------------------------------------------------------------
# CPU fixes and import hygiene


def test_backward_and_biased_eval_run_on_cpu(sp):
    net = make_net(sp)
    assert not net.conv_in[1].training and net.conv_in[0].training  # BN eval, sparse conv not
    with sparse.one_thread():
        net(sparse_input(sp)).square().sum().backward()  # needs the stream fix without CUDA
    for lay in find_layers(net):
        m = dict(net.named_modules())[lay.name]
        assert m.weight.grad is not None and m.weight.grad.shape == m.weight.shape


def test_core_modules_do_not_import_spconv():
    code = (
        "import sys, rdoq.groups, rdoq.curves, rdoq.apply, rdoq.quantizers, rdoq.steps, "
        "rdoq.adapters.sparse; print(sorted(m for m in sys.modules if m.startswith('spconv')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip() == "[]"


def test_missing_spconv_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "spconv", None)
    monkeypatch.setitem(sys.modules, "spconv.pytorch", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[pcdet\]"):
        sparse.require_spconv()
