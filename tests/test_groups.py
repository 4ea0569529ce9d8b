"""Channel groups of weights and activations (DESIGN §2, §3): bounds, get/set round trips,
layer discovery and activation shapes."""

import pytest
import timm
import torch
from torch import nn

from rdoq.groups import (
    act_group_numel,
    find_layers,
    get_group,
    group_bounds,
    set_group,
    weight_numel,
)
from rdoq.probe import act_shapes

# ---------------------------------------------------------------------------------------------
# group bounds


def test_group_bounds_partial_last_group():
    b = group_bounds(1000, 128)
    assert len(b) == 8
    assert b[0] == (0, 128)
    assert b[-2] == (768, 896)
    assert b[-1] == (896, 1000)


@pytest.mark.parametrize("n,size", [(1, 1), (7, 3), (64, 64), (65, 64), (10, 100), (96, 32)])
def test_group_bounds_cover_channels_once(n, size):
    b = group_bounds(n, size)
    assert b[0][0] == 0 and b[-1][1] == n
    for prev, nxt in zip(b, b[1:], strict=False):
        assert prev[1] == nxt[0]
    assert all(c1 - c0 == size for c0, c1 in b[:-1])
    assert 0 < b[-1][1] - b[-1][0] <= size
    assert len(b) == -(-n // size)


@pytest.mark.parametrize("size", [0, -3])
def test_group_bounds_rejects_bad_group_size(size):
    with pytest.raises(ValueError, match=str(size)):
        group_bounds(100, size)


def test_group_bounds_rejects_no_channels():
    with pytest.raises(ValueError):
        group_bounds(0, 8)


# ---------------------------------------------------------------------------------------------
# get/set round trips


def _layers():
    torch.manual_seed(0)
    return {
        "linear": nn.Linear(24, 70),
        "conv": nn.Conv2d(5, 70, 3),
        "depthwise": nn.Conv2d(70, 70, 3, groups=70),
        "grouped": nn.Conv2d(12, 70, 3, groups=2),
    }


@pytest.mark.parametrize("kind", ["linear", "conv", "depthwise", "grouped"])
@pytest.mark.parametrize("size", [16, 32, 70])
def test_get_set_group_round_trip(kind, size):
    layer = _layers()[kind]
    w = layer.weight
    original = w.detach().clone()
    bounds = group_bounds(w.shape[0], size)
    assert bounds[-1][1] == 70
    for c0, c1 in bounds:
        g = get_group(w, (c0, c1))
        assert g.shape == (c1 - c0, *w.shape[1:])
        assert torch.equal(g, original[c0:c1])

        new = torch.randn_like(g) + 10.0
        set_group(w, (c0, c1), new)
        after = w.detach()
        assert torch.equal(after[c0:c1], new)
        # only the group's channels changed
        assert torch.equal(after[:c0], original[:c0])
        assert torch.equal(after[c1:], original[c1:])
        assert torch.equal(get_group(w, (c0, c1)), new)

        set_group(w, (c0, c1), original[c0:c1].clone())
        assert torch.equal(w.detach(), original)


def test_get_group_partial_last_group_of_linear():
    layer = nn.Linear(8, 1000)
    bounds = group_bounds(1000, 128)[-1]
    assert get_group(layer.weight, bounds).shape == (104, 8)


def test_set_group_keeps_autograd_usable():
    layer = nn.Linear(4, 6)
    set_group(layer.weight, (0, 3), torch.zeros(3, 4))
    assert layer.weight.requires_grad
    layer(torch.ones(1, 4)).sum().backward()
    assert layer.weight.grad is not None


@pytest.mark.parametrize("kind", ["linear", "conv", "depthwise", "grouped"])
def test_set_group_shape_mismatch(kind):
    w = _layers()[kind].weight
    original = w.detach().clone()
    bad = torch.zeros(16 + 1, *w.shape[1:])
    with pytest.raises(ValueError):
        set_group(w, (0, 16), bad)
    with pytest.raises(ValueError):
        set_group(w, (64, 70), torch.zeros(8, *w.shape[1:]))  # partial last group has 6
    with pytest.raises(ValueError):
        set_group(w, (0, 16), torch.zeros(16, *w.shape[1:-1], w.shape[-1] + 1))
    assert torch.equal(w.detach(), original)


# ---------------------------------------------------------------------------------------------
# find_layers


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.BatchNorm2d(8),
            nn.Conv2d(8, 8, 3, padding=1, groups=8),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.features(x))


def test_find_layers_small_model():
    layers = find_layers(_Small())
    assert [x.name for x in layers] == ["features.0", "features.3", "head.0", "head.3"]
    assert [x.type for x in layers] == ["Conv2d", "Conv2d", "Linear", "Linear"]
    assert [x.shape for x in layers] == [(8, 3, 3, 3), (8, 1, 3, 3), (16, 8), (10, 16)]
    assert [x.out_channels for x in layers] == [8, 8, 16, 10]


