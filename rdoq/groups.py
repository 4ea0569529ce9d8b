"""Channel groups of weight and activation tensors (DESIGN §2, §3).

A group is a contiguous block of ``group_size`` output channels (dim 0 of every supported weight
layout: Linear ``(out, in)``, Conv2d ``(out, in/groups, kh, kw)`` incl. depthwise, spconv
``(out, kD, kH, kW, in)``); the last group may be smaller. Activation groups are blocks of channels
of a layer's output (``act_mode="out"``) or input (``act_mode="in"``): dim 1 for convolutions, the
last dim for linears.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


def group_bounds(n_channels: int, group_size: int) -> list[tuple[int, int]]:
    """``[(c0, c1), ...]`` channel ranges of the groups; the last one may be partial."""
    if group_size <= 0:
        raise ValueError(f"group_size must be > 0, got {group_size} (use e.g. --nchannelbatch 64)")
    if n_channels <= 0:
        raise ValueError(f"n_channels must be > 0, got {n_channels}")
    return [(c0, min(c0 + group_size, n_channels)) for c0 in range(0, n_channels, group_size)]


def get_group(weight: torch.Tensor, bounds: tuple[int, int]) -> torch.Tensor:
    """A view of the output channels ``bounds`` of ``weight``."""
    c0, c1 = bounds
    return weight[c0:c1]


def set_group(weight: torch.Tensor, bounds: tuple[int, int], values: torch.Tensor) -> None:
    """Overwrite the output channels ``bounds`` of ``weight`` in place."""
    c0, c1 = bounds
    if values.shape != weight[c0:c1].shape:
        raise ValueError(f"group {bounds} has shape {tuple(weight[c0:c1].shape)}, "
                         f"got values of shape {tuple(values.shape)}")
    with torch.no_grad():
        weight[c0:c1].copy_(values)


def channel_dim(module: nn.Module) -> int:
    """Channel axis of ``module``'s input and output activations: 1 for convs, -1 otherwise."""
    return 1 if isinstance(module, nn.Conv2d) else -1


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
    """Every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` in ``named_modules`` order."""
    layers = [
        LayerInfo(name, type(m).__name__, tuple(m.weight.shape))
        for name, m in model.named_modules()
        if isinstance(m, QUANTIZABLE_TYPES)
    ]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear/nn.Conv2d layer to quantize")
    return layers


def weight_numel(shape: tuple[int, ...], bounds: tuple[int, int]) -> int:
    """Number of weights in the group ``bounds`` of a weight of ``shape``."""
    per_channel = 1
    for s in shape[1:]:
        per_channel *= s
    return (bounds[1] - bounds[0]) * per_channel


def hooked_forward(model: nn.Module, x: torch.Tensor,
                   post: Iterable[tuple[nn.Module, Callable]] = (),
                   pre: Iterable[tuple[nn.Module, Callable]] = (),
                   grad: bool = False) -> None:
    """One forward of ``x`` with forward (``post``) and pre-forward (``pre``) hooks installed;
    the hooks are removed whatever happens. No-grad unless ``grad`` (hooks that inspect the
    autograd graph, as BatchNorm folding does, need it)."""
    handles = [m.register_forward_pre_hook(fn) for m, fn in pre]
    handles += [m.register_forward_hook(fn) for m, fn in post]
    try:
        with torch.set_grad_enabled(grad):
            model(x)
    finally:
        for h in handles:
            h.remove()


def act_shapes(model: nn.Module, x: torch.Tensor, names: list[str], mode: str) -> dict[str, tuple]:
    """Per-sample shapes of the input (``mode="in"``) or output (``"out"``) of the named layers
    that are called in a forward (one hooked forward on ``x[:1]``); layers whose ``forward`` is
    never called (their weight is read by a parent, as in BEiT's ``qkv``) are absent.
    """
    if mode not in ("in", "out"):
        raise ValueError(f"act_mode must be 'in' or 'out', got {mode!r}")
    modules = dict(model.named_modules())
    shapes: dict[str, tuple] = {}

    def hook(name: str) -> Callable:
        def record(mod, inp, out):
            shapes[name] = tuple((inp[0] if mode == "in" else out).shape[1:])
        return record

    hooked_forward(model, x[:1], post=[(modules[n], hook(n)) for n in names])
    return shapes


def act_group_numel(sample_shape: tuple, module: nn.Module, bounds: tuple[int, int]) -> int:
    """Elements per sample of the activation group ``bounds`` (channels × positions)."""
    dim = channel_dim(module)
    channels = sample_shape[dim - 1] if dim > 0 else sample_shape[-1]
    total = 1
    for s in sample_shape:
        total *= s
    return (bounds[1] - bounds[0]) * (total // channels)
