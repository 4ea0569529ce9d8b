"""The uniform baseline: one bit width for every weight and every quantized activation, with a
per-channel step chosen by minimum MSE — a fair reference for RDOQ, not a strawman.

The result is an ordinary allocation (``solver="uniform"``, one group per channel), so it is
applied, evaluated and saved by the same code as the RD-optimised ones.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from rdoq.allocation import ALLOC_SCHEMA
from rdoq.groups import channel_dim, find_layers, hooked_forward
from rdoq.quantizers import quantize_uniform, signed_bounds, unsigned_bounds

# Step candidates per channel: the range-fitting step times 2^-6 … 1 in 1/8 octave (a larger step
# never helps: nothing is clipped and rounding gets coarser), then a refinement of ±1/8 octave
# around each channel's best in 1/128 octave: the MSE near the clipping point is sharp.
COARSE_LOG2 = np.arange(-48, 1) / 8
FINE_LOG2 = np.arange(-16, 17) / 128
MAX_ROWS = 4096


def mse_steps(x: torch.Tensor, bits: int, signed: torch.Tensor) -> torch.Tensor:
    """``step_log2 (C,)`` minimising the MSE of the ``bits``-bit uniform quantizer per channel.

    ``x (C, n)`` holds each channel's values; ``signed (C,)`` picks the signed or unsigned grid.
    """
    if bits < 1:
        raise ValueError(f"the uniform baseline needs bits >= 1, got {bits}")
    x = x.double()
    lo_s, hi_s = signed_bounds(bits)
    lo_u, hi_u = unsigned_bounds(bits)
    qmin = torch.where(signed, float(lo_s), float(lo_u))[:, None]  # (C, 1)
    qmax = torch.where(signed, float(hi_s), float(hi_u))[:, None]  # (C, 1)
    # The step that fits the channel's range into the levels.
    reach = torch.maximum(x.max(1).values.clamp(min=0) / qmax.clamp(min=1)[:, 0],
                          (-x.min(1).values).clamp(min=0) / (-qmin).clamp(min=1)[:, 0])  # (C,)
    reach = torch.where(reach > 0, reach, torch.ones_like(reach))
    best = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    best_step = reach.clone()
    for grid, center in ((COARSE_LOG2, reach), (FINE_LOG2, None)):
        center = best_step.clone() if center is None else center
        for r in grid:
            step = (center * 2.0 ** float(r)).clamp(max=reach)[:, None]  # (C, 1)
            err = (quantize_uniform(x, step, qmin, qmax) - x).pow(2).mean(1)  # (C,)
            better = err < best
            best = torch.where(better, err, best)
            best_step = torch.where(better, step[:, 0], best_step)
    return torch.log2(best_step)


def _rows(t: torch.Tensor, dim: int, max_rows: int) -> torch.Tensor:
    flat = t.detach().movedim(dim, -1).reshape(-1, t.shape[dim])  # (rows, C)
    if flat.shape[0] > max_rows:
        flat = flat[:: math.ceil(flat.shape[0] / max_rows)]
    return flat


def collect_acts(model: nn.Module, calib: torch.Tensor, names: list[str], mode: str,
                 batch_size: int = 64, max_rows: int = MAX_ROWS) -> dict[str, dict[str, Any]]:
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
            entry["min"].append(t.detach().movedim(dim, -1).reshape(-1, t.shape[dim]).min(0)
                                .values.double())
        return record

    hooks = [(modules[n], hook(n)) for n in names]
    for i in range(0, calib.shape[0], batch_size):
        if mode == "in":
            hooked_forward(model, calib[i:i + batch_size], pre=hooks)
        else:
            hooked_forward(model, calib[i:i + batch_size], post=hooks)
    return {n: {"x": torch.cat(e["rows"]).T.contiguous(),
                "min": torch.stack(e["min"]).min(0).values, "shape": e["shape"]}
            for n, e in found.items()}


def uniform_allocation(model: nn.Module, calib: torch.Tensor, w_bits: int, a_bits: int | None,
                       act_layers: list[str], act_mode: str = "out",
                       acts: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
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
            "type": layer.type, "shape": list(layer.shape), "channels": c, "group_size": 1,
            "bits": [w_bits] * c, "step_log2": steps.tolist(), "deadzone": [0.0] * c}
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
                "type": type(modules[name]).__name__, "shape": list(acts[name]["shape"]),
                "channels": int(x.shape[0]), "group_size": 1, "bits": [a_bits] * x.shape[0],
                "step_log2": steps.tolist(), "signed": signed.tolist()}
    skipped = [n for n in act_layers if n not in act_entries] if a_bits is not None else []
    return {
        "schema": ALLOC_SCHEMA, "model": None, "target_bits": float(w_bits), "solver": "uniform",
        "act_target_bits": None if a_bits is None else float(a_bits), "act_mode": act_mode,
        "curve_sets": {}, "weights": weights, "acts": act_entries, "fp_acts": skipped,
        "summary": {"w_bits": float(w_bits), "a_bits": None if not act_entries else float(a_bits),
                    "pred_dist": None},
    }