def test_find_layers_plain_sequential():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    layers = find_layers(model)
    assert [(x.name, x.type, x.shape) for x in layers] == [
        ("0", "Linear", (4, 3)),
        ("2", "Linear", (2, 4)),
    ]


def test_find_layers_timm_test_resnet():
    model = timm.create_model("test_resnet", pretrained=False)
    layers = find_layers(model)
    modules = dict(model.named_modules())
    order = list(modules)
    names = [x.name for x in layers]
    # every 4-D conv weight and 2-D linear weight of the model is found, nothing else
    expected = [
        n
        for n, m in model.named_modules()
        if getattr(m, "weight", None) is not None
        and isinstance(m.weight, torch.Tensor)
        and m.weight.dim() in (2, 4)
        and not isinstance(m, nn.Embedding)
    ]
    assert names == expected
    assert len(names) == len(set(names))
    assert [order.index(n) for n in names] == sorted(order.index(n) for n in names)
    for x in layers:
        m = modules[x.name]
        assert isinstance(m, nn.Conv2d | nn.Linear)
        assert x.type == type(m).__name__
        assert x.shape == tuple(m.weight.shape)
    assert names[0] == "conv1.0"
    assert layers[-1].name == "fc" and layers[-1].type == "Linear"
    assert sum(x.type == "Conv2d" for x in layers) == len(layers) - 1


def test_find_layers_without_layers_raises():
    with pytest.raises(ValueError, match="Sequential"):
        find_layers(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)))


# ---------------------------------------------------------------------------------------------
# activations


class _ConvLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, 7)

    def forward(self, x):
        y = self.conv(x)  # (B, 10, 4, 4)
        y = y.flatten(2)[..., :12]  # (B, T=10, C=12): a token sequence for the linear
        return self.fc(y)  # (B, 10, 7)


def test_act_shapes_in_and_out():
    model = _ConvLinear()
    x = torch.randn(5, 3, 8, 8)
    shapes_out = act_shapes(model, x, ["conv", "fc"], "out")
    assert shapes_out == {"conv": (10, 4, 4), "fc": (10, 7)}
    shapes_in = act_shapes(model, x, ["conv", "fc"], "in")
    assert shapes_in == {"conv": (3, 8, 8), "fc": (10, 12)}
    # hooks are removed afterwards
    assert not model.conv._forward_hooks and not model.fc._forward_hooks


def test_act_shapes_bad_mode_and_unused_layer():
    model = _ConvLinear()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="act_mode"):
        act_shapes(model, x, ["conv"], "both")
    model.unused = nn.Linear(2, 2)
    # A layer whose forward never runs (its weight may be read by a parent) has no activations.
    assert set(act_shapes(model, x, ["conv", "unused"], "out")) == {"conv"}
    assert not model.conv._forward_hooks


def test_act_group_numel_conv_channel_dim_1():
    conv = nn.Conv2d(3, 10, 3)
    # sample (C=10, H=4, W=5): a group of 4 channels holds 4 * 20 elements per sample
    assert act_group_numel((10, 4, 5), conv, (0, 4)) == 80
    assert act_group_numel((10, 4, 5), conv, (8, 10)) == 40
    # input side of the conv: C=3
    assert act_group_numel((3, 6, 6), conv, (0, 2)) == 72


def test_act_group_numel_linear_last_dim():
    fc = nn.Linear(12, 7)
    # (T=10, C=7) output: channels are the last dim
    assert act_group_numel((10, 7), fc, (0, 4)) == 40
    assert act_group_numel((10, 7), fc, (4, 7)) == 30
    # (T=10, C=12) input
    assert act_group_numel((10, 12), fc, (0, 5)) == 50
    # plain (C,) vector
    assert act_group_numel((7,), fc, (2, 7)) == 5


def test_act_group_numel_sums_to_sample_numel():
    model = _ConvLinear()
    x = torch.randn(2, 3, 8, 8)
    modules = dict(model.named_modules())
    for mode in ("in", "out"):
        shapes = act_shapes(model, x, ["conv", "fc"], mode)
        for name, shape in shapes.items():
            m = modules[name]
            channels = shape[0] if isinstance(m, nn.Conv2d) else shape[-1]
            total = sum(act_group_numel(shape, m, b) for b in group_bounds(channels, 3))
            assert total == torch.Size(shape).numel()


def test_weight_numel():
    assert weight_numel((70, 24), (0, 16)) == 16 * 24
    assert weight_numel((70, 5, 3, 3), (64, 70)) == 6 * 45
    assert weight_numel((70, 1, 3, 3), (0, 32)) == 32 * 9
    for kind, layer in _layers().items():
        w = layer.weight
        total = sum(weight_numel(tuple(w.shape), b) for b in group_bounds(w.shape[0], 16))
        assert total == w.numel(), kind
        b = (16, 32)
        assert weight_numel(tuple(w.shape), b) == get_group(w, b).numel()
