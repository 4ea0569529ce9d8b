"""Channel sorting before grouping (--sort_channels, rdoq.sorting): the order, the measuring
context, the curves of a sorted layer against those of a physically permuted model, and the
order's path through the allocation into the applied weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from rdoq.allocation import build_table, solve_recorded
from rdoq.allocfile import (
    ALLOC_SCHEMA,
    ALLOC_SCHEMA_V3,
    load_allocation,
    make_allocation,
    save_allocation,
)
from rdoq.apply import quantized_weight
from rdoq.curves import CurveJob, generate_curves
from rdoq.parts import PartSpec
from rdoq.sorting import channel_order, check_order, sorted_channels
from rdoq.store import SCHEMA, SCHEMA_V3, CurveStore, curve_set_name

INFO = {"arch": "toy", "weights_source": "test", "checkpoint_sha256": None}
CALIB = {"size": 12, "seed": 0, "source": "test", "sha256": "x", "items": []}


def conv_net(seed: int = 0) -> nn.Sequential:
    """Two convolutions and a readout; the first conv's channels differ in range by design."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    ).double()
    with torch.no_grad():
        scale = torch.logspace(-1, 1, 8, dtype=torch.float64)[[3, 7, 0, 5, 1, 6, 2, 4]]
        net[0].weight.mul_(scale.view(8, 1, 1, 1))
    return net.eval()


def permuted(net: nn.Sequential, order: np.ndarray) -> nn.Sequential:
    """``net`` with the first conv's output channels physically in ``order`` (the next conv's
    input channels permuted alike): the same function."""
    p = conv_net()
    p.load_state_dict(net.state_dict())
    idx = torch.as_tensor(order)
    with torch.no_grad():
        p[0].weight.copy_(net[0].weight[idx])
        p[0].bias.copy_(net[0].bias[idx])
        p[2].weight.copy_(net[2].weight[:, idx])
    return p


def job(**kw) -> CurveJob:
    base = dict(
        kind="weight",
        group_size=2,
        nr=5,
        ndz=2,
        max_steps=12,
        step_grid=1,
        max_batch=4,
        progress=False,
        layers=("0",),
    )
    return CurveJob(**{**base, **kw})


def curves(tmp_path, name: str, net: nn.Module, x: torch.Tensor, **kw) -> CurveStore:
    root = tmp_path / name
    generate_curves(net, x, INFO, CALIB, job(**kw), root, PartSpec(0, 1), torch.device("cpu"))
    return CurveStore.load(root)


def test_channel_order_by_signed_max_or_rms_with_stable_ties():
    w = torch.tensor([[1.0, -5.0], [3.0, 0.0], [-1.0, -2.0], [3.0, -1.0]])
    # max: 1, 3, -1, 3 -> ascending, the tie (channels 1 and 3) in index order.
    assert channel_order(w, "max").tolist() == [2, 0, 1, 3]
    # rms: sqrt(13), sqrt(4.5), sqrt(2.5), sqrt(5)
    assert channel_order(w, "rms").tolist() == [2, 1, 3, 0]
    with pytest.raises(ValueError, match="'median' is not one of"):
        channel_order(w, "median")


def test_check_order_names_a_bad_permutation():
    assert check_order([2, 0, 1], 3, "x").tolist() == [2, 0, 1]
    for bad in ([0, 0, 1], [0, 1], [0.0, 1.0, 2.0], [0, 1, 3]):
        with pytest.raises(ValueError, match="x: channel_order is not a permutation of its 3"):
            check_order(bad, 3, "x")


def test_sorted_channels_keeps_the_function_and_restores_the_weights():
    net = conv_net()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    y = net(x)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    order = channel_order(net[0].weight, "max")
    with sorted_channels(net[0], order):
        assert torch.equal(net[0].weight, before["0.weight"][torch.as_tensor(order)])
        torch.testing.assert_close(net(x), y, rtol=1e-13, atol=1e-13)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not net[0]._forward_hooks
    with pytest.raises(RuntimeError, match="boom"), sorted_channels(net[0], order):
        raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not net[0]._forward_hooks


@pytest.mark.parametrize("steps", ["channel", "group"])
def test_sorted_curves_equal_those_of_the_physically_permuted_model(tmp_path, steps):
    """The acceptance test: a layer measured with sorted channels gives the distortions of the
    model whose channels are physically in that order, with the same contiguous groups."""
    net = conv_net()
    torch.manual_seed(1)
    x = torch.randn(12, 3, 6, 6, dtype=torch.float64)
    order = channel_order(net[0].weight, "max")
    assert not np.array_equal(order, np.arange(8))  # the test needs a real permutation
    sorted_set = curves(tmp_path, "sorted", net, x, sort_channels="max", step_mode=steps)
    perm_set = curves(tmp_path, "perm", permuted(net, order), x, step_mode=steps)
    a, b = sorted_set.read_layer("0"), perm_set.read_layer("0")
    assert a.extra["channel_order"].tolist() == order.tolist()
    assert "channel_order" not in b.extra
    np.testing.assert_allclose(a.dist, b.dist, rtol=1e-9, atol=1e-18)
    np.testing.assert_array_equal(a.step_log2, b.step_log2)
    np.testing.assert_array_equal(a.deadzone, b.deadzone)
    # The unsorted curves of the original model differ: the groups hold other channels.
    plain = curves(tmp_path, "plain", net, x, step_mode=steps).read_layer("0")
    assert not np.allclose(plain.dist, a.dist)
    # The measured model is left as it was.
    assert torch.equal(net[0].weight, conv_net()[0].weight)
    assert sorted_set.meta["sort_channels"] == "max" and "sort_channels" not in perm_set.meta
    assert (sorted_set.meta["schema"], perm_set.meta["schema"]) == (SCHEMA_V3, SCHEMA)


