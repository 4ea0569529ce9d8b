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

Its length (about 560 lines): the settings and the sweep (memory planning, dense and sparse
gradient rows, activation captures) are one mechanism whose parts share the sweep's state; the
row algebra and the candidate back-ends live in :mod:`rdoq.grad_rows` and
:mod:`rdoq.hessian_backends`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from rdoq.backends import input_sum
from rdoq.grad_rows import per_sample_weight_grad, per_sample_weight_grad_alone
from rdoq.groups import channel_dim, is_sparse_conv
from rdoq.probe import distinct_output_numel, probe

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
    def from_flags(
        cls,
        preset: str | None,
        probe: str | None,
        kappa: float | None,
        nprobes: int = 4,
        first_order: bool = False,
        seed: int = 0,
    ) -> HessianSettings:
        """Settings from the curve scripts' flags, ``None`` = not given. A preset sets the
        probe and κ; an explicit ``--probe``/``--kappa`` alongside it must agree with the
        preset (ValueError otherwise): silently letting either win would leave one of them
        unapplied."""
        if preset is None:
            return cls(
                "random" if probe is None else probe,
                nprobes,
                0.0 if kappa is None else kappa,
                first_order,
                seed,
            )
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
        given = {"--probe": (probe, PAPER_PROBE), "--kappa": (kappa, PAPER_KAPPA)}
        clash = [
            f"{flag} {value}"
            for flag, (value, own) in given.items()
            if value is not None and value != own
        ]
        if clash:
            raise ValueError(
                f"--paper-hessian sets --probe {PAPER_PROBE} --kappa {PAPER_KAPPA:g}"
                f", which contradicts {' '.join(clash)}; drop {' and '.join(clash)}"
                f" or drop --paper-hessian"
            )
        return cls(PAPER_PROBE, nprobes, PAPER_KAPPA, first_order, seed, preset)

    def __post_init__(self) -> None:
        if self.probe not in PROBES:
            raise ValueError(f"--probe must be one of {PROBES}, got {self.probe!r}")
        if self.preset is not None and (
            self.preset not in PRESETS or (self.probe, self.kappa) != (PAPER_PROBE, PAPER_KAPPA)
        ):
            raise ValueError(
                f"preset {self.preset!r} needs probe {PAPER_PROBE!r} and kappa "
                f"{PAPER_KAPPA:g}, got {self.probe!r} and {self.kappa:g}"
            )
        if self.nprobes < 1:
            raise ValueError(f"--nprobes must be >= 1, got {self.nprobes}")
        if self.first_order and self.probe != "norm":
            raise ValueError(
                "--first-order needs --probe norm: the first-order term of a "
                "random output probe is zero in expectation"
            )
        if not math.isfinite(self.kappa) or self.kappa < 0:
            raise ValueError(f"--kappa must be a finite number >= 0, got {self.kappa}")

    @property
    def rows_per_sample(self) -> int:
        return self.nprobes if self.probe == "random" else 1

    def params(self) -> dict:
        return asdict(self)


def needs_own_pass(module: nn.Module) -> bool:
    """Whether a weight layer's rows come from :func:`per_sample_weight_grad_alone` instead of
    the sweep's batched capture: spconv layers, whose inputs and outputs are SparseConvTensors
    (active sites of all samples in one feature matrix, no sample axis to split)."""
    return is_sparse_conv(module)


