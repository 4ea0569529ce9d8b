"""``--authors-semantics``: each of the authors' rules reproduces its documented formula
(``../shared/reference/authors_code_digest.md`` §1, §7), reaches every code path that
quantizes, and is recorded in the artifacts; the default paths are unchanged."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from rdoq.allocfile import ALLOC_SCHEMA_V3, load_allocation
from rdoq.apply import ActQuantizer, act_quantizer, quantized_weight
from rdoq.authors import PARTS, curve_parts, effective_parts, entry_rule, parse_parts
from rdoq.backends import quantized_group
from rdoq.groups import group_bounds
from rdoq.quantizers import (
    affine_bcw,
    affine_bcw_last,
    deadzone_magnitudes,
    quantize_deadzone,
    quantize_deadzone_fast,
    quantize_weight,
    weight_levels,
)
from rdoq.search import Candidate, Chain, SearchSettings, run_chains
from rdoq.store import SCHEMA_V3, CurveStore

# A Linear(6, 4) weight entry: a 1-bit dead-zone group, then a 3-bit uniform one.
ENTRY = {
    "type": "Linear",
    "shape": [4, 6],
    "channels": 4,
    "group_size": 2,
    "bits": [1, 3],
    "steps": "group",
    "step_log2": [-1.0, -2.0],
    "deadzone": [0.3, 0.0],
}


def _authors_formula(x: torch.Tensor, step: float, phi: float, bits: int) -> torch.Tensor:
    """The digest's §1.1 rule written out element by element."""
    out = torch.empty_like(x)
    for i, v in enumerate(x.tolist()):
        if abs(v) <= phi:
            out[i] = 0.0
            continue
        q = min(max(round((abs(v) - phi) / step), 0), 2 ** (bits - 1) - 1)
        out[i] = math.copysign(phi + step / 2 + q * step, v)
    return out


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_authors_deadzone_quantizer_is_the_documented_formula(bits):
    torch.manual_seed(0)
    x = torch.randn(400, dtype=torch.float64) * 2
    step, phi = 0.37, 0.21
    mags = deadzone_magnitudes(bits, authors=True)
    assert mags == 2 ** (bits - 1)
    got = quantize_deadzone(x, step, phi, mags, authors=True)
    assert torch.allclose(got, _authors_formula(x, step, phi, bits), rtol=0, atol=1e-12)
    # 2^b + 1 levels on a range wide enough to reach them all (1 bit is ternary).
    dense = torch.linspace(-20, 20, 20001, dtype=torch.float64)
    levels = quantize_deadzone(dense, step, phi, mags, authors=True).unique()
    assert levels.numel() == 2**bits + 1
    ours = quantize_deadzone(dense, step, phi, deadzone_magnitudes(bits)).unique()
    assert ours.numel() <= 2**bits
    # The one-buffer form and the group quantizer give the same values, bit for bit.
    f64 = dict(dtype=torch.float64)
    fast = quantize_deadzone_fast(
        x.clone(),
        torch.tensor(step, **f64),
        torch.tensor(phi, **f64),
        torch.tensor(float(mags), **f64),
        authors=True,
    )
    assert torch.equal(fast, got)
    assert torch.equal(quantize_weight(x, bits, math.log2(step), phi, authors=True), got)


def test_authors_rounding_pushes_values_outward_and_symbols_map_to_values():
    # Inside the range, floor keeps every value in its cell (error ≤ Δ/2); round puts a value
    # at φ + tΔ at φ + (round(t) + ½)Δ: outward by 0 to Δ (the digest's "probable defect").
    x = torch.linspace(0.5, 3.0, 2001, dtype=torch.float64)
    step, phi, bits = 0.25, 0.4, 6
    ours = quantize_deadzone(x, step, phi, deadzone_magnitudes(bits))
    theirs = quantize_deadzone(x, step, phi, deadzone_magnitudes(bits, True), authors=True)
    assert float((ours - x).abs().max()) <= step / 2 + 1e-12
    assert float((theirs - x).min()) >= -1e-12 and float((theirs - x).max()) <= step + 1e-12
    mse_ours, mse_theirs = float(((ours - x) ** 2).mean()), float(((theirs - x) ** 2).mean())
    assert mse_ours == pytest.approx(step**2 / 12, rel=0.05)
    assert mse_theirs == pytest.approx(step**2 / 3, rel=0.05)
    # The entropy's symbols: sign(l)·(φ + (|l| − ½)Δ) is the authors' value exactly.
    signed = torch.cat([-x, x])
    lv = weight_levels(signed, bits, step, phi, authors=True)
    val = quantize_weight(signed, bits, math.log2(step), phi, authors=True)
    rebuilt = torch.where(
        lv == 0,
        torch.zeros_like(val),
        torch.sign(lv.double()) * (phi + (lv.abs().double() - 0.5) * step),
    )
    assert torch.equal(rebuilt, val)
    # The top symbol is 2^(b-1): 2^b + 1 symbols.
    assert int(weight_levels(torch.tensor([100.0]), 3, step, phi, authors=True)) == 4


