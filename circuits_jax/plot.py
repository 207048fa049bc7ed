"""Plots that make patching results readable: labelled heatmaps in TransformerLens's habits.

Rows and columns carry names (`L{l}H{h}`, token strings), the colour scale is
centred on zero (red restores the clean behaviour, blue pushes the other way).
"""

from __future__ import annotations

import re
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
    h = min(16.0, max(3.4, 2.0 + 0.2 * min(len(rows), 60)))  # room for the colour bar's label
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

    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label=label)
    fig.tight_layout()
    if path is not None:
        _write_figure(fig, path)
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


# ---------------------------------------------------------------------------
# Circuits as layered graphs: a matplotlib figure and a standalone HTML page
# ---------------------------------------------------------------------------
#
# Rows run bottom (input) to top (logits), one per layer with a node in the circuit; a head keeps its
# column in every row (h0, h1, ...; kv heads of grouped-query attention after them) and the MLP sits
# right of the heads, a little higher, since it reads what they wrote. A destination's q / k / v input
# is drawn at its head's node, the edge coloured by which input it feeds. Every edge points upward (a
# source comes before its destination), so no arrowheads are needed.

_KIND_COLOURS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#d62728", "mlp": "#737373"}
_KIND_NAMES = {"q": "q", "k": "k", "v": "v", "mlp": "mlp / logits"}
_NODE_RE = re.compile(r"a(\d+)\.(h|kv)(\d+)$|m(\d+)$")


def _node_of(destination: str) -> str:
    """The node a destination belongs to: `a3.h2<q>` -> `a3.h2`, `a3.kv1<k>` -> `a3.kv1`, `m3`, `logits`."""
    return destination.split("<", 1)[0]


def _kind_of(destination: str) -> str:
    """Which input an edge feeds: "q", "k", "v", or "mlp" (MLP inputs and the logits)."""
    return destination[-2] if destination.endswith(">") else "mlp"


def _circuit_layout(cfg, edges):
    """`(positions, rows, columns)` of the layered drawing of `edges` (`(source, destination, score)`):
    node -> `(x, y)`, and `(y, label)` / `(x, label)` for the axes. Only layers with a node get a row."""
    H, K = cfg.n_heads, cfg.kv_heads
    kv = K if K != H else 0
    names = {s for s, _, _ in edges} | {_node_of(d) for _, d, _ in edges} | {"input", "logits"}
    parsed = {n: _NODE_RE.match(n) for n in names}
    layers = sorted({int(m[1] or m[4]) for m in parsed.values() if m})
    row = {l: float(i + 1) for i, l in enumerate(layers)}
    mlp_x = H + kv - 0.7
    columns = [(float(h), f"h{h}") for h in range(H)] + [(float(H + j), f"kv{j}") for j in range(kv)]
    columns += [] if cfg.attn_only else [(mlp_x + 1.0, "mlp")]
    mid = (columns[0][0] + columns[-1][0]) / 2
    pos = {"input": (mid, 0.0), "logits": (mid, len(layers) + 1.0)}
    for n, m in parsed.items():
        if m and m[4] is not None:
            pos[n] = (mlp_x + 1.0, row[int(m[4])] + 0.4)
        elif m:
            pos[n] = (float(int(m[3]) + (H if m[2] == "kv" else 0)), row[int(m[1])])
    rows = [(0.0, "input")] + [(row[l], f"L{l}") for l in layers] + [(len(layers) + 1.0, "logits")]
    return pos, rows, columns


def _control(p0, p1, bend: float = 0.15, cap: float = 1.0):
    """The control point of a quadratic Bezier from `p0` to `p1`, moved sideways by `bend` of its length
    (at most `cap`), so edges that skip layers pass beside the nodes in between rather than through them."""
    (x0, y0), (x1, y1) = p0, p1
    length = float(np.hypot(x1 - x0, y1 - y0)) or 1.0
    k = np.sign(bend) * min(abs(bend), cap / length)
    return (x0 + x1) / 2 - k * (y1 - y0), (y0 + y1) / 2 + k * (x1 - x0)


def _strength(edges) -> np.ndarray:
    """Each edge's |score| over the largest finite one (1 where the score is NaN or infinite, or none is finite)."""
    a = np.abs(np.asarray([s for _, _, s in edges], np.float64))
    finite = np.isfinite(a)
    out = np.ones(len(a))
    top = a[finite].max() if finite.any() else 0.0
    if top > 0:
        out[finite] = a[finite] / top
    return out


def _shown(circuit, max_edges):
    """The kept edges to draw, largest |score| first, and the title suffix saying how many."""
    edges = circuit.edge_list()
    shown = edges if max_edges is None else edges[:max_edges]
    note = f"{len(edges)} edges" if len(shown) == len(edges) else f"top {len(shown)} of {len(edges)} edges"
    return shown, note


