"""Fine-tuning after allocation (--re-calibrate, --re-train; rdoq.retrain): on calibration data
only, it lowers the calibration loss, tunes only what its mode names, and leaves the quantized
weights on the allocation's grid."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from torch import nn

from rdoq.apply import apply_allocation, quantized_weight
from rdoq.baselines import uniform_allocation
from rdoq.retrain import RetrainSpec, calib_loss, fine_tune, tuned_parameters


def bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture
def setup():
    net = bn_net()
    torch.manual_seed(1)
    calib = torch.randn(32, 3, 6, 6)
    alloc = uniform_allocation(net, calib, 2, 4, ["0", "3"], "out")
    return net, calib, alloc


def fp_outputs(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x).reshape(x.shape[0], -1)


def test_recalibration_tunes_biases_and_norms_only_and_lowers_the_calibration_loss(setup):
    net, calib, alloc = setup
    fp_state = copy.deepcopy(net.state_dict())
    q = apply_allocation(net, alloc)
    weights = {n: q.get_submodule(n).weight.clone() for n in alloc["weights"]}
    before = calib_loss(q, calib, fp_outputs(net, calib), 8)
    rec = fine_tune(q, net, alloc, calib, RetrainSpec("calibrate", 1e-2, 60, 8))
    assert rec["calib_loss_before"] == pytest.approx(before)
    assert rec["calib_loss_after"] < 0.9 * before
    assert rec["params"] == 8 + 8 + 8 + 5  # conv0 bias, BN weight and bias, fc bias
    # The quantized weights are untouched; the FP model too; the STE is off again.
    assert all(torch.equal(q.get_submodule(n).weight, w) for n, w in weights.items())
    assert all(torch.equal(v, fp_state[k]) for k, v in net.state_dict().items())
    assert not any(a.straight_through for a in q.rdoq_act_quantizers.values())
    assert not any(p.requires_grad for p in q.parameters())


def test_retraining_keeps_every_quantized_weight_on_the_allocations_grid(setup):
    net, calib, alloc = setup
    q = apply_allocation(net, alloc)
    first = {n: q.get_submodule(n).weight.clone() for n in alloc["weights"]}
    rec = fine_tune(q, net, alloc, calib, RetrainSpec("train", 1e-2, 60, 8))
    assert rec["calib_loss_after"] < rec["calib_loss_before"]
    assert rec["params"] == sum(p.numel() for p in net.parameters())
    moved = 0
    for name, e in alloc["weights"].items():
        w = q.get_submodule(name).weight
        assert type(q.get_submodule(name)) is type(net.get_submodule(name))  # no parametrization
        assert torch.equal(quantized_weight(w, e), w), name  # on the grid
        moved += not torch.equal(w, first[name])
    assert moved > 0


def test_fine_tuning_is_deterministic_and_uses_only_what_it_is_given(setup):
    net, calib, alloc = setup
    spec = RetrainSpec("calibrate", 1e-2, 10, 8, seed=3)
    a, b = apply_allocation(net, alloc), apply_allocation(net, alloc)
    fine_tune(a, net, alloc, calib, spec)
    fine_tune(b, net, alloc, calib, spec)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_tuned_parameter_sets():
    net = bn_net()
    names = [n for n, _ in tuned_parameters(net, "calibrate")]
    assert names == ["0.bias", "1.weight", "1.bias", "5.bias"]
    assert len(tuned_parameters(net, "train")) == len(list(net.parameters()))


def test_bad_specs_name_the_value():
    with pytest.raises(ValueError, match="'finetune' is not one of"):
        RetrainSpec("finetune", 1e-3, 10, 8)
    with pytest.raises(ValueError, match="learning rate must be > 0, got 0"):
        RetrainSpec("train", 0.0, 10, 8)
    with pytest.raises(ValueError, match="got 0 iterations"):
        RetrainSpec("train", 1e-3, 0, 8)


@pytest.mark.slow
def test_allocation_script_records_the_tuned_point_from_calibration_data(tmp_path, monkeypatch):
    """--re-calibrate on the digits CNN: a "dp+rc" row beside "dp", its allocation carries the
    fine-tuning record, its saved state reproduces its evaluation, and the only data tuned on
    is the calibration set the curves were measured on."""
    from rdoq import pipeline
    from rdoq.allocfile import load_allocation
    from rdoq.apply import load_quantized
    from rdoq.cli_alloc import allocate_main
    from rdoq.cli_curves import curves_main
    from rdoq.store import CurveStore

    seen = []

    def spy(q_model, fp_model, alloc, calib, spec):
        seen.append(hashlib.sha256(calib.float().contiguous().numpy().tobytes()).hexdigest())
        return fine_tune(q_model, fp_model, alloc, calib, spec)

    monkeypatch.setattr(pipeline, "fine_tune", spy)
    model = ["--archname", "digits_cnn", "--dataset", "digits", "--quiet"]
    curves_main(
        "weight",
        None,
        [*model, "--testsize", "32", "--nchannelbatch", "8", "--maxrates", "5"]
        + ["--maxdeadzones", "2", "--maxsteps", "8", "--outdir", str(tmp_path / "c")],
    )
    (root,) = (tmp_path / "c").iterdir()
    res = allocate_main(
        "dp",
        argv=[*model, "--pathrdcurve", str(root), "--weights-only", "--target_rates", "2"]
        + ["--testsize", "64", "--batchsize", "16", "--no-plots", "--outdir", str(tmp_path / "a")]
        + ["--re-calibrate", "--re-train-iter", "30", "--re-calibrate-lr", "1e-2"],
    )
    assert seen == [CurveStore.load(root).meta["calib"]["sha256"]]
    plain, tuned = res["rows"]
    assert (plain["method"], tuned["method"]) == ("dp", "dp+rc")
    assert tuned["w_bits"] == plain["w_bits"] and tuned["target_bits"] == plain["target_bits"]
    alloc = load_allocation(tmp_path / "a" / tuned["allocation"])
    rec = alloc["fine_tune"]
    assert rec["mode"] == "calibrate" and rec["iters"] == 30
    assert rec["calib_loss_after"] < rec["calib_loss_before"]
    assert tuned["calib_loss_after"] == rec["calib_loss_after"]
    label = tuned["allocation"].split("allocation_")[1][: -len(".json")]
    from rdoq.adapters.digits import build_digits_model
    from rdoq.cli_eval import evaluate_main

    fresh, _ = build_digits_model("digits_cnn")
    reloaded = load_quantized(tmp_path / "a" / "dp+rc" / f"model_{label}.pth", fresh)
    plain_q = apply_allocation(build_digits_model("digits_cnn")[0], alloc)
    tunable = {n for n, _ in tuned_parameters(plain_q, "calibrate")}
    assert any(not n.endswith("bias") for n in tunable)  # BatchNorm's affine weights too
    for (n, a), b in zip(reloaded.named_parameters(), plain_q.parameters(), strict=True):
        # --re-calibrate tunes biases and norm affines; the quantized weights stay.
        assert torch.equal(a, b) != (n in tunable), n
    # The allocation alone cannot reproduce the tuned point: re-evaluating it is refused.
    with pytest.raises(SystemExit):
        evaluate_main([str(tmp_path / "a" / tuned["allocation"]), "--quiet"])
