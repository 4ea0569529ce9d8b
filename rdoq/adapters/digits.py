"""The embedded default: sklearn's bundled 8×8 digits and two small trained models (DESIGN §10).

Data. ``sklearn.datasets.load_digits()``: 1797 grey 8×8 images with integer pixels 0..16, 10
classes. The split is fixed: ``train_test_split(indices, test_size=0.3, stratify=labels,
random_state=0)`` gives 1257 train and 540 test images; both index lists are sorted ascending, so
"the i-th image of a split" never depends on the shuffle order. Calibration draws from train only,
evaluation uses test only.

Preprocessing (``preprocess``): pixels / 16 → [0, 1]; bilinear upsampling to 16×16
(``align_corners=False``, so the 4×4 patches of the ViT see smooth strokes instead of 2×2 blocks);
normalisation with the fixed constants ``MEAN`` / ``STD`` (the train split's pixel mean 0.3056 and
std 0.3190 after upsampling, rounded and hard-coded so nothing depends on the data at run time).
Result: ``(N, 1, 16, 16)`` float32.

Models. ``digits_cnn`` (three conv/BN/ReLU stages, global average pool, linear head) and
``digits_vit`` (a timm ``VisionTransformer``: 4×4 patches → 16 tokens, width 48, 3 blocks, 4 heads,
mean-pooled tokens instead of a class token, which trained more accurately on this little data).
Their weights are trained by ``classification/train_digits.py`` and committed under
``digits_models/``; a bundled file is checked against ``WEIGHTS_SHA256`` before it is loaded.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rdoq.adapters.base import (
    Adapter,
    CalibSet,
    InputError,
    ModelInfo,
    file_sha256,
    fit_weights_file,
    load_checkpoint,
)
from rdoq.evaluate import TensorBatches

DIGITS_ARCHS: tuple[str, ...] = ("digits_cnn", "digits_vit")
NUM_CLASSES = 10
PIXEL_MAX = 16.0  # load_digits pixels are integers 0..16
IMAGE_SIZE = 16
MEAN = 0.31
STD = 0.32
TEST_FRACTION = 0.3
SPLIT_SEED = 0
WEIGHTS_DIR = Path(__file__).resolve().parent / "digits_models"
WEIGHTS_SHA256: MappingProxyType[str, str] = MappingProxyType(
    {
        "digits_cnn": "a225b0871ab96f27a7d62c9c615ebf47708e59277650b9817ea2878a5d04215f",
        "digits_vit": "c451b2458ad631b7afe8c3ca4fc2a21a1feceda007fbad25c3ac167d0a3e13ff",
    }
)
# Per-architecture training defaults (used by train_digits_model when lr is not given).
DEFAULT_LR: MappingProxyType[str, float] = MappingProxyType(
    {"digits_cnn": 1e-2, "digits_vit": 5e-3}
)
DEFAULT_EPOCHS: MappingProxyType[str, int] = MappingProxyType({"digits_cnn": 30, "digits_vit": 40})
BATCH_SIZE = 64


class DigitsCNN(nn.Module):
    """Three conv/BN/ReLU stages (16×16 → 8×8 → 4×4), global average pool, linear head.

    Channel counts are multiples of 8 so channel groups of 8 split every layer into several groups.
    The stages sit in ``features`` (a trunk name the measured engine cuts at).
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()

        def stage(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(*stage(1, 16, 1), *stage(16, 32, 2), *stage(32, 64, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 64, 4, 4)
        x = self.pool(x).flatten(1)  # (N, 64)
        return self.head(x)  # (N, 10)


def _new_model(name: str) -> nn.Module:
    """An untrained instance of ``name`` (uses the global torch RNG for its init)."""
    if check_arch(name) == "digits_cnn":
        return DigitsCNN()
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=IMAGE_SIZE,
        patch_size=4,
        in_chans=1,
        num_classes=NUM_CLASSES,
        embed_dim=48,
        depth=3,
        num_heads=4,
        mlp_ratio=2.0,
        class_token=False,
        global_pool="avg",
    )


def _seeded_model(name: str, seed: int) -> nn.Module:
    """A fresh ``name`` initialised from ``seed``, leaving the caller's global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _new_model(name)


def check_arch(name: str) -> str:
    """``name`` if it is a digits model, else an InputError listing the valid names."""
    if name not in DIGITS_ARCHS:
        raise InputError(f"unknown digits model {name!r}; choose one of {', '.join(DIGITS_ARCHS)}")
    return name


def bundled_weights(name: str, weights_dir: Path = WEIGHTS_DIR) -> dict[str, torch.Tensor]:
    """The committed state dict ``weights_dir/<name>.pt``, after checking its sha256 against
    ``WEIGHTS_SHA256[name]``."""
    check_arch(name)
    path = Path(weights_dir) / f"{name}.pt"
    if not path.is_file():
        raise InputError(
            f"bundled weights {path} are missing; restore the file from git "
            f"(git checkout -- {path}) or re-run classification/train_digits.py"
        )
    expected = WEIGHTS_SHA256[name]
    actual = file_sha256(path)
    if actual != expected:
        raise InputError(
            f"bundled weights {path} have sha256 {actual}, expected {expected}; "
            f"restore the file from git or re-run classification/train_digits.py "
            f"and update WEIGHTS_SHA256 in rdoq/adapters/digits.py"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def build_digits_model(
    name: str, checkpoint: Path | None = None, random_init: bool = False, seed: int = 0
) -> tuple[nn.Module, ModelInfo]:
    """A digits model in eval mode, float32: the bundled weights (sha-checked) by default,
    ``checkpoint`` (a user state dict), or (explicitly) a seeded random init."""
    check_arch(name)
    model = _seeded_model(name, seed)
    if checkpoint is not None:
        info = load_checkpoint(model, checkpoint, name)
    elif random_init:
        info = ModelInfo(name, f"random-init:seed={seed}")
    else:
        path = WEIGHTS_DIR / f"{name}.pt"
        info = fit_weights_file(model, bundled_weights(name), path, name, f"bundled:{path.name}")
    return model.float().eval(), info


def preprocess(images: np.ndarray) -> torch.Tensor:
    """Raw digits ``(N, 8, 8)`` with pixels 0..16 → normalised ``(N, 1, 16, 16)`` float32."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32) / PIXEL_MAX)[:, None]  # (N, 1, 8, 8)
    x = F.interpolate(
        x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )  # (N, 1, 16, 16)
    return ((x - MEAN) / STD).contiguous()


def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled digits: images ``(1797, 8, 8)`` and int64 labels ``(1797,)``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target.astype(np.int64)


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices ``(train, test)`` of the fixed stratified 70/30 split."""
    from sklearn.model_selection import train_test_split

    _, labels = _load_raw()
    train, test = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return np.sort(train), np.sort(test)


def class_spread(indices: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """``count`` of ``indices`` taken round-robin over the classes (ascending index per class)."""
    per_class = [indices[labels[indices] == c] for c in np.unique(labels[indices])]
    picked: list[int] = []
    depth = 0
    while len(picked) < count:
        for members in per_class:
            if depth < len(members) and len(picked) < count:
                picked.append(int(members[depth]))
        depth += 1
    return np.asarray(picked, dtype=np.int64)


def digits_calib(count: int, seed: int = 0) -> CalibSet:
    """``count`` class-spread calibration images from the train split.

    The choice is fixed (round-robin over classes, ascending index); ``seed`` is recorded only,
    as in ``imagenet_calib``, so --seed for a random init never changes the calibration set.
    """
    images, labels = _load_raw()
    train, _ = digits_split()
    if not 0 < count <= len(train):
        raise InputError(
            f"--testsize {count} is out of range for the {len(train)} images of the "
            f"digits train split; use 1 <= --testsize <= {len(train)}"
        )
    picked = class_spread(train, labels, count)
    return CalibSet(preprocess(images[picked]), "digits:train", picked.tolist(), seed)


def digits_eval(count: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out test split: x ``(N, 1, 16, 16)`` float32, y ``(N,)`` int64.

    ``count=-1`` gives all of it; ``count > 0`` a fixed class-spread subset of that size.
    """
    images, labels = _load_raw()
    _, test = digits_split()
    if count == -1:
        picked = test
    elif 0 < count <= len(test):
        picked = class_spread(test, labels, count)
    else:
        raise InputError(
            f"evaluation size {count} is out of range for the {len(test)} images of "
            f"the digits test split; use -1 (all) or 1..{len(test)}"
        )
    return preprocess(images[picked]), torch.as_tensor(labels[picked])


@torch.no_grad()
def digits_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> float:
    """Top-1 accuracy of ``model`` on ``x`` ``(N, 1, 16, 16)`` with labels ``y`` ``(N,)``."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / len(x)


def train_digits_model(
    name: str, epochs: int | None = None, seed: int = 0, lr: float | None = None
) -> tuple[nn.Module, float]:
    """Train ``name`` on the train split; returns the model (eval mode) and its test accuracy.

    Plain, augmentation-free AdamW with a cosine learning-rate decay; the init and the minibatch
    order come from ``seed`` (local generators, the global RNG is left alone). Bitwise
    reproducibility additionally needs one thread and ``torch.use_deterministic_algorithms``,
    which the training script sets.
    """
    check_arch(name)
    epochs = DEFAULT_EPOCHS[name] if epochs is None else epochs
    lr = DEFAULT_LR[name] if lr is None else lr
    if epochs <= 0:
        raise InputError(f"--epochs {epochs} must be > 0")
    images, labels = _load_raw()
    train, _ = digits_split()
    x = preprocess(images[train])  # (N, 1, 16, 16)
    y = torch.as_tensor(labels[train])  # (N,)
    model = _seeded_model(name, seed).float()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = -(-len(x) // BATCH_SIZE)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), BATCH_SIZE):
            batch = order[i : i + BATCH_SIZE]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    x_test, y_test = digits_eval()
    return model, digits_accuracy(model, x_test, y_test)


def save_weights(model: nn.Module, path: Path) -> str:
    """Write ``model``'s float state dict to ``path`` atomically; returns the file's sha256.

    The bytes are serialised in memory first: ``torch.save`` to a file names the zip's inner
    folder after that file, and a temp name would make the bytes (and the hash) differ per run.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the weights are an ordinary repo file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file_sha256(path)


class DigitsAdapter(Adapter):
    """``--dataset digits``: the bundled digits models on the bundled digits images."""

    name = "digits"

    def build(self, args: argparse.Namespace) -> tuple[nn.Module, ModelInfo]:
        return build_digits_model(args.archname, args.checkpoint, args.random_init, args.seed)

    def example_input(self, model: nn.Module, count: int, seed: int) -> torch.Tensor:
        return digits_calib(count, seed).x

    def calib(self, args: argparse.Namespace, model: nn.Module, size: int, seed: int) -> CalibSet:
        return digits_calib(size, seed)

    def eval_data(self, args: argparse.Namespace, model: nn.Module) -> TensorBatches:
        x, y = digits_eval(args.testsize)
        return TensorBatches(x, y, args.batchsize, "digits:test")
