"""Input-channel weight groups (``--group-axis in``, the paper's get_ele_per_input_channel): a
group is every weight that reads its input channels. Each curve point is the plain forward with
that group quantized, both estimators lay the group out alike, applying an allocation quantizes
the same weights, and the scripts carry the axis from the curves to the evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rdoq.allocfile import ALLOC_SCHEMA_V3, load_allocation
from rdoq.apply import quantized_weight
from rdoq.curves import CurveJob, generate_curves
from rdoq.groups import WeightGroups, group_bounds, group_view, weight_numel
from rdoq.hessian import GradientSweep, HessianSettings
from rdoq.hessian_backends import HessianWeightBackend
from rdoq.parts import PartSpec
from rdoq.quantizers import quantize_weight
from rdoq.store import SCHEMA_V3, CurveStore

INFO = {"arch": "toy", "weights_source": "test", "checkpoint_sha256": None}
CALIB = {"size": 10, "seed": 0, "source": "test", "sha256": "x", "items": []}


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 4, 3, padding=1, groups=2),
            nn.Flatten(),
            nn.Linear(4 * 5 * 5, 5),
        )
        .double()
        .eval()
    )


def test_group_view_and_numel_follow_the_axis():
    w = torch.arange(2 * 3 * 4, dtype=torch.float64).reshape(2, 3, 4)
    view = group_view(w, "in")
    assert view.shape == (3, 2, 4) and view.data_ptr() == w.data_ptr()
    view[1] = -1.0  # writes reach the weight
    assert bool((w[:, 1] == -1).all()) and group_view(w, "out") is w
    assert weight_numel((2, 3, 4), (0, 2), "in") == 16 and weight_numel((2, 3, 4), (0, 1)) == 12
    with pytest.raises(ValueError, match="group axis"):
        group_view(w, "kernel")


def test_weight_groups_view_is_the_detached_group_view_of_the_layer_weight():
    layer = nn.Conv2d(3, 4, 3, bias=False)
    for axis, shape in (("out", (4, 3, 3, 3)), ("in", (3, 4, 3, 3))):
        view = WeightGroups("0", group_bounds(shape[0], 2), axis=axis).view(layer)
        assert view.shape == shape and not view.requires_grad
        assert torch.equal(view, group_view(layer.weight.detach(), axis))


@pytest.mark.parametrize("steps", ["group", "channel"])
def test_input_group_curve_points_are_plain_forwards(tmp_path, steps):
    net = conv_net()
    torch.manual_seed(1)
    x = torch.randn(10, 3, 5, 5, dtype=torch.float64)
    job = CurveJob(
        kind="weight",
        group_size=2,
        nr=4,
        ndz=2,
        max_steps=10,
        step_grid=1,
        max_batch=4,
        progress=False,
        step_mode=steps,
        group_axis="in",
    )
    root = tmp_path / steps
    generate_curves(net, x, INFO, CALIB, job, root, PartSpec(0, 1), torch.device("cpu"))
    store = CurveStore.load(root)
    assert store.meta["group_axis"] == "in" and store.meta["schema"] == SCHEMA_V3
    with torch.no_grad():
        ref = net(x)
    modules = dict(net.named_modules())
    for name in ("0", "2", "4"):
        c = store.read_layer(name)
        w = modules[name].weight
        view = group_view(w.detach(), "in")  # (in, out, …)
        bounds = group_bounds(view.shape[0], 2)
        assert c.dist.shape[0] == len(bounds)
        assert list(c.numel) == [(c1 - c0) * view[0].numel() for c0, c1 in bounds]
        for g, d, b in [(0, 0, 2), (len(bounds) - 1, 1, 3), (0, 1, 1)]:
            c0, c1 = bounds[g]
            if steps == "group":
                wq = quantize_weight(view[c0:c1], b, c.step_log2[g, d, b], c.deadzone[g, d, b])
            else:
                base = c.extra["channel_step_log2"][c0:c1, d, b] + c.step_log2[g, d, b]
                phi = c.extra["channel_deadzone"][c0:c1, d] if d > 0 else 0.0 * base
                wq = quantize_weight(view[c0:c1], b, torch.tensor(base), torch.tensor(phi))
            orig = w.detach().clone()
            with torch.no_grad():
                group_view(w, "in")[c0:c1] = wq
                got = float(((net(x) - ref) ** 2).mean())
                w.copy_(orig)
            assert c.dist[g, d, b] == pytest.approx(got, rel=1e-9, abs=1e-300), (name, g, d, b)


def test_hessian_rows_of_an_input_group_price_its_weights_as_the_whole_layer_does():
    # The same perturbation, seen as one input-channel group or inside one group holding the
    # whole layer, gets the same quadratic form: the rows follow the group's weight order.
    net = conv_net()
    torch.manual_seed(2)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    sweep = GradientSweep(net, x, ["2"], "weight", HessianSettings(nprobes=2), batch_size=3)
    w = net[2].weight.detach()  # (4, 3, 3, 3): grouped conv, 3 input channels per filter
    by_in = HessianWeightBackend(sweep, WeightGroups("2", group_bounds(3, 2), axis="in"))
    whole = HessianWeightBackend(sweep, WeightGroups("2", [(0, 4)]))
    torch.manual_seed(3)
    for g, (c0, c1) in enumerate(group_bounds(3, 2)):
        delta = torch.zeros_like(w)
        delta[:, c0:c1] = torch.randn_like(delta[:, c0:c1])
        part = group_view(delta, "in")[c0:c1].reshape(-1, 1)
        assert by_in.dist_of(g, part)[0] == pytest.approx(
            whole.dist_of(0, delta.reshape(-1, 1))[0], rel=1e-10
        )


def test_applied_entry_quantizes_input_groups():
    torch.manual_seed(4)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    entry = {
        "channels": 4,
        "group_size": 3,
        "bits": [2, 0],
        "steps": "group",
        "step_log2": [-1.0, None],
        "deadzone": [0.0, 0.0],
        "group_axis": "in",
    }
    got = quantized_weight(w, entry)
    assert torch.equal(got[:, :3], quantize_weight(w[:, :3], 2, -1.0, 0.0))
    assert torch.equal(got[:, 3:], torch.zeros_like(w[:, 3:]))


def test_scripts_carry_input_groups_from_curves_to_evaluation(tmp_path):
    from rdoq.cli_alloc import allocate_main
    from rdoq.cli_curves import curves_main
    from rdoq.cli_eval import evaluate_main

    model = ["--archname", "digits_cnn", "--dataset", "digits", "--quiet"]
    flags = [*model, "--testsize", "16", "--nchannelbatch", "8", "--maxrates", "4"]
    flags += ["--maxdeadzones", "2", "--group-axis", "in"]
    curves_main("weight", None, [*flags, "--outdir", str(tmp_path / "c")])
    (root,) = (tmp_path / "c").iterdir()
    assert "_rdcurves_inchan_channelwise_" in root.name
    res = allocate_main(
        "dp",
        argv=[*model, "--pathrdcurve", str(root), "--weights-only", "--target_rates", "3"]
        + ["--testsize", "64", "--batchsize", "64", "--no-plots", "--outdir", str(tmp_path / "a")],
    )
    row = res["rows"][0]
    assert row["w_bits"] <= 3 + 1e-9
    alloc = load_allocation(tmp_path / "a" / row["allocation"])
    assert alloc["schema"] == ALLOC_SCHEMA_V3
    assert all(e["group_axis"] == "in" for e in alloc["weights"].values())
    again = evaluate_main(
        [str(tmp_path / "a" / row["allocation"]), "--testsize", "64", "--batchsize", "64"]
        + ["--outdir", str(tmp_path / "e"), "--quiet"]
    )
    assert again["rows"][0]["out_mse"] == pytest.approx(row["out_mse"], rel=1e-6)
    assert again["rows"][0]["w_bits"] == pytest.approx(row["w_bits"])
    with pytest.raises(SystemExit):  # the correction is per output channel
        curves_main("weight", None, [*flags, "-bcw", "--outdir", str(tmp_path / "d")])


def test_job_refuses_what_input_groups_cannot_do():
    base = dict(kind="weight", group_size=2, nr=3, ndz=1, max_steps=8, step_grid=1)
    with pytest.raises(ValueError, match="--sort_channels"):
        CurveJob(**base, group_axis="in", sort_channels="max")
    with pytest.raises(ValueError, match="activation curves"):
        CurveJob(**{**base, "kind": "act"}, act_mode="out", group_axis="in")
    with pytest.raises(ValueError, match="--group-axis must be"):
        CurveJob(**base, group_axis="both")
