"""The measured (first-order) distortion engine and the naive evaluator (DESIGN §7).

``dist(candidate) = mean((F(X; perturbed) - F(X))²)`` over the calibration set. The naive
evaluator (:class:`NaiveEvaluator`) is the authors' algorithm: one full forward of the calibration
set per candidate. :class:`MeasuredEngine` gives the same numbers with less work:

* the calibration tensor is prepared once and kept on the device;
* the network runs only from a *cut* before the perturbed layer: the input of a block of the
  model's sequential trunk (ViT/DeiT blocks, ResNet/EfficientNet/MobileNet blocks, Swin/ConvNeXt
  stages), captured once per cut. The prefix still runs, on one all-zero dummy sample whose result
  is discarded, so no model-specific forward code is needed. Every cut is checked once against a
  full forward; a cut that does not reproduce it exactly (within float rounding) is dropped and
  the engine falls back to an earlier cut or to full forwards, and logs that it did;
* K candidates share one pass: the cut input is repeated K times along the batch axis and the
  perturbed layer computes each slot with that slot's weight (a batched matmul / a grouped conv)
  or quantizes each slot's activation group with that slot's step;
* the reference output is computed by the same slot code path and batch layout with all slots
  unperturbed, so a zero perturbation gives exactly zero distortion.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rdoq.groups import channel_dim
from rdoq.quantizers import quantize_uniform, quantize_weight, signed_bounds, unsigned_bounds
from rdoq.search import Candidate

log = logging.getLogger(__name__)

TRUNK_NAMES = ("blocks", "stages", "layers", "layer1", "layer2", "layer3", "layer4", "features")


class _StopForward(Exception):
    """Raised by a capture hook once the tensor it needs is seen."""


# ----------------------------------------------------------------------------- slot forwards
# A "slot forward" replaces a layer's computation for a batch of K*n rows laid out as K slots of n
# samples; slot k uses its own weight or its own activation quantizer.

@contextlib.contextmanager
def weight_slots(module: nn.Module, weights: torch.Tensor) -> Iterator[None]:
    """Make ``module`` compute slot k of its input with ``weights[k]``; weights: (K, *W.shape)."""
    k = weights.shape[0]
    cls_forward = type(module).forward
    if cls_forward is nn.Linear.forward:
        def forward(x: torch.Tensor) -> torch.Tensor:
            lead = x.shape[:-1]
            xk = x.reshape(k, -1, x.shape[-1])  # (K, M, in)
            out = torch.bmm(xk, weights.transpose(1, 2))  # (K, M, out)
            if module.bias is not None:
                out = out + module.bias
            return out.reshape(*lead, weights.shape[1])
    elif cls_forward is nn.Conv2d.forward and module.padding_mode == "zeros":
        def forward(x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0] // k
            xs = x.reshape(k, n, *x.shape[1:]).transpose(0, 1).reshape(n, -1, *x.shape[2:])
            w = weights.reshape(-1, *weights.shape[2:])  # (K*out, in/groups, kh, kw)
            b = module.bias.repeat(k) if module.bias is not None else None
            out = F.conv2d(xs, w, b, module.stride, module.padding, module.dilation,
                           module.groups * k)  # (n, K*out, H', W')
            out = out.reshape(n, k, -1, *out.shape[2:]).transpose(0, 1)
            return out.reshape(k * n, *out.shape[2:])
    else:
        # Any other layer class: run its own forward once per slot with the slot's weight.
        original = module.weight.data

        def forward(x: torch.Tensor) -> torch.Tensor:
            outs = []
            try:
                for i, xk in enumerate(x.chunk(k)):
                    module.weight.data = weights[i]
                    outs.append(cls_forward(module, xk))
            finally:
                module.weight.data = original
            return torch.cat(outs)
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


@dataclass
class ActSlotParams:
    """Per-slot, per-channel activation quantizer: all tensors (K, C)."""

    step: torch.Tensor
    qmin: torch.Tensor
    qmax: torch.Tensor
    mask: torch.Tensor  # True where the channel is quantized in that slot


def _quantize_slots(x: torch.Tensor, p: ActSlotParams, dim: int) -> torch.Tensor:
    k, c = p.step.shape
    xs = x.reshape(k, x.shape[0] // k, *x.shape[1:])  # (K, n, ...)
    # Broadcast (K, C) against (K, n, ...) with C on the channel axis.
    shape = [k] + [1] * (xs.dim() - 1)
    axis = dim + 1 if dim >= 0 else xs.dim() + dim
    shape[axis] = c

    def b(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(shape)

    q = quantize_uniform(xs, b(p.step), b(p.qmin), b(p.qmax))
    return torch.where(b(p.mask), q, xs).reshape(x.shape)


@contextlib.contextmanager
def act_slots(module: nn.Module, mode: str, params: ActSlotParams) -> Iterator[None]:
    """Quantize the input (``mode="in"``) or output (``"out"``) of ``module`` per slot."""
    dim = channel_dim(module)
    if mode == "out":
        handle = module.register_forward_hook(lambda m, i, o: _quantize_slots(o, params, dim))
    else:
        handle = module.register_forward_pre_hook(
            lambda m, args: (_quantize_slots(args[0], params, dim), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- engine

@dataclass(frozen=True)
class Cut:
    """Where a suffix run starts: the input of trunk element ``name`` (or its output if post)."""

    name: str
    post: bool = False

    def __str__(self) -> str:
        return f"{'output' if self.post else 'input'} of {self.name}"


def trunk_elements(model: nn.Module) -> list[str]:
    """Names of the model's sequential trunk elements, in order (blocks of ``blocks``/``stages``…).

    Nested ``nn.Sequential`` containers are flattened; a non-Sequential stage is one element.
    """
    names: list[str] = []

    def flatten(prefix: str, mod: nn.Module) -> None:
        if isinstance(mod, nn.Sequential) and len(mod) > 0:
            for child_name, child in mod.named_children():
                flatten(f"{prefix}.{child_name}", child)
        else:
            names.append(prefix)

    for name, child in model.named_children():
        if name in TRUNK_NAMES and isinstance(child, nn.Sequential | nn.ModuleList):
            for child_name, sub in child.named_children():
                flatten(f"{name}.{child_name}", sub)
    return names


class MeasuredEngine:
    """Measures output distortion of slot-batched perturbations from cached cut inputs."""

    def __init__(self, model: nn.Module, calib: torch.Tensor, max_rows: int,
                 use_cuts: bool = True):
        self.model = model.eval()
        self.calib = calib  # (N, ...) on the model's device and dtype
        self.max_rows = max(int(max_rows), 1)
        self.modules = dict(model.named_modules())
        self._ref_cache: dict[tuple[str, int], torch.Tensor] = {}
        self._cut_cache: tuple[Cut | None, torch.Tensor] | None = None
        self._valid: dict[Cut, bool] = {}
        with torch.no_grad():
            self.reference = self._full_forward(calib)  # (N, O)
        self._order = self._execution_order() if use_cuts else []
        if use_cuts and not self._order:
            log.warning("%s has no recognised sequential trunk: every candidate runs a full "
                        "forward", type(model).__name__)
        elif not use_cuts:
            log.info("prefix caching disabled: every candidate runs a full forward")

    # -- structure
    def _execution_order(self) -> list[tuple[str, str]]:
        """Events in forward order: ("cut", element) before each trunk element, "post" after the
        last, ("layer", name) at the first call of every Linear/Conv2d."""
        elements = trunk_elements(self.model)
        events: list[tuple[str, str]] = []
        handles = []
        for name in elements:
            handles.append(self.modules[name].register_forward_pre_hook(
                lambda m, a, name=name: events.append(("cut", name))))
        if elements:
            handles.append(self.modules[elements[-1]].register_forward_hook(
                lambda m, a, o: events.append(("post", elements[-1]))))
        for name, mod in self.modules.items():
            if isinstance(mod, nn.Linear | nn.Conv2d):
                handles.append(mod.register_forward_pre_hook(
                    lambda m, a, name=name: events.append(("layer", name))))
        try:
            with torch.no_grad():
                self.model(self.calib[:1])
        finally:
            for h in handles:
                h.remove()
        return events

    def cuts_before(self, layer: str) -> list[Cut]:
        """Candidate cuts for ``layer``, nearest first."""
        cuts: list[Cut] = []
        for kind, name in self._order:
            if kind == "layer" and name == layer:
                return cuts[::-1]
            if kind == "cut":
                cuts.append(Cut(name))
            elif kind == "post":
                cuts.append(Cut(name, post=True))
        return []

    def cut_for(self, layer: str) -> Cut | None:
        """The nearest valid cut before ``layer``; ``None`` means full forwards."""
        for cut in self.cuts_before(layer):
            if cut not in self._valid:
                self._valid[cut] = self._check_cut(cut)
            if self._valid[cut]:
                return cut
        return None

    # -- forwards
    def _chunks(self, rows_per_sample: int) -> list[slice]:
        n = self.calib.shape[0]
        step = max(self.max_rows // max(rows_per_sample, 1), 1)
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def _full_forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._flat(self.model(x[s])) for s in self._chunks(1)])

    @staticmethod
    def _flat(y: torch.Tensor) -> torch.Tensor:
        return y.reshape(y.shape[0], -1)

    def _capture(self, cut: Cut) -> torch.Tensor:
        """The calibration tensor at ``cut`` (N, ...)."""
        if self._cut_cache is not None and self._cut_cache[0] == cut:
            return self._cut_cache[1]
        mod = self.modules[cut.name]
        parts: list[torch.Tensor] = []

        def grab(t: torch.Tensor) -> None:
            parts.append(t.detach().clone())
            raise _StopForward

        if cut.post:
            handle = mod.register_forward_hook(lambda m, a, o: grab(o))
        else:
            handle = mod.register_forward_pre_hook(lambda m, a: grab(a[0]))
        try:
            with torch.no_grad():
                for s in self._chunks(1):
                    try:
                        self.model(self.calib[s])
                    except _StopForward:
                        pass
        finally:
            handle.remove()
        tensor = torch.cat(parts)
        self._cut_cache = (cut, tensor)
        return tensor

    @contextlib.contextmanager
    def _substitute(self, cut: Cut, value: torch.Tensor) -> Iterator[None]:
        mod = self.modules[cut.name]
        if cut.post:
            handle = mod.register_forward_hook(lambda m, a, o: value)
        else:
            handle = mod.register_forward_pre_hook(lambda m, a: (value, *a[1:]))
        try:
            yield
        finally:
            handle.remove()

    def _run_from(self, cut: Cut | None, x: torch.Tensor, k: int) -> torch.Tensor:
        """Output for inputs ``x`` (n, ...) at ``cut``, each repeated for k slots → (k*n, O)."""
        xk = x.repeat(k, *([1] * (x.dim() - 1)))  # (k*n, ...)
        if cut is None:
            return self._flat(self.model(xk))
        # The prefix runs on one all-zero dummy sample; its result is replaced at the cut.
        dummy = torch.zeros_like(self.calib[:1])
        with self._substitute(cut, xk):
            return self._flat(self.model(dummy))

    def _check_cut(self, cut: Cut) -> bool:
        with torch.no_grad():
            x = self._capture(cut)
            try:
                y = torch.cat([self._run_from(cut, x[s], 1) for s in self._chunks(1)])
            except RuntimeError as e:
                log.warning("cut at %s fails (%s); using an earlier cut", cut, e)
                return False
        ref = self.reference
        eps = torch.finfo(ref.dtype).eps
        tol = 64 * eps * float(ref.abs().max().clamp(min=1e-30))
        ok = y.shape == ref.shape and float((y - ref).abs().max()) <= tol
        if not ok:
            log.warning("cut at %s does not reproduce the full forward; using an earlier cut", cut)
        return ok

    # -- measurement
    def measure(self, layer: str, k: int,
                slots: Callable[[bool], contextlib.AbstractContextManager]) -> np.ndarray:
        """Distortion of k slot perturbations of ``layer``: (k,) float64.

        ``slots(identity)`` returns a context manager installing the slot forward of ``layer``;
        with ``identity=True`` every slot is unperturbed (used once per (layer, k) to get the
        reference through the very same code path).
        """
        cut = self.cut_for(layer)
        x = self._capture(cut) if cut is not None else self.calib
        key = (layer, k)
        if key not in self._ref_cache:
            self._ref_cache = {kk: v for kk, v in self._ref_cache.items() if kk[0] == layer}
            self._ref_cache[key] = self._pass(cut, x, k, slots(True))
        ref = self._ref_cache[key]  # (k, N, O)
        out = self._pass(cut, x, k, slots(False))  # (k, N, O)
        diff = (out - ref).double()
        return (diff * diff).mean(dim=(1, 2)).cpu().numpy()

    def _pass(self, cut: Cut | None, x: torch.Tensor, k: int,
              ctx: contextlib.AbstractContextManager) -> torch.Tensor:
        outs = []
        with torch.no_grad(), ctx:
            for s in self._chunks(k):
                y = self._run_from(cut, x[s], k)  # (k*n, O)
                outs.append(y.reshape(k, -1, y.shape[-1]))
        return torch.cat(outs, dim=1)


def pad_slots(n: int, max_batch: int) -> int:
    """Slots per pass for n candidates: the next power of two (≤ max_batch), so that a layer
    needs at most log2(max_batch)+1 reference passes."""
    return min(max_batch, 1 << max(n - 1, 0).bit_length())


# ----------------------------------------------------------------------------- back-ends

class WeightBackend:
    """Evaluates weight candidates of one layer with the measured engine."""

    def __init__(self, engine: MeasuredEngine, layer: str, bounds: Sequence[tuple[int, int]],
                 max_batch: int):
        self.engine, self.layer, self.bounds, self.max_batch = engine, layer, bounds, max_batch
        self.module = engine.modules[layer]
        self.weight = self.module.weight.detach()

    def quantized_group(self, cand: Candidate) -> torch.Tensor:
        c0, c1 = self.bounds[cand.group]
        return quantize_weight(self.weight[c0:c1], cand.bits, cand.step_log2, cand.deadzone)

    def __call__(self, cands: Sequence[Candidate]) -> tuple[np.ndarray, np.ndarray]:
        k = pad_slots(len(cands), self.max_batch)
        weights = self.weight.unsqueeze(0).repeat(k, *([1] * self.weight.dim()))  # (K, *W)
        mse = np.empty(len(cands))
        for i, cand in enumerate(cands):
            c0, c1 = self.bounds[cand.group]
            wq = self.quantized_group(cand)
            weights[i, c0:c1] = wq
            mse[i] = float(((wq - self.weight[c0:c1]).double() ** 2).mean())

        def slots(identity: bool) -> contextlib.AbstractContextManager:
            w = self.weight.unsqueeze(0).expand_as(weights).contiguous() if identity else weights
            return weight_slots(self.module, w)

        dist = self.engine.measure(self.layer, k, slots)
        return dist[: len(cands)], mse


@dataclass
class ActGroupStats:
    """Per-group statistics of a layer's calibration activations."""

    rms_log2: np.ndarray  # (G,)
    signed: np.ndarray  # (G,) bool: False when every calibration value is >= 0
    channels: int


