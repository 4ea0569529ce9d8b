"""Channel groups of weight and activation tensors (DESIGN §2, §3).

A group is a contiguous block of ``group_size`` output channels (dim 0 of every supported weight
layout: Linear ``(out, in)``, Conv2d ``(out, in/groups, kh, kw)`` incl. depthwise, spconv
``(out, kD, kH, kW, in)``); the last group may be smaller. Activation groups are blocks of channels
of a layer's output (``act_mode="out"``) or input (``act_mode="in"``): dim 1 for convolutions, the
last dim for linears (and for spconv layers, whose activations are features ``(N_active, C)``).

spconv layers are recognised by their classes in ``sys.modules``, never by importing spconv: a
model that holds them has imported spconv already, and a process without spconv (an optional
dependency) never loads it through rdoq. Importing it, and its CPU fixes, live in
:mod:`rdoq.adapters.sparse`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from rdoq.steps import ChannelSteps

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
# The spconv classes quantized like convs (their subclasses too); transposed and inverse sparse
# convs are not.
SPARSE_CONV_TYPES = ("SubMConv3d", "SparseConv3d", "SubMConv2d", "SparseConv2d")


def group_bounds(n_channels: int, group_size: int) -> list[tuple[int, int]]:
    """``[(c0, c1), ...]`` channel ranges of the groups; the last one may be partial."""
    if group_size <= 0:
        raise ValueError(f"group_size must be > 0, got {group_size} (use e.g. --nchannelbatch 64)")
    if n_channels <= 0:
        raise ValueError(f"n_channels must be > 0, got {n_channels}")
    return [(c0, min(c0 + group_size, n_channels)) for c0 in range(0, n_channels, group_size)]


def entry_channel_steps(entry: dict) -> list[float]:
    """An allocation entry's ``step_log2`` per channel (NaN where it has none): as stored with
    ``steps: "channel"``, else each group's step repeated over its channels."""
    channels = int(entry["channels"])
    values = entry["step_log2"]
    if entry.get("steps", "group") != "channel":
        values = [
            v
            for (c0, c1), v in zip(
                group_bounds(channels, int(entry["group_size"])), values, strict=True
            )
            for _ in range(c1 - c0)
        ]
    return [float("nan") if v is None else float(v) for v in values]


def get_group(weight: torch.Tensor, bounds: tuple[int, int]) -> torch.Tensor:
    """A view of the output channels ``bounds`` of ``weight``."""
    c0, c1 = bounds
    return weight[c0:c1]


def set_group(weight: torch.Tensor, bounds: tuple[int, int], values: torch.Tensor) -> None:
    """Overwrite the output channels ``bounds`` of ``weight`` in place."""
    c0, c1 = bounds
    if values.shape != weight[c0:c1].shape:
        raise ValueError(
            f"group {bounds} has shape {tuple(weight[c0:c1].shape)}, "
            f"got values of shape {tuple(values.shape)}"
        )
    with torch.no_grad():
        weight[c0:c1].copy_(values)


def channel_dim(module: nn.Module) -> int:
    """Channel axis of ``module``'s input and output activations: 1 for convs, -1 otherwise
    (linears; spconv layers, whose features are ``(N_active, C)``)."""
    return 1 if isinstance(module, nn.Conv2d) else -1


def is_sparse_tensor(t: object) -> bool:
    """Whether ``t`` is a spconv ``SparseConvTensor`` (features ``(N_active, C)`` and their
    coordinates), recognised by its interface, never by importing spconv."""
    return (
        not isinstance(t, torch.Tensor) and hasattr(t, "features") and hasattr(t, "replace_feature")
    )


def act_values_of(t: torch.Tensor | object) -> torch.Tensor:
    """The values of an activation a hook sees: the tensor itself, or a ``SparseConvTensor``'s
    features ``(N_active, C)`` (channels last, :func:`channel_dim`)."""
    return t.features if is_sparse_tensor(t) else t


def map_act(t: torch.Tensor | object, fn: Callable[[torch.Tensor], torch.Tensor]) -> object:
    """``t`` with its values (:func:`act_values_of`) replaced by ``fn(values)``: a tensor, or a
    ``SparseConvTensor`` with the same coordinates and new features (what a hook that quantizes
    an activation returns)."""
    return t.replace_feature(fn(t.features)) if is_sparse_tensor(t) else fn(t)


def is_sparse_conv(module: nn.Module) -> bool:
    """Whether ``module`` is one of spconv's :data:`SPARSE_CONV_TYPES` (never imports spconv)."""
    conv = sys.modules.get("spconv.pytorch.conv")
    if conv is None:
        return False
    return isinstance(module, tuple(getattr(conv, n) for n in SPARSE_CONV_TYPES))


