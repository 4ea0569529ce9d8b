"""BatchNorm folding (``rdoq.fold``, ``--fold-bn``): which pairs fold, exactness, scripts."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch
from timm.layers import BatchNormAct2d, Conv2dSame
from torch import nn

import rdoq.fold
from rdoq.cli_alloc import allocate_main
from rdoq.cli_eval import evaluate_main
from rdoq.fold import NormActRemainder, find_conv_bn_pairs, fold_batchnorm, fold_pair
from tests.conftest import run_script

WEIGHTS = "classification/generate_RD_curves_batch.py"
DP = "classification/generate_DP_batch_distortion_act_out_nchan.py"


class Net(nn.Module):
    """One case per stage: what must fold and what must not."""

    def __init__(self) -> None:
        super().__init__()
        c = 8
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)  # with bias → bn1: folds
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)  # no bias → bn2: folds
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1)  # output feeds bn3 AND a residual add: must not fold
        self.bn3 = nn.BatchNorm2d(c)
        self.conv4 = nn.Conv2d(c, c, 1)  # residual add between conv4 and bn4: must not fold
        self.bn4 = nn.BatchNorm2d(c)
        self.conv5 = nn.Conv2d(c, c, 3, padding=1, groups=c)  # depthwise → BatchNormAct2d: folds
        self.bn5 = BatchNormAct2d(
            c, act_layer=nn.ReLU, drop_layer=functools.partial(nn.Dropout, 0.5)
        )
        self.conv6 = Conv2dSame(c, c, 3, stride=2, bias=False)  # timm SAME padding → bn6: folds
        self.bn6 = nn.BatchNorm2d(c)
        self.conv7 = nn.Conv2d(c, c, 1)  # modified in place before bn7: must not fold
        self.bn7 = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        y = self.conv3(h)
        h = torch.relu(self.bn3(y)) + y
        h = self.bn4(self.conv4(h) + h)
        h = self.bn5(self.conv5(h))
        h = self.bn6(self.conv6(h))
        y = self.conv7(h)
        h = self.bn7(y.mul_(2.0))
        return self.head(h.mean((2, 3)))


FOLDED = [("conv1", "bn1"), ("conv2", "bn2"), ("conv5", "bn5"), ("conv6", "bn6")]
KEPT = ["bn3", "bn4", "bn7"]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters (a fresh BN is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g))
    return model


def make_net(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(Net()).to(dtype).eval()


@torch.no_grad()
def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def example(dtype=torch.float64) -> torch.Tensor:
    return torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(1), dtype=dtype)


def test_folds_exactly_the_safe_pairs_and_keeps_the_output():
    model, x = make_net(), example()
    ref = forward(model, x)
    before = copy.deepcopy(model)
    assert fold_batchnorm(model, x) == FOLDED
    scale = float(ref.abs().max())
    torch.testing.assert_close(forward(model, x), ref, rtol=1e-12, atol=1e-12 * scale)
    # The folded norms are gone; BatchNormAct2d keeps its dropout and activation.
    modules = dict(model.named_modules())
    for _, bn in FOLDED:
        assert not isinstance(modules[bn], nn.BatchNorm2d)
    assert isinstance(model.bn1, nn.Identity) and isinstance(model.bn6, nn.Identity)
    assert isinstance(model.bn5, NormActRemainder)
    assert isinstance(model.bn5.act, nn.ReLU) and isinstance(model.bn5.drop, nn.Dropout)
    assert isinstance(model.conv6, Conv2dSame)
    for bn in KEPT:
        assert type(modules[bn]) is nn.BatchNorm2d
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(KEPT)
    # Other modules are untouched.
    for name in ("conv3", "conv4", "conv7", "head"):
        for p, q in zip(
            modules[name].parameters(), dict(before.named_modules())[name].parameters(), strict=True
        ):
            assert torch.equal(p, q)


@pytest.mark.parametrize("conv,bn", FOLDED)
def test_folded_weights_follow_the_formula(conv, bn):
    model = make_net()
    old = dict(copy.deepcopy(model).named_modules())
    fold_batchnorm(model, example())
    c, b = old[conv], old[bn]
    scale = b.weight / torch.sqrt(b.running_var + b.eps)  # (C,)
    bias = c.bias if c.bias is not None else torch.zeros_like(scale)
    new = dict(model.named_modules())[conv]
    torch.testing.assert_close(
        new.weight, c.weight * scale[:, None, None, None], rtol=1e-14, atol=0
    )
    torch.testing.assert_close(
        new.bias, (bias - b.running_mean) * scale + b.bias, rtol=1e-14, atol=1e-15
    )
    assert new.bias.requires_grad == new.weight.requires_grad


def test_unsafe_pairs_are_named_with_their_reason():
    pairs, skipped = find_conv_bn_pairs(make_net(), example())
    assert pairs == FOLDED
    assert set(skipped) == set(KEPT)
    assert "consumers in the autograd graph" in skipped["bn3"]
    assert "not the output of a Conv2d" in skipped["bn4"]
    assert "modified in place" in skipped["bn7"]


def test_folding_the_residual_pair_would_change_the_output():
    # The pair refused in test_unsafe_pairs_are_named_with_their_reason is a real hazard: bn3's
    # input is exactly conv3's output, but the residual add also reads the unnormalised tensor.
    model, x = make_net(), example()
    ref = forward(model, x)
    fold_pair(model.conv3, model.bn3)
    model.bn3 = nn.Identity()
    assert (forward(model, x) - ref).abs().max() > 1e-3 * ref.abs().max()


def test_float32_model_is_folded_in_float64_and_keeps_its_dtype():
    model, x = make_net(torch.float32), example(torch.float32)
    ref64 = forward(copy.deepcopy(model).double(), x.double())
    assert fold_batchnorm(model, x) == FOLDED
    assert {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()} == {
        torch.float32
    }
    assert model.conv2.bias.dtype == torch.float32
    out = forward(model, x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref64, rtol=0, atol=1e-4 * float(ref64.abs().max()))


def test_training_mode_is_refused():
    model = make_net().train()
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(model, example())
    model.eval()
    model.bn2.train()
    with pytest.raises(ValueError, match=r"\['bn2'\] is in training mode"):
        fold_batchnorm(model, example())
    assert isinstance(model.bn1, nn.BatchNorm2d)  # refused before any change


def test_a_wrong_fold_is_caught_by_the_output_check(monkeypatch):
    def broken(conv, bn):
        with torch.no_grad():
            conv.weight.mul_(1.01)

    monkeypatch.setattr(rdoq.fold, "fold_pair", broken)
    with pytest.raises(ValueError, match="changed the output"):
        fold_batchnorm(make_net(), example())


def test_timm_resnet_folds_every_norm():
    import timm

    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("test_resnet", pretrained=False)).double().eval()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ref = forward(model, x)
    pairs = fold_batchnorm(model, x)
    assert len(pairs) == n_bn > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    scale = float(ref.abs().max())
    torch.testing.assert_close(forward(model, x), ref, rtol=1e-10, atol=1e-10 * scale)


# ------------------------------------------------------------------------- scripts, end to end

DIGITS = ["--archname", "digits_cnn", "--dataset", "digits"]
CURVES = [
    *DIGITS,
    "--testsize",
    "8",
    "--maxrates",
    "3",
    "--maxdeadzones",
    "1",
    "--nchannelbatch",
    "8",
    "--quiet",
]


# Two curve-script runs in subprocesses: the users of this fixture are `slow`.
@pytest.fixture(scope="module")
def digits_curves(tmp_path_factory) -> dict[str, Path]:
    """Weight curves of the bundled digits CNN (conv/BN/ReLU stages), with and without folding."""
    out = {}
    for key, extra in (("folded", ["--fold-bn"]), ("plain", [])):
        root = tmp_path_factory.mktemp(key)
        proc = run_script(WEIGHTS, *CURVES, *extra, "--outdir", str(root))
        out[key] = Path(json.loads(proc.stdout.strip().splitlines()[-1])["curve_set"])
    return out


@pytest.mark.slow
def test_curve_script_with_fold_bn_records_it(digits_curves):
    folded = json.loads((digits_curves["folded"] / "meta.json").read_text())
    plain = json.loads((digits_curves["plain"] / "meta.json").read_text())
    assert folded["weights_source"] == plain["weights_source"] + "+fold-bn"
    assert "--fold-bn" in folded["argv"]
    # Same layers (the convs and the head), folded weights: different curves.
    assert [x["name"] for x in folded["layers"]] == [x["name"] for x in plain["layers"]]
    assert (digits_curves["folded"] / "layers" / "features.0.npz").read_bytes() != (
        digits_curves["plain"] / "layers" / "features.0.npz"
    ).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize(
    "curves,flag,expect",
    [
        ("plain", ["--fold-bn"], "without --fold-bn"),
        ("folded", [], "pass --fold-bn"),
    ],
)
def test_allocation_refuses_a_fold_mismatch(tmp_path, digits_curves, capsys, curves, flag, expect):
    with pytest.raises(SystemExit):
        allocate_main(
            "dp",
            argv=[
                *DIGITS,
                "--pathrdcurve",
                str(digits_curves[curves]),
                "--weights-only",
                "--target_rates",
                "2",
                "--testsize",
                "8",
                "--quiet",
                "--no-plots",
                "--outdir",
                str(tmp_path),
                *flag,
            ],
        )
    err = capsys.readouterr().err
    assert expect in err and "--fold-bn" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_evaluate_allocation_folds_like_the_allocation(tmp_path, digits_curves):
    res = allocate_main(
        "dp",
        argv=[
            *DIGITS,
            "--pathrdcurve",
            str(digits_curves["folded"]),
            "--weights-only",
            "--target_rates",
            "2",
            "--testsize",
            "16",
            "--quiet",
            "--no-plots",
            "--outdir",
            str(tmp_path),
            "--fold-bn",
        ],
    )
    row = res["rows"][0]
    path = tmp_path / row["allocation"]  # relative to --outdir
    assert json.loads(path.read_text())["weights_source"].endswith("+fold-bn")
    # No --fold-bn here: the allocation says its weights were folded.
    ev = evaluate_main(
        [
            str(path),
            "--dataset",
            "digits",
            "--testsize",
            "16",
            "--quiet",
            "--outdir",
            str(tmp_path / "eval"),
        ]
    )["rows"][0]
    assert ev["out_mse"] == pytest.approx(row["out_mse"], rel=1e-6)
    assert ev["top1"] == row["top1"]