def act_group_stats(model: nn.Module, calib: torch.Tensor, layer: str, mode: str,
                    bounds: Sequence[tuple[int, int]], rows: int) -> ActGroupStats:
    """RMS and sign of every channel group of ``layer``'s input/output over the calibration set."""
    module = dict(model.named_modules())[layer]
    dim = channel_dim(module)
    acc: dict[str, torch.Tensor] = {}

    def hook(t: torch.Tensor) -> None:
        t = t.detach().movedim(dim, -1).reshape(-1, t.shape[dim]).double()  # (rows, C)
        sq, mn = (t * t).sum(0), t.min(0).values
        if acc:
            acc["sq"] += sq
            acc["min"] = torch.minimum(acc["min"], mn)
            acc["n"] += t.shape[0]
        else:
            acc.update(sq=sq, min=mn, n=torch.tensor(t.shape[0]))

    if mode == "out":
        handle = module.register_forward_hook(lambda m, a, o: hook(o))
    else:
        handle = module.register_forward_pre_hook(lambda m, a: hook(a[0]))
    try:
        with torch.no_grad():
            for i in range(0, calib.shape[0], max(rows, 1)):
                model(calib[i:i + rows])
    finally:
        handle.remove()
    rms, signed = [], []
    for c0, c1 in bounds:
        n = float(acc["n"]) * (c1 - c0)
        r = math.sqrt(float(acc["sq"][c0:c1].sum()) / n)
        rms.append(math.log2(r) if r > 0 else -30.0)
        signed.append(bool((acc["min"][c0:c1] < 0).any()))
    return ActGroupStats(np.array(rms), np.array(signed), int(acc["sq"].shape[0]))


