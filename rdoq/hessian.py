"""Second-order (Hessian) curve estimator: one gradient sweep instead of one pass per candidate.

Paper eq. 18 (weights) / 21 (activations): with the per-sample gradient rows ``G`` of a scalar
function of the output and a perturbation ``Δ`` of one group,
``δ̂ = [1ᵀP/N] + κ/2·‖Δ‖² + s·‖P‖²``, ``P = G·Δ``. Two choices of rows:

* ``probe="random"`` (default): for each calibration sample ``n`` and each of ``M`` Rademacher
  vectors ``z`` (fresh per sample), the row is ``∂(zᵀF(x_n))/∂θ``. Since ``E[(zᵀJΔ)²] = ‖JΔ‖²``,
  ``‖P‖²/(N·M·K)`` (K output elements per sample) is an unbiased estimate of the *linearised*
  output MSE — the quantity the measured engine measures, to first order.
* ``probe="norm"`` (the paper's scalar): one row per sample, ``∂‖F(x_n)‖/∂θ``, with
  ``s = 1/(2N)`` and the optional first-order term ``1ᵀP/N``.

Rows are always **per sample** (the authors used per-batch gradients of ‖F‖, rank = number of
batches), and an activation perturbation ``Δa_n`` is always paired with the gradient of that same
sample ``n``. All layers' rows come from one sweep over the calibration set (layers are split over
several sweeps only when their rows exceed the memory budget). Weight rows are stored as
``(R, out, in_per_out)``; a candidate costs one ``(R, n_g) × (n_g,)`` product — never an
``n_g × n_g`` matrix. For activations the layer's calibration values ``A (N, …)`` and output
gradients ``D (N, M, …)`` are stored and a candidate costs ``O(N·M·n_g)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rdoq.engine import ActGroupStats, act_bounds
from rdoq.groups import channel_dim
from rdoq.quantizers import (
    deadzone_magnitudes,
    quantize_deadzone,
    quantize_uniform,
    signed_bounds,
)
from rdoq.search import Candidate

log = logging.getLogger(__name__)

PROBES = ("random", "norm")


@dataclass(frozen=True)
class HessianSettings:
    """Parameters of the second-order estimator (recorded in meta.json)."""

    probe: str = "random"
    nprobes: int = 4
    kappa: float = 0.0
    first_order: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.probe not in PROBES:
            raise ValueError(f"--probe must be one of {PROBES}, got {self.probe!r}")
        if self.nprobes < 1:
            raise ValueError(f"--nprobes must be >= 1, got {self.nprobes}")
        if self.first_order and self.probe != "norm":
            raise ValueError("--first-order needs --probe norm: the first-order term of a "
                             "random output probe is zero in expectation")
        if not math.isfinite(self.kappa) or self.kappa < 0:
            raise ValueError(f"--kappa must be a finite number >= 0, got {self.kappa}")

    @property
    def rows_per_sample(self) -> int:
        return self.nprobes if self.probe == "random" else 1

    def params(self) -> dict:
        return asdict(self)


def _per_sample_weight_grad(module: nn.Module, x: torch.Tensor,
                            dy: torch.Tensor) -> torch.Tensor:
    """``(B, out, in_per_out)``: the gradient of the weight for each sample separately."""
    if isinstance(module, nn.Linear):
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
        dy = dy.reshape(dy.shape[0], -1, dy.shape[-1])  # (B, T, out)
        return torch.einsum("bto,bti->boi", dy, x)
    if isinstance(module, nn.Conv2d):
        padding = module.padding
        if module.padding_mode != "zeros" or (isinstance(padding, str) and padding != "valid"):
            raise ValueError(f"the Hessian estimator supports zero-padded convolutions with "
                             f"explicit padding, not padding={padding!r}, padding_mode="
                             f"{module.padding_mode!r}")
        padding = 0 if padding == "valid" else padding
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                        stride=module.stride)  # (B, in·kh·kw, L)
        b, g = x.shape[0], module.groups
        cols = cols.reshape(b, g, -1, cols.shape[-1])  # (B, g, in/g·kh·kw, L)
        d = dy.reshape(b, g, -1, cols.shape[-1])  # (B, g, out/g, L)
        return torch.einsum("bgol,bgil->bgoi", d, cols).reshape(b, module.out_channels, -1)
    raise ValueError(f"no per-sample gradient for {type(module).__name__}")


class GradientSweep:
    """Per-sample gradient rows of the given layers from sweeps over the calibration set.

    ``kind="weight"``: ``rows[name] (R, out, in_per_out)``. ``kind="act"``: ``acts[name] (N, …)``
    and ``grads[name] (N, M, …)`` of the layer's output (``mode="out"``) or input (``"in"``).
    """

    def __init__(self, model: nn.Module, calib: torch.Tensor, layers: Sequence[str], kind: str,
                 settings: HessianSettings, mode: str | None = None, batch_size: int = 16,
                 mem_budget_mb: float = 2048.0):
        self.model, self.calib, self.kind, self.mode = model, calib, kind, mode
        self.settings, self.batch_size = settings, batch_size
        self.modules = dict(model.named_modules())
        self.rows: dict[str, torch.Tensor] = {}
        self.acts: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.out_numel = 0
        self.sweeps = 0
        n = calib.shape[0]
        m = settings.rows_per_sample
        sizes = {}
        shapes = self._shapes(layers)
        for name in layers:
            per = (self.modules[name].weight.numel() * m if kind == "weight"
                   else math.prod(shapes[name]) * (m + 1))
            sizes[name] = per * n * calib.element_size()
        budget = mem_budget_mb * 2**20
        chunks: list[list[str]] = [[]]
        used = 0.0
        for name in layers:
            if chunks[-1] and used + sizes[name] > budget:
                chunks.append([])
                used = 0.0
            chunks[-1].append(name)
            used += sizes[name]
        if len(chunks) > 1:
            log.info("gradient rows of %d layers need %.0f MiB > --mem-budget-mb %.0f: %d sweeps",
                     len(layers), sum(sizes.values()) / 2**20, mem_budget_mb, len(chunks))
        self._chunks = [c for c in chunks if c]
        self.n_sweeps = len(self._chunks)
        self._shapes_of = shapes
        self._loaded: list[str] = []

    def ensure(self, name: str) -> None:
        """Make ``name``'s rows available: sweep its chunk of layers (all layers at once unless
        memory demanded several chunks), releasing the previous chunk's rows first."""
        if name in self._loaded:
            return
        chunk = next((c for c in self._chunks if name in c), None)
        if chunk is None:
            raise ValueError(f"layer {name!r} is not part of this gradient sweep")
        self.rows.clear()
        self.acts.clear()
        self.grads.clear()
        self._sweep(chunk, self._shapes_of)
        self._loaded = list(chunk)

    def _shapes(self, layers: Sequence[str]) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        calls: dict[str, int] = {}

        def hook(name: str):
            def record(m, a, o):
                t = a[0] if self.mode == "in" else o
                shapes[name] = tuple(t.shape[1:])
                calls[name] = calls.get(name, 0) + 1
            return record

        handles = [self.modules[n].register_forward_hook(hook(n)) for n in layers]
        try:
            with torch.no_grad():
                self.model(self.calib[:1])
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in layers if n not in shapes]
        if missing:
            raise ValueError(f"layers {missing} are never called in forward (their weight is "
                             f"used by a parent module); the Hessian estimator cannot see them")
        if self.kind == "act":
            repeated = [n for n in layers if calls[n] > 1]
            if repeated:
                raise ValueError(f"layers {repeated} are called several times per forward; "
                                 f"use the measured activation curves for this model")
        return shapes

    def _sweep(self, layers: list[str], shapes: dict[str, tuple[int, ...]]) -> None:
        self.sweeps += 1
        cfg = self.settings
        m_rows = cfg.rows_per_sample
        n_total = self.calib.shape[0]
        dt = self.calib.dtype
        if self.kind == "weight":
            for name in layers:
                w = self.modules[name].weight
                self.rows[name] = torch.zeros(n_total * m_rows, w.shape[0], w[0].numel(),
                                              dtype=dt, device=w.device)  # (R, out, in/out)
        else:
            for name in layers:
                self.acts[name] = torch.zeros(n_total, *shapes[name], dtype=dt,
                                              device=self.calib.device)  # (N, …)
                self.grads[name] = torch.zeros(n_total, m_rows, *shapes[name], dtype=dt,
                                               device=self.calib.device)  # (N, M, …)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

        def hook(name: str):
            def record(m, a, o):
                captured.setdefault(name, []).append((a[0], o))
            return record

        handles = [self.modules[n].register_forward_hook(hook(n)) for n in layers]
        try:
            for b0 in range(0, n_total, self.batch_size):
                captured.clear()
                x = self.calib[b0:b0 + self.batch_size].detach().clone().requires_grad_(True)
                with torch.enable_grad():
                    y = self.model(x)
                    y = y.reshape(y.shape[0], -1)  # (B, K)
                    self.out_numel = y.shape[1]
                    b = y.shape[0]
                    for j in range(m_rows):
                        if cfg.probe == "random":
                            z = torch.randint(0, 2, y.shape, generator=gen).to(y) * 2 - 1
                            s = (z * y).sum()
                        else:
                            s = y.norm(dim=1).sum()
                        self._accumulate(s, layers, captured, b0, b, j, last=j == m_rows - 1)
        finally:
            for h in handles:
                h.remove()

    def _accumulate(self, s: torch.Tensor, layers: list[str],
                    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]], b0: int, b: int,
                    j: int, last: bool) -> None:
        m_rows = self.settings.rows_per_sample
        use_input = self.kind == "act" and self.mode == "in"
        targets = [t[0] if use_input else t[1] for n in layers for t in captured[n]]
        grads = torch.autograd.grad(s, targets, retain_graph=not last, allow_unused=True)
        k = 0
        for name in layers:
            calls = captured[name]
            module = self.modules[name]
            if self.kind == "weight":
                rows = self.rows[name]
                total = None
                for (inp, _), g in zip(calls, grads[k:k + len(calls)], strict=True):
                    if g is None:
                        continue
                    ps = _per_sample_weight_grad(module, inp.detach(), g.detach())
                    total = ps if total is None else total + ps
                if total is not None:
                    # Row of (sample n, probe j) = n·M + j.
                    rows[b0 * m_rows + j:(b0 + b) * m_rows:m_rows] = total.to(rows.dtype)
            else:
                (inp, out), g = calls[0], grads[k]
                if j == 0:
                    self.acts[name][b0:b0 + b] = (inp if use_input else out).detach()
                if g is not None:
                    self.grads[name][b0:b0 + b, j] = g.detach()
            k += len(calls)

    @property
    def scale(self) -> float:
        """Factor of ‖P‖² in δ̂."""
        n = self.calib.shape[0]
        if self.settings.probe == "random":
            return 1.0 / (n * self.settings.nprobes * self.out_numel)
        return 1.0 / (2.0 * n)

    def combine(self, p: torch.Tensor, delta_sq: torch.Tensor) -> np.ndarray:
        """δ̂ per candidate from ``P (R, K)`` and ``‖Δ‖² (K,)``."""
        cfg = self.settings
        dist = self.scale * p.double().pow(2).sum(0) + 0.5 * cfg.kappa * delta_sq.double()
        if cfg.first_order:
            dist = dist + p.double().sum(0) / self.calib.shape[0]
        return dist.cpu().numpy()


