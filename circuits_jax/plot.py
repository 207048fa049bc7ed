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
    return _finish(fig, ax, im, (title or "patching result") + note, "normalised metric (clean 1, corrupt 0)", path)


def _finish(fig, ax, im, title: str, label: str, path):
    """Title, colour bar, layout; saved (and closed) when `path` is given."""
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label=label)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def edge_heatmap(edges, *, title: str = "", path=None):
    """Draw an `EdgeScores` as its `[sources, destinations]` matrix (normalised change, grey off the edge mask),
    rows and columns labelled at layer boundaries; returns the figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    g = edges.graph
    mat = np.where(g.mask, edges.normalised, np.nan)
    lim = float(np.nanmax(np.abs(mat))) if np.isfinite(mat).any() else 1.0
    fig, ax = plt.subplots(figsize=(14, 9))
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.9")
    im = ax.imshow(mat, cmap=cmap, vmin=-(lim or 1.0), vmax=lim or 1.0, aspect="auto", interpolation="nearest")

    def ticks(names):  # the first node of each layer (and input / logits)
        seen, out = set(), []
        for i, n in enumerate(names):
            key = n.split(".")[0].lstrip("am") if n not in ("input", "logits") else n
            if key not in seen:
                seen.add(key)
                out.append((i, n if n in ("input", "logits") else f"L{key}"))
        step = max(1, len(out) // 32)
        return out[::step] + ([out[-1]] if (len(out) - 1) % step else [])

    for setter, names in ((ax.set_yticks, g.sources), (ax.set_xticks, g.destinations)):
        t = ticks(names)
        setter([i for i, _ in t], [n for _, n in t], fontsize=7)
    ax.tick_params(axis="x", rotation=90)
    ax.set_ylabel("source (writes the residual stream)")
    ax.set_xlabel("destination (q / k / v input of a head, MLP input, logits)")
    return _finish(fig, ax, im, title or f"{edges.method} edge scores", "change in units of clean - corrupt", path)
