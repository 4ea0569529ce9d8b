"""The second-order estimator's back-ends (``Evaluate`` for :func:`rdoq.search.run_chains`):
weight and activation candidates of one layer as batched quadratic-model evaluations on the rows
of a :class:`rdoq.hessian.GradientSweep`, all groups of a batch in one product (the candidate
layout: :class:`rdoq.slots.SlotGrid`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rdoq.actstats import ActGroupStats
from rdoq.groups import WeightGroups, channel_dim
from rdoq.hessian import GradientSweep
from rdoq.quantizers import (
    act_bounds,
    affine_bcw_last,
    deadzone_magnitudes,
    quantize_deadzone_fast,
    quantize_uniform_fast,
    signed_bounds,
)
from rdoq.search import Candidate
from rdoq.slots import SlotGrid
from rdoq.steps import ChannelSteps, candidate_params


def quantize_weights_batched(
    w: torch.Tensor,
    cands: Sequence[Candidate],
    slots: SlotGrid,
    rows: slice,
    bounds: Sequence[tuple[int, int]],
    steps: ChannelSteps | None = None,
) -> torch.Tensor:
    """Quantized weights ``(g, width, n)`` of the grid rows ``rows`` of ``slots``, from the
    stacked group weights ``w (g, 1, n)`` (``n = channels × elements per channel``, zero-padded
    channels in a final partial group): entry ``[r, k]`` holds ``quantize_weight`` of that group
    for its k-th candidate (zeros in the padding), with per-channel steps (``steps``) or the
    candidate's one step. Candidates are an outer axis so that every elementwise pass runs along
    the group's elements. With a grid split by ``deadzone > 0`` each rule runs on its own columns
    only; otherwise both run on all and are selected per candidate. The candidates' authors'
    rules (``authors_dz``, ``affine``: one setting for a whole run) are applied as they say."""
    authors = {(c.authors_dz, c.affine) for c in cands}
    if len(authors) > 1:
        raise ValueError(f"candidates of one batch mix the authors' rules {sorted(authors)}")
    authors_dz, affine = authors.pop() if authors else (False, False)
    cg = max(c1 - c0 for c0, c1 in bounds)
    g, _, n = w.shape
    wc = w.view(g, 1, cg, n // cg)  # (g, 1, cg, e)
    step_k, phi_k = candidate_params(cands, bounds, cg, steps)  # (K, cg) each
    levels = [signed_bounds(c.bits) for c in cands]

    def per_channel(values: np.ndarray, fill: float, cols: slice) -> torch.Tensor:
        a = np.full((len(slots.groups), slots.width, cg), fill)
        a[slots.rows, slots.cols] = values
        t = torch.from_numpy(a[rows, cols])
        return t.to(dtype=w.dtype, device=w.device).unsqueeze(-1)  # (g, width, cg, 1)

    def per_cand(values: list[float], fill: float, cols: slice) -> torch.Tensor:
        return slots.grid(values, fill, w, rows)[:, cols, None, None]  # (g, width, 1, 1)

    def uniform(cols: slice) -> torch.Tensor:
        return quantize_uniform_fast(
            wc,
            per_channel(step_k, 1.0, cols),
            per_cand([b[0] for b in levels], 0.0, cols),
            per_cand([b[1] for b in levels], 0.0, cols),
        )

    def deadzone(cols: slice) -> torch.Tensor:
        return quantize_deadzone_fast(
            wc,
            per_channel(step_k, 1.0, cols),
            per_channel(phi_k, 0.0, cols),
            per_cand([deadzone_magnitudes(c.bits, authors_dz) for c in cands], 0.0, cols),
            authors_dz,
        )

    def flat(q: torch.Tensor) -> torch.Tensor:
        # Each channel's row (…, cg, e) is the authors' -bcw unit.
        return (affine_bcw_last(wc, q) if affine else q).reshape(q.shape[0], q.shape[1], n)

    if not any(c.deadzone > 0 for c in cands):
        return flat(uniform(slice(None)))
    if slots.split:  # dead-zone candidates in columns [split_col, width)
        k = slots.split_col
        return flat(torch.cat([uniform(slice(None, k)), deadzone(slice(k, None))], dim=1))
    dz = per_cand([c.deadzone for c in cands], 0.0, slice(None))
    return flat(torch.where(dz > 0, deadzone(slice(None)), uniform(slice(None))))


def _stack_groups(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-group tensors ``(…, n_g)`` into ``(G, …, n_max)``, zero-padding the last
    axis (a zero weight or activation quantizes to zero: the padding never perturbs)."""
    n_max = max(t.shape[-1] for t in parts)
    if all(t.shape[-1] == n_max for t in parts):
        return torch.stack(list(parts))  # nothing to pad: no zero fill
    out = parts[0].new_empty(len(parts), *parts[0].shape[:-1], n_max)
    for g, t in enumerate(parts):
        out[g, ..., : t.shape[-1]] = t
        out[g, ..., t.shape[-1] :] = 0.0
    return out


