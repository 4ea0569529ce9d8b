"""BOPs charge a layer's input at the bits of the quantized output that reaches it on its grid
(issue 11, item 7b); anything else, or unknown provenance, is charged 32 bits."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from rdoq.adapters.digits import build_digits_model
from rdoq.evaluate import bit_report
from rdoq.fold import fold_batchnorm
from rdoq.groups import channel_dim, find_layers
from rdoq.parts import layer_macs
from rdoq.probe import act_shapes


class Chain(nn.Module):
    """``first`` conv, then ``mid`` (any module), then ``second`` (conv or linear)."""

    def __init__(self, mid: nn.Module, second: nn.Module | None = None) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = mid
        self.c2 = second if second is not None else nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.mid(self.c1(x)))


class InPlaceAdd(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x += 1.0
        return x


def make_alloc(
    model: nn.Module,
    x1: torch.Tensor,
    w_bits: int,
    a_bits: int,
    acts: list[str] | None = None,
    step_log2: float = -3.0,
    signed: bool = True,
    mode: str = "out",
    offset: float | None = None,
) -> dict:
    """A hand-made allocation: every weight at ``w_bits``; the ``acts`` layers' outputs (or
    inputs, ``mode="in"``) at ``a_bits`` in one group, all with one step."""
    modules = dict(model.named_modules())
    names = [layer.name for layer in find_layers(model)]
    acts = names if acts is None else acts
    shapes = act_shapes(model, x1, acts, mode)
    weights = {}
    for n in names:
        w = modules[n].weight
        weights[n] = {
            "type": type(modules[n]).__name__,
            "shape": list(w.shape),
            "channels": w.shape[0],
            "group_size": w.shape[0],
            "bits": [w_bits],
            "steps": "group",
            "step_log2": [-4.0],
            "deadzone": [0.0],
        }
    entries = {}
    for n in acts:
        shape = shapes[n]
        dim = channel_dim(modules[n])
        c = shape[dim - 1] if dim > 0 else shape[-1]
        entries[n] = {
            "type": type(modules[n]).__name__,
            "shape": list(shape),
            "channels": c,
            "group_size": c,
            "bits": [a_bits],
            "steps": "group",
            "step_log2": [step_log2],
            "signed": [signed],
        }
    alloc = {"model": "test", "act_mode": mode, "weights": weights, "acts": entries, "fp_acts": []}
    if offset is not None:
        alloc["corrections"] = {"bca": {n: [offset] * e["channels"] for n, e in entries.items()}}
    return alloc


def expected_ratio(
    model: nn.Module, x1: torch.Tensor, w_bits: int, in_bits: dict[str, float]
) -> float:
    names = [layer.name for layer in find_layers(model)]
    macs = layer_macs(model, x1, names)
    return sum(macs[n] * w_bits * in_bits[n] for n in names) / (32.0 * 32.0 * sum(macs.values()))


def charges(report: dict) -> dict[str, dict]:
    return {e["layer"]: e for e in report["bops_inputs"]}


X1 = torch.randn(1, 3, 8, 8)


def test_relu_between_convs_charges_the_first_convs_output_bits():
    torch.manual_seed(0)
    model = Chain(nn.ReLU()).eval()
    alloc = make_alloc(model, X1, 4, 3, acts=["c1"])
    r = bit_report(model, alloc, X1)
    assert r["bops_ratio"] == pytest.approx(expected_ratio(model, X1, 4, {"c1": 32, "c2": 3}))
    c = charges(r)
    assert c["c2"]["charged"] == "producer" and c["c2"]["producer"] == "c1"
    assert c["c2"]["bits"] == 3 and c["c1"]["charged"] == "fp32"
    assert (r["bops_inputs_producer"], r["bops_inputs_fp32"], r["bops_inputs_own"]) == (1, 1, 0)


def test_gelu_between_convs_charges_32_bits():
    torch.manual_seed(0)
    model = Chain(nn.GELU()).eval()
    r = bit_report(model, make_alloc(model, X1, 4, 3, acts=["c1"]), X1)
    assert r["bops_ratio"] == pytest.approx(expected_ratio(model, X1, 4, {"c1": 32, "c2": 32}))
    c = charges(r)["c2"]
    assert c["charged"] == "fp32" and c["bits"] == 32 and "Gelu" in c["why"]


@pytest.mark.parametrize(
    "mid, second, grid_kept",
    [
        # Values move, are copied or selected: still on the grid.
        (
            nn.Sequential(
                nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Dropout(0.5), nn.Identity(), nn.Flatten()
            ),
            nn.Linear(8 * 4 * 4, 5),
            True,
        ),
        (
            nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.1)),
            nn.Linear(8 * 4 * 4, 5),
            True,
        ),
        # Averaging, an in-place shift of the tensor itself, a norm: off the grid.
        (nn.Sequential(nn.AvgPool2d(2), nn.Flatten()), nn.Linear(8 * 4 * 4, 5), False),
        (InPlaceAdd(), None, False),
        (nn.BatchNorm2d(8), None, False),
    ],
)
def test_grid_keeping_ops_pass_the_producer_bits_on(mid, second, grid_kept):
    torch.manual_seed(0)
    model = Chain(mid, second).eval()
    r = bit_report(model, make_alloc(model, X1, 4, 3, acts=["c1"]), X1)
    c = charges(r)["c2"]
    assert c["charged"] == ("producer" if grid_kept else "fp32")
    assert c["bits"] == (3 if grid_kept else 32)


@pytest.mark.parametrize(
    "bits, step_log2, offset, kept",
    [
        (8, -2.0, None, True),  # 6 = 24 steps of 0.25: on the grid
        (8, math.log2(0.7), None, False),  # the clamp at 6 binds between grid points
        (2, math.log2(0.7), None, True),  # the grid tops out at 0.7: the clamp never binds
        (8, -2.0, 0.1, False),  # a -bca offset moves the grid off 0 and 6
        (8, -2.0, 0.5, True),  # an offset of whole steps keeps 0 and 6 on it
    ],
)
def test_relu6_keeps_the_grid_only_if_its_bounds_are_on_it(bits, step_log2, offset, kept):
    torch.manual_seed(0)
    model = Chain(nn.ReLU6()).eval()
    alloc = make_alloc(model, X1, 4, bits, acts=["c1"], step_log2=step_log2, offset=offset)
    c = charges(bit_report(model, alloc, X1))["c2"]
    assert (c["charged"], c["bits"]) == (("producer", bits) if kept else ("fp32", 32))


def test_unquantized_producer_and_input_mode():
    torch.manual_seed(0)
    model = Chain(nn.ReLU()).eval()
    # The producer's output is kept in full precision: nothing to pass on.
    r = bit_report(model, make_alloc(model, X1, 4, 3, acts=["c2"]), X1)
    assert charges(r)["c2"]["charged"] == "fp32"
    # Input-activation curves: each layer's own input quantizer.
    r = bit_report(model, make_alloc(model, X1, 4, 3, acts=["c2"], mode="in"), X1)
    c = charges(r)
    assert (c["c2"]["charged"], c["c2"]["bits"]) == ("own", 3)
    assert c["c1"]["charged"] == "fp32"
    assert r["bops_ratio"] == pytest.approx(expected_ratio(model, X1, 4, {"c1": 32, "c2": 3}))


def test_timm_resnet_folded_charges_only_conv_relu_conv():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False).eval()
    x1 = torch.randn(1, 3, 64, 64)
    r0 = bit_report(model, make_alloc(model, x1, 4, 4), x1)
    # Unfolded, a BatchNorm sits between every two convs.
    assert r0["bops_inputs_producer"] == 0
    fold_batchnorm(model, x1)
    r = bit_report(model, make_alloc(model, x1, 4, 4), x1)
    c = charges(r)
    # Folded: conv -> (identity) -> ReLU -> conv inside blocks and in the deep stem.
    assert c["layer1.0.conv2"]["producer"] == "layer1.0.conv1"
    assert c["conv1.3"]["producer"] == "conv1.0"
    # The first block reads the stem through ReLU and max-pooling.
    assert c["layer1.0.conv1"]["producer"] == "conv1.6"
    # Later blocks read a residual sum, shortcuts an average pool, the stem the image, the head
    # a mean.
    for name in ("layer2.0.conv1", "layer2.0.downsample.1", "conv1.0", "fc"):
        assert c[name]["charged"] == "fp32", name
    assert "AddBackward" in c["layer2.0.conv1"]["why"]
    assert r["bops_ratio"] < r0["bops_ratio"]


def test_timm_vit_charges_32_everywhere():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    x1 = torch.randn(1, 3, *model.default_cfg["input_size"][1:])
    r = bit_report(model, make_alloc(model, x1, 4, 4), x1)
    # Norms, GELU, attention and pooling lie between every two linears.
    assert r["bops_inputs_producer"] == 0 and r["bops_inputs_fp32"] == len(r["bops_inputs"])


@pytest.mark.parametrize("arch", ["digits_cnn", "digits_vit"])
def test_digits_models(arch):
    model, _ = build_digits_model(arch)
    model.eval()
    x1 = torch.randn(1, 1, 16, 16)
    if arch == "digits_cnn":
        fold_batchnorm(model, x1)
    r = bit_report(model, make_alloc(model, x1, 4, 4), x1)
    c = charges(r)
    if arch == "digits_cnn":
        assert c["features.3"]["producer"] == "features.0"
        assert c["features.6"]["producer"] == "features.3"
        assert c["head"]["charged"] == "fp32"  # after an average pool
    else:
        assert r["bops_inputs_producer"] == 0


class InPlaceOnInput(Chain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(1.0)  # autograd refuses this on a leaf that requires grad
        return super().forward(x)


def test_a_forward_autograd_refuses_charges_32_bits():
    torch.manual_seed(0)
    model = InPlaceOnInput(nn.ReLU()).eval()
    r = bit_report(model, make_alloc(model, X1, 4, 3, acts=["c1"]), X1)
    c = charges(r)["c2"]
    assert c["charged"] == "fp32" and "no autograd trace" in c["why"]