def is_weight_layer(module: nn.Module) -> bool:
    """Whether ``module``'s weight is quantized: ``nn.Linear`` / ``nn.Conv2d`` (and subclasses) or
    a spconv layer (:func:`is_sparse_conv`)."""
    return isinstance(module, QUANTIZABLE_TYPES) or is_sparse_conv(module)


def check_sparse_layout(name: str, module: nn.Module) -> None:
    """Refuse a spconv layer whose weight is not ``(Cout, *kernel, Cin)`` (spconv 2.x's "KRSC"),
    naming the layer: groups are taken on axis 0, which must hold the output channels."""
    expected = (module.out_channels, *module.kernel_size, module.in_channels)
    shape = tuple(module.weight.shape)
    # spconv picks the layout when it builds a layer: "KRSC" unless a build without
    # ALL_WEIGHT_IS_KRSC runs its native algorithm ("RSKC"/"RSCK"). The shape alone cannot tell
    # them apart when the channel counts equal the kernel size, hence spconv's own rule too.
    constants = sys.modules.get("spconv.constants")
    krsc = (
        getattr(constants, "ALL_WEIGHT_IS_KRSC", True)
        or getattr(module.algo, "name", None) != "Native"
    )
    groups = getattr(module, "groups", 1)
    if shape != expected or not krsc or groups != 1:
        raise ValueError(
            f"sparse conv layer {name!r} ({type(module).__name__}) has weight shape {shape}, "
            f"groups={groups}; rdoq quantizes spconv weights in the layout (Cout, *kernel, "
            f"Cin) = {expected} with groups=1 only (spconv 2.x's layout, as "
            f"`pip install -e .[pcdet]` installs it)"
        )


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer: its dotted name and the facts the curve store records."""

    name: str
    type: str
    shape: tuple[int, ...]

    @property
    def out_channels(self) -> int:
        return self.shape[0]


def find_layers(model: nn.Module) -> list[LayerInfo]:
    """Every weight layer (:func:`is_weight_layer`) of ``model`` in ``named_modules`` order;
    a spconv layer whose weight is not ``(Cout, *kernel, Cin)`` is refused."""
    layers = []
    for name, m in model.named_modules():
        if not is_weight_layer(m):
            continue
        if is_sparse_conv(m):
            check_sparse_layout(name, m)
        layers.append(LayerInfo(name, type(m).__name__, tuple(m.weight.shape)))
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear/nn.Conv2d or spconv layer to quantize"
        )
    return layers


def weight_numel(shape: tuple[int, ...], bounds: tuple[int, int], axis: str = "out") -> int:
    """Number of weights in the group ``bounds`` of a weight of ``shape`` whose groups are cut
    along ``axis`` (:data:`GROUP_AXES`)."""
    dim = group_dim(axis)
    per_channel = 1
    for i, s in enumerate(shape):
        per_channel *= s if i != dim else 1
    return (bounds[1] - bounds[0]) * per_channel


# The weight channels that groups gather: "out" (output channels, axis 0; the default) or "in"
# (input channels, axis 1 of Linear / Conv2d weights: the paper's get_ele_per_input_channel).
GROUP_AXES = ("out", "in")


def group_dim(axis: str) -> int:
    """The weight axis of :data:`GROUP_AXES` ``axis``: 0 or 1."""
    if axis not in GROUP_AXES:
        raise ValueError(f"group axis must be one of {GROUP_AXES}, got {axis!r}")
    return GROUP_AXES.index(axis)


def group_view(weight: torch.Tensor, axis: str) -> torch.Tensor:
    """``weight`` with the channels that groups gather first, as a view (writes reach
    ``weight``): itself for output-channel groups, ``(in, out, *kernel)`` for input-channel
    groups. Every group rule (quantizers, per-channel steps, dead zones) reads its axis 0."""
    dim = group_dim(axis)
    return weight if dim == 0 else weight.movedim(dim, 0)


@dataclass(frozen=True)
class WeightGroups:
    """One layer's weight groups as each weight evaluator takes them (the measured engine's,
    the second-order one's and the naive reference): the layer, the groups' channel ranges
    along ``axis`` (:data:`GROUP_AXES`), and the per-channel steps (None: one step per
    candidate)."""

    layer: str
    bounds: Sequence[tuple[int, int]]
    steps: ChannelSteps | None = None
    axis: str = "out"

    def view(self, module: nn.Module) -> torch.Tensor:
        """``module``'s weight, detached, with the groups' channels first
        (:func:`group_view`): ``view[c0:c1]`` is a group."""
        return group_view(module.weight.detach(), self.axis)


def act_group_numel(sample_shape: tuple, module: nn.Module, bounds: tuple[int, int]) -> int:
    """Elements per sample of the activation group ``bounds`` (channels × positions)."""
    dim = channel_dim(module)
    channels = sample_shape[dim - 1] if dim > 0 else sample_shape[-1]
    total = 1
    for s in sample_shape:
        total *= s
    return (bounds[1] - bounds[0]) * (total // channels)
