"""The RD-curve grid search (DESIGN §4) driven by deterministic synthetic evaluators: batching
invariance, warm start through the previous best step, early stop, caps, all-zero dedup, arrays."""

import math

import numpy as np
import pytest

from rdoq.search import Candidate, Chain, SearchSettings, chains_to_arrays, run_chains

DEADZONES = (0.0, 0.01, 0.03)


class RecordingChain(Chain):
    """A chain that remembers the candidates whose results it consumed, in order."""

    def __post_init__(self):
        self.consumed = []
        self._proposed = []
        super().__post_init__()

    def propose(self, lookahead):
        self._proposed = super().propose(lookahead)
        return self._proposed

    def consume(self, dists, aux):
        before = self.n_evals
        super().consume(dists, aux)
        self.consumed.extend(self._proposed[: self.n_evals - before])


class Evaluator:
    """Wraps ``fn(candidate) -> (dist, aux)``; records every batch it is called with."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __call__(self, cands):
        self.calls.append(list(cands))
        out = np.array([self.fn(c) for c in cands], dtype=np.float64)  # (K, 2)
        return out[:, 0], out[:, 1]

    @property
    def evaluated(self):
        return [c for call in self.calls for c in call]


def _sigma(group):
    return 2.0 ** (-4 + group % 3)


def zero_dist(group):
    return 3.0 * _sigma(group) ** 2


def smooth(c):
    """Granular + clipping error: unimodal in the step, optimum moving with bits and group,
    non-increasing in bits at a fixed step."""
    if c.is_zero:
        return zero_dist(c.group), zero_dist(c.group)
    s = _sigma(c.group)
    t = c.step_log2
    dist = 4.0**t / 12 + s * s * math.exp(-(2.0 ** (t + c.bits - 1)) / s) + 0.3 * c.deadzone**2
    aux = 4.0**t / 10 + s * s * math.exp(-(2.0 ** (t + c.bits)) / s) + 0.5 * c.deadzone**2
    return dist, aux


def _bumpy_min(group):
    return -5 - group % 2


def bumpy(c):
    """A minimum at step m for every bit width, with a bump just below it: a search that stops at
    the first rise from two octaves below the previous best stops before m. Non-increasing in
    bits at every step."""
    if c.is_zero:
        return 10.0, 10.0
    m = _bumpy_min(c.group)
    t = c.step_log2
    base = (t - m) ** 2 + 1.0 + (4.0 if t == m - 1 else 0.0)
    return base * 0.5**c.bits + c.deadzone, base * 0.6**c.bits


def _chains(settings, n_groups, deadzones=DEADZONES, rms_log2=None):
    rms = rms_log2 or (lambda g: math.log2(_sigma(g)) + 0.3)
    return [
        RecordingChain(g, d, dz, rms(g), settings)
        for g in range(n_groups)
        for d, dz in enumerate(deadzones)
    ]


def _run(settings, fn, max_batch, max_lookahead=1, n_groups=4, deadzones=DEADZONES, rms_log2=None):
    chains = _chains(settings, n_groups, deadzones, rms_log2)
    ev = Evaluator(fn)
    n = run_chains(chains, ev, max_batch, max_lookahead=max_lookahead)
    return chains, ev, n


SMOOTH = SearchSettings(bits=tuple(range(7)), step_grid=4, max_steps=40)
BUMPY = SearchSettings(bits=tuple(range(6)), step_grid=1, max_steps=16)


def _bumpy_rms(g):
    return _bumpy_min(g) + 0.5


# ---------------------------------------------------------------------------------------------
# batching never changes the result


@pytest.mark.parametrize("fn,settings,rms", [(smooth, SMOOTH, None), (bumpy, BUMPY, _bumpy_rms)])
@pytest.mark.parametrize("max_batch,max_lookahead", [(3, 1), (64, 1), (3, 3), (64, 8), (64, 64)])
def test_batching_never_changes_curves(fn, settings, rms, max_batch, max_lookahead):
    ref_chains, ref_ev, _ = _run(settings, fn, 1, rms_log2=rms)
    chains, ev, n = _run(settings, fn, max_batch, max_lookahead, rms_log2=rms)
    shape = (4, len(DEADZONES), len(settings.bits))
    ref = chains_to_arrays(ref_chains, *shape)
    got = chains_to_arrays(chains, *shape)
    for a, b in zip(ref, got, strict=True):
        assert a.shape == shape
        np.testing.assert_array_equal(a, b)
    for a, b in zip(ref_chains, chains, strict=True):
        assert a.consumed == b.consumed
        assert a.n_evals == b.n_evals == len(b.consumed)
        assert a.best_step == b.best_step or np.array_equal(
            a.best_step, b.best_step, equal_nan=True
        )
    assert n == len(ev.evaluated)
    assert all(len(call) <= max_batch for call in ev.calls)


def test_speculative_candidates_are_discarded():
    # one chain, wide batches: many candidates past the stop are evaluated but not consumed
    ref_chains, ref_ev, _ = _run(SMOOTH, smooth, 1, n_groups=1, deadzones=(0.0,))
    chains, ev, _ = _run(SMOOTH, smooth, 64, 64, n_groups=1, deadzones=(0.0,))
    assert len(ev.evaluated) > len(ref_ev.evaluated)
    assert len(ev.calls) < len(ref_ev.calls)
    assert chains[0].consumed == ref_chains[0].consumed
    assert chains[0].best_dist == ref_chains[0].best_dist
    # without speculation the evaluator sees exactly what the chain consumed
    assert ref_ev.evaluated == ref_chains[0].consumed


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError, match="max_batch"):
        run_chains(_chains(SMOOTH, 1), Evaluator(smooth), 0)


def test_on_chain_done_called_once_per_chain():
    chains = _chains(SMOOTH, 3)
    done = []
    run_chains(chains, Evaluator(smooth), 8, on_chain_done=lambda c: done.append(c))
    assert sorted(id(c) for c in done) == sorted(id(c) for c in chains)
    assert all(c.done for c in done)


# ---------------------------------------------------------------------------------------------
# warm start through the previous best step, monotone curves


@pytest.mark.parametrize("fn,settings,rms", [(smooth, SMOOTH, None), (bumpy, BUMPY, _bumpy_rms)])
def test_previous_best_step_is_evaluated(fn, settings, rms):
    chains, _, _ = _run(settings, fn, 16, 4, rms_log2=rms)
    checked = 0
    for c in chains:
        for i, b in enumerate(settings.bits):
            if b < 2 or math.isnan(c.best_step[i - 1]):
                continue
            steps = [x.step_log2 for x in c.consumed if x.bits == b]
            assert c.best_step[i - 1] in steps
            assert min(steps) == c.best_step[i - 1] - settings.back_octaves
            checked += 1
    assert checked > 0


def test_bumpy_trap_is_armed_and_avoided():
    chains, _, _ = _run(BUMPY, bumpy, 1, n_groups=2, deadzones=(0.0,), rms_log2=_bumpy_rms)
    for c in chains:
        m = _bumpy_min(c.group)
        for i, b in enumerate(BUMPY.bits[1:], start=1):
            start = c.best_step[i - 1] - 2 if i > 1 else m - 2
            # the authors' stop would keep the start step: its dist exceeds the previous bit's best
            if i > 1:
                assert bumpy(Candidate(c.group, b, start))[0] > c.best_dist[i - 1]
            assert c.best_step[i] == m
            assert c.best_dist[i] == pytest.approx(0.5**b)


@pytest.mark.parametrize("fn,settings,rms", [(smooth, SMOOTH, None), (bumpy, BUMPY, _bumpy_rms)])
def test_dist_non_increasing_over_bits(fn, settings, rms):
    chains, _, _ = _run(settings, fn, 64, 8, rms_log2=rms)
    dist, _, _ = chains_to_arrays(chains, 4, len(DEADZONES), len(settings.bits))
    assert np.isfinite(dist).all()
    assert (np.diff(dist, axis=-1) <= 0).all()
    # and more bits actually help beyond 1 bit
    assert (dist[:, 0, -1] < dist[:, 0, 1]).all()


# ---------------------------------------------------------------------------------------------
# early stop and caps


def _table(tables):
    """Evaluator from per-bit tables {bits: {step: (dist, aux)}}; 0-bit dist is 100. Steps off
    the table (only ever proposed speculatively, past a stop) give NaN, which would poison the
    curve if a chain consumed them."""

    def fn(c):
        if c.is_zero:
            return 100.0, 100.0
        return tables[c.bits].get(c.step_log2, (math.nan, math.nan))

    return fn


def _single(settings, fn, max_batch=1, max_lookahead=1, rms_log2=0.0):
    chains = [RecordingChain(0, 0, 0.0, rms_log2, settings)]
    run_chains(chains, Evaluator(fn), max_batch, max_lookahead=max_lookahead)
    return chains[0]


def _steps(chain, bits):
    return [c.step_log2 for c in chain.consumed if c.bits == bits]


def _ramp(values, start):
    return {start + i: (v, v) for i, v in enumerate(values)}


@pytest.mark.parametrize("max_batch,max_lookahead", [(1, 1), (64, 64)])
def test_stops_at_first_rise_at_or_after_previous_best(max_batch, max_lookahead):
    settings = SearchSettings(bits=(0, 1, 2, 3), step_grid=1, max_steps=20)
    tables = {
        # b=1 starts at 0 - 2 (RMS anchor 0): falls to step 2, rises at 3 -> 6 evaluations
        1: _ramp([5, 4, 3, 2, 1, 1.5, 0.5, 0.1], -2),
        # b=2 starts at 2 - 2 = 0: rises at 1 (before the previous best, ignored), falls at 2
        # and 3, rises at 4 -> 5 evaluations
        2: _ramp([1.0, 1.2, 0.8, 0.6, 0.7, 0.1], 0),
        # b=3 starts at 3 - 2 = 1: rises right at the previous best step 3 -> 3 evaluations
        3: _ramp([0.5, 0.4, 0.45, 0.1, 0.05], 1),
    }
    c = _single(settings, _table(tables), max_batch, max_lookahead)
    assert _steps(c, 1) == [-2, -1, 0, 1, 2, 3]
    assert _steps(c, 2) == [0, 1, 2, 3, 4]
    assert _steps(c, 3) == [1, 2, 3]
    assert c.n_evals == 1 + 6 + 5 + 3
    assert c.best_step[1:] == [2, 3, 2]
    assert c.best_dist == [100.0, 1.0, 0.6, 0.4]
    assert math.isnan(c.best_step[0])


def test_fine_grid_back_octaves_and_anchor():
    # step_grid 4: start two octaves (8 grid steps) below the anchor, which is the RMS floored to
    # the grid for the first searched bit width
    settings = SearchSettings(bits=(1, 2), step_grid=4, max_steps=30)
    rms = -3.1  # grid_floor(-3.1, 4) = -3.25
    start = -3.25 - 2
    dist1 = {start + i / 4: (float(abs(i - 10)), 0.0) for i in range(30)}  # minimum at i=10
    dist2 = {start + 0.5 + i / 4: (float(abs(i - 3)) + 1, 0.0) for i in range(30)}
    c = _single(settings, _table({1: dist1, 2: dist2}), rms_log2=rms)
    assert _steps(c, 1) == [start + i / 4 for i in range(12)]
    assert c.best_step[0] == start + 2.5
    # b=2 starts 8 grid steps below start + 2.5, must reach it (i=8) even though i=4 rises
    assert _steps(c, 2) == [start + 0.5 + i / 4 for i in range(9)]
    assert c.best_step[1] == start + 0.5 + 0.75


@pytest.mark.parametrize("max_batch,max_lookahead", [(1, 1), (64, 64)])
def test_stop_on_aux_needs_both_to_rise(max_batch, max_lookahead):
    dist = [5, 4, 3, 2, 3, 4, 5, 6, 7]
    aux = [5, 4, 3, 2, 1, 2, 3, 4, 5]
    table = {
        1: {-2 + i: (float(d), float(a)) for i, (d, a) in enumerate(zip(dist, aux, strict=True))}
    }
    plain = SearchSettings(bits=(1,), step_grid=1, max_steps=9)
    both = SearchSettings(bits=(1,), step_grid=1, max_steps=9, stop_on_aux=True)
    c_plain = _single(plain, _table(table), max_batch, max_lookahead)
    c_both = _single(both, _table(table), max_batch, max_lookahead)
    assert c_plain.n_evals == 5  # dist rises at index 4
    assert c_both.n_evals == 6  # aux still falls at index 4; both rise at index 5
    assert c_plain.best_step == c_both.best_step == [1.0]
    assert c_plain.best_dist == c_both.best_dist == [2.0]


def test_stop_on_aux_ignores_aux_rise_alone():
    # aux rises while dist keeps falling: not a stop
    dist = [5, 4, 3, 2, 1, 0.5, 0.6, 0.7]
    aux = [5, 6, 7, 8, 9, 10, 11, 12]
    table = {
        1: {-2 + i: (float(d), float(a)) for i, (d, a) in enumerate(zip(dist, aux, strict=True))}
    }
    settings = SearchSettings(bits=(1,), step_grid=1, max_steps=8, stop_on_aux=True)
    c = _single(settings, _table(table))
    assert c.n_evals == 7
    assert c.best_step == [3.0]


@pytest.mark.parametrize("max_steps,step_grid", [(3, 1), (5, 1), (9, 4), (12, 4)])
@pytest.mark.parametrize("max_batch,max_lookahead", [(1, 1), (64, 64)])
def test_max_steps_caps_evaluations(max_steps, step_grid, max_batch, max_lookahead):
    settings = SearchSettings(bits=(0, 1, 2, 3), step_grid=step_grid, max_steps=max_steps)

    def falling(c):
        if c.is_zero:
            return 100.0, 100.0
        return -c.step_log2 + 10.0 / c.bits, 0.0  # strictly falling in the step: never stops

    ev = Evaluator(falling)
    chain = RecordingChain(0, 0, 0.0, 0.0, settings)
    run_chains([chain], ev, max_batch, max_lookahead=max_lookahead)
    for b in (1, 2, 3):
        assert len(_steps(chain, b)) == max_steps
        assert len([c for c in ev.evaluated if c.bits == b]) == max_steps
    assert chain.n_evals == 1 + 3 * max_steps
    # each bit width's best is its last step; the next starts two octaves below it
    assert chain.best_step[1] == -2 + (max_steps - 1) / step_grid
    assert chain.best_step[2] == chain.best_step[1] - 2 + (max_steps - 1) / step_grid


def test_settings_reject_max_steps_below_previous_best():
    with pytest.raises(ValueError, match="--maxsteps"):
        SearchSettings(bits=(0, 1), step_grid=4, max_steps=8)
    with pytest.raises(ValueError, match="--maxsteps"):
        SearchSettings(bits=(0, 1), step_grid=1, max_steps=2)
    with pytest.raises(ValueError, match="--maxsteps"):
        SearchSettings(bits=(0, 1), step_grid=1, max_steps=5, back_octaves=5)
    SearchSettings(bits=(0, 1), step_grid=4, max_steps=9)
    SearchSettings(bits=(0, 1), step_grid=1, max_steps=3)
    with pytest.raises(ValueError, match="step_grid"):
        SearchSettings(bits=(0, 1), step_grid=0, max_steps=30)


# ---------------------------------------------------------------------------------------------
# all-zero candidates


def test_zero_candidates_key_and_is_zero():
    z = Candidate(2, 0, math.nan, 0.0)
    assert z.is_zero
    assert Candidate(2, 0, -3.0, 0.05).key() == z.key()
    assert Candidate(2, 1, -3.0, 0.05).is_zero
    assert Candidate(2, 1, -1.0, 0.2).key() == z.key()
    assert not Candidate(2, 1, -3.0, 0.0).is_zero
    assert not Candidate(2, 2, -3.0, 0.05).is_zero
    assert Candidate(2, 2, -3.0, 0.05).key() != Candidate(2, 2, -3.0, 0.06).key()
    assert Candidate(3, 0, math.nan).key() != z.key()


@pytest.mark.parametrize("max_batch", [1, 64])
def test_zero_bits_evaluated_once_per_group(max_batch):
    settings = SearchSettings(bits=(0,), step_grid=1, max_steps=8)
    chains, ev, n = _run(settings, smooth, max_batch, n_groups=3, deadzones=(0.0, 0.01, 0.02, 0.05))
    assert n == 3
    assert sorted(c.group for c in ev.evaluated) == [0, 1, 2]
    for c in chains:
        assert c.best_dist == [zero_dist(c.group)]
        assert math.isnan(c.best_step[0])


def _zero_evals(ev, group):
    return sum(1 for c in ev.evaluated if c.group == group and c.is_zero)


@pytest.mark.parametrize("max_batch", [1, 64])
def test_one_bit_deadzone_shares_zero_evaluation(max_batch):
    settings = SearchSettings(bits=(0, 1, 2, 3), step_grid=1, max_steps=12)
    few, ev_few, _ = _run(settings, smooth, max_batch, n_groups=3, deadzones=(0.0, 0.01))
    many, ev_many, _ = _run(
        settings, smooth, max_batch, n_groups=3, deadzones=(0.0, 0.01, 0.02, 0.03, 0.05, 0.08)
    )
    for g in range(3):
        # the all-zero perturbation is not evaluated once per dead zone
        assert _zero_evals(ev_many, g) == _zero_evals(ev_few, g) == 1
    # the evaluator never sees a key twice in one batch
    for call in ev_many.calls:
        keys = [c.key() for c in call]
        assert len(keys) == len(set(keys))
    for c in many:
        n1 = [x for x in c.consumed if x.bits == 1]
        if c.deadzone > 0:
            # 1-bit dead-zone quantizer has only the zero level: one candidate, zero dist
            assert len(n1) == 1 and n1[0].is_zero
            assert c.best_dist[1] == c.best_dist[0] == zero_dist(c.group)
            assert math.isnan(c.best_step[1])
            # b=2 then warm-starts from the RMS anchor, not from a NaN step
            assert not math.isnan(c.best_step[2])
        else:
            assert len(n1) > 1 and not any(x.is_zero for x in n1)
            assert c.best_dist[1] < c.best_dist[0]


# ---------------------------------------------------------------------------------------------
# arrays


def test_chains_to_arrays_shapes_and_values():
    chains, _, _ = _run(SMOOTH, smooth, 16, 2, n_groups=3)
    dist, step, dz = chains_to_arrays(chains, 3, len(DEADZONES), len(SMOOTH.bits))
    for a in (dist, step, dz):
        assert a.shape == (3, 3, 7)
    for c in chains:
        np.testing.assert_array_equal(dist[c.group, c.dz_index], c.best_dist)
        np.testing.assert_array_equal(step[c.group, c.dz_index], c.best_step)
        assert (dz[c.group, c.dz_index] == DEADZONES[c.dz_index]).all()
    assert np.isnan(step[:, :, 0]).all()
    assert np.isnan(step[:, 1:, 1]).all() and not np.isnan(step[:, 0, 1]).any()
    assert not np.isnan(step[:, :, 2:]).any()


def test_chains_to_arrays_unfinished_chain_raises():
    chains = _chains(SMOOTH, 2)
    run_chains(chains[:-1], Evaluator(smooth), 8)
    with pytest.raises(RuntimeError, match="group 1"):
        chains_to_arrays(chains, 2, len(DEADZONES), len(SMOOTH.bits))


def test_equal_keys_mean_equal_quantized_tensors():
    """Canonical keys (fewest bits that quantize identically) never merge different tensors."""
    import torch

    from rdoq.quantizers import quantize_uniform, quantize_weight, unsigned_bounds

    settings = SearchSettings(bits=tuple(range(9)), step_grid=4, max_steps=40)
    merged = 0
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(300, generator=g, dtype=torch.float64) * (0.1 + seed)
        pos = w.abs()
        for data, unsigned in ((w, False), (pos, True)):
            for phi in (0.0, float(pos.quantile(0.3))) if not unsigned else (0.0,):
                chain = Chain(
                    0,
                    0,
                    phi,
                    0.0,
                    settings,
                    vmin=float(data.min()),
                    vmax=float(data.max()),
                    unsigned=unsigned,
                )
                by_key: dict = {}
                for bits in range(9):
                    for s in range(-40, 20):
                        step = s / 4
                        cand = Candidate(
                            0, bits, step, phi, chain._same_as_bits(bits, 2.0**step) if bits else -1
                        )
                        if unsigned:
                            q = quantize_uniform(data, 2.0**step, *unsigned_bounds(bits))
                        else:
                            q = quantize_weight(data, bits, step, phi)
                        key = cand.key()
                        if key in by_key:
                            merged += 1
                            assert torch.equal(by_key[key], q), (seed, unsigned, phi, bits, step)
                        else:
                            by_key[key] = q
    assert merged > 100, "the canonical keys should merge many equivalent candidates"


def test_warm_start_restarts_when_the_previous_width_did_not_beat_pruning():
    # 1 bit is worse than pruning at every step and best at the smallest step tried; 2 bits has
    # its optimum near the group's RMS (2^0). Warm-starting from the 1-bit step alone would walk
    # the 2-bit search down into steps that zero the group.
    def fn(c):
        if c.is_zero:
            return 1.0, 1.0
        if c.bits == 1:
            return 1.2 + 0.01 * (c.step_log2 + 20), 1.0
        if c.step_log2 < -1:  # small steps clip everything: worse as the step grows
            return 0.9 + 0.01 * (c.step_log2 + 20), 1.0
        return 0.01 + c.step_log2**2 / 10, 1.0

    settings = SearchSettings(bits=(0, 1, 2, 3), step_grid=4, max_steps=40, stop_on_aux=False)
    chain = RecordingChain(0, 0, 0.0, 0.0, settings)
    run_chains([chain], Evaluator(fn), max_batch=1)
    assert chain.best_dist[1] > chain.best_dist[0]  # 1 bit did not help
    assert chain.best_dist[2] == pytest.approx(0.01) and chain.best_step[2] == 0.0
    # The 1-bit best step was still evaluated at 2 bits.
    assert any(c.bits == 2 and c.step_log2 == chain.best_step[1] for c in chain.consumed)


def test_on_evaluated_counts_every_distinct_candidate():
    seen = []
    n = run_chains(_chains(SMOOTH, 3), Evaluator(smooth), 4, on_evaluated=seen.append)
    assert sum(seen) == n and max(seen) <= 4
