"""timm and torchvision classifiers (the paper's zoo names included), ImageNet as an
ImageFolder, and the explicit synthetic dataset (DESIGN §10)."""

from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from rdoq.adapters.base import (
    Adapter,
    Batches,
    CalibSet,
    InputError,
    ModelInfo,
    load_checkpoint,
)
from rdoq.evaluate import TensorBatches

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ModelSpec:
    """How to build a named network.

    ``library`` is "timm" or "torchvision"; ``builder`` a timm model name or a
    ``torchvision.models`` builder; ``tag`` the timm pretrained tag (None: timm's default);
    ``tv_weights`` the torchvision weights enum that the model holds (torchvision) or that timm
    ported (tag ``tv_in1k``): its eval preprocessing is used either way; ``checkpoint`` a local
    file that is the only source of the weights (no hub copy exists); ``kwargs`` go to the
    builder, ``cfg_overlay`` over timm's data config; ``arch`` is the name meta.json records.
    """

    arch: str
    library: str
    builder: str
    tag: str | None = None
    tv_weights: str | None = None
    checkpoint: str | None = None
    kwargs: tuple[tuple[str, Any], ...] = ()
    cfg_overlay: tuple[tuple[str, Any], ...] = ()

    @property
    def weights(self) -> str | None:
        """The pretrained weights: a timm tag, a torchvision weights enum, or ``file:NAME``."""
        if self.checkpoint is not None:
            return f"file:{self.checkpoint}"
        return self.tv_weights if self.library == "torchvision" else self.tag


def _tv_port(builder: str, tv_weights: str) -> ModelSpec:
    """A torchvision network and its weights as ported by timm (tag ``tv_in1k``)."""
    return ModelSpec(builder, "timm", builder, "tv_in1k", tv_weights)


def _mae_finetuned(size: str, builder: str) -> ModelSpec:
    """MAE's fine-tuned ViT (global average pool + fc_norm, as MAE's models_vit); its weights
    exist only as MAE's released file. MAE evaluates with bicubic resize 256, centre crop 224
    and the ImageNet mean/std, not timm's ViT defaults."""
    name = f"mae_finetuned_vit_{size}"
    return ModelSpec(
        name,
        "timm",
        builder,
        checkpoint=f"{name}.pth",
        kwargs=(("global_pool", "avg"), ("fc_norm", True)),
        cfg_overlay=(
            ("crop_pct", 0.875),
            ("interpolation", "bicubic"),
            ("mean", (0.485, 0.456, 0.406)),
            ("std", (0.229, 0.224, 0.225)),
        ),
    )


# The authors' model-zoo names (their loadnetwork): torchvision's networks and ImageNet weights,
# through timm's ports where timm has them (identical weights), torchvision's builders
# otherwise; DeiT-B and MAE's fine-tuned ViTs as the authors loaded them.
PAPER_ZOO = MappingProxyType(
    {
        "alexnetpy": ModelSpec(
            "torchvision.alexnet",
            "torchvision",
            "alexnet",
            tv_weights="AlexNet_Weights.IMAGENET1K_V1",
        ),
        "vgg16py": _tv_port("vgg16_bn", "VGG16_BN_Weights.IMAGENET1K_V1"),
        "resnet18py": _tv_port("resnet18", "ResNet18_Weights.IMAGENET1K_V1"),
        "resnet34py": _tv_port("resnet34", "ResNet34_Weights.IMAGENET1K_V1"),
        "resnet50py": _tv_port("resnet50", "ResNet50_Weights.IMAGENET1K_V1"),
        "resnet101py": _tv_port("resnet101", "ResNet101_Weights.IMAGENET1K_V1"),
        "densenet121py": _tv_port("densenet121", "DenseNet121_Weights.IMAGENET1K_V1"),
        "mobilenetv2py": ModelSpec(
            "torchvision.mobilenet_v2",
            "torchvision",
            "mobilenet_v2",
            tv_weights="MobileNet_V2_Weights.IMAGENET1K_V1",
        ),
        "deit_b_224": ModelSpec(
            "deit_base_patch16_224", "timm", "deit_base_patch16_224", "fb_in1k"
        ),
        "mae_finetuned_vit_base": _mae_finetuned("base", "vit_base_patch16_224"),
        "mae_finetuned_vit_large": _mae_finetuned("large", "vit_large_patch16_224"),
        "mae_finetuned_vit_huge": _mae_finetuned("huge", "vit_huge_patch14_224"),
    }
)


