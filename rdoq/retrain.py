"""Fine-tuning after allocation (the paper's ``--re-calibrate`` and ``--re-train``), on the
calibration set only.

With the allocation fixed (bits, steps, dead zones, channel orders, activation grids), a copy of
the quantized model is tuned so that its outputs approach the full-precision model's on the
calibration samples: the output MSE the curves measure, so no labels are needed. The evaluation
data are never read: :func:`fine_tune` receives the calibration tensor and nothing else.

- ``"calibrate"`` (``--re-calibrate``): the biases (including those ``-bcw`` created or
  shifted) and the affine parameters of normalisation layers.
- ``"train"`` (``--re-train``): every parameter. A quantized layer's weight becomes a latent
  full-precision weight, started from the model's own, seen by the forward through the
  allocation's quantizer with a straight-through estimator (:class:`QuantizedWeight`); when
  tuning ends the layer holds the quantized weight again, on the allocation's grid.

Activation quantizers pass gradients straight through in both modes
(:class:`rdoq.apply.ActQuantizer`), since ``round`` has none. The authors' re-training tuned a
copy with AdamW on ImageNet's train split and only printed the result; here Adam (no weight
decay) runs ``iters`` steps of ``batch_size`` calibration samples drawn by a seeded permutation,
and the tuned model is evaluated and recorded like any allocated point.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from rdoq.apply import quantized_weight
from rdoq.evaluate import TensorBatches, outputs

RETRAIN_MODES = ("calibrate", "train")
# What the method name of a fine-tuned point gets appended (results rows, output directory).
METHOD_SUFFIX = {"calibrate": "+rc", "train": "+rt"}
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class RetrainSpec:
    """How to fine-tune: the mode, Adam's learning rate, the number of steps and the
    calibration samples per step, and the seed of the sample order."""

    mode: str
    lr: float
    iters: int
    batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in RETRAIN_MODES:
            raise ValueError(f"fine-tuning mode {self.mode!r} is not one of {RETRAIN_MODES}")
        if not self.lr > 0:
            raise ValueError(f"the fine-tuning learning rate must be > 0, got {self.lr}")
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError(
                f"fine-tuning needs >= 1 iteration of >= 1 sample, got {self.iters} "
                f"iterations of {self.batch_size}"
            )


class QuantizedWeight(nn.Module):
    """A weight parametrization: the allocation entry's quantizer, with a straight-through
    gradient (the forward sees ``Q(W)``, the gradient reaches ``W`` unchanged)."""

    def __init__(self, entry: dict[str, Any]):
        super().__init__()
        self.entry = entry

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (quantized_weight(w, self.entry) - w).detach()


def tuned_parameters(model: nn.Module, mode: str) -> list[tuple[str, nn.Parameter]]:
    """The parameters ``mode`` tunes: biases and normalisation affine parameters
    (``"calibrate"``), or all of them (``"train"``)."""
    if mode == "train":
        return list(model.named_parameters())
    norm = {
        f"{n}.{p}" if n else p
        for n, m in model.named_modules()
        if isinstance(m, NORM_TYPES)
        for p, _ in m.named_parameters(recurse=False)
    }
    return [(n, p) for n, p in model.named_parameters() if n.endswith("bias") or n in norm]


def calib_loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor, batch_size: int) -> float:
    """Mean squared output error of ``model`` against ``target (N, O)`` over the samples of
    ``x``, in float64."""
    return float(((_outputs(model, x, batch_size) - target.double()) ** 2).mean())


def _outputs(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``model``'s outputs ``(N, O)`` float64 on the CPU, in batches (no gradients)."""
    y, _ = outputs(model, TensorBatches(x, None, batch_size), x.device)
    return y.reshape(x.shape[0], -1)


def fine_tune(
    q_model: nn.Module,
    fp_model: nn.Module,
    alloc: dict[str, Any],
    calib: torch.Tensor,
    spec: RetrainSpec,
) -> dict[str, Any]:
    """Tune ``q_model`` (an applied allocation, :func:`rdoq.apply.apply_allocation`) in place
    toward ``fp_model``'s outputs on ``calib (N, ...)``; returns the record stored with the
    tuned point: the spec, the tuned parameter count and the calibration loss before and
    after."""
    t0 = time.perf_counter()
    fp_model.eval()
    q_model.eval()  # BatchNorm keeps its statistics; its affine parameters are tuned
    target = _outputs(fp_model, calib, spec.batch_size).to(calib)  # (N, O)
    before = calib_loss(q_model, calib, target, spec.batch_size)
    modules = dict(q_model.named_modules())
    fp_modules = dict(fp_model.named_modules())
    act_quantizers = list(getattr(q_model, "rdoq_act_quantizers", {}).values())
    try:
        for q in act_quantizers:
            q.straight_through = True
        if spec.mode == "train":
            for name, entry in alloc["weights"].items():
                with torch.no_grad():  # the latent weight starts from the full-precision one
                    modules[name].weight.copy_(fp_modules[name].weight)
                parametrize.register_parametrization(
                    modules[name], "weight", QuantizedWeight(entry)
                )
        tuned = tuned_parameters(q_model, spec.mode)
        for p in q_model.parameters():
            p.requires_grad_(False)
        for _, p in tuned:
            p.requires_grad_(True)
        _adam_steps(q_model, [p for _, p in tuned], calib, target, spec)
    finally:
        for name, entry in alloc["weights"].items():
            m = modules[name]
            if parametrize.is_parametrized(m, "weight"):
                # Back to a plain weight holding exactly Q(latent) (the straight-through
                # forward W + (Q(W) - W) can differ from Q(W) by a rounding).
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
                with torch.no_grad():
                    m.weight.copy_(quantized_weight(m.weight, entry))
        for p in q_model.parameters():
            p.requires_grad_(False)
        for q in act_quantizers:
            q.straight_through = False
    return {
        **asdict(spec),
        "params": int(sum(p.numel() for _, p in tuned)),
        "calib_loss_before": before,
        "calib_loss_after": calib_loss(q_model, calib, target, spec.batch_size),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _adam_steps(
    model: nn.Module,
    params: list[nn.Parameter],
    calib: torch.Tensor,
    target: torch.Tensor,
    spec: RetrainSpec,
) -> None:
    """``spec.iters`` Adam steps on the output MSE, each on ``spec.batch_size`` calibration
    samples taken in a seeded random order (a new order once every sample was used)."""
    opt = torch.optim.Adam(params, lr=spec.lr)
    gen = torch.Generator().manual_seed(spec.seed)
    n = calib.shape[0]
    batch = min(spec.batch_size, n)
    order, pos = torch.randperm(n, generator=gen), 0
    for _ in range(spec.iters):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch].to(calib.device)
        pos += batch
        loss = ((model(calib[idx]).reshape(batch, -1) - target[idx]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
