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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import nn

_INSTALL_HINT = "pip install -e .[pcdet]"


def require_spconv() -> ModuleType:
    """``spconv.pytorch``, imported, with the CPU fixes applied; a clear error when missing."""
    try:
        import spconv.pytorch as spconv_pt
    except ImportError as e:
        raise ImportError(f"spconv is not installed ({e}); sparse-conv (OpenPCDet) support "
                          f"needs it: {_INSTALL_HINT}") from e
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