def test_affine_bcw_is_the_documented_per_channel_map():
    torch.manual_seed(1)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    wq = quantize_weight(w, 3, -1.0, 0.0)
    wq[2] = 0.0  # a pruned channel
    got = affine_bcw(w, wq)
    for c in range(4):
        a, b = w[c].flatten(), wq[c].flatten()
        want = (b - b.mean()) * a.std() / (b.std() + 1e-8) + a.mean()
        assert torch.allclose(got[c].flatten(), want, rtol=0, atol=1e-12)
    # Each channel gets the full-precision mean, and its std where the quantized one is > 0.
    assert torch.allclose(got.flatten(1).mean(1), w.flatten(1).mean(1), atol=1e-14)
    keep = [0, 1, 3]
    assert torch.allclose(got[keep].flatten(1).std(1), w[keep].flatten(1).std(1), rtol=1e-6)
    # A pruned channel becomes its mean: not free, as the digest notes.
    assert torch.allclose(got[2], w[2].mean().expand_as(got[2]))
    # The broadcast form (many candidates of one row) equals one call per candidate.
    cands = torch.stack([quantize_weight(w[0], b, -1.5, 0.0) for b in (1, 2, 4)])  # (3, 3, 3, 3)
    many = affine_bcw_last(w[0].reshape(1, 1, -1), cands.reshape(1, 3, -1))[0]
    for k in range(3):
        assert torch.allclose(many[k], affine_bcw(w[:1], cands[k : k + 1]).flatten(), atol=1e-12)


def test_hessian_batched_quantizer_follows_the_candidates_authors_rules():
    from rdoq.hessian_backends import quantize_weights_batched
    from rdoq.slots import SlotGrid

    torch.manual_seed(3)
    w = torch.randn(6, 20, dtype=torch.float64)  # 6 channels of 20 weights, groups of 2
    bounds = group_bounds(6, 2)
    for affine in (False, True):
        cands = [
            Candidate(g, b, s, dz, authors_dz=True, affine=affine)
            for g in (0, 2)
            for b in (0, 1, 2, 4)
            for s in (-3.0, -1.0)
            for dz in (0.0, 0.3)
        ]
        slots = SlotGrid.of(cands, split=[c.deadzone > 0 for c in cands])
        stacked = torch.stack([w[c0:c1].reshape(-1) for c0, c1 in bounds])[slots.groups]
        out = quantize_weights_batched(stacked.unsqueeze(1), cands, slots, slice(None), bounds)
        for k, c in enumerate(cands):
            want = quantized_group(w, bounds, c, None).reshape(-1)
            got = out[slots.rows[k], slots.cols[k]]
            assert torch.allclose(got, want, rtol=0, atol=1e-14), c
    mixed = [Candidate(0, 2, -1.0, authors_dz=True), Candidate(0, 2, -1.0)]
    with pytest.raises(ValueError, match="mix"):
        quantize_weights_batched(
            w[:2].reshape(1, 1, -1), mixed, SlotGrid.of(mixed), slice(None), bounds[:1]
        )


def _run_chain(settings: SearchSettings, rms_log2: float, dist_of) -> tuple[Chain, list]:
    """One chain driven to the end, with the candidates it asked for, in order."""
    chain = Chain(0, 0, 0.0, rms_log2, settings)
    asked = []

    def evaluate(cands):
        asked.extend(cands)
        d = np.array([dist_of(c) for c in cands])
        return d, d.copy()  # the weight MSE moves with the distortion

    run_chains([chain], evaluate, max_batch=1)
    return chain, asked


