"""Second-order (Hessian) curve estimator: one gradient sweep instead of one pass per candidate.

Paper eq. 18 (weights) / 21 (activations): with the per-sample gradient rows ``G`` of a scalar
function of the output and a perturbation ``Δ`` of one group,
``δ̂ = [1ᵀP/N] + κ/2·‖Δ‖² + s·‖P‖²``, ``P = G·Δ``. Two choices of rows:

* ``probe="random"`` (default): for each calibration sample ``n`` and each of ``M`` Rademacher
  vectors ``z`` (fresh per sample), the row is ``∂(zᵀF(x_n))/∂θ``. Since ``E[(zᵀJΔ)²] = ‖JΔ‖²``,
  ``‖P‖²/(N·M·K)`` (K output elements per sample) is an unbiased estimate of the *linearised*
  output MSE — the quantity the measured engine measures, to first order.
* ``probe="norm"`` (the paper's scalar): one row per sample, ``∂‖F(x_n)‖/∂θ``, with
  ``s = 1/(2N)`` and the optional first-order term ``1ᵀP/N``. The preset ``"paper"``
  (``--paper-hessian``) is this probe with the authors' κ = 1e-7.

``‖Δ‖²`` is the group's for weights and, like ``‖P‖²/N``, a mean over the samples for
activations, so no term grows with the number of calibration samples.

Rows are always **per sample** (the authors used per-batch gradients of ‖F‖, rank = number of
batches), and an activation perturbation ``Δa_n`` is always paired with the gradient of that same
sample ``n``. All layers' rows come from one sweep over the calibration set (layers are split over
several sweeps only when their rows exceed the memory budget; spconv layers, whose inputs have no
sample axis, get the same rows by running each sample alone with one backward per probe). Weight
rows are stored as ``(R, out, in_per_out)``; a candidate costs one ``(R, n_g) × (n_g,)`` product
— never an ``n_g × n_g`` matrix. For activations the layer's calibration values ``A (N, …)`` and
output gradients ``D (N, M, …)`` are stored and a candidate costs ``O(N·M·n_g)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp, vmap
from tqdm import tqdm

from rdoq.actstats import ActGroupStats
from rdoq.backends import input_sum
from rdoq.groups import channel_dim, is_sparse_conv
from rdoq.quantizers import (
    act_bounds,
    deadzone_magnitudes,
    quantize_deadzone_fast,
    quantize_uniform_fast,
    signed_bounds,
)
from rdoq.search import Candidate
from rdoq.steps import ChannelSteps, candidate_params

log = logging.getLogger(__name__)

PROBES = ("random", "norm")
# Presets: named (probe, κ) pairs. "paper" is eq. 18/21 as the authors ran it: rows from the
# gradient of the output norm ‖F(x_n)‖ and their --kappa default 1e-7; the first-order term
# stays a separate switch (their scripts compute it and then zero it).
PRESETS = ("paper",)
PAPER_PROBE = "norm"
PAPER_KAPPA = 1e-7


@dataclass(frozen=True)
class HessianSettings:
    """Parameters of the second-order estimator (recorded in meta.json). ``preset`` names the
    (probe, κ) pair the settings were made from; a named preset must match them, so meta.json
    never records a preset the curves do not follow."""

    probe: str = "random"
    nprobes: int = 4
    kappa: float = 0.0
    first_order: bool = False
    seed: int = 0
    preset: str | None = None

    @classmethod
    def from_flags(cls, preset: str | None, probe: str | None, kappa: float | None,
                   nprobes: int = 4, first_order: bool = False, seed: int = 0
                   ) -> HessianSettings:
        """Settings from the curve scripts' flags, ``None`` = not given. A preset sets the
        probe and κ; an explicit ``--probe``/``--kappa`` alongside it must agree with the
        preset (ValueError otherwise): silently letting either win would leave one of them
        unapplied."""
        if preset is None:
            return cls("random" if probe is None else probe, nprobes,
                       0.0 if kappa is None else kappa, first_order, seed)
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
        given = {"--probe": (probe, PAPER_PROBE), "--kappa": (kappa, PAPER_KAPPA)}
        clash = [f"{flag} {value}" for flag, (value, own) in given.items()
                 if value is not None and value != own]
        if clash:
            raise ValueError(f"--paper-hessian sets --probe {PAPER_PROBE} --kappa {PAPER_KAPPA:g}"
                             f", which contradicts {' '.join(clash)}; drop {' and '.join(clash)}"
                             f" or drop --paper-hessian")
        return cls(PAPER_PROBE, nprobes, PAPER_KAPPA, first_order, seed, preset)

    def __post_init__(self) -> None:
        if self.probe not in PROBES:
            raise ValueError(f"--probe must be one of {PROBES}, got {self.probe!r}")
        if self.preset is not None and (self.preset not in PRESETS or (
                self.probe, self.kappa) != (PAPER_PROBE, PAPER_KAPPA)):
            raise ValueError(f"preset {self.preset!r} needs probe {PAPER_PROBE!r} and kappa "
                             f"{PAPER_KAPPA:g}, got {self.probe!r} and {self.kappa:g}")
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


def _per_sample_weight_grad(module: nn.Module, x: torch.Tensor, dy: torch.Tensor,
                            out: torch.Tensor, accumulate: bool = False) -> None:
    """Write (or add) the weight gradient of each (sample, probe) pair into ``out (B·M, out,
    in_per_out)``, from the layer input of each sample ``x (B, …)`` and the output gradients of
    its ``M`` probes ``dy (B, M, …)`` (the probes share one forward, so inputs are not
    repeated). Stock ``nn.Linear`` / zero-padded ``nn.Conv2d``: one batched product straight
    into the rows. Any other layer (a subclass that pads or transforms inside ``forward``, e.g.
    timm's ``Conv2dSame``): :func:`_per_sample_weight_grad_func`."""
    b, m = dy.shape[:2]
    forward = type(module).forward
    if forward is nn.Linear.forward:
        x = x.reshape(b, -1, x.shape[-1])  # (B, T, in)
        d = dy.reshape(b, m, -1, dy.shape[-1]).transpose(2, 3)  # (B, M, out, T)
        _bmm_into(d.reshape(b, -1, x.shape[1]), x, out.view(b, -1, x.shape[-1]), accumulate)
        return
    padding = getattr(module, "padding", None)
    if (forward is nn.Conv2d.forward and module.padding_mode == "zeros"
            and not (isinstance(padding, str) and padding != "valid")):
        padding = 0 if padding == "valid" else padding
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                        stride=module.stride)  # (B, in·kh·kw, L)
        g = module.groups
        if g == 1:
            d = dy.reshape(b, -1, cols.shape[-1])  # (B, M·out, L)
            _bmm_into(d, cols.transpose(1, 2), out.view(b, d.shape[1], -1), accumulate)
            return
        cols = cols.reshape(b, g, -1, cols.shape[-1])  # (B, g, in/g·kh·kw, L)
        d = dy.reshape(b, m, g, -1, cols.shape[-1])  # (B, M, g, out/g, L)
        ps = torch.einsum("bmgol,bgil->bmgoi", d, cols).reshape(out.shape)
        if accumulate:
            out.add_(ps)
        else:
            out.copy_(ps)
        return
    ps = _per_sample_weight_grad_func(module, x, dy).reshape(out.shape)
    if accumulate:
        out.add_(ps)
    else:
        out.copy_(ps)


