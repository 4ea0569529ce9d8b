"""Result files and plots of the allocation scripts (DESIGN §5): ``results.jsonl`` (one JSON line
per evaluated point; a re-run replaces its point's line), ``results.csv`` (rewritten from the
JSON lines), a printed table and PNG plots."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from rdoq.store import atomic_write_bytes

# Columns of the printed table: (key, header, format).
TABLE_COLUMNS = (
    ("model", "model", "{}"),
    ("method", "method", "{}"),
    ("target_bits", "target", "{:.2f}"),
    ("slope_log2", "log2 λ", "{:.1f}"),
    ("w_bits", "W bits", "{:.3f}"),
    ("w_entropy_bits", "W entropy", "{:.3f}"),
    ("a_bits", "A bits", "{:.3f}"),
    ("top1", "top-1 %", "{:.2f}"),
    ("top5", "top-5 %", "{:.2f}"),
    ("mAP", "mAP", "{:.4f}"),
    ("NDS", "NDS", "{:.4f}"),
    ("out_mse", "out MSE", "{:.3e}"),
    ("pred_dist", "pred dist", "{:.3e}"),
    ("size_mb", "size MB", "{:.3f}"),
)


# What makes two result rows the same evaluated point: a re-run of a script replaces the row of
# its point. The allocation file tells apart re-evaluations of different files at one target.
POINT_KEYS = ("model", "method", "target_bits", "act_target_bits", "allocation")


def _point(row: dict[str, Any]) -> tuple:
    return tuple(
        json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v
        for v in (row.get(k) for k in POINT_KEYS)
    )


def append_results(outdir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``rows`` to ``outdir/results.jsonl`` and rewrite ``results.csv`` from all lines.

    A row of a point already in the file (same ``POINT_KEYS``) replaces that point's rows in
    place; rows of other points are kept. Returns every row in the file. Both files are
    rewritten atomically, so a crash leaves the old file, never half a line."""
    path = outdir / "results.jsonl"
    new = {_point(r): r for r in rows}  # of several rows of one point, the last wins
    lines: list[dict[str, Any]] = []
    placed: set[tuple] = set()
    for r in read_results(path):
        key = _point(r)
        if key not in new:
            lines.append(r)
        elif key not in placed:
            lines.append(new[key])
            placed.add(key)
    lines += [r for key, r in new.items() if key not in placed]
    text = "".join(json.dumps(r) + "\n" for r in lines).encode()
    atomic_write_bytes(path, lambda f: f.write(text))
    keys: list[str] = []
    for r in lines:
        keys += [k for k in r if k not in keys and not isinstance(r[k], (list, dict))]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in lines:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    data = buf.getvalue().encode()
    atomic_write_bytes(outdir / "results.csv", lambda f: f.write(data))
    return lines