def test_authors_search_warm_start_and_early_stop():
    # A distortion with a shallow dip at step 2^-3 and its true minimum at 2^2: the authors'
    # search stops at the first rise, before reaching the previous width's best step; ours
    # always evaluates through it.
    def dist_of(c):
        if c.bits == 0:
            return 10.0
        s = c.step_log2
        return 5.0 - (1.0 if s == -3.0 else 0.0) - (4.0 if s == 2.0 else 0.0) + abs(s) * 1e-3

    settings = dict(bits=(0, 1, 2), step_grid=1, max_steps=48, stop_on_aux=True)
    theirs, asked = _run_chain(SearchSettings(**settings, authors_search=True), 0.5, dist_of)
    # 1 bit starts at floor(log2 RMS) − 10 − 2 = −12 and stops at the first rise.
    one_bit = [c.step_log2 for c in asked if c.bits == 1]
    assert one_bit[0] == -12.0 and one_bit[-1] == -2.0 and theirs.best_step[1] == -3.0
    # 2 bits start two octaves below 1 bit's best: −5, and stop at −2 again.
    two_bit = [c.step_log2 for c in asked if c.bits == 2]
    assert two_bit[0] == -5.0 and two_bit[-1] == -2.0
    ours, _ = _run_chain(SearchSettings(**settings), 0.5, dist_of)
    assert theirs.best_dist[2] > ours.best_dist[2] or ours.best_step[1] != theirs.best_step[1]


def test_authors_activation_search_scans_all_steps_at_one_bit():
    def dist_of(c):
        return 10.0 if c.bits == 0 else 1.0 + abs(c.step_log2 - 1.0)

    settings = SearchSettings(bits=(0, 1, 2), step_grid=4, max_steps=32, authors_search=True)
    chain, asked = _run_chain(settings, 3.0, dist_of)
    one_bit = [c.step_log2 for c in asked if c.bits == 1]
    # Start at 0 − 2 octaves; no early stop at 1 bit: all 32 quarter-octave steps.
    assert one_bit[0] == -2.0 and len(one_bit) == 32
    two_bit = [c.step_log2 for c in asked if c.bits == 2]
    assert two_bit[0] == chain.best_step[1] - 2 and len(two_bit) < 32


def test_authors_deadzone_chain_has_a_one_bit_point_and_flags_reach_candidates():
    settings = SearchSettings(bits=(0, 1, 2), step_grid=1, max_steps=8, authors_dz=True)
    chain = Chain(0, 1, 0.2, -1.0, settings, vmin=-1.0, vmax=1.0)
    (cand,) = chain.propose(1)
    assert cand.bits == 0 and cand.authors_dz
    chain.consume([1.0], [1.0])
    (cand,) = chain.propose(1)
    # The authors' 1-bit dead-zone quantizer is ternary, so it is searched (ours is all zero).
    assert cand.bits == 1 and not cand.is_zero and cand.authors_dz
    assert Candidate(0, 1, -1.0, 0.2).is_zero


def test_parse_and_effective_parts():
    assert parse_parts("bca,deadzone") == ("deadzone", "bca")
    assert parse_parts("all") == PARTS and parse_parts("none") == ()
    with pytest.raises(argparse.ArgumentTypeError, match="floor"):
        parse_parts("deadzone,floor")
    assert curve_parts("weight", PARTS, bias_corr=False) == ("deadzone", "search")
    assert curve_parts("act", PARTS, bias_corr=True) == ("search", "bca")
    metas = [{"authors_semantics": ["deadzone", "search"]}, {"authors_semantics": ["search"]}]
    assert effective_parts(PARTS, metas, bcw=True, bca=False) == ("deadzone", "search", "bcw")


def test_applied_entry_follows_its_rules_and_unknown_values_are_refused():
    torch.manual_seed(2)
    w = torch.randn(4, 6, dtype=torch.float64)
    entry = dict(ENTRY)
    plain = quantized_weight(w, entry)
    assert torch.equal(plain[:2], torch.zeros(2, 6, dtype=torch.float64))  # ours: 1-bit dz = 0
    theirs = quantized_weight(w, {**entry, "deadzone_rule": "authors"})
    assert torch.equal(theirs[:2], quantize_weight(w[:2], 1, -1.0, 0.3, authors=True))
    assert torch.equal(theirs[2:], plain[2:])
    both = quantized_weight(w, {**entry, "deadzone_rule": "authors", "bcw": "affine"})
    assert torch.allclose(both, affine_bcw(w, theirs), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="deadzone_rule='floor'"):
        entry_rule({"deadzone_rule": "floor"}, "deadzone")


