"""Apply an allocation to a model (DESIGN §9).

Weights are fake-quantized in place, group by group, with the quantizer the curves were measured
with (:func:`rdoq.quantizers.quantize_weight`). Activations go through one vectorised quantizer per
layer: per-channel step and level bounds as tensors, broadcast on the channel axis (no Python loop
over groups), installed as a forward hook (outputs) or pre-hook (inputs).

Corrections are estimated once on the *calibration* set and stored in the allocation; evaluation
never looks at the full-precision activations of the data it evaluates (the authors' ``-bca`` did):

- ``-bcw``: per output channel, the mean output error ``E[(W − Ŵ) x]`` of each weight-quantized
  layer over the calibration inputs is added to the layer's bias (a bias is created if missing).
  This is foldable into the deployed layer, unlike the paper's per-channel affine weight rescaling.
- ``-bca``: per channel, the mean quantization error ``E[a − Q(a)]`` of each quantized activation
  over the calibration set is added after the quantizer (a constant per channel, which the next
  linear operation can absorb into its bias).

With ``--authors-semantics`` (:mod:`rdoq.authors`) an allocation's entries may instead ask for the
authors' rules: the round-based dead-zone quantizer, ``-bcw`` as a per-channel affine map of
the quantized weights, and ``-bca`` as the oracle that reads the evaluated batch.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rdoq.actstats import channel_sums
from rdoq.authors import entry_rule
from rdoq.groups import (
    act_values_of,
    channel_dim,
    entry_channel_steps,
    group_bounds,
    group_view,
    map_act,
)
from rdoq.quantizers import (
    act_bounds,
    affine_bcw,
    channel_steps,
    quantize_uniform,
    quantize_weight,
)
from rdoq.store import atomic_write_bytes


def check_model(model: nn.Module, alloc: dict[str, Any], source: str = "allocation") -> None:
    """Every layer of ``alloc`` exists in ``model`` with the same type and weight shape."""
    modules = dict(model.named_modules())
    for part in ("weights", "acts"):
        for name, e in alloc[part].items():
            m = modules.get(name)
            if m is None:
                raise ValueError(
                    f"{source} (model {alloc.get('model')}) names layer {name!r}, "
                    f"which this model does not have; use the allocation of this "
                    f"model"
                )
            if type(m).__name__ != e["type"]:
                raise ValueError(
                    f"{source}: layer {name} is a {type(m).__name__} here, "
                    f"{e['type']} in the allocation"
                )
            if part == "weights" and list(m.weight.shape) != list(e["shape"]):
                raise ValueError(
                    f"{source}: layer {name} has weight shape "
                    f"{list(m.weight.shape)} here, {e['shape']} in the allocation"
                )


def quantized_weight(weight: torch.Tensor, entry: dict[str, Any]) -> torch.Tensor:
    """The fake-quantized copy of a layer's weight (float64 arithmetic, returned in its dtype).
    With a ``channel_order`` (sorted channels, :mod:`rdoq.sorting`) the groups and every
    per-group / per-channel list are of the sorted channels, which are then put back; with
    ``group_axis: "in"`` the groups gather input channels (:func:`rdoq.groups.group_view`).
    The authors' rules of the entry (``deadzone_rule``, ``bcw``) are applied as it says."""
    w = weight.detach().double()
    if entry_rule(entry, "bcw"):  # per output channel, on the quantized weight as a whole
        inner = {k: v for k, v in entry.items() if k != "bcw"}
        return affine_bcw(w, quantized_weight(w, inner)).to(weight.dtype)
    axis = entry.get("group_axis", "out")
    if axis != "out":
        inner = {k: v for k, v in entry.items() if k != "group_axis"}
        out = torch.empty_like(w)
        group_view(out, axis).copy_(quantized_weight(group_view(w, axis), inner))
        return out.to(weight.dtype)
    order = entry.get("channel_order")
    if order is not None:
        perm = torch.as_tensor(order, dtype=torch.long, device=w.device)
        unsorted = {k: v for k, v in entry.items() if k != "channel_order"}
        out = torch.empty_like(w)
        out[perm] = quantized_weight(w[perm], unsorted).double()
        return out.to(weight.dtype)
    out = torch.empty_like(w)
    bounds = group_bounds(int(entry["channels"]), int(entry["group_size"]))
    per_channel = entry.get("steps", "group") == "channel"
    authors = entry_rule(entry, "deadzone")
    for g, (c0, c1) in enumerate(bounds):
        bits = int(entry["bits"][g])
        if per_channel:  # one step and one φ per channel; the group shares its width
            steps = [math.nan if v is None else float(v) for v in entry["step_log2"][c0:c1]]
            out[c0:c1] = quantize_weight(
                w[c0:c1],
                bits,
                torch.tensor(steps, dtype=torch.float64),
                torch.tensor(entry["deadzone"][c0:c1], dtype=torch.float64),
                authors,
            )
            continue
        step = entry["step_log2"][g]
        out[c0:c1] = quantize_weight(
            w[c0:c1],
            bits,
            math.nan if step is None else float(step),
            float(entry["deadzone"][g]),
            authors,
        )
    return out.to(weight.dtype)


