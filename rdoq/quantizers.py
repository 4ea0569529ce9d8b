"""Uniform and dead-zone quantizers, level bounds and step grids (DESIGN §4).

All functions are pure tensor maps. ``step``, ``deadzone`` and the level bounds may be tensors that
broadcast against ``x``: the engine quantizes many candidates (one per batch slot) and many channels
in one call, never in a Python loop over groups.
"""

from __future__ import annotations

import math

import torch

# A weight group's step (or step exponent) and dead zone: a Python scalar for the whole group
# (the paper's quantizer) or a tensor (c,) with one value per channel (axis 0 of the group).
PerChannel = float | torch.Tensor


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


def deadzone_magnitudes(bits: int, authors: bool = False) -> int:
    """Non-zero magnitude levels per sign of the dead-zone quantizer that fit in ``bits``.

    Levels are ``{0} ∪ {±(φ + (q+½)Δ) : q < M}``, i.e. ``2M + 1`` levels, so ``2M + 1 ≤ 2^b`` gives
    ``M = 2^(b-1) - 1`` (one code is left unused rather than charging 2^b + 1 levels as b bits, the
    authors' defect). b ≤ 1 leaves only the zero level. ``authors`` (``--authors-semantics
    deadzone``): their ``M = 2^(b-1)``, i.e. 2^b + 1 levels charged as b bits (1 bit is ternary).
    """
    if bits < 0:
        raise ValueError(f"bits must be >= 0, got {bits}")
    if bits == 0:
        return 0
    return 2 ** (bits - 1) if authors else 2 ** (bits - 1) - 1


def quantize_uniform(
    x: torch.Tensor,
    step: torch.Tensor | float,
    qmin: torch.Tensor | int,
    qmax: torch.Tensor | int,
) -> torch.Tensor:
    """Mid-tread uniform quantizer ``clamp(round(x/Δ), qmin, qmax)·Δ``.

    ``qmin == qmax == 0`` (0 bits) gives all zeros whatever the step.
    """
    return _uniform_index(x, step, qmin, qmax) * step


def _uniform_index(
    x: torch.Tensor, step: torch.Tensor | float, qmin: torch.Tensor | int, qmax: torch.Tensor | int
) -> torch.Tensor:
    """The uniform quantizer's level index ``clamp(round(x/Δ), qmin, qmax)`` (float, ``x``'s
    shape): the one rounding rule of :func:`quantize_uniform` and :func:`weight_levels`."""
    lo = torch.as_tensor(qmin, dtype=x.dtype, device=x.device)
    hi = torch.as_tensor(qmax, dtype=x.dtype, device=x.device)
    return torch.clamp(torch.round(x / step), lo, hi)


def quantize_deadzone(
    x: torch.Tensor,
    step: torch.Tensor | float,
    deadzone: torch.Tensor | float,
    magnitudes: torch.Tensor | int,
    authors: bool = False,
) -> torch.Tensor:
    """Dead-zone quantizer: ``|x| ≤ φ → 0``, else ``sign(x)·(φ + (q+½)Δ)``.

    ``q = clamp(floor((|x|-φ)/Δ), 0, M-1)`` with ``M = magnitudes``; ``floor`` (not ``round``) keeps
    every value inside its reconstruction cell, so the error is at most Δ/2 inside the range.
    ``authors``: their ``round`` instead of ``floor``, which puts a value at ``φ + tΔ`` at
    ``φ + (round(t) + ½)Δ``, outward by 0 to Δ (``--authors-semantics deadzone``).
    """
    q, keep = _deadzone_index(x, step, deadzone, magnitudes, authors)
    rec = torch.sign(x) * (deadzone + (q + 0.5) * step)
    return torch.where(keep, rec, torch.zeros_like(x))


