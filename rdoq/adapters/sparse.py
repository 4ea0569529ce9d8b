"""spconv sparse convolutions (OpenPCDet's 3-D backbones): importing spconv, and its CPU fixes.

spconv is optional (``pip install -e .[pcdet]``) and the core never imports it: it recognises
spconv layers by their classes in ``sys.modules`` (:func:`rdoq.groups.is_sparse_conv`). Code that
needs spconv itself gets it from :func:`require_spconv`, which imports it and applies the CPU
fixes; they live here and nowhere else.

Quantizable spconv layers (:data:`rdoq.groups.SPARSE_CONV_TYPES`) have the weight layout
``(Cout, *kernel, Cin)`` (spconv 2.x "KRSC"): output channels on axis 0 like ``nn.Conv2d``, so
channel groups, per-channel steps and ``-bcw`` biases ``(Cout,)`` need nothing sparse-specific
(:func:`rdoq.groups.check_sparse_layout` refuses any other layout). Their activations are the
features ``(N_active, C)`` of a ``SparseConvTensor``: channels last.

CPU fixes (spconv 2.3.8's CPU wheel, measured on a machine without CUDA):

- backward looks up the CUDA stream (``spconv.pytorch.ops.get_current_stream``) even for CPU
  tensors and fails without a driver: without CUDA it is replaced by ``0``, the stream spconv's
  own forward passes for CPU tensors.
- a sparse conv with a bias fails in eval mode on CPU ("cpu don't support act and bias":
  inference fuses the bias into the kernel, which only the CUDA kernels do): :func:`eval_on_cpu`
  puts a model in eval mode but its sparse convs in train mode, where spconv adds the bias after
  the kernel. For the native algorithm (the only one of the CPU build) train mode changes nothing
  else (it updates ``max_num_voxels_during_training`` of layers built with
  ``record_voxel_count``, a statistic).
- a strided ``SparseConv3d`` with padding gives wrong, run-to-run different outputs with more than
  one torch thread: run sparse forwards inside :func:`one_thread`.

Calibration frames (:class:`FrameRunner`): the curve engines (``rdoq.curves.generate_curves``,
``rdoq.engine.MeasuredEngine``, ``rdoq.hessian.GradientSweep``) take a calibration *tensor*
``(N, …)`` and run ``model(x[s])``. A detector's samples are point-cloud frames (a
``SparseConvTensor``, a pcdet batch dict) and its distortion is measured on a tensor an adapter's
``run(model, frame)`` returns. :class:`FrameRunner` wraps the network so that the calibration
tensor is the frame indices ``(N, 1)`` (:meth:`FrameRunner.indices`) and ``forward(idx)`` runs
each indexed frame alone and stacks the outputs. Invariants the engines rely on:

- every frame runs alone, so a batch of ``n`` indices is ``n`` network runs and a layer sees one
  frame per call: :attr:`FrameRunner.batches_samples` is False, and the measured engine then
  swaps each candidate's weight in place (no slot batching along the batch axis) and the
  gradient sweep captures one sample per forward;
- a frame is rebuilt (new containers and tensors, a new ``SparseConvTensor`` without spconv's
  cached index pairs) and cast to the network's float dtype and device on every run, so the
  reference and every candidate see identical inputs and nothing a forward writes into a frame
  (pcdet's modules add keys to their batch dict) leaks into the next run;
- the runner's children are the network's own top-level children (layer names are the
  network's, so an allocation made from the curves applies to the bare network); conversions
  (``.to``, ``.double``) and train/eval go to the network itself.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

_INSTALL_HINT = "pip install -e .[pcdet]"


def require_spconv() -> ModuleType:
    """``spconv.pytorch``, imported, with the CPU fixes applied; a clear error when missing."""
    try:
        import spconv.pytorch as spconv_pt
    except ImportError as e:
        raise ImportError(
            f"spconv is not installed ({e}); sparse-conv (OpenPCDet) support "
            f"needs it: {_INSTALL_HINT}"
        ) from e
    _patch_cpu_stream(spconv_pt)
    return spconv_pt


def _cpu_stream() -> int:
    return 0


def _patch_cpu_stream(spconv_pt: ModuleType) -> None:
    """Without CUDA, spconv's stream lookup returns 0 instead of asking a missing driver."""
    if torch.cuda.is_available():
        return
    # ops.py imported the function by name: patching its module attribute is what its calls see.
    spconv_pt.ops.get_current_stream = _cpu_stream


def eval_on_cpu(model: nn.Module) -> nn.Module:
    """``model.eval()`` with its sparse convs in train mode, so biased ones run on CPU (see the
    module docstring). Returns ``model``."""
    model.eval()
    conv = require_spconv().conv
    for m in model.modules():
        if isinstance(m, conv.SparseConvolution):
            m.train()
    return model


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed sparse forwards with one torch thread (strided sparse convs are wrong with
    more on CPU), restoring the thread count afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ``run(model, frame)``: the tensor distortion is measured on, ``(1, …)`` for one frame.
Run = Callable[[nn.Module, Any], torch.Tensor]