@dataclass
class ActQuantizer:
    """One layer's activation quantizer: per-channel tensors ``(C,)`` on the channel axis.
    With ``straight_through`` (set while :mod:`rdoq.retrain` fine-tunes) the gradient passes
    through unchanged, since ``round`` has none; the values are the same up to rounding.
    ``oracle`` (``--authors-semantics bca``): each channel's mean error ``x − Q(x)`` over the
    batch being quantized (all positions) is added back, an offset no deployed model has."""

    dim: int
    step: torch.Tensor
    qmin: torch.Tensor
    qmax: torch.Tensor
    offset: torch.Tensor | None = None
    straight_through: bool = False
    oracle: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.dim] = -1

        def b(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=x.device, dtype=x.dtype).reshape(shape)

        q = quantize_uniform(x, b(self.step), b(self.qmin), b(self.qmax))
        q = q if self.offset is None else q + b(self.offset)
        if self.oracle:
            others = [d for d in range(x.dim()) if d != self.dim % x.dim()]
            q = q + (x - q).mean(dim=others, keepdim=True)
        return x + (q - x).detach() if self.straight_through else q

    def state(self) -> dict[str, torch.Tensor | int]:
        s = {"dim": self.dim, "step": self.step, "qmin": self.qmin, "qmax": self.qmax}
        s |= {"oracle": 1} if self.oracle else {}
        return s | ({"offset": self.offset} if self.offset is not None else {})


def act_quantizer(
    module: nn.Module, entry: dict[str, Any], offset: list[float] | None = None
) -> ActQuantizer:
    """The vectorised quantizer of one activation entry of an allocation."""
    c = int(entry["channels"])
    steps = entry_channel_steps(entry)  # (C,) log2, one per group's channel or per channel
    per_channel = entry.get("steps", "group") == "channel"
    step = torch.ones(c, dtype=torch.float64)  # (C,)
    qmin = torch.zeros(c, dtype=torch.float64)  # (C,)
    qmax = torch.zeros(c, dtype=torch.float64)  # (C,)
    for g, (c0, c1) in enumerate(group_bounds(c, int(entry["group_size"]))):
        bits = int(entry["bits"][g])
        lo, hi = act_bounds(bits, bool(entry["signed"][g]))
        if bits > 0:
            # The curves' arithmetic: exp2 per channel, 2**x for a group's one step.
            step[c0:c1] = (
                channel_steps(torch.tensor(steps[c0:c1], dtype=torch.float64))
                if per_channel
                else 2.0 ** steps[c0]
            )
        qmin[c0:c1], qmax[c0:c1] = lo, hi
    off = torch.tensor(offset, dtype=torch.float64) if offset is not None else None
    oracle = entry_rule(entry, "bca")
    if oracle and off is not None:
        raise ValueError("an entry with the authors' oracle -bca cannot also take -bca offsets")
    # On the layer's device and dtype once, not at every forward.
    w = module.weight
    return ActQuantizer(
        channel_dim(module),
        *(
            t.to(device=w.device, dtype=w.dtype) if t is not None else None
            for t in (step, qmin, qmax, off)
        ),
        oracle=oracle,
    )