def act_bounds(bits: int, signed: bool) -> tuple[int, int]:
    """Integer level bounds of an activation group."""
    return signed_bounds(bits) if signed else unsigned_bounds(bits)


class ActBackend:
    """Evaluates activation candidates of one layer with the measured engine."""

    def __init__(self, engine: MeasuredEngine, layer: str, mode: str,
                 bounds: Sequence[tuple[int, int]], stats: ActGroupStats, max_batch: int):
        self.engine, self.layer, self.mode, self.bounds = engine, layer, mode, bounds
        self.stats, self.max_batch = stats, max_batch
        self.module = engine.modules[layer]

    def params(self, cands: Sequence[Candidate], k: int) -> ActSlotParams:
        dev, dt, c = self.engine.calib.device, self.engine.calib.dtype, self.stats.channels
        step = torch.ones(k, c, dtype=dt)
        qmin = torch.zeros(k, c, dtype=dt)
        qmax = torch.zeros(k, c, dtype=dt)
        mask = torch.zeros(k, c, dtype=torch.bool)
        for i, cand in enumerate(cands):
            c0, c1 = self.bounds[cand.group]
            lo, hi = act_bounds(cand.bits, bool(self.stats.signed[cand.group]))
            if cand.bits > 0:
                step[i, c0:c1] = 2.0**cand.step_log2
            qmin[i, c0:c1], qmax[i, c0:c1] = lo, hi
            mask[i, c0:c1] = True
        return ActSlotParams(step.to(dev), qmin.to(dev), qmax.to(dev), mask.to(dev))

    def __call__(self, cands: Sequence[Candidate]) -> tuple[np.ndarray, None]:
        k = pad_slots(len(cands), self.max_batch)
        params = self.params(cands, k)
        none = self.params([], k)

        def slots(identity: bool) -> contextlib.AbstractContextManager:
            return act_slots(self.module, self.mode, none if identity else params)

        dist = self.engine.measure(self.layer, k, slots)
        return dist[: len(cands)], None


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
        outs = [self.model(self.calib[i:i + self.batch_size])
                for i in range(0, self.calib.shape[0], self.batch_size)]
        return torch.cat([o.reshape(o.shape[0], -1) for o in outs])  # (N, O)

    def dist(self) -> float:
        with torch.no_grad():
            d = (self.forward() - self.reference).double()
        return float((d * d).mean())

    def weights(self, layer: str, bounds: Sequence[tuple[int, int]]) -> Callable:
        """An ``Evaluate`` for weight candidates of ``layer``."""
        module = self.modules[layer]
        weight = module.weight.detach()

        def evaluate(cands: Sequence[Candidate]) -> tuple[np.ndarray, np.ndarray]:
            dist, mse = np.empty(len(cands)), np.empty(len(cands))
            for i, cand in enumerate(cands):
                c0, c1 = bounds[cand.group]
                orig = weight[c0:c1].clone()
                wq = quantize_weight(orig, cand.bits, cand.step_log2, cand.deadzone)
                mse[i] = float(((wq - orig).double() ** 2).mean())
                with torch.no_grad():
                    weight[c0:c1] = wq
                    try:
                        dist[i] = self.dist()
                    finally:
                        weight[c0:c1] = orig
            return dist, mse

        return evaluate

    def acts(self, layer: str, mode: str, bounds: Sequence[tuple[int, int]],
             signed: np.ndarray) -> Callable:
        """An ``Evaluate`` for activation candidates of ``layer``."""
        module = self.modules[layer]
        dim = channel_dim(module)

        def quantize(t: torch.Tensor, cand: Candidate) -> torch.Tensor:
            c0, c1 = bounds[cand.group]
            lo, hi = act_bounds(cand.bits, bool(signed[cand.group]))
            step = 2.0**cand.step_log2 if cand.bits > 0 else 1.0
            t = t.clone()
            idx = [slice(None)] * t.dim()
            idx[dim] = slice(c0, c1)
            t[tuple(idx)] = quantize_uniform(t[tuple(idx)], step, lo, hi)
            return t

        def evaluate(cands: Sequence[Candidate]) -> tuple[np.ndarray, None]:
            dist = np.empty(len(cands))
            for i, cand in enumerate(cands):
                if mode == "out":
                    h = module.register_forward_hook(lambda m, a, o, c=cand: quantize(o, c))
                else:
                    h = module.register_forward_pre_hook(
                        lambda m, a, c=cand: (quantize(a[0], c), *a[1:]))
                try:
                    dist[i] = self.dist()
                finally:
                    h.remove()
            return dist, None

        return evaluate