def test_the_order_reaches_the_allocation_and_the_applied_weights(tmp_path):
    net = conv_net()
    x = torch.randn(12, 3, 6, 6, dtype=torch.float64)
    store = curves(tmp_path, "sorted", net, x, sort_channels="rms")
    order = channel_order(net[0].weight, "rms")
    table = build_table(store, None)
    (choice,) = solve_recorded(table, [3.0], "dp").choices
    alloc = make_allocation(table, choice, target_bits=3.0, solver="dp")
    entry = alloc["weights"]["0"]
    assert entry["channel_order"] == order.tolist() and alloc["schema"] == ALLOC_SCHEMA_V3
    path = tmp_path / "allocation.json"
    save_allocation(path, alloc)
    assert load_allocation(path)["weights"]["0"]["channel_order"] == order.tolist()
    # Applying quantizes group g = channels order[c0:c1] with the sorted lists, in place.
    plain = {k: v for k, v in entry.items() if k != "channel_order"}
    w = net[0].weight.detach()
    want = torch.empty_like(w)
    want[torch.as_tensor(order)] = quantized_weight(w[torch.as_tensor(order)], plain)
    assert torch.equal(quantized_weight(w, entry), want)
    assert not torch.equal(quantized_weight(w, plain), want)
    # A damaged order is refused by name.
    entry["channel_order"][0] = entry["channel_order"][1]
    path.write_text(json.dumps(alloc))
    with pytest.raises(ValueError, match=r"weights entry '0': channel_order is not a perm"):
        load_allocation(path)


def test_unsorted_allocations_and_curve_sets_keep_their_schema(tmp_path):
    net = conv_net()
    x = torch.randn(12, 3, 6, 6, dtype=torch.float64)
    store = curves(tmp_path, "plain", net, x)
    table = build_table(store, None)
    (choice,) = solve_recorded(table, [3.0], "dp").choices
    alloc = make_allocation(table, choice, target_bits=3.0, solver="dp")
    assert alloc["schema"] == ALLOC_SCHEMA and "channel_order" not in alloc["weights"]["0"]
    assert store.meta["schema"] == SCHEMA
    # A sorted run cannot resume into an unsorted curve set.
    with pytest.raises(ValueError, match="already holds curves made with schema"):
        curves(tmp_path, "plain", net, x, sort_channels="max")


def test_sorting_is_refused_where_it_is_not_offered():
    with pytest.raises(ValueError, match="activation curves keep the channels' own order"):
        job(kind="act", act_mode="out", ndz=1, sort_channels="max")
    with pytest.raises(ValueError, match="not offered with the second-order estimator"):
        from rdoq.hessian import HessianSettings

        job(estimator="hessian", hessian=HessianSettings(), sort_channels="max")
    with pytest.raises(ValueError, match="'mean' is not one of"):
        job(sort_channels="mean")


def test_grouped_convolutions_keep_their_order(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Flatten()).double().eval()
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    store = curves(tmp_path, "dw", net, x, sort_channels="max")
    assert store.read_layer("0").extra["channel_order"].tolist() == [0, 1, 2, 3]


def test_sorted_curve_sets_are_named_apart():
    plain = curve_set_name("m", "weight", 4, 9, 64, 8)
    assert curve_set_name("m", "weight", 4, 9, 64, 8, sort="max") == plain.replace(
        "_nf_0008_", "_nf_0008_sortmax_"
    )


@pytest.mark.slow
def test_paper_scripts_sort_allocate_and_evaluate_on_digits(tmp_path):
    """--sort_channels through the paper's scripts on the bundled digits CNN: curves, the DP
    allocation (weights only) and re-evaluation of the saved allocation agree."""
    from rdoq.cli_alloc import allocate_main
    from rdoq.cli_curves import curves_main
    from rdoq.cli_eval import evaluate_main

    model = ["--archname", "digits_cnn", "--dataset", "digits", "--quiet"]
    out = tmp_path / "curves"
    curves_main(
        "weight",
        None,
        [*model, "--testsize", "16", "--nchannelbatch", "8", "--maxrates", "5"]
        + ["--maxdeadzones", "2", "--maxsteps", "8", "--outdir", str(out), "--sort_channels"],
    )
    (root,) = out.iterdir()
    assert "_sortmax_" in root.name and CurveStore.load(root).meta["sort_channels"] == "max"
    res = allocate_main(
        "dp",
        argv=[*model, "--pathrdcurve", str(root), "--weights-only", "--target_rates", "3"]
        + ["--testsize", "64", "--batchsize", "64", "--no-plots", "--outdir", str(tmp_path / "a")],
    )
    row = res["rows"][0]
    alloc = load_allocation(tmp_path / "a" / row["allocation"])
    assert alloc["schema"] == ALLOC_SCHEMA_V3
    assert all(
        sorted(e["channel_order"]) == list(range(e["channels"])) for e in alloc["weights"].values()
    )
    again = evaluate_main(
        [str(tmp_path / "a" / row["allocation"]), "--testsize", "64", "--batchsize", "64"]
        + ["--outdir", str(tmp_path / "e"), "--quiet"]
    )
    assert again["rows"][0]["top1"] == row["top1"]