def _per_sample_weight_grad_func(module: nn.Module, x: torch.Tensor,
                                 dy: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-probe weight gradients ``(B, M, *W.shape)`` of any layer through its own
    ``forward`` (``torch.func``: a vector-Jacobian product per sample, vmapped over samples and
    probes), from inputs ``x (B, …)`` and output gradients ``dy (B, M, …)``."""
    weight = module.weight.detach()

    def one_sample(xn: torch.Tensor, dyn: torch.Tensor) -> torch.Tensor:
        def out_of(w: torch.Tensor) -> torch.Tensor:
            return functional_call(module, {"weight": w}, (xn.unsqueeze(0),)).squeeze(0)

        _, pull = vjp(out_of, weight)
        return vmap(lambda d: pull(d)[0])(dyn)  # (M, *W)

    with torch.no_grad():
        return vmap(one_sample)(x.detach(), dy.detach())


def needs_own_pass(module: nn.Module) -> bool:
    """Whether a weight layer's rows come from :func:`_per_sample_weight_grad_alone` instead of
    the sweep's batched capture: spconv layers, whose inputs and outputs are SparseConvTensors
    (active sites of all samples in one feature matrix, no sample axis to split)."""
    return is_sparse_conv(module)


def _per_sample_weight_grad_alone(model: nn.Module, calib: torch.Tensor,
                                  weights: dict[str, nn.Parameter], rows: dict[str, torch.Tensor],
                                  settings: HessianSettings, probes: torch.Tensor | None,
                                  on_sample: Callable[[], None] | None = None) -> None:
    """Write the rows ``rows[name] (N·M, out, in_per_out)`` of the layers ``weights`` by
    running each calibration sample alone and backpropagating each of its ``M`` probes to the
    weights: row ``n·M + j`` is ``∂(z_{n,j}ᵀF(x_n))/∂W`` (``probe="norm"``: ``∂‖F(x_n)‖/∂W``),
    the rows :func:`_per_sample_weight_grad` gives from captured inputs, from the same
    Rademacher ``probes (N, M, K)``. One forward and ``M`` backwards per sample, for layers that
    function cannot take (:func:`needs_own_pass`)."""
    names, params = list(weights), list(weights.values())
    m_rows = settings.rows_per_sample
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        for n in range(calib.shape[0]):
            with torch.enable_grad():
                y = model(calib[n:n + 1].detach()).reshape(1, -1)  # (1, K)
                for j in range(m_rows):
                    if settings.probe == "random":
                        s = ((probes[n:n + 1, j].to(y) * 2 - 1) * y).sum()
                    else:
                        s = y.norm(dim=1).sum()
                    grads = torch.autograd.grad(s, params, retain_graph=j < m_rows - 1,
                                                allow_unused=True)
                    for name, g in zip(names, grads, strict=True):
                        row = rows[name][n * m_rows + j]  # (out, in_per_out)
                        if g is None:
                            row.zero_()
                        else:
                            row.copy_(g.reshape(row.shape))
            if on_sample is not None:
                on_sample()
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _bmm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """``out = a @ b`` or ``out += a @ b`` (batched), without a temporary."""
    if accumulate:
        out.baddbmm_(a, b)
    else:
        torch.bmm(a, b, out=out)


class GradientSweep:
    """Per-sample gradient rows of the given layers from sweeps over the calibration set.

    ``kind="weight"``: ``rows[name] (R, out, in_per_out)``. ``kind="act"``: ``acts[name] (N, …)``
    and ``grads[name] (N, M, …)`` of the layer's output (``mode="out"``) or input (``"in"``).
    """

    def __init__(self, model: nn.Module, calib: torch.Tensor, layers: Sequence[str], kind: str,
                 settings: HessianSettings, mode: str | None = None, batch_size: int = 16,
                 mem_budget_mb: float = 2048.0, progress: bool = False,
                 bias_corr: bool = False, folds: Sequence[int] | None = None):
        self.model, self.calib, self.kind, self.mode = model, calib, kind, mode
        # Cross-validation folds: the fold of each calibration sample ``(N,)``, or None. The
        # rows are per sample, so each fold's own estimate costs no extra sweep
        # (``combine(..., per_fold=True)``).
        self.fold_of: torch.Tensor | None = None
        self.n_folds = 0
        if folds is not None:
            fold_of = torch.as_tensor(np.asarray(folds, dtype=np.int64))  # (N,)
            if fold_of.shape != (calib.shape[0],) or (fold_of < 0).any():
                raise ValueError(f"folds must give a fold index >= 0 for each of the "
                                 f"{calib.shape[0]} calibration samples")
            self.n_folds = int(fold_of.max()) + 1
            self.fold_sizes = torch.bincount(fold_of, minlength=self.n_folds)  # (F,)
            if (self.fold_sizes == 0).any():
                raise ValueError(f"folds {torch.nonzero(self.fold_sizes == 0).flatten().tolist()}"
                                 f" hold no calibration sample")
            self.fold_of = fold_of
        self.settings, self.batch_size, self.progress = settings, batch_size, progress
        # -bcw inside the curves (weights): per-sample output-gradient sums per channel
        # ``bias_rows (R, out)`` and the mean input of each weight ``input_means (out, in)``.
        self.bias_corr = bias_corr and kind == "weight"
        self.bias_rows: dict[str, torch.Tensor] = {}
        self.input_means: dict[str, torch.Tensor] = {}
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
        # The forward/backward of a sweep batch must fit the budget too (the rows above are
        # held beside it): samples per batch from the per-sample working set.
        fits = max(int(budget // max(self._per_sample_bytes, 1)), 1)
        if fits < batch_size:
            log.info("sweep batch %d -> %d samples: a forward/backward needs ~%.0f MiB per "
                     "sample, --mem-budget-mb %.0f", batch_size, fits,
                     self._per_sample_bytes / 2**20, mem_budget_mb)
            self.batch_size = fits
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
        for store in (self.rows, self.acts, self.grads, self.bias_rows, self.input_means):
            store.clear()
        self._sweep(chunk, self._shapes_of)
        self._loaded = list(chunk)

    def _shapes(self, layers: Sequence[str]) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes of the layers' targets (one forward of one sample), and the
        per-sample working set of a sweep (``_per_sample_bytes``): the tensors autograd keeps
        (~2× every distinct leaf output), the probes' gradients of every target, and the widest
        per-sample gradient temporary (a convolution's unfolded input)."""
        shapes: dict[str, tuple[int, ...]] = {}
        calls: dict[str, int] = {}
        sizes = {"leaves": 0, "targets": 0, "unfold": 0}
        wanted = set(layers)
        # Storages counted once (Identity and in-place outputs share one); the outputs are kept
        # alive for the forward so that no freed storage is reused under a counted address.
        seen: dict[int, torch.Tensor] = {}

        def hook(name: str):
            def record(m, a, o):
                if isinstance(o, torch.Tensor) and o.data_ptr() not in seen:
                    seen[o.data_ptr()] = o
                    sizes["leaves"] += o.numel()
                if name not in wanted:
                    return
                t = a[0] if self.mode == "in" else o
                if not isinstance(t, torch.Tensor):  # a SparseConvTensor: features (N_act, C)
                    t = t.features
                shapes[name] = tuple(t.shape[1:])
                calls[name] = calls.get(name, 0) + 1
                sizes["targets"] += t.numel() * 2
                if self.kind == "weight" and isinstance(m, nn.Conv2d):
                    positions = o.numel() // max(o.shape[1], 1)
                    sizes["unfold"] = max(sizes["unfold"],
                                          m.weight[0].numel() * m.groups * positions)
            return record

        leaves = {n for n, m in self.modules.items() if not list(m.children())} | wanted
        handles = [self.modules[n].register_forward_hook(hook(n)) for n in leaves]
        try:
            with torch.no_grad():
                self.out_numel = self.model(self.calib[:1])[0].numel()
        finally:
            for h in handles:
                h.remove()
        seen.clear()
        m_rows = self.settings.rows_per_sample
        self._per_sample_bytes = self.calib.element_size() * (
            2 * sizes["leaves"] + m_rows * sizes["targets"] + 2 * sizes["unfold"])
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
                # Every row is written by the sweep (zeros where a layer gets no gradient).
                self.rows[name] = torch.empty(n_total * m_rows, w.shape[0], w[0].numel(),
                                              dtype=dt, device=w.device)  # (R, out, in/out)
                if self.bias_corr:
                    self.bias_rows[name] = torch.zeros(n_total * m_rows, w.shape[0], dtype=dt,
                                                       device=w.device)  # (R, out)
        else:
            for name in layers:
                self.acts[name] = torch.empty(n_total, *shapes[name], dtype=dt,
                                              device=self.calib.device)  # (N, …)
                self.grads[name] = torch.empty(n_total, m_rows, *shapes[name], dtype=dt,
                                               device=self.calib.device)  # (N, M, …)
        # Every (sample, probe) has its own Rademacher vector, drawn up front in sample order:
        # the rows do not depend on how the sweep is batched or split.
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        probes = (torch.randint(0, 2, (n_total, m_rows, self.out_numel), generator=gen,
                                dtype=torch.int8) if cfg.probe == "random" else None)
        captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        # Layers whose rows the batched capture below cannot give (spconv) get theirs sample by
        # sample after it (_per_sample_weight_grad_alone).
        alone = [n for n in layers if needs_own_pass(self.modules[n])]
        if alone and (self.kind != "weight" or self.bias_corr):
            raise ValueError(f"the second-order estimator gives spconv layers {alone[:4]} plain "
                             f"weight curves only (no activation curves, no -bcw)")
        layers = [n for n in layers if n not in alone]
        # A model that runs each sample alone (FrameRunner) calls a layer once per sample:
        # one sample per forward keeps every captured call that sample's.
        batch = self.batch_size if getattr(self.model, "batches_samples", True) else 1

        # Only the sweep's own forward is recorded: computing the rows may call a layer again
        # (torch.func through its forward), and those calls must not join the captures.
        recording = [True]

        def hook(name: str):
            def record(m, a, o):
                if not recording[0]:
                    return None
                captured.setdefault(name, []).append((a[0], o))
                # The network goes on with a copy: an in-place op after the layer (ReLU with
                # inplace=True) would otherwise overwrite the captured output, its stored
                # values and the gradients taken with respect to it.
                return o.clone()
            return record

        use_input = self.kind == "act" and self.mode == "in"
        pending: dict[str, list[torch.Tensor]] = {}

        def own_input(name: str):
            # The layer reads a copy of its input, and the gradient is taken with respect to
            # that copy: it then flows only through this layer, not through the other consumers
            # of the tensor (a residual identity, a downsample), which quantizing this layer's
            # input does not touch.
            def swap(m, a):
                if not recording[0]:
                    return None
                t = a[0].clone()
                pending.setdefault(name, []).append(t)
                return (t, *a[1:])
            return swap

        def hook_in(name: str):
            record = hook(name)

            def take(m, a, o):
                if not recording[0]:
                    return None
                return record(m, (pending[name].pop(0), *a[1:]), o)
            return take

        if use_input:
            handles = [h for n in layers for h in (
                self.modules[n].register_forward_pre_hook(own_input(n)),
                self.modules[n].register_forward_hook(hook_in(n)))]
        else:
            handles = [self.modules[n].register_forward_hook(hook(n)) for n in layers]
        bar = tqdm(total=n_total * (bool(layers) + bool(alone)), unit="sample", leave=False,
                   disable=not self.progress, desc=f"gradient sweep {self.sweeps}/{self.n_sweeps}")
        try:
            # (No batched pass when every layer is swept alone.)
            for b0 in range(0, n_total if layers else 0, batch):
                captured.clear()
                x = self.calib[b0:b0 + batch].detach().clone().requires_grad_(True)
                with torch.enable_grad():
                    y = self.model(x)
                    y = y.reshape(y.shape[0], -1)  # (B, K)
                    self.out_numel = y.shape[1]
                    targets = [t[0] if use_input else t[1] for n in layers for t in captured[n]]
                    # One forward, one backward per probe: (B, M, …) gradients of each target.
                    per_probe = []
                    for j in range(m_rows):
                        if cfg.probe == "random":
                            z = probes[b0:b0 + y.shape[0], j].to(y) * 2 - 1  # (B, K)
                            s = (z * y).sum()
                        else:
                            s = y.norm(dim=1).sum()
                        per_probe.append(torch.autograd.grad(
                            s, targets, retain_graph=j < m_rows - 1, allow_unused=True))
                    grads = [None if gs[0] is None else torch.stack(gs, 1)
                             for gs in zip(*per_probe, strict=True)]
                    per_probe.clear()  # the stacked copies replace them
                recording[0] = False
                self._accumulate(layers, captured, grads, b0, y.shape[0], use_input)
                recording[0] = True
                bar.update(y.shape[0])
            if alone:
                _per_sample_weight_grad_alone(
                    self.model, self.calib, {n: self.modules[n].weight for n in alone},
                    self.rows, cfg, probes, lambda: bar.update(1))
        finally:
            bar.close()
            for h in handles:
                h.remove()
        if self.bias_corr:
            for name in layers:
                total, count = self.input_means[name]
                self.input_means[name] = total / count

    def _accumulate(self, layers: list[str],
                    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
                    grads: list[torch.Tensor | None], b0: int, b: int, use_input: bool) -> None:
        """Store the rows of samples ``b0 … b0+b`` from each target's gradients ``(B, M, …)``."""
        m_rows = self.settings.rows_per_sample
        k = 0
        for name in layers:
            calls = captured[name]
            module = self.modules[name]
            if self.kind == "weight":
                # Row of (sample n, probe j) = n·M + j; a layer called several times per
                # forward sums its calls' gradients.
                block = self.rows[name][b0 * m_rows:(b0 + b) * m_rows]  # (B·M, out, …)
                written = False
                for (inp, _), g in zip(calls, grads[k:k + len(calls)], strict=True):
                    if g is not None:
                        _per_sample_weight_grad(module, inp.detach(), g, block, written)
                        written = True
                    if self.bias_corr:
                        self._add_bias_rows(name, module, inp, g, b0, b)
                if not written:
                    block.zero_()
            else:
                (inp, out), g = calls[0], grads[k]
                self.acts[name][b0:b0 + b] = (inp if use_input else out).detach()
                self.grads[name][b0:b0 + b] = 0.0 if g is None else g
            k += len(calls)

    def _add_bias_rows(self, name: str, module: nn.Module, inp: torch.Tensor,
                       g: torch.Tensor | None, b0: int, b: int) -> None:
        """-bcw: add this call's per-sample output-gradient sums per channel (the gradient of a
        bias shift) and its input sums (for the mean input of each weight)."""
        m_rows = self.settings.rows_per_sample
        if g is not None:
            dim = channel_dim(module)
            axis = dim + 1 if dim >= 0 else g.dim() + dim  # channel axis of (B, M, …)
            other = [a for a in range(2, g.dim()) if a != axis]
            gb = g.sum(other) if other else g  # (B, M, out)
            self.bias_rows[name][b0 * m_rows:(b0 + b) * m_rows] += gb.reshape(b * m_rows, -1)
        total, count = input_sum(module, inp)
        if name in self.input_means:
            prev, n = self.input_means[name]
            total, count = prev + total, n + count
        self.input_means[name] = (total, count)

    @property
    def scale(self) -> float:
        """Factor of ‖P‖² in δ̂."""
        n = self.calib.shape[0]
        if self.settings.probe == "random":
            return 1.0 / (n * self.settings.nprobes * self.out_numel)
        return 1.0 / (2.0 * n)

    def combine(self, p: torch.Tensor, delta_sq: torch.Tensor | None,
                per_fold: bool = False) -> np.ndarray:
        """δ̂ per candidate from ``P (…, R, K)`` and ``‖Δ‖² (…, K)`` (needed only when
        κ ≠ 0; for activations the mean over the samples of ``‖Δa_n‖²``): ``(…, K)``.

        ``per_fold``: each fold's own estimate, the same formula over its samples only,
        ``(…, F, K)``; the all-sample δ̂ is their mean weighted by the fold sizes. (For
        activations the κ term stays the all-sample mean: per-sample ``‖Δa_n‖²`` is not kept.)
        """
        cfg = self.settings
        p = p.double()
        if per_fold:
            if self.fold_of is None:
                raise ValueError("this gradient sweep was made without folds")
            n, m = self.calib.shape[0], self.settings.rows_per_sample
            lead, k = p.shape[:-2], p.shape[-1]
            fold_of = self.fold_of.to(p.device)
            sizes = self.fold_sizes.to(p.device, torch.float64)[:, None]  # (F, 1)

            def fold_means(per_row: torch.Tensor) -> torch.Tensor:
                per_sample = per_row.reshape(*lead, n, m, k).sum(-2)  # (…, N, K)
                out = per_sample.new_zeros(*lead, self.n_folds, k)  # (…, F, K)
                return out.index_add_(len(lead), fold_of, per_sample) / sizes

            # scale·N turns a sum over all samples into a per-sample mean.
            dist = self.scale * n * fold_means(p.pow(2))
            if cfg.first_order:
                dist = dist + fold_means(p)
            if cfg.kappa:
                if delta_sq is None:
                    raise ValueError("κ ≠ 0 needs ‖Δ‖² of every candidate")
                dist = dist + 0.5 * cfg.kappa * delta_sq.double().unsqueeze(-2)
            return dist.cpu().numpy()
        dist = self.scale * p.pow(2).sum(-2)
        if cfg.kappa:
            if delta_sq is None:
                raise ValueError("κ ≠ 0 needs ‖Δ‖² of every candidate")
            dist = dist + 0.5 * cfg.kappa * delta_sq.double()
        if cfg.first_order:
            dist = dist + p.sum(-2) / self.calib.shape[0]
        return dist.cpu().numpy()


# Elements of the perturbation tensor of one batched evaluation (candidates × group elements ×
# samples); larger batches are split over runs of groups. 2^24 float64 = 128 MiB.
_MAX_DELTA_ELEMENTS = 2**24


@dataclass(frozen=True)
class SlotGrid:
    """Candidates laid out as a ``(groups, width)`` grid: row ``r`` holds the candidates of
    group ``groups[r]`` (sorted), padded to the widest row. With ``split``, every row holds the
    candidates without the flag in columns ``[0, split_col)`` and those with it from
    ``split_col`` on, so a rule that only the flagged candidates need runs on those columns."""

    groups: np.ndarray  # (Gu,) sorted group indices
    rows: np.ndarray  # (K,) row of each candidate
    cols: np.ndarray  # (K,) column of each candidate
    width: int
    split_col: int = 0
    split: bool = False

    @classmethod
    def of(cls, cands: Sequence[Candidate], split: Sequence[bool] | None = None) -> SlotGrid:
        flags = split if split is not None else [False] * len(cands)
        counts: tuple[dict[int, int], dict[int, int]] = ({}, {})
        cols = np.empty(len(cands), dtype=np.int64)
        for i, (c, f) in enumerate(zip(cands, flags, strict=True)):
            # Column = rank among the group's candidates of the same block.
            block = counts[bool(f)]
            cols[i] = block.get(c.group, 0)
            block[c.group] = cols[i] + 1
        split_col = max(counts[0].values(), default=0)
        cols[np.asarray(flags, dtype=bool)] += split_col
        groups = np.array(sorted(counts[0].keys() | counts[1].keys()), dtype=np.int64)
        row_of = {g: r for r, g in enumerate(groups.tolist())}
        rows = np.fromiter((row_of[c.group] for c in cands), dtype=np.int64, count=len(cands))
        return cls(groups, rows, cols, split_col + max(counts[1].values(), default=0), split_col,
                   split is not None)

    def grid(self, values: Sequence[float], fill: float, like: torch.Tensor,
             rows: slice = slice(None)) -> torch.Tensor:
        """``values`` per candidate as a ``(Gu, width)`` tensor (``fill`` in the padding),
        restricted to the grid rows ``rows``."""
        a = np.full((len(self.groups), self.width), fill, dtype=np.float64)
        a[self.rows, self.cols] = values
        return torch.from_numpy(a[rows]).to(dtype=like.dtype, device=like.device)

    def runs(self, per_group_elements: int) -> list[slice]:
        """Slices of grid rows whose groups are consecutive (views of stacked group tensors,
        no copies), each within the memory cap of one evaluation."""
        cap = max(_MAX_DELTA_ELEMENTS // max(per_group_elements * self.width, 1), 1)
        out, r0 = [], 0
        for r in range(1, len(self.groups) + 1):
            if (r == len(self.groups) or self.groups[r] != self.groups[r - 1] + 1
                    or r - r0 >= cap):
                out.append(slice(r0, r))
                r0 = r
        return out

    def group_range(self, rows: slice) -> slice:
        """The stacked-group slice of the grid rows ``rows`` (consecutive groups)."""
        return slice(int(self.groups[rows.start]), int(self.groups[rows.stop - 1]) + 1)


def quantize_weights_batched(w: torch.Tensor, cands: Sequence[Candidate], slots: SlotGrid,
                             rows: slice, bounds: Sequence[tuple[int, int]],
                             steps: ChannelSteps | None = None) -> torch.Tensor:
    """Quantized weights ``(g, width, n)`` of the grid rows ``rows`` of ``slots``, from the
    stacked group weights ``w (g, 1, n)`` (``n = channels × elements per channel``, zero-padded
    channels in a final partial group): entry ``[r, k]`` holds ``quantize_weight`` of that group
    for its k-th candidate (zeros in the padding), with per-channel steps (``steps``) or the
    candidate's one step. Candidates are an outer axis so that every elementwise pass runs along
    the group's elements. With a grid split by ``deadzone > 0`` each rule runs on its own columns
    only; otherwise both run on all and are selected per candidate."""
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
        return quantize_uniform_fast(wc, per_channel(step_k, 1.0, cols),
                                     per_cand([b[0] for b in levels], 0.0, cols),
                                     per_cand([b[1] for b in levels], 0.0, cols))

    def deadzone(cols: slice) -> torch.Tensor:
        return quantize_deadzone_fast(wc, per_channel(step_k, 1.0, cols),
                                      per_channel(phi_k, 0.0, cols),
                                      per_cand([deadzone_magnitudes(c.bits) for c in cands],
                                               0.0, cols))

    def flat(q: torch.Tensor) -> torch.Tensor:
        return q.reshape(q.shape[0], q.shape[1], n)

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
        out[g, ..., t.shape[-1]:] = 0.0
    return out


class HessianWeightBackend:
    """Evaluates weight candidates of one layer with the quadratic model (``Evaluate``), all
    groups of a batch in one product."""

    def __init__(self, sweep: GradientSweep, layer: str, bounds: Sequence[tuple[int, int]],
                 steps: ChannelSteps | None = None):
        sweep.ensure(layer)
        self.sweep, self.bounds, self.steps = sweep, bounds, steps
        weight = sweep.modules[layer].weight.detach()
        rows = sweep.rows[layer]  # (R, out, in/out)
        r = rows.shape[0]
        self.numel = [(c1 - c0) * weight[0].numel() for c0, c1 in bounds]
        # Per group, contiguous and zero-padded: its chains come back to it in every round.
        self.w = _stack_groups([weight[c0:c1].reshape(1, -1).to(rows.dtype)
                                for c0, c1 in bounds])  # (G, 1, n)
        if sweep.bias_corr:
            # -bcw shifts each output channel's bias by -(ΔW·mean input), so a weight's row
            # becomes G_w − G_b·mean: the output change of the corrected layer.
            gb, mean = sweep.bias_rows[layer], sweep.input_means[layer].to(rows.dtype)
            self.rows = _stack_groups([(rows[:, c0:c1] - gb[:, c0:c1, None] * mean[c0:c1])
                                       .reshape(r, -1) for c0, c1 in bounds])  # (G, R, n)
        else:
            self.rows = _stack_groups([rows[:, c0:c1].reshape(r, -1)
                                       for c0, c1 in bounds])  # (G, R, n)

    def __call__(self, cands: Sequence[Candidate]) -> tuple[np.ndarray, np.ndarray]:
        dist, mse = self._evaluate(cands, per_fold=False)
        return dist, mse

    def folds(self, cands: Sequence[Candidate]) -> np.ndarray:
        """Each fold's δ̂ of the candidates, ``(K, F)`` (:meth:`GradientSweep.combine`)."""
        return self._evaluate(cands, per_fold=True)[0]

    def _evaluate(self, cands: Sequence[Candidate],
                  per_fold: bool) -> tuple[np.ndarray, np.ndarray]:
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
            deltas = quantize_weights_batched(w, cands, slots, run, self.bounds,
                                              self.steps).sub_(w)  # (g, width, n)
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

    def __init__(self, sweep: GradientSweep, layer: str, bounds: Sequence[tuple[int, int]],
                 stats: ActGroupStats, steps: ChannelSteps | None = None,
                 bias_corr: bool = False):
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
        self.acts = _stack_groups([acts[..., c0:c1].reshape(n, -1)
                                   for c0, c1 in bounds]).unsqueeze(2)
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

            step = (grid(steps, 1.0) if per_channel is None
                    else self._element_steps(cands, per_channel, slots, run, a))
            # All candidates of these groups in one broadcast quantization, candidates outside
            # the group's elements so that every pass runs along n: (g, N, width, n).
            delta = quantize_uniform_fast(a, step, grid([b[0] for b in bounds], 0.0),
                                          grid([b[1] for b in bounds], 0.0)).sub_(a)
            if self.bias_corr:
                self._center(delta, slots.groups[run])
            g = delta.shape[0]
            p = torch.bmm(delta.view(g * n, slots.width, n_g),
                          self.grads[gs].view(g * n, m, n_g).transpose(1, 2))  # (g·N, width, M)
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

    def _element_steps(self, cands: Sequence[Candidate], per: np.ndarray, slots: SlotGrid,
                       run: slice, like: torch.Tensor) -> torch.Tensor:
        """The candidates' per-channel steps ``per (K, width)`` for the grid rows ``run``, on
        every element of their group (channels fastest, as stacked): ``(g, 1, width, n)``."""
        out = np.ones((run.stop - run.start, slots.width, like.shape[-1]))  # (g, width, n)
        for i, cand in enumerate(cands):
            r = int(slots.rows[i])
            if run.start <= r < run.stop:
                c0, c1 = self.bounds[cand.group]
                numel = self.numel[cand.group]  # positions × channels of the group
                out[r - run.start, slots.cols[i], :numel] = np.tile(per[i, :c1 - c0],
                                                                    numel // (c1 - c0))
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