def _deadzone_index(
    x: torch.Tensor,
    step: torch.Tensor | float,
    deadzone: torch.Tensor | float,
    magnitudes: torch.Tensor | int,
    authors: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dead-zone quantizer's magnitude index ``q`` (float, ``x``'s shape) and where ``x``
    leaves the dead zone for a level (bool): the one rounding rule of
    :func:`quantize_deadzone` and :func:`weight_levels`."""
    mag = x.abs()
    m = torch.as_tensor(magnitudes, dtype=x.dtype, device=x.device)
    q = (torch.round if authors else torch.floor)((mag - deadzone) / step)
    q = torch.minimum(torch.clamp(q, min=0.0), m - 1.0)
    return q, (mag > deadzone) & (m > 0)


def quantize_weight(
    x: torch.Tensor, bits: int, step_log2: PerChannel, deadzone: PerChannel, authors: bool = False
) -> torch.Tensor:
    """Quantize one weight group with the rule the curves were measured with.

    ``step_log2`` and ``deadzone`` are scalars (one step for the group, the paper's quantizer) or
    tensors ``(c,)`` with one value per channel (axis 0 of ``x``). A channel with ``deadzone > 0``
    uses the dead-zone quantizer, one with ``deadzone == 0`` the signed uniform one.
    ``authors``: the authors' dead-zone rule (:func:`quantize_deadzone`).
    """
    if bits == 0:
        return torch.zeros_like(x)
    step = 2.0**step_log2 if not isinstance(step_log2, torch.Tensor) else channel_steps(step_log2)
    return quantize_weight_steps(x, bits, step, deadzone, authors)


def quantize_weight_steps(
    x: torch.Tensor, bits: int, step: PerChannel, deadzone: PerChannel, authors: bool = False
) -> torch.Tensor:
    """:func:`quantize_weight` given the steps themselves (scalar or per channel ``(c,)``)."""
    if bits == 0:
        return torch.zeros_like(x)
    step = _per_channel(step, x)
    phi = _per_channel(deadzone, x)
    lo, hi = signed_bounds(bits)
    mags = deadzone_magnitudes(bits, authors)
    if not isinstance(phi, torch.Tensor):  # one rule for the group
        if phi > 0:
            return quantize_deadzone(x, step, phi, mags, authors)
        return quantize_uniform(x, step, lo, hi)
    dz = phi > 0
    if not bool(dz.any()):
        return quantize_uniform(x, step, lo, hi)
    q_dz = quantize_deadzone(x, step, phi, mags, authors)
    if bool(dz.all()):
        return q_dz
    return torch.where(dz, q_dz, quantize_uniform(x, step, lo, hi))


def weight_levels(
    x: torch.Tensor, bits: int, step: PerChannel, deadzone: PerChannel, authors: bool = False
) -> torch.Tensor:
    """The integer symbols (int64, ``x``'s shape) that :func:`quantize_weight_steps` codes.

    Uniform: ``l = clamp(round(x/Δ), -2^(b-1), 2^(b-1)-1)``, value ``l·Δ``. Dead zone: ``l = 0``
    inside it, else ``sign(x)·(q+1)``, value ``sign(l)·(φ + (|l|-½)Δ)``. b = 0 → all 0. The
    same operations as the quantizer, so each symbol maps to its value exactly (tested
    bitwise); the entropy rate (:mod:`rdoq.entropy`) counts these, not the float values.
    ``authors``: the symbols of the authors' dead-zone rule (2^b + 1 of them).
    """
    if bits == 0:
        return torch.zeros_like(x, dtype=torch.int64)
    step = _per_channel(step, x)
    phi = _per_channel(deadzone, x)
    uniform = _uniform_index(x, step, *signed_bounds(bits))
    if not isinstance(phi, torch.Tensor) and phi <= 0:
        return uniform.long()
    q, keep = _deadzone_index(x, step, phi, deadzone_magnitudes(bits, authors), authors)
    dz = torch.where(keep, torch.sign(x) * (q + 1.0), torch.zeros_like(x))
    if not isinstance(phi, torch.Tensor):
        return dz.long()
    return torch.where(phi > 0, dz, uniform).long()


def affine_bcw(w: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """The authors' ``-bcw`` (``--authors-semantics bcw``): per row of ``w`` (axis 0, an output
    channel; the rest flattened), the quantized deviations rescaled to the full-precision
    standard deviation around the quantized mean, then the mean moved to the full-precision
    mean: ``(ŵ − mean ŵ)·σ(w)/(σ(ŵ) + 1e-8) + mean w`` (σ with Bessel's correction, as
    ``torch.std``; 0 for a row of one element). It leaves the grid (a per-channel affine map),
    and a pruned row becomes its full-precision mean."""
    c = w.shape[0]
    return affine_bcw_last(w.reshape(c, -1), wq.reshape(c, -1)).reshape(wq.shape)


def affine_bcw_last(w: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """:func:`affine_bcw` with the rows along the last axis: ``w (…, n)`` broadcast against
    ``wq (…, n)`` (many candidates of one row in one call)."""
    correction = 1 if w.shape[-1] > 1 else 0
    scale = w.std(-1, correction=correction, keepdim=True) / (
        wq.std(-1, correction=correction, keepdim=True) + 1e-8
    )
    return (wq - wq.mean(-1, keepdim=True)) * scale + w.mean(-1, keepdim=True)


def channel_steps(step_log2: torch.Tensor) -> torch.Tensor:
    """Steps ``2**step_log2`` of per-channel exponents, in float64 (the one conversion used by
    the curves and by applying an allocation, so both quantize identically)."""
    return torch.pow(2.0, step_log2.double())


def _per_channel(t: float | torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
    """A Python scalar as is (the arithmetic the paper's quantizer always used); a tensor ``(c,)``
    in ``x``'s dtype and device, shaped to broadcast along axis 0 of ``x``."""
    if not isinstance(t, torch.Tensor):
        return float(t)
    t = t.to(dtype=x.dtype, device=x.device)
    return t if t.dim() == 0 else t.reshape(-1, *([1] * (x.dim() - 1)))


# Per-channel MSE-optimal steps, relative to the range-fitting step: 2^-6 … 1 in 1/8 octave (a
# larger step never helps: nothing is clipped and rounding gets coarser), then a refinement of
# ±1/8 octave around each channel's best in 1/128 octave: the MSE near the clipping point is sharp.
_COARSE_LOG2 = [r / 8 for r in range(-48, 1)]
_FINE_LOG2 = [r / 128 for r in range(-16, 17)]


def mse_steps(
    x: torch.Tensor, bits: int, signed: torch.Tensor, deadzone: torch.Tensor | None = None
) -> torch.Tensor:
    """``step_log2 (C,)`` minimising each channel's quantization MSE at ``bits`` bits.

    ``x (C, n)`` holds each channel's values; ``signed (C,)`` picks the signed or unsigned grid of
    the uniform quantizer. With ``deadzone (C,)`` the channels whose threshold is > 0 use the
    dead-zone quantizer instead (NaN where it has no non-zero level, i.e. ``bits <= 1``). The
    uniform baseline and RDOQ's per-channel steps both come from here, so RDOQ's search always
    holds the baseline's candidate. The search runs on each channel divided by its range-fitting
    step (scale-free, so float32 suffices even for channels of 1e-8).
    """
    if bits < 1:
        raise ValueError(f"a step needs bits >= 1, got {bits}")
    x = x.detach().double()
    c = x.shape[0]
    phi = (
        torch.zeros(c, dtype=torch.float64, device=x.device)
        if deadzone is None
        else deadzone.double().to(x.device)
    )  # (C,)
    dz = phi > 0  # (C,)
    lo_s, hi_s = signed_bounds(bits)
    lo_u, hi_u = unsigned_bounds(bits)
    signed = signed.to(x.device)
    qmin = torch.where(signed, float(lo_s), float(lo_u))  # (C,)
    qmax = torch.where(signed, float(hi_s), float(hi_u))  # (C,)
    mags = deadzone_magnitudes(bits)
    # The step that fits the channel's range into the levels (the dead-zone quantizer's top
    # level is φ + (M - ½)Δ).
    reach_u = torch.maximum(
        x.max(1).values.clamp(min=0) / qmax.clamp(min=1),
        (-x.min(1).values).clamp(min=0) / (-qmin).clamp(min=1),
    )
    reach_dz = (x.abs().max(1).values - phi).clamp(min=0) / max(mags - 0.5, 0.5)
    reach = torch.where(dz, reach_dz, reach_u)  # (C,)
    reach = torch.where(reach > 0, reach, torch.ones_like(reach))
    best_log2 = torch.zeros(c, dtype=torch.float64, device=x.device)  # relative to reach
    for mask, dead in ((~dz, False), (dz, True)):
        if not bool(mask.any()) or (dead and mags == 0):
            continue
        xn = (x[mask] / reach[mask, None]).float()  # (c, n) in units of the range-fitting step
        args = (
            qmin[mask, None].float(),
            qmax[mask, None].float(),
            (phi[mask] / reach[mask])[:, None].float(),
            float(mags),
            dead,
        )
        best = torch.full((xn.shape[0],), math.inf, device=x.device)
        rel = torch.zeros(xn.shape[0], dtype=torch.float64, device=x.device)
        for r in _COARSE_LOG2:
            err = _channel_error(xn, 2.0**r, *args)
            better = err < best
            best = torch.where(better, err, best)
            rel = torch.where(better, r, rel)
        center = rel.clone()
        for r in _FINE_LOG2:
            cand = (center + r).clamp(max=0.0)  # (c,) never beyond the range-fitting step
            err = _channel_error(xn, torch.pow(2.0, cand).float()[:, None], *args)
            better = err < best
            best = torch.where(better, err, best)
            rel = torch.where(better, cand, rel)
        best_log2[mask] = rel
    out = torch.log2(reach) + best_log2
    if mags == 0:
        out = torch.where(dz, torch.full_like(out, math.nan), out)
    return out.cpu()


def quantize_uniform_fast(
    x: torch.Tensor, step: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> torch.Tensor:
    """``quantize_uniform(x, step, lo, hi)`` (same operations, same values) in one buffer: the
    broadcast candidate tensors are large, and fresh allocations of that size cost more than
    the arithmetic."""
    q = x / step
    # clamp_min_/clamp_max_ rather than clamp_(lo, hi): the same values, but the two-tensor
    # clamp is not vectorised on CPU and costs three times as much.
    return q.round_().clamp_min_(lo).clamp_max_(hi).mul_(step)


def quantize_deadzone_fast(
    x: torch.Tensor,
    step: torch.Tensor,
    deadzone: torch.Tensor,
    magnitudes: torch.Tensor,
    authors: bool = False,
) -> torch.Tensor:
    """``quantize_deadzone(x, step, deadzone, magnitudes, authors)`` (the same values) in one
    buffer, for small ``x`` broadcast against many candidates' parameters."""
    mag = x.abs()
    q = (mag - deadzone).div_(step)
    q = q.round_() if authors else q.floor_()
    q = q.clamp_min_(0.0).clamp_max_(magnitudes - 1.0)
    q = q.add_(0.5).mul_(step).add_(deadzone).mul_(torch.sign(x))
    return q.masked_fill_((mag <= deadzone) | (magnitudes <= 0), 0.0)


def _channel_error(
    x: torch.Tensor,
    step: float | torch.Tensor,
    qmin: torch.Tensor,
    qmax: torch.Tensor,
    phi: torch.Tensor,
    mags: float,
    deadzone: bool,
) -> torch.Tensor:
    """Per-channel MSE (over axis 1 of ``x``) at ``step`` of the uniform quantizer (``qmin``,
    ``qmax``) or, with ``deadzone``, of the dead-zone one (``phi``, ``mags``)."""
    if deadzone:
        q = quantize_deadzone_fast(x, step, phi, mags)
    else:
        q = quantize_uniform_fast(x, step, qmin, qmax)
    return q.sub_(x).square_().mean(1)


def channel_deadzones(w: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per output channel (axis 0), the φ that puts a fraction ``ratio`` of ``|w|`` in the dead
    zone (the same exact quantile as :func:`deadzone_threshold`), ``(C,)``.

    ``ratio == 0`` → zeros. For ``ratio > 0`` every φ is > 0, so a dead-zone group never mixes in
    uniform channels: a channel whose quantile is 0 (that many exact zeros) gets half its
    smallest non-zero magnitude (its zeros stay in the dead zone, nothing else joins them), an
    all-zero channel gets 1.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"dead-zone ratio must be in [0, 1), got {ratio}")
    mag = w.detach().reshape(w.shape[0], -1).abs().double().cpu()  # (C, n)
    if ratio == 0.0:
        return torch.zeros(mag.shape[0], dtype=torch.float64)
    k = max(int(math.ceil(ratio * mag.shape[1])), 1)
    phi = torch.kthvalue(mag, k, dim=1).values  # (C,)
    smallest = torch.where(mag > 0, mag, torch.full_like(mag, math.inf)).min(1).values
    fallback = torch.where(torch.isfinite(smallest), smallest / 2, torch.ones_like(smallest))
    return torch.where(phi > 0, phi, fallback)


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


def act_bounds(bits: int, signed: bool) -> tuple[int, int]:
    """Integer level bounds of an activation group: the signed or the unsigned grid."""
    return signed_bounds(bits) if signed else unsigned_bounds(bits)