def test_oracle_bca_reads_the_batch_it_quantizes():
    lin = torch.nn.Linear(3, 5)
    entry = {"channels": 5, "group_size": 5, "bits": [2], "step_log2": [-1.0], "signed": [True]}
    plain = act_quantizer(lin, entry)
    oracle = act_quantizer(lin, {**entry, "bca": "oracle"})
    assert isinstance(oracle, ActQuantizer) and oracle.oracle and not plain.oracle
    torch.manual_seed(4)
    x = torch.randn(7, 4, 5) + 0.3
    q, qo = plain(x), oracle(x)
    # Each channel's mean over the batch and positions equals the input's: the oracle offset.
    assert torch.allclose(qo.mean((0, 1)), x.mean((0, 1)), atol=1e-6)
    assert torch.allclose(qo - q, (x - q).mean((0, 1), keepdim=True), atol=1e-6)
    # The offset depends on the batch: the same sample quantizes differently in another batch.
    assert not torch.allclose(oracle(x[:1]), qo[:1])
    with pytest.raises(ValueError, match="oracle"):
        act_quantizer(lin, {**entry, "bca": "oracle"}, offset=[0.0] * 5)


def test_scripts_measure_allocate_and_record_the_authors_rules(tmp_path):
    """The paper's scripts on the bundled digits CNN: curves with every authors' rule, the DP
    with the authors' -bcw (no bias offsets), re-evaluation, and the refusals."""
    from rdoq.cli_alloc import allocate_main
    from rdoq.cli_curves import curves_main
    from rdoq.cli_eval import evaluate_main

    model = ["--archname", "digits_cnn", "--dataset", "digits", "--quiet"]
    curve_flags = [*model, "--testsize", "16", "--nchannelbatch", "8", "--maxrates", "4"]
    curve_flags += ["--maxdeadzones", "2", "--maxsteps", "12"]
    out = tmp_path / "curves"
    curves_main("weight", None, [*curve_flags, "--outdir", str(out), "--authors-semantics", "-bcw"])
    (root,) = out.iterdir()
    meta = CurveStore.load(root).meta
    assert "_authors_deadzone-search-bcw_" in root.name
    assert meta["authors_semantics"] == ["deadzone", "search", "bcw"]
    assert (meta["steps"], meta["schema"]) == ("group", SCHEMA_V3)
    solve = [*model, "--pathrdcurve", str(root), "--weights-only", "--target_rates", "3"]
    solve += ["--testsize", "64", "--batchsize", "64", "--no-plots"]
    res = allocate_main(
        "dp", argv=[*solve, "--outdir", str(tmp_path / "a"), "--authors-semantics", "-bcw"]
    )
    row = res["rows"][0]
    assert row["authors_semantics"] == ["deadzone", "search", "bcw"]
    assert row["method"] == "dp+bcw+authors-deadzone-search-bcw"
    # The auto monotone fit was measured with this project's -bcw only.
    assert row["monotone"] == "none"
    alloc = load_allocation(tmp_path / "a" / row["allocation"])
    assert alloc["schema"] == ALLOC_SCHEMA_V3 and "bcw" not in (alloc.get("corrections") or {})
    assert all(
        e["deadzone_rule"] == "authors" and e["bcw"] == "affine" for e in alloc["weights"].values()
    )
    again = evaluate_main(
        [str(tmp_path / "a" / row["allocation"]), "--testsize", "64", "--batchsize", "64"]
        + ["--outdir", str(tmp_path / "e"), "--quiet"]
    )
    assert again["rows"][0]["out_mse"] == pytest.approx(row["out_mse"], rel=1e-6)
    assert again["rows"][0]["authors_semantics"] == row["authors_semantics"]
    # The allocation must apply the quantizer the curves measured.
    with pytest.raises(SystemExit):
        allocate_main("dp", argv=[*solve, "--outdir", str(tmp_path / "b")])
    # The rules of the paper's one step per group refuse per-channel steps.
    with pytest.raises(SystemExit):
        curves_main(
            "weight",
            None,
            [*curve_flags, "--outdir", str(tmp_path / "c"), "--authors-semantics", "deadzone"]
            + ["--steps", "channel"],
        )


def test_correction_mismatch_warns_about_the_variant_too(tmp_path, caplog):
    from rdoq.cli import warn_correction_mismatch

    affine = CurveStore(
        tmp_path, {"kind": "weight", "bias_corr": True, "authors_semantics": ["bcw"]}
    )
    plain = CurveStore(tmp_path, {"kind": "act", "bias_corr": False})
    named = CurveStore(tmp_path, {"kind": "act", "bias_corr": True, "authors_semantics": ["bca"]})
    with caplog.at_level("WARNING", logger="rdoq"):
        warn_correction_mismatch(affine, "-bcw", True, authors=True)
        # The authors' -bca goes with curves that never saw it, -bca on their command line
        # or not.
        warn_correction_mismatch(plain, "-bca", True, authors=True)
        warn_correction_mismatch(named, "-bca", True, authors=True)
    assert caplog.text == ""
    with caplog.at_level("WARNING", logger="rdoq"):
        warn_correction_mismatch(affine, "-bcw", True, authors=False)
    assert "measured with the authors' -bcw but this allocation is deployed with -bcw" in (
        caplog.text
    )


