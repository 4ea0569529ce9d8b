"""Metrics of a quantized model (DESIGN §9): top-1/top-5, output MSE, KL divergence from the FP
class distribution, W/A bits, size, BOPs.

Bits count exactly the tensors the allocation quantizes; tensors kept in full precision are listed
(``fp_weight_layers``, ``fp_act_layers``) and not charged to the average bit widths. The model size
charges quantized weights at their bits and every other parameter (biases, norms, embeddings, FP
layers) at 32 bits.

BOPs charge each Linear/Conv2d input at the bits of the grid its values lie on, and say so per
layer (``bops_inputs``). With input-activation curves that is the layer's own input quantizer.
With output-activation curves it is the producer's output quantizer when the input is that output
moved, copied or selected by ops that keep values on the grid (:func:`input_sources`: views,
reshapes, permutes, ``clone``, max-pooling, dropout in eval, which returns its input), or clamped by
ReLU / ReLU6 / Hardtanh / ``clamp`` at bounds that lie on the grid. ReLU's 0 is on every grid
without a ``-bca`` offset; ReLU6's 6 is on a grid only where it is a whole number of steps from
the offset (e.g. steps of 2^-k, no offset) or beyond the grid's largest level — otherwise the
clamped values fall between grid points and the input is charged 32 bits. So is every other case:
norms, GELU, averaging, residual sums, attention, slicing (it may keep only some channel groups,
whose bits differ from the tensor's average) and any input whose provenance is unknown.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from rdoq.authors import entry_rule
from rdoq.groups import (
    entry_channel_steps,
    find_layers,
    group_bounds,
    weight_numel,
)
from rdoq.parts import layer_macs
from rdoq.probe import hooked_forward
from rdoq.quantizers import act_bounds

# Autograd nodes whose output holds only values of their one input, and keeps every channel's
# share of the elements (views, copies, transposes, max-pooling): a grid, and the average bits
# over the tensor, carry over. Names without the trailing overload number.
_GRID_MOVES = frozenset(
    {
        "ViewBackward",
        "UnsafeViewBackward",
        "ReshapeAliasBackward",
        "AliasBackward",
        "PermuteBackward",
        "TransposeBackward",
        "TBackward",
        "CloneBackward",
        "SqueezeBackward",
        "UnsqueezeBackward",
        "MaxPool2DWithIndicesBackward",
        "MaxPool3DWithIndicesBackward",
        "AdaptiveMaxPool2DBackward",
    }
)
# Result keys counting the layer inputs BOPs charge at each kind of bits (:func:`input_charges`).
BOPS_INPUT_COUNTS = ("bops_inputs_own", "bops_inputs_producer", "bops_inputs_fp32")
# The scalar fields of bit_report that go into every results row.
ROW_BIT_KEYS = (
    "w_bits",
    "a_bits",
    "avg_bits",
    "size_mb",
    "fp_size_mb",
    "bops_ratio",
    *BOPS_INPUT_COUNTS,
)
# Clamps, by exact node name: the saved attributes holding their (min, max) scalar bounds;
# ReLU is a clamp at (0, none).
_CLAMP_BOUNDS = {
    "HardtanhBackward0": ("_saved_min_val", "_saved_max_val"),
    "ClampBackward1": ("_saved_min", "_saved_max"),
}


@dataclass
class TensorBatches:
    """Evaluation data held in memory: ``x (N, ...)`` and labels ``y (N,)`` (None: unlabelled)."""

    x: torch.Tensor
    y: torch.Tensor | None
    batch_size: int
    source: str = "tensor"

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        for i in range(0, self.x.shape[0], self.batch_size):
            yield (
                self.x[i : i + self.batch_size],
                None if self.y is None else self.y[i : i + self.batch_size],
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])


# How a network is run on one batch (an adapter's ``run``); the default is ``model(x)``.
RunFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _call(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def reference_outputs(
    model: nn.Module, data: Iterable, device: torch.device, run: RunFn = _call
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full-precision model's outputs ``(N, K)`` on ``data`` (``run(model, x)`` per batch)
    and the labels ``(N,)`` (None if unlabelled), kept on the CPU: computed once and shared by
    every evaluated allocation."""
    return _outputs(model, data, device, run)


