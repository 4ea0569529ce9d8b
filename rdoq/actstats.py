"""Per-channel statistics of a layer's calibration activations (RMS, sign, range and, for
per-channel steps, a strided sample of the values), per channel group, from hooked forwards or
from stored activations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rdoq.groups import act_values_of, channel_dim
from rdoq.quantizers import quantize_uniform
from rdoq.steps import act_rows


def channel_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The values of an activation batch ``t (n, …)`` (or a sparse layer's features
    ``(N_active, C)``) with channels on axis ``dim`` as rows: ``(rows, C)``, detached, in ``t``'s
    dtype. Every per-channel statistic of activations is reduced over these rows."""
    return t.detach().movedim(dim, -1).reshape(-1, t.shape[dim])  # (rows, C)


def channel_sums(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, int]:
    """Per-channel float64 sums ``(C,)`` of :func:`channel_rows` and the number of rows."""
    flat = channel_rows(t, dim).double()  # (rows, C)
    return flat.sum(0), flat.shape[0]


@dataclass
class ActGroupStats:
    """Per-group statistics of a layer's calibration activations."""

    rms_log2: np.ndarray  # (G,)
    signed: np.ndarray  # (G,) bool: False when every calibration value is >= 0
    channels: int
    vmin: np.ndarray  # (G,) smallest calibration value
    vmax: np.ndarray  # (G,) largest calibration value
    # A sample of each channel's values (rdoq.steps.act_rows), for per-channel steps; None
    # unless asked for.
    rows: torch.Tensor | None = None  # (C, n)

    def channel_signed(self, bounds: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Each channel's grid sign, its group's: ``(C,)`` bool."""
        out = torch.zeros(self.channels, dtype=torch.bool)
        for g, (c0, c1) in enumerate(bounds):
            out[c0:c1] = bool(self.signed[g])
        return out


class _StatsAccumulator:
    """Per-channel sum of squares, min, max and count of activation tensors seen so far."""

    def __init__(self, dim: int, keep_rows: bool = False):
        self.dim = dim
        self.acc: dict[str, torch.Tensor] = {}
        self.rows: list[torch.Tensor] | None = [] if keep_rows else None

    def add(self, t: torch.Tensor) -> None:
        if self.rows is not None:
            self.rows.append(act_rows(t, self.dim))
        t = channel_rows(t, self.dim).double()  # (rows, C)
        sq, mn, mx = (t * t).sum(0), t.min(0).values, t.max(0).values
        acc = self.acc
        if acc:
            acc["sq"] += sq
            acc["min"] = torch.minimum(acc["min"], mn)
            acc["max"] = torch.maximum(acc["max"], mx)
            acc["n"] += t.shape[0]
        else:
            acc.update(sq=sq, min=mn, max=mx, n=torch.tensor(t.shape[0]))

    def stats(self, bounds: Sequence[tuple[int, int]], repeated: bool) -> ActGroupStats:
        acc = self.acc
        rms, signed, vmin, vmax = [], [], [], []
        for c0, c1 in bounds:
            n = float(acc["n"]) * (c1 - c0)
            r = math.sqrt(float(acc["sq"][c0:c1].sum()) / n)
            rms.append(math.log2(r) if r > 0 else -30.0)
            vmin.append(float(acc["min"][c0:c1].min()))
            vmax.append(float(acc["max"][c0:c1].max()))
            signed.append(vmin[-1] < 0)
        if repeated:
            # Called several times per forward: quantizing one call changes the next call's
            # values, so calibration ranges do not bound them and cannot prove two candidates
            # equal.
            vmin, vmax = [-math.inf] * len(bounds), [math.inf] * len(bounds)
        rows = torch.cat(self.rows, 1) if self.rows else None  # (C, n)
        return ActGroupStats(
            np.array(rms),
            np.array(signed),
            int(acc["sq"].shape[0]),
            np.array(vmin),
            np.array(vmax),
            rows,
        )


def act_group_stats(
    model: nn.Module,
    calib: torch.Tensor,
    layer: str,
    mode: str,
    bounds: Sequence[tuple[int, int]],
    rows: int,
    keep_rows: bool = False,
) -> ActGroupStats:
    """RMS and sign of every channel group of ``layer``'s input/output over the calibration set
    (``keep_rows``: and a sample of each channel's values, for per-channel steps)."""
    module = dict(model.named_modules())[layer]
    acc = _StatsAccumulator(channel_dim(module), keep_rows)
    calls = [0]

    def hook(t: torch.Tensor) -> None:
        calls[0] += 1
        acc.add(act_values_of(t))

    if mode == "out":
        handle = module.register_forward_hook(lambda m, a, o: hook(o))
    else:
        handle = module.register_forward_pre_hook(lambda m, a: hook(a[0]))
    passes = 0
    try:
        with torch.no_grad():
            for i in range(0, calib.shape[0], max(rows, 1)):
                model(calib[i : i + rows])
                passes += 1
    finally:
        handle.remove()
    if not acc.acc:
        raise ValueError(f"layer {layer} is never called in forward; it has no activations")
    return acc.stats(bounds, calls[0] > passes)


def act_group_stats_of(
    values: torch.Tensor, dim: int, bounds: Sequence[tuple[int, int]], keep_rows: bool = False
) -> ActGroupStats:
    """The same statistics from a layer's stored calibration activations ``(N, …)`` with the
    channel on axis ``dim`` (``rdoq.groups.channel_dim``)."""
    acc = _StatsAccumulator(dim, keep_rows)
    acc.add(values)
    return acc.stats(bounds, False)


def act_values(
    model: nn.Module, calib: torch.Tensor, layer: str, mode: str, rows: int
) -> torch.Tensor:
    """``layer``'s full-precision input (``mode="in"``) or output activations on the whole
    calibration set, ``(N, …)``, from forwards of ``rows`` samples (for ``-bca`` offsets); for
    a sparse layer the features of every frame, ``(Σ N_active, C)``."""
    module = dict(model.named_modules())[layer]
    seen: list[torch.Tensor] = []
    if mode == "out":
        handle = module.register_forward_hook(
            lambda m, a, o: seen.append(act_values_of(o).detach())
        )
    else:
        handle = module.register_forward_pre_hook(
            lambda m, a: seen.append(act_values_of(a[0]).detach())
        )
    try:
        with torch.no_grad():
            for i in range(0, calib.shape[0], max(rows, 1)):
                model(calib[i : i + rows])
    finally:
        handle.remove()
    return torch.cat(seen)


def bca_offsets(
    values: torch.Tensor, dim: int, c0: int, c1: int, step: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    """The ``-bca`` offsets ``E[a − Q(a)] (c,)`` of channels ``c0:c1`` of the calibration
    activations ``values (N, …)`` (channel axis ``dim``) under the quantizer with per-channel
    ``step (c,)`` and levels ``[lo, hi]``: what the allocation scripts' ``-bca`` adds to the
    quantized channels, float64."""
    a = values.movedim(dim, -1)[..., c0:c1].reshape(-1, c1 - c0).double()  # (rows, c)
    q = quantize_uniform(a, step.double().reshape(1, -1), lo, hi)
    return (a - q).mean(0)  # (c,)