def read_results(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``results.jsonl`` (empty if absent)."""
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path} line {i + 1} is not JSON ({e}); move the file away or fix that line"
                ) from e
    return rows


def _fmt(fmt: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of result rows (method × target: bits, accuracy, MSE)."""
    cols = [
        (k, h, f)
        for k, h, f in TABLE_COLUMNS
        if any(r.get(k) is not None for r in rows)
        and (k != "model" or len({r.get("model") for r in rows}) > 1)
    ]
    cells = [[h for _, h, _ in cols]] + [[_fmt(f, r.get(k)) for k, _, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Output distortion (measured solid, predicted by the curves dashed) and top-1 against the
    average bit width, one colour per method (without labels: the distortion panel only)."""
    plt = _matplotlib()
    labelled = any(r.get("top1") is not None for r in rows)
    fig, axes = plt.subplots(
        1, 2 if labelled else 1, figsize=(10 if labelled else 5.5, 4), squeeze=False
    )
    ax_d = axes[0, 0]
    methods = list(dict.fromkeys(r.get("method", "?") for r in rows))
    for i, m in enumerate(methods):
        color = f"C{i % 10}"
        pts = sorted((r for r in rows if r.get("method") == m), key=lambda r: r["avg_bits"])
        x = [r["avg_bits"] for r in pts]
        ax_d.semilogy(x, [r["out_mse"] for r in pts], "o-", color=color, label=f"{m} measured")
        pred = [r.get("pred_dist") for r in pts]
        if any(p is not None for p in pred):
            ax_d.semilogy(
                x,
                [np.nan if p is None else p for p in pred],
                "x--",
                color=color,
                label=f"{m} predicted",
            )
        if labelled:
            axes[0, 1].plot(
                x,
                [np.nan if r.get("top1") is None else r["top1"] for r in pts],
                "o-",
                color=color,
                label=m,
            )
    ax_d.set(
        xlabel="average bits", ylabel="output MSE vs full precision", title="output distortion"
    )
    if labelled:
        fp = next((r.get("fp_top1") for r in rows if r.get("fp_top1") is not None), None)
        if fp is not None:
            axes[0, 1].axhline(fp, color="grey", ls=":", label="full precision")
        axes[0, 1].set(xlabel="average bits", ylabel="top-1 %", title="accuracy")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


# Bits plot geometry. Each layer row gets BITS_ROW_IN inches, room for a BITS_FONT_PT label; a
# figure taller than BITS_MAX_ROWS_IN (6000 px at 100 dpi) squeezes its rows and names only every
# k-th layer, so labels never overlap whatever the layer count.
BITS_FONT_PT = 7.0
BITS_ROW_IN = 0.16
BITS_MAX_ROWS_IN = 60.0
BITS_MARGIN_IN = 1.2  # title, x axis label and ticks


def width_colour(bits: int) -> tuple[float, float, float, float]:
    """The colour of a bit width, the same in every bits plot: 0 (pruned) light grey, 1..10 the
    ten tab10 colours, 11..20 tab20's light shades, wider ones evenly spread hues."""
    from matplotlib import colormaps
    from matplotlib.colors import to_rgba

    if bits == 0:
        return to_rgba("#d9d9d9")
    if bits <= 10:
        return colormaps["tab10"](bits - 1)
    if bits <= 20:
        return colormaps["tab20"](2 * (bits - 11) + 1)
    return colormaps["hsv"](((bits - 21) * 0.618034) % 1.0)


def plot_allocation(alloc: dict[str, Any], path: Path) -> None:
    """Bits per group (columns) per layer (rows; weights then activations), one distinct colour
    per bit width present (:func:`width_colour`) with a discrete colour bar naming the widths."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    plt = _matplotlib()
    names, rows = [], []
    for part, tag in (("weights", "W"), ("acts", "A")):
        for name, e in alloc[part].items():
            names.append(f"{tag} {name}")
            rows.append(e["bits"])
    if not rows:
        return
    n_groups = max(len(r) for r in rows)
    grid = np.full((len(rows), n_groups), np.nan)  # (L, G)
    for i, r in enumerate(rows):
        grid[i, : len(r)] = r
    widths = sorted({int(b) for r in rows for b in r})
    # Cells hold the index of their width among those present: one colour bin each.
    index = np.searchsorted(widths, np.nan_to_num(grid, nan=widths[0])).astype(float)  # (L, G)
    index[np.isnan(grid)] = np.nan
    cmap = ListedColormap([width_colour(w) for w in widths], name="bit_widths").with_extremes(
        bad="white"
    )  # past a layer's groups
    norm = BoundaryNorm(np.arange(len(widths) + 1) - 0.5, len(widths))

    rows_in = min(BITS_ROW_IN * len(rows), BITS_MAX_ROWS_IN)
    every = math.ceil(1.25 * BITS_FONT_PT / (72.0 * rows_in / len(rows)))
    label_in = max(len(n) for n in names) * 0.6 * BITS_FONT_PT / 72.0 + 0.3
    fig, ax = plt.subplots(
        figsize=(
            label_in + min(1.0 + 0.25 * n_groups, 14.0) + 1.2,
            BITS_MARGIN_IN + max(rows_in, BITS_ROW_IN * len(widths)),
        )
    )
    im = ax.imshow(index, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    shown = range(0, len(names), every)
    ax.set_yticks(list(shown), [names[i] for i in shown], fontsize=BITS_FONT_PT)
    if every > 1:
        ax.set_ylabel(f"layer (one name every {every} rows)", fontsize=BITS_FONT_PT)
    n_weights = len(alloc["weights"])
    if 0 < n_weights < len(rows):
        ax.axhline(n_weights - 0.5, color="black", lw=0.8)  # weights above, activations below
    ax.set_xlabel("channel group")
    bar = fig.colorbar(im, ax=ax, ticks=range(len(widths)), fraction=0.04, pad=0.02)
    bar.set_ticklabels([str(w) for w in widths])
    bar.set_label("bits")
    bar.ax.tick_params(labelsize=BITS_FONT_PT + 1, length=0)
    t = alloc.get("target_bits")
    ax.set_title(
        f"{alloc['model']} {alloc.get('solver', '')} " + (f"target {t}" if t is not None else "")
    )
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _matplotlib().close(fig)
    data = buf.getvalue()
    atomic_write_bytes(path, lambda f: f.write(data))


def collect_results(paths: list[Path]) -> list[dict[str, Any]]:
    """Rows of every ``results.jsonl`` found under ``paths`` (files or directories), sorted by
    model, target and method."""
    files: list[Path] = []
    for p in paths:
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(p.rglob("results.jsonl"))
    if not files:
        raise FileNotFoundError(f"no results.jsonl under {[str(p) for p in paths]}")
    rows = [r for f in files for r in read_results(f)]

    def key(r: dict[str, Any]) -> tuple:
        t = r.get("target_bits")
        return (str(r.get("model")), math.inf if t is None else t, str(r.get("method")))

    return sorted(rows, key=key)
