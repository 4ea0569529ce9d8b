"""From curve sets to allocations: the item table, constraints, targets and solving (the
allocation file itself: :mod:`rdoq.allocfile`).

Items are the channel groups of every weight layer (rate = bits × weights, stored once) followed by
the channel groups of every quantized activation tensor (rate = bits × elements per sample), as in
the paper's DP and Lagrangian (DESIGN §1, §8). Column ``k`` of the table is bit width ``k``; a
weight group's distortion at ``k`` bits is the best over its dead-zone ratios, and the step / dead
zone of that best point is what :mod:`rdoq.apply` uses.

An allocation (DESIGN §5, ``allocation_{target}.json``, :mod:`rdoq.allocfile`) is
self-contained: per layer the group size, channel count, bits, steps and dead zones (and, for
activations, the grid sign and the ``-bca`` offsets), plus the curve sets' digests, so it can be
re-applied and re-evaluated without the curves.

Its length (about 550 lines): building the table from the curve sets (padding, smoothing, entropy
rates) and turning targets into solver budgets under the constraints are kept with the table
they define; the solvers are :mod:`rdoq.solvers`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rdoq.adapters.base import InputError
from rdoq.groups import group_bounds, group_dim
from rdoq.solvers import (
    DP_MAX_CELLS,
    choice_totals,
    constrain,
    expand_layers,
    fill_budget,
    lagrangian_frontier,
    merge_layers,
    monotone_fit,
    solve_dp_multi,
    solve_lagrangian,
)
from rdoq.store import CurveStore, LayerCurves, check_same_model, meta_digest

SOLVERS = ("dp", "lg")
# What a table's ``rate`` counts: fixed-width bits × elements, or the entropy of the quantized
# symbols × elements (rdoq.entropy).
RATES = ("bits", "entropy")
WEIGHT, ACT = 0, 1


@dataclass
class LayerEntry:
    """One quantizable tensor of the table: a weight (``kind`` 0) or an activation (1)."""

    kind: int
    name: str
    type: str
    shape: tuple[int, ...]  # weight shape, or per-sample activation shape
    channels: int
    group_size: int
    rows: slice  # its items in the table
    signed: np.ndarray | None = None  # (G,) activations: signed grid per group
    # Weights with per-channel steps: base step per (channel, dead zone, bits) and φ per
    # (channel, dead zone); None: one step per group (the paper's quantizer).
    channel_step_log2: np.ndarray | None = None  # (C, D, B)
    channel_deadzone: np.ndarray | None = None  # (C, D)
    # Weights sorted before grouping (--sort_channels): group g holds the channels
    # channel_order[c0:c1], and the per-channel arrays above are in that order; None: unsorted.
    channel_order: np.ndarray | None = None  # (C,)
    # Weights: the channels the groups gather (rdoq.groups.GROUP_AXES).
    group_axis: str = "out"


@dataclass
class ItemTable:
    """The padded solver table of all items (DESIGN §8) plus what is needed to apply a choice."""

    dist: np.ndarray  # (I, K) float64, inf = not allowed
    rate: np.ndarray  # (I, K) bits × numel, or entropy × numel (rate_kind "entropy")
    numel: np.ndarray  # (I,)
    kind: np.ndarray  # (I,) WEIGHT or ACT
    layer: np.ndarray  # (I,) index into layers
    step_log2: np.ndarray  # (I, K)
    deadzone: np.ndarray  # (I, K)
    source: np.ndarray  # (I, K) column whose quantizer realises each column (smoothing)
    dz_index: np.ndarray  # (I, K) dead-zone ratio index of each column's quantizer
    bits: np.ndarray  # (K,)
    layers: list[LayerEntry]
    model: str
    curve_sets: dict[str, dict[str, Any]]
    act_mode: str | None
    fp_acts: list[str] = field(default_factory=list)
    rate_kind: str = "bits"  # what ``rate`` counts, one of RATES
    # Entropy (bits per element) of the point each column realises: NaN for activation items
    # of curve sets without it; None when the weight curves carry no entropy.
    entropy: np.ndarray | None = None  # (I, K)

    def part_numel(self, kind: int | None) -> float:
        """Elements of the items of ``kind`` (None: all items)."""
        rows = self.numel if kind is None else self.numel[self.kind == kind]
        return float(rows.sum())


def _pad(a: np.ndarray, k: int, fill: float) -> np.ndarray:
    out = np.full((a.shape[0], k), fill, dtype=np.float64)  # (G, K)
    out[:, : a.shape[1]] = a
    return out


def build_table(
    weights: CurveStore,
    acts: CurveStore | None,
    fp_act_layers: list[str] | None = None,
    uniform_only: bool = False,
    act_channel_dims: dict[str, int] | None = None,
    rate: str = "bits",
) -> ItemTable:
    """The item table of a weight curve set and (optionally) an activation curve set.

    ``fp_act_layers`` names activation layers kept in full precision (no items);
    ``uniform_only`` keeps only dead-zone ratio 0 (the paper's ``--closedeadzone 1``);
    ``act_channel_dims`` gives each activation layer's channel axis in the per-sample shape
    (from the model: ``rdoq.groups.channel_dim``); without it, layers whose type name contains
    "Conv" have channels first, others last.

    ``rate`` (one of :data:`RATES`): ``"bits"`` charges a column ``bits × numel``;
    ``"entropy"`` charges ``entropy × numel`` of the point the column realises, i.e. of the dead
    zone chosen for that width by distortion (the entropy does not take part in that choice: a
    column stays one measured point, and the allocation keeps one quantizer per width). It
    needs curves that store ``entropy`` (weights, and activations when the table has activation
    items); otherwise :class:`InputError` names the fix.
    """
    if rate not in RATES:
        raise ValueError(f"rate must be one of {RATES}, got {rate!r}")
    skip = set(fp_act_layers or [])
    if acts is not None:
        check_same_model(weights.meta, acts.meta)
    stores = [(WEIGHT, weights)] + ([(ACT, acts)] if acts is not None else [])
    n_cols = max(len(s.meta["bits"]) for _, s in stores)
    for _, s in stores:
        if list(s.meta["bits"]) != list(range(len(s.meta["bits"]))):
            raise ValueError(f"{s.root}: bits {s.meta['bits']} are not 0..nr-1")
    act_names = set(acts.layer_names()) if acts is not None else set()
    unknown = sorted(skip - act_names)
    if acts is not None and unknown:
        raise ValueError(
            f"activation layers {unknown} to keep in full precision are not in "
            f"{acts.root}; valid names: {sorted(act_names)[:8]}…"
        )
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("dist", "step", "dz", "dzi", "numel", "kind", "layer", "entropy")
    }
    # Weight / activation layer files without entropy (curve sets made before it was stored).
    no_entropy: list[Path] = []
    no_act_entropy: list[Path] = []
    layers: list[LayerEntry] = []
    start = 0
    for kind, store in stores:
        for entry in store.meta["layers"]:
            name = entry["name"]
            if kind == ACT and name in skip:
                continue
            c = store.read_layer(name)
            entropy = c.extra.get("entropy")  # (G, D, B)
            if uniform_only:
                c = LayerCurves(
                    c.dist[:, :1], c.step_log2[:, :1], c.deadzone[:, :1], c.numel, c.extra
                )
                entropy = entropy[:, :1] if entropy is not None else None
            g = c.dist.shape[0]
            best = np.argmin(np.where(np.isnan(c.dist), np.inf, c.dist), axis=1)  # (G, B)
            pick = best[:, None, :]

            def take(a: np.ndarray, pick: np.ndarray = pick) -> np.ndarray:
                return np.take_along_axis(a, pick, axis=1)[:, 0, :]  # (G, B)

            dist = take(c.dist)  # (G, B)
            if not np.isfinite(dist[:, 0]).all() or np.isnan(dist).any():
                raise ValueError(
                    f"{store.layer_path(name)} holds non-finite distortions; "
                    f"recompute that layer (delete the file and re-run)"
                )
            shape = tuple(entry["shape"])
            axis = store.meta.get("group_axis", "out") if kind == WEIGHT else "out"
            if kind == WEIGHT:
                channels = shape[group_dim(axis)]
            elif act_channel_dims is not None and name in act_channel_dims:
                dim = act_channel_dims[name]
                channels = shape[dim - 1] if dim > 0 else shape[dim]
            else:
                channels = shape[0] if "Conv" in entry["type"] else shape[-1]
            signed = None
            if kind == ACT:
                signed = np.asarray(c.extra.get("signed", np.ones(g, dtype=bool)), dtype=bool)
            gs = int(store.meta["group_size"])
            if len(group_bounds(channels, gs)) != g:
                raise ValueError(
                    f"{store.layer_path(name)}: {g} groups do not match "
                    f"{channels} channels in groups of {gs}"
                )
            cols["dist"].append(_pad(dist, n_cols, np.inf))
            cols["step"].append(_pad(take(c.step_log2), n_cols, 0.0))
            cols["dz"].append(_pad(take(c.deadzone), n_cols, 0.0))
            cols["dzi"].append(_pad(best, n_cols, 0).astype(np.int64))
            if entropy is None:
                (no_entropy if kind == WEIGHT else no_act_entropy).append(store.layer_path(name))
            cols["entropy"].append(
                _pad(
                    take(entropy) if entropy is not None else np.full(dist.shape, np.nan),
                    n_cols,
                    0.0,
                )
            )
            cols["numel"].append(np.asarray(c.numel, dtype=np.float64))
            cols["kind"].append(np.full(g, kind))
            cols["layer"].append(np.full(g, len(layers)))
            per_channel = store.meta.get("steps") == "channel"
            if per_channel and "channel_step_log2" not in c.extra:
                raise ValueError(
                    f"{store.layer_path(name)} lacks the per-channel steps its "
                    f"curve set's meta.json promises; recompute that layer"
                )
            layers.append(
                LayerEntry(
                    kind,
                    name,
                    entry["type"],
                    shape,
                    channels,
                    gs,
                    slice(start, start + g),
                    signed,
                    c.extra["channel_step_log2"] if per_channel else None,
                    c.extra["channel_deadzone"] if per_channel else None,
                    c.extra.get("channel_order") if kind == WEIGHT else None,
                    axis,
                )
            )
            start += g
    if rate == "entropy" and no_entropy:
        raise InputError(
            f"weight curve set {weights.root} has no entropy rates ({len(no_entropy)} "
            f"layer files lack the 'entropy' array, e.g. {no_entropy[0].name}: made "
            f"before entropy rates were stored); make the curves again with the "
            f"curve script into a new --outdir (an existing one resumes and keeps "
            f"its files), or use --rate bits"
        )
    if rate == "entropy" and no_act_entropy:
        raise InputError(
            f"activation curve set {acts.root} has no entropy rates ({len(no_act_entropy)} "
            f"layer files lack the 'entropy' array, e.g. {no_act_entropy[0].name}: made "
            f"before activation entropy was stored); make the activation curves again into "
            f"a new --outdir, pass --weights-only, or use --rate bits"
        )
    bits = np.arange(n_cols)
    numel = np.concatenate(cols["numel"])  # (I,)
    dist = np.concatenate(cols["dist"])  # (I, K)
    entropy_t = None if no_entropy else np.concatenate(cols["entropy"])  # (I, K)
    rates = (
        numel[:, None] * entropy_t if rate == "entropy" else numel[:, None] * bits[None, :]
    )  # (I, K)
    curve_sets = {"weight": {"path": str(weights.root), "digest": meta_digest(weights.meta)}}
    if acts is not None:
        curve_sets["act"] = {"path": str(acts.root), "digest": meta_digest(acts.meta)}
    return ItemTable(
        dist=dist,
        rate=rates,
        numel=numel,
        kind=np.concatenate(cols["kind"]),
        layer=np.concatenate(cols["layer"]),
        step_log2=np.concatenate(cols["step"]),
        deadzone=np.concatenate(cols["dz"]),
        source=np.broadcast_to(np.arange(n_cols), dist.shape).copy(),
        dz_index=np.concatenate(cols["dzi"]),
        bits=bits,
        layers=layers,
        model=str(weights.meta["model"]),
        curve_sets=curve_sets,
        act_mode=acts.meta.get("act_mode") if acts is not None else None,
        fp_acts=sorted(skip & act_names),
        rate_kind=rate,
        entropy=entropy_t,
    )


def restrict(
    table: ItemTable,
    *,
    allowed_bits: list[int] | None = None,
    min_bits: int | None = None,
    max_bits: int | None = None,
    smooth: bool = False,
    monotone: bool | np.ndarray = False,
) -> ItemTable:
    """Apply hardware constraints (``inf`` where a bit width is not allowed) and, with
    ``smooth``, a running minimum over bits (the paper's ``--smooth-dists``), or, with
    ``monotone`` (all items, or a mask ``(I,)`` from :func:`monotone_items`), each curve's
    least-squares non-increasing fit over its allowed widths (:func:`rdoq.solvers.monotone_fit`:
    every width keeps its own quantizer; a run of widths whose estimates rise is replaced by its
    mean).

    The running minimum makes every curve non-increasing: a group's distortion at ``b`` bits
    becomes the best reachable with at most ``b`` bits. The ``source`` column records which width
    reaches it, and :func:`choice_columns` maps a chosen width back to that width, so an
    allocation only ever uses measured points (and never pays for bits that do not help).
    With entropy rates a smoothed column also costs (and reports) the entropy of the point it
    realises: that point's entropy may exceed the column's own.
    """
    if allowed_bits is not None:
        bad = sorted(set(allowed_bits) - set(table.bits.tolist()))
        if bad:
            raise ValueError(
                f"allowed bit widths {bad} are not in the curves (bits "
                f"0..{int(table.bits[-1])}); pick from those"
            )
    dist = constrain(
        table.dist, table.bits, allowed_bits=allowed_bits, min_bits=min_bits, max_bits=max_bits
    )  # (I, K)
    source = np.broadcast_to(np.arange(dist.shape[1]), dist.shape).copy()  # (I, K)
    if smooth:
        best = np.full(dist.shape[0], np.inf)
        best_col = np.zeros(dist.shape[0], dtype=np.int64)
        for k in range(dist.shape[1]):
            ok = np.isfinite(dist[:, k])
            better = ok & (dist[:, k] < best)
            best = np.where(better, dist[:, k], best)
            best_col = np.where(better, k, best_col)
            # Only allowed columns are smoothed; a disallowed one stays disallowed.
            dist[ok, k] = best[ok]
            source[ok, k] = best_col[ok]
    idx = np.arange(dist.shape[0])[:, None]
    entropy = table.entropy[idx, source] if table.entropy is not None else None  # (I, K)
    rate = table.rate[idx, source] if table.rate_kind == "entropy" else table.rate  # (I, K)
    rows = np.broadcast_to(np.asarray(monotone, dtype=bool), (dist.shape[0],))  # (I,)
    if rows.any():
        dist[rows] = monotone_fit(dist[rows], rate[rows])
    out = ItemTable(
        **{**table.__dict__, "dist": dist, "source": source, "rate": rate, "entropy": entropy}
    )
    return out


MONOTONE_MODES = ("auto", "on", "off")


def monotone_items(table: ItemTable, mode: str, weights_bias_corrected: bool) -> np.ndarray:
    """Which items' curves get the monotone fit (``--monotone``), ``(I,)`` bool.

    ``on``: all; ``off``: none (the paper's raw curves); ``auto``: the weight groups when their
    curves were measured after ``-bcw``, else none. Why: without the correction, a group's
    output error keeps its mean part ``E[(W - Ŵ) x]``, which follows the rounding of a few
    weights, is not monotone in the width and carries over to other data (on EfficientNet-Lite1
    the raw curves' 7-bit choices beat 8 bits on the evaluation images too); after ``-bcw`` the
    mean part is gone, what remains shrinks with the step in expectation, and a rise from one
    width to the next is calibration noise (the raw 7-bit choices lost 7 % output MSE on the
    evaluation images). Activation curves (with or without ``-bca`` inside) are left as
    measured: the fit's benefit was measured for weights only.
    """
    if mode not in MONOTONE_MODES:
        raise ValueError(f"--monotone must be one of {MONOTONE_MODES}, got {mode!r}")
    if mode == "on":
        return np.ones(len(table.kind), dtype=bool)
    if mode == "off" or not weights_bias_corrected:
        return np.zeros(len(table.kind), dtype=bool)
    return table.kind == WEIGHT


def choice_columns(table: ItemTable, choice: np.ndarray) -> np.ndarray:
    """The column each item's quantizer really uses (``source`` after smoothing)."""
    return table.source[np.arange(len(choice)), choice]


def target_range(table: ItemTable, kind: int | None) -> tuple[float, float]:
    """Smallest and largest reachable average bits of items of ``kind`` (None = all)."""
    rows = np.ones(len(table.kind), bool) if kind is None else table.kind == kind
    allowed = np.isfinite(table.dist[rows])  # (I, K)
    rate = table.rate[rows]
    n = table.part_numel(kind)
    lo = float(np.where(allowed, rate, np.inf).min(axis=1).sum()) / n
    hi = float(np.where(allowed, rate, -np.inf).max(axis=1).sum()) / n
    return lo, hi


def check_targets(table: ItemTable, targets: list[float], kind: int | None, flag: str) -> None:
    """Every target within the reachable range, or an error naming it and the range."""
    lo, hi = target_range(table, kind)
    what = (
        "average entropy bits per element (--rate entropy)"
        if table.rate_kind == "entropy"
        else "average bit widths"
    )
    for t in targets:
        if not math.isfinite(t) or t < lo - 1e-12 or t > hi + 1e-12:
            raise ValueError(
                f"{flag} {t} is outside the reachable {what} "
                f"[{lo:.4g}, {hi:.4g}] under the constraints (bits, --minrate, "
                f"--bit_list, --maxbits); choose a target in that range"
            )


def _solve_part(
    dist: np.ndarray,
    rate: np.ndarray,
    budgets: list[float],
    solver: str,
    layer: np.ndarray | None,
    max_cells: int,
    fill: bool = False,
) -> tuple[list[np.ndarray], list[dict[str, float]]]:
    """Choices ``(I,)`` per budget and, per budget, what the solver did (see
    :class:`Solved`); with ``fill``, what the solver leaves of each budget goes to upgrades that
    do not raise a distortion (:func:`rdoq.solvers.fill_budget`, on whole layers when
    ``layer`` is given)."""
    item_layer = None
    if layer is not None:
        dist, rate, item_layer = merge_layers(dist, rate, layer)
    if solver == "dp":
        res = solve_dp_multi(dist, rate, budgets, max_cells=max_cells)
        choices = list(res.choices)
        dp = {
            "dp_resolution_bits": res.resolution,
            "dp_slack_bits": res.slack,
            "dp_cells": res.cells,
        }
    elif solver == "lg":
        choices = [solve_lagrangian(dist, rate, b) for b in budgets]
        dp = {}
    else:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    solved_rates = [choice_totals(dist, rate, c)[0] for c in choices]
    if fill:
        choices = [fill_budget(dist, rate, c, b) for c, b in zip(choices, budgets, strict=True)]
    records = []
    for b, c, r0 in zip(budgets, choices, solved_rates, strict=True):
        r = choice_totals(dist, rate, c)[0]
        records.append(
            {
                "budget_bits": float(b),
                "rate_bits": r,
                **dp,
                **({"fill_bits": r - r0} if fill else {}),
            }
        )
    return (
        [expand_layers(c, item_layer) if item_layer is not None else c for c in choices],
        records,
    )


def _check_layerwise(table: ItemTable, layerwise: bool) -> None:
    # Smoothing maps each group to its own source width, which would split a layer again.
    if layerwise and (table.source != np.arange(table.source.shape[1])).any():
        raise ValueError(
            "--smooth-dists cannot be combined with --layerwise (smoothing moves "
            "single groups to other bit widths); drop one of them"
        )


@dataclass(frozen=True)
class Solved:
    """Result of :func:`solve_recorded`: the choice ``(I,)`` per target, the solver seconds,
    and per target a flat record of what the solver did, for the allocation's ``summary``.

    A record holds ``budget_bits`` (the rate budget, bits) and ``rate_bits`` (the rate the
    choice spends, at most the budget) and, for the DP, ``dp_resolution_bits`` (one budget cell:
    rates are rounded *up* to whole cells), ``dp_slack_bits`` (the most that rounding can cost:
    the choice is at least as good as the exact optimum at ``budget_bits - dp_slack_bits``; 0 =
    exact) and ``dp_cells``. With separate weight / activation budgets every key comes twice,
    suffixed ``_w`` and ``_a``.
    """

    choices: list[np.ndarray]
    seconds: float
    records: list[dict[str, float]]


def solve_recorded(
    table: ItemTable,
    targets: list[float],
    solver: str,
    act_targets: list[float] | None = None,
    layerwise: bool = False,
    max_cells: int = DP_MAX_CELLS,
    fill: bool = False,
) -> Solved:
    """Choices for each target, the solver seconds and what the solver did (:class:`Solved`).

    Joint budget (the paper): ``target × (weights + activation elements per sample)``. With
    ``act_targets`` (one per target, or one for all), weights and activations get separate
    budgets ``target × weights`` and ``act_target × activation elements``. ``max_cells`` bounds
    the DP table (:func:`rdoq.solvers.dp_resolution`). ``fill`` spends what the solver leaves
    of a budget on upgrades that raise no distortion (``fill_bits`` in the record).
    """
    t0 = time.perf_counter()
    _check_layerwise(table, layerwise)
    layer = table.layer if layerwise else None
    if act_targets is None:
        check_targets(table, targets, None, "--target_rates")
        budgets = [t * table.part_numel(None) for t in targets]
        choices, records = _solve_part(
            table.dist, table.rate, budgets, solver, layer, max_cells, fill
        )
    else:
        if len(act_targets) not in (1, len(targets)):
            raise ValueError(
                f"--act-target-rates takes one value or one per --target_rates "
                f"({len(targets)}), got {len(act_targets)}"
            )
        if not (table.kind == ACT).any():
            raise ValueError("--act-target-rates needs activation curves (--act_curve_root_dir)")
        act_targets = act_targets * len(targets) if len(act_targets) == 1 else act_targets
        check_targets(table, targets, WEIGHT, "--target_rates")
        check_targets(table, act_targets, ACT, "--act-target-rates")
        choices = [np.zeros(len(table.kind), dtype=np.int64) for _ in targets]
        records = [{} for _ in targets]
        for kind, tt, suffix in ((WEIGHT, targets, "_w"), (ACT, act_targets, "_a")):
            rows = np.flatnonzero(table.kind == kind)
            budgets = [t * table.part_numel(kind) for t in tt]
            part, part_records = _solve_part(
                table.dist[rows],
                table.rate[rows],
                budgets,
                solver,
                None if layer is None else layer[rows],
                max_cells,
                fill,
            )
            for c, p, rec, prec in zip(choices, part, records, part_records, strict=True):
                c[rows] = p
                rec.update({k + suffix: v for k, v in prec.items()})
    return Solved([choice_columns(table, c) for c in choices], time.perf_counter() - t0, records)


def frontier_choices(
    table: ItemTable, slopes_log2: list[float], layerwise: bool = False
) -> tuple[np.ndarray, float]:
    """Choices ``(I, S)`` of the Lagrangian slope sweep ``λ = 2^slope`` (dist per bit)."""
    t0 = time.perf_counter()
    _check_layerwise(table, layerwise)
    lam = np.exp2(np.asarray(slopes_log2, dtype=np.float64))  # (S,)
    if layerwise:
        dist, rate, item_layer = merge_layers(table.dist, table.rate, table.layer)
        out = lagrangian_frontier(dist, rate, lam)[item_layer]  # (I, S)
    else:
        out = lagrangian_frontier(table.dist, table.rate, lam)  # (I, S)
    rows = np.arange(out.shape[0])[:, None]
    return table.source[rows, out], time.perf_counter() - t0
