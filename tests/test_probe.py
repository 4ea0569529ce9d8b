"""The probing forward (rdoq.probe) and the questions answered from it: MACs per layer, the
widest activation, activation shapes."""

from __future__ import annotations

import torch
from torch import nn

from rdoq.curves import max_rows_for
from rdoq.parts import layer_macs


class WindowAttention(nn.Module):
    """Swin-style: the tokens of one image are cut into windows that become the batch axis, so
    the linear layer sees (windows, tokens per window, C) for one sample."""

    def __init__(self, dim: int = 6, windows: int = 4):
        super().__init__()
        self.windows = windows
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(3 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, C)
        b, n, c = x.shape
        w = x.reshape(b * self.windows, n // self.windows, c)  # (B*nW, L/nW, C)
        return self.proj(self.qkv(w)).reshape(b, n, c)


def test_layer_macs_count_every_window_of_the_one_sample():
    model = WindowAttention()
    x = torch.randn(1, 8, 6)
    macs = layer_macs(model, x, ["qkv", "proj"])
    # Each of the 8 tokens passes through qkv (6 -> 18) and proj (18 -> 6) once.
    assert macs == {"qkv": 8 * 18 * 6, "proj": 8 * 6 * 18}


def test_layer_macs_sum_over_calls_and_count_dense_outputs():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(self.lin(x)[..., :1].repeat(1, 4))

    conv = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1))
    assert layer_macs(conv, torch.randn(1, 2, 6, 6), ["0"]) == {"0": 5 * 36 * 2 * 9}
    assert layer_macs(Twice(), torch.randn(1, 4), ["lin"]) == {"lin": 2 * 3 * 4}


def test_max_rows_for_counts_the_widest_leaf_output():
    model = nn.Sequential(nn.Linear(10, 1000), nn.ReLU(), nn.Linear(1000, 2))
    x = torch.randn(1, 10)
    widest = 1000 * 4  # float32 bytes of one sample's widest activation
    assert max_rows_for(model, x, 1.0) == 2**20 // (8 * widest)
