"""Metrics of a quantized model (DESIGN §9): top-1/top-5, output MSE, KL divergence from the FP
class distribution, W/A bits, size, BOPs.

Bits count exactly the tensors the allocation quantizes; tensors kept in full precision are listed
(``fp_weight_layers``, ``fp_act_layers``) and not charged to the average bit widths. The model size
charges quantized weights at their bits and every other parameter (biases, norms, embeddings, FP
layers) at 32 bits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rdoq.groups import find_layers, group_bounds, weight_numel
from rdoq.parts import layer_macs


@dataclass
class TensorBatches:
    """Evaluation data held in memory: ``x (N, ...)`` and labels ``y (N,)`` (None: unlabelled)."""

    x: torch.Tensor
    y: torch.Tensor | None
    batch_size: int
    source: str = "tensor"

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        for i in range(0, self.x.shape[0], self.batch_size):
            yield (self.x[i:i + self.batch_size],
                   None if self.y is None else self.y[i:i + self.batch_size])

    def __len__(self) -> int:
        return int(self.x.shape[0])


def reference_outputs(model: nn.Module, data: Iterable,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full-precision model's outputs ``(N, K)`` on ``data`` and the labels ``(N,)`` (None
    if unlabelled), kept on the CPU: computed once and shared by every evaluated allocation."""
    return _outputs(model, data, device)


def _outputs(model: nn.Module, data: Iterable,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    dtype = next(model.parameters()).dtype
    outs, labels = [], []
    with torch.no_grad():
        for x, y in data:
            # Kept in float64: the output MSE of high bit widths is far below float32's
            # resolution of the outputs.
            outs.append(model(x.to(device=device, dtype=dtype)).double().cpu())
            labels.append(y)
    lab = None if any(y is None for y in labels) else torch.cat([torch.as_tensor(y)
                                                                 for y in labels])
    return torch.cat(outs), lab  # (N, K), (N,)


def topk_scores(out: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float | None]:
    """Top-1 / top-5 in % of ``out (N, K)`` against ``labels (N,)`` (None without labels)."""
    if labels is None:
        return {"top1": None, "top5": None}
    top = out.topk(min(5, out.shape[1]), dim=1).indices  # (N, 5)
    hit = top == labels.view(-1, 1)
    n = out.shape[0]
    return {"top1": 100.0 * float(hit[:, 0].sum()) / n, "top5": 100.0 * float(hit.any(1).sum()) / n}


def evaluate(model: nn.Module, data: Iterable, ref: torch.Tensor,
             device: torch.device) -> dict[str, Any]:
    """Top-1/top-5 (% of samples; None without labels), the mean squared error of the
    outputs against ``ref`` (the FP model's outputs on the same data) and their mean KL
    divergence ``kl`` (:func:`mean_kl`)."""
    t0 = time.perf_counter()
    out, lab = _outputs(model, data, device)  # (N, K), (N,)
    if out.shape != ref.shape:
        raise ValueError(f"the data gave outputs {tuple(out.shape)}, the reference has "
                         f"{tuple(ref.shape)}; evaluate on the data the reference was made on")
    sq = float(((out - ref) ** 2).mean())
    return {**topk_scores(out, lab), "out_mse": sq, "kl": mean_kl(ref, out),
            "n_eval": int(out.shape[0]), "eval_s": time.perf_counter() - t0}


def mean_kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Mean over samples of KL(softmax(ref) ‖ softmax(out)) in nats, in float64, for logits
    ``ref, out (N, K)`` (softmax over dim 1): how far the quantized model's class distribution
    is from the full-precision one, including the classes below the top-1."""
    log_p = torch.log_softmax(ref.double(), dim=1)  # (N, K)
    log_q = torch.log_softmax(out.double(), dim=1)  # (N, K)
    return float((log_p.exp() * (log_p - log_q)).sum(1).mean())


def _prod(shape: Iterable[int]) -> int:
    return math.prod(int(s) for s in shape)


def bit_report(model: nn.Module, alloc: dict[str, Any], x1: torch.Tensor) -> dict[str, Any]:
    """W bits, A bits, size and BOPs of ``alloc`` on ``model`` (the full-precision model).

    ``x1`` is one input sample (for activation shapes and MACs). BOPs = Σ MACs × weight bits ×
    input bits over Linear/Conv2d layers, relative to 32 × 32 bits: input bits are the layer's
    allocated input bits with input-activation curves, else 32 (with output-activation curves a
    layer's input is a norm / nonlinearity of quantized values, not itself on a low-bit grid).
    """
    layers = find_layers(model)
    w_bits = w_numel = 0.0
    layer_w_bits: dict[str, float] = {}
    for name, e in alloc["weights"].items():
        bounds = group_bounds(int(e["channels"]), int(e["group_size"]))
        numel = [weight_numel(tuple(e["shape"]), b) for b in bounds]
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
    added_bias = sum(len(v) for k, v in (alloc.get("corrections") or {}).get("bcw", {}).items()
                     if getattr(modules[k], "bias", None) is None)
    size_bits += 32.0 * added_bias
    names = [layer.name for layer in layers]
    macs = layer_macs(model, x1, names)
    in_mode = alloc.get("act_mode") == "in"
    full = sum(macs.values()) * 32.0 * 32.0
    bops = sum(macs[n] * layer_w_bits.get(n, 32.0)
               * (layer_a_bits.get(n, 32.0) if in_mode else 32.0) for n in names)
    return {
        "w_bits": w_bits / w_numel if w_numel else None,
        "a_bits": a_bits / a_numel if a_numel else None,
        "avg_bits": (w_bits + a_bits) / (w_numel + a_numel),
        "w_numel": int(w_numel), "a_numel": int(a_numel),
        "size_mb": size_bits / 8e6, "fp_size_mb": 32.0 * total_params / 8e6,
        "bops_ratio": bops / full if full else None,
        "fp_weight_layers": [n for n in names if n not in alloc["weights"]],
        "fp_act_layers": sorted(set(alloc.get("fp_acts", []))
                                | {n for n in names if n not in alloc["acts"]}),
    }