def quantize_weights_batched(w: torch.Tensor, cands: Sequence[Candidate]) -> torch.Tensor:
    """``quantize_weight`` of ``w (1, n)`` for every candidate at once: ``(K, n)``, the same
    values as one call per candidate (uniform and dead-zone rules selected per row)."""
    def col(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=w.dtype, device=w.device).view(-1, 1)  # (K, 1)

    steps = [2.0**c.step_log2 if c.bits > 0 and math.isfinite(c.step_log2) else 1.0
             for c in cands]
    bounds = [signed_bounds(c.bits) for c in cands]
    step = col(steps)
    uniform = quantize_uniform(w, step, col([b[0] for b in bounds]), col([b[1] for b in bounds]))
    if not any(c.deadzone > 0 for c in cands):
        return uniform
    dz = col([c.deadzone for c in cands])
    mags = col([deadzone_magnitudes(c.bits) for c in cands])
    return torch.where(dz > 0, quantize_deadzone(w, step, dz, mags), uniform)


class HessianWeightBackend:
    """Evaluates weight candidates of one layer with the quadratic model (``Evaluate``)."""

    def __init__(self, sweep: GradientSweep, layer: str, bounds: Sequence[tuple[int, int]]):
        sweep.ensure(layer)
        self.sweep, self.bounds = sweep, bounds
        self.weight = sweep.modules[layer].weight.detach()
        self.rows = sweep.rows[layer]  # (R, out, in/out)
        self._group_rows: dict[int, torch.Tensor] = {}  # (R, n_g) per group

    def __call__(self, cands: Sequence[Candidate]) -> tuple[np.ndarray, np.ndarray]:
        dist = np.empty(len(cands))
        mse = np.empty(len(cands))
        by_group: dict[int, list[int]] = {}
        for i, c in enumerate(cands):
            by_group.setdefault(c.group, []).append(i)
        for g, idx in by_group.items():
            c0, c1 = self.bounds[g]
            w = self.weight[c0:c1].reshape(1, -1)  # (1, n_g)
            deltas = (quantize_weights_batched(w, [cands[i] for i in idx]) - w).T  # (n_g, K)
            dist[idx] = self.dist_of(g, deltas)
            mse[idx] = deltas.double().pow(2).mean(0).cpu().numpy()
        return dist, mse

    def dist_of(self, group: int, deltas: torch.Tensor) -> np.ndarray:
        """δ̂ of perturbations ``deltas (n_g, K)`` of group ``group`` (flattened rows)."""
        if group not in self._group_rows:
            # Contiguous once per group: its chains come back to it in every round.
            c0, c1 = self.bounds[group]
            self._group_rows[group] = self.rows[:, c0:c1].reshape(self.rows.shape[0], -1)
        deltas = deltas.to(self.rows.dtype)
        p = self._group_rows[group] @ deltas  # (R, K)
        return self.sweep.combine(p, deltas.pow(2).sum(0))


