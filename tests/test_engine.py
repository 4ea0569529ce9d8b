"""The measured engine against the naive evaluator (full forward per candidate)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from rdoq.curves import (
    CurveJob,
    job_dict,
    layer_backend,
    make_chains,
    plan_layers,
)
from rdoq.engine import MeasuredEngine
from rdoq.naive import NaiveEvaluator
from rdoq.search import chains_to_arrays, run_chains
from rdoq.slots import weight_slots


def tiny(arch: str) -> nn.Module:
    """A tiny timm model; BatchNorm gets random statistics (timm zero-inits the last BN of each
    residual block, which would make those blocks' convs distortion-free)."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.double().eval()


def calib_for(model: nn.Module, n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = model.pretrained_cfg["input_size"]
    return torch.randn(n, *shape, generator=g).double()


def curves(model, x, job, layer_names, backend_kind, max_batch=8, lookahead=2):
    """Curves of the first and last group (often partial) of each named layer."""
    engine = MeasuredEngine(model, x, max_rows=64)
    naive = NaiveEvaluator(model, x, batch_size=2)
    out = {}
    for plan in plan_layers(model, x[:1], job):
        if plan.name not in layer_names:
            continue
        groups = sorted({0, len(plan.bounds) - 1})
        chains, stats = make_chains(model, x, plan, job, 64)
        chains = [c for c in chains if c.group in groups]
        if backend_kind == "ours":
            run_chains(
                chains, layer_backend(engine, plan, job, stats), max_batch, max_lookahead=lookahead
            )
        else:
            run_chains(chains, layer_backend(naive, plan, job, stats), 1)
        dist, step, _ = chains_to_arrays(
            chains, len(plan.bounds), job.ndz if job.kind == "weight" else 1, job.nr
        )
        out[plan.name] = (dist[groups], step[groups], engine.cut_for(plan.name))
    return out


def weight_curves_both(model, x, plan, job, engine, naive, n_chains=None):
    """Weight curves (G, D, B) of a layer from the engine and from the naive evaluator."""
    out = []
    for be in (layer_backend(engine, plan, job, None), layer_backend(naive, plan, job, None)):
        chains, _ = make_chains(model, x, plan, job, 64)
        chains = chains[:n_chains] if n_chains else chains
        run_chains(chains, be, 4)
        dist = (
            chains_to_arrays(chains, len(plan.bounds), job.ndz, job.nr)[0]
            if not n_chains
            else np.array([c.best_dist for c in chains])
        )
        out.append(dist)
    return out


# test_resnet and the weight curves take 10-20 s each: `slow`; test_vit's activations stay fast.
@pytest.mark.parametrize(
    "arch,layers",
    [
        ("test_vit", ["patch_embed.proj", "blocks.2.attn.proj", "blocks.4.mlp.fc2", "head"]),
        pytest.param(
            "test_resnet",
            ["conv1.0", "layer2.0.conv2", "layer3.0.downsample.1", "fc"],
            marks=pytest.mark.slow,
        ),
    ],
)
@pytest.mark.parametrize(
    "kind,mode",
    [pytest.param("weight", None, marks=pytest.mark.slow), ("act", "out"), ("act", "in")],
)
def test_engine_equals_naive(arch, layers, kind, mode):
    model = tiny(arch)
    x = calib_for(model)
    job = CurveJob(
        kind=kind,
        act_mode=mode,
        group_size=24,
        nr=4,
        ndz=2 if kind == "weight" else 1,
        max_steps=24,
        step_grid=1 if kind == "weight" else 2,
    )
    ours = curves(model, x, job, layers, "ours")
    naive = curves(model, x, job, layers, "naive")
    assert set(ours) == set(layers)
    for name in layers:
        d_ours, s_ours, cut = ours[name]
        d_naive, s_naive, _ = naive[name]
        np.testing.assert_allclose(d_ours, d_naive, rtol=1e-9, atol=0, err_msg=name)
        np.testing.assert_array_equal(s_ours, s_naive, err_msg=name)
        assert np.all(d_ours[:, :, 0] > 0), "0 bits must distort"
    # The prefix cache is used for layers inside the trunk.
    assert ours[layers[2]][2] is not None


def test_zero_perturbation_is_exactly_zero():
    model = tiny("test_vit")
    x = calib_for(model)
    engine = MeasuredEngine(model, x, max_rows=64)
    for layer in ["patch_embed.proj", "blocks.3.mlp.fc1", "head"]:
        w = engine.modules[layer].weight.detach()
        for k in (1, 4):
            weights = w.unsqueeze(0).repeat(k, *([1] * w.dim())).clone()

            def slots(identity, weights=weights, layer=layer):
                return weight_slots(engine.modules[layer], weights, engine.shares_input(layer))

            dist = engine.measure(layer, k, slots)
            assert dist.shape == (k,)
            assert np.all(dist == 0.0), (layer, k, dist)


def test_replay_and_cuts_are_used_and_exact():
    model = tiny("test_vit")
    x = calib_for(model)
    engine = MeasuredEngine(model, x, max_rows=64)
    cut = engine.cut_for("blocks.3.mlp.fc2")
    assert cut is not None and cut.name == "blocks.3" and not cut.post
    replay = engine.replayed(cut, "blocks.3.mlp.fc2")
    assert "blocks.3.attn" in replay and "blocks.3.mlp.fc1" in replay
    assert not any(r.startswith("blocks.3.mlp.fc2") for r in replay)
    head_cut = engine.cut_for("head")
    assert head_cut is not None and head_cut.post
    assert engine.cut_for("patch_embed.proj") is None


class SkipFromStem(nn.Module):
    """A trunk whose head also reads the stem output: a block-input cut is not enough."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        s = self.stem(x)
        return self.head(self.blocks(s) + s)


def test_invalid_cut_falls_back_and_stays_exact():
    torch.manual_seed(0)
    model = SkipFromStem().double().eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    job = CurveJob(kind="weight", group_size=4, nr=4, ndz=2, max_steps=12, step_grid=1)
    engine = MeasuredEngine(model, x, max_rows=64)
    naive = NaiveEvaluator(model, x, batch_size=5)
    for plan in plan_layers(model, x[:1], job):
        ours, ref = weight_curves_both(model, x, plan, job, engine, naive)
        np.testing.assert_allclose(ours, ref, rtol=1e-9, err_msg=plan.name)
    # Cuts inside the trunk would drop the stem skip: they must have been rejected.
    assert engine.cut_for("blocks.2.0") is None


def test_slot_forwards_match_plain_layers():
    torch.manual_seed(0)
    layers = [
        nn.Linear(6, 5),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.Conv2d(6, 6, 3, groups=6, padding=1),
        nn.Conv2d(4, 6, 1, groups=2),
    ]
    for layer in layers:
        layer = layer.double()
        k, n = 3, 2
        x1 = (
            torch.randn(n, 4, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(n, 7, 6)
        ).double()
        if isinstance(layer, nn.Conv2d) and layer.in_channels == 6:
            x1 = torch.randn(n, 6, 5, 5).double()
        weights = torch.randn(k, *layer.weight.shape).double()
        for shared in (False, True):
            xk = x1.repeat(k, *([1] * (x1.dim() - 1)))
            with torch.no_grad(), weight_slots(layer, weights, shared):
                out = layer(xk)
            for i in range(k):
                with torch.no_grad():
                    if isinstance(layer, nn.Linear):
                        ref = nn.functional.linear(x1, weights[i], layer.bias)
                    else:
                        ref = nn.functional.conv2d(
                            x1,
                            weights[i],
                            layer.bias,
                            layer.stride,
                            layer.padding,
                            layer.dilation,
                            layer.groups,
                        )
                torch.testing.assert_close(out[i * n : (i + 1) * n], ref, rtol=1e-12, atol=1e-12)
        assert "forward" not in layer.__dict__, "slot forward must be removed afterwards"


@pytest.mark.parametrize(
    "arch,size",
    [
        ("test_efficientnet", None),  # EfficientNet / MobileNet blocks (nested Sequential)
        ("mobilenetv2_050", (3, 96, 96)),
        ("test_convnext", None),  # stages with their own forward
        pytest.param("swin_tiny_patch4_window7_224", None, marks=pytest.mark.slow),  # 30 s
    ],
)
def test_prefix_cuts_on_model_families(arch, size):
    """The trunk cut is found, validated and exact on each supported family."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False).double().eval()
    shape = size or model.pretrained_cfg["input_size"]
    x = torch.randn(2, *shape, dtype=torch.float64)
    engine = MeasuredEngine(model, x, max_rows=8)
    naive = NaiveEvaluator(model, x, batch_size=2)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    middle = names[len(names) // 2]
    assert engine.cut_for(middle) is not None, f"no prefix cut for {middle}"
    job = CurveJob(kind="weight", group_size=8, nr=3, ndz=1, max_steps=4, step_grid=1)
    plan = next(p for p in plan_layers(model, x[:1], job) if p.name == middle)
    ours, ref = weight_curves_both(model, x, plan, job, engine, naive, n_chains=1)
    # Per-channel steps reach distortions near float64 rounding of the output: compare those
    # with an absolute floor.
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-8 * np.abs(ref).max())


class ParentReadsWeight(nn.Module):
    """Like timm's BEiT/EVA attention: the parent applies ``qkv.weight`` itself, so the child's
    forward never runs; and a tied head that shares the embedding weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.qkv = nn.Linear(8, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 6)
        self.tied = nn.Linear(8, 6)
        self.tied.weight = self.head.weight

    def forward(self, x):
        h = torch.tanh(nn.functional.linear(self.embed(x), self.qkv.weight, self.qkv.bias))
        h = torch.tanh(self.mid(h))
        return self.head(h) + self.tied(h)


def test_weights_read_outside_forward_or_tied_are_measured():
    torch.manual_seed(0)
    model = ParentReadsWeight().double().eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    job = CurveJob(kind="weight", group_size=4, nr=4, ndz=2, max_steps=12, step_grid=1)
    engine = MeasuredEngine(model, x, max_rows=64)
    naive = NaiveEvaluator(model, x, batch_size=5)
    assert not engine.slot_forward_ok("qkv") and not engine.slot_forward_ok("head")
    assert engine.slot_forward_ok("mid")
    for plan in plan_layers(model, x[:1], job):
        ours, ref = weight_curves_both(model, x, plan, job, engine, naive)
        np.testing.assert_allclose(ours, ref, rtol=1e-9, err_msg=plan.name)
        assert np.all(ours[:, :, 0] > 0), plan.name


@pytest.mark.parametrize("mode", ["out", "in"])
def test_engine_equals_naive_with_bca_inside(mode):
    model = tiny("test_vit")
    x = calib_for(model)
    layers = ["patch_embed.proj", "blocks.2.attn.proj", "head"]
    job = CurveJob(
        kind="act",
        act_mode=mode,
        group_size=24,
        nr=4,
        ndz=1,
        max_steps=24,
        step_grid=2,
        bias_corr=True,
        step_mode="group",
    )
    ours = curves(model, x, job, layers, "ours")
    naive = curves(model, x, job, layers, "naive")
    plain = curves(model, x, CurveJob(**{**job_dict(job), "bias_corr": False}), layers, "ours")
    for name in layers:
        # The offsets are means of the layer's calibration values, which the engine (cached
        # prefix) and the naive evaluator (full forwards) compute in a different order; the
        # small distortions left after the correction amplify that rounding to ~1e-8.
        np.testing.assert_allclose(ours[name][0], naive[name][0], rtol=1e-6, atol=0, err_msg=name)
        np.testing.assert_array_equal(ours[name][1], naive[name][1], err_msg=name)
    assert any(not np.allclose(ours[n][0], plain[n][0]) for n in layers)
