"""Per-sample gradient rows of weight layers for the second-order estimator
(:mod:`rdoq.hessian`): the weight gradient of each (calibration sample, probe) pair, from captured
layer inputs and output gradients (one batched product for stock Linear/Conv2d, ``torch.func``
for any other layer) or, for layers whose inputs have no sample axis (spconv), by running each
sample alone with one backward per probe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp, vmap

if TYPE_CHECKING:
    from rdoq.hessian import HessianSettings


def per_sample_weight_grad(
    module: nn.Module,
    x: torch.Tensor,
    dy: torch.Tensor,
    out: torch.Tensor,
    accumulate: bool = False,
) -> None:
    """Write (or add) the weight gradient of each (sample, probe) pair into ``out (B·M, out,
    in_per_out)``, from the layer input of each sample ``x (B, …)`` and the output gradients of
    its ``M`` probes ``dy (B, M, …)`` (the probes share one forward, so inputs are not
    repeated). Stock ``nn.Linear`` / zero-padded ``nn.Conv2d``: one batched product straight
    into the rows. Any other layer (a subclass that pads or transforms inside ``forward``, e.g.
    timm's ``Conv2dSame``): :func:`per_sample_weight_grad_func`."""
    b, m = dy.shape[:2]
    forward = type(module).forward
    if forward is nn.Linear.forward:
        x = x.reshape(b, -1, x.shape[-1])  # (B, T, in)
        d = dy.reshape(b, m, -1, dy.shape[-1]).transpose(2, 3)  # (B, M, out, T)
        _bmm_into(d.reshape(b, -1, x.shape[1]), x, out.view(b, -1, x.shape[-1]), accumulate)
        return
    padding = getattr(module, "padding", None)
    if (
        forward is nn.Conv2d.forward
        and module.padding_mode == "zeros"
        and not (isinstance(padding, str) and padding != "valid")
    ):
        padding = 0 if padding == "valid" else padding
        cols = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
        )  # (B, in·kh·kw, L)
        g = module.groups
        if g == 1:
            d = dy.reshape(b, -1, cols.shape[-1])  # (B, M·out, L)
            _bmm_into(d, cols.transpose(1, 2), out.view(b, d.shape[1], -1), accumulate)
            return
        cols = cols.reshape(b, g, -1, cols.shape[-1])  # (B, g, in/g·kh·kw, L)
        d = dy.reshape(b, m, g, -1, cols.shape[-1])  # (B, M, g, out/g, L)
        ps = torch.einsum("bmgol,bgil->bmgoi", d, cols).reshape(out.shape)
        if accumulate:
            out.add_(ps)
        else:
            out.copy_(ps)
        return
    ps = per_sample_weight_grad_func(module, x, dy).reshape(out.shape)
    if accumulate:
        out.add_(ps)
    else:
        out.copy_(ps)


def per_sample_weight_grad_func(
    module: nn.Module, x: torch.Tensor, dy: torch.Tensor
) -> torch.Tensor:
    """Per-sample, per-probe weight gradients ``(B, M, *W.shape)`` of any layer through its own
    ``forward`` (``torch.func``: a vector-Jacobian product per sample, vmapped over samples and
    probes), from inputs ``x (B, …)`` and output gradients ``dy (B, M, …)``."""
    weight = module.weight.detach()

    def one_sample(xn: torch.Tensor, dyn: torch.Tensor) -> torch.Tensor:
        def out_of(w: torch.Tensor) -> torch.Tensor:
            return functional_call(module, {"weight": w}, (xn.unsqueeze(0),)).squeeze(0)

        _, pull = vjp(out_of, weight)
        return vmap(lambda d: pull(d)[0])(dyn)  # (M, *W)

    with torch.no_grad():
        return vmap(one_sample)(x.detach(), dy.detach())


def per_sample_weight_grad_alone(
    model: nn.Module,
    calib: torch.Tensor,
    weights: dict[str, nn.Parameter],
    rows: dict[str, torch.Tensor],
    settings: HessianSettings,
    probes: torch.Tensor | None,
    on_sample: Callable[[], None] | None = None,
) -> None:
    """Write the rows ``rows[name] (N·M, out, in_per_out)`` of the layers ``weights`` by
    running each calibration sample alone and backpropagating each of its ``M`` probes to the
    weights: row ``n·M + j`` is ``∂(z_{n,j}ᵀF(x_n))/∂W`` (``probe="norm"``: ``∂‖F(x_n)‖/∂W``),
    the rows :func:`per_sample_weight_grad` gives from captured inputs, from the same
    Rademacher ``probes (N, M, K)``. One forward and ``M`` backwards per sample, for layers that
    function cannot take (:func:`needs_own_pass`)."""
    names, params = list(weights), list(weights.values())
    m_rows = settings.rows_per_sample
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        for n in range(calib.shape[0]):
            with torch.enable_grad():
                y = model(calib[n : n + 1].detach()).reshape(1, -1)  # (1, K)
                for j in range(m_rows):
                    if settings.probe == "random":
                        s = ((probes[n : n + 1, j].to(y) * 2 - 1) * y).sum()
                    else:
                        s = y.norm(dim=1).sum()
                    grads = torch.autograd.grad(
                        s, params, retain_graph=j < m_rows - 1, allow_unused=True
                    )
                    for name, g in zip(names, grads, strict=True):
                        row = rows[name][n * m_rows + j]  # (out, in_per_out)
                        if g is None:
                            row.zero_()
                        else:
                            row.copy_(g.reshape(row.shape))
            if on_sample is not None:
                on_sample()
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _bmm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """``out = a @ b`` or ``out += a @ b`` (batched), without a temporary."""
    if accumulate:
        out.baddbmm_(a, b)
    else:
        torch.bmm(a, b, out=out)
