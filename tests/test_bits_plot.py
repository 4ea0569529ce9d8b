"""The bits plot (``bits_<t>.png``): one distinct colour per bit width, readable labels at any
layer count (issue 11, item 13)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import ListedColormap

from rdoq import report


def fake_alloc(n_layers: int, widths: list[int], groups: int = 6) -> dict:
    """``n_layers`` weight layers then as many activation layers, bits cycling through
    ``widths``, with long timm-like names."""

    def entries(offset: int) -> dict:
        return {
            f"blocks.{i}.mlp.fc{1 + i % 2}": {
                "bits": [widths[(offset + i + g) % len(widths)] for g in range(groups - i % 3)]
            }
            for i in range(n_layers)
        }

    return {
        "model": "vit_test",
        "solver": "dp",
        "target_bits": 3.0,
        "weights": entries(0),
        "acts": entries(1),
    }


def capture(monkeypatch, tmp_path, alloc):
    figs = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figs.append(fig))
    report.plot_allocation(alloc, tmp_path / "bits.png")
    assert len(figs) == 1
    return figs[0]


def test_one_distinct_colour_per_width(monkeypatch, tmp_path):
    widths = [0, 2, 3, 4, 5, 8]
    alloc = fake_alloc(14, widths)  # 28 rows, as a small ViT
    fig = capture(monkeypatch, tmp_path, alloc)
    im = fig.axes[0].images[0]
    # A short list of colours, not a continuous map sampled at 256 levels.
    assert isinstance(im.cmap, ListedColormap) and len(widths) <= im.cmap.N < 64
    shown = np.ma.filled(np.asarray(im.get_array(), dtype=float), np.nan)  # (L, G)
    bits = bits_grid(alloc)  # (L, G)
    assert shown.shape == bits.shape
    rgba = {}
    for w in widths:
        # The colour the cells of width w are drawn in, through the image's own norm and map.
        cells = shown[bits == w]
        colours = {tuple(im.cmap(im.norm(v))) for v in cells}
        assert len(colours) == 1, (w, colours)
        rgba[w] = colours.pop()
    # Clearly different colours, 3 and 4 bits included (RGB distance, 0..sqrt(3)).
    dist = min(
        np.linalg.norm(np.subtract(rgba[a][:3], rgba[b][:3]))
        for a in widths
        for b in widths
        if a < b
    )
    assert dist >= 0.2, rgba
    # The legend (or a discrete colour bar) names exactly the widths present.
    legend = fig.axes[0].get_legend()
    if legend is not None:
        texts = [t.get_text() for t in legend.get_texts()]
    else:
        fig.canvas.draw()
        texts = [
            t.get_text()
            for ax in fig.axes[1:]
            for t in ax.get_yticklabels() + ax.get_xticklabels()
            if t.get_text()
        ]
    assert sorted(int(t.split(" ")[0]) for t in texts) == widths, texts


def bits_grid(alloc: dict) -> np.ndarray:
    """Bits per (layer row, group) in plot order (weights then activations), NaN past a row's
    groups."""
    rows = [e["bits"] for part in ("weights", "acts") for e in alloc[part].values()]
    grid = np.full((len(rows), max(len(r) for r in rows)), np.nan)  # (L, G)
    for i, r in enumerate(rows):
        grid[i, : len(r)] = r
    return grid


@pytest.mark.parametrize("n_layers", [3, 14, 60, 400])
def test_labels_readable_and_height_grows(monkeypatch, tmp_path, n_layers):
    fig = capture(monkeypatch, tmp_path, fake_alloc(n_layers, [2, 4]))
    ax = fig.axes[0]
    fig.canvas.draw()
    shown = [t for t in ax.get_yticklabels() if t.get_visible() and t.get_text()]
    assert shown and all(t.get_fontsize() >= 6 for t in shown)
    ys = sorted(t.get_window_extent().y0 for t in shown)
    pitch_pt = np.diff(ys).min() * 72.0 / fig.dpi if len(ys) > 1 else np.inf
    # Neighbouring labels do not overlap.
    assert pitch_pt >= max(t.get_fontsize() for t in shown), (n_layers, pitch_pt)
    if 2 * n_layers <= 60:
        assert len(shown) == 2 * n_layers  # every layer named while there is room


def test_height_grows_with_the_layer_count(monkeypatch, tmp_path):
    heights = [
        capture(monkeypatch, tmp_path, fake_alloc(n, [2, 4])).get_size_inches()[1]
        for n in (3, 14, 60)
    ]
    assert heights[0] < heights[1] < heights[2]