class HessianWeightBackend:
    """Evaluates weight candidates of one layer with the quadratic model (``Evaluate``), all
    groups of a batch in one product."""

    def __init__(self, sweep: GradientSweep, groups: WeightGroups):
        layer, bounds, group_axis = groups.layer, groups.bounds, groups.axis
        sweep.ensure(layer)
        self.sweep, self.bounds, self.steps = sweep, bounds, groups.steps
        shape = sweep.modules[layer].weight.shape
        weight = groups.view(sweep.modules[layer])  # the groups' channels first
        rows = sweep.rows[layer]  # (R, out, in/out)
        r = rows.shape[0]
        self.numel = [(c1 - c0) * weight[0].numel() for c0, c1 in bounds]
        # Per group, contiguous and zero-padded: its chains come back to it in every round.
        self.w = _stack_groups(
            [weight[c0:c1].reshape(1, -1).to(rows.dtype) for c0, c1 in bounds]
        )  # (G, 1, n)
        if group_axis == "in":
            # A row's entries in the order of the group's weights (c, out, kernel).
            per = rows.view(r, shape[0], shape[1], -1)  # (R, out, in, k)
            self.rows = _stack_groups(
                [per[:, :, c0:c1].transpose(1, 2).reshape(r, -1) for c0, c1 in bounds]
            )  # (G, R, n)
        elif sweep.bias_corr:
            # -bcw shifts each output channel's bias by -(ΔW·mean input), so a weight's row
            # becomes G_w − G_b·mean: the output change of the corrected layer.
            gb, mean = sweep.bias_rows[layer], sweep.input_means[layer].to(rows.dtype)
            self.rows = _stack_groups(
                [
                    (rows[:, c0:c1] - gb[:, c0:c1, None] * mean[c0:c1]).reshape(r, -1)
                    for c0, c1 in bounds
                ]
            )  # (G, R, n)
        else:
            self.rows = _stack_groups(
                [rows[:, c0:c1].reshape(r, -1) for c0, c1 in bounds]
            )  # (G, R, n)

    def __call__(self, cands: Sequence[Candidate]) -> tuple[np.ndarray, np.ndarray]:
        dist, mse = self._evaluate(cands, per_fold=False)
        return dist, mse

    def folds(self, cands: Sequence[Candidate]) -> np.ndarray:
        """Each fold's δ̂ of the candidates, ``(K, F)`` (:meth:`GradientSweep.combine`)."""
        return self._evaluate(cands, per_fold=True)[0]

    def _evaluate(
        self, cands: Sequence[Candidate], per_fold: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        # Dead-zone candidates in their own columns: each quantization rule runs once per
        # candidate rather than both on all.
        slots = SlotGrid.of(cands, split=[c.deadzone > 0 for c in cands])
        folds = (self.sweep.n_folds,) if per_fold else ()
        dist = np.empty((len(slots.groups), *folds, slots.width))  # (Gu, [F,] width)
        mse = np.empty((len(slots.groups), slots.width))  # (Gu, width)
        numel = np.array(self.numel, dtype=np.float64)[slots.groups]  # (Gu,)
        for run in slots.runs(self.w.shape[-1]):
            gs = slots.group_range(run)
            w = self.w[gs]  # (g, 1, n)
            deltas = quantize_weights_batched(w, cands, slots, run, self.bounds, self.steps).sub_(
                w
            )  # (g, width, n)
            sq = deltas.pow(2).sum(-1)  # (g, width)
            p = torch.bmm(self.rows[gs], deltas.transpose(1, 2))  # (g, R, width)
            dist[run] = self.sweep.combine(p, sq, per_fold)
            mse[run] = sq.double().cpu().numpy() / numel[run, None]
        # Advanced indices around the fold slice: (K, F) with folds.
        picked = dist[slots.rows, :, slots.cols] if per_fold else dist[slots.rows, slots.cols]
        return picked, mse[slots.rows, slots.cols]

    def dist_of(self, group: int, deltas: torch.Tensor) -> np.ndarray:
        """δ̂ of perturbations ``deltas (n_g, K)`` of group ``group`` (flattened rows)."""
        deltas = deltas.to(self.rows.dtype)
        p = self.rows[group, :, : self.numel[group]] @ deltas  # (R, K)
        return self.sweep.combine(p, deltas.pow(2).sum(0))


class HessianActBackend:
    """Evaluates activation candidates of one layer with the quadratic model (``Evaluate``);
    each sample's perturbation is paired with that sample's gradients."""

    def __init__(
        self,
        sweep: GradientSweep,
        layer: str,
        bounds: Sequence[tuple[int, int]],
        stats: ActGroupStats,
        steps: ChannelSteps | None = None,
        bias_corr: bool = False,
    ):
        sweep.ensure(layer)
        self.sweep, self.stats, self.bounds, self.steps = sweep, stats, bounds, steps
        # -bca inside the curves: each channel's perturbation loses its calibration mean (the
        # offset E[a − Q(a)] the correction adds back).
        self.bias_corr = bias_corr
        dim = channel_dim(sweep.modules[layer])
        # Channels last: A (N, …, C), D (N, M, …, C).
        acts = sweep.acts[layer].movedim(dim if dim < 0 else dim, -1)
        grads = sweep.grads[layer].movedim(dim if dim < 0 else dim + 1, -1)
        n, m = grads.shape[:2]
        self.numel = [acts[..., c0:c1][0].numel() for c0, c1 in bounds]
        # Per group, contiguous and zero-padded: A (G, N, 1, n), D (G, N, M, n).
        self.acts = _stack_groups([acts[..., c0:c1].reshape(n, -1) for c0, c1 in bounds]).unsqueeze(
            2
        )
        self.grads = _stack_groups([grads[..., c0:c1].reshape(n, m, -1) for c0, c1 in bounds])

    def __call__(self, cands: Sequence[Candidate]) -> tuple[np.ndarray, None]:
        return self._evaluate(cands, per_fold=False), None

    def folds(self, cands: Sequence[Candidate]) -> np.ndarray:
        """Each fold's δ̂ of the candidates, ``(K, F)`` (:meth:`GradientSweep.combine`)."""
        return self._evaluate(cands, per_fold=True)

    def _evaluate(self, cands: Sequence[Candidate], per_fold: bool) -> np.ndarray:
        slots = SlotGrid.of(cands)
        folds = (self.sweep.n_folds,) if per_fold else ()
        dist = np.empty((len(slots.groups), *folds, slots.width))  # (Gu, [F,] width)
        signed = self.stats.signed
        bounds = [act_bounds(c.bits, bool(signed[c.group])) for c in cands]
        steps = [2.0**c.step_log2 if c.bits > 0 else 1.0 for c in cands]
        _, n, m, n_g = self.grads.shape
        per_channel = None
        if self.steps is not None:
            width = max(c1 - c0 for c0, c1 in self.bounds)
            per_channel = candidate_params(cands, self.bounds, width, self.steps)[0]  # (K, width)
        for run in slots.runs(n * n_g):
            gs = slots.group_range(run)
            a = self.acts[gs]  # (g, N, 1, n)

            def grid(values: list[float], fill: float, run: slice = run) -> torch.Tensor:
                return slots.grid(values, fill, a, run).view(-1, 1, slots.width, 1)  # noqa: B023  # only called in this iteration

            step = (
                grid(steps, 1.0)
                if per_channel is None
                else self._element_steps(cands, per_channel, slots, run, a)
            )
            # All candidates of these groups in one broadcast quantization, candidates outside
            # the group's elements so that every pass runs along n: (g, N, width, n).
            delta = quantize_uniform_fast(
                a, step, grid([b[0] for b in bounds], 0.0), grid([b[1] for b in bounds], 0.0)
            ).sub_(a)
            if self.bias_corr:
                self._center(delta, slots.groups[run])
            g = delta.shape[0]
            p = torch.bmm(
                delta.view(g * n, slots.width, n_g),
                self.grads[gs].view(g * n, m, n_g).transpose(1, 2),
            )  # (g·N, width, M)
            # κ/2·‖Δa‖² is a per-sample mean, like the ‖P‖² term: summed over the samples it
            # would grow with --testsize and outweigh ‖P‖² the more samples calibrate.
            sq = delta.pow(2).sum((1, 3)) / n if self.sweep.settings.kappa else None
            p = p.view(g, n, slots.width, m).transpose(2, 3)  # (g, N, M, width)
            dist[run] = self.sweep.combine(p.reshape(g, n * m, slots.width), sq, per_fold)
        return dist[slots.rows, :, slots.cols] if per_fold else dist[slots.rows, slots.cols]

    def _center(self, delta: torch.Tensor, groups: np.ndarray) -> None:
        """Subtract from ``delta (g, N, width, n)`` in place each channel's mean over the
        samples and positions, per candidate (channels fastest along ``n``; padding stays 0)."""
        _, n, width, _ = delta.shape
        for r, group in enumerate(groups.tolist()):
            c0, c1 = self.bounds[group]
            numel = self.numel[group]
            # A view (view() refuses otherwise), so the subtraction lands in delta.
            d = delta[r, :, :, :numel].view(n, width, numel // (c1 - c0), c1 - c0)  # (N, w, P, c)
            d.sub_(d.mean((0, 2), keepdim=True))

    def _element_steps(
        self,
        cands: Sequence[Candidate],
        per: np.ndarray,
        slots: SlotGrid,
        run: slice,
        like: torch.Tensor,
    ) -> torch.Tensor:
        """The candidates' per-channel steps ``per (K, width)`` for the grid rows ``run``, on
        every element of their group (channels fastest, as stacked): ``(g, 1, width, n)``."""
        out = np.ones((run.stop - run.start, slots.width, like.shape[-1]))  # (g, width, n)
        for i, cand in enumerate(cands):
            r = int(slots.rows[i])
            if run.start <= r < run.stop:
                c0, c1 = self.bounds[cand.group]
                numel = self.numel[cand.group]  # positions × channels of the group
                out[r - run.start, slots.cols[i], :numel] = np.tile(
                    per[i, : c1 - c0], numel // (c1 - c0)
                )
        return torch.from_numpy(out).to(like).unsqueeze(1)

    def dist_of(self, group: int, delta: torch.Tensor) -> np.ndarray:
        """δ̂ of perturbations ``delta (N, …, c_g, K)`` of group ``group`` (channels, then
        candidates last): sample n's perturbation meets sample n's gradients only."""
        d = self.grads[group, ..., : self.numel[group]]  # (N, M, n_g)
        n = d.shape[0]
        k = delta.shape[-1]
        dl = delta.reshape(n, -1, k).to(d.dtype)  # (N, n_g, K)
        p = torch.bmm(d, dl).reshape(n * d.shape[1], k)  # (N·M, K)
        return self.sweep.combine(p, dl.pow(2).sum((0, 1)) / n)
