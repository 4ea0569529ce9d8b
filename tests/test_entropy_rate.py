"""Entropy-coded rate (the paper's ``--bit_rate 0``): per curve point the empirical entropy of
the quantized weights' integer symbols, stored as ``entropy (G, D, B)``; the allocation scripts
budget it with ``--rate entropy`` and report it next to the fixed-width bits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rdoq.adapters.base import InputError
from rdoq.adapters.digits import build_digits_model
from rdoq.allocation import (
    ACT,
    RATES,
    WEIGHT,
    ItemTable,
    LayerEntry,
    build_table,
    restrict,
    solve_recorded,
)
from rdoq.allocfile import load_allocation, summarize_choice
from rdoq.apply import quantized_weight
from rdoq.backends import quantized_group
from rdoq.cli import RATE_FLAGS
from rdoq.cli_alloc import allocate_main
from rdoq.curves import CurveJob, build_meta, plan_layers
from rdoq.entropy import act_curve_entropy, curve_entropy, group_levels, symbol_entropy
from rdoq.groups import group_bounds
from rdoq.quantizers import quantize_weight_steps, weight_levels
from rdoq.search import Candidate
from rdoq.steps import ChannelSteps
from rdoq.store import CurveStore, LayerCurves
from tests.conftest import run_script

# ------------------------------------------------------------------------ symbols and entropy


def _reconstruct(
    levels: torch.Tensor, bits: int, step: torch.Tensor, phi: torch.Tensor
) -> torch.Tensor:
    """Values of integer levels ``(c, n)``: ``l·Δ`` (uniform channels) or
    ``sign(l)·(φ + (|l|−½)Δ)`` (dead-zone channels, φ > 0), 0 for level 0."""
    x = levels.double()
    step, phi = step[:, None], phi[:, None]
    dz = torch.sign(x) * (phi + (x.abs() - 0.5) * step)
    return torch.where(phi > 0, torch.where(levels == 0, torch.zeros_like(x), dz), x * step)


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_levels_reconstruct_the_quantizer_bitwise(bits):
    torch.manual_seed(bits)
    x = torch.randn(6, 40, dtype=torch.float64)
    step = torch.rand(6, dtype=torch.float64) * 0.5 + 0.05
    for phi in (
        torch.zeros(6, dtype=torch.float64),  # uniform
        torch.full((6,), 0.3, dtype=torch.float64),  # dead zone
        torch.tensor([0.0, 0.2, 0.0, 0.4, 0.1, 0.0], dtype=torch.float64),
    ):  # mixed
        q = quantize_weight_steps(x, bits, step, phi)
        lv = weight_levels(x, bits, step, phi)
        assert lv.dtype == torch.int64
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        assert int(lv.min()) >= lo and int(lv.max()) <= hi
        assert torch.equal(_reconstruct(lv, bits, step, phi), q)
    assert not weight_levels(x, 0, step, phi).any()


def test_entropy_of_uniform_symbols_is_the_width_and_of_a_constant_zero():
    for bits in range(1, 7):
        levels = torch.arange(2**bits).repeat(3) - 2 ** (bits - 1)
        assert symbol_entropy(levels) == pytest.approx(bits, abs=1e-12)
    assert symbol_entropy(torch.zeros(50, dtype=torch.int64)) == 0.0
    assert symbol_entropy(torch.full((7,), 3)) == 0.0
    # Two symbols, 1:3: H = 2 - 3/4 log2 3.
    assert symbol_entropy(torch.tensor([0, 1, 1, 1])) == pytest.approx(2 - 0.75 * math.log2(3))


def test_group_levels_match_the_engine_quantizer():
    torch.manual_seed(0)
    w = torch.randn(10, 3, 2, 2, dtype=torch.float64)
    bounds = group_bounds(10, 4)  # 4, 4, 2
    steps = ChannelSteps.of(w, 2, 5)
    for cand in (
        Candidate(2, 3, -0.25, 0.5, dz_index=1),
        Candidate(0, 4, 0.0, 0.0, dz_index=0),
        Candidate(1, 1, math.nan, 0.5, dz_index=1),
    ):
        lv = group_levels(w, bounds, cand, steps)
        c0, c1 = bounds[cand.group]
        step = 2.0 ** (steps.step_log2[c0:c1, cand.dz_index, cand.bits] + cand.step_log2)
        step = np.where(np.isfinite(step), step, 1.0)
        phi = torch.from_numpy(steps.deadzone[c0:c1, cand.dz_index])
        rec = _reconstruct(lv.reshape(c1 - c0, -1), cand.bits, torch.from_numpy(step), phi)
        assert torch.equal(rec.reshape(lv.shape), quantized_group(w, bounds, cand, steps))
    # The paper's quantizer: one absolute step per group.
    cand = Candidate(1, 3, -2.0, 0.0)
    lv = group_levels(w, bounds, cand, None)
    assert torch.equal(lv.double() * 0.25, quantized_group(w, bounds, cand, None))


def test_curve_entropy_bounds_uniform_weights_and_constant_groups():
    # Group 0: every one of the 2^3 levels of step 0.5 equally often; group 1: constant.
    levels = (torch.arange(8).repeat(4) - 4).double() * 0.5  # (32,)
    w = torch.stack(
        [levels.reshape(4, 8)[i] for i in range(4)]
        + [torch.full((8,), 0.7, dtype=torch.float64)] * 4
    )  # (8, 8)
    bounds = group_bounds(8, 4)
    nr = 5
    step_log2 = np.full((2, 2, nr), -1.0)  # (G, D, B) step 0.5 everywhere
    step_log2[:, :, 0] = np.nan
    deadzone = np.zeros((2, 2, nr))  # (G, D, B)
    deadzone[:, 1] = 0.1
    ent = curve_entropy(w, bounds, step_log2, deadzone, None)
    assert ent.shape == (2, 2, nr)
    assert (ent <= np.arange(nr)[None, None, :] + 1e-12).all() and (ent >= 0).all()
    assert (ent[:, :, 0] == 0).all()
    assert ent[0, 0, 3] == pytest.approx(3.0, abs=1e-12)
    assert (ent[1] == 0).all()


@pytest.mark.parametrize("mode", ["channel", "group"])
def test_curve_entropy_never_exceeds_the_width(mode):
    torch.manual_seed(1)
    w = torch.randn(7, 5, 3, 3, dtype=torch.float64) * torch.logspace(-2, 1, 7)[:, None, None, None]
    bounds = group_bounds(7, 3)
    nr, ndz = 6, 2
    rng = np.random.default_rng(0)
    steps = ChannelSteps.of(w, ndz, nr) if mode == "channel" else None
    step_log2 = rng.uniform(-1, 1, (3, ndz, nr)) if steps else rng.uniform(-8, 2, (3, ndz, nr))
    deadzone = np.zeros((3, ndz, nr))  # (G, D, B)
    deadzone[:, 1] = 0.5 if steps else 0.05
    ent = curve_entropy(w, bounds, step_log2, deadzone, steps)
    assert (ent <= np.arange(nr)[None, None, :] + 1e-12).all() and (ent >= 0).all()
    assert (ent[:, :, 0] == 0).all() and (ent[:, 1, 1] == 0).all()  # 1-bit dead zone: all 0
    if steps is not None:  # steps near each channel's MSE-optimal one: never all one symbol
        assert (ent[:, :, 2:] > 0).all()


# ------------------------------------------------------------------------------ item table


INFO = {"arch": "tinynet", "weights_source": "test", "checkpoint_sha256": None}
CALIB = {"size": 8, "seed": 0, "source": "test", "sha256": "x", "items": list(range(8))}


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.f1 = nn.Linear(6, 5)

    def forward(self, x):
        return self.f1(torch.relu(self.c1(x)).mean((2, 3)))


def _curve_set(
    root: Path, kind: str, entropy: bool, nr: int = 5, act_mode: str | None = None
) -> CurveStore:
    """Random decreasing curves of TinyNet (and, for weights, random entropies ≤ bits)."""
    rng = np.random.default_rng(0)
    job = CurveJob(
        kind=kind,
        act_mode=act_mode,
        group_size=2,
        nr=nr,
        ndz=2 if kind == "weight" else 1,
        max_steps=4,
        step_grid=1,
        step_mode="group",
    )
    plans = plan_layers(TinyNet(), torch.randn(1, 3, 8, 8), job)
    store = CurveStore.open(root, build_meta(job, INFO, CALIB, plans))
    for p in plans:
        g, d = len(p.bounds), job.ndz
        dist = (
            rng.uniform(0.5, 2.0, (g, d, 1))
            * 4.0 ** -np.arange(nr)
            * rng.uniform(0.8, 1.2, (g, d, nr))
        )  # (G, D, B)
        step = rng.integers(-6, -1, size=(g, d, nr)).astype(float)
        extra: dict[str, np.ndarray] = {}
        if kind == "act":
            extra["signed"] = np.ones(g, dtype=bool)
        if entropy:
            extra["entropy"] = rng.uniform(0.3, 1.0, (g, d, nr)) * np.arange(nr)  # (G, D, B)
        store.write_layer(p.name, LayerCurves(dist, step, np.zeros((g, d, nr)), p.numel, extra))
    return store


def test_activation_entropy_is_that_of_the_calibration_symbols():
    """act_curve_entropy against symbols computed here: the group's calibration activations
    on the point's grid, pooled over samples, positions and channels."""
    torch.manual_seed(0)
    net = TinyNet().double().eval()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    bounds = group_bounds(6, 3)
    signed = np.array([True, False])
    step_log2 = np.array([[[0.0, -1.0, -2.0, -2.5, -3.0]], [[0.0, -1.0, -2.0, -3.0, np.nan]]])
    got = act_curve_entropy(net, x, "c1", "out", 4, bounds, signed, step_log2, None)
    with torch.no_grad():
        y = net.c1(x)  # (N, 6, H, W)
    for g, (c0, c1) in enumerate(bounds):
        assert got[g, 0, 0] == 0.0
        for b in range(1, 5):
            if not math.isfinite(step_log2[g, 0, b]):
                assert got[g, 0, b] == b  # never reached: its width, an upper bound
                continue
            lo, hi = (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if signed[g] else (0, 2**b - 1)
            sym = torch.clamp(torch.round(y[:, c0:c1] / 2.0 ** step_log2[g, 0, b]), lo, hi)
            assert got[g, 0, b] == pytest.approx(symbol_entropy(sym.long()), abs=1e-12)
            assert 0.0 <= got[g, 0, b] <= b


def test_entropy_table_rates_are_entropy_times_elements(tmp_path):
    w = _curve_set(tmp_path / "w", "weight", entropy=True)
    bits_t = build_table(w, None)
    t = build_table(w, None, rate="entropy")
    assert bits_t.rate_kind == "bits" and t.rate_kind == "entropy"
    np.testing.assert_array_equal(t.dist, bits_t.dist)
    np.testing.assert_array_equal(bits_t.rate, bits_t.numel[:, None] * np.arange(5))
    # The column of each width is its best dead zone by distortion; its entropy sets the rate.
    for layer in t.layers:
        c = w.read_layer(layer.name)
        best = c.dist.argmin(axis=1)  # (G, B)
        ent = np.take_along_axis(c.extra["entropy"], best[:, None], 1)[:, 0]  # (G, B)
        np.testing.assert_allclose(t.rate[layer.rows], ent * c.numel[:, None], rtol=1e-15)
        np.testing.assert_array_equal(t.entropy[layer.rows], ent)
    # Solved against the entropy budget; the summary keeps the fixed width apart.
    (choice,) = solve_recorded(t, [2.0], "dp").choices
    s = summarize_choice(t, choice)
    idx = np.arange(len(choice))
    assert s["rate"] == "entropy"
    assert s["w_entropy_bits"] == pytest.approx(t.rate[idx, choice].sum() / t.numel.sum())
    assert s["w_entropy_bits"] <= 2.0 + 1e-9
    assert s["w_bits"] == pytest.approx((t.bits[choice] * t.numel).sum() / t.numel.sum())
    assert s["w_bits"] >= s["w_entropy_bits"]
    assert summarize_choice(bits_t, choice)["rate"] == "bits"


def test_smoothing_charges_the_entropy_of_the_point_used(tmp_path):
    # The curve rises at 2 bits: smoothing realises column 2 with column 1's quantizer, so
    # column 2 must cost column 1's entropy, not its own.
    t = ItemTable(
        dist=np.array([[1.0, 0.3, 0.5, 0.1]]),
        rate=np.array([[0.0, 8.0, 5.0, 20.0]]),
        numel=np.array([10.0]),
        kind=np.array([WEIGHT]),
        layer=np.array([0]),
        step_log2=np.zeros((1, 4)),
        deadzone=np.zeros((1, 4)),
        source=np.arange(4)[None].copy(),
        dz_index=np.zeros((1, 4), dtype=np.int64),
        bits=np.arange(4),
        layers=[LayerEntry(WEIGHT, "x", "Linear", (1, 10), 1, 1, slice(0, 1))],
        model="m",
        curve_sets={},
        act_mode=None,
        rate_kind="entropy",
        entropy=np.array([[0.0, 0.8, 0.5, 2.0]]),
    )
    s = restrict(t, smooth=True)
    np.testing.assert_array_equal(s.rate[0], [0.0, 8.0, 8.0, 20.0])
    np.testing.assert_array_equal(s.entropy[0], [0.0, 0.8, 0.8, 2.0])


def test_entropy_rate_is_refused_without_entropy(tmp_path):
    old = _curve_set(tmp_path / "old", "weight", entropy=False)
    build_table(old, None)  # fixed-width rates still work on older curve sets
    with pytest.raises(InputError, match=r"no entropy rates.*--rate bits"):
        build_table(old, None, rate="entropy")
    w = _curve_set(tmp_path / "w", "weight", entropy=True)
    a_old = _curve_set(tmp_path / "a_old", "act", entropy=False, act_mode="out")
    build_table(w, a_old)
    with pytest.raises(InputError, match=r"activation curve set .* no entropy.*--weights-only"):
        build_table(w, a_old, rate="entropy")
    # Activation curves with entropy: every item is charged entropy × elements.
    a = _curve_set(tmp_path / "a", "act", entropy=True, act_mode="out")
    t = build_table(w, a, rate="entropy")
    acts = t.kind == ACT
    assert acts.any() and np.isfinite(t.entropy[acts]).all()
    np.testing.assert_allclose(t.rate[acts], t.numel[acts, None] * t.entropy[acts])
    summary = summarize_choice(t, np.full(len(t.kind), 2))
    want = float((t.entropy[acts, 2] * t.numel[acts]).sum() / t.numel[acts].sum())
    assert summary["a_entropy_bits"] == pytest.approx(want)
    with pytest.raises(ValueError, match="rate"):
        build_table(w, None, rate="huffman")
    assert RATE_FLAGS == RATES  # the --rate choices are the table's


# ------------------------------------------------------------------- digits CNN, end to end

DIGITS = ["--archname", "digits_cnn", "--dataset", "digits"]
CURVE_FLAGS = [
    *DIGITS,
    "--testsize",
    "8",
    "--maxrates",
    "5",
    "--maxdeadzones",
    "2",
    "--nchannelbatch",
    "8",
    "--quiet",
]
DP = "classification/generate_DP_batch_distortion_act_out_nchan.py"


@pytest.fixture(scope="module")
def digits_curves(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for key, script in (
        ("measured", "generate_RD_curves_batch.py"),
        ("hessian", "generate_rd_curves_batch_hessian.py"),
    ):
        root = tmp_path_factory.mktemp(key)
        proc = run_script(f"classification/{script}", *CURVE_FLAGS, "--outdir", str(root))
        out[key] = Path(json.loads(proc.stdout.strip().splitlines()[-1])["curve_set"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["measured", "hessian"])
def test_curve_scripts_store_entropy(digits_curves, estimator):
    store = CurveStore.load(digits_curves[estimator])
    for name in store.layer_names():
        c = store.read_layer(name)
        ent = c.extra["entropy"]
        assert ent.shape == c.dist.shape
        assert (ent <= np.arange(5)[None, None, :] + 1e-12).all() and (ent >= 0).all()
        assert (ent[:, :, 0] == 0).all() and (ent[:, :, 3:] > 0).all()


def _deployed_entropy_bits(alloc: dict) -> float:
    """Average entropy per weight of the integer symbols of the weights ``rdoq.apply`` deploys,
    read back from the quantized values and the allocation's per-channel steps."""
    model, _ = build_digits_model("digits_cnn")
    modules = dict(model.named_modules())
    total = n_all = 0.0
    for name, entry in alloc["weights"].items():
        w = modules[name].weight.detach()
        q = quantized_weight(w, entry).double().reshape(w.shape[0], -1)  # (C, n)
        step = torch.tensor(
            [math.nan if s is None else 2.0**s for s in entry["step_log2"]], dtype=torch.float64
        )[:, None]  # (C, 1)
        phi = torch.tensor(entry["deadzone"], dtype=torch.float64)[:, None]  # (C, 1)
        mag = torch.where(phi > 0, (q.abs() - phi) / step + 0.5, q.abs() / step)
        sym = torch.where(q == 0, 0.0, torch.sign(q) * torch.round(mag)).nan_to_num(0.0)
        for c0, c1 in group_bounds(entry["channels"], entry["group_size"]):
            _, counts = np.unique(sym[c0:c1].numpy(), return_counts=True)
            p = counts / counts.sum()
            total += float(-(p * np.log2(p)).sum()) * sym[c0:c1].numel()
            n_all += sym[c0:c1].numel()
    return total / n_all


@pytest.mark.slow
def test_dp_with_entropy_rate_end_to_end(tmp_path, digits_curves):
    base = [
        *DIGITS,
        "--pathrdcurve",
        str(digits_curves["measured"]),
        "--weights-only",
        "--testsize",
        "64",
        "--batchsize",
        "32",
        "--quiet",
        "--no-plots",
        "--target_rates",
        "1.5",
        "2.5",
    ]
    run_script(DP, *base, "--outdir", str(tmp_path / "a"), "--rate", "entropy")
    # The paper's spelling: --bit_rate 0 = entropy, 1 = fixed-width bits.
    run_script(DP, *base, "--outdir", str(tmp_path / "a"), "--bit_rate", "1")
    rows = [json.loads(x) for x in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]
    ent = [r for r in rows if r["rate"] == "entropy"]
    fixed = [r for r in rows if r["rate"] == "bits"]
    assert len(ent) == 2 and len(fixed) == 2
    assert {r["method"] for r in ent} == {"dp+entropy"} and {r["method"] for r in fixed} == {"dp"}
    for r in ent:
        assert r["w_entropy_bits"] <= r["target_bits"] + 1e-9
        assert r["w_entropy_bits"] <= r["w_bits"] + 1e-12
        # The stored entropies are those of the deployed quantizer.
        alloc = load_allocation(tmp_path / "a" / r["allocation"])
        assert alloc["summary"]["rate"] == "entropy"
        assert _deployed_entropy_bits(alloc) == pytest.approx(r["w_entropy_bits"], rel=1e-9)
    for r in fixed:
        assert r["w_bits"] <= r["target_bits"] + 1e-9
        assert r["w_entropy_bits"] <= r["w_bits"] + 1e-12
    # An entropy budget buys more fixed-width bits than the same bit budget.
    for e, f in zip(ent, fixed, strict=True):
        assert e["w_bits"] > f["w_bits"]
    # The hessian curves carry entropy too: the frontier sweeps on entropy rates.
    fr = allocate_main(
        "frontier",
        argv=[
            *DIGITS,
            "--pathrdcurve",
            str(digits_curves["hessian"]),
            "--weights-only",
            "--testsize",
            "16",
            "--quiet",
            "--no-plots",
            "--slopes",
            "-20",
            "-10",
            "--outdir",
            str(tmp_path / "fr"),
            "--bit_rate",
            "0",
        ],
    )
    assert fr["rows"] and all(r["rate"] == "entropy" for r in fr["rows"])


def test_entropy_rate_errors_at_the_cli(tmp_path, digits_curves, capsys):
    base = [
        *DIGITS,
        "--pathrdcurve",
        str(digits_curves["measured"]),
        "--testsize",
        "8",
        "--quiet",
        "--no-plots",
        "--target_rates",
        "2",
        "--outdir",
        str(tmp_path / "x"),
    ]
    # Activation curves in the table are counted in entropy too; without their entropy arrays
    # (curves made before they were stored) they are refused by name.
    act_root = tmp_path / "acts"
    run_script(
        "classification/generate_RD_curves_act_out_nchan.py",
        *DIGITS,
        "--testsize",
        "8",
        "--maxrates",
        "5",
        "--nchannelbatch",
        "8",
        "--quiet",
        "--outdir",
        str(act_root),
    )
    joint = allocate_main(
        "dp", argv=[*base, "--act_curve_root_dir", str(act_root), "--rate", "entropy"]
    )["rows"][0]
    assert joint["rate"] == "entropy" and joint["a_entropy_bits"] is not None
    assert joint["a_entropy_bits"] <= joint["a_bits"] + 1e-9
    (act_set,) = act_root.iterdir()
    for f in (act_set / "layers").glob("*.npz"):
        with np.load(f) as z:
            arrays = {k: z[k] for k in z.files if k != "entropy"}
        np.savez(f, **arrays)
    with pytest.raises(SystemExit):
        allocate_main(
            "dp",
            argv=[*base, "--act_curve_root_dir", str(act_root), "--rate", "entropy"]
            + ["--outdir", str(tmp_path / "y")],
        )
    err = capsys.readouterr().err
    assert "activation curve set" in err and "--weights-only" in err
    # Contradicting spellings.
    with pytest.raises(SystemExit):
        allocate_main("dp", argv=[*base, "--weights-only", "--rate", "bits", "--bit_rate", "0"])
    assert "--bit_rate 0" in capsys.readouterr().err
    # A curve set without entropy (made before it was stored).
    old = tmp_path / "old"
    old.mkdir()
    src = digits_curves["measured"]
    dst = old / src.name
    (dst / "layers").mkdir(parents=True)
    (dst / "meta.json").write_bytes((src / "meta.json").read_bytes())
    for f in (src / "layers").glob("*.npz"):
        with np.load(f) as z:
            np.savez(dst / "layers" / f.name, **{k: z[k] for k in z.files if k != "entropy"})
    with pytest.raises(SystemExit):
        allocate_main(
            "dp", argv=[*base, "--weights-only", "--pathrdcurve", str(dst), "--rate", "entropy"]
        )
    err = capsys.readouterr().err
    assert "no entropy rates" in err and "--rate bits" in err