def install_act_quantizers(
    model: nn.Module, quantizers: dict[str, ActQuantizer], mode: str
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook each quantizer on its layer's output (``mode="out"``) or input (``"in"``) (a
    ``SparseConvTensor``'s features for spconv layers)."""
    if mode not in ("in", "out"):
        raise ValueError(f"act_mode must be 'in' or 'out', got {mode!r}")
    modules = dict(model.named_modules())
    handles = []
    for name, q in quantizers.items():
        m = modules[name]
        if mode == "out":
            handles.append(m.register_forward_hook(lambda mod, a, o, q=q: map_act(o, q)))
        else:
            handles.append(
                m.register_forward_pre_hook(lambda mod, a, q=q: (map_act(a[0], q), *a[1:]))
            )
    return handles


def remove_act_quantizers(model: nn.Module) -> None:
    """Remove the activation quantizers :func:`apply_allocation` or :func:`load_quantized`
    hooked on ``model`` (e.g. before applying the next allocation to the same model in place)."""
    for handle in model.__dict__.pop("rdoq_act_handles", []):
        handle.remove()
    model.__dict__.pop("rdoq_act_quantizers", None)


def _weight_error(module: nn.Module, x: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """``module(x; W) − module(x; Ŵ)`` through the module's own forward (so weight
    standardisation, dynamic padding etc. of Conv2d/Linear subclasses are honoured)."""
    weight = module.weight
    with torch.no_grad():
        y = type(module).forward(module, x)
        orig = weight.data.clone()
        weight.data.copy_(wq)
        try:
            y_q = type(module).forward(module, x)
        finally:
            weight.data.copy_(orig)
    # A sparse layer: the same input sites give the same output sites, row for row.
    return act_values_of(y) - act_values_of(y_q)


def _calib_passes(
    model: nn.Module,
    calib: torch.Tensor,
    batch_size: int,
    hooks: list[tuple[nn.Module, str, Callable]],
) -> None:
    handles = []
    for m, where, fn in hooks:
        if where == "pre":
            handles.append(m.register_forward_pre_hook(lambda mod, a, fn=fn: fn(mod, a[0])))
        else:
            handles.append(m.register_forward_hook(lambda mod, a, o, fn=fn: fn(mod, o)))
    try:
        with torch.no_grad():
            for i in range(0, calib.shape[0], batch_size):
                model(calib[i : i + batch_size])
    finally:
        for h in handles:
            h.remove()


def estimate_corrections(
    model: nn.Module,
    alloc: dict[str, Any],
    calib: torch.Tensor,
    *,
    bcw: bool,
    bca: bool,
    batch_size: int = 32,
) -> dict[str, Any]:
    """``-bcw`` / ``-bca`` offsets per layer and channel, from the FP model on ``calib``.

    Returns ``{"bcw": {layer: [C_out]}, "bca": {layer: [C]}}`` (only the requested ones).
    Layers whose forward is never called (their weight is read by a parent) get no offset.
    """
    modules = dict(model.named_modules())
    sums: dict[tuple[str, str], list] = {}
    hooks: list[tuple[nn.Module, str, Callable]] = []

    def accumulate(key: tuple[str, str], t: torch.Tensor, dim: int) -> None:
        s, n = channel_sums(t, dim)
        if key in sums:
            sums[key][0] += s
            sums[key][1] += n
        else:
            sums[key] = [s, n]

    if bcw:
        for name, e in alloc["weights"].items():
            m = modules[name]
            wq = quantized_weight(m.weight, e)

            def f(mod, x, name=name, wq=wq):
                accumulate(("bcw", name), _weight_error(mod, x, wq), channel_dim(mod))

            hooks.append((m, "pre", f))
    if bca:
        mode = alloc.get("act_mode")
        for name, e in alloc["acts"].items():
            m = modules[name]
            q = act_quantizer(m, e)

            def g(mod, t, name=name, q=q):
                a = act_values_of(t)
                accumulate(("bca", name), a - q(a), channel_dim(mod))

            hooks.append((m, "pre" if mode == "in" else "post", g))
    _calib_passes(model, calib, batch_size, hooks)
    out: dict[str, Any] = {}
    for kind, flag in (("bcw", bcw), ("bca", bca)):
        if flag:
            out[kind] = {name: (s / n).tolist() for (k, name), (s, n) in sums.items() if k == kind}
    return out


def apply_allocation(model: nn.Module, alloc: dict[str, Any], in_place: bool = False) -> nn.Module:
    """A copy of ``model`` (or ``model`` itself) with the allocation applied: weights
    fake-quantized, ``-bcw`` biases added, activation quantizers (with ``-bca`` offsets) hooked.

    The quantizers are kept on the returned model as ``model.rdoq_act_quantizers``.
    """
    check_model(model, alloc)
    q_model = model if in_place else copy.deepcopy(model)
    modules = dict(q_model.named_modules())
    corr = alloc.get("corrections") or {}
    with torch.no_grad():
        for name, e in alloc["weights"].items():
            m = modules[name]
            m.weight.copy_(quantized_weight(m.weight, e))
            shift = corr.get("bcw", {}).get(name)
            if shift is not None:
                shift = torch.tensor(shift, dtype=m.weight.dtype, device=m.weight.device)
                if m.bias is None:
                    m.bias = nn.Parameter(torch.zeros_like(shift))
                m.bias.add_(shift)
    quantizers = {
        name: act_quantizer(modules[name], e, corr.get("bca", {}).get(name))
        for name, e in alloc["acts"].items()
    }
    if "rdoq_act_handles" in q_model.__dict__:
        raise ValueError(
            "the model already has activation quantizers of an earlier allocation "
            "hooked on it; call rdoq.apply.remove_act_quantizers(model) first"
        )
    q_model.rdoq_act_handles = (
        install_act_quantizers(q_model, quantizers, alloc.get("act_mode") or "out")
        if quantizers
        else []
    )
    q_model.rdoq_act_quantizers = quantizers
    return q_model


def save_quantized(path: Path, q_model: nn.Module, alloc: dict[str, Any]) -> None:
    """``--save-model``: the fake-quantized state dict, the activation quantizers (per-channel
    step, level bounds and offsets) and the allocation, loadable with ``weights_only=True``."""
    quant = getattr(q_model, "rdoq_act_quantizers", {})
    blob = {
        "state_dict": q_model.state_dict(),
        "act_quantizers": {n: q.state() for n, q in quant.items()},
        "act_mode": alloc.get("act_mode"),
        "allocation": json.dumps(alloc),
    }
    atomic_write_bytes(path, lambda f: torch.save(blob, f))


def load_quantized(path: Path, model: nn.Module) -> nn.Module:
    """Load a ``--save-model`` file into ``model`` (same architecture): weights and biases, and
    the activation quantizers re-installed. Returns ``model``."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = blob["state_dict"]
    modules = dict(model.named_modules())
    for key in state:
        mod_name, _, attr = key.rpartition(".")
        m = modules.get(mod_name)
        if attr == "bias" and m is not None and getattr(m, "bias", 0) is None:
            m.bias = nn.Parameter(torch.zeros_like(state[key]))
    model.load_state_dict(state)
    quantizers = {}
    for name, s in blob["act_quantizers"].items():
        quantizers[name] = ActQuantizer(
            int(s["dim"]),
            s["step"],
            s["qmin"],
            s["qmax"],
            s.get("offset"),
            oracle=bool(s.get("oracle")),
        )
    remove_act_quantizers(model)
    model.rdoq_act_handles = (
        install_act_quantizers(model, quantizers, blob.get("act_mode") or "out")
        if quantizers
        else []
    )
    model.rdoq_act_quantizers = quantizers
    return model.eval()
