"""Uniform and dead-zone quantizers, level bounds and step grids (DESIGN §4).

All functions are pure tensor maps. ``step``, ``deadzone`` and the level bounds may be tensors that
broadcast against ``x``: the engine quantizes many candidates (one per batch slot) and many channels
in one call, never in a Python loop over groups.
"""

from __future__ import annotations

import math

import torch


def signed_bounds(bits: int) -> tuple[int, int]:
    """Integer levels of the signed mid-tread quantizer: ``[-2^(b-1), 2^(b-1)-1]``; b=0 → 0."""
    if bits < 0:
        raise ValueError(f"bits must be >= 0, got {bits}")
    if bits == 0:
        return 0, 0
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def unsigned_bounds(bits: int) -> tuple[int, int]:
    """Integer levels of the unsigned grid ``[0, 2^b - 1]`` (non-negative tensors); b=0 → 0."""
    if bits < 0:
        raise ValueError(f"bits must be >= 0, got {bits}")
    return 0, (2**bits - 1) if bits > 0 else 0


def deadzone_magnitudes(bits: int) -> int:
    """Non-zero magnitude levels per sign of the dead-zone quantizer that fit in ``bits``.

    Levels are ``{0} ∪ {±(φ + (q+½)Δ) : q < M}``, i.e. ``2M + 1`` levels, so ``2M + 1 ≤ 2^b`` gives
    ``M = 2^(b-1) - 1`` (one code is left unused rather than charging 2^b + 1 levels as b bits, the
    authors' defect). b ≤ 1 leaves only the zero level.
    """
    if bits < 0:
        raise ValueError(f"bits must be >= 0, got {bits}")
    return max(2 ** (bits - 1) - 1, 0) if bits > 0 else 0


def quantize_uniform(
    x: torch.Tensor,
    step: torch.Tensor | float,
    qmin: torch.Tensor | int,
    qmax: torch.Tensor | int,
) -> torch.Tensor:
    """Mid-tread uniform quantizer ``clamp(round(x/Δ), qmin, qmax)·Δ``.

    ``qmin == qmax == 0`` (0 bits) gives all zeros whatever the step.
    """
    lo = torch.as_tensor(qmin, dtype=x.dtype, device=x.device)
    hi = torch.as_tensor(qmax, dtype=x.dtype, device=x.device)
    return torch.clamp(torch.round(x / step), lo, hi) * step


def quantize_deadzone(
    x: torch.Tensor,
    step: torch.Tensor | float,
    deadzone: torch.Tensor | float,
    magnitudes: torch.Tensor | int,
) -> torch.Tensor:
    """Dead-zone quantizer: ``|x| ≤ φ → 0``, else ``sign(x)·(φ + (q+½)Δ)``.

    ``q = clamp(floor((|x|-φ)/Δ), 0, M-1)`` with ``M = magnitudes``; ``floor`` (not ``round``) keeps
    every value inside its reconstruction cell, so the error is at most Δ/2 inside the range.
    """
    mag = x.abs()
    m = torch.as_tensor(magnitudes, dtype=x.dtype, device=x.device)
    q = torch.floor((mag - deadzone) / step)
    q = torch.minimum(torch.clamp(q, min=0.0), m - 1.0)
    rec = torch.sign(x) * (deadzone + (q + 0.5) * step)
    keep = (mag > deadzone) & (m > 0)
    return torch.where(keep, rec, torch.zeros_like(x))


def quantize_weight(x: torch.Tensor, bits: int, step_log2: float, deadzone: float) -> torch.Tensor:
    """Quantize one weight group with the rule the curves were measured with.

    ``deadzone > 0`` selects the dead-zone quantizer, ``deadzone == 0`` the signed uniform one.
    """
    if bits == 0:
        return torch.zeros_like(x)
    step = 2.0**step_log2
    if deadzone > 0:
        return quantize_deadzone(x, step, deadzone, deadzone_magnitudes(bits))
    lo, hi = signed_bounds(bits)
    return quantize_uniform(x, step, lo, hi)


def deadzone_threshold(x: torch.Tensor, ratio: float) -> float:
    """The φ for which a fraction ``ratio`` of ``|x|`` falls in the dead zone (exact quantile).

    ``ratio == 0`` → 0 (no dead zone).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"dead-zone ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return 0.0
    mag = x.detach().abs().flatten().double()
    k = max(int(math.ceil(ratio * mag.numel())), 1)
    return float(torch.kthvalue(mag.cpu(), k).values)


def grid_floor(value_log2: float, step_grid: int) -> float:
    """Largest point of the ``1/step_grid``-octave grid that is ≤ ``value_log2``."""
    return math.floor(value_log2 * step_grid) / step_grid
