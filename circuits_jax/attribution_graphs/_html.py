"""A standalone interactive HTML viewer for attribution graphs (circuit-tracer / Neuronpedia JSON).

`graph_html(graph, features)` returns one HTML document that needs nothing else: inline CSS, inline
vanilla JS and an SVG the script draws, with the graph (and the features' top-activating contexts)
embedded as JSON in ``<script type="application/json" id="graph-data">``. Nothing is fetched, so the
page can be opened from disk, attached to a report or archived next to the graph it shows.

The page lays nodes out by token position (x, the prompt's tokens along the bottom) and layer (y:
embeddings at the bottom, logits on top), draws every link once (width ~ |weight|, blue positive,
red negative, with a |weight| slider), and on a click opens ``#node-panel`` with the node's details,
its strongest inputs and outputs and, for transcoder features, their top contexts. Supernodes
(``qParams.supernodes``) are drawn as labelled boxes; new ones are made by shift-clicking nodes,
naming them and pressing "group", and "download JSON" exports the graph with them.
"""

from __future__ import annotations

import json
import math
from html import escape
from typing import Any


def _jsonable(x: Any) -> Any:
    """Plain JSON values: numpy scalars / arrays as Python ones, non-finite floats as None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def graph_html(graph: dict, features: dict | None = None, *, title: str = "") -> str:
    """Return a self-contained HTML page viewing `graph` (circuit-tracer / Neuronpedia graph JSON).

    `features` optionally maps ``"{layer}_{feature}"`` to ``{"density", "top": [{"tokens", "acts"}, ...],
    "label"?}``: the transcoder feature's top-activating contexts, shown in the node panel.
    """
    data = json.dumps({"graph": _jsonable(graph), "features": _jsonable(features)}, ensure_ascii=False)
    data = data.replace("</", "<\\/").replace("<!--", "\\u003c!--")  # cannot end or confuse the script element
    meta = graph.get("metadata") or {}
    heading = escape(title or str(meta.get("slug") or "") or "Attribution graph")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{heading}</title><style>{_CSS}</style></head>\n<body>{_BODY.replace('@TITLE@', heading)}"
        f'<script type="application/json" id="graph-data">{data}</script>\n<script>{_JS}</script>\n</body></html>\n'
    )


_CSS = r"""
*{box-sizing:border-box}
html,body{margin:0;height:100%}
body{font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;background:#f6f7f9;
 display:flex;flex-direction:column}
