"""The measured engine's back-ends (``Evaluate`` for :func:`rdoq.search.run_chains`): weight
and activation candidates of one layer as slot forwards through :class:`rdoq.engine.MeasuredEngine`,
and the ``-bcw`` mean-input statistics both estimators use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from rdoq.actstats import ActGroupStats, bca_offsets
from rdoq.engine import MeasuredEngine
from rdoq.groups import (
    WeightGroups,
    act_values_of,
    channel_dim,
    group_view,
    is_sparse_tensor,
    map_act,
)
from rdoq.probe import hooked_forward
from rdoq.quantizers import act_bounds, affine_bcw, quantize_weight_steps
from rdoq.search import Candidate
from rdoq.slots import ActSlotParams, act_slots, add_slot_offsets, pad_slots, weight_slots
from rdoq.steps import ChannelSteps, candidate_params, candidate_quantizer


def quantized_group(
    weight: torch.Tensor,
    bounds: Sequence[tuple[int, int]],
    cand: Candidate,
    steps: ChannelSteps | None,
) -> torch.Tensor:
    """The weight group of ``cand`` quantized as the candidate says (per-channel steps with
    ``steps``, else the candidate's one step; the authors' dead-zone rule and ``-bcw`` affine
    map when it carries them)."""
    c0, c1 = bounds[cand.group]
    step, phi = candidate_quantizer(bounds, cand, steps)
    wq = quantize_weight_steps(weight[c0:c1], cand.bits, step, phi, cand.authors_dz)
    return affine_bcw(weight[c0:c1], wq) if cand.affine else wq


class WeightBackend:
    """Evaluates weight candidates of one layer with the measured engine."""

    def __init__(
        self,
        engine: MeasuredEngine,
        groups: WeightGroups,
        input_mean: torch.Tensor | None = None,
        max_batch: int = 1,
    ):
        self.engine, self.layer, self.max_batch = engine, groups.layer, max_batch
        self.bounds, self.steps, self.axis = groups.bounds, groups.steps, groups.axis
        self.module = engine.modules[groups.layer]
        self.full = self.module.weight.detach()
        self.weight = groups.view(self.module)  # ``self.weight[c0:c1]`` is a group
        # -bcw inside the curves: (out, in_per_out) mean input each weight multiplies.
        self.input_mean = input_mean
        self.dim = channel_dim(self.module)

    def quantized_group(self, cand: Candidate) -> torch.Tensor:
        return quantized_group(self.weight, self.bounds, cand, self.steps)

    def correction(self, cand: Candidate, wq: torch.Tensor) -> torch.Tensor | None:
        """The ``-bcw`` bias shift of the group's output channels, ``E[(W − Ŵ)x] (c,)``."""
        if self.input_mean is None:
            return None
        c0, c1 = self.bounds[cand.group]
        return bcw_shift(self.weight[c0:c1], wq, self.input_mean[c0:c1])

    def __call__(
        self, cands: Sequence[Candidate], per_fold: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        if not self.engine.slot_forward_ok(self.layer):
            out = [self._swapped([c], per_fold) for c in cands]
            return np.concatenate([d for d, _ in out]), np.concatenate([m for _, m in out])
        return self._slots(cands, per_fold)

    def folds(self, cands: Sequence[Candidate]) -> np.ndarray:
        """Each calibration fold's distortion of the candidates, ``(K, F)``."""
        return np.concatenate(
            [
                self(cands[i : i + self.max_batch], per_fold=True)[0]
                for i in range(0, len(cands), self.max_batch)
            ]
        )

    def _swapped(
        self, cands: Sequence[Candidate], per_fold: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """One candidate with the parameter swapped in place (full forwards)."""
        (cand,) = cands
        c0, c1 = self.bounds[cand.group]
        wq = self.quantized_group(cand)
        mse = np.array([float(((wq - self.weight[c0:c1]).double() ** 2).mean())])
        weight = group_view(self.module.weight.data, self.axis)
        shift = self.correction(cand, wq)
        offsets = None
        if shift is not None:
            offsets = torch.zeros(
                1, self.full.shape[0], dtype=self.full.dtype, device=self.full.device
            )  # (1, out)
            offsets[0, c0:c1] = shift

        @contextlib.contextmanager
        def swap(identity: bool) -> Iterator[None]:
            orig = weight[c0:c1].clone()
            handle = None
            if not identity:
                weight[c0:c1] = wq
                if offsets is not None:
                    handle = self.module.register_forward_hook(
                        lambda m, a, y: map_act(y, lambda t: add_slot_offsets(t, offsets, self.dim))
                    )
            try:
                yield
            finally:
                weight[c0:c1] = orig
                if handle is not None:
                    handle.remove()

        return self.engine.measure(self.layer, 1, swap, per_fold), mse

    def _slots(
        self, cands: Sequence[Candidate], per_fold: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        k = pad_slots(len(cands), self.max_batch)
        weights = self.full.unsqueeze(0).repeat(k, *([1] * self.full.dim()))  # (K, *W)
        mse = np.empty(len(cands))
        offsets = (
            torch.zeros(k, self.full.shape[0], dtype=self.full.dtype, device=self.full.device)
            if self.input_mean is not None
            else None
        )  # (K, out)
        for i, cand in enumerate(cands):
            c0, c1 = self.bounds[cand.group]
            wq = self.quantized_group(cand)
            group_view(weights[i], self.axis)[c0:c1] = wq
            mse[i] = float(((wq - self.weight[c0:c1]).double() ** 2).mean())
            if offsets is not None:
                offsets[i, c0:c1] = self.correction(cand, wq)

        def slots(identity: bool) -> contextlib.AbstractContextManager:
            if identity:
                w = self.full.unsqueeze(0).expand_as(weights).contiguous()
                return weight_slots(self.module, w, self.engine.shares_input(self.layer))
            return weight_slots(self.module, weights, self.engine.shares_input(self.layer), offsets)

        dist = self.engine.measure(self.layer, k, slots, per_fold)
        return dist[: len(cands)], mse


class ActBackend:
    """Evaluates activation candidates of one layer with the measured engine."""

    def __init__(
        self,
        engine: MeasuredEngine,
        layer: str,
        mode: str,
        bounds: Sequence[tuple[int, int]],
        stats: ActGroupStats,
        max_batch: int,
        steps: ChannelSteps | None = None,
        values: torch.Tensor | None = None,
    ):
        self.engine, self.layer, self.mode, self.bounds = engine, layer, mode, bounds
        self.stats, self.max_batch, self.steps = stats, max_batch, steps
        self.module = engine.modules[layer]
        # -bca inside the curves: the layer's calibration activations (N, …), from which each
        # candidate's per-channel offsets are computed; None: no correction.
        self.values = values

    def params(self, cands: Sequence[Candidate], k: int) -> ActSlotParams:
        dev, dt, c = self.engine.calib.device, self.engine.calib.dtype, self.stats.channels
        step = torch.ones(k, c, dtype=dt)
        qmin = torch.zeros(k, c, dtype=dt)
        qmax = torch.zeros(k, c, dtype=dt)
        mask = torch.zeros(k, c, dtype=torch.bool)
        offset = torch.zeros(k, c, dtype=dt) if self.values is not None else None
        width = max((c1 - c0 for c0, c1 in self.bounds), default=1)
        cand_steps, _ = candidate_params(cands, self.bounds, width, self.steps)  # (K, width)
        for i, cand in enumerate(cands):
            c0, c1 = self.bounds[cand.group]
            lo, hi = act_bounds(cand.bits, bool(self.stats.signed[cand.group]))
            step[i, c0:c1] = torch.from_numpy(cand_steps[i, : c1 - c0])
            qmin[i, c0:c1], qmax[i, c0:c1] = lo, hi
            mask[i, c0:c1] = True
            if offset is not None:
                offset[i, c0:c1] = bca_offsets(
                    self.values, channel_dim(self.module), c0, c1, step[i, c0:c1], lo, hi
                )
        return ActSlotParams(
            step.to(dev),
            qmin.to(dev),
            qmax.to(dev),
            mask.to(dev),
            None if offset is None else offset.to(dev),
        )

    def __call__(
        self, cands: Sequence[Candidate], per_fold: bool = False
    ) -> tuple[np.ndarray, None]:
        if not getattr(self.engine.model, "batches_samples", True) and len(cands) > 1:
            # Each layer call holds one sample (FrameRunner): one candidate per pass.
            return (np.concatenate([self([c], per_fold)[0] for c in cands]), None)
        k = pad_slots(len(cands), self.max_batch)
        params = self.params(cands, k)
        none = self.params([], k)

        def slots(identity: bool) -> contextlib.AbstractContextManager:
            return act_slots(self.module, self.mode, none if identity else params)

        dist = self.engine.measure(self.layer, k, slots, per_fold)
        return dist[: len(cands)], None

    def folds(self, cands: Sequence[Candidate]) -> np.ndarray:
        """Each calibration fold's distortion of the candidates, ``(K, F)``."""
        return np.concatenate(
            [
                self(cands[i : i + self.max_batch], per_fold=True)[0]
                for i in range(0, len(cands), self.max_batch)
            ]
        )


def bcw_shift(w: torch.Tensor, wq: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The ``-bcw`` bias shift ``E[(W − Ŵ)x] (c,)`` of ``c`` output channels, from their weights,
    quantized weights and mean inputs (:func:`weight_input_means`, ``(c, in_per_out)``)."""
    err = (w - wq).reshape(w.shape[0], -1)
    return (err * mean.to(err)).sum(1)


def input_sum(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``∂ Σ y / ∂W (out, in_per_out)`` of ``y = module(x)`` through the layer's own forward
    (the sum over samples and positions of the input each weight multiplies), and the number
    of output positions per channel it sums over (a sparse layer's: its active output sites)."""
    with torch.enable_grad():
        leaf = module.weight.detach().requires_grad_(True)
        saved = module._parameters["weight"]
        module._parameters["weight"] = leaf
        try:
            # A SparseConvTensor's features do not require grad: nothing to detach.
            out = type(module).forward(module, x if is_sparse_tensor(x) else x.detach())
        finally:
            module._parameters["weight"] = saved
        y = act_values_of(out)
        (g,) = torch.autograd.grad(y.sum(), [leaf])
    return g.reshape(g.shape[0], -1), y.numel() // y.shape[channel_dim(module)]


def weight_input_means(
    model: nn.Module, calib: torch.Tensor, layers: Sequence[str], rows: int
) -> dict[str, torch.Tensor]:
    """Per weight layer, the calibration mean of the input each weight multiplies,
    ``(out, in_per_out)``: ``E[(W − Ŵ)x]`` per output channel (the ``-bcw`` correction) is then
    ``((W − Ŵ) · mean).sum(1)``. Found through each layer's own forward (padding inside
    ``forward``, grouped convolutions) as ``∂ Σ y / ∂W`` over the outputs' positions."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(m, a, y):
            g, n = input_sum(m, a[0])
            sums[name] = sums[name] + g if name in sums else g
            counts[name] = counts.get(name, 0) + n

        return record

    for i in range(0, calib.shape[0], max(rows, 1)):
        hooked_forward(model, calib[i : i + rows], post=[(modules[n], hook(n)) for n in layers])
    missing = [n for n in layers if n not in sums]
    if missing:
        raise ValueError(
            f"layers {missing} are never called in forward; -bcw cannot be estimated for them"
        )
    return {n: sums[n] / counts[n] for n in layers}
