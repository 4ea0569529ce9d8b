"""BatchNorm folding: the weights a deployment holds (DESIGN §4, ``--fold-bn``).

A deployment folds each eval-mode ``BatchNorm2d`` into the ``Conv2d`` before it, per output
channel ``c``: ``w'[c] = w[c]·γ[c]/√(σ²[c]+ε)`` and ``b'[c] = (b[c]−μ[c])·γ[c]/√(σ²[c]+ε)+β[c]``.
Quantizing the folded weights quantizes what is deployed.

Which pairs are safe is found from one forward of an example input, with hooks and autograd on:
a BatchNorm is folded into a convolution only when

- its input is the very tensor object the convolution returned, unmodified in between (the same
  autograd node: an in-place op on the conv output would have replaced it);
- that tensor is consumed once: one edge of the autograd graph (reachable from the model output,
  which counts as a consumer too) and one module hook. The graph sees functional consumers that
  hooks cannot (``y = conv(x); out = bn(y) + y``), which is why this forward keeps autograd on;
- both modules run exactly once and are registered under one name.

Any other BatchNorm is left in place and logged with the reason. Folding never relies on the
analysis alone: the folded model must reproduce the original output on the example, or it is an
error.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from rdoq.probe import hooked_forward

log = logging.getLogger("rdoq.fold")

# Appended to ModelInfo.weights_source (and so to meta.json and allocation files) when folding
# changed the weights: curves and allocations of folded and unfolded weights never mix.
FOLD_BN_TAG = "+fold-bn"


def is_folded_source(weights_source: str | None) -> bool:
    """Whether a recorded ``weights_source`` names BatchNorm-folded weights."""
    return bool(weights_source) and weights_source.endswith(FOLD_BN_TAG)


class NormActRemainder(nn.Module):
    """What is left of a timm ``BatchNormAct2d`` once its normalisation is folded away: its
    ``drop`` then its ``act``, under the same attribute names (their state-dict keys stay)."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) tuple/list/dict model output."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _consumer_edges(outputs: list[torch.Tensor]) -> Counter:
    """For each autograd node reachable from ``outputs``, how many graph edges (and outputs)
    consume its result."""
    edges: Counter = Counter()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    edges.update(stack)
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                edges[nxt] += 1
                stack.append(nxt)
    return edges


def find_conv_bn_pairs(
    model: nn.Module, example: torch.Tensor
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The ``(conv, bn)`` name pairs of ``model`` that can be folded (see the module docstring),
    and, per BatchNorm2d left out, why. One forward of ``example`` with autograd on."""
    registered = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    modules = dict(model.named_modules())
    convs = {n: m for n, m in modules.items() if isinstance(m, nn.Conv2d)}
    bns = {n: m for n, m in modules.items() if isinstance(m, nn.BatchNorm2d)}
    # Modules whose inputs count as consumers: leaves, and the convs and norms themselves
    # (BatchNormAct2d has children). A container's input is passed on to its children.
    # nn.Identity hands on the very tensor it gets, so it consumes nothing.
    watched = {
        n: m
        for n, m in modules.items()
        if n
        and not isinstance(m, nn.Identity)
        and (not any(True for _ in m.children()) or n in convs or n in bns)
    }
    calls: Counter = Counter()
    fed: dict[int, list[str]] = {}  # id(tensor) -> watched modules that took it as input
    conv_out: dict[int, tuple[str, Any]] = {}  # id(conv output) -> (conv, its autograd node)
    bn_in: dict[str, tuple[torch.Tensor, Any]] = {}  # bn -> (input, its autograd node)
    keep: list[torch.Tensor] = []  # every recorded tensor stays alive, so ids are not reused
    outputs: list[torch.Tensor] = []

    def pre(name: str):
        def record(mod, args):
            calls[name] += 1
            for t in _tensors(args):
                keep.append(t)
                fed.setdefault(id(t), []).append(name)
            if name in bns and args and isinstance(args[0], torch.Tensor):
                bn_in[name] = (args[0], args[0].grad_fn)

        return record

    def post(name: str):
        def record(mod, args, out):
            if isinstance(out, torch.Tensor):
                keep.append(out)
                conv_out[id(out)] = (name, out.grad_fn)

        return record

    def model_output(mod, args, out):
        outputs.extend(_tensors(out))

    x = example.detach().clone().requires_grad_(True)
    hooked_forward(
        model,
        x,
        post=[(convs[n], post(n)) for n in convs] + [(model, model_output)],
        pre=[(m, pre(n)) for n, m in watched.items()],
        grad=True,
    )
    edges = _consumer_edges(outputs)

    pairs: list[tuple[str, str]] = []
    skipped: dict[str, str] = {}
    for bn_name, bn in bns.items():
        if calls[bn_name] != 1:
            skipped[bn_name] = f"called {calls[bn_name]} times in one forward"
            continue
        if bn.running_mean is None or bn.running_var is None:
            skipped[bn_name] = "no running statistics (normalises by batch statistics)"
            continue
        t, node = bn_in.get(bn_name, (None, None))
        if t is None or id(t) not in conv_out:
            skipped[bn_name] = "its input is not the output of a Conv2d"
            continue
        conv_name, conv_node = conv_out[id(t)]
        conv = convs[conv_name]
        why = None
        if calls[conv_name] != 1:
            why = f"{conv_name} is called {calls[conv_name]} times in one forward"
        elif registered[id(conv)] != 1 or registered[id(bn)] != 1:
            why = "the conv or the norm is registered under several names"
        elif conv_node is None or node is not conv_node:
            why = f"the output of {conv_name} is modified in place before the norm"
        elif fed[id(t)] != [bn_name]:
            why = f"the output of {conv_name} also feeds {[n for n in fed[id(t)] if n != bn_name]}"
        elif edges[conv_node] != 1:
            why = (
                f"the output of {conv_name} has {edges[conv_node]} consumers in the autograd "
                f"graph (e.g. a residual add)"
            )
        elif conv.out_channels != bn.num_features:
            why = f"{conv_name} has {conv.out_channels} channels, the norm {bn.num_features}"
        if why:
            skipped[bn_name] = why
        else:
            pairs.append((conv_name, bn_name))
    return pairs, skipped


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


@torch.no_grad()
def fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn``'s eval-mode affine map into ``conv``'s weight and bias, in place (arithmetic in
    float64, stored in the conv's dtype); the conv gets a bias if it had none."""
    dtype = conv.weight.dtype

    def f64(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().double()

    weight, bias = fuse_conv_bn_weights(
        f64(conv.weight),
        f64(conv.bias),
        f64(bn.running_mean),
        f64(bn.running_var),
        bn.eps,
        f64(bn.weight),
        f64(bn.bias),
    )
    conv.weight.copy_(weight.to(dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(dtype), requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(bias.to(dtype))


def fold_batchnorm(
    model: nn.Module, example: torch.Tensor, rtol: float = 1e-4
) -> list[tuple[str, str]]:
    """Fold, in place, every BatchNorm2d of the eval-mode ``model`` that provably normalises only
    a Conv2d's output (``find_conv_bn_pairs``) into that conv, and return the ``(conv, bn)`` names
    folded. A plain BatchNorm2d becomes ``nn.Identity``; a timm ``BatchNormAct2d`` keeps its drop
    and activation (``NormActRemainder``). Norms left in place are logged with the reason.

    The folded model must reproduce the original output on ``example`` to within ``rtol`` of the
    output's largest magnitude, else ValueError (the model is then already modified). A model
    whose floating tensors share one dtype is analysed, folded and checked in float64 and cast
    back (float32 → float64 → float32 is exact): the check then sees the folding algebra, not the
    float32 rounding noise of a deep network (measured at 8e-5 of the output on EfficientNet-Lite0
    with non-trivial BatchNorm statistics, too close to any useful tolerance). The folded weights
    are the float64 fold rounded once to the model's dtype. A model in training mode is refused:
    folding uses the running statistics.
    """
    training = [
        n or type(model).__name__
        for n, m in model.named_modules()
        if m.training and (m is model or isinstance(m, nn.BatchNorm2d))
    ]
    if training:
        raise ValueError(
            f"BatchNorm folding needs an eval-mode model (running statistics), but "
            f"{training[:3]} {'is' if len(training) == 1 else 'are'} in training "
            f"mode; call model.eval() first"
        )
    dtypes = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    if len(dtypes) != 1:
        return _fold_checked(model, example, rtol)
    dtype = dtypes.pop()
    model.to(torch.float64)
    try:
        return _fold_checked(model, example, rtol)
    finally:
        model.to(dtype)


def _fold_checked(model: nn.Module, example: torch.Tensor, rtol: float) -> list[tuple[str, str]]:
    """``fold_batchnorm`` in the model's current dtypes."""
    param = next(model.parameters(), None)
    if param is not None:
        example = example.to(device=param.device, dtype=param.dtype)
    pairs, skipped = find_conv_bn_pairs(model, example)
    for bn_name, why in skipped.items():
        log.info("BatchNorm %s not folded: %s", bn_name, why)
    if not pairs:
        return pairs
    with torch.no_grad():
        ref = [t.detach().clone() for t in _tensors(model(example))]
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        bn = modules[bn_name]
        fold_pair(modules[conv_name], bn)
        has_act = hasattr(bn, "act") and hasattr(bn, "drop")
        _replace(model, bn_name, NormActRemainder(bn.drop, bn.act) if has_act else nn.Identity())
    with torch.no_grad():
        out = [t.detach() for t in _tensors(model(example))]
    scale = max((float(r.abs().max()) for r in ref if r.numel()), default=0.0)
    err = (
        float("inf")
        if len(out) != len(ref)
        else max(
            (float((o - r).abs().max()) for o, r in zip(out, ref, strict=True) if r.numel()),
            default=0.0,
        )
    )
    if not err <= rtol * scale:
        raise ValueError(
            f"BatchNorm folding changed the output of {type(model).__name__}: max "
            f"error {err:.3g} vs output scale {scale:.3g} (rtol {rtol:g}) after "
            f"folding {len(pairs)} pairs; run without --fold-bn and report the model"
        )
    log.info(
        "folded %d BatchNorm2d into the convolutions before them (%d left in place)",
        len(pairs),
        len(skipped),
    )
    return pairs
