"""Curve generation jobs: one layer at a time, resumable, the same for every estimator.

Its length (about 730 lines): the job (settings and their checks), the layer plans and their
split into parts, the search chains of both kinds and the per-layer loop for both estimators
(also used by :mod:`rdoq.remeasure`), so that one curve-set layout comes from one place; the
estimators themselves live in :mod:`rdoq.engine` and :mod:`rdoq.hessian`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from rdoq.actstats import ActGroupStats, act_group_stats, act_group_stats_of, act_values
from rdoq.authors import CURVE_PARTS, CURVE_RULES
from rdoq.backends import ActBackend, WeightBackend, weight_input_means
from rdoq.engine import MeasuredEngine
from rdoq.entropy import act_curve_entropy, curve_entropy
from rdoq.groups import (
    GROUP_AXES,
    WeightGroups,
    act_group_numel,
    channel_dim,
    find_layers,
    group_bounds,
    group_dim,
    group_view,
    is_sparse_conv,
    weight_numel,
)
from rdoq.hessian import GradientSweep, HessianSettings
from rdoq.hessian_backends import HessianActBackend, HessianWeightBackend
from rdoq.naive import NaiveEvaluator
from rdoq.parts import PartSpec, assign_parts, layer_macs, suffix_costs
from rdoq.probe import act_shapes, probe
from rdoq.quantizers import deadzone_threshold
from rdoq.search import (
    Chain,
    ScaleChain,
    ScaleSettings,
    SearchSettings,
    chains_to_arrays,
    run_chains,
    scale_grid,
)
from rdoq.sorting import SORT_STATS, channel_order, sortable, sorted_channels
from rdoq.steps import STEP_MODES, ChannelSteps
from rdoq.store import CurveStore, LayerCurves

log = logging.getLogger(__name__)

ESTIMATORS = ("measured", "hessian")


@dataclass(frozen=True)
class CurveJob:
    """Settings of one curve-generation run (``kind`` weight|act, ``act_mode`` in|out)."""

    kind: str
    group_size: int
    nr: int
    ndz: int
    max_steps: int
    step_grid: int
    act_mode: str | None = None
    estimator: str = "measured"
    precision: str = "float64"
    max_batch: int = 16
    max_lookahead: int = 1
    mem_budget_mb: float = 2048.0
    use_cuts: bool = True
    progress: bool = True
    argv: list[str] = field(default_factory=list)
    hessian: HessianSettings | None = None  # estimator="hessian" only
    sweep_batch: int = 16  # samples per forward/backward of the gradient sweep
    # Weights: "channel" (per-channel MSE-optimal steps times a group scale from
    # ``scales_log2``) or "group" (the paper's one power-of-two step per group).
    step_mode: str = "channel"
    scales_log2: tuple[float, ...] = scale_grid(1.0, 4)
    # Curves of the layer after the bias correction that deployment applies: -bcw (weights),
    # -bca (activations).
    bias_corr: bool = False
    # Also store each of this many calibration folds' own curve (``dist_folds``), for the
    # cross-validated shrinkage of the allocation (rdoq.shrink).
    folds: int = 0
    # Only these layers (names, in the model's order), e.g. a detector's chosen layer sets;
    # None: every quantizable layer.
    layers: tuple[str, ...] | None = None
    # Weights: sort each layer's output channels by this statistic before cutting groups
    # (rdoq.sorting, the paper's --sort_channels); None: the channels' own order.
    sort_channels: str | None = None
    # --authors-semantics parts this curve set carries (rdoq.authors.curve_parts).
    authors: tuple[str, ...] = ()
    # Weights: the channels groups gather (rdoq.groups.GROUP_AXES): "out" or "in".
    group_axis: str = "out"

    def __post_init__(self) -> None:
        if self.kind not in ("weight", "act"):
            raise ValueError(f"kind must be 'weight' or 'act', got {self.kind!r}")
        if self.kind == "act" and self.act_mode not in ("in", "out"):
            raise ValueError(f"act_mode must be 'in' or 'out', got {self.act_mode!r}")
        if self.group_size <= 0:
            raise ValueError(f"--nchannelbatch must be > 0, got {self.group_size}")
        if self.nr < 2:
            raise ValueError(f"--maxrates must be >= 2 (bit widths 0..maxrates-1), got {self.nr}")
        if self.ndz < 1:
            raise ValueError(f"--maxdeadzones must be >= 1, got {self.ndz}")
        if self.precision not in ("float32", "float64"):
            raise ValueError(f"--precision must be float32 or float64, got {self.precision!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if (self.estimator == "hessian") != (self.hessian is not None):
            raise ValueError("estimator='hessian' needs HessianSettings (and only it)")
        if self.step_mode not in STEP_MODES:
            raise ValueError(f"step mode must be one of {STEP_MODES}, got {self.step_mode!r}")
        ScaleSettings(tuple(range(self.nr)), tuple(self.scales_log2))
        if self.folds < 0 or self.folds == 1:
            raise ValueError(f"--folds must be 0 (none) or >= 2, got {self.folds}")
        if self.group_axis not in GROUP_AXES:
            raise ValueError(f"--group-axis must be one of {GROUP_AXES}, got {self.group_axis!r}")
        if self.group_axis == "in":
            clash = [
                flag
                for flag, on in (
                    ("activation curves", self.kind != "weight"),
                    ("--sort_channels (it orders output channels)", self.sort_channels),
                    ("-bcw (its correction is per output channel)", self.bias_corr),
                )
                if on
            ]
            if clash:
                raise ValueError(
                    f"--group-axis in (input-channel weight groups) is not offered with "
                    f"{', '.join(clash)}; drop one of them"
                )
        bad = [p for p in self.authors if p not in CURVE_PARTS[self.kind]]
        if bad:
            raise ValueError(f"--authors-semantics {bad} does not apply to {self.kind} curves")
        if self.channel_steps and any(p in CURVE_RULES for p in self.authors):
            raise ValueError(
                f"--authors-semantics {[p for p in self.authors if p in CURVE_RULES]} "
                f"are rules of the paper's one step per group: use --steps group"
            )
        if self.sort_channels is not None:
            if self.sort_channels not in SORT_STATS:
                raise ValueError(
                    f"--sort_channels {self.sort_channels!r} is not one of {SORT_STATS}"
                )
            if self.kind != "weight":
                raise ValueError(
                    "--sort_channels orders weight channels; activation curves keep the "
                    "channels' own order: drop the flag"
                )
            if self.estimator != "measured":
                raise ValueError(
                    "--sort_channels is not offered with the second-order estimator (its "
                    "gradient sweep runs before any layer is sorted); use the measured "
                    "estimator (generate_RD_curves_batch.py)"
                )

    @property
    def bias_fold(self) -> bool:
        """Whether the curves are measured after this project's ``-bcw`` / ``-bca`` (not when
        the authors' replaces it: their affine ``-bcw`` is in the candidates, their ``-bca``
        never reached the curves)."""
        return self.bias_corr and not any(p in self.authors for p in ("bcw", "bca"))

    @property
    def channel_steps(self) -> bool:
        """Whether the curves use per-channel steps times a searched group scale."""
        return self.step_mode == "channel"

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.precision)

    def search_settings(self) -> SearchSettings:
        return SearchSettings(
            bits=tuple(range(self.nr)),
            step_grid=self.step_grid,
            max_steps=self.max_steps,
            stop_on_aux=self.kind == "weight",
            authors_search="search" in self.authors,
            authors_dz="deadzone" in self.authors,
            affine="bcw" in self.authors,
        )

    def scale_settings(self) -> ScaleSettings:
        return ScaleSettings(
            tuple(range(self.nr)), tuple(self.scales_log2), affine="bcw" in self.authors
        )


@dataclass
class LayerPlan:
    """One layer of the curve set: name, type, shape, group bounds and elements per group."""

    name: str
    type: str
    shape: tuple[int, ...]
    bounds: list[tuple[int, int]]
    numel: np.ndarray  # (G,)

    def meta(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "shape": list(self.shape),
            "groups": len(self.bounds),
            "numel": int(self.numel.sum()),
        }


def plan_layers(model: nn.Module, x1: torch.Tensor, job: CurveJob) -> list[LayerPlan]:
    """The layers and groups a job covers (weights: weight shapes; acts: per-sample shapes)."""
    layers = [lay for lay in find_layers(model) if job.layers is None or lay.name in job.layers]
    modules = dict(model.named_modules())
    plans = []
    if job.kind == "weight":
        sparse = [lay.name for lay in layers if is_sparse_conv(modules[lay.name])]
        if job.group_axis != "out" and sparse:
            raise ValueError(
                f"--group-axis {job.group_axis} is not offered for spconv layers "
                f"({sparse[:4]}); use --group-axis out"
            )
        for layer in layers:
            channels = layer.shape[group_dim(job.group_axis)]
            bounds = group_bounds(channels, job.group_size)
            numel = np.array([weight_numel(layer.shape, b, job.group_axis) for b in bounds])
            plans.append(LayerPlan(layer.name, layer.type, layer.shape, bounds, numel))
        return plans
    sparse_layers = [layer.name for layer in layers if is_sparse_conv(modules[layer.name])]
    if sparse_layers and job.estimator == "hessian":
        # The sweep stores activations (N, …) of one shape per sample; a frame's active sites
        # vary in number.
        raise ValueError(
            f"second-order activation curves of spconv layers are not offered "
            f"({sparse_layers[:4]}): their features (N_active, C) differ in size "
            f"from frame to frame; use the measured estimator for them"
        )
    shapes = act_shapes(model, x1, [layer.name for layer in layers], job.act_mode)
    skipped = [layer.name for layer in layers if layer.name not in shapes]
    if skipped:
        log.warning(
            "no activation curves for layers whose forward is never called (their "
            "weight is used by a parent module); they stay in full precision: %s",
            skipped,
        )
    for layer in layers:
        if layer.name not in shapes:
            continue
        mod, shape = modules[layer.name], shapes[layer.name]
        channels = shape[0] if isinstance(mod, nn.Conv2d) else shape[-1]
        bounds = group_bounds(channels, job.group_size)
        numel = np.array([act_group_numel(shape, mod, b) for b in bounds])
        plans.append(LayerPlan(layer.name, layer.type, tuple(shape), bounds, numel))
    return plans


def max_rows_for(model: nn.Module, x1: torch.Tensor, budget_mb: float) -> int:
    """Samples per forward that fit ``budget_mb``: the widest activation of one sample (a leaf
    module's output) times a working-set factor of 8 (attention maps, MLP hidden states and
    temporaries)."""
    widest = max(
        (
            c.out.numel * c.out.element_size
            for c in probe(model, x1).calls
            if c.out.kind == "tensor"
        ),
        default=0,
    )
    return max(int(budget_mb * 2**20 // max(8 * widest, 1)), 1)


def assign_folds(units: Sequence[Any], count: int) -> tuple[np.ndarray, str]:
    """The fold of each calibration sample ``(N,)`` and what the folds split: ``units`` names
    each sample's source (e.g. the image a crop was cut from), so that crops of one image stay
    in one fold and a held-out fold is as new to the curves as the evaluation data is. Units
    are dealt round robin in order of first appearance; with fewer units than ``count`` each
    unit is a fold. ``by`` is "unit" when some unit holds several samples, else "sample"."""
    order: dict[Any, int] = {}
    for u in units:
        order.setdefault(u, len(order))
    n_folds = min(count, len(order))
    if n_folds < 2:
        raise ValueError(
            f"--folds {count} needs at least 2 distinct calibration sources, the "
            f"calibration set has {len(order)}; use more calibration samples or "
            f"--folds 0"
        )
    fold_of = np.array([order[u] % n_folds for u in units], dtype=np.int64)  # (N,)
    return fold_of, "unit" if len(order) < len(units) else "sample"


def build_meta(
    job: CurveJob,
    model_info: dict[str, Any],
    calib: dict[str, Any],
    plans: list[LayerPlan],
    estimator_params: dict[str, Any] | None = None,
    folds: dict[str, Any] | None = None,
) -> dict:
    """meta.json contents for a curve set (DESIGN §5). ``folds``: the calibration folds of
    ``dist_folds`` (count, what they split, the fold of each sample), None without."""
    return {
        "kind": job.kind,
        "estimator": job.estimator,
        "act_mode": job.act_mode if job.kind == "act" else None,
        "model": model_info["arch"],
        "weights_source": model_info["weights_source"],
        "checkpoint_sha256": model_info.get("checkpoint_sha256"),
        "group_size": job.group_size,
        "bits": list(range(job.nr)),
        "ndz": job.ndz if job.kind == "weight" else 1,
        "step_grid": job.step_grid,
        "max_steps": job.max_steps,
        "precision": job.precision,
        "estimator_params": estimator_params or (job.hessian.params() if job.hessian else {}),
        "calib": calib,
        "layers": [p.meta() for p in plans],
        "steps": "channel" if job.channel_steps else "group",
        "scales_log2": list(job.scales_log2) if job.channel_steps else None,
        "bias_corr": job.bias_corr,
        **({"sort_channels": job.sort_channels} if job.sort_channels else {}),
        **({"authors_semantics": list(job.authors)} if job.authors else {}),
        **({"group_axis": job.group_axis} if job.group_axis != "out" else {}),
        "folds": folds,
        "argv": job.argv or sys.argv,
        "created": datetime.now(timezone.utc).isoformat(),
    }


def weight_chains(
    weight: torch.Tensor, plan: LayerPlan, job: CurveJob
) -> list[Chain] | list[ScaleChain]:
    """One chain per (group, dead-zone ratio) of a weight layer."""
    if job.channel_steps:
        settings = job.scale_settings()
        return [
            ScaleChain(g, d, d / job.ndz, settings)
            for g in range(len(plan.bounds))
            for d in range(job.ndz)
        ]
    settings = job.search_settings()
    chains = []
    for g, (c0, c1) in enumerate(plan.bounds):
        w = weight[c0:c1].detach().double()
        rms = float(w.pow(2).mean().sqrt())
        rms_log2 = math.log2(rms) if rms > 0 else -30.0
        lo, hi = float(w.min()), float(w.max())
        for d in range(job.ndz):
            phi = deadzone_threshold(w, d / job.ndz)
            chains.append(Chain(g, d, phi, rms_log2, settings, vmin=lo, vmax=hi))
    return chains


def make_chains(
    model: nn.Module,
    x: torch.Tensor,
    plan: LayerPlan,
    job: CurveJob,
    rows: int,
    values: torch.Tensor | None = None,
) -> tuple[list[Chain], ActGroupStats | None]:
    """The search chains of one layer (and, for activations, its group statistics, from the
    layer's stored calibration activations ``values`` when given, else from forwards)."""
    modules = dict(model.named_modules())
    if job.kind == "weight":
        return weight_chains(group_view(modules[plan.name].weight, job.group_axis), plan, job), None
    keep = job.channel_steps
    if values is not None:
        stats = act_group_stats_of(values, channel_dim(modules[plan.name]), plan.bounds, keep)
    else:
        stats = act_group_stats(model, x, plan.name, job.act_mode, plan.bounds, rows, keep)
    if job.channel_steps:
        settings = job.scale_settings()
        return [ScaleChain(g, 0, 0.0, settings) for g in range(len(plan.bounds))], stats
    chains = [
        Chain(
            g,
            0,
            0.0,
            float(stats.rms_log2[g]),
            job.search_settings(),
            vmin=float(stats.vmin[g]),
            vmax=float(stats.vmax[g]),
            unsigned=not bool(stats.signed[g]),
        )
        for g in range(len(plan.bounds))
    ]
    return chains, stats


def layer_steps(weight: torch.Tensor, job: CurveJob) -> ChannelSteps | None:
    """The per-channel base steps of a weight layer, per channel of the job's group axis (None:
    the paper's group steps)."""
    if not job.channel_steps:
        return None
    return ChannelSteps.of(group_view(weight, job.group_axis), job.ndz, job.nr)


def act_layer_steps(stats: ActGroupStats, plan: LayerPlan, job: CurveJob) -> ChannelSteps | None:
    """The per-channel base steps of an activation layer, from its calibration sample (None:
    one step per group)."""
    if not job.channel_steps:
        return None
    return ChannelSteps.of_acts(stats.rows, stats.channel_signed(plan.bounds), job.nr)


def layer_backend(
    evaluator: MeasuredEngine | NaiveEvaluator,
    plan: LayerPlan,
    job: CurveJob,
    stats: ActGroupStats | None,
    steps: ChannelSteps | None = None,
):
    """The ``Evaluate`` of one layer on the measured engine or on the naive evaluator (a full
    forward per candidate, the reference): the same steps and ``-bcw`` / ``-bca`` inputs."""
    naive = isinstance(evaluator, NaiveEvaluator)
    rows = evaluator.batch_size if naive else evaluator.max_rows
    if job.kind == "weight":
        if steps is None:
            steps = layer_steps(evaluator.modules[plan.name].weight, job)
        mean = (
            weight_input_means(evaluator.model, evaluator.calib, [plan.name], rows)[plan.name]
            if job.bias_fold
            else None
        )
        groups = WeightGroups(plan.name, plan.bounds, steps, job.group_axis)
        if naive:
            return evaluator.weights(groups, mean)
        return WeightBackend(evaluator, groups, mean, job.max_batch)
    if steps is None:
        steps = act_layer_steps(stats, plan, job)
    if naive:
        return evaluator.acts(
            plan.name, job.act_mode, plan.bounds, stats.signed, steps, job.bias_fold
        )
    values = (
        act_values(evaluator.model, evaluator.calib, plan.name, job.act_mode, rows)
        if job.bias_fold
        else None
    )
    return ActBackend(
        evaluator, plan.name, job.act_mode, plan.bounds, stats, job.max_batch, steps, values
    )


def generate_curves(
    model: nn.Module,
    calib_x: torch.Tensor,
    model_info: dict[str, Any],
    calib_meta: dict[str, Any],
    job: CurveJob,
    root: Path,
    part: PartSpec,
    device: torch.device,
    units: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Measure and store the curves of this part's layers into the curve set ``root``.

    ``units``: the source of each calibration sample (:attr:`rdoq.adapters.base.CalibSet.units`)
    for ``job.folds``; None: every sample its own. Returns a summary: layers written/skipped,
    distinct candidates evaluated, seconds.
    """
    t0 = time.perf_counter()
    model = model.to(device=device, dtype=job.dtype).eval()
    x = calib_x.to(device=device, dtype=job.dtype)
    plans = plan_layers(model, x[:1], job)
    fold_of, folds = None, None
    if job.folds:
        fold_of, by = assign_folds(units if units is not None else range(x.shape[0]), job.folds)
        folds = {"count": int(fold_of.max()) + 1, "by": by, "of_sample": fold_of.tolist()}
    store = CurveStore.open(root, build_meta(job, model_info, calib_meta, plans, folds=folds))
    per_group = job.ndz * job.nr * 4 if job.kind == "weight" else job.nr * 8
    mine, todo = part_plans(model, x[:1], plans, part, per_group, store)
    summary = {
        "curve_set": str(root),
        "layers_total": len(plans),
        "layers_part": len(mine),
        "layers_skipped": len(mine) - len(todo),
        "layers_written": 0,
        "candidates": 0,
    }
    if not todo:
        summary["seconds"] = time.perf_counter() - t0
        return summary
    # Samples per forward of the measured engine (the second-order one needs no forwards here).
    max_rows = 1
    if job.estimator == "hessian":
        # One gradient sweep for all of this part's layers (split only if memory demands it).
        sweep = GradientSweep(
            model,
            x,
            [p.name for p in todo],
            job.kind,
            job.hessian,
            job.act_mode,
            batch_size=job.sweep_batch,
            mem_budget_mb=job.mem_budget_mb,
            progress=job.progress,
            bias_corr=job.bias_fold,
            folds=fold_of,
        )
        log.info(
            "second-order estimator: %d layers in %d gradient sweep(s)", len(todo), sweep.n_sweeps
        )
    else:
        max_rows = max_rows_for(model, x[:1], job.mem_budget_mb)
        engine = MeasuredEngine(model, x, max_rows=max_rows, use_cuts=job.use_cuts, folds=fold_of)

    def backend_for(
        plan: LayerPlan, stats: ActGroupStats | None, steps: ChannelSteps | None
    ) -> Any:
        if job.estimator != "hessian":
            return layer_backend(engine, plan, job, stats, steps)
        if job.kind == "weight":
            groups = WeightGroups(plan.name, plan.bounds, steps, job.group_axis)
            return HessianWeightBackend(sweep, groups)
        return HessianActBackend(sweep, plan.name, plan.bounds, stats, steps, job.bias_fold)

    bar = tqdm(todo, desc=f"{job.kind} curves", unit="layer", disable=not job.progress)
    for plan in bar:
        lt = time.perf_counter()
        values = None
        if job.estimator == "hessian":
            sweep.ensure(plan.name)
            values = sweep.acts.get(plan.name)
        curves, n = layer_curves(
            model, x, plan, job, max_rows, backend_for, values, folds["count"] if folds else 0
        )
        where = (
            "second-order"
            if job.estimator == "hessian"
            else f"cut {engine.cut_for(plan.name) or 'none (full forward)'}"
        )
        record_layer(store, summary, plan, curves, n, lt, where)
    finish_summary(store, summary, t0)
    if job.estimator == "hessian":
        summary["gradient_sweeps"] = sweep.sweeps
    return summary


def part_plans(
    model: nn.Module,
    x1: torch.Tensor,
    plans: list[LayerPlan],
    part: PartSpec,
    per_group: int,
    store: CurveStore,
) -> tuple[list[LayerPlan], list[LayerPlan]]:
    """The layers of ``plans`` that ``part`` measures, and those of them ``store`` still lacks.
    The parts get about equal shares of the estimated cost (groups × ``per_group`` candidates ×
    the MACs from the layer on, measured with the one sample ``x1``), the same split in every
    process."""
    names = [p.name for p in plans]
    macs = layer_macs(model, x1, names)
    costs = suffix_costs(names, macs, {p.name: len(p.bounds) for p in plans}, per_group)
    owner = assign_parts(costs, part.num_parts)
    mine = [p for p, o in zip(plans, owner, strict=True) if o == part.part_id]
    todo = [p for p in mine if not store.has_layer(p.name)]
    log.info(
        "part %d/%d: %d of %d layers, %d already done",
        part.part_id,
        part.num_parts,
        len(mine),
        len(plans),
        len(mine) - len(todo),
    )
    return mine, todo


def record_layer(
    store: CurveStore,
    summary: dict[str, Any],
    plan: LayerPlan,
    curves: LayerCurves,
    n: int,
    started: float,
    how: str,
) -> None:
    """Write one layer's curves (``n`` candidates evaluated), count them in ``summary`` and log
    the layer with ``how`` it was measured and the seconds since ``started``."""
    store.write_layer(plan.name, curves)
    summary["layers_written"] += 1
    summary["candidates"] += n
    log.info(
        "layer %s: %d groups, %d candidates, %s, %.1fs",
        plan.name,
        len(plan.bounds),
        n,
        how,
        time.perf_counter() - started,
    )


def finish_summary(store: CurveStore, summary: dict[str, Any], started: float) -> None:
    """The run summary's last keys: its seconds and the layers the curve set still lacks."""
    summary["seconds"] = time.perf_counter() - started
    summary["missing_layers"] = len(store.missing_layers())


def layer_curves(
    model: nn.Module,
    x: torch.Tensor,
    plan: LayerPlan,
    job: CurveJob,
    max_rows: int,
    backend_for: Callable[..., Any],
    values: torch.Tensor | None = None,
    n_folds: int = 0,
) -> tuple[LayerCurves, int]:
    """Search one layer's curves and return them with the number of distinct candidates
    evaluated. ``backend_for(plan, stats, steps)`` gives the ``Evaluate`` of the estimator
    (measured or second-order); ``values``: the layer's stored calibration activations, if
    any; ``n_folds`` > 0 adds each calibration fold's own curve (``dist_folds``)."""
    with layer_channel_order(model, plan, job) as order:
        chains, stats = make_chains(model, x, plan, job, max_rows, values)
        modules = dict(model.named_modules())
        steps = (
            layer_steps(modules[plan.name].weight, job)
            if job.kind == "weight"
            else act_layer_steps(stats, plan, job)
        )
        backend = backend_for(plan, stats, steps)
        extra: dict[str, np.ndarray] = {"signed": stats.signed} if stats is not None else {}
        if steps is not None:
            extra |= {"channel_step_log2": steps.step_log2, "channel_deadzone": steps.deadzone}
        # Candidates evaluated (chains advance together, so few finish before the end), with the
        # chains done alongside.
        inner = tqdm(desc=plan.name, unit="cand", leave=False, disable=not job.progress)
        done = [0]

        def chain_done(_: Any) -> None:
            done[0] += 1
            inner.set_postfix_str(f"{done[0]}/{len(chains)} chains", refresh=False)

        n = run_chains(
            chains,
            backend,
            job.max_batch,
            on_chain_done=chain_done,
            max_lookahead=job.max_lookahead,
            on_evaluated=inner.update,
        )
        inner.close()
        n_dz = job.ndz if job.kind == "weight" else 1
        dist, step, dz = chains_to_arrays(chains, len(plan.bounds), n_dz, job.nr)
        n_evals = np.zeros(len(plan.bounds), dtype=np.int64)
        for c in chains:
            n_evals[c.group] += c.n_evals
        if n_folds:
            extra["dist_folds"] = fold_curves(chains, backend, dist.shape, n_folds)
        if job.kind == "weight":
            # The entropy rate of every point (--rate entropy), from the weight both
            # estimators quantized, with the point's own quantizer.
            weight = group_view(modules[plan.name].weight.detach(), job.group_axis)
            extra["entropy"] = curve_entropy(
                weight, plan.bounds, step, dz, steps, "deadzone" in job.authors
            )
        else:
            # Of the calibration activations, in one more pass over them.
            rows = max_rows if job.estimator == "measured" else job.sweep_batch
            extra["entropy"] = act_curve_entropy(
                model, x, plan.name, job.act_mode, rows, plan.bounds, stats.signed, step, steps
            )
        curves = LayerCurves(dist, step, dz, plan.numel, {**extra, "n_evals": n_evals})
    if order is not None:
        curves.extra["channel_order"] = order
    return curves, n


@contextlib.contextmanager
def layer_channel_order(model: nn.Module, plan: LayerPlan, job: CurveJob) -> Iterator[Any]:
    """With ``job.sort_channels``, the layer's output channels in sorted order for the block
    (group g holds the channels ``order[c0:c1]``; the model computes the same function) and
    the order ``(C,)`` yielded, to be stored with the curves; otherwise nothing (None)."""
    if job.sort_channels is None:
        yield None
        return
    module = model.get_submodule(plan.name)
    order = (
        channel_order(module.weight, job.sort_channels)
        if sortable(module)
        else np.arange(module.weight.shape[0])
    )
    with sorted_channels(module, order):
        yield order


def fold_curves(
    chains: list[Chain] | list[ScaleChain],
    backend: Any,
    shape: tuple[int, int, int],
    n_folds: int,
    chunk: int = 4096,
) -> np.ndarray:
    """Each calibration fold's own distortion ``(F, G, D, B)`` of the points the search chose
    on all samples (same step, dead zone and width), from a ``backend`` with
    ``folds(cands) -> (K, F)``. Their mean weighted by the fold sizes is ``dist``. Free for the
    second-order backends (their rows are per sample); the measured ones evaluate each chosen
    point once more."""
    out = np.full((n_folds, *shape), np.inf)  # (F, G, D, B)
    cands, where = [], []
    for c in chains:
        for b, cand in enumerate(c.best_candidates()):
            cands.append(cand)
            where.append((c.group, c.dz_index, b))
    for i in range(0, len(cands), chunk):
        per = backend.folds(cands[i : i + chunk])  # (k, F)
        for (g, d, b), row in zip(where[i : i + chunk], per, strict=True):
            out[:, g, d, b] = row
    return out


def job_dict(job: CurveJob) -> dict[str, Any]:
    """The resolved job settings as JSON-able data."""
    return asdict(job)