class GradientSweep:
    """Per-sample gradient rows of the given layers from sweeps over the calibration set.

    ``kind="weight"``: ``rows[name] (R, out, in_per_out)``. ``kind="act"``: ``acts[name] (N, …)``
    and ``grads[name] (N, M, …)`` of the layer's output (``mode="out"``) or input (``"in"``).
    """

    def __init__(
        self,
        model: nn.Module,
        calib: torch.Tensor,
        layers: Sequence[str],
        kind: str,
        settings: HessianSettings,
        mode: str | None = None,
        batch_size: int = 16,
        mem_budget_mb: float = 2048.0,
        progress: bool = False,
        bias_corr: bool = False,
        folds: Sequence[int] | None = None,
    ):
        self.model, self.calib, self.kind, self.mode = model, calib, kind, mode
        # Cross-validation folds: the fold of each calibration sample ``(N,)``, or None. The
        # rows are per sample, so each fold's own estimate costs no extra sweep
        # (``combine(..., per_fold=True)``).
        self.fold_of: torch.Tensor | None = None
        self.n_folds = 0
        if folds is not None:
            fold_of = torch.as_tensor(np.asarray(folds, dtype=np.int64))  # (N,)
            if fold_of.shape != (calib.shape[0],) or (fold_of < 0).any():
                raise ValueError(
                    f"folds must give a fold index >= 0 for each of the "
                    f"{calib.shape[0]} calibration samples"
                )
            self.n_folds = int(fold_of.max()) + 1
            self.fold_sizes = torch.bincount(fold_of, minlength=self.n_folds)  # (F,)
            if (self.fold_sizes == 0).any():
                raise ValueError(
                    f"folds {torch.nonzero(self.fold_sizes == 0).flatten().tolist()}"
                    f" hold no calibration sample"
                )
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
            per = (
                self.modules[name].weight.numel() * m
                if kind == "weight"
                else math.prod(shapes[name]) * (m + 1)
            )
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
            log.info(
                "gradient rows of %d layers need %.0f MiB > --mem-budget-mb %.0f: %d sweeps",
                len(layers),
                sum(sizes.values()) / 2**20,
                mem_budget_mb,
                len(chunks),
            )
        self._chunks = [c for c in chunks if c]
        self.n_sweeps = len(self._chunks)
        # The forward/backward of a sweep batch must fit the budget too (the rows above are
        # held beside it): samples per batch from the per-sample working set.
        fits = max(int(budget // max(self._per_sample_bytes, 1)), 1)
        if fits < batch_size:
            log.info(
                "sweep batch %d -> %d samples: a forward/backward needs ~%.0f MiB per "
                "sample, --mem-budget-mb %.0f",
                batch_size,
                fits,
                self._per_sample_bytes / 2**20,
                mem_budget_mb,
            )
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
        """Per-sample shapes of the layers' targets (one probing forward of one sample; a
        sparse target's are its channels ``(C,)``), and the per-sample working set of a sweep
        (``_per_sample_bytes``): the tensors autograd keeps (~2× every distinct leaf output),
        the probes' gradients of every target, and the widest per-sample gradient temporary (a
        convolution's unfolded input)."""
        p = probe(self.model, self.calib, layers)
        self.out_numel = p.out_numel
        shapes: dict[str, tuple[int, ...]] = {}
        calls: dict[str, int] = {}
        sizes = {"leaves": distinct_output_numel(p), "targets": 0, "unfold": 0}
        wanted = set(layers)
        for c in p.calls:
            if c.name not in wanted:
                continue
            t = c.inp if self.mode == "in" else c.out
            shapes[c.name] = t.shape[1:] if t.kind == "sparse" else t.shape
            calls[c.name] = calls.get(c.name, 0) + 1
            sizes["targets"] += t.numel * 2
            if self.kind == "weight" and isinstance(c.module, nn.Conv2d):
                positions = c.out.numel // max(c.out.shape[0], 1)
                sizes["unfold"] = max(
                    sizes["unfold"], c.module.weight[0].numel() * c.module.groups * positions
                )
        m_rows = self.settings.rows_per_sample
        self._per_sample_bytes = self.calib.element_size() * (
            2 * sizes["leaves"] + m_rows * sizes["targets"] + 2 * sizes["unfold"]
        )
        missing = [n for n in layers if n not in shapes]
        if missing:
            raise ValueError(
                f"layers {missing} are never called in forward (their weight is "
                f"used by a parent module); the Hessian estimator cannot see them"
            )
        if self.kind == "act":
            repeated = [n for n in layers if calls[n] > 1]
            if repeated:
                raise ValueError(
                    f"layers {repeated} are called several times per forward; "
                    f"use the measured activation curves for this model"
                )
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
                self.rows[name] = torch.empty(
                    n_total * m_rows, w.shape[0], w[0].numel(), dtype=dt, device=w.device
                )  # (R, out, in/out)
                if self.bias_corr:
                    self.bias_rows[name] = torch.zeros(
                        n_total * m_rows, w.shape[0], dtype=dt, device=w.device
                    )  # (R, out)
        else:
            for name in layers:
                self.acts[name] = torch.empty(
                    n_total, *shapes[name], dtype=dt, device=self.calib.device
                )  # (N, …)
                self.grads[name] = torch.empty(
                    n_total, m_rows, *shapes[name], dtype=dt, device=self.calib.device
                )  # (N, M, …)
        # Every (sample, probe) has its own Rademacher vector, drawn up front in sample order:
        # the rows do not depend on how the sweep is batched or split.
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        probes = (
            torch.randint(0, 2, (n_total, m_rows, self.out_numel), generator=gen, dtype=torch.int8)
            if cfg.probe == "random"
            else None
        )
        captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        # Layers whose rows the batched capture below cannot give (spconv) get theirs sample by
        # sample after it (per_sample_weight_grad_alone).
        alone = [n for n in layers if needs_own_pass(self.modules[n])]
        if alone and (self.kind != "weight" or self.bias_corr):
            raise ValueError(
                f"the second-order estimator gives spconv layers {alone[:4]} plain "
                f"weight curves only (no activation curves, no -bcw)"
            )
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
            handles = [
                h
                for n in layers
                for h in (
                    self.modules[n].register_forward_pre_hook(own_input(n)),
                    self.modules[n].register_forward_hook(hook_in(n)),
                )
            ]
        else:
            handles = [self.modules[n].register_forward_hook(hook(n)) for n in layers]
        bar = tqdm(
            total=n_total * (bool(layers) + bool(alone)),
            unit="sample",
            leave=False,
            disable=not self.progress,
            desc=f"gradient sweep {self.sweeps}/{self.n_sweeps}",
        )
        try:
            # (No batched pass when every layer is swept alone.)
            for b0 in range(0, n_total if layers else 0, batch):
                captured.clear()
                x = self.calib[b0 : b0 + batch].detach().clone().requires_grad_(True)
                with torch.enable_grad():
                    y = self.model(x)
                    y = y.reshape(y.shape[0], -1)  # (B, K)
                    self.out_numel = y.shape[1]
                    targets = [t[0] if use_input else t[1] for n in layers for t in captured[n]]
                    # One forward, one backward per probe: (B, M, …) gradients of each target.
                    per_probe = []
                    for j in range(m_rows):
                        if cfg.probe == "random":
                            z = probes[b0 : b0 + y.shape[0], j].to(y) * 2 - 1  # (B, K)
                            s = (z * y).sum()
                        else:
                            s = y.norm(dim=1).sum()
                        per_probe.append(
                            torch.autograd.grad(
                                s, targets, retain_graph=j < m_rows - 1, allow_unused=True
                            )
                        )
                    grads = [
                        None if gs[0] is None else torch.stack(gs, 1)
                        for gs in zip(*per_probe, strict=True)
                    ]
                    per_probe.clear()  # the stacked copies replace them
                recording[0] = False
                self._accumulate(layers, captured, grads, b0, y.shape[0], use_input)
                recording[0] = True
                bar.update(y.shape[0])
            if alone:
                per_sample_weight_grad_alone(
                    self.model,
                    self.calib,
                    {n: self.modules[n].weight for n in alone},
                    self.rows,
                    cfg,
                    probes,
                    lambda: bar.update(1),
                )
        finally:
            bar.close()
            for h in handles:
                h.remove()
        if self.bias_corr:
            for name in layers:
                total, count = self.input_means[name]
                self.input_means[name] = total / count

    def _accumulate(
        self,
        layers: list[str],
        captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
        grads: list[torch.Tensor | None],
        b0: int,
        b: int,
        use_input: bool,
    ) -> None:
        """Store the rows of samples ``b0 … b0+b`` from each target's gradients ``(B, M, …)``."""
        m_rows = self.settings.rows_per_sample
        k = 0
        for name in layers:
            calls = captured[name]
            module = self.modules[name]
            if self.kind == "weight":
                # Row of (sample n, probe j) = n·M + j; a layer called several times per
                # forward sums its calls' gradients.
                block = self.rows[name][b0 * m_rows : (b0 + b) * m_rows]  # (B·M, out, …)
                written = False
                for (inp, _), g in zip(calls, grads[k : k + len(calls)], strict=True):
                    if g is not None:
                        per_sample_weight_grad(module, inp.detach(), g, block, written)
                        written = True
                    if self.bias_corr:
                        self._add_bias_rows(name, module, inp, g, b0, b)
                if not written:
                    block.zero_()
            else:
                (inp, out), g = calls[0], grads[k]
                self.acts[name][b0 : b0 + b] = (inp if use_input else out).detach()
                self.grads[name][b0 : b0 + b] = 0.0 if g is None else g
            k += len(calls)

    def _add_bias_rows(
        self,
        name: str,
        module: nn.Module,
        inp: torch.Tensor,
        g: torch.Tensor | None,
        b0: int,
        b: int,
    ) -> None:
        """-bcw: add this call's per-sample output-gradient sums per channel (the gradient of a
        bias shift) and its input sums (for the mean input of each weight)."""
        m_rows = self.settings.rows_per_sample
        if g is not None:
            dim = channel_dim(module)
            axis = dim + 1 if dim >= 0 else g.dim() + dim  # channel axis of (B, M, …)
            other = [a for a in range(2, g.dim()) if a != axis]
            gb = g.sum(other) if other else g  # (B, M, out)
            self.bias_rows[name][b0 * m_rows : (b0 + b) * m_rows] += gb.reshape(b * m_rows, -1)
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

    def combine(
        self, p: torch.Tensor, delta_sq: torch.Tensor | None, per_fold: bool = False
    ) -> np.ndarray:
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
