"""Pooling noisy group curves toward their layer's curve, by cross-validation (``--shrink``).

A group's curve is estimated on a few calibration images. The allocator then picks, among
thousands of groups, the ones whose estimates look cheapest to quantize: the choice favours
groups whose estimate happens to be low, and on other images those choices are worse than
predicted (on EfficientNet-Lite1 the per-group allocation beat the per-layer one on the
calibration crops by 14-25 % and lost that lead on the evaluation crops). The classical remedy is
shrinkage: replace each group's curve by

    D̃_g(d, b) = α·D_g(d, b) + (1 − α)·n_g·D̄(d, b),   D̄ = Σ_g D_g / Σ_g n_g,

its layer's per-weight curve ``D̄`` times its size ``n_g`` pulled in with weight ``1 − α``
(α = 1: the raw curves; α = 0: every group of a layer priced alike). How much to pool is chosen
per target by K-fold cross-validation over the calibration folds that second-order curve sets
store (``dist_folds``, :func:`rdoq.curves.fold_curves`; folds hold whole images): for each α and
each fold, allocate from the curves of the other folds, shrunk by α, and price that allocation
with the held-out fold's own curves (unshrunk); the α of the lowest held-out distortion (summed
over folds, weighted by their sizes) wins. The quantizer of each point (its step and dead zone)
is the one the search chose on all calibration samples, so the folds differ only in how that
point is priced.

The cross-validation solves with the Lagrangian plus the budget fill (fast, and within a few
items of the DP); the final allocation uses the script's solver. Which curve sets ``--shrink
auto`` pools is decided in :func:`rdoq.pipeline.shrink_alphas`. Items whose curve set has no
folds (measured curves, sets made with ``--folds 0``) are neither shrunk nor held out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from rdoq.allocation import ItemTable, solve_recorded
from rdoq.store import CurveStore, LayerCurves

log = logging.getLogger(__name__)

SHRINK_MODES = ("auto", "cv", "off")
# Calibration folds the second-order curve scripts store by default (--folds).
DEFAULT_FOLDS = 5
# Pooling weights the cross-validation tries (1 first: ties keep the raw curves).
CV_ALPHAS = (1.0, 0.75, 0.5, 0.25, 0.0)


def shrink_dist(dist: np.ndarray, numel: np.ndarray, alpha: float) -> np.ndarray:
    """``α·dist + (1 − α)·numel·D̄`` with ``D̄`` the layer's distortion per element at each
    (dead zone, width): ``dist (G, D, B)``, ``numel (G,)`` → ``(G, D, B)``. Points some group
    lacks (inf) stay inf and do not enter ``D̄``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"the shrinkage weight must be in [0, 1], got {alpha}")
    if alpha == 1.0:
        return dist
    ok = np.isfinite(dist)  # (G, D, B)
    finite = np.where(ok, dist, 0.0)
    n = numel.astype(np.float64)[:, None, None]  # (G, 1, 1)
    pooled = finite.sum(0) / np.maximum(np.where(ok, n, 0.0).sum(0), 1.0)  # (D, B)
    return np.where(ok, alpha * finite + (1.0 - alpha) * n * pooled, dist)


def train_dist(folds: np.ndarray, sizes: np.ndarray, held_out: int) -> np.ndarray:
    """The curve of every fold but ``held_out``: their mean weighted by the fold sizes,
    ``folds (F, G, D, B)`` → ``(G, D, B)``."""
    w = np.asarray(sizes, dtype=np.float64).copy()  # (F,)
    w[held_out] = 0.0
    finite = np.where(np.isfinite(folds), folds, 0.0)
    out = np.tensordot(w / w.sum(), finite, axes=1)  # (G, D, B)
    return np.where(np.isfinite(folds).all(0), out, np.inf)


def fold_sizes(store: CurveStore) -> np.ndarray | None:
    """Samples per calibration fold of a curve set ``(F,)``, None when it stores no folds."""
    folds = store.meta.get("folds")
    if not folds:
        return None
    return np.bincount(np.asarray(folds["of_sample"]), minlength=int(folds["count"]))


class ShrunkCurves(CurveStore):
    """A read-only view of a curve set whose distortions are shrunk by ``alpha`` and, with
    ``held_out``, estimated without that calibration fold. Only a set that takes part
    (``pooled``: it stores the folds the cross-validation uses) is changed; others read as
    stored. Layers are read once (``cache``, shared between views of the same set)."""

    def __init__(
        self,
        store: CurveStore,
        cache: dict[str, LayerCurves],
        alpha: float = 1.0,
        held_out: int | None = None,
        pooled: bool = True,
    ):
        super().__init__(store.root, store.meta)
        self._store, self._cache = store, cache
        self.alpha, self.held_out = alpha, held_out
        self.sizes = fold_sizes(store) if pooled else None

    def raw(self, name: str) -> LayerCurves:
        """The layer's curves as stored (read once)."""
        if name not in self._cache:
            self._cache[name] = self._store.read_layer(name)
        return self._cache[name]

    def read_layer(self, name: str) -> LayerCurves:
        c = self.raw(name)
        folds = c.extra.get("dist_folds")
        if self.sizes is None:
            return c
        if folds is None or folds.shape[0] != len(self.sizes):
            raise ValueError(
                f"{self.layer_path(name)} lacks the {len(self.sizes)} fold curves "
                f"(dist_folds) its meta.json promises; recompute that layer"
            )
        dist = c.dist if self.held_out is None else train_dist(folds, self.sizes, self.held_out)
        return LayerCurves(
            shrink_dist(dist, c.numel, self.alpha), c.step_log2, c.deadzone, c.numel, c.extra
        )


