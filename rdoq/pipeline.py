"""The allocation pipeline behind the allocation scripts: item tables from curve sets (with
``--shrink``), solving each target, and applying, correcting, evaluating and recording each
allocation. The scripts' entry points (``rdoq.cli_alloc``, ``rdoq.cli_eval``) parse the flags
and call these; a driver can call them directly.

- :class:`TableSpec`: how the item table is made from the curve sets (constraints, the monotone
  fit, and the curves shrunk by α, optionally without one calibration fold: ``rdoq.shrink``).
- :func:`solve_targets_shrunk`: the shrinkage weight of each target (``--shrink``) and the
  solver's choice for it, one solve per distinct weight.
- :func:`run_points`: correct (-bcw/-bca), save, apply, evaluate and record each allocation.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rdoq.adapters.base import Adapter, InputError
from rdoq.allocation import ItemTable, build_table, monotone_items, restrict, solve_recorded
from rdoq.allocfile import load_allocation, make_allocation, mark_authors, save_allocation
from rdoq.apply import apply_allocation, estimate_corrections, save_quantized
from rdoq.evaluate import ROW_BIT_KEYS, bit_report, reference_outputs, topk_scores
from rdoq.report import (
    append_results,
    format_table,
    plot_allocation,
    plot_results,
    read_results,
)
from rdoq.retrain import METHOD_SUFFIX, RetrainSpec, fine_tune
from rdoq.shrink import (
    DEFAULT_FOLDS,
    ShrinkChoice,
    ShrunkCurves,
    choose_alpha,
    fold_sizes,
    held_out_items,
)
from rdoq.store import CurveStore

log = logging.getLogger("rdoq")


@dataclass
class TableSpec:
    """How the allocation scripts make their item table from a weight curve set and an optional
    activation curve set (``rdoq.allocation.build_table`` and ``restrict``'s arguments), and
    which sets take part in ``--shrink`` (:meth:`pooled`)."""

    weights: CurveStore
    acts: CurveStore | None = None
    fp_acts: list[str] = field(default_factory=list)
    act_channel_dims: dict[str, int] | None = None
    uniform_only: bool = False
    rate: str = "bits"
    monotone: str = "auto"
    allowed_bits: list[int] | None = None
    min_bits: int | None = None
    max_bits: int | None = None
    smooth: bool = False
    # Layer curves read once per set, shared by every table made from them.
    _caches: dict[str, dict] = field(default_factory=dict, repr=False)

    @functools.cached_property
    def pooled(self) -> tuple[bool, bool]:
        """Which of the weight and activation sets take part in ``--shrink``: those storing
        calibration folds, and the activation set only with folds equal to the weight set's
        (one cross-validation split for all items)."""
        w = fold_sizes(self.weights) is not None
        a = self.acts is not None and fold_sizes(self.acts) is not None
        if w and a and self.acts.meta["folds"] != self.weights.meta["folds"]:
            log.warning(
                "the activation curves' calibration folds differ from the weight "
                "curves'; --shrink pools the weight curves only"
            )
            a = False
        return w, a

    def views(
        self, alpha: float = 1.0, held_out: int | None = None
    ) -> tuple[ShrunkCurves, ShrunkCurves | None]:
        """The weight and activation sets shrunk by ``alpha`` (without fold ``held_out``)."""
        pooled = self.pooled
        views = [
            None
            if s is None
            else ShrunkCurves(
                s, self._caches.setdefault(str(s.root), {}), alpha, held_out, pooled=ok
            )
            for s, ok in zip((self.weights, self.acts), pooled, strict=True)
        ]
        return views[0], views[1]

    @property
    def weights_bias_folded(self) -> bool:
        """Whether the weight curves were measured after this project's ``-bcw`` (the
        correction the ``auto`` rules of ``--monotone`` and ``--shrink`` were measured with;
        not the authors' affine one)."""
        meta = self.weights.meta
        return bool(meta.get("bias_corr")) and "bcw" not in meta.get("authors_semantics", [])

    def monotone_mask(self, table: ItemTable) -> np.ndarray:
        """The items ``--monotone`` fits, ``(I,)``."""
        return monotone_items(table, self.monotone, self.weights_bias_folded)

    def table(self, alpha: float = 1.0, held_out: int | None = None) -> ItemTable:
        """The constrained item table of the curves (without fold ``held_out``) shrunk by
        ``alpha`` (rdoq.shrink; sets that take no part as stored)."""
        w, a = self.views(alpha, held_out)
        t = build_table(
            w,
            a,
            self.fp_acts,
            uniform_only=self.uniform_only,
            act_channel_dims=self.act_channel_dims,
            rate=self.rate,
        )
        return restrict(
            t,
            allowed_bits=self.allowed_bits,
            min_bits=self.min_bits,
            max_bits=self.max_bits,
            smooth=self.smooth,
            monotone=self.monotone_mask(t),
        )


def shrink_alphas(
    spec: TableSpec,
    shrink: str,
    targets: list[float],
    act_targets: list[float | None],
    layerwise: bool,
    table: ItemTable,
) -> tuple[list[float], list[ShrinkChoice | None]]:
    """The shrinkage weight α of each target (``--shrink``: auto, cv, off or a weight; 1 = the
    raw curves) and, where the cross-validation chose it, its :class:`ShrinkChoice`.
    ``table``: ``spec.table()``, for its width.

    ``auto`` is ``cv`` for weight curves measured after ``-bcw`` that store folds, else ``off``:
    on EfficientNet-Lite1 the cross-validated pooling of uncorrected curves raised the output
    MSE on the evaluation crops significantly (paired 95 % intervals, 4 and 6 bits), although
    the held-out calibration folds predicted a gain; after ``-bcw`` it lowered it at 4 bits
    and raised the agreement with the FP top-1 at 3 to 6 bits (docs/benchmarks.md)."""
    n = len(targets)
    pooled = spec.pooled
    if shrink == "auto":
        if not any(pooled):
            log.info(
                "--shrink auto: the curve sets store no calibration folds (made without "
                "--folds), so group curves are used as measured"
            )
            return [1.0] * n, [None] * n
        if not spec.weights_bias_folded:
            log.info(
                "--shrink auto: the weight curves were measured without this project's "
                "-bcw, so group curves are used as measured (pooling them measured worse; "
                "--shrink cv forces it)"
            )
            return [1.0] * n, [None] * n
        shrink = "cv"
    if shrink == "off":
        return [1.0] * n, [None] * n
    if not any(pooled):
        raise InputError(
            f"--shrink {shrink} needs curves that store calibration folds: make "
            f"them with the second-order curve scripts (--folds, default "
            f"{DEFAULT_FOLDS}), or use --shrink off"
        )
    if shrink not in ("auto", "cv"):
        return [float(shrink)] * n, [None] * n
    sizes = fold_sizes(spec.weights if pooled[0] else spec.acts)
    w, a = spec.views()
    stores = [(w, spec.weights.layer_names())]
    if a is not None:
        stores.append((a, [x for x in spec.acts.layer_names() if x not in set(spec.fp_acts)]))
    held = held_out_items(stores, len(sizes), table.dist.shape[1], spec.uniform_only)
    alphas, choices = [], []
    for t, a_t in zip(targets, act_targets, strict=True):
        got = choose_alpha(spec.table, held, sizes, t, a_t, layerwise)
        log.info(
            "--shrink: target %g, held-out distortion by α (change vs raw ± se) %s -> α = %g",
            t,
            {
                f"{a:g}": f"{v:.4g} ({got.change[a][0]:+.1%} ± {got.change[a][1]:.1%})"
                for a, v in got.cv.items()
            },
            got.alpha,
        )
        alphas.append(got.alpha)
        choices.append(got)
    return alphas, choices


@dataclass
class SolvedPoint:
    """One target's allocation before it is applied: the chosen columns ``(I,)``, the table
    they index, the solver's record (``shrink_alpha`` added when shrinking), the point's tags,
    and the cross-validation behind its α (None without)."""

    choice: np.ndarray
    table: ItemTable
    record: dict[str, Any]
    tags: dict[str, Any]
    shrink: ShrinkChoice | None = None

    def allocation(self, solver: str) -> dict[str, Any]:
        """The allocation file's content (``rdoq.allocfile.make_allocation``), with the
        cross-validation's figures when it chose α."""
        alloc = make_allocation(
            self.table,
            self.choice,
            target_bits=self.tags.get("target_bits"),
            solver=solver,
            record=self.record,
            extra={k: v for k, v in self.tags.items() if k != "target_bits"},
        )
        if self.shrink is not None:
            # The held-out distortion of every shrinkage weight tried, and its relative change
            # against the raw curves with its standard error (rdoq.shrink).
            alloc["shrink_cv"] = {f"{a:g}": v for a, v in self.shrink.cv.items()}
            alloc["shrink_cv_change"] = {f"{a:g}": list(v) for a, v in self.shrink.change.items()}
        return alloc


def solve_targets_shrunk(
    spec: TableSpec,
    targets: list[float],
    act_targets: list[float] | None,
    solver: str,
    layerwise: bool,
    fill: bool,
    shrink: str = "off",
) -> tuple[list[SolvedPoint], float]:
    """Each target's allocation (in target order) and the mean solver seconds per target:
    the shrinkage weight of each target (:func:`shrink_alphas`), then one solve per distinct
    weight (the DP shares its table between that weight's targets). ``act_targets``: one per
    target, one for all, or None (joint budget)."""
    n = len(targets)
    if act_targets is not None and len(act_targets) not in (1, n):
        raise InputError(
            f"--act-target-rates takes one value or one per --target_rates ({n}), "
            f"got {len(act_targets)}"
        )
    act_of = (
        [None] * n
        if act_targets is None
        else act_targets * n
        if len(act_targets) == 1
        else list(act_targets)
    )
    table = spec.table()
    alphas, cvs = shrink_alphas(spec, shrink, targets, act_of, layerwise, table)
    points: list[SolvedPoint | None] = [None] * n
    seconds = 0.0
    for alpha in sorted(set(alphas)):
        idx = [i for i in range(n) if alphas[i] == alpha]
        t_a = table if alpha == 1.0 else spec.table(alpha)
        solved = solve_recorded(
            t_a,
            [targets[i] for i in idx],
            solver,
            None if act_targets is None else [act_of[i] for i in idx],
            layerwise,
            fill=fill,
        )
        seconds += solved.seconds
        for i, c, rec in zip(idx, solved.choices, solved.records, strict=True):
            shrunk = {"shrink_alpha": alpha} if cvs[i] is not None or alpha != 1.0 else {}
            points[i] = SolvedPoint(
                c,
                t_a,
                {**rec, **shrunk},
                {"target_bits": targets[i], "act_target_bits": act_of[i]},
                cvs[i],
            )
    return points, seconds / max(n, 1)


def run_points(
    args: argparse.Namespace,
    adapter: Adapter,
    model: torch.nn.Module,
    info,
    data,
    calib: torch.Tensor | None,
    outdir: Path,
    name: str,
    points: list[tuple[dict[str, Any], dict[str, Any]]],
    solve_s: float | None,
    device: torch.device,
) -> dict[str, Any]:
    """Correct, save, apply and evaluate each allocation; write results (one line as each point
    finishes) and plots. Refuses, before any work, to overwrite an allocation file that holds a
    different allocation (made with other settings) — use another --outdir.

    ``args`` is the script's parsed flags; read are ``quiet``, ``no_plots``, ``save_model``,
    ``bias_corr_weight``, ``bias_corr_act``, ``batchsize``, and, when present,
    ``authors_semantics`` (the parts in effect, recorded in each allocation: the authors'
    ``bcw``/``bca`` replace the corrections estimated here) and, for the rows, ``smooth_dists``
    and ``monotone_applied``. ``calib`` (on ``device``): the calibration tensor
    the -bcw / -bca offsets are estimated on, None without them."""
    adir = outdir / name  # one subdirectory per method: methods may share --outdir
    specs: list[RetrainSpec] = list(getattr(args, "retrain_specs", None) or [])
    if specs and calib is None:
        raise ValueError("fine-tuning needs the calibration tensor (calib)")
    authors = tuple(getattr(args, "authors_semantics", ()) or ())
    bcw = args.bias_corr_weight and "bcw" not in authors
    bca = args.bias_corr_act and "bca" not in authors
    planned = []
    for alloc, tags in points:
        alloc.update(
            model=info.arch,
            method=name,
            weights_source=info.weights_source,
            checkpoint_sha256=info.checkpoint_sha256,
        )
        mark_authors(alloc, authors)
        apath = adir / f"allocation_{point_label(tags)}.json"
        _check_existing(apath, alloc)
        for spec in specs:
            tuned = name + METHOD_SUFFIX[spec.mode]
            _check_existing(outdir / tuned / apath.name, {**alloc, "method": tuned})
        planned.append((alloc, tags, apath))
    outdir.mkdir(parents=True, exist_ok=True)
    ref, labels = reference_outputs(model, data, device, adapter.run)
    fp = {**topk_scores(ref, labels), "n_eval": ref.shape[0]}
    x1 = next(iter(data))[0][:1].to(device=device, dtype=next(model.parameters()).dtype)
    rows = []

    def record(
        q_model: torch.nn.Module, alloc: dict[str, Any], tags: dict, apath: Path, extra: dict
    ) -> None:
        """Evaluate an applied allocation and append its results row."""
        metrics = adapter.evaluate(q_model, data, ref, device)
        bits = bit_report(model, alloc, x1)
        row = {
            "model": info.arch,
            "method": alloc["method"],
            **tags,
            **alloc["summary"],
            **{k: bits[k] for k in ROW_BIT_KEYS},
            **metrics,
            "fp_top1": fp["top1"],
            "fp_top5": fp["top5"],
            "solve_s": solve_s,
            "smooth_dists": getattr(args, "smooth_dists", False),
            "monotone": getattr(args, "monotone_applied", None),
            # The authors' rules in effect (their oracle -bca reads the evaluated data, so its
            # figures depend on the evaluation batch).
            **({"authors_semantics": alloc["authors_semantics"]} if authors else {}),
            **({"eval_batch_size": args.batchsize} if "bca" in authors else {}),
            **extra,
            "allocation": str(apath.relative_to(outdir)),
            "fp_weight_layers": bits["fp_weight_layers"],
            "fp_act_layers": bits["fp_act_layers"],
            "bops_inputs": bits["bops_inputs"],
            "created": datetime.now(timezone.utc).isoformat(),
        }
        rows.append(row)
        append_results(outdir, [row])
        log.info(
            "%s %s: W %.3f A %s bits, top-1 %s, out MSE %.3e",
            alloc["method"],
            point_label(tags),
            row["w_bits"],
            "-" if row["a_bits"] is None else f"{row['a_bits']:.3f}",
            "-" if row["top1"] is None else f"{row['top1']:.2f}",
            row["out_mse"],
        )

    for alloc, tags, apath in tqdm(planned, desc=name, unit="point", disable=args.quiet):
        if calib is not None and (bcw or bca):
            alloc["corrections"] = estimate_corrections(
                model, alloc, calib, bcw=bcw, bca=bca, batch_size=args.batchsize
            )
        label = point_label(tags)
        save_allocation(apath, alloc)
        q_model = apply_allocation(model, alloc)
        if args.save_model:
            save_quantized(adir / f"model_{label}.pth", q_model, alloc)
        record(q_model, alloc, tags, apath, {})
        if not args.no_plots and alloc["solver"] != "uniform":
            plot_allocation(alloc, adir / f"bits_{label}.png")
        del q_model
        for spec in specs:
            # The same allocation fine-tuned on the calibration set: its own method name,
            # allocation file (with the record) and state (the tuned parameters live there).
            t_model = apply_allocation(model, alloc)
            tuned = {**alloc, "method": name + METHOD_SUFFIX[spec.mode]}
            tuned["fine_tune"] = fine_tune(t_model, model, alloc, calib, spec)
            tpath = outdir / tuned["method"] / apath.name
            save_allocation(tpath, tuned)
            save_quantized(tpath.parent / f"model_{label}.pth", t_model, tuned)
            losses = {k: tuned["fine_tune"][k] for k in ("calib_loss_before", "calib_loss_after")}
            record(t_model, tuned, tags, tpath, {"fine_tune": spec.mode, **losses})
            del t_model
    all_rows = read_results(outdir / "results.jsonl") if rows else []
    if not args.no_plots and rows:
        plot_results(
            [r for r in all_rows if r.get("model") == info.arch], outdir / "results.png", info.arch
        )
    fp_line = (
        f"full precision: top-1 {fp['top1']:.2f} %, top-5 {fp['top5']:.2f} % on "
        f"{fp['n_eval']} samples"
        if fp["top1"] is not None
        else f"full precision: {fp['n_eval']} unlabelled samples (output MSE only)"
    )
    return {"outdir": str(outdir), "rows": rows, "table": fp_line + "\n" + format_table(rows)}


def distinct_columns(sweep, slopes: list[float]) -> list[tuple[Any, dict[str, Any]]]:
    """One point per distinct allocation of a slope sweep (the slopes that give it listed)."""
    points: dict[bytes, tuple[Any, dict[str, Any]]] = {}
    for j, s in enumerate(slopes):
        col = sweep[:, j]
        key = col.tobytes()
        if key in points:
            points[key][1]["slopes_log2"].append(s)
        else:
            points[key] = (col.copy(), {"slope_log2": s, "slopes_log2": [s]})
    return list(points.values())


def point_label(tags: dict[str, Any]) -> str:
    """The file label of a point: its target (``4``, ``4_a8``) or slope (``slope_-12.5``)."""
    if tags.get("target_bits") is None:
        return f"slope_{tags['slope_log2']:g}"
    label = f"{tags['target_bits']:g}"
    if tags.get("act_target_bits") is not None:
        label += f"_a{tags['act_target_bits']:g}"
    return label


def _check_existing(apath: Path, alloc: dict[str, Any]) -> None:
    """Refuse to overwrite an allocation file that holds another allocation (other settings)."""
    if not apath.is_file():
        return
    volatile = ("corrections", "fine_tune")
    old = {k: v for k, v in load_allocation(apath).items() if k not in volatile}
    new = {k: v for k, v in json.loads(json.dumps(alloc)).items() if k not in volatile}
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise InputError(
            f"{apath} holds another allocation (differs in {diff}); use another --outdir to "
            f"keep both"
        )