header{padding:8px 14px;background:#fff;border-bottom:1px solid #d8dce1}
header h1{font-size:17px;margin:0 0 2px}
#prompt{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;white-space:pre-wrap;max-height:3.2em;overflow:auto;
 color:#333}
#meta{color:#57606a;font-size:12px}
#meta b{color:#1f2328;font-weight:600}
main{flex:1;display:flex;min-height:0}
#sidebar{width:230px;flex:none;padding:10px 12px;background:#fff;border-right:1px solid #d8dce1;overflow:auto}
#sidebar h3,#node-panel h3{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#57606a;margin:14px 0 4px}
#sidebar h3:first-child{margin-top:0}
#sidebar input[type=range]{width:100%}
#sidebar input[type=text]{width:100%;padding:3px 5px;margin:4px 0;border:1px solid #c4c9d0;border-radius:4px}
button{font:inherit;padding:2px 8px;border:1px solid #c4c9d0;border-radius:4px;background:#f3f4f6;cursor:pointer}
button:hover{background:#e7e9ec}
.hint{color:#6e7781;font-size:11px}
#picked{font-size:11px;color:#444;word-break:break-all}
#supernode-list{list-style:none;margin:0;padding:0}
#supernode-list li{display:flex;align-items:center;gap:5px;padding:2px 0}
#supernode-list .sw{width:11px;height:11px;border-radius:2px;flex:none}
#supernode-list .nm{flex:1;cursor:pointer;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
#supernode-list .nm:hover{text-decoration:underline}
#supernode-list button{padding:0 5px;font-size:11px}
.legend div{display:flex;align-items:center;gap:6px;font-size:12px}
#graph-wrap{flex:1;overflow:auto;position:relative;background:#fff}
#graph{display:block}
#node-panel{display:none;width:380px;flex:none;padding:10px 14px;background:#fff;border-left:1px solid #d8dce1;
 overflow:auto}
#node-panel.open{display:block}
#node-panel h2{font-size:15px;margin:0 24px 2px 0;word-break:break-word}
#node-panel .close{float:right}
.nid{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;color:#57606a}
#node-panel table{border-collapse:collapse;margin-top:6px}
#node-panel td{padding:1px 10px 1px 0;vertical-align:top}
#node-panel td:first-child{color:#57606a}
.links{list-style:none;margin:0;padding:0}
.links li{display:flex;gap:8px;padding:2px 3px;cursor:pointer;border-radius:3px;align-items:baseline}
.links li:hover{background:#eef2f8}
.links .w{font-family:ui-monospace,monospace;width:58px;flex:none;text-align:right}
.links .lb{flex:1;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.links .nid{flex:none}
.pos{color:#1d5fd0}.neg{color:#c9361b}
.ctx{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;padding:3px 0;border-bottom:1px solid #eee;
 line-height:1.7}
.ctx span{white-space:pre;border-radius:2px}
#tooltip{position:fixed;pointer-events:none;display:none;background:rgba(25,28,33,.93);color:#fff;padding:6px 8px;
 border-radius:5px;font-size:12px;max-width:360px;z-index:10}
#tooltip .nid{color:#c6ccd4}
svg text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
.rowlab{font-size:11px;fill:#57606a}
.toklab{font-size:12px;fill:#1f2328;font-family:ui-monospace,SFMono-Regular,Menlo,monospace}
.poslab{font-size:9px;fill:#8c959f}
.logitlab{font-size:10.5px;fill:#4b2a9a;pointer-events:none}
.edge{stroke-opacity:.5;stroke-linecap:round;pointer-events:none}
.edge.off{display:none}
.node{cursor:pointer;stroke-width:1.2}
.node:hover{stroke:#000;stroke-width:2}
.k-feature{fill:#fbd9a5;stroke:#b26b00}
.k-error{fill:#c9c9c9;stroke:#6b6b6b}
.k-embedding{fill:#b9e3c6;stroke:#2d6a4f}
.k-logit{fill:#ddd0f7;stroke:#6b46c1}
.k-logit.target{fill:#a98bf0;stroke:#3f1d96;stroke-width:2}
svg.focus .edge{stroke-opacity:.05}
svg.focus .edge.hl{stroke-opacity:.9}
svg.focus .node{opacity:.3}
svg.focus .node.hl,svg.focus .node.sel{opacity:1}
.node.sel{stroke:#000;stroke-width:2.6}
.node.picked{stroke:#d6008f;stroke-width:2.6;stroke-dasharray:3 2;opacity:1}
.sn-box{fill-opacity:.1;stroke-opacity:.85;stroke-width:1.5;pointer-events:none}
.sn-label{font-size:11px;font-weight:600;pointer-events:none;paint-order:stroke;stroke:#fff;stroke-width:3px}
"""

_BODY = r"""
<header><h1>@TITLE@</h1><div id="prompt"></div><div id="meta"></div></header>
<main>
<aside id="sidebar">
 <h3>Links</h3>
 <input type="range" id="weight-threshold" min="0" max="1000" value="0">
 <div id="threshold-label" class="hint"></div>
 <h3>Zoom</h3>
 <input type="range" id="zoom" min="40" max="250" value="100">
 <h3>Supernodes</h3>
 <label class="hint"><input type="checkbox" id="select-mode"> select mode (a click adds to the group)</label>
 <div class="hint">or shift-click nodes to select them</div>
 <div id="picked"></div>
 <input type="text" id="supernode-name" placeholder="supernode name">
 <button id="make-supernode">group</button> <button id="clear-picked">clear</button>
 <ul id="supernode-list"></ul>
 <p><button id="download-json">download JSON</button></p>
 <h3>Legend</h3>
 <div class="legend">
  <div><svg width="16" height="14"><circle cx="8" cy="7" r="5.5" class="k-feature"/></svg>transcoder feature</div>
  <div><svg width="16" height="14"><rect x="2.5" y="1.5" width="11" height="11" class="k-error"/></svg>error node</div>
  <div><svg width="16" height="14"><rect x="1" y="2" width="14" height="10" rx="3" class="k-embedding"/></svg>embedding</div>
  <div><svg width="16" height="14"><path d="M8 0L15 7L8 14L1 7Z" class="k-logit"/></svg>logit (dark: target)</div>
  <div><svg width="16" height="14"><line x1="1" y1="7" x2="15" y2="7" stroke="#1d5fd0" stroke-width="3"/></svg>positive link</div>
  <div><svg width="16" height="14"><line x1="1" y1="7" x2="15" y2="7" stroke="#d8452a" stroke-width="3"/></svg>negative link</div>
 </div>
 <p class="hint">Click a node for details; Esc or a click on the background clears.</p>
</aside>
<div id="graph-wrap"><svg id="graph" xmlns="http://www.w3.org/2000/svg"></svg></div>
<aside id="node-panel"></aside>
</main>
<div id="tooltip"></div>
"""

_JS = r"""
(function () {
"use strict";
const DATA = JSON.parse(document.getElementById("graph-data").textContent);
const G = DATA.graph || {}, FEAT = DATA.features || {};
const META = G.metadata || {}, QP = G.qParams || {};
const NODES = G.nodes || [], LINKS = G.links || [];
const TOKENS = META.prompt_tokens || [];
const NS = "http://www.w3.org/2000/svg";
const POS_C = "#1d5fd0", NEG_C = "#d8452a";
const PALETTE = ["#0b7a75", "#7b3fc4", "#c2410c", "#2563eb", "#a16207", "#be185d", "#15803d", "#475569"];
const $ = (id) => document.getElementById(id);

function svgEl(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}
function h(tag, props, ...kids) {
  const e = document.createElement(tag);
  for (const k in (props || {})) {
    if (k === "class") e.className = props[k];
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), props[k]);
    else e.setAttribute(k, props[k]);
  }
  for (const c of kids) if (c != null) e.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
  return e;
}
function fmt(x) {
  if (x === null || x === undefined || x === "") return "–";
  if (typeof x !== "number") return String(x);
  if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e5)) return x.toExponential(2);
  return String(Number(x.toPrecision(4)));
}
function showTok(t) { return String(t == null ? "" : t).replace(/\n/g, "↵").replace(/\t/g, "⇥"); }
function quoted(t) { return JSON.stringify(String(t == null ? "" : t)); }
function kindOf(n) {
  const t = String(n.feature_type || "");
  if (t === "embedding" || n.layer === "E") return "embedding";
  if (t === "logit") return "logit";
  if (t.indexOf("error") >= 0) return "error";
  return "feature";
}
function fkey(n) { return n.layer + "_" + n.feature; }

// ---------- nodes, links ----------
const byId = Object.create(null);
let maxLayer = -1, nPos = TOKENS.length;
for (const n of NODES) {
  const N = { n: n, id: String(n.node_id), kind: kindOf(n), ins: [], outs: [] };
  byId[N.id] = N;
  if ((N.kind === "feature" || N.kind === "error") && isFinite(+n.layer)) maxLayer = Math.max(maxLayer, +n.layer);
  nPos = Math.max(nPos, (+n.ctx_idx || 0) + 1);
}
const nRows = maxLayer + 3;
function rowOf(N) {
  if (N.kind === "embedding") return 0;
  if (N.kind === "logit") return nRows - 1;
  return Math.min(Math.max((+N.n.layer || 0) + 1, 1), nRows - 2);
}
const edges = [];
let maxAbs = 0;
for (const l of LINKS) {
  const s = byId[String(l.source)], t = byId[String(l.target)], w = +l.weight || 0;
  if (!s || !t) continue;
  const e = { s: s, t: t, w: w };
  edges.push(e); s.outs.push(e); t.ins.push(e);
  maxAbs = Math.max(maxAbs, Math.abs(w));
}
function label(N) {
  const n = N.n;
  if (n.clerp) return String(n.clerp);
  const f = FEAT[fkey(n)];
  if (N.kind === "feature" && f && f.label) return String(f.label);
  if (N.kind === "embedding") return "Emb " + quoted(TOKENS[n.ctx_idx]);
  if (N.kind === "error") return "Error L" + n.layer + " @" + n.ctx_idx;
  if (N.kind === "logit") return "Logit " + n.feature;
  return "L" + n.layer + " #" + n.feature;
}

// ---------- layout ----------
const R = 6, SP = 17, MINCOL = 78, PERLINE = 14;
const cells = Object.create(null);
for (const id in byId) {
  const N = byId[id], key = rowOf(N) + "|" + (+N.n.ctx_idx || 0);
  (cells[key] = cells[key] || []).push(N);
}
const colCount = new Array(nPos).fill(1);
for (const key in cells) {
  const p = +key.split("|")[1];
  colCount[p] = Math.max(colCount[p], Math.min(cells[key].length, PERLINE));
}
const colW = colCount.map((c) => Math.max(MINCOL, c * SP + 22));
const LEFT = 58, RIGHT = 130, TOP = 80, BOTTOM = 110;
const RH = Math.max(34, Math.min(66, Math.round(600 / nRows)));
const colX = []; let acc = LEFT;
for (let p = 0; p < nPos; p++) { colX.push(acc); acc += colW[p]; }
const W = acc + RIGHT, H = TOP + nRows * RH + BOTTOM;
const rowY = (r) => TOP + (nRows - 1 - r) * RH + RH / 2;
for (const key in cells) {
  const list = cells[key], [r, p] = key.split("|").map(Number);
  list.sort((a, b) => (a.kind === "error") - (b.kind === "error")
    || (a.kind === "logit" ? (+b.n.token_prob || 0) - (+a.n.token_prob || 0) : 0)
    || Math.abs(+b.n.activation || 0) - Math.abs(+a.n.activation || 0)
    || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  const per = Math.min(list.length, PERLINE), lines = Math.ceil(list.length / per);
  list.forEach((N, i) => {
    const li = Math.floor(i / per), inLine = li === lines - 1 ? list.length - li * per : per, j = i - li * per;
    N.x = colX[p] + colW[p] / 2 + (j - (inLine - 1) / 2) * SP;
    N.y = rowY(r) + (li - (lines - 1) / 2) * Math.min(SP, (RH - 8) / lines);
  });
}

// ---------- drawing (once) ----------
const svg = $("graph");
svg.setAttribute("viewBox", "0 0 " + W + " " + H);
const gGrid = svgEl("g", {}, svg), gSuper = svgEl("g", {}, svg), gEdges = svgEl("g", {}, svg),
  gNodes = svgEl("g", {}, svg), gLabels = svgEl("g", {}, svg), gSnLabels = svgEl("g", {}, svg);
for (let r = 0; r < nRows; r++) {
  const y = TOP + (nRows - 1 - r) * RH;
  svgEl("rect", { x: LEFT, y: y, width: W - LEFT - RIGHT, height: RH, fill: r % 2 ? "#f7f8fa" : "#fff" }, gGrid);
  const t = svgEl("text", { x: LEFT - 8, y: y + RH / 2 + 4, "text-anchor": "end", class: "rowlab" }, gGrid);
  t.textContent = r === 0 ? "Emb" : r === nRows - 1 ? "Logit" : "L" + (r - 1);
}
for (let p = 0; p <= nPos; p++) {
  const x = p < nPos ? colX[p] : W - RIGHT;
  svgEl("line", { x1: x, x2: x, y1: TOP, y2: TOP + nRows * RH, stroke: "#e3e6ea" }, gGrid);
}
const axisY = TOP + nRows * RH;
for (let p = 0; p < nPos; p++) {
  const cx = colX[p] + colW[p] / 2;
  const pl = svgEl("text", { x: cx, y: axisY + 11, "text-anchor": "middle", class: "poslab" }, gGrid);
  pl.textContent = p;
  const tl = svgEl("text", { transform: "translate(" + (cx + 4) + "," + (axisY + 24) + ") rotate(-35)",
    "text-anchor": "end", class: "toklab" }, gGrid);
  let s = showTok(TOKENS[p]);
  tl.textContent = s.length > 18 ? s.slice(0, 17) + "…" : s;
  svgEl("title", {}, tl).textContent = quoted(TOKENS[p]);
}
edges.sort((a, b) => Math.abs(a.w) - Math.abs(b.w));
const frag = document.createDocumentFragment();
for (const e of edges) {
  e.el = svgEl("line", { x1: e.s.x.toFixed(1), y1: e.s.y.toFixed(1), x2: e.t.x.toFixed(1), y2: e.t.y.toFixed(1),
    stroke: e.w >= 0 ? POS_C : NEG_C, "stroke-width": (0.35 + 4.2 * Math.abs(e.w) / (maxAbs || 1)).toFixed(2),
    class: "edge" }, frag);
}
gEdges.appendChild(frag);
for (const id in byId) {
  const N = byId[id], x = N.x, y = N.y;
  let el;
  if (N.kind === "feature") el = svgEl("circle", { cx: x, cy: y, r: R }, gNodes);
  else if (N.kind === "error") el = svgEl("rect", { x: x - 5.5, y: y - 5.5, width: 11, height: 11 }, gNodes);
  else if (N.kind === "embedding") el = svgEl("rect", { x: x - 7, y: y - 5, width: 14, height: 10, rx: 3 }, gNodes);
  else el = svgEl("path", { d: "M" + x + " " + (y - 8) + "L" + (x + 7) + " " + y + "L" + x + " " + (y + 8) + "L" + (x - 7) + " " + y + "Z" }, gNodes);
  el.setAttribute("class", "node k-" + N.kind + (N.n.is_target_logit ? " target" : ""));
  el.setAttribute("data-node-id", id);
  N.el = el;
  if (N.kind === "logit") {
    const t = svgEl("text", { transform: "translate(" + (x + 2) + "," + (y - 11) + ") rotate(-35)", class: "logitlab" }, gLabels);
    let s = showTok(label(N).replace(/^Output\s+/, ""));
    t.textContent = s.length > 26 ? s.slice(0, 25) + "…" : s;
  }
}

// ---------- header ----------
(function header() {
  if (META.prompt) $("prompt").textContent = META.prompt;
  const m = $("meta"), bits = [];
  const add = (k, v) => bits.push([k, v]);
  if (META.model) add("model", META.model);
  if (typeof META.replacement_score === "number") add("replacement", fmt(META.replacement_score));
  if (typeof META.completeness_score === "number") add("completeness", fmt(META.completeness_score));
  add("nodes", NODES.length); add("links", LINKS.length);
  if (typeof META.node_threshold === "number") add("node threshold", fmt(META.node_threshold));
  bits.forEach(([k, v], i) => m.append((i ? " · " : "") + k + " ", h("b", {}, v)));
})();

// ---------- link threshold, zoom ----------
const slider = $("weight-threshold");
const thrOf = (v) => maxAbs * Math.pow(v / 1000, 2);
function applyThreshold() {
  const t = thrOf(+slider.value);
  let shown = 0;
  for (const e of edges) { const off = Math.abs(e.w) < t; e.el.classList.toggle("off", off); if (!off) shown++; }
  $("threshold-label").textContent = "|weight| ≥ " + fmt(t) + " · " + shown + " / " + edges.length + " shown";
}
if (edges.length > 2500) {
  const sorted = edges.map((e) => Math.abs(e.w)).sort((a, b) => b - a);
  slider.value = Math.floor(1000 * Math.sqrt(sorted[2499] / maxAbs));
}
slider.addEventListener("input", applyThreshold);
applyThreshold();
function applyZoom() { const z = +$("zoom").value / 100; svg.setAttribute("width", W * z); svg.setAttribute("height", H * z); }
$("zoom").addEventListener("input", applyZoom);
(function fit() {  // small graphs start enlarged to fill the view; large ones at 100%, scrolled
  const wrap = $("graph-wrap"), z = Math.min(wrap.clientWidth / W, wrap.clientHeight / H);
  $("zoom").value = Math.round(100 * Math.max(1, Math.min(z, 1.8)));
})();
applyZoom();

// ---------- tooltip ----------
const tip = $("tooltip");
gNodes.addEventListener("mousemove", (ev) => {
  const t = ev.target.closest && ev.target.closest("[data-node-id]");
  if (!t) { tip.style.display = "none"; return; }
  const N = byId[t.getAttribute("data-node-id")], n = N.n;
  tip.textContent = "";
  tip.append(h("div", {}, h("b", {}, label(N))), h("div", { class: "nid" }, N.id),
    h("div", {}, N.kind + " · layer " + n.layer + " · pos " + n.ctx_idx + " " + quoted(TOKENS[n.ctx_idx])),
    h("div", {}, "activation " + fmt(n.activation) + " · influence " + fmt(n.influence)
      + (N.kind === "logit" ? " · p " + fmt(n.token_prob) : "")));
  tip.style.display = "block";
  const bw = tip.offsetWidth, bh = tip.offsetHeight;
  tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - bw - 6) + "px";
  tip.style.top = (ev.clientY + 14 + bh > window.innerHeight ? ev.clientY - bh - 10 : ev.clientY + 14) + "px";
});
gNodes.addEventListener("mouseleave", () => { tip.style.display = "none"; });

// ---------- highlight, panel ----------
let lit = [];
function clearHighlight() { for (const e of lit) e.classList.remove("hl", "sel"); lit = []; svg.classList.remove("focus"); }
function light(el, cls) { el.classList.add(cls); lit.push(el); }
const panel = $("node-panel");
function closePanel() { panel.classList.remove("open"); panel.textContent = ""; clearHighlight(); }
function linkList(list, other) {
  const ul = h("ul", { class: "links" });
  list.slice().sort((a, b) => Math.abs(b.w) - Math.abs(a.w)).slice(0, 10).forEach((e) => {
    const O = other(e);
    ul.appendChild(h("li", { title: label(O), onclick: () => select(O.id) },
      h("span", { class: "w " + (e.w >= 0 ? "pos" : "neg") }, (e.w >= 0 ? "+" : "") + fmt(e.w)),
      h("span", { class: "lb" }, label(O)), h("span", { class: "nid" }, O.id)));
  });
  if (!list.length) ul.appendChild(h("li", { class: "hint" }, "none"));
  return ul;
}
function contexts(f) {
  const box = h("div", {});
  const top = (f && f.top) || [];
  if (!top.length) { box.appendChild(h("p", { class: "hint" }, "no examples")); return box; }
  let amax = 0;
  for (const c of top) for (const a of (c.acts || [])) amax = Math.max(amax, +a || 0);
  for (const c of top.slice(0, 12)) {
    const row = h("div", { class: "ctx" }), acts = c.acts || [];
    (c.tokens || []).forEach((t, i) => {
      const a = +acts[i] || 0, s = h("span", { title: fmt(a) }, showTok(t));
      if (a > 0 && amax > 0) s.style.background = "rgba(234,88,12," + (0.06 + 0.8 * a / amax).toFixed(3) + ")";
      row.appendChild(s);
    });
    box.appendChild(row);
  }
  return box;
}
function openPanel(N) {
  const n = N.n, f = N.kind === "feature" ? FEAT[fkey(n)] : null;
  panel.textContent = "";
  const rows = [["type", n.feature_type || N.kind], ["layer", n.layer],
    ["position", n.ctx_idx + "  " + quoted(TOKENS[n.ctx_idx])],
    ["activation", fmt(n.activation)], ["influence", fmt(n.influence)]];
  if (N.kind === "feature") rows.push(["feature", n.feature]);
  if (N.kind === "logit") rows.push(["token prob", fmt(n.token_prob)], ["target", n.is_target_logit ? "yes" : "no"]);
  if (f && typeof f.density === "number") rows.push(["density", fmt(f.density)]);
  if (f && f.label && f.label !== n.clerp) rows.push(["label", f.label]);
  const table = h("table", {});
  for (const [k, v] of rows) table.appendChild(h("tr", {}, h("td", {}, k), h("td", {}, String(v))));
  panel.append(h("button", { class: "close", title: "close (Esc)", onclick: closePanel }, "×"),
    h("h2", {}, label(N)), h("div", { class: "nid" }, N.id), table,
    h("h3", {}, "Strongest inputs (" + N.ins.length + ")"), linkList(N.ins, (e) => e.s),
    h("h3", {}, "Strongest outputs (" + N.outs.length + ")"), linkList(N.outs, (e) => e.t));
  if (N.kind === "feature") panel.append(h("h3", {}, "Top activating contexts"), contexts(f));
  panel.classList.add("open");
  panel.scrollTop = 0;
}
function select(id) {
  const N = byId[id];
  if (!N) return;
  clearHighlight();
  svg.classList.add("focus");
  light(N.el, "sel");
  for (const e of N.ins) { light(e.el, "hl"); light(e.s.el, "hl"); }
  for (const e of N.outs) { light(e.el, "hl"); light(e.t.el, "hl"); }
  openPanel(N);
  const r = N.el.getBoundingClientRect(), v = $("graph-wrap").getBoundingClientRect();  // the panel may cover it
  if (r.left < v.left || r.right > v.right || r.top < v.top || r.bottom > v.bottom)
    N.el.scrollIntoView({ block: "center", inline: "center" });
}

// ---------- picking, supernodes ----------
const picked = [];
function renderPicked() {
  $("picked").textContent = picked.length ? picked.length + " selected: " + picked.join(", ") : "";
}
function togglePick(id) {
  const i = picked.indexOf(id);
  if (i >= 0) { picked.splice(i, 1); byId[id].el.classList.remove("picked"); }
  else { picked.push(id); byId[id].el.classList.add("picked"); }
  renderPicked();
}
function clearPicked() { for (const id of picked) byId[id].el.classList.remove("picked"); picked.length = 0; renderPicked(); }
let supernodes = (Array.isArray(QP.supernodes) ? QP.supernodes : []).filter(Array.isArray)
  .map((s) => [String(s[0])].concat(s.slice(1).map(String).filter((id) => byId[id])))
  .filter((s) => s.length > 1);
function drawSupernodes() {
  gSuper.textContent = "";
  gSnLabels.textContent = "";
  const list = $("supernode-list");
  list.textContent = "";
  supernodes.forEach((s, i) => {
    const c = PALETTE[i % PALETTE.length], ms = s.slice(1).map((id) => byId[id]);
    const x0 = Math.min(...ms.map((N) => N.x)) - 12, x1 = Math.max(...ms.map((N) => N.x)) + 12;
    const y0 = Math.min(...ms.map((N) => N.y)) - 12, y1 = Math.max(...ms.map((N) => N.y)) + 12;
    svgEl("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0, rx: 9, fill: c, stroke: c, class: "sn-box" }, gSuper);
    svgEl("text", { x: x0 + 3, y: y0 - 3, fill: c, class: "sn-label" }, gSnLabels).textContent = s[0];
    list.appendChild(h("li", {}, h("span", { class: "sw", style: "background:" + c }),
      h("span", { class: "nm", title: s.slice(1).join(", "), onclick: () => showGroup(s) }, s[0] + " (" + (s.length - 1) + ")"),
      h("button", { title: "delete", onclick: () => { supernodes.splice(i, 1); drawSupernodes(); } }, "×")));
  });
}
function showGroup(s) {
  clearHighlight();
  svg.classList.add("focus");
  const ids = new Set(s.slice(1));
  for (const id of ids) {
    const N = byId[id];
    light(N.el, "hl");
    for (const e of N.outs) if (ids.has(e.t.id)) light(e.el, "hl");
  }
}
$("make-supernode").addEventListener("click", () => {
  if (!picked.length) { $("picked").textContent = "select nodes first (shift-click)"; return; }
  const inp = $("supernode-name");
  const name = inp.value.trim() || "supernode " + (supernodes.length + 1);
  supernodes.push([name].concat(picked));
  inp.value = "";
  clearPicked();
  drawSupernodes();
});
$("supernode-name").addEventListener("keydown", (ev) => { if (ev.key === "Enter") $("make-supernode").click(); });
$("clear-picked").addEventListener("click", clearPicked);
$("download-json").addEventListener("click", () => {
  const out = JSON.parse(JSON.stringify(G));
  out.qParams = Object.assign({}, out.qParams || {}, { supernodes: supernodes.map((s) => s.slice()) });
  const url = URL.createObjectURL(new Blob([JSON.stringify(out, null, 1)], { type: "application/json" }));
  const a = h("a", { href: url, download: (META.slug || "graph") + ".json" });
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 2000);
});
drawSupernodes();

// ---------- events ----------
gNodes.addEventListener("click", (ev) => {
  const t = ev.target.closest && ev.target.closest("[data-node-id]");
  if (!t) return;
  ev.stopPropagation();
  const id = t.getAttribute("data-node-id");
  if (ev.shiftKey || $("select-mode").checked) togglePick(id); else select(id);
});
svg.addEventListener("click", (ev) => { if (!ev.shiftKey) closePanel(); });
document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closePanel(); });
if (QP.clickedId && byId[QP.clickedId]) select(String(QP.clickedId));
})();
"""
