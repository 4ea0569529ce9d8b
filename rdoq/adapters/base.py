"""What every adapter provides, and the types all adapters share (DESIGN §2: adapters are the
only model-specific code).

An adapter turns a script's flags into a model, its calibration set and its evaluation data,
and says how the network is run and scored. ``rdoq.cli`` looks the adapter up by ``--dataset``
(:func:`rdoq.adapters.adapter_registry`) instead of branching on the dataset; the rest of the
core never sees an adapter. The classification adapters are ``imagenet`` and ``synthetic``
(``timm_imagenet.py``), ``digits`` (``digits.py``) and ``natural`` (``natural.py``); each
implements the abstract methods of :class:`Adapter` and inherits the classifier defaults of the
others, and the scripts call every method.

Detection (DESIGN §11) is the third implementation:
:class:`rdoq.adapters.detector.OpenPCDetAdapter`, called by the detection scripts
(:mod:`rdoq.detection`, which have the authors' OpenPCDet flags, hence not in the ``--dataset``
registry). A detector's calibration samples are point-cloud frames, not one tensor: its model is
a :class:`rdoq.adapters.sparse.FrameRunner` of the detector and its frames, whose calibration
"tensor" is the frame indices and whose output is the tensor distortion is measured on, so the
same curve engine, store and solvers serve both families.
"""

from __future__ import annotations

import argparse
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from rdoq.evaluate import evaluate as evaluate_outputs
from rdoq.groups import LayerInfo, channel_dim, find_layers

# Evaluation data: batches of inputs and their labels (None where the data is unlabelled).
Batches = Iterable[tuple[torch.Tensor, torch.Tensor | None]]


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
    # The source of each sample (e.g. the image a crop was cut from), for calibration folds
    # that keep one source's samples together (rdoq.curves.assign_folds); None: each its own.
    units: list[str] | None = None

    def meta(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.x.float().contiguous().numpy().tobytes()).hexdigest()
        return {
            "size": int(self.x.shape[0]),
            "seed": self.seed,
            "source": self.source,
            "sha256": digest,
            "items": self.items,
            **self.extra,
        }


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _torch_load_failure(path: Path, err: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in words a user can act on (torch's
    own message for a text file is a bare opcode number such as ``101``)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return "the file is empty"
    # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (protocol byte).
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        return f"it is neither a torch.save zip archive nor a pickle: it begins with {head!r}"
    if "Weights only load failed" in str(err):
        return (
            "it pickles Python objects other than tensors, which are not loaded because "
            "that could run code"
        )
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:200]