def circuit_graph(circuit, path=None, *, max_edges: int | None = None, title: str | None = None):
    """Draw a `Circuit` as a layered graph (input at the bottom, logits at the top), each kept edge a curve
    from its source to its destination's node, coloured by q / k / v / MLP input, wider for larger |score|,
    dashed when negative. `max_edges` keeps the largest. Saved (and closed) when `path` is given."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    edges, note = _shown(circuit, max_edges)
    pos, rows, columns = _circuit_layout(circuit.graph.cfg, edges)
    strength = _strength(edges)
    t = np.linspace(0.0, 1.0, 24)[:, None]
    curves, colours, widths, styles = [], [], [], []
    for i in np.argsort(strength, kind="stable"):  # strongest drawn last, on top
        s, d, score = edges[i]
        p0, p1 = np.asarray(pos[s]), np.asarray(pos[_node_of(d)])
        c = np.asarray(_control(pos[s], pos[_node_of(d)]))
        curves.append((1 - t) ** 2 * p0 + 2 * (1 - t) * t * c + t**2 * p1)
        colours.append(matplotlib.colors.to_rgba(_KIND_COLOURS[_kind_of(d)], 0.25 + 0.6 * strength[i]))
        widths.append(0.5 + 3.5 * strength[i])
        styles.append((0, (4, 2)) if score < 0 else "solid")

    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(columns) + 3.0), min(24.0, max(4.0, 0.42 * len(rows) + 1.5))))
    ax.add_collection(LineCollection(curves, colors=colours, linewidths=widths, linestyles=styles, zorder=1))
    for marker, pick in (("o", lambda n: ".h" in n), ("D", lambda n: ".kv" in n), ("s", lambda n: n[0] == "m")):
        xy = np.asarray([p for n, p in pos.items() if pick(n)]).reshape(-1, 2)
        ax.scatter(xy[:, 0], xy[:, 1], s=70, marker=marker, facecolor="white", edgecolor="0.2", linewidth=0.8, zorder=2)
    for n in ("input", "logits"):
        ax.text(*pos[n], n, ha="center", va="center", fontsize=8, zorder=3,
                bbox=dict(boxstyle="round,pad=0.3", facecolor="0.93", edgecolor="0.4"))  # fmt: skip
    ax.set_yticks([y for y, _ in rows], [lab for _, lab in rows], fontsize=7 if len(rows) > 20 else 9)
    ax.set_xticks([x for x, _ in columns], [lab for _, lab in columns], fontsize=8)
    ax.tick_params(length=0)
    ax.set_xlim(columns[0][0] - 0.8, columns[-1][0] + 0.8)
    ax.set_ylim(-0.6, rows[-1][0] + 0.6)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    handles = [Line2D([], [], color=c, linewidth=2, label=_KIND_NAMES[k]) for k, c in _KIND_COLOURS.items()]
    handles.append(Line2D([], [], color="0.2", linewidth=1.2, linestyle=(0, (4, 2)), label="negative score"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False,
              title="destination input", title_fontsize=8)  # fmt: skip
    ax.set_title(title or f"{circuit.method or 'circuit'}: {note}", fontsize=10)
    fig.tight_layout()
    if path is not None:
        _write_figure(fig, path)
    return fig


def _fmt(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.4g}"


_HTML_STYLE = """
body{font:13px system-ui,sans-serif;margin:16px;color:#222}
#wrap{display:flex;gap:16px;align-items:flex-start}
svg{border:1px solid #ddd;background:#fff;flex:none}
path.e{fill:none}
svg.focus path.e{opacity:.06}
svg.focus path.e.hi{opacity:1}
.n circle,.n rect{fill:#fff;stroke:#333;stroke-width:1}
.n.hi circle,.n.hi rect{fill:#ffd54f}
.n:hover{cursor:pointer}
.lab{font-size:10px;fill:#666}
#info{min-height:1.4em;font-family:monospace;margin:6px 0}
table{border-collapse:collapse;font-family:monospace}
td,th{padding:1px 8px;text-align:left;border-bottom:1px solid #eee}
tr.hi{background:#ffd54f}
.sw{display:inline-block;width:18px;height:3px;vertical-align:middle;margin:0 4px 0 10px}
"""

_HTML_SCRIPT = """
(function(){
const svg=document.getElementById('g'),info=document.getElementById('info');
const edges=Array.from(svg.querySelectorAll('path.e')),nodes=Array.from(svg.querySelectorAll('g.n'));
const rows=Array.from(document.querySelectorAll('#tab tbody tr'));
function clear(){svg.classList.remove('focus');
  document.querySelectorAll('.hi').forEach(function(x){x.classList.remove('hi');});info.textContent='';}
function focusEdge(i){svg.classList.add('focus');edges[i].classList.add('hi');rows[i].classList.add('hi');
  info.textContent=edges[i].dataset.name+'  score '+edges[i].dataset.label;}
nodes.forEach(function(n){
  n.addEventListener('mouseenter',function(){svg.classList.add('focus');n.classList.add('hi');
    edges.forEach(function(e,i){if(e.dataset.s===n.dataset.id||e.dataset.d===n.dataset.id){
      e.classList.add('hi');rows[i].classList.add('hi');}});
    info.textContent=n.dataset.info;});
  n.addEventListener('mouseleave',clear);});
edges.forEach(function(e,i){e.addEventListener('mouseenter',function(){focusEdge(i);});
  e.addEventListener('mouseleave',clear);});
rows.forEach(function(r,i){r.addEventListener('mouseenter',function(){focusEdge(i);});
  r.addEventListener('mouseleave',clear);});
const thr=document.getElementById('thr'),val=document.getElementById('thrval');
thr.addEventListener('input',function(){const t=parseFloat(thr.value);let n=0;val.textContent=t.toPrecision(3);
  edges.forEach(function(e,i){const a=Math.abs(parseFloat(e.dataset.score));const on=isNaN(a)||a>=t;
    e.style.display=on?'':'none';rows[i].style.display=on?'':'none';n+=on?1:0;});
  document.getElementById('count').textContent=n;});
})();
"""


def _node_info(name: str, edges) -> str:
    """Hover text of a node: its name, the summed score of its outgoing and incoming kept edges."""
    out = [s for a, _, s in edges if a == name]
    inc = [s for _, d, s in edges if _node_of(d) == name]
    total = float(np.nansum(out + inc)) if out or inc else 0.0
    return (f"{name}  total score {_fmt(total)}  (out: {len(out)} edges, sum {_fmt(float(np.nansum(out)))}; "
            f"in: {len(inc)} edges, sum {_fmt(float(np.nansum(inc)))})")  # fmt: skip


def circuit_html(circuit, path, *, title: str | None = None):
    """Write a standalone interactive page of a `Circuit` (inline SVG and script, nothing fetched): the layered
    graph of `circuit_graph`; hover a node for its edges and total score, an edge for its name and score; a
    slider hides edges below a |score| threshold; a table lists the edges by |score|. Returns the path."""
    from html import escape
    from pathlib import Path

    edges = circuit.edge_list()
    pos, rows, columns = _circuit_layout(circuit.graph.cfg, edges)
    strength = _strength(edges)
    cw, rh, left, pad = 56.0, 44.0, 60.0, 30.0
    width = left + (columns[-1][0] - columns[0][0] + 1.6) * cw + pad
    height = (rows[-1][0] + 1.2) * rh + 2 * pad

    def xy(p):
        return left + (p[0] - columns[0][0] + 0.8) * cw, height - pad - (p[1] + 0.6) * rh

    svg = []
    for y, lab in rows:
        svg.append(f'<text class="lab" x="8" y="{xy((0, y))[1] + 4:.1f}">{escape(lab)}</text>')
    for x, lab in columns:
        x = xy((x, 0))[0]
        svg.append(f'<text class="lab" x="{x:.1f}" y="{height - 8:.1f}" text-anchor="middle">{escape(lab)}</text>')
    for i, (s, d, score) in enumerate(edges):
        p0, p1 = xy(pos[s]), xy(pos[_node_of(d)])
        c = _control(p0, p1, -0.15, cw)  # the y axis points down in SVG: bend the same way as the figure
        dash = ' stroke-dasharray="5 3"' if score < 0 else ""
        name = f"{s}->{d}"
        svg.append(
            f'<path class="e" d="M{p0[0]:.1f} {p0[1]:.1f} Q{c[0]:.1f} {c[1]:.1f} {p1[0]:.1f} {p1[1]:.1f}" '
            f'stroke="{_KIND_COLOURS[_kind_of(d)]}" stroke-width="{0.8 + 4.2 * strength[i]:.2f}" '
            f'stroke-opacity="{0.3 + 0.6 * strength[i]:.2f}"{dash} data-s="{escape(s)}" data-d="{escape(_node_of(d))}" '
            f'data-name="{escape(name)}" data-score="{score!r}" data-label="{_fmt(score)}">'
            f"<title>{escape(name)}  score {_fmt(score)}</title></path>"
        )  # fmt: skip
    for n, p in pos.items():
        x, y = xy(p)
        info = _node_info(n, edges)
        if n in ("input", "logits"):
            shape = f'<rect x="{x - 24:.1f}" y="{y - 10:.1f}" width="48" height="20" rx="5"/>'
            label = f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle" font-size="11">{n}</text>'
        elif n.startswith("m"):
            shape, label = f'<rect x="{x - 8:.1f}" y="{y - 8:.1f}" width="16" height="16"/>', ""
        else:
            shape, label = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="8"/>', ""
        svg.append(f'<g class="n" data-id="{escape(n)}" data-info="{escape(info)}"><title>{escape(info)}</title>'
                   f"{shape}{label}</g>")  # fmt: skip

    table = "".join(
        f"<tr><td>{i + 1}</td><td>{escape(s)}</td><td>{escape(d)}</td><td>{_kind_of(d)}</td><td>{_fmt(score)}</td></tr>"
        for i, (s, d, score) in enumerate(edges)
    )
    finite = np.abs([sc for _, _, sc in edges if np.isfinite(sc)])
    top = float(finite.max()) if finite.size else 0.0
    heading = escape(title or f"{circuit.method or 'circuit'}: {len(edges)} edges")
    cfg = circuit.graph.cfg
    model = f"{cfg.n_layers} layers, {cfg.n_heads} heads"
    model += "" if cfg.kv_heads == cfg.n_heads else f" ({cfg.kv_heads} kv heads)"
    model += ", attention only" if cfg.attn_only else ""
    step = top / 200 if top else 1
    legend = "".join(f'<span class="sw" style="background:{c}"></span>{_KIND_NAMES[k]}' for k, c in _KIND_COLOURS.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{heading}</title><style>{_HTML_STYLE}</style></head>
<body>
<h2>{heading}</h2>
<p>method {escape(circuit.method or "-")}, level {escape(circuit.level)}; model: {model}.
Destination input: {legend}; dashed: negative score.</p>
<p><label>hide edges with |score| below
<input id="thr" type="range" min="0" max="{top!r}" step="{step!r}" value="0"{"" if top else " disabled"}>
<span id="thrval">0</span></label>; <span id="count">{len(edges)}</span> edges shown</p>
<div id="info"></div>
<div id="wrap">
<svg id="g" width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.1f} {height:.1f}">
{chr(10).join(svg)}
</svg>
<table id="tab"><thead><tr><th>#</th><th>source</th><th>destination</th><th>input</th><th>score</th></tr></thead>
<tbody>{table}</tbody></table>
</div>
<script>{_HTML_SCRIPT}</script>
</body></html>
"""
    from .models import write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, page)


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _write_figure(fig, path, **kwargs) -> None:
    """Save `fig` to `path` whole (a temporary name with the same suffix, then renamed) and close it."""
    from .models import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, **kwargs)
    _pyplot().close(fig)


def _saved(fig, path):
    """Lay out `fig`, write it to `path` (then close it) if given, and return it."""
    fig.tight_layout()
    if path is not None:
        _write_figure(fig, path)
    return fig


def faithfulness_curves(curves: dict, path=None, *, title: str = "faithfulness", points: dict | None = None):
    """MIB faithfulness f(k) against the fraction of edges kept (log axis), one line per method.

    curves: `{label: faithfulness(...) result}`; points: `{label: (fraction, f)}` for single circuits
    (e.g. ACDC's at its threshold). The dotted lines mark the full model (1) and the empty circuit (0).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, r in curves.items():
        ax.plot(np.asarray(r["ks"]) * 100, r["f"], marker="o", ms=3,
                label=f"{label} (CPR {r['cpr']:.3f}, CMD {r['cmd']:.3f})")  # fmt: skip
    for label, (frac, f) in (points or {}).items():
        ax.plot([frac * 100], [f], marker="*", ms=12, ls="none", label=f"{label}: f = {f:.3f}")
    ax.set_xscale("log")
    ax.axhline(1, color="grey", ls=":", lw=1)
    ax.axhline(0, color="grey", ls=":", lw=1)
    ax.set_xlabel("edges kept (%)")
    ax.set_ylabel("f = (m(C) - m(∅)) / (m(M) - m(∅))")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _saved(fig, path)


def feature_density(density, path=None, *, title: str = "feature density", dense_threshold: float = 0.1):
    """Histogram of log10 latent density (fraction of tokens where each latent fires), with the
    dead latents counted in the legend and the dense threshold marked."""
    plt = _pyplot()
    from .dictionaries import density_histogram

    counts, edges, n_dead = density_histogram(density)
    d = np.ravel(density)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4878a8",
           label=f"{d.size - n_dead} live, {n_dead} dead, {int(np.sum(d > dense_threshold))} dense")  # fmt: skip
    ax.axvline(np.log10(dense_threshold), color="grey", ls=":", lw=1)
    ax.set_xlabel("log10 feature density")
    ax.set_ylabel("latents")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _saved(fig, path)


def steering_curves(coeffs, curves, perplexity=None, path=None, *, title: str = "steering sweep", ylabel: str = "probability",
                    ppl_label: str = "perplexity (neutral text)"):  # fmt: skip
    """Target and off-target measures against the steering coefficient (`curves`: name -> values,
    left axis) and perplexity (right axis, dashed black), as returned by `steering_sweep` /
    `perplexity_sweep`."""
    plt = _pyplot()
    c = np.asarray(coeffs, float)
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for name, vals in curves.items():
        ax.plot(c, np.asarray(vals, float), marker="o", ms=4, label=str(name))
    ax.set_xlabel("steering coefficient")
    ax.set_ylabel(ylabel)
    ax.axvline(0, color="grey", ls=":", lw=1)
    handles, labels = ax.get_legend_handles_labels()
    if perplexity is not None:
        ax2 = ax.twinx()
        (line,) = ax2.plot(c, np.asarray(perplexity, float), color="black", ls="--", marker="s", ms=3, label=ppl_label)
        ax2.set_ylabel(ppl_label)
        ax2.set_yscale("log")
        handles, labels = handles + [line], labels + [ppl_label]
    ax.legend(handles, labels, fontsize=7, loc="best")
    ax.set_title(title)
    return _saved(fig, path)


_TRACE_CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
_TRACE_NAMES = {"resid": "single restored layer (hook_resid_post)", "mlp": "restored MLP outputs", "attn": "restored attention outputs"}


def causal_trace(result, path=None, *, tokens=None, title: str | None = None, ax=None):
    """One causal-tracing heatmap (Meng et al.'s layout): layers on x, prompt tokens on y, colour
    p(answer) after restoring that (layer, token), from the corrupted run's value up. Subject tokens
    carry a "*". result: a `CausalTrace`; tokens: the prompt's token strings (default: the ids)."""
    plt = _pyplot()
    scores = np.asarray(result.scores)  # [L, T]
    L, T = scores.shape
    names = list(tokens) if tokens is not None else [str(int(i)) for i in np.ravel(result.tokens)]
    if len(names) != T:
        raise ValueError(f"{len(names)} token labels for a trace over {T} tokens")
    start, stop = result.subject_span
    labels = [f"{t!r}*" if start <= i < stop else repr(t) for i, t in enumerate(names)]
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(min(14.0, 2.5 + 0.18 * L), 1.2 + 0.32 * T))
    im = ax.pcolormesh(scores.T, cmap=_TRACE_CMAPS.get(result.kind, "viridis"), vmin=min(result.corrupt, float(scores.min())),
                       vmax=max(result.clean, float(scores.max())))  # fmt: skip
    ax.invert_yaxis()
    ax.set_yticks(np.arange(T) + 0.5)
    ax.set_yticklabels(labels, fontsize=8)
    step = max(1, L // 10)
    ax.set_xticks(np.arange(0, L, step) + 0.5)
    ax.set_xticklabels([str(l) for l in range(0, L, step)], fontsize=8)
    window = "" if result.kind == "resid" else f", window {result.window}"
    ax.set_xlabel(f"layer (centre of the restored window{window})" if result.kind != "resid" else "layer")
    ax.set_title(title or f"{_TRACE_NAMES.get(result.kind, result.kind)}", fontsize=9)
    cb = ax.figure.colorbar(im, ax=ax)
    cb.ax.set_title("p", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return _saved(fig, path) if fig is not None else ax.figure


def causal_traces(results, path=None, *, tokens=None, title: str | None = None):
    """Several causal traces side by side (Meng et al.'s figure 1: hidden states, MLP, attention).
    results: `{kind: CausalTrace}` or a list of them; the suptitle reports the clean and corrupted
    probabilities of the first."""
    plt = _pyplot()
    items = list(results.values()) if isinstance(results, dict) else list(results)
    if not items:
        raise ValueError("no causal traces to draw")
    L, T = items[0].scores.shape
    fig, axes = plt.subplots(1, len(items), figsize=(min(7.0, 2.5 + 0.15 * L) * len(items), 1.6 + 0.32 * T), squeeze=False)
    for ax, r in zip(axes[0], items):
        causal_trace(r, tokens=tokens, ax=ax)
    r0 = items[0]
    head = f"{title}\n" if title else ""
    fig.suptitle(f"{head}p(answer): clean {r0.clean:.3f}, subject noised {r0.corrupt:.3f} ({r0.samples} draws, noise std {r0.noise:.3g})",
                 fontsize=10)  # fmt: skip
    return _saved(fig, path)


def concept_probe_layers(layers, curves: dict, path=None, *, title: str = "held-out accuracy by layer"):
    """Held-out accuracy of concept probes against the layer, one line per method (`{label: [L] accuracies}`);
    `layers` are the x tick labels (e.g. "embed", "0", ...). The dotted line marks chance (0.5)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.0, 3.8))
    x = np.arange(len(layers))
    for label, acc in curves.items():
        ax.plot(x, acc, marker="o", ms=3, label=label)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_xticks(x[::2], [str(l) for l in layers][::2], fontsize=7)
    ax.set_xlabel("layer (resid_post)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0.3, 1.03)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _saved(fig, path)


def concept_pca(projected, labels, explained, path=None, *, class_names=("0", "1"), title: str = "PCA"):
    """Scatter of the first two principal components `projected [N, 2]` coloured by the 0/1 `labels`,
    with each component's explained variance ratio in its axis label."""
    plt = _pyplot()
    projected, labels = np.asarray(projected), np.asarray(labels)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    for c, colour in ((0, "#c44e52"), (1, "#4c72b0")):
        sel = labels == c
        ax.scatter(projected[sel, 0], projected[sel, 1], s=16, color=colour, label=class_names[c], alpha=0.8)
    ax.set_xlabel(f"PC1 ({100 * float(explained[0]):.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * float(explained[1]):.1f}% of variance)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _saved(fig, path)


def das_layers(result: dict, path=None, *, title: str = "DAS: interchange-intervention accuracy by layer"):
    """IIA per layer from a DAS result dict (`DASResult.to_json()` plus optional `*_changed` keys):
    trained DAS, a random rotation with the same k and the full vector (activation patching)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if "iia_changed" in result else 1, figsize=(10 if "iia_changed" in result else 5.5, 3.6),
                             squeeze=False)  # fmt: skip
    panels = [("", "all held-out pairs")] + ([("_changed", "pairs whose answer changes")] if "iia_changed" in result else [])
    for ax, (suffix, name) in zip(axes[0], panels):
        for key, label, style in (("iia", f"DAS ({result.get('method', '')}, k={result.get('k', '')})", "o-"),
                                  ("iia_random", "random rotation, same k", "s--"),
                                  ("iia_full", "full vector (k = D)", "^:")):  # fmt: skip
            ax.plot(result["layers"], result[key + suffix], style, label=label)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("layer")
        ax.set_ylabel("IIA")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _saved(fig, path)


def attention_patterns(patterns, heads, path=None, *, tokens=None, title: str = "attention patterns", query: int | None = None):
    """Attention patterns of chosen heads: one panel each (query rows × key columns, token labels),
    or with `query`, one bar chart row per head of where that query position attends.

    patterns: `[n_heads, T, T]` (one prompt, or a mean over prompts); heads: labels such as `"L9H6"`.
    """
    plt = _pyplot()
    patterns = np.asarray(patterns)
    n, T = len(heads), patterns.shape[-1]
    labels = [f"{t!r}" for t in tokens] if tokens is not None and len(tokens) == T else [str(i) for i in range(T)]
    if query is not None:
        fig, axes = plt.subplots(n, 1, figsize=(max(6.0, 0.45 * T), 1.6 * n + 0.8), squeeze=False, sharex=True)
        for i, (ax, name) in enumerate(zip(axes[:, 0], heads)):
            ax.bar(range(T), patterns[i, query], color="tab:red")
            ax.set_ylim(0, 1)
            ax.set_ylabel(f"{name}\nattention", fontsize=8)
        axes[-1, 0].set_xticks(range(T), labels, rotation=90, fontsize=8)
        axes[-1, 0].set_xlabel(f"key position (query: {labels[query]})")
        fig.suptitle(title, fontsize=10)
        return _saved(fig, path)
    cols = min(n, 3)
    rows = -(-n // cols)
    side = min(5.0, 1.2 + 0.28 * T)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 0.6, side * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        im = ax.imshow(patterns[i], cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(heads[i], fontsize=9)
        ax.set_xticks(range(T), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(T), labels, fontsize=6)
        ax.set_xlabel("key (source) position", fontsize=7)
        ax.set_ylabel("query (destination) position", fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02, label="attention probability")
    fig.suptitle(title, fontsize=10)
    if path is not None:
        _write_figure(fig, path, bbox_inches="tight")
    return fig


def agreement(x, y, path=None, *, labels=None, xlabel: str = "exact", ylabel: str = "estimate", title: str = "",
              annotate: int = 5):  # fmt: skip
    """Scatter of an estimate against the exact values (e.g. AtP vs activation patching), with the
    diagonal, Pearson r and the `annotate` largest points labelled."""
    plt = _pyplot()
    x, y = np.ravel(np.asarray(x, np.float64)), np.ravel(np.asarray(y, np.float64))
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.scatter(x, y, s=10, alpha=0.6)
    ok = np.isfinite(x) & np.isfinite(y)
    lo, hi = float(min(x[ok].min(), y[ok].min())), float(max(x[ok].max(), y[ok].max()))
    ax.plot([lo, hi], [lo, hi], color="grey", ls=":", lw=1)
    r = float(np.corrcoef(x[ok], y[ok])[0, 1]) if ok.sum() > 1 else float("nan")
    if labels is not None:
        labels = list(np.ravel(np.asarray(labels)))
        for i in np.argsort(-np.abs(x))[:annotate]:
            ax.annotate(str(labels[i]), (x[i], y[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} (Pearson r = {r:.3f})" if title else f"Pearson r = {r:.3f}", fontsize=10)
    return _saved(fig, path)


def matrix(values, rows, cols, path=None, *, xlabel: str, ylabel: str, title: str = "", colorbar: str = "value",
           centred: bool = True, diagonal=False, tick_every: int = 1):  # fmt: skip
    """A labelled heatmap of any `[len(rows), len(cols)]` matrix: a diverging scale centred on zero
    (`centred`, for effects) or a sequential one from 0 (probabilities, scores). `diagonal`: True
    draws row i = column i, a sequence draws a line through column `diagonal[i]` at each row i
    (e.g. start year against predicted year); `tick_every` labels every k-th row/column."""
    plt = _pyplot()
    mat = np.asarray(values, np.float64)
    if mat.shape != (len(rows), len(cols)):
        raise ValueError(f"matrix of shape {mat.shape} but {len(rows)} row and {len(cols)} column labels")
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.5, 3.0 + 0.45 * min(len(cols), 24))), min(14.0, max(3.4, 1.8 + 0.4 * min(len(rows), 24)))))
    if centred:
        lim = float(np.nanmax(np.abs(mat))) if np.isfinite(mat).any() else 1.0
        im = ax.imshow(mat, cmap="RdBu_r", vmin=-(lim or 1.0), vmax=lim or 1.0, aspect="auto", interpolation="nearest")
    else:
        im = ax.imshow(mat, cmap="viridis", vmin=0, aspect="auto", interpolation="nearest")
    k = max(1, int(tick_every))
    ax.set_xticks(range(0, len(cols), k), [str(c) for c in cols][::k], rotation=90, fontsize=8)
    ax.set_yticks(range(0, len(rows), k), [str(r) for r in rows][::k], fontsize=8)
    if diagonal is True:
        n = min(len(rows), len(cols))
        ax.plot([-0.5, n - 0.5], [-0.5, n - 0.5], color="white", lw=0.8, ls=":")
    elif diagonal is not False and diagonal is not None:  # a column position per row
        ax.plot(np.asarray(diagonal, np.float64), np.arange(len(rows)), color="white", lw=0.8, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label=colorbar)
    return _saved(fig, path)


def attribution_graph(g, pruned=None, path=None, *, max_nodes: int = 80, per_cell: int = 3, max_edges: int = 150,
                      label: int = 12, title: str | None = None):  # fmt: skip
    """A pruned attribution graph (`cj.attribution_graph` + `cj.prune_graph`) drawn on a grid:
    x = token position, y = layer (input tokens at the bottom, output logits at the top).

    Shows the kept feature/error nodes with the most influence on the logits (at most `per_cell`
    per (layer, position) cell and `max_nodes` in all; features as dots sized by influence, errors
    as grey squares), every token and logit node, and
    the `max_edges` strongest kept edges among them (blue excites, red inhibits; width ~ |weight|).
    The `label` most influential features are named `L{layer}/{feature}`."""
    from .attribution_graphs import node_influence, prune

    plt = _pyplot()
    pruned = pruned if pruned is not None else prune(g)
    S, T, L = g.n_features, g.n_pos, g.n_layers
    inf = node_influence(g)
    keep = np.asarray(pruned.node_mask, bool)
    inner = np.flatnonzero(keep[: g.token_slice.start])  # kept features and errors
    inner = inner[np.argsort(-inf[inner], kind="stable")]
    cell_of = lambda i: (int(g.features[i][0]), int(g.features[i][1])) if i < S else divmod(int(i) - S, T)  # noqa: E731
    count: dict[tuple[int, int], int] = {}
    picked = []
    for i in inner.tolist():
        c = cell_of(i)
        if count.get(c, 0) < per_cell and len(picked) < max_nodes:
            count[c] = count.get(c, 0) + 1
            picked.append(i)
    inner = np.asarray(picked, int)
    tokens = np.arange(g.token_slice.start, g.token_slice.stop)
    logits = np.arange(g.logit_slice.start, g.logit_slice.stop)
    shown = np.concatenate([inner, tokens, logits])
    # positions: features and errors of one (layer, position) cell side by side
    xy = {}
    cells: dict[tuple[int, int], list[int]] = {}
    for i in inner.tolist():
        cells.setdefault(cell_of(i), []).append(i)
    for (l, p), members in cells.items():
        offs = np.linspace(-0.3, 0.3, len(members)) if len(members) > 1 else [0.0]
        for i, o in zip(sorted(members), offs):
            xy[i] = (p + float(o), l + 1)
    for p, i in enumerate(tokens.tolist()):
        xy[i] = (p, 0)
    K = len(logits)
    for k, i in enumerate(logits.tolist()):
        xy[i] = (T - 1 + (k - (K - 1) / 2) * min(0.3, 1.2 / max(K, 1)), L + 2)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.25 * T + 2), 9.0))
    # edges
    sub = np.ix_(shown, shown)
    A = np.where(pruned.edge_mask[sub], g.adjacency[sub], 0.0)
    tgt, src = np.nonzero(A)
    w = A[tgt, src]
    order = np.argsort(-np.abs(w))[:max_edges]
    wmax = float(np.abs(w[order]).max()) if len(order) else 1.0
    for j in order[::-1].tolist():
        (x0, y0), (x1, y1) = xy[shown[src[j]]], xy[shown[tgt[j]]]
        a = abs(float(w[j])) / wmax
        ax.plot([x0, x1], [y0, y1], color="tab:blue" if w[j] > 0 else "tab:red", lw=0.4 + 2.6 * a, alpha=0.15 + 0.6 * a, zorder=1)
    # nodes
    feats = [i for i in inner.tolist() if i < S]
    errs = [i for i in inner.tolist() if i >= S]
    size = lambda ids: 20 + 380 * inf[ids] / max(float(inf[inner].max()) if len(inner) else 1.0, 1e-12)  # noqa: E731
    if feats:
        ax.scatter([xy[i][0] for i in feats], [xy[i][1] for i in feats], s=size(feats), c="tab:orange", edgecolors="black",
                   linewidths=0.5, zorder=3, label="transcoder feature (size ~ influence)")  # fmt: skip
    if errs:
        ax.scatter([xy[i][0] for i in errs], [xy[i][1] for i in errs], s=size(errs), c="lightgrey", marker="s", edgecolors="grey",
                   linewidths=0.5, zorder=3, label="error node (MLP output the transcoder misses)")  # fmt: skip
    ax.scatter([xy[i][0] for i in tokens], [0] * T, s=60, c="tab:green", marker="^", zorder=3, label="input token")
    ax.scatter([xy[i][0] for i in logits], [L + 2] * K, s=30 + 300 * np.asarray(g.logit_probs, float), c="tab:purple",
               marker="D", zorder=3, label="output logit (size ~ probability)")  # fmt: skip
    named: set[tuple[int, int]] = set()
    for i in feats:
        l, p, f = g.features[i].tolist()
        if len(named) < label and (l, p) not in named:  # the strongest feature of each cell, `label` cells
            named.add((l, p))
            ax.annotate(f"L{l}/{f}", xy[i], fontsize=6, xytext=(4, 4), textcoords="offset points", zorder=4)
    for k, i in enumerate(logits.tolist()[:3]):
        ax.annotate(f"{g.logit_strs[k]!r} {float(g.logit_probs[k]):.2f}", xy[i], fontsize=7, xytext=(0, 7 + 9 * k),
                    textcoords="offset points", ha="center", zorder=4)  # fmt: skip
    ax.set_xticks(range(T))
    ax.set_xticklabels([repr(s)[1:-1] for s in g.token_strs], rotation=45, ha="right", fontsize=8)
    ticks = [0] + list(range(1, L + 1, 2 if L > 12 else 1)) + [L + 2]
    ax.set_yticks(ticks)
    ax.set_yticklabels(["tokens"] + [f"L{t - 1}" for t in ticks[1:-1]] + ["logits"], fontsize=8)
    ax.set_xlim(-0.7, T - 0.3)
    ax.set_ylim(-1, L + 3.5)
    ax.set_xlabel("token position")
    ax.set_ylabel("layer (transcoder features and errors at their layer's MLP)")
    ax.grid(axis="y", color="#eee", lw=0.5, zorder=0)
    ax.legend(fontsize=7, loc="upper left", framealpha=0.9)
    n_kept = int(keep[:S].sum())
    ax.set_title(title or f"attribution graph: {g.prompt!r}\n{len(feats)} of {n_kept} kept features, {len(errs)} error nodes, "
                 f"top {len(order)} kept edges", fontsize=10)  # fmt: skip
    return _saved(fig, path)
