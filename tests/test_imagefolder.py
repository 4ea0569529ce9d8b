"""Acceptance: curves from an ImageFolder + checkpoint, re-checked without the engine.

Stored points are recomputed the plain way: re-quantize one group with the stored (bits,
step_log2, deadzone) using a from-scratch quantizer, run the unmodified model on the images listed
in ``meta.json`` (``calib.items``), and take the output MSE.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from rdoq.adapters.base import file_sha256
from rdoq.store import CurveStore
from tests.conftest import run_script

pytestmark = pytest.mark.slow  # a curve-script run in a subprocess (about 40 s)


def make_imagefolder(root, classes=4, per_class=7, size=40):
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(n):
                base = rng.integers(0, 256, size=3)
                img = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(d / f"img_{i:03d}.png")


def reference_quantize(w: torch.Tensor, bits: int, step_log2: float, phi: float) -> torch.Tensor:
    """DESIGN §4, written out independently of rdoq.quantizers."""
    if bits == 0:
        return torch.zeros_like(w)
    step = 2.0**step_log2
    if phi > 0:
        m = 2 ** (bits - 1) - 1
        if m == 0:
            return torch.zeros_like(w)
        q = torch.clamp(torch.floor((w.abs() - phi) / step), 0, m - 1)
        return torch.where(
            w.abs() > phi, torch.sign(w) * (phi + (q + 0.5) * step), torch.zeros_like(w)
        )
    return torch.clamp(torch.round(w / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * step


@pytest.fixture(scope="module")
def curve_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    make_imagefolder(root)
    torch.manual_seed(0)
    ckpt = root.parent / "test_vit_random.pth"
    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), ckpt)
    out = root.parent / "out"
    run_script(
        "classification/generate_RD_curves_batch.py",
        "--archname",
        "test_vit",
        "--checkpoint",
        str(ckpt),
        "--datapath",
        str(root),
        "--testsize",
        "6",
        "--nchannelbatch",
        "64",
        "--maxrates",
        "4",
        "--maxdeadzones",
        "2",
        "--maxsteps",
        "6",
        "--outdir",
        str(out),
        "--quiet",
    )
    (curve_set,) = list(out.iterdir())
    return root, ckpt, curve_set


def test_meta_records_calibration_and_checkpoint(curve_run):
    root, ckpt, curve_set = curve_run
    meta = json.loads((curve_set / "meta.json").read_text())
    assert meta["checkpoint_sha256"] == file_sha256(ckpt)
    items = meta["calib"]["items"]
    assert len(items) == 6 and all(it.startswith("train/") for it in items)
    # class-spread: the first four picks come from four different classes
    assert len({it.split("/")[1] for it in items[:4]}) == 4
    assert curve_set.name == (
        "test_vit_ndz_0002_nr_0004_ns_0006_nf_0064_rdcurves_channelwise_opt_dist"
    )


def test_stored_points_match_plain_recomputation(curve_run):
    root, ckpt, curve_set = curve_run
    meta = json.loads((curve_set / "meta.json").read_text())
    model = timm.create_model("test_vit", pretrained=False)
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    x = torch.stack(
        [transform(Image.open(root / it).convert("RGB")) for it in meta["calib"]["items"]]
    )
    assert hashlib.sha256(x.numpy().tobytes()).hexdigest() == meta["calib"]["sha256"]
    model = model.double().eval()
    x = x.double()
    with torch.no_grad():
        y0 = model(x)
    store = CurveStore.load(curve_set)
    modules = dict(model.named_modules())
    checked = 0
    for layer in ("patch_embed.proj", "blocks.2.mlp.fc1", "blocks.5.attn.proj", "head"):
        curves = store.read_layer(layer)
        weight = modules[layer].weight
        n_groups = curves.dist.shape[0]
        for g in sorted({0, n_groups - 1}):
            c0 = g * 64
            c1 = min(c0 + 64, weight.shape[0])
            for d in range(2):
                for b in range(4):
                    # Per-channel steps: each channel's base step plus the group's scale, and
                    # its own dead-zone threshold (the stored ratio > 0 selects the rule).
                    scale = float(curves.step_log2[g, d, b])
                    ratio = float(curves.deadzone[g, d, b])
                    orig = weight.data[c0:c1].clone()
                    for c in range(c0, c1):
                        step = float(curves.extra["channel_step_log2"][c, d, b]) + scale
                        phi = float(curves.extra["channel_deadzone"][c, d]) if ratio > 0 else 0.0
                        weight.data[c] = reference_quantize(orig[c - c0], b, step, phi)
                    with torch.no_grad():
                        dist = float(((model(x) - y0) ** 2).mean())
                    weight.data[c0:c1] = orig
                    stored = float(curves.dist[g, d, b])
                    assert dist == pytest.approx(stored, rel=1e-4), (layer, g, d, b)
                    checked += 1
    assert checked >= 48
