"""Per-channel steps of weight and activation groups (DESIGN §4).

A channel group shares one bit width and one dead-zone ratio, which the allocator chooses, but
each channel has its own step: its MSE-optimal step at that width and dead zone — for weights
from the weights alone (no network pass), for activations from a sample of the channel's
calibration values (:func:`act_rows`) — scaled by one factor ``2**scale_log2`` per group that
the curve search chooses. For weights scale 0 is exactly the uniform per-channel baseline's
quantizer, so a curve point is never worse than that baseline's. The paper's quantizer (one
power-of-two step per group) remains available: there the candidate's ``step_log2`` is the
group's absolute step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rdoq.quantizers import channel_deadzones, channel_steps, mse_steps
from rdoq.search import Candidate

STEP_MODES = ("channel", "group")


# Calibration values per sample and channel that activation steps are fitted on: a regular
# stride over each sample's positions, so the sample does not depend on how forwards are batched
# (the measured and the second-order curves see the same one).
ACT_ROWS_PER_SAMPLE = 64


def act_rows(t: torch.Tensor, dim: int, per_sample: int = ACT_ROWS_PER_SAMPLE) -> torch.Tensor:
    """Values of each channel of an activation batch ``t (n, …)`` with channels on axis ``dim``
    (of the batch), at most ``per_sample`` per sample: ``(C, rows)`` float64."""
    x = t.detach().movedim(dim, -1)
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # (n, P, C)
    stride = max(math.ceil(x.shape[1] / per_sample), 1)
    return x[:, ::stride].reshape(-1, x.shape[-1]).T.double().cpu()  # (C, rows)


@dataclass(frozen=True)
class ChannelSteps:
    """The per-channel base quantizers of one weight or activation layer (activations: one
    dead-zone ratio, 0)."""

    step_log2: np.ndarray  # (C, D, B) MSE-optimal step per channel, dead zone, bit width; NaN: none
    deadzone: np.ndarray  # (C, D) φ per channel and dead-zone ratio (0 for ratio 0, else > 0)

    @classmethod
    def of(cls, weight: torch.Tensor, ndz: int, nr: int) -> ChannelSteps:
        """Base steps of ``weight`` (channels on axis 0), ratios ``d/ndz``, bits ``0..nr-1``."""
        w = weight.detach().reshape(weight.shape[0], -1).double().cpu()  # (C, n)
        c = w.shape[0]
        signed = torch.ones(c, dtype=torch.bool)
        steps = np.full((c, ndz, nr), np.nan)  # (C, D, B)
        phis = np.zeros((c, ndz))  # (C, D)
        for d in range(ndz):
            phi = channel_deadzones(w, d / ndz)  # (C,)
            phis[:, d] = phi.numpy()
            for b in range(1, nr):
                steps[:, d, b] = mse_steps(w, b, signed, phi if d > 0 else None).numpy()
        return cls(steps, phis)

    @classmethod
    def of_acts(cls, rows: torch.Tensor, signed: torch.Tensor, nr: int) -> ChannelSteps:
        """Base steps of an activation layer from ``rows (C, n)`` (:func:`act_rows`) on each
        channel's grid (``signed (C,)``, its group's), bits ``0..nr-1``."""
        c = rows.shape[0]
        steps = np.full((c, 1, nr), np.nan)  # (C, 1, B)
        for b in range(1, nr):
            steps[:, 0, b] = mse_steps(rows, b, signed).numpy()
        return cls(steps, np.zeros((c, 1)))


def candidate_params(
    cands: Sequence[Candidate],
    bounds: Sequence[tuple[int, int]],
    width: int,
    steps: ChannelSteps | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate and channel of its group: ``step (K, width)`` and ``φ (K, width)``.

    Channels past the group's end (a final partial group) get step 1 and φ 0. With ``steps``
    (per-channel mode) a candidate's ``step_log2`` is its group's scale and ``dz_index`` picks
    the dead-zone ratio; without, ``step_log2`` and ``deadzone`` are the group's own. Zero
    candidates (no step) get step 1: the quantizer returns zeros whatever the step.
    """
    k = len(cands)
    step = np.ones((k, width))  # (K, width)
    phi = np.zeros((k, width))  # (K, width)
    for i, cand in enumerate(cands):
        c0, c1 = bounds[cand.group]
        n = c1 - c0
        if (steps is None) != (cand.dz_index < 0):
            raise ValueError(
                f"candidate {cand} and {'no ' if steps is None else ''}per-channel "
                f"steps: per-channel candidates need their layer's ChannelSteps"
            )
        if steps is None:
            if cand.bits > 0 and math.isfinite(cand.step_log2):
                step[i, :n] = 2.0**cand.step_log2
            phi[i, :n] = cand.deadzone
            continue
        if cand.bits > 0 and math.isfinite(cand.step_log2):
            log2 = steps.step_log2[c0:c1, cand.dz_index, cand.bits] + cand.step_log2  # (n,)
            s = channel_steps(torch.from_numpy(log2)).numpy()
            step[i, :n] = np.where(np.isfinite(s), s, 1.0)
        phi[i, :n] = steps.deadzone[c0:c1, cand.dz_index]
    return step, phi


def candidate_quantizer(
    bounds: Sequence[tuple[int, int]], cand: Candidate, steps: ChannelSteps | None
) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """Step and φ that quantize ``cand``'s group (for ``quantize_weight_steps`` and
    ``weight_levels``): Python scalars for the paper's one step per group, else per channel
    ``(c,)`` float64 tensors from :func:`candidate_params`."""
    if steps is None and cand.dz_index < 0:
        return 2.0**cand.step_log2, cand.deadzone
    c0, c1 = bounds[cand.group]
    step, phi = candidate_params([cand], bounds, c1 - c0, steps)  # (1, c) each
    return torch.from_numpy(step[0]), torch.from_numpy(phi[0])