def load_torch_file(path: Path, flag: str, expected: str) -> Any:
    """``torch.load`` of the file given by ``flag`` on the CPU, without executing code; an
    InputError naming the flag, the path, what is wrong and ``expected`` (what the file should
    be) when it is missing or not a readable torch file."""
    if not path.is_file():
        raise InputError(f"{flag} {path} does not exist; {expected}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise InputError(
            f"{flag} {path} is not a readable torch file ({_torch_load_failure(path, e)}); "
            f"{expected}"
        ) from e


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a state dict or timm/torch checkpoint file, loaded without executing code."""
    path = Path(path)
    expected = (
        "expected a PyTorch state dict saved with torch.save(model.state_dict(), FILE), "
        "a timm checkpoint, or a model_<target>.pth written by --save-model"
    )
    obj = load_torch_file(path, "--checkpoint", expected)
    # timm's training checkpoints keep the plain weights under "state_dict" (EMA weights, when
    # present, under "state_dict_ema"); like timm's own loader we take the plain ones.
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"--checkpoint {path} holds no state dict of tensors; {expected}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


class Adapter(ABC):
    """A model family with its data, selected by ``--dataset NAME``.

    Subclasses implement the four abstract methods; ``run``, ``evaluate``, ``layers`` and
    ``channel_axis`` default to what every classifier shares. Adapters hold no state: each
    method reads the flags it is given (the parsed ``argparse.Namespace`` of the script).
    """

    name: ClassVar[str]  # the --dataset value, and the adapter's key in the registry

    @abstractmethod
    def build(self, args: argparse.Namespace) -> tuple[nn.Module, ModelInfo]:
        """The model named by ``--archname`` (weights from ``--checkpoint``, the family's
        default source, or, only with ``--random-init``, seeded by ``--seed``) in eval mode,
        and where its weights came from. Never silently random."""

    @abstractmethod
    def example_input(self, model: nn.Module, count: int, seed: int) -> torch.Tensor:
        """``count`` seeded inputs of ``model``'s input shape that need no data files, on the
        CPU: what ``--fold-bn`` checks the folded network on."""

    @abstractmethod
    def calib(self, args: argparse.Namespace, model: nn.Module, size: int, seed: int) -> CalibSet:
        """``size`` calibration samples on the CPU, the same tensor for the same flags, ``size``
        and ``seed``: its sha256 goes into curve sets and is checked on resume and when -bcw /
        -bca rebuild it. The caller moves ``x`` to the device once and keeps it there."""

    @abstractmethod
    def eval_data(self, args: argparse.Namespace, model: nn.Module) -> Batches:
        """The evaluation batches, ``--testsize`` samples (-1: the whole evaluation split) of
        ``--batchsize``, never the calibration samples. ``model`` is the full-precision model
        (an adapter may label the data by it)."""

    def run(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The network on one batch ``x`` (on the model's device and dtype), returning the
        tensor distortion is measured on: for a classifier its output, ``model(x)`` (N, K). A
        detector adapter will return e.g. the dense BEV feature its head consumes."""
        return model(x)

    def evaluate(
        self, model: nn.Module, data: Batches, ref: torch.Tensor, device: torch.device
    ) -> dict[str, Any]:
        """Metrics of ``model`` on ``data``: top-1/top-5 (None without labels), output MSE and
        KL divergence against ``ref``, the full-precision ``run`` outputs on the same data
        (``rdoq.evaluate.reference_outputs(..., run=self.run)``)."""
        return evaluate_outputs(model, data, ref, device, run=self.run)

    def layers(self, model: nn.Module) -> list[LayerInfo]:
        """The quantizable layers of ``model``, in ``named_modules`` order. The curve engine,
        ``rdoq.apply`` and ``rdoq.evaluate`` discover layers through ``rdoq.groups`` as well,
        so this must agree with :func:`rdoq.groups.find_layers`."""
        return find_layers(model)

    def channel_axis(self, module: nn.Module) -> int:
        """The channel axis of ``module``'s activations (``rdoq.groups.channel_dim``)."""
        return channel_dim(module)


def fit_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], source: Path, arch: str
) -> None:
    """Load ``state`` into ``model`` strictly: a shape mismatch, a missing or an unexpected key
    is an :class:`InputError` naming ``source`` (the file the weights came from)."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise InputError(f"--checkpoint {source} does not fit {arch}: {str(e)[:300]}") from e
    if missing or unexpected:
        raise InputError(
            f"--checkpoint {source} does not fit {arch}: missing "
            f"{missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )


def fit_weights_file(
    model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str, source: str
) -> ModelInfo:
    """Load ``state``, read from the file ``path``, into ``model`` (:func:`fit_state_dict`)
    and describe it: ``arch``, the weights ``source`` and the file's sha256."""
    fit_state_dict(model, state, path, arch)
    return ModelInfo(arch, source, file_sha256(path))


def load_checkpoint(model: nn.Module, checkpoint: Path, arch: str) -> ModelInfo:
    """Load a user's ``--checkpoint`` file into ``model`` and describe it: source
    ``checkpoint:<file name>`` and the file's sha256."""
    checkpoint = Path(checkpoint)
    state = load_state_dict(checkpoint)
    return fit_weights_file(model, state, checkpoint, arch, f"checkpoint:{checkpoint.name}")
