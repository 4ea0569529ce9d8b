"""The naive evaluator: the authors' algorithm, one full forward of the calibration set per
candidate. The benchmark's baseline and the tests' ground truth for
:class:`rdoq.engine.MeasuredEngine`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from rdoq.actstats import act_values, bca_offsets
from rdoq.backends import bcw_shift, quantized_group
from rdoq.groups import WeightGroups, channel_dim
from rdoq.quantizers import act_bounds, quantize_uniform
from rdoq.search import Candidate
from rdoq.slots import add_slot_offsets
from rdoq.steps import ChannelSteps, candidate_quantizer


class NaiveEvaluator:
    """The authors' algorithm: one full forward of the calibration set per candidate.

    Used by the benchmark and the tests as the ground truth for :class:`MeasuredEngine`.
    """

    def __init__(self, model: nn.Module, calib: torch.Tensor, batch_size: int):
        self.model = model.eval()
        self.calib, self.batch_size = calib, max(int(batch_size), 1)
        self.modules = dict(model.named_modules())
        with torch.no_grad():
            self.reference = self.forward()

    def forward(self) -> torch.Tensor:
        outs = [
            self.model(self.calib[i : i + self.batch_size])
            for i in range(0, self.calib.shape[0], self.batch_size)
        ]
        return torch.cat([o.reshape(o.shape[0], -1) for o in outs])  # (N, O)

    def dist(self) -> float:
        with torch.no_grad():
            d = (self.forward() - self.reference).double()
        return float((d * d).mean())

    def weights(self, groups: WeightGroups, input_mean: torch.Tensor | None = None) -> Callable:
        """An ``Evaluate`` for weight candidates of the layer of ``groups`` (``input_mean``: with
        the ``-bcw`` correction, as a bias shift after the layer)."""
        module = self.modules[groups.layer]
        bounds, steps = groups.bounds, groups.steps
        weight = groups.view(module)
        dim = channel_dim(module)

        def evaluate(cands: Sequence[Candidate]) -> tuple[np.ndarray, np.ndarray]:
            dist, mse = np.empty(len(cands)), np.empty(len(cands))
            for i, cand in enumerate(cands):
                c0, c1 = bounds[cand.group]
                orig = weight[c0:c1].clone()
                wq = quantized_group(weight, bounds, cand, steps)
                mse[i] = float(((wq - orig).double() ** 2).mean())
                handle = None
                if input_mean is not None:
                    shift = torch.zeros(1, module.weight.shape[0], dtype=weight.dtype)
                    shift[0, c0:c1] = bcw_shift(orig, wq, input_mean[c0:c1])
                    handle = module.register_forward_hook(
                        lambda m, a, y, s=shift: add_slot_offsets(y, s, dim)
                    )
                with torch.no_grad():
                    weight[c0:c1] = wq
                    try:
                        dist[i] = self.dist()
                    finally:
                        weight[c0:c1] = orig
                        if handle is not None:
                            handle.remove()
            return dist, mse

        return evaluate

    def acts(
        self,
        layer: str,
        mode: str,
        bounds: Sequence[tuple[int, int]],
        signed: np.ndarray,
        steps: ChannelSteps | None = None,
        bias_corr: bool = False,
    ) -> Callable:
        """An ``Evaluate`` for activation candidates of ``layer`` (``steps``: per-channel
        mode; ``bias_corr``: with the ``-bca`` offsets of each candidate added)."""
        module = self.modules[layer]
        dim = channel_dim(module)
        values = (
            act_values(self.model, self.calib, layer, mode, self.batch_size) if bias_corr else None
        )

        def quantize(t: torch.Tensor, cand: Candidate) -> torch.Tensor:
            c0, c1 = bounds[cand.group]
            lo, hi = act_bounds(cand.bits, bool(signed[cand.group]))
            step, _ = candidate_quantizer(bounds, cand, steps)
            t = t.clone()
            idx = [slice(None)] * t.dim()
            idx[dim] = slice(c0, c1)
            if isinstance(step, torch.Tensor):  # per channel: on the channel axis
                shape = [1] * t.dim()
                shape[dim] = -1
                step = step.to(t).reshape(shape)
            elif cand.bits == 0:
                step = 1.0
            q = quantize_uniform(t[tuple(idx)], step, lo, hi)
            if values is not None:
                per = step if isinstance(step, torch.Tensor) else torch.full((c1 - c0,), step)
                off = bca_offsets(values, dim, c0, c1, per.reshape(-1), lo, hi)
                shape = [1] * t.dim()
                shape[dim] = -1
                q = q + off.to(t).reshape(shape)
            t[tuple(idx)] = q
            return t

        def evaluate(cands: Sequence[Candidate]) -> tuple[np.ndarray, None]:
            dist = np.empty(len(cands))
            for i, cand in enumerate(cands):
                if mode == "out":
                    h = module.register_forward_hook(lambda m, a, o, c=cand: quantize(o, c))
                else:
                    h = module.register_forward_pre_hook(
                        lambda m, a, c=cand: (quantize(a[0], c), *a[1:])
                    )
                try:
                    dist[i] = self.dist()
                finally:
                    h.remove()
            return dist, None

        return evaluate
