"""Plots that make patching results readable: labelled heatmaps in TransformerLens's habits.

Rows and columns carry names (`L{l}H{h}`, token strings), the colour scale is
centred on zero (red restores the clean behaviour, blue pushes the other way).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _labels(axis: str, size: int, tokens: Sequence[str] | None) -> list[str]:
    if axis in ("pos", "dest", "src") and tokens is not None and len(tokens) == size:
        return [f"{str(t)!r} ({i})" for i, t in enumerate(tokens)]
    prefix = {"layer": "L", "head": "H", "neuron": "N"}.get(axis, axis[:1])
    return [f"{prefix}{i}" for i in range(size)]


def as_2d(result: np.ndarray, axes: Sequence[str], tokens: Sequence[str] | None = None, layers=None):
    """`(matrix, row_labels, col_labels, note)`: a patching result of any supported shape as a heatmap."""
    result = np.asarray(result)
    axes = tuple(axes)
    layer_names = [f"L{l}" for l in (layers if layers is not None else range(result.shape[0]))]
    if len(axes) == 1:
        return result[:, None], layer_names, ["all"], ""
    if len(axes) == 2:
        return result, layer_names, _labels(axes[1], result.shape[1], tokens), ""
    if axes == ("layer", "pos", "head"):  # rows L{l}H{h}, columns positions
        L, T, H = result.shape
        rows = [f"{ln}H{h}" for ln in layer_names for h in range(H)]
        return result.transpose(0, 2, 1).reshape(L * H, T), rows, _labels("pos", T, tokens), ""
    if axes == ("layer", "head", "dest"):
        L, H, T = result.shape
        return result.reshape(L * H, T), [f"{ln}H{h}" for ln in layer_names for h in range(H)], _labels("dest", T, tokens), ""
    if axes == ("layer", "pos", "neuron"):
        L, T, M = result.shape
        rows = [f"{ln} {lab}" for ln in layer_names for lab in _labels("pos", T, tokens)]
        return result.reshape(L * T, M), rows, _labels("neuron", M, None), ""
    # anything else: sum over the trailing axes, per (layer, second axis)
    summed = result.reshape(result.shape[0], result.shape[1], -1).sum(-1)
    return summed, layer_names, _labels(axes[1], result.shape[1], tokens), f" (summed over {', '.join(axes[2:])})"


def heatmap(result, axes, *, tokens=None, title: str = "", path=None, layers=None):
    """Draw (and with `path`, save) a labelled heatmap of a patching result; returns the figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    mat, rows, cols, note = as_2d(result, axes, tokens, layers)
    lim = float(np.nanmax(np.abs(mat))) if np.isfinite(mat).any() else 1.0
    lim = lim or 1.0
    h = min(16.0, 2.0 + 0.2 * min(len(rows), 60))
    w = min(20.0, 3.5 + (0.5 * len(cols) if len(cols) < 40 else 12.0))
    fig, ax = plt.subplots(figsize=(w, h))
    im = ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    if len(cols) <= 80:
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=8)
    group = len(rows) // mat.shape[0] if len(rows) > 60 and len(axes) > 2 else 1
    if group > 1:  # many L{l}H{h} rows: label each layer's first row and rule the layers apart
        step = group * max(1, len(rows) // group // 30)
        ax.set_yticks(range(0, len(rows), step), rows[::step], fontsize=7)
        for y in range(group, len(rows), group):
            ax.axhline(y - 0.5, color="0.85", linewidth=0.4)
    elif len(rows) <= 60:
        ax.set_yticks(range(len(rows)), rows, fontsize=9)
    else:
        step = max(1, len(rows) // 30)
        ax.set_yticks(range(0, len(rows), step), rows[::step], fontsize=7)
    ax.set_xlabel(" / ".join(axes[1:]) or "")
    ax.set_ylabel("layer, head" if len(axes) > 2 and "head" in axes[1:] else "layer")
    ax.set_title((title or "patching result") + note, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="normalised metric (clean 1, corrupt 0)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig
