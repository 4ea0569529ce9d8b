"""Splitting layers across processes (DESIGN §12): balanced by estimated cost, not layer count."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from rdoq.probe import probe


@dataclass(frozen=True)
class PartSpec:
    """This process's share: part ``part_id`` of ``num_parts``; torchrun's LOCAL_RANK if set."""

    part_id: int
    num_parts: int
    local_rank: int | None = None


def resolve_part(part_id: int | None, num_parts: int | None) -> PartSpec:
    """Explicit ``--part_id/--num_parts`` win; otherwise torchrun's RANK/WORLD_SIZE; else 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = os.environ.get("LOCAL_RANK")
    if num_parts is None:
        num_parts = world if world > 1 else 1
    if part_id is None:
        part_id = rank if world > 1 else 0
    if num_parts < 1:
        raise ValueError(f"--num_parts must be >= 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise ValueError(
            f"--part_id {part_id} is outside 0..{num_parts - 1}; use --part_id < --num_parts"
        )
    return PartSpec(part_id, num_parts, int(local) if local is not None and world > 1 else None)


def layer_macs(model: nn.Module, x1: torch.Tensor, names: list[str]) -> dict[str, int]:
    """Multiply-accumulates per sample of each named Linear/Conv2d, summed over its calls (one
    probing forward on ``x1[:1]``): output elements × MACs per output element (in/groups ×
    kernel). Every output element of the one-sample forward counts, also where the first axis is
    not the sample (Swin's attention windows); a spconv layer's output counts its features, the
    active sites (an upper bound: not every kernel tap is active)."""
    macs = dict.fromkeys(names, 0)
    for c in probe(model, x1, names).calls:
        if c.name in macs:
            macs[c.name] += c.out.numel * c.module.weight[0].numel()
    return macs


def assign_parts(costs: list[float], num_parts: int) -> list[int]:
    """Part index of each item: greedy longest-processing-time balancing, deterministic."""
    loads = [0.0] * num_parts
    part = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        p = min(range(num_parts), key=lambda q: (loads[q], q))
        part[i] = p
        loads[p] += costs[i]
    return part


def suffix_costs(
    names: list[str], macs: dict[str, int], groups: dict[str, int], candidates_per_group: int
) -> list[float]:
    """Measured-engine cost estimate per layer: groups × candidates × MACs from the layer on."""
    tail = 0
    out = [0.0] * len(names)
    for i in range(len(names) - 1, -1, -1):
        tail += macs[names[i]]
        out[i] = float(groups[names[i]] * candidates_per_group * max(tail, 1))
    return out