def _outputs(
    model: nn.Module, data: Iterable, device: torch.device, run: RunFn = _call
) -> tuple[torch.Tensor, torch.Tensor | None]:
    dtype = next(model.parameters()).dtype
    outs, labels = [], []
    with torch.no_grad():
        for x, y in data:
            # Kept in float64: the output MSE of high bit widths is far below float32's
            # resolution of the outputs.
            outs.append(run(model, x.to(device=device, dtype=dtype)).double().cpu())
            labels.append(y)
    lab = (
        None if any(y is None for y in labels) else torch.cat([torch.as_tensor(y) for y in labels])
    )
    return torch.cat(outs), lab  # (N, K), (N,)


def topk_scores(out: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float | None]:
    """Top-1 / top-5 in % of ``out (N, K)`` against ``labels (N,)`` (None without labels)."""
    if labels is None:
        return {"top1": None, "top5": None}
    top = out.topk(min(5, out.shape[1]), dim=1).indices  # (N, 5)
    hit = top == labels.view(-1, 1)
    n = out.shape[0]
    return {"top1": 100.0 * float(hit[:, 0].sum()) / n, "top5": 100.0 * float(hit.any(1).sum()) / n}


def evaluate(
    model: nn.Module, data: Iterable, ref: torch.Tensor, device: torch.device, run: RunFn = _call
) -> dict[str, Any]:
    """Top-1/top-5 (% of samples; None without labels), the mean squared error of the
    outputs (``run(model, x)`` per batch) against ``ref`` (the FP model's outputs on the same
    data, by the same ``run``) and their mean KL divergence ``kl`` (:func:`mean_kl`)."""
    t0 = time.perf_counter()
    out, lab = _outputs(model, data, device, run)  # (N, K), (N,)
    if out.shape != ref.shape:
        raise ValueError(
            f"the data gave outputs {tuple(out.shape)}, the reference has "
            f"{tuple(ref.shape)}; evaluate on the data the reference was made on"
        )
    sq = float(((out - ref) ** 2).mean())
    return {
        **topk_scores(out, lab),
        "out_mse": sq,
        "kl": mean_kl(ref, out),
        "n_eval": int(out.shape[0]),
        "eval_s": time.perf_counter() - t0,
    }


def mean_kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Mean over samples of KL(softmax(ref) ‖ softmax(out)) in nats, in float64, for logits
    ``ref, out (N, K)`` (softmax over dim 1): how far the quantized model's class distribution
    is from the full-precision one, including the classes below the top-1."""
    log_p = torch.log_softmax(ref.double(), dim=1)  # (N, K)
    log_q = torch.log_softmax(out.double(), dim=1)  # (N, K)
    return float((log_p.exp() * (log_p - log_q)).sum(1).mean())


def outputs(
    model: nn.Module, data: Iterable, device: torch.device, run: RunFn = _call
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Outputs ``(N, K)`` float64 of ``run(model, x)`` over ``data`` and its labels ``(N,)``
    (None without labels): what :func:`evaluate` scores, for paired comparisons."""
    return _outputs(model, data, device, run)