def test_stored_entropy_counts_the_authors_dead_zone_symbols(tmp_path):
    """Curves measured with their dead-zone rule store the entropy of its symbols (a 1-bit
    dead-zone point is ternary, not empty)."""
    from rdoq.curves import CurveJob, generate_curves
    from rdoq.entropy import symbol_entropy
    from rdoq.parts import PartSpec

    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    net = net.double().eval()
    x = torch.randn(12, 6, dtype=torch.float64)
    job = CurveJob(
        kind="weight",
        group_size=4,
        nr=4,
        ndz=2,
        max_steps=10,
        step_grid=1,
        progress=False,
        step_mode="group",
        authors=("deadzone",),
        layers=("0",),
    )
    info = {"arch": "toy", "weights_source": "test", "checkpoint_sha256": None}
    calib = {"size": 12, "seed": 0, "source": "test", "sha256": "x", "items": []}
    generate_curves(net, x, info, calib, job, tmp_path / "c", PartSpec(0, 1), torch.device("cpu"))
    c = CurveStore.load(tmp_path / "c").read_layer("0")
    w = net[0].weight.detach()
    for g, (c0, c1) in enumerate(group_bounds(8, 4)):
        for b in (1, 2, 3):
            step, phi = 2.0 ** c.step_log2[g, 1, b], c.deadzone[g, 1, b]
            want = symbol_entropy(weight_levels(w[c0:c1], b, step, phi, authors=True))
            assert c.extra["entropy"][g, 1, b] == pytest.approx(want, rel=1e-12), (g, b)
    assert (c.extra["entropy"][:, 1, 1] > 0).all()  # ternary at 1 bit


def test_size_charges_the_affine_offsets_and_files_are_checked(tmp_path):
    import json

    from rdoq.evaluate import bit_report

    lin = torch.nn.Sequential(torch.nn.Linear(6, 4))
    entry = dict(ENTRY)
    alloc = {"model": "toy", "weights": {"0": entry}, "acts": {}}
    x1 = torch.randn(1, 6)
    plain = bit_report(lin, alloc, x1)["size_mb"]
    theirs = {**alloc, "weights": {"0": {**entry, "bcw": "affine"}}}
    assert bit_report(lin, theirs, x1)["size_mb"] - plain == pytest.approx(32 * 4 / 8e6)
    # Validation: a 1-bit group of the authors' dead-zone rule needs its step (it is ternary);
    # the channel count must match the group axis.
    path = tmp_path / "a.json"
    for bad, match in (
        ({**entry, "deadzone_rule": "authors", "step_log2": [None, -2.0]}, "lacks a step"),
        ({**entry, "group_axis": "in"}, "do not agree"),
    ):
        path.write_text(json.dumps({**alloc, "schema": ALLOC_SCHEMA_V3, "weights": {"0": bad}}))
        with pytest.raises(ValueError, match=match):
            load_allocation(path)
    ok = {**entry, "step_log2": [None, -2.0]}  # ours: a 1-bit dead-zone group is all zeros
    path.write_text(json.dumps({**alloc, "schema": ALLOC_SCHEMA_V3, "weights": {"0": ok}}))
    load_allocation(path)


def test_activation_set_lookup_names_the_rules_it_filtered_by(tmp_path, capsys):
    from rdoq.cli_alloc import allocate_main
    from rdoq.cli_curves import curves_main

    model = ["--archname", "digits_cnn", "--dataset", "digits", "--quiet"]
    small = [*model, "--testsize", "8", "--nchannelbatch", "16", "--maxrates", "3"]
    curves_main(
        "weight",
        None,
        [*small, "--maxdeadzones", "1", "--outdir", str(tmp_path / "w")]
        + ["--authors-semantics", "search"],
    )
    curves_main("act", "out", [*small, "--outdir", str(tmp_path / "acts")])  # no rules
    (wroot,) = (tmp_path / "w").iterdir()
    with pytest.raises(SystemExit):
        allocate_main(
            "dp",
            act_mode="out",
            argv=[*model, "--pathrdcurve", str(wroot), "--target_rates", "2"]
            + ["--act_curve_root_dir", str(tmp_path / "acts"), "--authors-semantics", "search"]
            + ["--testsize", "16", "--no-plots", "--outdir", str(tmp_path / "a")],
        )
    err = capsys.readouterr().err
    assert "made with the authors' rules ['search']" in err and "_authors_search_" in err