def resolve_arch(name: str) -> ModelSpec:
    """How to build ``name``: a paper zoo name (PAPER_ZOO) or a timm model name, optionally
    tagged (``resnet50.tv_in1k``); unknown names suggest close ones."""
    import timm

    if name in PAPER_ZOO:
        return PAPER_ZOO[name]
    if timm.is_model(name):
        builder, _, tag = name.partition(".")
        return ModelSpec(name, "timm", builder, tag or None)
    close = difflib.get_close_matches(name, [*PAPER_ZOO, *timm.list_models()], n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise InputError(f"unknown --archname {name!r}{hint}")


def tv_data_cfg(weights_name: str) -> dict[str, Any]:
    """The eval preprocessing of torchvision weights (resize, centre crop, normalise) in timm's
    data-config keys, so that timm's create_transform reproduces it."""
    from torchvision.models import get_weight

    t = get_weight(weights_name).transforms()
    crop, resize = t.crop_size[0], t.resize_size[0]
    return {
        "input_size": (3, crop, crop),
        "crop_pct": crop / resize,
        "interpolation": t.interpolation.value,
        "mean": tuple(t.mean),
        "std": tuple(t.std),
    }


def create_model(spec: ModelSpec, pretrained: bool, **kwargs: Any) -> nn.Module:
    """The network of ``spec`` (hub weights if ``pretrained``, else the library's random init),
    with a timm ``pretrained_cfg`` giving the eval preprocessing of its weights."""
    kwargs = {**dict(spec.kwargs), **kwargs}
    overlay = dict(spec.cfg_overlay)
    if spec.tv_weights is not None:
        overlay.update(tv_data_cfg(spec.tv_weights))
    if spec.library == "torchvision":
        from torchvision.models import get_model, get_weight

        weights = get_weight(spec.tv_weights) if pretrained else None
        model = get_model(spec.builder, weights=weights, **kwargs)
        # timm's resolve_data_config reads ``pretrained_cfg``: with one, eval_transform and
        # synthetic_calib treat torchvision models like timm models.
        model.pretrained_cfg = {
            "tag": spec.tv_weights,
            "num_classes": kwargs.get("num_classes", 1000),
            **overlay,
        }
        return model
    import timm

    name = spec.builder if spec.tag is None else f"{spec.builder}.{spec.tag}"
    return timm.create_model(
        name, pretrained=pretrained, pretrained_cfg_overlay=overlay or None, **kwargs
    )


def build_model(
    name: str,
    checkpoint: Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    num_classes: int | None = None,
) -> tuple[nn.Module, ModelInfo]:
    """A timm or torchvision model in eval mode with real weights: hub weights, ``checkpoint``,
    or (explicitly) a seeded random init. Never silently random."""
    spec = resolve_arch(name)
    arch = spec.arch
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if checkpoint is not None:
        model = create_model(spec, pretrained=False, **kwargs)
        info = load_checkpoint(model, checkpoint, arch)
    elif random_init:
        torch.manual_seed(seed)
        model = create_model(spec, pretrained=False, **kwargs)
        info = ModelInfo(arch, f"random-init:seed={seed}")
    elif spec.checkpoint is not None:
        raise InputError(
            f"--archname {name} has no downloadable weights; get {spec.checkpoint} "
            f"(MAE's release, github.com/facebookresearch/mae) and pass "
            f"--checkpoint {spec.checkpoint}"
        )
    else:
        try:
            model = create_model(spec, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
            raise InputError(
                f"pretrained weights for {name} ({spec.library} {spec.builder}) "
                f"are unreachable ({type(e).__name__}: {str(e)[:200]}); pass "
                f"--checkpoint FILE or --random-init"
            ) from e
        tag = spec.tv_weights if spec.library == "torchvision" else model.pretrained_cfg.get("tag")
        info = ModelInfo(arch, f"{spec.library}-pretrained:{tag or 'default'}")
    return model.eval(), info


def eval_transform(model: nn.Module):
    """timm's eval preprocessing for ``model`` (resolve_data_config + create_transform)."""
    from timm.data import create_transform, resolve_data_config

    return create_transform(**resolve_data_config({}, model=model), is_training=False)


def check_imagefolder(root: Path, split: str = "train") -> Path:
    """``root/split`` as an ImageFolder directory, or an InputError naming what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(
            f"--datapath {root} does not exist; pass an ImageNet root with train/ "
            f"and val/ (or --dataset synthetic for a smoke test)"
        )
    if not any(root.iterdir()):
        raise InputError(f"--datapath {root} is empty; it must hold train/ and val/ folders")
    split_dir = root / split
    if not split_dir.is_dir():
        raise InputError(
            f"--datapath {root} has no {split}/ folder; ImageNet must be laid out as "
            f"{root}/{split}/<class>/<image>"
        )
    return split_dir


def spread_indices(n: int, k: int) -> list[int]:
    """``k <= n`` distinct indices of ``range(n)`` evenly spaced over the whole range (the
    centre of each of ``k`` equal bins), ascending."""
    assert 0 <= k <= n
    return [((2 * i + 1) * n) // (2 * k) for i in range(k)]


def class_spread_files(split_dir: Path, count: int) -> list[Path]:
    """``count`` images spread over all sorted classes (file names sorted): depth by depth, the
    first image of every class before the second of any; when a depth holds more classes than
    images still wanted, evenly spaced classes over the whole class list. A plain round-robin
    would take ``--testsize 64`` from the first 64 ImageNet synsets (fish, birds, reptiles)."""
    classes = sorted(p for p in split_dir.iterdir() if p.is_dir())
    files = [
        sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS) for c in classes
    ]
    files = [f for f in files if f]
    total = sum(len(f) for f in files)
    if total == 0:
        raise InputError(f"{split_dir} holds no images in class folders")
    if count > total:
        raise InputError(
            f"--testsize {count} exceeds the {total} images in {split_dir}; "
            f"use --testsize <= {total}"
        )
    picked: list[Path] = []
    depth = 0
    while len(picked) < count:
        deep_enough = [f for f in files if depth < len(f)]
        wanted = min(count - len(picked), len(deep_enough))
        picked += [deep_enough[i][depth] for i in spread_indices(len(deep_enough), wanted)]
        depth += 1
    return picked


def load_images(paths: list[Path], transform) -> torch.Tensor:
    """Decode and transform images into one (N, C, H, W) float32 tensor."""
    from PIL import Image

    tensors = []
    for p in paths:
        with Image.open(p) as img:
            tensors.append(transform(img.convert("RGB")))
    return torch.stack(tensors)


def imagenet_calib(datapath: Path, count: int, model: nn.Module, seed: int = 0) -> CalibSet:
    """Deterministic, class-spread calibration subset of ``datapath/train``."""
    split_dir = check_imagefolder(datapath, "train")
    files = class_spread_files(split_dir, count)
    x = load_images(files, eval_transform(model))
    items = [str(f.relative_to(datapath)) for f in files]
    return CalibSet(x, "imagefolder:train", items, seed)


def synthetic_calib(count: int, model: nn.Module, seed: int = 0) -> CalibSet:
    """Seeded standard-normal inputs of the model's input size (tests and benchmarks only)."""
    from timm.data import resolve_data_config

    shape = tuple(resolve_data_config({}, model=model)["input_size"])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, *shape, generator=g)
    return CalibSet(x, "synthetic:randn", list(range(count)), seed)


class LabelledFiles(torch.utils.data.Dataset):
    """Image files with integer labels, decoded and transformed on access."""

    def __init__(self, files: list[Path], labels: list[int], transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


def imagenet_eval(
    datapath: Path, count: int, model: nn.Module, batch_size: int, workers: int = 4
) -> torch.utils.data.DataLoader:
    """Labelled batches of ``datapath/val`` (``count`` = -1: every image; otherwise a
    deterministic class-spread subset). Labels are the indices of the sorted class folders, the
    ImageNet class order of timm models."""
    split_dir = check_imagefolder(datapath, "val")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if count == -1:
        files = [
            f
            for c in classes
            for f in sorted((split_dir / c).iterdir())
            if f.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not files:
            raise InputError(f"{split_dir} holds no images in class folders")
    else:
        files = class_spread_files(split_dir, count)
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[f.parent.name] for f in files]
    data = LabelledFiles(files, labels, eval_transform(model))
    return torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=False, num_workers=workers
    )


class ImageNetAdapter(Adapter):
    """``--dataset imagenet``: timm/torchvision models by name, ImageNet as an ImageFolder at
    ``--datapath`` (calibration from train/, evaluation on val/)."""

    name = "imagenet"

    def build(self, args: argparse.Namespace) -> tuple[nn.Module, ModelInfo]:
        return build_model(args.archname, args.checkpoint, args.random_init, args.seed)

    def example_input(self, model: nn.Module, count: int, seed: int) -> torch.Tensor:
        return synthetic_calib(count, model, seed).x

    def calib(self, args: argparse.Namespace, model: nn.Module, size: int, seed: int) -> CalibSet:
        return imagenet_calib(args.datapath, size, model, seed)

    def eval_data(self, args: argparse.Namespace, model: nn.Module) -> Batches:
        return imagenet_eval(args.datapath, args.testsize, model, args.batchsize, args.workers)


class SyntheticAdapter(ImageNetAdapter):
    """``--dataset synthetic``: the imagenet adapter's models on seeded standard-normal inputs
    without labels (tests and benchmarks only; only the output MSE is defined)."""

    name = "synthetic"

    def calib(self, args: argparse.Namespace, model: nn.Module, size: int, seed: int) -> CalibSet:
        return synthetic_calib(size, model, seed)

    def eval_data(self, args: argparse.Namespace, model: nn.Module) -> TensorBatches:
        n = 64 if args.testsize == -1 else args.testsize
        # A seed apart from the calibration's, so evaluation never sees calibration inputs.
        return TensorBatches(
            synthetic_calib(n, model, args.seed + 10_007).x, None, args.batchsize, "synthetic:randn"
        )
