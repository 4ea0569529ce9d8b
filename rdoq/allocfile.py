"""Allocation files (DESIGN §5): the allocation of one solved point (:func:`make_allocation`,
with its :func:`summarize_choice`), written atomically and read back validated, without running
code (:func:`save_allocation`, :func:`load_allocation`). The item table they are made from is
:mod:`rdoq.allocation`'s.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from rdoq.allocation import (
    ACT,
    WEIGHT,
    ItemTable,
    LayerEntry,
)
from rdoq.authors import ENTRY_KEYS, ENTRY_VALUES, PARTS, entry_rule
from rdoq.groups import GROUP_AXES, group_bounds, group_dim
from rdoq.sorting import check_order
from rdoq.steps import STEP_MODES
from rdoq.store import atomic_write_json, read_json_artifact

ALLOC_SCHEMA = "rdoq.allocation/2"
# Allocations with sorted weight channels (an entry's ``channel_order``), input-channel weight
# groups (``group_axis``) or the authors' rules
# (``authors_semantics``, entry keys of rdoq.authors.ENTRY_KEYS): older readers, which would
# quantize the groups' channels in their own order or with the wrong rule, refuse this version.
ALLOC_SCHEMA_V3 = "rdoq.allocation/3"


def summarize_choice(table: ItemTable, choice: np.ndarray) -> dict[str, Any]:
    """Average W / A / joint fixed-width bits, the predicted distortion (sum of the chosen curve
    points), the rate the solver counted (``rate``: ``bits`` or ``entropy``) and the average
    entropy bits of the chosen weight and activation points (``w_entropy_bits``,
    ``a_entropy_bits``; None without entropy), so an entropy budget is never mistaken for a bit
    width."""
    idx = np.arange(len(choice))
    fixed = table.bits[choice] * table.numel  # (I,) bits × elements, whatever was budgeted
    w, a = table.kind == WEIGHT, table.kind == ACT
    n_w, n_a = table.part_numel(WEIGHT), table.part_numel(ACT)
    dist = table.dist[idx, choice]
    ent = a_ent = None
    if table.entropy is not None and n_w:
        ent = float((table.entropy[idx, choice] * table.numel)[w].sum() / n_w)
    if table.entropy is not None and n_a:
        a_chosen = (table.entropy[idx, choice] * table.numel)[a]
        a_ent = float(a_chosen.sum() / n_a) if np.isfinite(a_chosen).all() else None
    return {
        "w_bits": float(fixed[w].sum() / n_w) if n_w else None,
        "a_bits": float(fixed[a].sum() / n_a) if n_a else None,
        "avg_bits": float(fixed.sum() / table.numel.sum()),
        "rate": table.rate_kind,
        "w_entropy_bits": ent,
        "a_entropy_bits": a_ent,
        "pred_dist": float(dist.sum()),
        "pred_dist_w": float(dist[w].sum()),
        "pred_dist_a": float(dist[a].sum()),
    }


def _step(value: float) -> float | None:
    # No step exists where a group is all zeros (0 bits, 1-bit dead zone): JSON null, not NaN.
    return float(value) if math.isfinite(value) else None


def _channel_entry(
    table: ItemTable, layer: LayerEntry, rows: np.ndarray, cols: np.ndarray
) -> dict[str, Any]:
    """Per-channel ``step_log2`` (and, for weights, ``deadzone``) of a layer with per-channel
    steps: each channel's base step at its group's width and dead zone, plus the group's
    scale."""
    steps: list[float | None] = []
    phis: list[float] = []
    for g, (c0, c1) in enumerate(group_bounds(layer.channels, layer.group_size)):
        r, c = rows[g], cols[g]
        bits, d, scale = int(table.bits[c]), int(table.dz_index[r, c]), table.step_log2[r, c]
        base = layer.channel_step_log2[c0:c1, d, bits] if bits > 0 else np.full(c1 - c0, np.nan)
        steps += [_step(float(b) + float(scale)) for b in base]
        phis += [
            float(v) if table.deadzone[r, c] > 0 else 0.0 for v in layer.channel_deadzone[c0:c1, d]
        ]
    if layer.kind == ACT:
        return {"steps": "channel", "step_log2": steps}
    return {"steps": "channel", "step_log2": steps, "deadzone": phis}


def make_allocation(
    table: ItemTable,
    choice: np.ndarray,
    *,
    target_bits: float | None,
    solver: str,
    extra: dict[str, Any] | None = None,
    record: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The allocation file's content (DESIGN §5) for one choice of columns; ``record`` (one of
    :attr:`Solved.records`: budget, DP resolution and slack) goes into its ``summary``."""
    weights, acts = {}, {}
    for layer in table.layers:
        rows = np.arange(layer.rows.start, layer.rows.stop)
        cols = choice[rows]
        entry = {
            "type": layer.type,
            "shape": list(layer.shape),
            "channels": layer.channels,
            "group_size": layer.group_size,
            "bits": [int(table.bits[c]) for c in cols],
            "steps": "group",
            "step_log2": [_step(table.step_log2[r, c]) for r, c in zip(rows, cols, strict=True)],
        }
        if layer.kind == WEIGHT:
            entry["deadzone"] = [
                float(table.deadzone[r, c]) for r, c in zip(rows, cols, strict=True)
            ]
            if layer.channel_step_log2 is not None:
                entry |= _channel_entry(table, layer, rows, cols)
            if layer.channel_order is not None:
                entry["channel_order"] = [int(c) for c in layer.channel_order]
            if layer.group_axis != "out":
                entry["group_axis"] = layer.group_axis
            weights[layer.name] = entry
        else:
            entry["signed"] = [bool(s) for s in layer.signed]
            if layer.channel_step_log2 is not None:
                entry |= _channel_entry(table, layer, rows, cols)
            acts[layer.name] = entry
    return {
        "schema": ALLOC_SCHEMA_V3
        if any("channel_order" in e or "group_axis" in e for e in weights.values())
        else ALLOC_SCHEMA,
        "model": table.model,
        "target_bits": target_bits,
        "solver": solver,
        "act_mode": table.act_mode,
        "curve_sets": table.curve_sets,
        "weights": weights,
        "acts": acts,
        "fp_acts": table.fp_acts,
        "summary": summarize_choice(table, choice) | (record or {}),
        **(extra or {}),
    }