def held_out_items(
    stores: Sequence[tuple[ShrunkCurves, list[str]]], n_folds: int, n_cols: int, uniform_only: bool
) -> np.ndarray:
    """Each fold's own distortion of every item at every (dead zone, width), in the order of
    :func:`rdoq.allocation.build_table`'s items: ``(F, I, D, K)`` (inf pads). ``stores``: the
    views of each curve set with the layers it contributes, in table order; a set that takes no
    part in the pooling gives its all-sample curves for every fold."""
    parts = []
    n_dz = max((1 if uniform_only else int(s.meta.get("ndz", 1))) for s, _ in stores)
    for view, names in stores:
        for name in names:
            c = view.raw(name)
            d = (
                np.broadcast_to(c.dist, (n_folds, *c.dist.shape))
                if view.sizes is None
                else c.extra["dist_folds"]
            )  # (F, G, D, B)
            if uniform_only:
                d = d[:, :, :1]
            out = np.full((n_folds, d.shape[1], n_dz, n_cols), np.inf)  # (F, G, D, K)
            out[:, :, : d.shape[2], : d.shape[3]] = d
            parts.append(out)
    return np.concatenate(parts, axis=1)


@dataclass(frozen=True)
class ShrinkChoice:
    """What the cross-validation chose for one target: ``alpha``, the held-out distortion of
    every α tried (``cv``), and for each α its relative change against the raw curves, the mean
    over folds and its standard error (``change``: α → (mean, se))."""

    alpha: float
    cv: dict[float, float]
    change: dict[float, tuple[float, float]]


def choose_alpha(
    make_table: Callable[[float, int | None], ItemTable],
    held: np.ndarray,
    sizes: np.ndarray,
    target: float,
    act_target: float | None,
    layerwise: bool,
    alphas: Sequence[float] = CV_ALPHAS,
) -> ShrinkChoice:
    """The α of the lowest cross-validated distortion at ``target`` (see the module text),
    among those that beat the raw curves (α = 1) by more than one standard error of the
    per-fold paired change; α = 1 when none does (a gain inside the folds' noise is not
    trusted: on the digits CNN at 2 bits the lowest held-out distortion, α = 0, won 2 of 5 folds
    and lost on the test split).

    ``make_table(alpha, held_out)`` builds the constrained item table from the curves without
    fold ``held_out`` shrunk by ``alpha``; ``held (F, I, D, K)`` is :func:`held_out_items`;
    ``sizes (F,)`` the fold sizes.
    """
    if 1.0 not in alphas:
        raise ValueError(f"the shrinkage weights {alphas} must include 1 (the raw curves)")
    w = np.asarray(sizes, dtype=np.float64) / float(np.sum(sizes))  # (F,)
    per_fold: dict[float, np.ndarray] = {}
    acts = None if act_target is None else [act_target]
    for alpha in alphas:
        costs = np.empty(len(w))  # (F,)
        for f in range(len(w)):
            table = make_table(alpha, f)
            solved = solve_recorded(table, [target], "lg", acts, layerwise, fill=True)
            cols = solved.choices[0]  # (I,) columns whose quantizer is used
            rows = np.arange(len(cols))
            costs[f] = float(held[f, rows, table.dz_index[rows, cols], cols].sum())
        per_fold[alpha] = costs
    return pick_alpha(per_fold, w)


def pick_alpha(per_fold: dict[float, np.ndarray], weights: np.ndarray) -> ShrinkChoice:
    """The rule of :func:`choose_alpha` on the held-out costs ``per_fold`` (α → ``(F,)``) and
    the fold weights ``(F,)`` (summing to 1)."""
    raw = per_fold[1.0]
    w = weights
    cv = {a: float(w @ c) for a, c in per_fold.items()}
    change = {}
    for a, c in per_fold.items():
        rel = (c - raw) / np.maximum(raw, np.finfo(float).tiny)  # (F,)
        se = float(rel.std(ddof=1) / np.sqrt(len(rel))) if len(rel) > 1 else math.inf
        change[a] = (float(rel.mean()), se)
    trusted = [a for a in per_fold if a == 1.0 or change[a][0] + change[a][1] < 0.0]
    best = min(trusted, key=lambda a: (cv[a], -a))
    return ShrinkChoice(best, cv, change)
