"""Channel sorting before grouping (the paper's ``--sort_channels``).

A weight layer's output channels are ordered by a per-channel statistic of their weights (the
paper's signed maximum, or the RMS), so that a contiguous group of ``--nchannelbatch`` channels of
that order gathers channels of similar range. The order is computed once, on the weights the curves
are measured on, and stored: in each layer file of the curve set (``channel_order (C,)``) and in
each allocation entry (``channel_order``). Group ``g`` of a sorted layer holds the channels
``order[c0:c1]``; every per-group and per-channel array of that layer (steps, dead zones, bits) is
in sorted order, and :func:`rdoq.apply.quantized_weight` maps the quantized channels back.

Weights are never permuted in a saved or evaluated model. While curves are measured,
:func:`sorted_channels` permutes the layer's weight rows (and bias) in place and puts its outputs
back in the original order with a forward hook, so the network computes the same function and every
estimator sees contiguous groups; the weights are restored when the block ends, whatever happens.
Grouped and depthwise convolutions keep their order: their output channel ``o`` reads input group
``o // (out / groups)``, so moving the channel would change what it computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from rdoq.groups import channel_dim, map_act

SORT_STATS = ("max", "rms")


def sortable(module: nn.Module) -> bool:
    """Whether the output channels of ``module`` can be reordered: not a grouped convolution."""
    return getattr(module, "groups", 1) == 1


def channel_order(weight: torch.Tensor, stat: str) -> np.ndarray:
    """Output channels ``(C,)`` in ascending order of ``stat`` over each channel's weights:
    ``"max"``, the signed maximum (the paper's), or ``"rms"``; ties keep their index order."""
    if stat not in SORT_STATS:
        raise ValueError(f"--sort_channels {stat!r} is not one of {SORT_STATS}")
    w = weight.detach().reshape(weight.shape[0], -1).double()  # (C, per-channel elements)
    key = w.amax(dim=1) if stat == "max" else w.pow(2).mean(dim=1).sqrt()  # (C,)
    return np.argsort(key.cpu().numpy(), kind="stable")


def check_order(order: object, channels: int, where: str) -> np.ndarray:
    """``order`` as an int64 array, or a ValueError naming ``where`` unless it is a permutation
    of ``range(channels)``."""
    a = np.asarray(order)
    if (
        a.ndim != 1
        or a.shape[0] != channels
        or not np.issubdtype(a.dtype, np.integer)
        or not np.array_equal(np.sort(a), np.arange(channels))
    ):
        raise ValueError(f"{where}: channel_order is not a permutation of its {channels} channels")
    return a.astype(np.int64)


@contextlib.contextmanager
def sorted_channels(module: nn.Module, order: np.ndarray) -> Iterator[None]:
    """Within the block, ``module``'s output channel ``i`` is its original channel ``order[i]``
    (weight rows and bias permuted in place), and a forward hook returns its outputs in the
    original order, so the model computes what it did. Restored on exit."""
    perm = torch.as_tensor(order, dtype=torch.long, device=module.weight.device)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm), device=perm.device)
    params = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
    originals = [p.detach().clone() for p in params]
    dim = channel_dim(module)

    def unsort(m: nn.Module, args: tuple, y: object) -> object:
        return map_act(y, lambda t: t.index_select(dim, inverse))

    with torch.no_grad():
        for p in params:
            p.copy_(p[perm])
    handle = module.register_forward_hook(unsort)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            for p, o in zip(params, originals, strict=True):
                p.copy_(o)