def mark_authors(alloc: dict[str, Any], parts: Iterable[str]) -> dict[str, Any]:
    """Record the ``--authors-semantics`` parts in effect in an allocation (in place, returned):
    ``authors_semantics`` at the top and, for the parts that change how it is applied, a key in
    every entry of its part (``deadzone_rule: "authors"``, ``bcw: "affine"``,
    ``bca: "oracle"``); then the schema older readers refuse."""
    parts = [p for p in PARTS if p in set(parts)]
    if not parts:
        return alloc
    alloc["authors_semantics"] = parts
    alloc["schema"] = ALLOC_SCHEMA_V3
    for p in parts:
        if p in ENTRY_KEYS:
            section, key = ENTRY_KEYS[p]
            for entry in alloc[section].values():
                entry[key] = ENTRY_VALUES[p]
    return alloc


def save_allocation(path: Path, alloc: dict[str, Any]) -> None:
    """Write an allocation file atomically."""
    atomic_write_json(path, alloc)


def load_allocation(path: Path | str) -> dict[str, Any]:
    """Read and validate an allocation file (no code executed; structure and lengths checked)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"allocation file {path} does not exist")
    alloc = read_json_artifact(path, (ALLOC_SCHEMA, ALLOC_SCHEMA_V3), ("model", "weights", "acts"))
    for part in ("weights", "acts"):
        for name, e in alloc[part].items():
            try:
                bounds = group_bounds(int(e["channels"]), int(e["group_size"]))
                g = len(bounds)
                per_channel = e.get("steps", "group") == "channel"
                if e.get("steps", "group") not in STEP_MODES:
                    raise ValueError(f"steps {e.get('steps')!r}")
                steps_len = int(e["channels"]) if per_channel else g
                lists = [("bits", g), ("step_log2", steps_len)] + (
                    [("deadzone", steps_len)] if part == "weights" else [("signed", g)]
                )
                bad = [k for k, n in lists if len(e[k]) != n]
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}: {part} entry {name!r} is malformed ({err})") from err
            if bad:
                raise ValueError(
                    f"{path}: {part} entry {name!r} has {bad} of the wrong length "
                    f"({g} groups, {e['channels']} channels)"
                )
            if "channel_order" in e:
                if part != "weights":
                    raise ValueError(
                        f"{path}: acts entry {name!r} has a channel_order (weights only)"
                    )
                check_order(
                    e["channel_order"], int(e["channels"]), f"{path}: weights entry {name!r}"
                )
            if any((not isinstance(b, int)) or b < 0 for b in e["bits"]):
                raise ValueError(f"{path}: {part} entry {name!r} has invalid bits {e['bits']}")
            if part == "weights":
                axis = e.get("group_axis", "out")
                shape = list(e.get("shape", []))
                if (
                    axis not in GROUP_AXES
                    or len(shape) < 2
                    or (shape[group_dim(axis)] != int(e["channels"]))
                ):
                    raise ValueError(
                        f"{path}: weights entry {name!r} has {e['channels']} channels, group "
                        f"axis {axis!r} and shape {shape}, which do not agree"
                    )
            # A step may be missing only where the group is all zeros: 0 bits, or the 1-bit
            # dead-zone quantizer of a weight group (ternary by the authors' rule).
            floor = 1 if part == "acts" or entry_rule(e, "deadzone") else 2
            group_steps = (
                [e["step_log2"][c0:c1] for c0, c1 in bounds]
                if per_channel
                else [[s] for s in e["step_log2"]]
            )
            if any(
                s is None and b >= floor
                for b, ss in zip(e["bits"], group_steps, strict=True)
                for s in ss
            ):
                raise ValueError(
                    f"{path}: {part} entry {name!r} lacks a step for a group "
                    f"with {floor} or more bits"
                )
    return alloc
