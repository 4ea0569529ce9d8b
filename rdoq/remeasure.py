"""Measured re-check of second-order curves (``classification/remeasure_curves.py``).

The second-order estimate is cheap but can be far off on single layers (on EfficientNet-Lite1 it
put an 8-bit group of ``blocks.0.0.conv_dw`` at 4.7e-2 where the measured value is 0.27). Which
layers matter is visible from the estimate itself: the allocation spends the distortion budget
unevenly, and a few layers hold most of the distortion at the allocated points, so their
errors move the total — and the allocation — most. This module ranks the layers of a complete
second-order curve set by that share, re-measures the chosen ones with the measured engine (the
same search, quantizer and calibration set, optionally a wider scale grid) and writes a new,
complete curve set: the chosen layers measured, the others copied. Allocation scripts read it
like any curve set.

The new set's ``meta.json`` says what it holds: ``estimator`` ``hessian+measured`` and
``estimator_params.remeasured`` (the layers, the rule that chose them, the targets it ranked at,
the scales searched). Each re-measured layer file keeps the estimate it replaced as
``dist_second_order (G, D, B)``, for comparison. The source set is only read.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from rdoq.adapters.base import Adapter, InputError
from rdoq.allocation import build_table, solve_recorded
from rdoq.curves import (
    CurveJob,
    LayerPlan,
    finish_summary,
    job_dict,
    layer_backend,
    layer_curves,
    max_rows_for,
    part_plans,
    plan_layers,
    record_layer,
)
from rdoq.engine import MeasuredEngine
from rdoq.parts import PartSpec
from rdoq.search import scale_grid
from rdoq.store import CurveStore, atomic_write_json

log = logging.getLogger("rdoq")

# The estimator name of a set whose chosen layers were re-measured.
MIXED_ESTIMATOR = "hessian+measured"
# Targets (average bits) the layers are ranked at when none are given: the real-network
# benchmark's weight targets.
DEFAULT_RANK_TARGETS = (3.0, 4.0, 5.0, 6.0, 8.0)
DEFAULT_SELECTION = "top:4"


def rank_layers(store: CurveStore, targets: Sequence[float]) -> list[tuple[str, float]]:
    """The layers of a complete curve set, highest first, by their mean share of the estimated
    distortion at the set's own allocations for ``targets`` (Lagrangian solver, this set's
    items alone, bits × elements as the rate). Returns ``(name, share)``; shares sum to 1."""
    if not targets:
        raise InputError("ranking needs at least one target rate; pass --targets")
    table = build_table(store, None)
    solved = solve_recorded(table, [float(t) for t in targets], "lg")
    share = np.zeros(len(table.layers))  # (L,)
    rows = np.arange(len(table.layer))
    for choice in solved.choices:
        dist = table.dist[rows, choice]  # (I,)
        per_layer = np.bincount(table.layer, weights=dist, minlength=len(table.layers))  # (L,)
        total = per_layer.sum()
        if total > 0:
            share += per_layer / total
    share /= len(solved.choices)
    order = np.argsort(-share, kind="stable")
    return [(table.layers[i].name, float(share[i])) for i in order]


def select_layers(ranked: Sequence[tuple[str, float]], spec: str) -> list[str]:
    """The layers ``spec`` picks from ``ranked`` (:func:`rank_layers`), in ranking order:
    ``top:K`` the K highest; ``share:F`` the fewest highest whose shares sum to at least F
    (0 < F <= 1); ``all``; or comma-separated layer names. InputError names a bad spec."""
    names = [n for n, _ in ranked]
    text = spec.strip()
    if text == "all":
        return names
    kind, _, value = text.partition(":")
    if kind == "top" and value:
        try:
            k = int(value)
        except ValueError:
            k = 0
        if k < 1:
            raise InputError(f"--layers {spec}: top:K needs a whole number K >= 1, e.g. top:4")
        return names[:k]
    if kind == "share" and value:
        try:
            f = float(value)
        except ValueError:
            f = -1.0
        if not 0 < f <= 1:
            raise InputError(f"--layers {spec}: share:F needs 0 < F <= 1, e.g. share:0.5")
        total, picked = 0.0, []
        for name, s in ranked:
            picked.append(name)
            total += s
            if total >= f - 1e-12:
                break
        return picked
    wanted = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in names]
    if not wanted or unknown:
        raise InputError(
            f"--layers {spec}: {unknown or 'no layer'} is not a layer of the curve "
            f"set (its layers include {names[:6]}); pass top:K, share:F, all or "
            f"layer names"
        )
    return [n for n in names if n in set(wanted)]


def remeasure_job(
    meta: dict[str, Any],
    layers: Sequence[str],
    scales_log2: Sequence[float] | None = None,
    folds: bool = True,
    **engine: Any,
) -> CurveJob:
    """The measured-engine job that repeats a curve set's search (``meta``) on ``layers``:
    same kind, groups, widths, dead zones, step rules (the authors' too), precision, ``-bcw``
    and (unless ``folds`` is False) calibration folds; the group scales ``scales_log2``
    (default: the set's). ``engine``: CurveJob's engine fields (``max_batch``, ``max_lookahead``,
    ``mem_budget_mb``, ``use_cuts``, ``progress``, ``argv``)."""
    kind = meta["kind"]
    steps = meta.get("steps") or "group"
    scales = (
        tuple(scales_log2) if scales_log2 is not None else tuple(meta.get("scales_log2") or (0.0,))
    )
    return CurveJob(
        kind=kind,
        act_mode=meta.get("act_mode"),
        group_size=int(meta["group_size"]),
        nr=len(meta["bits"]),
        ndz=int(meta.get("ndz") or 1),
        max_steps=int(meta["max_steps"]),
        step_grid=int(meta["step_grid"]),
        precision=meta.get("precision") or "float64",
        estimator="measured",
        step_mode=steps,
        scales_log2=scales,
        bias_corr=bool(meta.get("bias_corr")),
        authors=tuple(meta.get("authors_semantics") or ()),
        group_axis=meta.get("group_axis") or "out",
        folds=int(meta["folds"]["count"]) if folds and meta.get("folds") else 0,
        layers=tuple(layers),
        **engine,
    )


def remeasured_meta(
    src: dict[str, Any],
    job: CurveJob,
    layers: Sequence[str],
    rule: str,
    targets: Sequence[float] | None,
) -> dict[str, Any]:
    """meta.json of the re-checked set: the source's, with the estimator and what was
    re-measured (in ``estimator_params``, a settings key, so a resume with another selection
    into the same directory is refused)."""
    meta = {k: v for k, v in src.items() if k not in ("schema", "argv", "created")}
    if not job.folds:
        meta["folds"] = None
    meta["estimator"] = MIXED_ESTIMATOR
    meta["estimator_params"] = {
        **(src.get("estimator_params") or {}),
        "remeasured": {
            "layers": list(layers),
            "rule": rule,
            "targets": list(targets) if targets is not None else None,
            "scales_log2": list(job.scales_log2) if job.channel_steps else None,
            "source": {"estimator": src.get("estimator"), "created": src.get("created")},
        },
    }
    meta["argv"] = job.argv or sys.argv
    meta["created"] = datetime.now(timezone.utc).isoformat()
    return meta


def check_source(src: CurveStore) -> None:
    """An InputError unless ``src`` is a complete second-order curve set."""
    if src.meta.get("estimator") != "hessian":
        raise InputError(
            f"{src.root} holds {src.meta.get('estimator')} curves; re-measuring "
            f"applies to second-order (hessian) curve sets"
        )
    missing = src.missing_layers()
    if missing:
        raise InputError(
            f"{src.root} is incomplete ({len(missing)} layers missing, e.g. "
            f"{missing[:3]}); finish its curve runs first"
        )


def default_targets(meta: dict[str, Any]) -> list[float]:
    """The ranking targets when none are given: :data:`DEFAULT_RANK_TARGETS` within the set's
    widths (1 … its widest), else the middle of that range."""
    top = max(meta["bits"])
    inside = [t for t in DEFAULT_RANK_TARGETS if 1 <= t <= top]
    return inside or [max(top / 2, 1.0)]


def _check_plan(plan: LayerPlan, entry: dict[str, Any], root: Path) -> None:
    if plan.meta()["groups"] != entry["groups"] or plan.meta()["numel"] != entry["numel"]:
        raise InputError(
            f"layer {plan.name} of the model has {plan.meta()['groups']} groups of "
            f"{plan.meta()['numel']} elements, {root}/meta.json says "
            f"{entry['groups']} of {entry['numel']}; pass the model the curves "
            f"were measured on"
        )


def remeasure_curves(
    model: nn.Module,
    calib_x: torch.Tensor,
    src: CurveStore,
    root: Path,
    layers: Sequence[str],
    job: CurveJob,
    part: PartSpec,
    device: torch.device,
    rule: str = "names",
    targets: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Write the re-checked curve set at ``root``: ``layers`` re-measured by ``job`` (from
    :func:`remeasure_job`; this part's share of them, balanced by cost), every other layer of
    ``src`` copied. ``calib_x`` must be the calibration set ``src`` was measured on. Resumable:
    finished layers are skipped. Returns a summary with, per re-measured layer, the median over
    its groups (bits >= 2, best dead zone) of measured / second-order distortion."""
    t0 = time.perf_counter()
    check_source(src)
    if Path(root).resolve() == src.root.resolve():
        raise InputError(f"the output {root} is the source curve set; pass another --outdir")
    model = model.to(device=device, dtype=job.dtype).eval()
    x = calib_x.to(device=device, dtype=job.dtype)
    meta = remeasured_meta(src.meta, job, layers, rule, targets)
    if (Path(root) / "meta.json").is_file():
        old = (CurveStore.read_meta(root).get("estimator_params") or {}).get("remeasured") or {}
        new = meta["estimator_params"]["remeasured"]
        if old and (old.get("layers"), old.get("scales_log2")) != (
            new["layers"],
            new["scales_log2"],
        ):
            raise InputError(
                f"{root} already holds a re-check of {old.get('layers')} (scales "
                f"{old.get('scales_log2')}, chosen by {old.get('rule')!r}), this "
                f"run re-measures {new['layers']} (scales {new['scales_log2']}); "
                f"use another --outdir, or the same --layers, --targets and "
                f"--scale-octaves to resume"
            )
    store = CurveStore.open(root, meta)
    chosen = set(layers)
    for name in src.layer_names():
        if name not in chosen and not store.has_layer(name):
            curves = src.read_layer(name)
            if not job.folds:
                curves.extra.pop("dist_folds", None)
            store.write_layer(name, curves)
    entries = {e["name"]: e for e in src.meta["layers"]}
    plans = plan_layers(model, x[:1], job)
    for plan in plans:
        _check_plan(plan, entries[plan.name], src.root)
    per_group = job.ndz * job.nr * len(job.scales_log2) if job.kind == "weight" else job.nr * 8
    _, todo = part_plans(model, x[:1], plans, part, per_group, store)
    summary: dict[str, Any] = {
        "curve_set": str(root),
        "source": str(src.root),
        "layers_chosen": list(layers),
        "layers_written": 0,
        "candidates": 0,
        "ratio_measured_to_estimate": {},
    }
    if todo:
        folds = src.meta.get("folds") if job.folds else None
        max_rows = max_rows_for(model, x[:1], job.mem_budget_mb)
        engine = MeasuredEngine(
            model,
            x,
            max_rows=max_rows,
            use_cuts=job.use_cuts,
            folds=folds["of_sample"] if folds else None,
        )

        def backend_for(plan: LayerPlan, stats: Any, steps: Any) -> Any:
            return layer_backend(engine, plan, job, stats, steps)

        for plan in tqdm(todo, desc="re-measure", unit="layer", disable=not job.progress):
            lt = time.perf_counter()
            curves, n = layer_curves(model, x, plan, job, max_rows, backend_for, None, job.folds)
            estimate = src.read_layer(plan.name).dist  # (G, D, B)
            curves.extra["dist_second_order"] = estimate
            ratio = estimate_ratio(curves.dist, estimate)
            summary["ratio_measured_to_estimate"][plan.name] = ratio
            how = f"measured/second-order {ratio:.3g} (median)"
            record_layer(store, summary, plan, curves, n, lt, how)
    finish_summary(store, summary, t0)
    return summary


def estimate_ratio(measured: np.ndarray, estimate: np.ndarray, min_bits: int = 2) -> float:
    """Median over groups and widths >= ``min_bits`` of the best-dead-zone measured distortion
    over the best-dead-zone second-order one (both ``(G, D, B)``); NaN when none is positive."""
    m = measured.min(axis=1)[:, min_bits:]  # (G, B')
    e = estimate.min(axis=1)[:, min_bits:]  # (G, B')
    ok = (m > 0) & (e > 0) & np.isfinite(m) & np.isfinite(e)
    return float(np.median(m[ok] / e[ok])) if ok.any() else float("nan")


def remeasure_main(
    argv: list[str] | None = None, adapters: Mapping[str, Adapter] | None = None
) -> dict[str, Any]:
    """Entry point of ``classification/remeasure_curves.py``; returns the run summary (with
    ``--list``: the ranking, the choice and a ``table`` for people, which the script prints)."""
    from rdoq.adapters import adapter_registry, get_adapter
    from rdoq.cli import (
        add_curve_input_flag,
        add_engine_flags,
        add_model_data_flags,
        add_outdir_flag,
        add_scale_flags,
        build_any_model,
        check_curves_match,
        check_outdir,
        rebuild_calib,
        resolve_dataset,
        resolve_device,
        setup_logging,
    )
    from rdoq.parts import resolve_part

    adapters = adapter_registry() if adapters is None else adapters
    p = argparse.ArgumentParser(
        description="Re-measure, with the measured engine, the layers whose second-order "
        "estimates decide the allocation, into a new complete curve set."
    )
    add_model_data_flags(p, datasets=adapters)
    p.set_defaults(testsize=None)
    r = p.add_argument_group("re-measure")
    add_curve_input_flag(r, "the complete second-order curve set to re-check (read only)")
    add_outdir_flag(
        r,
        "directory that receives the new set, named after the source with '_remeasured' "
        "appended (default: current directory)",
        ".",
    )
    r.add_argument(
        "--layers",
        default=DEFAULT_SELECTION,
        help="which layers: top:K (the K with the largest share of the estimated "
        "distortion at the allocations for --targets), share:F (the fewest "
        "covering that share), all, or comma-separated names "
        "(default: %(default)s)",
    )
    r.add_argument(
        "--targets",
        type=float,
        nargs="+",
        default=None,
        help="average bit widths the layers are ranked at; pass the targets you "
        "will allocate (default: those of 3 4 5 6 8 the curves reach)",
    )
    for switch, what in (
        ("--list", "print the ranking (layer, share) and the choice, measure nothing"),
        (
            "--no-folds",
            "drop the set's calibration folds: the measured engine evaluates each chosen "
            "point once more for them, so this halves the cost; --shrink then has no folds "
            "to pool (default: keep them)",
        ),
    ):
        r.add_argument(switch, action="store_true", help=what)
    add_scale_flags(r, "the set's grid; the measured curve scripts search 1")
    add_engine_flags(p.add_argument_group("engine"), second_order=False)
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    try:
        src = CurveStore.load(args.pathrdcurve)
        check_source(src)
        args.targets = args.targets or default_targets(src.meta)
        ranked = rank_layers(src, args.targets)
        layers = select_layers(ranked, args.layers)
        if args.list:
            text = "\n".join(f"{'*' if n in layers else ' '} {s:8.4f}  {n}" for n, s in ranked)
            return {
                "ranking": ranked,
                "chosen": layers,
                "table": f"layers by share of the estimated distortion at targets "
                f"{args.targets} (* = chosen by --layers {args.layers}):\n{text}",
            }
        root = args.outdir / f"{src.root.name}_remeasured"
        check_outdir(root, "--outdir")
        if args.testsize is not None and args.testsize != src.meta["calib"]["size"]:
            raise InputError(
                f"--testsize {args.testsize} differs from the curve set's "
                f"{src.meta['calib']['size']} calibration samples; drop "
                f"--testsize (the set's calibration data is rebuilt)"
            )
        args.dataset = resolve_dataset(args.archname, args.dataset)
        adapter = get_adapter(args.dataset, adapters)
        part = resolve_part(args.part_id, args.num_parts)
        device = resolve_device(args, part.local_rank)
        on_cuda = device.type == "cuda"
        scales = (
            scale_grid(args.scale_octaves, args.scale_steps)
            if args.scale_octaves is not None
            else None
        )
        job = remeasure_job(
            src.meta,
            layers,
            scales,
            not args.no_folds,
            max_batch=args.max_batch or (64 if on_cuda else 1),
            max_lookahead=args.lookahead or (4 if on_cuda else 1),
            mem_budget_mb=args.mem_budget_mb
            or (0.4 * torch.cuda.mem_get_info(device)[0] / 2**20 if on_cuda else 2048.0),
            use_cuts=not args.no_prefix_cache,
            progress=not args.quiet,
            argv=[Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
        )
        model, info = build_any_model(args, adapter)
        check_curves_match(args, info, src.meta, src.root)
        calib = rebuild_calib(args, model, src.meta, adapter, "the re-measured curves")
        summary = remeasure_curves(
            model,
            calib.x,
            src,
            root,
            layers,
            job,
            part,
            device,
            rule=args.layers,
            targets=args.targets,
        )
    except (InputError, ValueError, FileNotFoundError) as err:
        p.error(str(err))
    atomic_write_json(
        root / f"run_remeasure_part{part.part_id:03d}.json",
        {"job": job_dict(job), "device": str(device), "summary": summary, "ranking": ranked},
    )
    return summary
