"""Hooked forwards, and the one probing forward that answers shape, cost and memory questions.

:func:`hooked_forward` runs a forward with hooks installed and always removes them. :func:`probe`
runs one forward of one sample with a hook on every leaf module (and the named ones) and records
each call (:class:`Call`): activation group shapes (:func:`rdoq.groups.act_shapes`), MACs per
layer (:func:`rdoq.parts.layer_macs`), the widest activation that sizes measured-curve batches
(:func:`rdoq.curves.max_rows_for`) and the working set of a gradient sweep
(:class:`rdoq.hessian.GradientSweep`) are all read from that record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rdoq.groups import is_sparse_tensor


def hooked_forward(
    model: nn.Module,
    x: torch.Tensor,
    post: Iterable[tuple[nn.Module, Callable]] = (),
    pre: Iterable[tuple[nn.Module, Callable]] = (),
    grad: bool = False,
) -> None:
    """One forward of ``x`` with forward (``post``) and pre-forward (``pre``) hooks installed;
    the hooks are removed whatever happens. No-grad unless ``grad`` (hooks that inspect the
    autograd graph, as BatchNorm folding does, need it)."""
    handles = [m.register_forward_pre_hook(fn) for m, fn in pre]
    handles += [m.register_forward_hook(fn) for m, fn in post]
    try:
        with torch.set_grad_enabled(grad):
            model(x)
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class Side:
    """One side (first input or output) of a module call in the probe's one-sample forward.

    ``kind`` is "tensor", "sparse" (a SparseConvTensor: its features) or "other" (a tuple, None…).
    ``shape`` is the per-sample shape: ``t.shape[1:]`` of a tensor, the features' whole
    ``(N_active, C)`` of a SparseConvTensor (it holds one frame, i.e. one sample), ``()`` for
    anything else. ``numel`` counts every element of the tensor (or features): more than
    ``prod(shape)`` where the first axis is not the sample (Swin's attention windows).
    """

    kind: str
    shape: tuple[int, ...] = ()
    numel: int = 0
    element_size: int = 0
    ptr: int = 0  # storage address of a plain tensor, to count shared storages once


def _side(t: object) -> Side:
    if isinstance(t, torch.Tensor):
        return Side("tensor", tuple(t.shape[1:]), t.numel(), t.element_size(), t.data_ptr())
    if is_sparse_tensor(t):
        f = t.features  # (N_active, C)
        return Side("sparse", tuple(f.shape), f.numel(), f.element_size())
    return Side("other")


@dataclass(frozen=True)
class Call:
    """One call of a module during the probe, in the order the forward hooks fired (a child's
    before its parent's)."""

    name: str
    module: nn.Module
    inp: Side
    out: Side


@dataclass(frozen=True)
class Probe:
    """What one forward of one sample did: every call of the hooked modules, and the size of
    the model's output."""

    calls: tuple[Call, ...]
    out_numel: int  # elements of the model output of the one sample

    def last(self, name: str) -> Call | None:
        """The last call of ``name``; None when its ``forward`` never ran (its weight is read
        by a parent, as BEiT's ``qkv``)."""
        return next((c for c in reversed(self.calls) if c.name == name), None)


def probe(model: nn.Module, x: torch.Tensor, names: Sequence[str] = ()) -> Probe:
    """Record the calls of every leaf module and of ``names`` in one no-grad forward of
    ``x[:1]``. Outputs are kept alive until the forward ends so that no storage freed during
    it is reused under an address already recorded (``Side.ptr`` identifies storages)."""
    modules = dict(model.named_modules())
    wanted = {n for n, m in modules.items() if not list(m.children())} | set(names)
    calls: list[Call] = []
    alive: list[object] = []

    def hook(name: str) -> Callable:
        def record(m: nn.Module, args: tuple, out: object) -> None:
            alive.append(out)
            calls.append(Call(name, m, _side(args[0]) if args else Side("other"), _side(out)))

        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in modules if n in wanted]
    try:
        with torch.no_grad():
            y = model(x[:1])
    finally:
        for h in handles:
            h.remove()
    out_numel = y[0].numel() if isinstance(y, torch.Tensor) else 0
    alive.clear()
    return Probe(tuple(calls), out_numel)


def distinct_output_numel(p: Probe) -> int:
    """Elements of the distinct plain-tensor outputs of the probe's calls: a storage shared by
    several outputs (an Identity, an in-place activation) counts once, at its first call."""
    seen: set[int] = set()
    total = 0
    for c in p.calls:
        if c.out.kind == "tensor" and c.out.ptr not in seen:
            seen.add(c.out.ptr)
            total += c.out.numel
    return total


def act_shapes(model: nn.Module, x: torch.Tensor, names: list[str], mode: str) -> dict[str, tuple]:
    """Per-sample shapes of the input (``mode="in"``) or output (``"out"``) of the named layers
    that are called in a forward (one hooked forward on ``x[:1]``); layers whose ``forward`` is
    never called (their weight is read by a parent, as in BEiT's ``qkv``) are absent. A sparse
    activation's shape is its features' ``(N_active, C)`` in that first sample (frame).
    """
    if mode not in ("in", "out"):
        raise ValueError(f"act_mode must be 'in' or 'out', got {mode!r}")
    p = probe(model, x, names)
    calls = {n: p.last(n) for n in names}
    return {n: (c.inp if mode == "in" else c.out).shape for n, c in calls.items() if c is not None}
