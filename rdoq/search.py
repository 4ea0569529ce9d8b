"""The one RD-curve grid search (DESIGN §4), shared by every distortion back-end.

For each channel group ``g`` and dead-zone ratio ``d`` a *chain* walks the bit widths in order.
For ``b = 0`` it evaluates the single all-zero candidate. For ``b ≥ 1`` it scans step exponents
``start + s/step_grid`` upwards, where ``start`` is two octaves below the best step of the previous
bit width (the paper's warm start) or, for the first searched bit width, two octaves below the
group's RMS. It always evaluates up to and including the previous best step — the authors' early
stop could halt before it, which made their curves rise with more bits — and then stops at the
first step whose distortion (and, for weights, weight MSE) rises. ``--authors-semantics search``
restores the authors' rules (:class:`SearchSettings` ``authors_search``).

Chains are independent, so the driver evaluates the next candidate of many chains in one batch
(across groups and dead zones) and, when few chains are left, several speculative steps of one
chain. A chain consumes results in order and discards those past its stop, so the batch size never
changes which candidates determine the curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from rdoq.quantizers import deadzone_magnitudes, grid_floor


@dataclass(frozen=True)
class Candidate:
    """One point to evaluate: quantize group ``group`` with ``bits`` at step ``2**step_log2``."""

    group: int
    bits: int
    step_log2: float
    deadzone: float = 0.0
    # Fewest bits that quantize this group identically at this step (no value reaches the extra
    # levels); 0 when the result is all zeros. -1: unknown, use ``bits``.
    same_as_bits: int = -1
    # Per-channel steps (rdoq.steps): the dead-zone ratio's index, and ``step_log2`` is the
    # group's scale on its channels' base steps. -1: the paper's quantizer (absolute step).
    dz_index: int = -1
    # --authors-semantics: their dead-zone rule (rdoq.quantizers.quantize_deadzone), and their
    # -bcw affine map applied to the quantized group (rdoq.quantizers.affine_bcw).
    authors_dz: bool = False
    affine: bool = False

    def key(self) -> tuple:
        """Identity of the perturbation: equal keys give the same quantized tensor."""
        # Every all-zero candidate is the same perturbation, whatever its step or dead zone.
        if self.is_zero or self.same_as_bits == 0:
            return (self.group, 0, 0.0, 0.0)
        bits = self.same_as_bits if self.same_as_bits > 0 else self.bits
        return (self.group, bits, self.step_log2, self.deadzone)

    @property
    def is_zero(self) -> bool:
        magnitudes = deadzone_magnitudes(self.bits, self.authors_dz)
        return self.bits == 0 or (self.deadzone > 0 and magnitudes == 0)


# evaluate(candidates) -> (dist (K,), aux (K,) or None); aux is the weight MSE of the stop rule.
Evaluate = Callable[[Sequence[Candidate]], tuple[np.ndarray, np.ndarray | None]]


@dataclass(frozen=True)
class SearchSettings:
    """Grid-search settings. ``bits`` are the candidate bit widths, ``max_steps`` per bit width.

    ``authors_search`` (``--authors-semantics search``): the authors' search. The 0-bit width
    sets the warm start of 1 bit at ``floor(log2 RMS) − 10`` octaves for weights
    (``stop_on_aux``) and at 0 for activations; every width starts two octaves below the
    previous width's best and stops at the first rise from the step before — of both the
    distortion and the weight MSE for weights, of the distortion for activations of 2 or more
    bits (1-bit activations scan all ``max_steps``) — without first reaching the previous best
    step, and with no restart when the previous width did no better than pruning.
    ``authors_dz`` and ``affine`` go into every candidate (:class:`Candidate`)."""

    bits: tuple[int, ...]
    step_grid: int
    max_steps: int
    back_octaves: int = 2
    stop_on_aux: bool = False
    authors_search: bool = False
    authors_dz: bool = False
    affine: bool = False

    def __post_init__(self) -> None:
        if self.step_grid < 1:
            raise ValueError(f"step_grid must be >= 1, got {self.step_grid}")
        if self.max_steps < self.back_octaves * self.step_grid + 1:
            raise ValueError(
                f"max_steps={self.max_steps} cannot reach the previous best step "
                f"({self.back_octaves} octaves at 1/{self.step_grid} octave); use "
                f"--maxsteps >= {self.back_octaves * self.step_grid + 1}"
            )


class _BitWalk:
    """What every chain shares: it walks ``settings.bits`` in order, ``bit_index`` the current."""

    settings: SearchSettings | ScaleSettings
    bit_index: int

    @property
    def done(self) -> bool:
        return self.bit_index >= len(self.settings.bits)

    @property
    def bits(self) -> int:
        return self.settings.bits[self.bit_index]


@dataclass
class Chain(_BitWalk):
    """Search state of one (group, dead zone) pair across all bit widths."""

    group: int
    dz_index: int
    deadzone: float
    rms_log2: float
    settings: SearchSettings
    vmin: float = -math.inf  # smallest and largest value of the group's data
    vmax: float = math.inf
    unsigned: bool = False  # activations on the unsigned grid
    bit_index: int = 0
    best_dist: list[float] = field(default_factory=list)
    best_step: list[float] = field(default_factory=list)
    n_evals: int = 0
    _dists: list[float] = field(default_factory=list)
    _aux: list[float] = field(default_factory=list)
    _start: float = 0.0
    _min_steps: int = 0
    _authors_anchor: float = math.nan  # authors_search: the step the next width starts from

    def __post_init__(self) -> None:
        self._authors_anchor = self._authors_zero_anchor()
        self._begin_bit()

    def _authors_zero_anchor(self) -> float:
        """The authors' step of the 0-bit width, from which 1 bit starts: weights
        ``floor(log2 RMS) − 10``, activations 0."""
        return float(math.floor(self.rms_log2) - 10) if self.settings.stop_on_aux else 0.0

    def _cand(
        self, bits: int, step_log2: float, deadzone: float, same_as_bits: int = -1
    ) -> Candidate:
        cfg = self.settings
        return Candidate(
            self.group,
            bits,
            step_log2,
            deadzone,
            same_as_bits,
            authors_dz=cfg.authors_dz,
            affine=cfg.affine,
        )

    def _previous_step(self) -> float | None:
        for step in reversed(self.best_step):
            if not math.isnan(step):
                return step
        return None

    def _previous_helped(self) -> bool:
        """Whether the last searched width beat pruning (its distortion below 0 bits')."""
        bits = list(self.settings.bits[: len(self.best_dist)])
        if 0 not in bits or not self.best_dist:
            return True
        return self.best_dist[-1] < self.best_dist[bits.index(0)]

    def _begin_bit(self) -> None:
        self._dists, self._aux = [], []
        if self.done:
            return
        cfg = self.settings
        if cfg.authors_search:
            self._start = self._authors_anchor - cfg.back_octaves
            self._min_steps = 1
            return
        back = cfg.back_octaves * cfg.step_grid
        prev = self._previous_step()
        rms_anchor = grid_floor(self.rms_log2, cfg.step_grid)
        anchor = prev if prev is not None else rms_anchor
        self._start = anchor - cfg.back_octaves
        self._min_steps = back  # index of the anchor step: always evaluated
        if prev is not None and not self._previous_helped():
            # The previous width did no better than pruning (e.g. the signed 1-bit grid
            # {-Δ, 0}, whose best step is then the smallest one tried), so its step says
            # nothing about this width: warm-starting from it walks every later width down
            # into steps that zero the group. Search from two octaves below the lower of it
            # and the RMS anchor up through the higher one: the previous step is still
            # evaluated and the useful region is reached.
            lo, hi = min(prev, rms_anchor), max(prev, rms_anchor)
            self._start = lo - cfg.back_octaves
            self._min_steps = round((hi - self._start) * cfg.step_grid)

    def _candidate(self, s: int) -> Candidate:
        if self.bits == 0:
            return self._cand(0, math.nan, 0.0)
        step = self._start + s / self.settings.step_grid
        return self._cand(self.bits, step, self.deadzone, self._same_as_bits(self.bits, 2.0**step))

    def _same_as_bits(self, bits: int, step: float) -> int:
        """Fewest bits ≤ ``bits`` giving the same quantized group at ``step`` (0: all zeros).

        Conservative: a bit width is only reported when no value can reach the levels it lacks,
        with a margin for rounding, so equal keys always mean equal tensors. The warm start
        re-evaluates the previous bit width's best step, and at high bits that step usually
        leaves the new levels unused: the cached result is then reused.
        """
        lo, hi = self.vmin / step, self.vmax / step
        amax = max(abs(self.vmin), abs(self.vmax))
        if not math.isfinite(amax):
            return -1
        if self.deadzone > 0:
            if amax <= self.deadzone:
                return 0
            authors = self.settings.authors_dz
            # The top level index a value reaches: floor(t), or round(t) by the authors' rule.
            slack = 0.49 if authors else 0.0
            for b in range(1 if authors else 2, bits + 1):
                if (amax - self.deadzone) / step <= deadzone_magnitudes(b, authors) - 1 + slack:
                    return b
            return bits
        if amax / step <= 0.49:
            return 0
        for b in range(1, bits + 1):
            top = 2**b - 1 if self.unsigned else 2 ** (b - 1) - 1
            bottom = 0 if self.unsigned else -(2 ** (b - 1))
            if hi <= top and lo >= bottom:
                return b
        return bits

    def _single_candidate(self) -> bool:
        """Whether this bit width has only the all-zero candidate (``Candidate.is_zero``)."""
        bits = self.bits
        magnitudes = deadzone_magnitudes(bits, self.settings.authors_dz)
        return bits == 0 or (self.deadzone > 0 and magnitudes == 0)

    def propose(self, lookahead: int) -> list[Candidate]:
        """The next ``lookahead`` candidates of the current bit width (fewer at its end)."""
        if self.done:
            return []
        if self._single_candidate():
            return [self._candidate(0)]
        s0 = len(self._dists)
        s1 = min(s0 + max(lookahead, 1), self.settings.max_steps)
        return [self._candidate(s) for s in range(s0, s1)]

    def consume(self, dists: Sequence[float], aux: Sequence[float] | None) -> None:
        """Take results for the candidates last proposed, in order; discard those past a stop."""
        for i, dist in enumerate(dists):
            self.n_evals += 1
            self._dists.append(float(dist))
            self._aux.append(float(aux[i]) if aux is not None else math.nan)
            if self._bit_finished():
                self._finish_bit()
                return

    def _bit_finished(self) -> bool:
        s = len(self._dists) - 1
        if self._single_candidate() or s + 1 >= self.settings.max_steps:
            return True
        if self.settings.authors_search:
            if s < 1:
                return False
            rose = self._dists[s] > self._dists[s - 1]
            if self.settings.stop_on_aux:
                return rose and self._aux[s] > self._aux[s - 1]
            return rose and self.bits >= 2
        if s < max(self._min_steps, 1):
            return False
        rose = self._dists[s] > self._dists[s - 1]
        if self.settings.stop_on_aux:
            rose = rose and self._aux[s] > self._aux[s - 1]
        return rose

    def best_candidates(self) -> list[Candidate]:
        """The candidate each finished bit width chose, in bit order (the all-zero candidate
        where only it was possible)."""
        zero = self._cand(0, math.nan, 0.0)
        return [
            self._cand(b, s, self.deadzone) if b and not math.isnan(s) else zero
            for b, s in zip(self.settings.bits, self.best_step, strict=False)
        ]

    def _finish_bit(self) -> None:
        best = int(np.argmin(self._dists))
        self.best_dist.append(self._dists[best])
        if self._single_candidate():
            self.best_step.append(math.nan)
            self._authors_anchor = self._authors_zero_anchor()
        else:
            self.best_step.append(self._start + best / self.settings.step_grid)
            self._authors_anchor = self.best_step[-1]
        self.bit_index += 1
        self._begin_bit()


@dataclass(frozen=True)
class ScaleSettings:
    """Search of the per-channel-step quantizer: ``bits`` as in :class:`SearchSettings`, and the
    group scales (log2) tried at every width — always including 0, the baseline's steps."""

    bits: tuple[int, ...]
    scales_log2: tuple[float, ...]
    affine: bool = False  # --authors-semantics bcw (Candidate.affine)

    def __post_init__(self) -> None:
        if 0.0 not in self.scales_log2:
            raise ValueError(
                f"the scales {self.scales_log2} must include 0 (the per-channel MSE-optimal steps)"
            )


def scale_grid(octaves: float, per_octave: int) -> tuple[float, ...]:
    """Scales ``j/per_octave`` for ``|j/per_octave| <= octaves``, 0 first (ties keep it)."""
    if per_octave < 1 or octaves < 0 or not math.isfinite(octaves):
        raise ValueError(
            f"scale grid needs per_octave >= 1 and octaves >= 0, got {per_octave} and {octaves}"
        )
    n = int(math.floor(octaves * per_octave + 1e-9))
    return (0.0, *[j / per_octave for j in range(-n, n + 1) if j != 0])


@dataclass
class ScaleChain(_BitWalk):
    """Search state of one (group, dead zone) pair with per-channel steps: at every bit width
    all scales are evaluated (one batch) and the best kept. Exhaustive on a small grid around the
    MSE-optimal steps, so a distortion that is not unimodal in the step cannot trap it."""

    group: int
    dz_index: int
    ratio: float  # the dead-zone ratio (0: uniform quantizer); the candidates' ``deadzone``
    settings: ScaleSettings
    bit_index: int = 0
    best_dist: list[float] = field(default_factory=list)
    best_step: list[float] = field(default_factory=list)
    n_evals: int = 0

    def _cand(self, bits: int, scale_log2: float) -> Candidate:
        return Candidate(
            self.group,
            bits,
            scale_log2,
            self.ratio,
            dz_index=self.dz_index,
            affine=self.settings.affine,
        )

    def _candidates(self) -> list[Candidate]:
        bits = self.bits
        zero = self._cand(bits, math.nan)
        if zero.is_zero:
            return [zero]
        return [self._cand(bits, s) for s in self.settings.scales_log2]

    def propose(self, lookahead: int) -> list[Candidate]:
        """Every candidate of the current bit width (``lookahead`` is not needed here)."""
        return [] if self.done else self._candidates()

    def best_candidates(self) -> list[Candidate]:
        """The candidate each finished bit width chose, in bit order (the all-zero candidate
        where only it was possible)."""
        return [self._cand(b, s) for b, s in zip(self.settings.bits, self.best_step, strict=False)]

    def consume(self, dists: Sequence[float], aux: Sequence[float] | None) -> None:
        """Results for all candidates last proposed, in order."""
        cands = self._candidates()
        if len(dists) != len(cands):
            raise ValueError(f"expected {len(cands)} results, got {len(dists)}")
        self.n_evals += len(dists)
        best = int(np.argmin(np.asarray(dists, dtype=np.float64)))
        self.best_dist.append(float(dists[best]))
        self.best_step.append(cands[best].step_log2)
        self.bit_index += 1


def run_chains(
    chains: list[Chain] | list[ScaleChain],
    evaluate: Evaluate,
    max_batch: int,
    on_chain_done: Callable[[Chain], None] | None = None,
    max_lookahead: int = 1,
    on_evaluated: Callable[[int], None] | None = None,
) -> int:
    """Drive all chains to completion; returns the number of distinct candidates evaluated.

    Each round takes the next candidate of every active chain, drops duplicates (all-zero
    candidates of one group), and evaluates them in batches of at most ``max_batch``. When fewer
    than ``max_batch`` chains remain, up to ``max_lookahead`` steps of each chain are evaluated
    speculatively: worth it where a wider pass costs little more (GPUs), wasted work on a CPU.
    ``on_evaluated(k)`` is called after each batch of ``k`` candidates (progress reports).
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    active = [c for c in chains if not c.done]
    # Results by candidate key, kept across rounds: the all-zero candidate of a group is shared
    # by its 0-bit points and every dead-zone chain's 1-bit point.
    results: dict[tuple, tuple[float, float]] = {}
    while active:
        lookahead = min(max(1, max_batch // len(active)), max(max_lookahead, 1))
        proposals = [c.propose(lookahead) for c in active]
        keys = [[cand.key() for cand in props] for props in proposals]
        unique: dict[tuple, Candidate] = {}
        for props, pkeys in zip(proposals, keys, strict=True):
            for cand, key in zip(props, pkeys, strict=True):
                if key not in results:
                    unique.setdefault(key, cand)
        todo = list(unique.items())
        for i in range(0, len(todo), max_batch):
            chunk = todo[i : i + max_batch]
            dist, aux = evaluate([cand for _, cand in chunk])
            if on_evaluated is not None:
                on_evaluated(len(chunk))
            for j, (key, _) in enumerate(chunk):
                a = float(aux[j]) if aux is not None else math.nan
                results[key] = (float(dist[j]), a)
        still = []
        for chain, pkeys in zip(active, keys, strict=True):
            got = [results[k] for k in pkeys]
            chain.consume([g[0] for g in got], [g[1] for g in got])
            if chain.done:
                if on_chain_done is not None:
                    on_chain_done(chain)
            else:
                still.append(chain)
        active = still
    return len(results)


def chains_to_arrays(
    chains: list[Chain] | list[ScaleChain], n_groups: int, n_dz: int, n_bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Collect finished chains into ``dist, step_log2, deadzone`` arrays of shape (G, D, B)."""
    dist = np.full((n_groups, n_dz, n_bits), np.inf)  # (G, D, B)
    step = np.full((n_groups, n_dz, n_bits), np.nan)  # (G, D, B)
    dz = np.zeros((n_groups, n_dz, n_bits))  # (G, D, B)
    for c in chains:
        if not c.done:
            raise RuntimeError(f"chain (group {c.group}, dz {c.dz_index}) did not finish")
        dist[c.group, c.dz_index] = c.best_dist
        step[c.group, c.dz_index] = c.best_step
        dz[c.group, c.dz_index] = c.deadzone if isinstance(c, Chain) else c.ratio
    return dist, step, dz
