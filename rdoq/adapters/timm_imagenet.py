"""timm classifiers, ImageNet as an ImageFolder, and the explicit synthetic dataset (DESIGN §10)."""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The authors' model-zoo names, mapped to the timm models with the same architecture.
ARCH_ALIASES = {
    "mobilenetv2py": "mobilenetv2_100",
    "resnet18py": "resnet18",
    "resnet34py": "resnet34",
    "resnet50py": "resnet50",
    "resnet101py": "resnet101",
    "vgg16py": "vgg16",
    "deit_b_224": "deit_base_patch16_224",
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class InputError(ValueError):
    """Bad user input: the message names the value and the fix."""


@dataclass
class ModelInfo:
    """Where a model's weights came from (recorded in meta.json)."""

    arch: str
    weights_source: str
    checkpoint_sha256: str | None = None


@dataclass
class CalibSet:
    """A calibration tensor and how to recompute it."""

    x: torch.Tensor  # (N, C, H, W) float32
    source: str
    items: list[Any]
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.x.float().contiguous().numpy().tobytes()).hexdigest()
        return {"size": int(self.x.shape[0]), "seed": self.seed, "source": self.source,
                "sha256": digest, "items": self.items, **self.extra}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_arch(name: str) -> str:
    """A timm model name for ``name`` (paper aliases accepted); unknown names suggest close ones."""
    import timm

    arch = ARCH_ALIASES.get(name, name)
    if timm.is_model(arch):
        return arch
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise InputError(f"unknown --archname {name!r}{hint}")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a state dict or timm/torch checkpoint file, loaded without executing code."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--checkpoint {path} does not exist; pass a state-dict file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise InputError(f"--checkpoint {path} cannot be read as a weights-only torch "
                         f"file: {e}") from e
    # timm's training checkpoints keep the plain weights under "state_dict" (EMA weights, when
    # present, under "state_dict_ema"); like timm's own loader we take the plain ones.
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"--checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def build_model(name: str, checkpoint: Path | None = None, random_init: bool = False,
                seed: int = 0, num_classes: int | None = None) -> tuple[nn.Module, ModelInfo]:
    """A timm model in eval mode with real weights: hub weights, ``checkpoint``, or (explicitly)
    a seeded random init. Never silently random."""
    import timm

    arch = resolve_arch(name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if checkpoint is not None:
        model = timm.create_model(arch, pretrained=False, **kwargs)
        state = load_state_dict(Path(checkpoint))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(f"--checkpoint {checkpoint} does not fit {arch}: missing "
                             f"{missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected "
                             f"{unexpected[:5]}{'…' if len(unexpected) > 5 else ''}")
        info = ModelInfo(arch, f"checkpoint:{Path(checkpoint).name}", file_sha256(Path(checkpoint)))
    elif random_init:
        torch.manual_seed(seed)
        model = timm.create_model(arch, pretrained=False, **kwargs)
        info = ModelInfo(arch, f"random-init:seed={seed}")
    else:
        try:
            model = timm.create_model(arch, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
            raise InputError(f"pretrained weights for {arch} are unreachable ({type(e).__name__}: "
                             f"{str(e)[:200]}); pass --checkpoint FILE or --random-init") from e
        info = ModelInfo(arch, f"timm-pretrained:{model.pretrained_cfg.get('tag') or 'default'}")
    return model.eval(), info


def eval_transform(model: nn.Module):
    """timm's eval preprocessing for ``model`` (resolve_data_config + create_transform)."""
    from timm.data import create_transform, resolve_data_config

    return create_transform(**resolve_data_config({}, model=model), is_training=False)


def check_imagefolder(root: Path, split: str = "train") -> Path:
    """``root/split`` as an ImageFolder directory, or an InputError naming what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--datapath {root} does not exist; pass an ImageNet root with train/ "
                         f"and val/ (or --dataset synthetic for a smoke test)")
    if not any(root.iterdir()):
        raise InputError(f"--datapath {root} is empty; it must hold train/ and val/ folders")
    split_dir = root / split
    if not split_dir.is_dir():
        raise InputError(f"--datapath {root} has no {split}/ folder; ImageNet must be laid out as "
                         f"{root}/{split}/<class>/<image>")
    return split_dir


def class_spread_files(split_dir: Path, count: int) -> list[Path]:
    """``count`` images taken round-robin over the sorted classes (file names sorted)."""
    classes = sorted(p for p in split_dir.iterdir() if p.is_dir())
    files = [sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
             for c in classes]
    files = [f for f in files if f]
    total = sum(len(f) for f in files)
    if total == 0:
        raise InputError(f"{split_dir} holds no images in class folders")
    if count > total:
        raise InputError(f"--testsize {count} exceeds the {total} images in {split_dir}; "
                         f"use --testsize <= {total}")
    picked: list[Path] = []
    depth = 0
    while len(picked) < count:
        for cls_files in files:
            if depth < len(cls_files) and len(picked) < count:
                picked.append(cls_files[depth])
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


def imagenet_eval(datapath: Path, count: int, model: nn.Module, batch_size: int,
                  workers: int = 4) -> torch.utils.data.DataLoader:
    """Labelled batches of ``datapath/val`` (``count`` = -1: every image; otherwise a
    deterministic class-spread subset). Labels are the indices of the sorted class folders, the
    ImageNet class order of timm models."""
    split_dir = check_imagefolder(datapath, "val")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if count == -1:
        files = [f for c in classes for f in sorted((split_dir / c).iterdir())
                 if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            raise InputError(f"{split_dir} holds no images in class folders")
    else:
        files = class_spread_files(split_dir, count)
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[f.parent.name] for f in files]
    data = LabelledFiles(files, labels, eval_transform(model))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False,
                                       num_workers=workers)
