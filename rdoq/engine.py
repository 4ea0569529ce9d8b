"""The measured (first-order) distortion engine (DESIGN §7); its slot forwards are in
:mod:`rdoq.slots`, the per-layer back-ends in :mod:`rdoq.backends`, the naive evaluator it is
checked against in :mod:`rdoq.naive`.

``dist(candidate) = mean((F(X; perturbed) - F(X))²)`` over the calibration set. The naive
evaluator (:class:`rdoq.naive.NaiveEvaluator`) is the authors' algorithm: one full forward of the
calibration set per candidate. :class:`MeasuredEngine` gives the same numbers with less work:

* the calibration tensor is prepared once and kept on the device;
* the network runs only from a *cut* before the perturbed layer: the input of a block of the
  model's sequential trunk (ViT/DeiT blocks, ResNet/EfficientNet/MobileNet blocks, Swin/ConvNeXt
  stages), captured once per cut. Trunk elements before the cut return zeros of their output
  shape instead of computing, the rest of the prefix (the stem) runs on an empty or one-row
  batch, and the cut substitutes the cached input: no model-specific forward code is needed.
  Every cut is checked once against a full forward; one that does not reproduce it (up to float
  rounding) is dropped, and the engine falls back to an earlier cut or to full forwards and logs
  that it did;
* inside the cut element, children that finish before the perturbed layer starts are replayed
  from the capture (exact by causality);
* K candidates can share one pass (the GPU default): the cut input is repeated K times along the
  batch axis and the perturbed layer computes each slot with that slot's weight (one matmul /
  conv with the K weights stacked) or quantizes each slot's activation group with its own step;
* the reference output is computed by the same slot code path and batch layout with all slots
  unperturbed, so a zero perturbation gives exactly zero distortion.

The prefix cache patches the model for the length of one pass over one chunk of calibration rows
(:meth:`MeasuredEngine._install`, given that :class:`Chunk` explicitly); model-agnostic skipping
of the prefix needs hooks and ``forward`` replacement, so these are its invariants:

1. Every patch (a replaced ``forward``, a hook) exists only inside one ``with`` block for one
   chunk and is removed on exit, exceptions included; nothing of it outlives the pass.
2. A trunk element before the cut returns zeros of its recorded per-sample output shape, with
   ``_dummy_rows`` rows (0, or 1 for models that cannot take an empty batch). Those values never
   reach the output: the cut replaces its input (or, for a post cut, its output) with the cached
   calibration tensor of the chunk's rows, repeated for the chunk's ``k`` slots.
3. A replayed child finishes before the perturbed layer starts, runs once per forward and returns
   one tensor whose first axis is the sample, so its cached output is what it would compute.
4. A cut is used only after a pass through it reproduced the full-forward reference on every
   calibration row (up to 1000 ulp of the output's largest magnitude); every (layer, k)
   identity pass is compared with the reference too, and a mismatch drops replay, then the cut,
   for that layer.
5. Capturing at a cut ends each forward early by raising ``_StopForward`` from a hook at the
   stop module: the only exception used for control flow, caught in ``_capture`` alone.

Its length (about 520 lines): the cut and replay planning, the capture, the per-chunk install
and the checks of invariant 4 are one mechanism over shared caches.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rdoq.probe import hooked_forward
from rdoq.slots import patched_forward

log = logging.getLogger(__name__)

TRUNK_NAMES = ("blocks", "stages", "layers", "layer1", "layer2", "layer3", "layer4", "features")


class _StopForward(Exception):
    """Raised by a capture hook once the tensor it needs is seen."""


@dataclass(frozen=True)
class Chunk:
    """One forward of a pass: calibration rows ``rows``, each repeated for ``k`` slots."""

    rows: slice
    k: int


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
    """Measures output distortion of slot-batched perturbations from cached cut inputs.

    For a layer inside trunk element ``e`` the engine also *replays* the children of ``e`` that
    finish before the layer starts (attention before an MLP layer, the first convs of a residual
    block): they return their cached calibration outputs instead of recomputing them. This is
    exact by causality — nothing that runs before the perturbed layer can see the perturbation —
    and the identity reference of every layer is checked against a plain full forward.
    """

    def __init__(
        self,
        model: nn.Module,
        calib: torch.Tensor,
        max_rows: int,
        use_cuts: bool = True,
        folds: Sequence[int] | None = None,
    ):
        self.model = model.eval()
        self.calib = calib  # (N, ...) on the model's device and dtype
        # Calibration folds (the fold of each sample, (N,)) for per-fold distortions of the
        # chosen points (rdoq.curves.fold_curves); None: none.
        self.fold_of = None if folds is None else np.asarray(folds, dtype=np.int64)
        self.max_rows = max(int(max_rows), 1)
        self.modules = dict(model.named_modules())
        self.use_cuts = use_cuts
        self._ref_cache: dict[tuple[str, int], torch.Tensor] = {}
        self._capture_cache: tuple[tuple, dict[str, torch.Tensor]] | None = None
        self._valid: dict[Cut, bool] = {}
        self._traces: dict[str, list[tuple[str, str, bool]]] = {}
        self._no_replay: set[str] = set()
        self._no_cut: set[str] = set()
        self._slot_ok: dict[str, bool] = {}
        self._dummy_rows = 0
        # Seconds spent per activity, for the benchmark's breakdown.
        self.seconds = {"capture": 0.0, "cut_check": 0.0, "reference": 0.0, "candidates": 0.0}
        self.passes = {"reference": 0, "candidates": 0}
        with torch.no_grad():
            self.reference = self._full_forward()  # (N, O)
        self._order, self._calls = self._execution_order()
        if use_cuts and not any(kind == "cut" for kind, _ in self._order):
            log.warning(
                "%s has no recognised sequential trunk: every candidate runs a full forward",
                type(model).__name__,
            )
        elif not use_cuts:
            log.info("prefix caching disabled: every candidate runs a full forward")

    # -- structure
    def _execution_order(self) -> tuple[list[tuple[str, str]], dict[str, int]]:
        """Events in forward order: ("cut", element) before each trunk element, "post" after the
        last, ("layer", name) at the first call of every Linear/Conv2d; and call counts."""
        elements = trunk_elements(self.model)
        self._elements = elements
        self._element_shapes: dict[str, tuple[int, ...]] = {}
        events: list[tuple[str, str]] = []
        calls: dict[str, int] = {}

        def cut(name: str) -> Callable:
            return lambda m, a: events.append(("cut", name))

        def shape_of(name: str) -> Callable:
            def record(m, a, o):
                if isinstance(o, torch.Tensor):
                    self._element_shapes[name] = tuple(o.shape[1:])

            return record

        def count(name: str) -> Callable:
            def record(m, a):
                calls[name] = calls.get(name, 0) + 1
                if calls[name] == 1:
                    events.append(("layer", name))

            return record

        # Pre-hooks fire in registration order: a trunk element's cut comes before its layer.
        pre = [(self.modules[n], cut(n)) for n in elements]
        pre += [
            (m, count(n)) for n, m in self.modules.items() if isinstance(m, nn.Linear | nn.Conv2d)
        ]
        post = [(self.modules[n], shape_of(n)) for n in elements]
        if elements:
            post.append(
                (self.modules[elements[-1]], lambda m, a, o: events.append(("post", elements[-1])))
            )
        hooked_forward(self.model, self.calib[:1], post=post, pre=pre)
        return events, calls

    def cuts_before(self, layer: str) -> list[Cut]:
        """Candidate cuts for ``layer``, nearest first."""
        if not self.use_cuts:
            return []
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
        if layer in self._no_cut or not self.slot_forward_ok(layer):
            return None
        for cut in self.cuts_before(layer):
            if cut not in self._valid:
                self._valid[cut] = self._check_cut(cut, layer)
            if self._valid[cut]:
                return cut
        return None

    def replayed(self, cut: Cut | None, layer: str) -> list[str]:
        """Children of the cut element that finish before ``layer`` starts (maximal ones, called
        once, returning one tensor): their outputs are replayed from the capture."""
        if cut is None or cut.post or layer in self._no_replay:
            return []
        if cut.name not in self._traces:
            self._traces[cut.name] = self._trace(cut.name)
        events = self._traces[cut.name]
        start = next(
            (i for i, (kind, name, _) in enumerate(events) if kind == "pre" and name == layer), None
        )
        if start is None:
            return []
        pre_count: dict[str, int] = {}
        for kind, name, _ in events:
            if kind == "pre":
                pre_count[name] = pre_count.get(name, 0) + 1
        done = {
            name
            for kind, name, is_tensor in events[:start]
            if kind == "post" and is_tensor and pre_count.get(name) == 1
        }
        return [
            n for n in done if n.rsplit(".", 1)[0] not in done and not layer.startswith(n + ".")
        ]

    def _trace(self, element: str) -> list[tuple[str, str, bool]]:
        """Pre/post events of every descendant of ``element`` in one forward; a post event is
        marked replayable when the output is one tensor whose first axis is the sample axis
        (not, e.g., Swin's attention windows)."""
        events: list[tuple[str, str, bool]] = []
        x = self.calib[:2]

        def before(name: str) -> Callable:
            return lambda m, a: events.append(("pre", name, False))

        def after(name: str) -> Callable:
            return lambda m, a, o: events.append(
                (
                    "post",
                    name,
                    isinstance(o, torch.Tensor) and o.dim() > 0 and o.shape[0] == x.shape[0],
                )
            )

        inside = [(n, m) for n, m in self.modules.items() if n.startswith(element + ".")]
        hooked_forward(
            self.model,
            x,
            post=[(m, after(n)) for n, m in inside],
            pre=[(m, before(n)) for n, m in inside],
        )
        return events

    # -- forwards
    def _chunks(self, k: int) -> list[Chunk]:
        """The forwards of a pass with k slots: at most ``max_rows`` rows each."""
        n = self.calib.shape[0]
        step = max(self.max_rows // max(k, 1), 1)
        return [Chunk(slice(i, min(i + step, n)), k) for i in range(0, n, step)]

    def _full_forward(self) -> torch.Tensor:
        return torch.cat([self._flat(self.model(self.calib[c.rows])) for c in self._chunks(1)])

    @staticmethod
    def _flat(y: torch.Tensor) -> torch.Tensor:
        return y.reshape(y.shape[0], -1)

    def _capture(self, cut: Cut, replay: list[str], until: str | None) -> dict[str, torch.Tensor]:
        """Calibration tensors at ``cut`` (key "") and outputs of the ``replay`` modules."""
        key = (cut, tuple(replay))
        if self._capture_cache is not None and self._capture_cache[0] == key:
            return self._capture_cache[1]
        t0 = time.perf_counter()
        parts: dict[str, list[torch.Tensor]] = {"": [], **{n: [] for n in replay}}
        stop = self.modules[until if replay and until else cut.name]

        def grab(name: str, t: torch.Tensor) -> None:
            parts[name].append(t.detach().clone())

        handles = []
        mod = self.modules[cut.name]
        if cut.post:
            handles.append(mod.register_forward_hook(lambda m, a, o: grab("", o)))
        else:
            handles.append(mod.register_forward_pre_hook(lambda m, a: grab("", a[0])))
        for name in replay:
            handles.append(
                self.modules[name].register_forward_hook(lambda m, a, o, name=name: grab(name, o))
            )

        def halt(*_):
            raise _StopForward

        handles.append(
            stop.register_forward_hook(halt)
            if cut.post and stop is mod
            else stop.register_forward_pre_hook(halt)
        )
        try:
            with torch.no_grad():
                for c in self._chunks(1):
                    try:
                        self.model(self.calib[c.rows])
                    except _StopForward:
                        pass
        finally:
            for h in handles:
                h.remove()
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        self._capture_cache = (key, tensors)
        self.seconds["capture"] += time.perf_counter() - t0
        return tensors

    @contextlib.contextmanager
    def _install(
        self, cut: Cut | None, cached: dict[str, torch.Tensor], replay: list[str], chunk: Chunk
    ) -> Iterator[None]:
        """Substitute the cut input and the replayed modules' outputs for one chunk's forward
        (invariants 1-3 of the module docstring)."""
        # The chunk's rows of each substituted tensor, repeated for its k slots.
        subst = {}
        for name in ([""] if cut is not None else []) + replay:
            rows = cached[name][chunk.rows]
            subst[name] = rows.repeat(chunk.k, *([1] * (rows.dim() - 1)))
        with contextlib.ExitStack() as stack:
            if cut is not None:
                # Trunk elements before the cut are not computed: their outputs are replaced.
                stop = self._elements.index(cut.name) + (1 if cut.post else 0)
                for name in self._elements[:stop]:
                    if name in self._element_shapes and name not in replay:
                        zeros = self.calib.new_zeros(
                            (self._dummy_rows, *self._element_shapes[name])
                        )
                        stack.enter_context(
                            patched_forward(self.modules[name], lambda *a, zeros=zeros, **kw: zeros)
                        )
                mod = self.modules[cut.name]
                handle = (
                    mod.register_forward_hook(lambda m, a, o: subst[""])
                    if cut.post
                    else mod.register_forward_pre_hook(lambda m, a: (subst[""], *a[1:]))
                )
                stack.callback(handle.remove)
            for name in replay:
                stack.enter_context(
                    patched_forward(self.modules[name], lambda *a, name=name, **kw: subst[name])
                )
            yield

    def _run(
        self, cut: Cut | None, cached: dict[str, torch.Tensor], replay: list[str], chunk: Chunk
    ) -> torch.Tensor:
        """Output for the chunk's calibration rows, each repeated for its k slots → (k*n, O)."""
        if cut is None:
            x = self.calib[chunk.rows]
            with self._install(None, cached, replay, chunk):
                return self._flat(self.model(x.repeat(chunk.k, *([1] * (x.dim() - 1)))))
        # The prefix runs on an empty batch (one zero sample where a model cannot take an empty
        # batch); its result is replaced at the cut.
        with self._install(cut, cached, replay, chunk):
            return self._flat(self.model(torch.zeros_like(self.calib[: self._dummy_rows])))

    def _check_cut(self, cut: Cut, layer: str) -> bool:
        t0 = time.perf_counter()
        y = None
        while y is None:
            try:
                # Capture what the layer's passes will need: the check costs no extra capture.
                cached = self._capture(cut, self.replayed(cut, layer), layer)
                with torch.no_grad():
                    y = torch.cat([self._run(cut, cached, [], c) for c in self._chunks(1)])
            except Exception as e:  # noqa: BLE001 - a cut that fails in any way is not used
                if self._dummy_rows == 0:
                    self._dummy_rows = 1
                    continue
                log.warning("cut at %s fails (%s); using an earlier cut", cut, e)
                return False
        ok = self._close(y)
        self.seconds["cut_check"] += time.perf_counter() - t0
        if not ok:
            log.warning("cut at %s does not reproduce the full forward; using an earlier cut", cut)
        return ok

    def _close(self, y: torch.Tensor) -> bool:
        """Whether ``y`` equals the full-forward reference up to float rounding."""
        ref = self.reference
        tol = 1000 * torch.finfo(ref.dtype).eps * float(ref.abs().max().clamp(min=1e-30))
        return y.shape == ref.shape and float((y - ref).abs().max()) <= tol

    def shares_input(self, layer: str) -> bool:
        """Whether every slot sees the same input at ``layer`` (it runs once per forward)."""
        return self._calls.get(layer, 0) == 1

    def slot_forward_ok(self, layer: str) -> bool:
        """Whether replacing the layer's forward perturbs every use of its weight: it runs once
        per forward and no other module holds the same weight. Otherwise (e.g. BEiT/EVA read
        ``qkv.weight`` inside the attention's own forward; tied weights) the engine swaps the
        parameter in place and runs full forwards, one candidate at a time. So it does for
        every layer of a model that runs each sample alone (``batches_samples`` False, e.g.
        :class:`rdoq.adapters.sparse.FrameRunner`): there a layer call holds one sample, not the
        K slots the slot forwards split the batch into."""
        if layer not in self._slot_ok:
            weight = getattr(self.modules[layer], "weight", None)
            holders = [
                n
                for n, m in self.modules.items()
                if any(p is weight for p in m.parameters(recurse=False))
            ]
            self._slot_ok[layer] = (
                getattr(self.model, "batches_samples", True)
                and self._calls.get(layer, 0) == 1
                and holders == [layer]
            )
        return self._slot_ok[layer]

    # -- measurement
    def measure(
        self,
        layer: str,
        k: int,
        slots: Callable[[bool], contextlib.AbstractContextManager],
        per_fold: bool = False,
    ) -> np.ndarray:
        """Distortion of k slot perturbations of ``layer``: (k,) float64, or with
        ``per_fold`` each calibration fold's own, (k, F) (their mean weighted by the fold
        sizes is the former).

        ``slots(identity)`` returns a context manager installing the slot forward of ``layer``;
        with ``identity=True`` every slot is unperturbed (used once per (layer, k) to get the
        reference through the very same code path and batch layout).
        """
        key = (layer, k)
        if key not in self._ref_cache:
            self._ref_cache = {kk: v for kk, v in self._ref_cache.items() if kk[0] == layer}
            t0 = time.perf_counter()
            self._ref_cache[key] = self._reference_for(layer, k, slots)
            self.seconds["reference"] += time.perf_counter() - t0
            self.passes["reference"] += 1
        ref = self._ref_cache[key]  # (k, N, O)
        t0 = time.perf_counter()
        out = self._pass(layer, k, slots(False))  # (k, N, O)
        self.seconds["candidates"] += time.perf_counter() - t0
        self.passes["candidates"] += 1
        diff = (out - ref).double()
        if not per_fold:
            return (diff * diff).mean(dim=(1, 2)).cpu().numpy()
        if self.fold_of is None:
            raise ValueError("this engine was made without calibration folds")
        per_sample = (diff * diff).mean(dim=2).cpu().numpy()  # (k, N)
        n_folds = int(self.fold_of.max()) + 1
        sums = np.zeros((k, n_folds))
        np.add.at(sums.T, self.fold_of, per_sample.T)
        return sums / np.bincount(self.fold_of, minlength=n_folds)  # (k, F)

    def _reference_for(self, layer: str, k: int, slots) -> torch.Tensor:
        # The identity pass must match a plain full forward; if replay or the cut ever broke
        # that, drop them for this layer rather than report wrong curves.
        for fallback in (None, self._no_replay, self._no_cut):
            if fallback is not None:
                fallback.add(layer)
                # Cached references and captures of this layer used the abandoned path.
                self._ref_cache = {kk: v for kk, v in self._ref_cache.items() if kk[0] != layer}
                self._capture_cache = None
                log.warning(
                    "layer %s: the identity pass differs from the full forward; "
                    "retrying without %s",
                    layer,
                    "replay" if fallback is self._no_replay else "the cut",
                )
            try:
                ref = self._pass(layer, k, slots(True))
            except Exception as e:  # noqa: BLE001 - any failure of a shortcut means: drop it
                log.warning("layer %s: the identity pass fails (%s)", layer, e)
                continue
            if all(self._close(ref[i]) for i in range(k)):
                return ref
        raise RuntimeError(
            f"layer {layer}: the engine cannot reproduce the model's output "
            f"even with full forwards; please report this model"
        )

    def _pass(self, layer: str, k: int, ctx: contextlib.AbstractContextManager) -> torch.Tensor:
        cut = self.cut_for(layer)
        replay = self.replayed(cut, layer)
        cached = self._capture(cut, replay, layer) if cut is not None else {}
        outs = []
        with torch.no_grad(), ctx:
            for chunk in self._chunks(k):
                y = self._run(cut, cached, replay, chunk)  # (k*n, O)
                outs.append(y.reshape(k, -1, y.shape[-1]))
        return torch.cat(outs, dim=1)
