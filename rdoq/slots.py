"""Candidate batching: how the candidates of one layer share one computation, for both
estimators.

* Measured curves (DESIGN §7): slot forwards. A layer computes a batch of K·n rows laid out as K
  slots of n samples, slot k with its own weight or its own activation quantizer, so that K
  candidates share one pass of the network; K is padded to a power of two
  (:func:`pad_slots`) so that a layer needs few distinct reference passes. Used by the measured
  engine's back-ends (:mod:`rdoq.backends`).
* Second-order curves: :class:`SlotGrid`, the candidates as a ``(groups, width)`` grid, one row
  per channel group, evaluated against that group's gradient rows in one product
  (:mod:`rdoq.hessian_backends`). A grid, not flat slots, because the quadratic model of a group
  involves only that group's rows, while a network forward needs every slot whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rdoq.groups import channel_dim, map_act
from rdoq.quantizers import quantize_uniform
from rdoq.search import Candidate

# A "slot forward" replaces a layer's computation for a batch of K*n rows laid out as K slots of n
# samples; slot k uses its own weight or its own activation quantizer.


@contextlib.contextmanager
def weight_slots(
    module: nn.Module,
    weights: torch.Tensor,
    shared_input: bool = False,
    offsets: torch.Tensor | None = None,
) -> Iterator[None]:
    """Make ``module`` compute slot k of its input with ``weights[k]``; weights: (K, *W.shape).

    ``shared_input``: every slot's input is the same (the layer is the first perturbed op), so the
    layer runs once on one slot's rows with the K weights stacked along its output channels.
    ``offsets (K, out)``: added to slot k's output channels (the ``-bcw`` bias correction).
    """
    k = weights.shape[0]
    cls_forward = type(module).forward
    if shared_input and cls_forward is nn.Linear.forward:
        w_all = weights.reshape(-1, weights.shape[-1])  # (K*out, in)
        b_all = module.bias.repeat(k) if module.bias is not None else None

        def forward(x: torch.Tensor) -> torch.Tensor:
            x1 = x[: x.shape[0] // k]
            out = F.linear(x1, w_all, b_all)  # (n, ..., K*out)
            out = out.reshape(*out.shape[:-1], k, -1).movedim(-2, 0)  # (K, n, ..., out)
            return out.reshape(-1, *out.shape[2:])
    elif shared_input and cls_forward is nn.Conv2d.forward and module.padding_mode == "zeros":
        g = module.groups
        out_c = weights.shape[1]
        # Interleave so that each conv group holds its K slots' channels contiguously.
        w_all = (
            weights.reshape(k, g, out_c // g, *weights.shape[2:])
            .transpose(0, 1)
            .reshape(-1, *weights.shape[2:])
        )  # (g*K*out/g, in/g, kh, kw)
        b_all = (
            module.bias.reshape(g, 1, -1).expand(g, k, -1).reshape(-1)
            if module.bias is not None
            else None
        )

        def forward(x: torch.Tensor) -> torch.Tensor:
            x1 = x[: x.shape[0] // k]
            out = F.conv2d(x1, w_all, b_all, module.stride, module.padding, module.dilation, g)
            n, _, h, w = out.shape
            out = out.reshape(n, g, k, out_c // g, h, w).permute(2, 0, 1, 3, 4, 5)
            return out.reshape(k * n, out_c, h, w)
    elif cls_forward is nn.Linear.forward:

        def forward(x: torch.Tensor) -> torch.Tensor:
            lead = x.shape[:-1]
            xk = x.reshape(k, -1, x.shape[-1])  # (K, M, in)
            out = torch.bmm(xk, weights.transpose(1, 2))  # (K, M, out)
            if module.bias is not None:
                out = out + module.bias
            return out.reshape(*lead, weights.shape[1])
    elif cls_forward is nn.Conv2d.forward and module.padding_mode == "zeros":

        def forward(x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0] // k
            xs = x.reshape(k, n, *x.shape[1:]).transpose(0, 1).reshape(n, -1, *x.shape[2:])
            w = weights.reshape(-1, *weights.shape[2:])  # (K*out, in/groups, kh, kw)
            b = module.bias.repeat(k) if module.bias is not None else None
            out = F.conv2d(
                xs, w, b, module.stride, module.padding, module.dilation, module.groups * k
            )  # (n, K*out, H', W')
            out = out.reshape(n, k, -1, *out.shape[2:]).transpose(0, 1)
            return out.reshape(k * n, *out.shape[2:])
    else:
        # Any other layer class: run its own forward once per slot with the slot's weight.
        original = module.weight.data

        def forward(x: torch.Tensor) -> torch.Tensor:
            outs = []
            try:
                for i, xk in enumerate(x.chunk(k)):
                    module.weight.data = weights[i]
                    outs.append(cls_forward(module, xk))
            finally:
                module.weight.data = original
            return torch.cat(outs)

    if offsets is not None:
        plain, dim = forward, channel_dim(module)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return add_slot_offsets(plain(x), offsets, dim)

    with patched_forward(module, forward):
        yield


def add_slot_offsets(y: torch.Tensor, offsets: torch.Tensor, dim: int) -> torch.Tensor:
    """``y (K·n, …)`` laid out as K slots, plus ``offsets[k] (C,)`` on channel axis ``dim`` of
    slot k's rows."""
    k, c = offsets.shape
    ys = y.reshape(k, y.shape[0] // k, *y.shape[1:])  # (K, n, …)
    shape = [k] + [1] * (ys.dim() - 1)
    shape[dim + 1 if dim >= 0 else ys.dim() + dim] = c
    return (ys + offsets.to(y).reshape(shape)).reshape(y.shape)


@contextlib.contextmanager
def patched_forward(module: nn.Module, forward: Callable) -> Iterator[None]:
    """Give ``module`` an instance-level ``forward`` for the duration; an instance forward it
    already had (a wrapper installed by other code) is put back afterwards."""
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had:
            module.forward = previous
        else:
            del module.forward


@dataclass
class ActSlotParams:
    """Per-slot, per-channel activation quantizer: all tensors (K, C)."""

    step: torch.Tensor
    qmin: torch.Tensor
    qmax: torch.Tensor
    mask: torch.Tensor  # True where the channel is quantized in that slot
    offset: torch.Tensor | None = None  # -bca: added to the quantized channels


def _quantize_slots(x: torch.Tensor, p: ActSlotParams, dim: int) -> torch.Tensor:
    k, c = p.step.shape
    xs = x.reshape(k, x.shape[0] // k, *x.shape[1:])  # (K, n, ...)
    # Broadcast (K, C) against (K, n, ...) with C on the channel axis.
    shape = [k] + [1] * (xs.dim() - 1)
    axis = dim + 1 if dim >= 0 else xs.dim() + dim
    shape[axis] = c

    def b(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(shape)

    q = quantize_uniform(xs, b(p.step), b(p.qmin), b(p.qmax))
    if p.offset is not None:
        q = q + b(p.offset)
    return torch.where(b(p.mask), q, xs).reshape(x.shape)


@contextlib.contextmanager
def act_slots(module: nn.Module, mode: str, params: ActSlotParams) -> Iterator[None]:
    """Quantize the input (``mode="in"``) or output (``"out"``) of ``module`` per slot (a
    ``SparseConvTensor``'s features: one slot, as its layer holds one frame)."""
    dim = channel_dim(module)

    def quantize(t: torch.Tensor) -> torch.Tensor:
        return _quantize_slots(t, params, dim)

    if mode == "out":
        handle = module.register_forward_hook(lambda m, i, o: map_act(o, quantize))
    else:
        handle = module.register_forward_pre_hook(
            lambda m, args: (map_act(args[0], quantize), *args[1:])
        )
    try:
        yield
    finally:
        handle.remove()


def pad_slots(n: int, max_batch: int) -> int:
    """Slots per pass for n candidates: the next power of two (≤ max_batch), so that a layer
    needs at most log2(max_batch)+1 reference passes."""
    return min(max_batch, 1 << max(n - 1, 0).bit_length())


# Elements of the perturbation tensor of one batched evaluation (candidates × group elements ×
# samples); larger batches are split over runs of groups. 2^24 float64 = 128 MiB.
_MAX_DELTA_ELEMENTS = 2**24


@dataclass(frozen=True)
class SlotGrid:
    """Candidates laid out as a ``(groups, width)`` grid: row ``r`` holds the candidates of
    group ``groups[r]`` (sorted), padded to the widest row. With ``split``, every row holds the
    candidates without the flag in columns ``[0, split_col)`` and those with it from
    ``split_col`` on, so a rule that only the flagged candidates need runs on those columns."""

    groups: np.ndarray  # (Gu,) sorted group indices
    rows: np.ndarray  # (K,) row of each candidate
    cols: np.ndarray  # (K,) column of each candidate
    width: int
    split_col: int = 0
    split: bool = False

    @classmethod
    def of(cls, cands: Sequence[Candidate], split: Sequence[bool] | None = None) -> SlotGrid:
        flags = split if split is not None else [False] * len(cands)
        counts: tuple[dict[int, int], dict[int, int]] = ({}, {})
        cols = np.empty(len(cands), dtype=np.int64)
        for i, (c, f) in enumerate(zip(cands, flags, strict=True)):
            # Column = rank among the group's candidates of the same block.
            block = counts[bool(f)]
            cols[i] = block.get(c.group, 0)
            block[c.group] = cols[i] + 1
        split_col = max(counts[0].values(), default=0)
        cols[np.asarray(flags, dtype=bool)] += split_col
        groups = np.array(sorted(counts[0].keys() | counts[1].keys()), dtype=np.int64)
        row_of = {g: r for r, g in enumerate(groups.tolist())}
        rows = np.fromiter((row_of[c.group] for c in cands), dtype=np.int64, count=len(cands))
        return cls(
            groups,
            rows,
            cols,
            split_col + max(counts[1].values(), default=0),
            split_col,
            split is not None,
        )

    def grid(
        self, values: Sequence[float], fill: float, like: torch.Tensor, rows: slice = slice(None)
    ) -> torch.Tensor:
        """``values`` per candidate as a ``(Gu, width)`` tensor (``fill`` in the padding),
        restricted to the grid rows ``rows``."""
        a = np.full((len(self.groups), self.width), fill, dtype=np.float64)
        a[self.rows, self.cols] = values
        return torch.from_numpy(a[rows]).to(dtype=like.dtype, device=like.device)

    def runs(self, per_group_elements: int) -> list[slice]:
        """Slices of grid rows whose groups are consecutive (views of stacked group tensors,
        no copies), each within the memory cap of one evaluation."""
        cap = max(_MAX_DELTA_ELEMENTS // max(per_group_elements * self.width, 1), 1)
        out, r0 = [], 0
        for r in range(1, len(self.groups) + 1):
            if r == len(self.groups) or self.groups[r] != self.groups[r - 1] + 1 or r - r0 >= cap:
                out.append(slice(r0, r))
                r0 = r
        return out

    def group_range(self, rows: slice) -> slice:
        """The stacked-group slice of the grid rows ``rows`` (consecutive groups)."""
        return slice(int(self.groups[rows.start]), int(self.groups[rows.stop - 1]) + 1)
