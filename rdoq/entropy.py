"""Entropy-coded rate of weight and activation curve points (the paper's ``--bit_rate 0``).

The fixed-width rate of a group at ``b`` bits is ``b × numel``. An entropy coder of the group's
integer symbols needs about ``H × numel`` bits, ``H`` the empirical entropy (base 2) of those
symbols: ``0 ≤ H ≤ b``, ``H = b`` only when all ``2^b`` symbols occur equally often, ``H = 0``
when one symbol fills the group (0 bits, a 1-bit dead zone, a constant group).

Choices, and why:

- Symbols, not values (:func:`rdoq.quantizers.weight_levels`): with per-channel steps one symbol
  has a different value in every channel, and ``-bcw`` moves values off the grid per channel; a
  decoder receives the symbols and the per-channel steps. (The authors counted the distinct
  reconstructed values, which ``-bcw`` inflates.) The symbols are those before ``-bcw``: the
  correction maps values, not symbols.
- One histogram per channel group, pooled over its channels: the group is what the allocator
  gives one width and one dead zone. Side information (steps, the code table) is not counted,
  as the fixed-width rate does not count steps either.
- A point's quantizer is rebuilt from the curve arrays exactly as the engines built it
  (:func:`rdoq.steps.candidate_quantizer`), so the entropy belongs to the point whose
  distortion was measured. Curve generation stores it as ``entropy (G, D, B)`` for every
  estimator (:func:`rdoq.curves.generate_curves`).
- Activations (:func:`act_curve_entropy`): the symbols of the group's calibration activations,
  pooled over samples, positions and channels, i.e. the empirical entropy of what a coder of
  the calibration activations would see; held-out data may code to a slightly different rate,
  as a width-b code does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from rdoq.actstats import channel_rows
from rdoq.groups import act_values_of, channel_dim
from rdoq.probe import hooked_forward
from rdoq.quantizers import act_bounds, weight_levels
from rdoq.search import Candidate
from rdoq.steps import ChannelSteps, candidate_params, candidate_quantizer


def symbol_entropy(levels: torch.Tensor) -> float:
    """Empirical entropy (bits per element, base 2) of integer symbols of any shape; 0 for a
    single symbol or no elements."""
    flat = levels.reshape(-1)
    if flat.numel() == 0:
        return 0.0
    counts = torch.bincount(flat - flat.min())
    p = counts[counts > 0].double() / flat.numel()
    # max(0, ·): one symbol gives -0.0.
    return max(0.0, float(-(p * torch.log2(p)).sum()))


def group_levels(
    weight: torch.Tensor,
    bounds: Sequence[tuple[int, int]],
    cand: Candidate,
    steps: ChannelSteps | None,
) -> torch.Tensor:
    """The integer symbols of ``cand``'s group, ``weight[c0:c1].shape`` int64: the symbols of
    :func:`rdoq.backends.quantized_group` (same quantizer, same arithmetic)."""
    c0, c1 = bounds[cand.group]
    step, phi = candidate_quantizer(bounds, cand, steps)
    return weight_levels(weight[c0:c1], cand.bits, step, phi, cand.authors_dz)


def curve_entropy(
    weight: torch.Tensor,
    bounds: Sequence[tuple[int, int]],
    step_log2: np.ndarray,
    deadzone: np.ndarray,
    steps: ChannelSteps | None,
    authors_dz: bool = False,
) -> np.ndarray:
    """``entropy (G, D, B)``: bits per element of every curve point of one weight layer
    (``authors_dz``: of the authors' dead-zone symbols, ``--authors-semantics deadzone``).

    ``step_log2`` and ``deadzone`` are the layer's curve arrays ``(G, D, B)`` (bit width = index
    along B); with ``steps`` (per-channel mode) they hold each point's group scale and dead-zone
    ratio, the dead-zone index is the D index. 0 bits and all-zero points give 0; a point with
    no step (never reached by the search) gets its fixed width ``b``, an upper bound.
    """
    n_groups, n_dz, n_bits = step_log2.shape
    out = np.zeros((n_groups, n_dz, n_bits))  # (G, D, B)
    for g in range(n_groups):
        for d in range(n_dz):
            for b in range(1, n_bits):
                cand = Candidate(
                    g,
                    b,
                    float(step_log2[g, d, b]),
                    float(deadzone[g, d, b]),
                    dz_index=d if steps is not None else -1,
                    authors_dz=authors_dz,
                )
                if cand.is_zero:
                    continue
                if steps is None and not math.isfinite(cand.step_log2):
                    out[g, d, b] = b
                    continue
                out[g, d, b] = symbol_entropy(group_levels(weight, bounds, cand, steps))
    return out


def act_curve_entropy(
    model: nn.Module,
    calib: torch.Tensor,
    layer: str,
    mode: str,
    rows: int,
    bounds: Sequence[tuple[int, int]],
    signed: np.ndarray,
    step_log2: np.ndarray,
    steps: ChannelSteps | None,
) -> np.ndarray:
    """``entropy (G, 1, B)``: bits per element of every activation curve point of ``layer``.

    A point's symbols are ``clamp(round(a/Δ), lo, hi)`` of the group's calibration activations
    ``a`` (the layer's input with ``mode="in"``, else its output; a sparse layer's features),
    pooled over samples, positions and the group's channels: the integers the engines'
    activation quantizer produces (``-bca`` offsets move values, not symbols). ``step_log2``
    ``(G, 1, B)`` is the curve array (with ``steps``, per-channel mode, each point's group
    scale). One pass of forwards of ``rows`` samples over ``calib``; 0 bits give 0, a point
    with no step its fixed width ``b`` (an upper bound).
    """
    n_groups, _, n_bits = step_log2.shape
    width = max(c1 - c0 for c0, c1 in bounds)
    points, cands = [], []
    out = np.zeros((n_groups, 1, n_bits))  # (G, 1, B)
    for g in range(n_groups):
        for b in range(1, n_bits):
            s = float(step_log2[g, 0, b])
            if not math.isfinite(s):
                out[g, 0, b] = b
                continue
            points.append((g, b, *act_bounds(b, bool(signed[g]))))
            cands.append(Candidate(g, b, s, 0.0, dz_index=0 if steps is not None else -1))
    if not cands:
        return out
    step, _ = candidate_params(cands, bounds, width, steps)  # (K, width)
    step_t = torch.from_numpy(step)
    counts = [torch.zeros(hi - lo + 1, dtype=torch.int64) for _, _, lo, hi in points]
    module = model.get_submodule(layer)
    dim = channel_dim(module)

    def add(t: object) -> None:
        r = channel_rows(act_values_of(t), dim)  # (rows, C)
        for i, (g, _, lo, hi) in enumerate(points):
            c0, c1 = bounds[g]
            s = step_t[i, : c1 - c0].to(dtype=r.dtype, device=r.device)  # (c,)
            q = torch.clamp(torch.round(r[:, c0:c1] / s), lo, hi).long() - lo  # (rows, c)
            counts[i] += torch.bincount(q.reshape(-1), minlength=hi - lo + 1).cpu()

    if mode == "out":
        post, pre = [(module, lambda m, a, o: add(o))], []
    else:
        post, pre = [], [(module, lambda m, a: add(a[0]))]
    for i in range(0, calib.shape[0], max(rows, 1)):
        hooked_forward(model, calib[i : i + rows], post=post, pre=pre)
    for (g, b, _, _), c in zip(points, counts, strict=True):
        p = c[c > 0].double() / c.sum()
        out[g, 0, b] = max(0.0, float(-(p * torch.log2(p)).sum()))
    return out
