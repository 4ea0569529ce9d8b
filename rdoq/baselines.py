"""The uniform baseline: one bit width for every weight and every quantized activation, with a
per-channel step chosen by minimum MSE — a fair reference for RDOQ, not a strawman.

The result is an ordinary allocation (``solver="uniform"``, one group per channel), so it is
applied, evaluated and saved by the same code as the RD-optimised ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rdoq.actstats import channel_rows
from rdoq.allocfile import ALLOC_SCHEMA
from rdoq.groups import channel_dim, find_layers
from rdoq.probe import hooked_forward
from rdoq.quantizers import mse_steps

MAX_ROWS = 4096


def _rows(t: torch.Tensor, dim: int, max_rows: int) -> torch.Tensor:
    flat = channel_rows(t, dim)  # (rows, C)
    if flat.shape[0] > max_rows:
        flat = flat[:: math.ceil(flat.shape[0] / max_rows)]
    return flat


def collect_acts(
    model: nn.Module,
    calib: torch.Tensor,
    names: list[str],
    mode: str,
    batch_size: int = 64,
    max_rows: int = MAX_ROWS,
) -> dict[str, dict[str, Any]]:
    """Per layer: calibration values per channel ``(C, n)`` (at most ``max_rows`` per batch, a
    deterministic stride) and the per-sample shape of the tensor."""
    modules = dict(model.named_modules())
    found: dict[str, dict[str, Any]] = {}

    def hook(name: str):
        def record(m, a, o=None):
            t = a[0] if mode == "in" else o
            entry = found.setdefault(name, {"rows": [], "min": [], "shape": tuple(t.shape[1:])})
            dim = channel_dim(m)
            entry["rows"].append(_rows(t, dim, max_rows).double())
            # The grid's sign from every value, not only the subsample used for the steps.
            entry["min"].append(channel_rows(t, dim).min(0).values.double())

        return record

    hooks = [(modules[n], hook(n)) for n in names]
    for i in range(0, calib.shape[0], batch_size):
        if mode == "in":
            hooked_forward(model, calib[i : i + batch_size], pre=hooks)
        else:
            hooked_forward(model, calib[i : i + batch_size], post=hooks)
    return {
        n: {
            "x": torch.cat(e["rows"]).T.contiguous(),
            "min": torch.stack(e["min"]).min(0).values,
            "shape": e["shape"],
        }
        for n, e in found.items()
    }


def uniform_allocation(
    model: nn.Module,
    calib: torch.Tensor,
    w_bits: int,
    a_bits: int | None,
    act_layers: list[str],
    act_mode: str = "out",
    acts: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """An allocation with ``w_bits`` for every weight and ``a_bits`` for every activation of
    ``act_layers`` (None: activations in full precision), per-channel MSE-optimal steps.

    ``acts`` may pass :func:`collect_acts`'s result to reuse it across bit widths.
    """
    weights: dict[str, Any] = {}
    modules = dict(model.named_modules())
    w_numel = 0
    for layer in find_layers(model):
        w = modules[layer.name].weight.detach()
        c = w.shape[0]
        steps = mse_steps(w.reshape(c, -1), w_bits, torch.ones(c, dtype=torch.bool))
        weights[layer.name] = {
            "type": layer.type,
            "shape": list(layer.shape),
            "channels": c,
            "group_size": 1,
            "bits": [w_bits] * c,
            "step_log2": steps.tolist(),
            "deadzone": [0.0] * c,
        }
        w_numel += w.numel()
    act_entries: dict[str, Any] = {}
    if a_bits is not None and act_layers:
        acts = acts if acts is not None else collect_acts(model, calib, act_layers, act_mode)
        for name in act_layers:
            if name not in acts:
                continue  # never called in forward: stays in full precision
            x = acts[name]["x"]  # (C, n)
            signed = acts[name]["min"] < 0  # (C,)
            steps = mse_steps(x, a_bits, signed)
            act_entries[name] = {
                "type": type(modules[name]).__name__,
                "shape": list(acts[name]["shape"]),
                "channels": int(x.shape[0]),
                "group_size": 1,
                "bits": [a_bits] * x.shape[0],
                "step_log2": steps.tolist(),
                "signed": signed.tolist(),
            }
    skipped = [n for n in act_layers if n not in act_entries] if a_bits is not None else []
    return {
        "schema": ALLOC_SCHEMA,
        "model": None,
        "target_bits": float(w_bits),
        "solver": "uniform",
        "act_target_bits": None if a_bits is None else float(a_bits),
        "act_mode": act_mode,
        "curve_sets": {},
        "weights": weights,
        "acts": act_entries,
        "fp_acts": skipped,
        "summary": {
            "w_bits": float(w_bits),
            "a_bits": None if not act_entries else float(a_bits),
            "rate": "bits",
            "pred_dist": None,
        },
    }