def cast_frame(frame: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A fresh copy of ``frame`` with float tensors in ``dtype`` and every tensor on
    ``device``: tensors (always new ones, so a run that writes into its inputs cannot change
    the stored frame), ``SparseConvTensor`` (rebuilt without its cached index pairs), dicts,
    lists and tuples; anything else (numpy arrays, strings) as is."""
    if isinstance(frame, torch.Tensor):
        t = frame.to(device=device, dtype=dtype if frame.is_floating_point() else None)
        return t.clone() if t is frame else t
    if isinstance(frame, dict):
        return {k: cast_frame(v, device, dtype) for k, v in frame.items()}
    if isinstance(frame, list | tuple):
        return type(frame)(cast_frame(v, device, dtype) for v in frame)
    spconv_pt = require_spconv()
    if isinstance(frame, spconv_pt.SparseConvTensor):
        return spconv_pt.SparseConvTensor(
            cast_frame(frame.features, device, dtype),
            frame.indices.to(device),
            list(frame.spatial_shape),
            frame.batch_size,
        )
    return frame


def _digest_into(h: Any, frame: Any) -> None:
    if isinstance(frame, torch.Tensor | np.ndarray):
        h.update(f"{frame.dtype}{tuple(frame.shape)}".encode())
        t = frame.detach().cpu().contiguous().numpy() if isinstance(frame, torch.Tensor) else frame
        h.update(np.ascontiguousarray(t).tobytes())
    elif isinstance(frame, dict):
        for k in sorted(frame, key=str):
            h.update(str(k).encode())
            _digest_into(h, frame[k])
    elif isinstance(frame, list | tuple):
        for v in frame:
            _digest_into(h, v)
    elif hasattr(frame, "features") and hasattr(frame, "indices"):  # a SparseConvTensor
        h.update(str(list(frame.spatial_shape)).encode())
        _digest_into(h, [frame.features, frame.indices])
    else:
        h.update(repr(frame).encode())


class FrameRunner(nn.Module):
    """A network whose calibration samples are frames, as a model of a tensor input: ``forward
    (idx (n, 1))`` returns ``run(net, frame)`` of each indexed frame, stacked ``(n, …)``; the
    calibration tensor is :meth:`indices` (see the module docstring for the invariants).

    ``frames``: one calibration sample each (a ``SparseConvTensor`` of batch size 1, a pcdet
    batch dict of one frame, …), kept as given (on the device, for speed). ``run(net, frame)``
    must return one row, ``(1, …)``, of the same shape for every frame.
    """

    # A batch of n indices is n separate runs: engines must not split one layer call into
    # samples or candidate slots (read by rdoq.engine and rdoq.hessian).
    batches_samples: ClassVar[bool] = False

    def __init__(self, net: nn.Module, frames: Sequence[Any], run: Run):
        super().__init__()
        if not frames:
            raise ValueError("FrameRunner needs at least one calibration frame")
        require_spconv()  # the CPU fixes (the second-order estimator runs spconv's backward)
        # Outside the module tree: its children are registered below under their own names.
        self.__dict__["net"] = net
        self.frames = list(frames)
        self.run = run
        for name, child in net.named_children():
            self.add_module(name, child)
        self.train(net.training)

    def indices(self) -> torch.Tensor:
        """The calibration "tensor": frame indices ``(N, 1)`` float32."""
        return torch.arange(len(self.frames), dtype=torch.float32).unsqueeze(1)  # (N, 1)

    def sha256(self) -> str:
        """Hex sha256 of the frames' tensors (the calibration set's identity in meta.json)."""
        h = hashlib.sha256()
        _digest_into(h, self.frames)
        return h.hexdigest()

    def _apply(self, fn: Callable, recurse: bool = True) -> FrameRunner:
        # The network owns the children and possibly tensors of its own (pcdet's global_step).
        self.net._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> FrameRunner:
        """Train/eval of the network itself (a detector branches on its own ``training``);
        in eval mode its sparse convs stay in train mode (:func:`eval_on_cpu`)."""
        if mode:
            self.net.train(True)
        else:
            eval_on_cpu(self.net)
        self.training = mode
        return self

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``run`` outputs of the frames ``idx (n, 1)`` (or ``(n,)``), stacked: ``(n, …)``."""
        ref = next((p for p in self.net.parameters() if p.is_floating_point()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = ref.dtype if ref is not None else torch.float32
        order = idx.detach().reshape(idx.shape[0], -1)[:, 0].round().long().tolist()
        outs = []
        with one_thread() if device.type == "cpu" else contextlib.nullcontext():
            for i in order:
                y = self.run(self.net, cast_frame(self.frames[i], device, dtype))
                if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != 1:
                    got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                    raise ValueError(
                        f"run(model, frame) must return one row (1, …) per frame, "
                        f"got {got} for frame {i}"
                    )
                if outs and y.shape != outs[0].shape:
                    raise ValueError(
                        f"run(model, frame) returned {tuple(y.shape)} for frame {i} "
                        f"but {tuple(outs[0].shape)} for frame {order[0]}: "
                        f"distortion needs one output shape for every frame"
                    )
                outs.append(y)
        return torch.cat(outs)  # (n, …)