def paired_comparison(
    out_a: torch.Tensor,
    out_b: torch.Tensor,
    ref: torch.Tensor,
    labels: torch.Tensor | None,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """How two quantized models differ on the same samples, with the uncertainty of a finite
    evaluation set: ``out_a, out_b, ref (N, K)`` outputs of A, B and the FP model.

    - Output MSE: ``mse_diff`` = mean over samples of (A's − B's per-sample output MSE) and its
      95 % percentile-bootstrap interval ``mse_diff_ci95`` (``n_boot`` resamples of the samples,
      seeded): an interval that contains 0 does not tell A from B.
    - Top-1 (with labels): ``only_a_right`` / ``only_b_right``, the samples only one of them gets
      right, and the exact two-sided McNemar p-value ``mcnemar_p`` (binomial test on those
      discordant samples). Both assume independent samples; crops of one image are not, which
      makes both too confident.
    """
    from scipy.stats import binomtest

    if not (out_a.shape == out_b.shape == ref.shape):
        raise ValueError(
            f"outputs of different shapes: {tuple(out_a.shape)}, "
            f"{tuple(out_b.shape)}, reference {tuple(ref.shape)}"
        )
    d = (((out_a - ref) ** 2).mean(1) - ((out_b - ref) ** 2).mean(1)).double().numpy()  # (N,)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, d.shape[0], size=(n_boot, d.shape[0]))].mean(1)  # (n_boot,)
    res: dict[str, Any] = {
        "n": int(d.shape[0]),
        "mse_diff": float(d.mean()),
        "mse_diff_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
    }
    if labels is not None:
        a_ok = out_a.argmax(1) == labels  # (N,)
        b_ok = out_b.argmax(1) == labels  # (N,)
        only_a, only_b = int((a_ok & ~b_ok).sum()), int((b_ok & ~a_ok).sum())
        res.update(
            only_a_right=only_a,
            only_b_right=only_b,
            mcnemar_p=(
                float(binomtest(only_a, only_a + only_b).pvalue) if only_a + only_b else 1.0
            ),
        )
    return res


def _prod(shape: Iterable[int]) -> int:
    return math.prod(int(s) for s in shape)


@dataclass(frozen=True)
class InputSource:
    """Where a layer's input comes from (:func:`input_sources`)."""

    producer: str | None  # layer whose output reaches the input through grid-keeping ops only
    clamps: tuple[tuple[float | None, float | None], ...] = ()  # (min, max) of clamps on the way
    why: str = ""  # without a producer: why none was found


def _clamp_bounds(node: Any) -> tuple[float | None, float | None] | None:
    """``(min, max)`` of a clamp node (None: not a clamp)."""
    kind = type(node).__name__
    if kind == "ReluBackward0":
        return 0.0, None
    if kind not in _CLAMP_BOUNDS:
        return None
    lo, hi = (getattr(node, a, None) for a in _CLAMP_BOUNDS[kind])
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


def _trace(node: Any, out_node: dict[Any, str]) -> InputSource:
    """Follow an input's autograd node back through grid-keeping nodes to a layer output."""
    clamps: list[tuple[float | None, float | None]] = []
    while True:
        if node is None:
            return InputSource(None, why="the model input (no autograd history)")
        if node in out_node:
            return InputSource(out_node[node], tuple(clamps))
        kind = type(node).__name__
        bounds = _clamp_bounds(node)
        if bounds is not None:
            clamps.append(bounds)
        elif kind == "AccumulateGrad":
            return InputSource(None, why="the model input or a parameter")
        elif kind.rstrip("0123456789") not in _GRID_MOVES:
            return InputSource(None, why=f"through {kind}")
        node = node.next_functions[0][0] if node.next_functions else None


def input_sources(model: nn.Module, x1: torch.Tensor, names: list[str]) -> dict[str, InputSource]:
    """For each named layer, the named layer (if any) whose output reaches its input through
    grid-keeping ops only, and the clamps on the way (see the module docstring).

    One forward of ``x1[:1]`` with autograd on: each layer output is remembered by its autograd
    node, and each layer input's node is followed back through the nodes of those ops. The graph
    sees functional ops (``F.relu``, ``x.flatten(1)``) that module hooks cannot, and in-place
    ones: an in-place add on a conv output gives the tensor a new node, so it no longer leads to
    the conv. Any other node on the way, no autograd history, a layer never called or called on
    inputs of different sources: no producer, never a guess.
    """
    modules = dict(model.named_modules())
    out_node: dict[Any, str] = {}  # autograd node of a layer output -> the layer
    in_nodes: dict[str, list[Any]] = {n: [] for n in names}  # per layer, per call

    def pre(name: str):
        def record(mod, args):
            t = args[0] if args and isinstance(args[0], torch.Tensor) else None
            in_nodes[name].append(None if t is None else t.grad_fn)

        return record

    def post(name: str):
        def record(mod, args, out):
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                out_node[out.grad_fn] = name

        return record

    x = x1[:1].detach().clone()
    if x.is_floating_point():
        x.requires_grad_(True)  # a graph even where the parameters are frozen
    try:
        hooked_forward(
            model,
            x,
            post=[(modules[n], post(n)) for n in names],
            pre=[(modules[n], pre(n)) for n in names],
            grad=True,
        )
    except RuntimeError as e:
        # A forward that autograd refuses (e.g. in place on the input): provenance unknown.
        return {n: InputSource(None, why=f"no autograd trace ({e})") for n in names}
    sources = {}
    for n in names:
        found = {_trace(node, out_node) for node in in_nodes[n]}
        if not found:
            sources[n] = InputSource(None, why="never called (its weight is used elsewhere)")
        elif len(found) > 1:
            sources[n] = InputSource(None, why="called on inputs of different sources")
        else:
            sources[n] = found.pop()
    return sources


def clamps_keep_grid(
    entry: dict[str, Any],
    offset: list[float] | None,
    clamps: tuple[tuple[float | None, float | None], ...],
) -> bool:
    """Whether values on an activation entry's grid — per channel ``k·Δ + o`` for integer ``qmin
    ≤ k ≤ qmax``, ``o`` its ``-bca`` offset — stay on it when clamped at each ``(min, max)``:
    every bound that cuts into a channel's level range must be one of its levels."""
    if not clamps:
        return True
    channels = int(entry["channels"])
    off = np.zeros(channels) if offset is None else np.asarray(offset, dtype=np.float64)  # (C,)
    steps = np.array([2.0**v for v in entry_channel_steps(entry)])  # (C,)
    for g, (c0, c1) in enumerate(group_bounds(channels, int(entry["group_size"]))):
        bits = int(entry["bits"][g])
        if bits == 0:
            continue  # one level per channel, whatever a clamp makes of it
        step = steps[c0:c1]  # (c,)
        qmin, qmax = act_bounds(bits, bool(entry["signed"][g]))
        o = off[c0:c1]  # (c,)
        for lo, hi in clamps:
            for bound, is_min in ((lo, True), (hi, False)):
                if bound is None:
                    continue
                cuts = bound > qmin * step + o if is_min else bound < qmax * step + o  # (c,)
                k = (bound - o) / step  # (c,) the bound in steps from the offset
                # Levels are whole multiples of 2^step_log2: on the grid up to float rounding.
                on = (
                    (np.abs(k - np.round(k)) <= 1e-9 * np.maximum(1.0, np.abs(k)))
                    & (np.round(k) >= qmin)
                    & (np.round(k) <= qmax)
                )
                if np.any(cuts & ~on):
                    return False
    return True


def input_charges(
    model: nn.Module,
    alloc: dict[str, Any],
    x1: torch.Tensor,
    names: list[str],
    layer_a_bits: dict[str, float],
) -> list[dict[str, Any]]:
    """Per named layer, the input bits BOPs charge and why: ``charged`` is ``"own"`` (its input
    quantizer, input-activation curves), ``"producer"`` (the named producer's output quantizer)
    or ``"fp32"`` (32 bits; ``why`` says why). ``layer_a_bits`` are the average bits of each
    quantized activation."""
    in_mode = alloc.get("act_mode") == "in"
    offsets = (alloc.get("corrections") or {}).get("bca", {})
    sources = input_sources(model, x1, names) if alloc["acts"] and not in_mode else {}
    out = []
    for n in names:
        row = {"layer": n, "bits": 32.0, "charged": "fp32", "producer": None, "why": ""}
        src = sources.get(n)
        if in_mode:
            if n in layer_a_bits:
                row |= {"bits": layer_a_bits[n], "charged": "own", "why": "its input quantizer"}
            else:
                row["why"] = "its input is kept in full precision"
        elif src is None:
            row["why"] = "no activation is quantized"
        elif src.producer is None:
            row["why"] = src.why
        elif src.producer not in alloc["acts"]:
            row["why"] = f"the output of {src.producer} is kept in full precision"
        elif src.clamps and entry_rule(alloc["acts"][src.producer], "bca"):
            # The offset is the evaluated batch's: no fixed grid to check the clamp against.
            row["why"] = (
                f"a clamp cuts the output of {src.producer}, shifted per batch by the oracle -bca"
            )
        elif not clamps_keep_grid(
            alloc["acts"][src.producer], offsets.get(src.producer), src.clamps
        ):
            row["why"] = f"a clamp puts the output of {src.producer} between its levels"
        else:
            row |= {
                "bits": layer_a_bits[src.producer],
                "charged": "producer",
                "producer": src.producer,
                "why": "its output quantizer",
            }
        out.append(row)
    return out


def bit_report(model: nn.Module, alloc: dict[str, Any], x1: torch.Tensor) -> dict[str, Any]:
    """W bits, A bits, size and BOPs of ``alloc`` on ``model`` (the full-precision model).

    ``x1`` is one input sample (for activation shapes, MACs and input provenance). BOPs = Σ MACs
    × weight bits × input bits over Linear/Conv2d layers, relative to 32 × 32 bits, with input
    bits from :func:`input_charges`: per layer in ``bops_inputs``, counted in
    ``bops_inputs_own`` / ``bops_inputs_producer`` / ``bops_inputs_fp32``.
    """
    layers = find_layers(model)
    w_bits = w_numel = 0.0
    layer_w_bits: dict[str, float] = {}
    for name, e in alloc["weights"].items():
        bounds = group_bounds(int(e["channels"]), int(e["group_size"]))
        numel = [weight_numel(tuple(e["shape"]), b, e.get("group_axis", "out")) for b in bounds]
        bits = sum(b * n for b, n in zip(e["bits"], numel, strict=True))
        w_bits += bits
        w_numel += sum(numel)
        layer_w_bits[name] = bits / sum(numel)
    a_bits = a_numel = 0.0
    layer_a_bits: dict[str, float] = {}
    for name, e in alloc["acts"].items():
        bounds = group_bounds(int(e["channels"]), int(e["group_size"]))
        per_channel = _prod(e["shape"]) // int(e["channels"])
        numel = [(c1 - c0) * per_channel for c0, c1 in bounds]
        bits = sum(b * n for b, n in zip(e["bits"], numel, strict=True))
        a_bits += bits
        a_numel += sum(numel)
        layer_a_bits[name] = bits / sum(numel)
    total_params = sum(p.numel() for p in model.parameters())
    size_bits = w_bits + 32.0 * (total_params - w_numel)
    # -bcw creates a bias where a layer had none: charged at 32 bits.
    modules = dict(model.named_modules())
    added_bias = sum(
        len(v)
        for k, v in (alloc.get("corrections") or {}).get("bcw", {}).items()
        if getattr(modules[k], "bias", None) is None
    )
    size_bits += 32.0 * added_bias
    # The authors' affine -bcw: a per-output-channel offset on the weights (its scale joins the
    # channel's step), which no bias absorbs in general: charged at 32 bits per channel.
    size_bits += 32.0 * sum(
        int(e["shape"][0]) for e in alloc["weights"].values() if entry_rule(e, "bcw")
    )
    names = [layer.name for layer in layers]
    macs = layer_macs(model, x1, names)
    charges = input_charges(model, alloc, x1, names, layer_a_bits)
    full = sum(macs.values()) * 32.0 * 32.0
    bops = sum(macs[c["layer"]] * layer_w_bits.get(c["layer"], 32.0) * c["bits"] for c in charges)
    return {
        "w_bits": w_bits / w_numel if w_numel else None,
        "a_bits": a_bits / a_numel if a_numel else None,
        "avg_bits": (w_bits + a_bits) / (w_numel + a_numel),
        "w_numel": int(w_numel),
        "a_numel": int(a_numel),
        "size_mb": size_bits / 8e6,
        "fp_size_mb": 32.0 * total_params / 8e6,
        "bops_ratio": bops / full if full else None,
        "bops_inputs": charges,
        **{
            key: sum(c["charged"] == key.rsplit("_", 1)[1] for c in charges)
            for key in BOPS_INPUT_COUNTS
        },
        "fp_weight_layers": [n for n in names if n not in alloc["weights"]],
        "fp_act_layers": sorted(
            set(alloc.get("fp_acts", [])) | {n for n in names if n not in alloc["acts"]}
        ),
    }