class HessianActBackend:
    """Evaluates activation candidates of one layer with the quadratic model (``Evaluate``);
    each sample's perturbation is paired with that sample's gradients."""

    def __init__(self, sweep: GradientSweep, layer: str, bounds: Sequence[tuple[int, int]],
                 stats: ActGroupStats):
        sweep.ensure(layer)
        self.sweep, self.bounds, self.stats = sweep, bounds, stats
        dim = channel_dim(sweep.modules[layer])
        # Channels last: A (N, …, C), D (N, M, …, C).
        self.acts = sweep.acts[layer].movedim(dim if dim < 0 else dim, -1)
        self.grads = sweep.grads[layer].movedim(dim if dim < 0 else dim + 1, -1)
        self._group_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _group(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous ``A_g (N, n_g)`` and ``D_g (N, M, n_g)`` of group ``g`` (its chains ask
        for it in every round)."""
        if g not in self._group_cache:
            c0, c1 = self.bounds[g]
            n, m = self.grads.shape[:2]
            self._group_cache[g] = (self.acts[..., c0:c1].reshape(n, -1),
                                    self.grads[..., c0:c1].reshape(n, m, -1))
        return self._group_cache[g]

    def __call__(self, cands: Sequence[Candidate]) -> tuple[np.ndarray, None]:
        dist = np.empty(len(cands))
        by_group: dict[int, list[int]] = {}
        for i, c in enumerate(cands):
            by_group.setdefault(c.group, []).append(i)
        for g, idx in by_group.items():
            a, _ = self._group(g)  # (N, n_g)
            bounds = [act_bounds(cands[i].bits, bool(self.stats.signed[g])) for i in idx]
            # All candidates of the group in one broadcast quantization: (K, 1, 1) parameters.
            step = torch.tensor([2.0**cands[i].step_log2 if cands[i].bits > 0 else 1.0
                                 for i in idx], dtype=a.dtype, device=a.device).view(-1, 1, 1)
            lo = torch.tensor([b[0] for b in bounds], dtype=a.dtype, device=a.device)
            hi = torch.tensor([b[1] for b in bounds], dtype=a.dtype, device=a.device)
            delta = quantize_uniform(a, step, lo.view(-1, 1, 1), hi.view(-1, 1, 1)) - a
            dist[idx] = self.dist_of(g, delta.permute(1, 2, 0))  # (N, n_g, K)
        return dist, None

    def dist_of(self, group: int, delta: torch.Tensor) -> np.ndarray:
        """δ̂ of perturbations ``delta (N, …, c_g, K)`` of group ``group`` (channels, then
        candidates last): sample n's perturbation meets sample n's gradients only."""
        _, d = self._group(group)  # (N, M, n_g)
        n, m = d.shape[:2]
        k = delta.shape[-1]
        dl = delta.reshape(n, -1, k)  # (N, n_g, K)
        p = torch.bmm(d, dl).reshape(n * m, k)  # (N·M, K)
        return self.sweep.combine(p, dl.pow(2).sum((0, 1)))
