"""The computational graph of a transformer as data, and what runs on its edges.

Nodes that *write* to the residual stream are the sources: `input` (token plus position
embedding), every attention head `a{l}.h{h}` (its `z @ W_O`) and every MLP `m{l}`. Nodes that
*read* it are the destinations: each head's query, key and value input `a{l}.h{h}<q>`,
`a{l}.h{j}<k>`, `a{l}.h{j}<v>` (under grouped-query attention keys and values belong to kv
heads: `a{l}.kv{j}<k>`), each MLP's input `m{l}`, and `logits`. An edge joins a source to every
destination after it: the residual stream is their only link, so a destination's input is the
sum of the outputs of the sources upstream (plus constant biases). Names follow the EAP-IG and
ACDC graphs, so circuits read the same as in those libraries.

Edge values live in dense `[sources, destinations]` matrices with `Graph.mask` marking the real
edges: one layout for scores, circuits and patch sets, for EAP, path patching, ACDC and causal
scrubbing alike. Destinations are the model's split inputs (`hook_q_input`, ... , `hook_mlp_in`,
and the final residual stream), so an edge can be patched or differentiated alone:

- **patching an edge set** adds, at each chosen destination's input, the chosen sources' output
  difference (source run minus target run); every other path keeps its target value
  (`patch_edges`, and `path_patch` on top of it);
- **EAP** is the gradient of the metric with respect to every destination input, dotted with
  every source's output difference: one forward and one backward for all edges (`edge_attribution`).
"""

from __future__ import annotations

import dataclasses
import difflib
import time
import warnings
from typing import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._circuit import circuit_metrics
from ..core import (
    Result,
    Source,
    Task,
    parse_site,
    site_shape,
    flat,
    source_metric,
    takes_task,
    ALL_LAYERS,
    IG_BATCH,
    INPUT_KINDS,
    Add,
    Graph,
    Hook,
    Pairs,
    PerLayer,
    Replace,
    Transformer,
    auto_chunk,
    check_chunking,
    degenerate,
    report_nonfinite,
    dest_kinds,
    dest_stack,
    hooked_metric,
    in_chunks,
    run,
    score_resid,
    source_outputs,
    source_sites,
)


def _dest_grads(model, tokens, mask, positions, metric, extra_hooks=(), start_layer=0, resid=None):
    """`(metric, [Dst, B, T, D])`: the gradient of the metric at every destination's input, one backward.
    With `start_layer`, the run starts there from `resid` (destinations below it get zero gradient)."""
    cfg = model.cfg
    L, B, T = cfg.n_layers, tokens.shape[0], tokens.shape[1]
    D, H, K = cfg.d_model, cfg.n_heads, cfg.kv_heads
    shapes = {"hook_q_input": (L, B, T, H, D), "hook_k_input": (L, B, T, K, D), "hook_v_input": (L, B, T, K, D),
              "hook_mlp_in": (L, B, T, D)}  # fmt: skip
    zeros = {k: jnp.zeros(shapes[k], jnp.float32) for k in dest_kinds(cfg)}
    zeros["logits"] = jnp.zeros((B, T, D), jnp.float32)

    def f(deltas):
        hooks = [Hook(k, ALL_LAYERS, PerLayer(Add(deltas[k]))) for k in dest_kinds(cfg)]
        hooks.append(Hook("hook_resid_post", L - 1, Add(deltas["logits"])))
        return hooked_metric(model, tokens, mask, positions, metric, [*extra_hooks, *hooks], start_layer, resid)

    value, g = jax.value_and_grad(f)(zeros)
    return value, dest_stack(cfg, {k: g[k] for k in dest_kinds(cfg)}, g["logits"])


# ---------------------------------------------------------------------------
# Edge scores: EAP and EAP-IG
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, repr=False)
class EdgeScores(Result):
    """Per-edge values `[sources, destinations]` (zero off `mask`): an estimated or exact change of the metric.

    Under zero or mean ablation `corrupt_metric` is the empty circuit's metric (every edge ablated)."""

    scores: np.ndarray
    graph: Graph
    clean_metric: float
    corrupt_metric: float
    method: str
    seconds: float
    ablation: str = "resample"
    noising: bool = False
    degenerate: bool = False  # clean and corrupt give the same metric: nothing was measured

    def __repr__(self) -> str:  # shapes and names, not array contents (see _repr.py)
        from ..core import summary

        return summary(self, skip=("graph",), extra=dict(graph=repr(self.graph)))

    @property
    def mask(self) -> np.ndarray:
        return self.graph.mask

    @property
    def normalised(self) -> np.ndarray:
        """The change in units of `clean - corrupt` (the scale of the normalised patching results); NaN when degenerate."""
        if self.degenerate:
            return np.full_like(self.scores, np.nan)
        return self.scores / (self.clean_metric - self.corrupt_metric)

    def top(self, k: int = 10, absolute: bool = True) -> list[tuple[str, float]]:
        """The `k` edges of largest (absolute) score, as `(name, score)`."""
        vals = np.where(self.mask, self.scores, np.nan)
        key = np.nan_to_num(np.abs(vals) if absolute else vals, nan=-np.inf).ravel()
        idx = np.argsort(-key, kind="stable")[:k]
        g = self.graph
        return [(f"{g.sources[i // vals.shape[1]]}->{g.destinations[i % vals.shape[1]]}", float(vals.flat[i])) for i in idx]


def _both_runs(model, source: Source, target_tokens, mask, extra=(), extra_target=()):
    """The source values and the target run of every source's output (and `extra` sites; `extra_target`
    on the target only): `(source values, source metric's residual or None, target run, [S, B, T, D]
    output differences (source minus target))`."""
    cfg = model.cfg
    names = source_sites(cfg) + list(extra)
    B, T = target_tokens.shape
    src, src_resid = source.values(model, names, {n: site_shape(parse_site(n, cfg), cfg, B, T) for n in names})
    tgt = run(model, target_tokens, cache=names + list(extra_target), attention_mask=mask, return_logits=False)
    return src, src_resid, tgt, source_outputs(cfg, src) - source_outputs(cfg, tgt.cache)


@eqx.filter_jit
def _eap(model, source: Source, target_tokens, mask, positions, metric):
    src, src_resid, tgt, diff = _both_runs(model, source, target_tokens, mask)
    target_metric, grads = _dest_grads(model, target_tokens, mask, positions, metric)
    scores = jnp.einsum("sbtd,ebtd->se", diff, grads, preferred_element_type=jnp.float32)  # float32 in any dtype
    return source_metric(model, src_resid, positions, metric), target_metric, scores, jnp.max(jnp.abs(grads))


@eqx.filter_jit
def _eap_ig_inputs(model, source: Source, target_tokens, mask, positions, metric, steps: int):
    """Gradients averaged along the straight path from the target's input embedding to the source's."""
    src, src_resid, tgt, diff = _both_runs(model, source, target_tokens, mask)
    e_src, e_tgt = src["hook_embed"], tgt.cache["hook_embed"]

    def grads_at(alpha):
        hook = Hook("hook_embed", None, Replace(e_tgt + alpha.astype(e_tgt.dtype) * (e_src - e_tgt)))
        return _dest_grads(model, target_tokens, mask, positions, metric, (hook,))[1]

    alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
    mean = jnp.mean(jax.lax.map(grads_at, alphas, batch_size=IG_BATCH), axis=0)
    return (source_metric(model, src_resid, positions, metric), score_resid(model, tgt.resid, positions, metric),
            jnp.einsum("sbtd,ebtd->se", diff, mean, preferred_element_type=jnp.float32), jnp.max(jnp.abs(mean)))  # fmt: skip


@eqx.filter_jit
def _eap_ig_activations(model, source: Source, target_tokens, mask, positions, metric, steps: int):
    """Per source group (the input, each layer's heads, each MLP): gradients averaged while that group's
    output moves from its target value to its source value, every other node computed as usual."""
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    src, src_resid, tgt, diff = _both_runs(model, source, target_tokens, mask, [f"blocks.{l}.hook_attn_out" for l in range(L)],
                                           [f"blocks.{l}.hook_resid_pre" for l in range(L)])  # fmt: skip
    alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps

    resid_pre = jnp.stack([tgt.cache[f"blocks.{l}.hook_resid_pre"] for l in range(L)])

    def mean_grads(make_hook, layer=None):  # a layer's group only reaches later inputs: start the runs there
        start = {} if layer is None else dict(start_layer=layer, resid=resid_pre[layer])
        return jnp.mean(jax.lax.map(lambda a: _dest_grads(model, target_tokens, mask, positions, metric,
                                                          (make_hook(a),), **start)[1], alphas,
                                    batch_size=IG_BATCH), axis=0)  # fmt: skip

    def interp(kind, layer, s, t):
        return lambda a: Hook(kind, layer, Replace(t + a.astype(t.dtype) * (s - t)))

    e_src, e_tgt = src["hook_embed"], tgt.cache["hook_embed"]
    f32 = dict(preferred_element_type=jnp.float32)  # scores in float32 whatever the model's dtype
    rows = [jnp.einsum("btd,ebtd->e", diff[0], mean_grads(interp("hook_embed", None, e_src, e_tgt)), **f32)[None]]
    attn = jnp.stack([src[f"blocks.{l}.hook_attn_out"] for l in range(L)]), jnp.stack(
        [tgt.cache[f"blocks.{l}.hook_attn_out"] for l in range(L)]
    )
    mlp = (jnp.stack([src[f"blocks.{l}.hook_mlp_out"] for l in range(L)]),
           jnp.stack([tgt.cache[f"blocks.{l}.hook_mlp_out"] for l in range(L)])) if not cfg.attn_only else None  # fmt: skip
    per = H + (0 if cfg.attn_only else 1)
    by_layer = diff[1:].reshape(L, per, *diff.shape[1:])

    def layer_rows(l):
        g = mean_grads(interp("hook_attn_out", l, attn[0][l], attn[1][l]), l)
        out = jnp.einsum("hbtd,ebtd->he", by_layer[l, :H], g, **f32)
        if mlp is not None:
            g = mean_grads(interp("hook_mlp_out", l, mlp[0][l], mlp[1][l]), l)
            out = jnp.concatenate([out, jnp.einsum("btd,ebtd->e", by_layer[l, H], g, **f32)[None]])
        return out

    rows.append(jax.lax.map(layer_rows, jnp.arange(L)).reshape(L * per, -1))
    return (source_metric(model, src_resid, positions, metric), score_resid(model, tgt.resid, positions, metric),
            jnp.concatenate(rows), jnp.float32(jnp.inf))  # fmt: skip


EDGE_METHODS = ("eap", "eap-ig", "eap-ig-activations")


@takes_task
def edge_attribution(
    model: Transformer, task: Task, method: str = "eap", *, steps: int = 8, ablation: str = "resample",
    noising: bool | None = None, mesh=None,
) -> EdgeScores:  # fmt: skip
    """Estimated metric change from patching each edge alone, `[sources, destinations]`, one compiled program.

    method:
      "eap"  (Syed et al.): `(source - target output of the edge's source) · d metric / d (destination
             input)` on the target run: one forward per run and one backward for every edge;
      "eap-ig" (Hanna et al. 2024, inputs variant): the gradient averaged over `steps` midpoints of the
             straight path from the target prompt's token embeddings to the source prompt's;
      "eap-ig-activations": the gradient averaged while the edge's source group (the input, a
             layer's heads together, or an MLP) moves from its target to its source output; the other
             nodes are computed as usual. (Hanna et al.'s code averages each edge over every group's
             interpolation; we use the edge's own source group, which makes a source's edge scores sum to
             that source's integrated gradient.)
    ablation: what an edge's source carries when patched: "resample" (denoising by default: source =
        clean, target = corrupt; `noising=True` the reverse), "zero" or "mean" (noising the clean run;
        no corrupt prompt needed; then `corrupt_metric` is the empty circuit's metric, every edge ablated).
    Scores are summed over batch and positions, in metric units (`EdgeScores.normalised` divides by
    clean - corrupt); zero off the edge mask. EAP warns when the metric's gradient is zero where it is
    taken (a distance to the clean run, in noising mode), since every score is then 0.
    """
    t0 = time.perf_counter()
    if method not in EDGE_METHODS:
        close = difflib.get_close_matches(method, EDGE_METHODS, n=1)
        raise KeyError(f"unknown edge method {method!r}; valid: {', '.join(EDGE_METHODS)}"
                       + (f" (did you mean {close[0]!r}?)" if close else ""))  # fmt: skip
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    pairs = Pairs(model, task, ablation=ablation, noising=noising, mesh=mesh)
    model, metric = pairs.model, pairs.metric  # placed on the mesh, if one is given
    args = (model, pairs.source, jnp.asarray(pairs.target_tokens), pairs.mask, pairs.positions, metric)
    if method == "eap":
        s, t, scores, grad = _eap(*args)
    elif method == "eap-ig":
        s, t, scores, grad = _eap_ig_inputs(*args, int(steps))
    else:
        s, t, scores, grad = _eap_ig_activations(*args, int(steps))
    graph = Graph.of(model.cfg)
    if not pairs.noising:
        clean, corrupt = float(s), float(t)
    else:
        clean, corrupt = float(t), float(s) if pairs.ablation == "resample" else empty_metric(model, task, pairs.ablation)
    scores = np.where(graph.mask, np.asarray(scores, np.float32), np.float32(0))
    flag = degenerate(clean, corrupt, method)
    report_nonfinite(scores, ("source", "destination"), method)
    if not flag and flat(np.abs(scores).max(), clean - corrupt, float(grad)):
        warnings.warn(
            f"{method}: the metric's gradient is zero at the {'clean' if pairs.noising else 'corrupt'} run where it is "
            "taken, so every edge scores 0. A metric that measures distance to the clean run (KL to its logits, a "
            "squared error) has zero gradient at the clean run; in noising mode (zero and mean ablation are noising) "
            "use a metric such as a logit difference, or method='eap-ig', which averages the gradient along the path "
            "instead of taking it at the flat end", stacklevel=3)  # fmt: skip
    return EdgeScores(scores, graph, clean, corrupt, method, time.perf_counter() - t0, pairs.ablation, pairs.noising, flag)


def empty_metric(model: Transformer, task: Task, ablation: str) -> float:
    """The metric with every edge of the graph ablated (the empty circuit; the corrupt run under resample)."""
    graph = Graph.of(model.cfg)
    return float(circuit_metrics(model, task, np.zeros(graph.mask.shape, bool), ablation=ablation)[0])


# ---------------------------------------------------------------------------
# Patching edge sets (exact) and path patching
# ---------------------------------------------------------------------------


@eqx.filter_jit
def _output_diff(model, source: Source, target_tokens, mask):
    return _both_runs(model, source, target_tokens, mask)[3]


def edge_pairs(model: Transformer, task: Task, *, ablation: str, noising: bool | None, mesh) -> Pairs:
    """`Pairs` for edge patching; under zero or mean ablation 0 is the empty circuit (every edge ablated)."""
    pairs = Pairs(model, task, ablation=ablation, noising=noising, mesh=mesh)
    if pairs.ablation != "resample":
        pairs.corrupt_metric = empty_metric(model, task, pairs.ablation)
    return pairs


@eqx.filter_jit
def _edge_chunk(model, tokens, mask, positions, resid, diff, metric, weights, start: int, groups):
    """Metric of each row of `weights` `[C, S_active, D_active]`: every active destination's input gets
    `sum_s w[s, d] * diff[s]` added; the runs start at layer `start` from the target residual."""
    cfg = model.cfg

    def one(w):
        delta = jnp.einsum("sa,sbtm->abtm", w, diff)  # [D_active, B, T, D]
        hooks = []
        for kind, layer, slots in groups:  # static: (site kind, layer, ((active index, head), ...))
            B, T, D = delta.shape[1:]
            if kind in INPUT_KINDS:
                n = cfg.n_heads if kind == "hook_q_input" else cfg.kv_heads
                value = jnp.zeros((B, T, n, D), delta.dtype)
                for a, h in slots:
                    value = value.at[:, :, h].add(delta[a])
            else:
                value = sum(delta[a] for a, _ in slots)
            hooks.append(Hook(kind, layer, Add(value)))
        return hooked_metric(model, tokens, mask, positions, metric, hooks, start, resid)

    return jax.vmap(one)(weights)


@takes_task
def patch_edges(
    model: Transformer, task: Task, edge_sets, *, ablation: str = "resample", noising: bool | None = None,
    chunk_size: int | None = None, memory_budget: int = 4 * 2**30, progress: bool = True, mesh=None,
) -> np.ndarray:  # fmt: skip
    """Raw metric of the target run with each edge set patched, `[n]` (exact, batched and chunked).

    edge_sets: `[n, S, D]` weights (bool or float) over `Graph.of(cfg)`; off-mask entries are ignored.
    Patching an edge `s -> d` adds `w * (source output of s - target output of s)` to the input of d
    only; every other path keeps its target value (the path-patching semantics of Wang et al.,
    with the senders' outputs taken from the two unpatched runs). Effects then flow downstream as
    usual. Runs start at the lowest patched layer. `ablation` as in `edge_attribution` (zero and mean:
    the source outputs are zeros or means, patched into the clean run).
    """
    cfg = model.cfg
    check_chunking(chunk_size, memory_budget)
    graph = Graph.of(cfg)
    w = np.asarray(edge_sets, np.float32)
    if w.ndim == 2:
        w = w[None]
    if w.shape[1:] != graph.mask.shape:
        raise ValueError(f"edge sets have shape {w.shape[1:]}; the graph's [sources, destinations] is {graph.mask.shape}")
    w = w * graph.mask
    pairs = Pairs(model, task, ablation=ablation, noising=noising, mesh=mesh)
    model = pairs.model  # placed on the mesh, if one is given
    active_s = np.flatnonzero(w.any(axis=(0, 2)))
    active_d = np.flatnonzero(w.any(axis=(0, 1)))
    return _patch_weights(model, pairs, active_s, active_d, w[:, active_s][:, :, active_d], chunk_size, memory_budget,
                          progress)  # fmt: skip


def _patch_weights(model, pairs, active_s, active_d, sub, chunk_size, memory_budget, progress) -> np.ndarray:
    """`patch_edges` on the sub-matrix `sub [n, active sources, active destinations]` of the weights."""
    cfg = model.cfg
    graph = Graph.of(cfg)
    target_metric = pairs.clean_metric if pairs.noising else pairs.corrupt_metric
    if active_s.size == 0 or active_d.size == 0:
        return np.full(len(sub), target_metric, np.float32)
    diff = _output_diff(model, pairs.source, jnp.asarray(pairs.target_tokens), pairs.mask)[active_s]
    groups: dict[tuple[str, int], list[tuple[int, int | None]]] = {}
    for a, j in enumerate(active_d):
        kind, layer, head = graph.dest_site(int(j))
        groups.setdefault((kind, layer), []).append((a, head))
    static_groups = tuple((k, l, tuple(v)) for (k, l), v in sorted(groups.items(), key=lambda kv: kv[0][1]))
    start = min(l for _, l, _ in static_groups)
    chunk = pairs.chunk(max(1, min(chunk_size or auto_chunk(cfg, pairs.B, pairs.T, memory_budget), len(sub))))

    def score(part):
        return _edge_chunk(model, jnp.asarray(pairs.target_tokens), pairs.mask, pairs.positions, pairs.resid[start],
                           diff, pairs.metric, pairs.rows(part), start, static_groups)  # fmt: skip

    return in_chunks(sub, chunk, score, "patching edges", progress)


_KIND_IDS = ("hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in", "logits")


@eqx.filter_jit
def _single_edge_chunk(model, tokens, mask, positions, resid, diff, metric, start, rows):
    """Metric of each single-edge patch; rows `[C, 4]` = (source, destination kind id, layer, head).

    One program serves every edge: a hook per destination kind at a traced layer (-1, never
    reached, for the kinds a row does not use); runs start at the chunk's lowest layer."""
    cfg = model.cfg
    L = cfg.n_layers

    def one(row):
        x = diff[row[0]]  # [B, T, D]
        hooks = []
        for k, kind in enumerate(_KIND_IDS[:-1]):
            if kind == "hook_mlp_in" and cfg.attn_only:
                continue
            if kind == "hook_mlp_in":
                value = x
            else:
                n = cfg.n_heads if kind == "hook_q_input" else cfg.kv_heads
                value = x[:, :, None, :] * (jnp.arange(n) == row[3]).astype(x.dtype)[None, None, :, None]
            hooks.append(Hook(kind, jnp.where(row[1] == k, row[2], -1), Add(value)))
        hooks.append(Hook("hook_resid_post", L - 1, Add(x * (row[1] == 4).astype(x.dtype))))
        return hooked_metric(model, tokens, mask, positions, metric, hooks, start, resid[start])

    return jax.vmap(one)(rows)


@takes_task
def patch_single_edges(
    model: Transformer, task: Task, edges, *, ablation: str = "resample", noising: bool | None = None,
    chunk_size: int | None = None, memory_budget: int = 4 * 2**30, progress: bool = True, mesh=None,
) -> np.ndarray:  # fmt: skip
    """Raw metric with each edge patched alone; `edges` are names (`"a0.h1->a2.h3<q>"`) or
    `(source, destination)` index pairs. One compiled program for any edges (chunked `vmap`)."""
    check_chunking(chunk_size, memory_budget)
    pairs = Pairs(model, task, ablation=ablation, noising=noising, mesh=mesh)
    return _single_edges(model, pairs, edges, chunk_size, memory_budget, progress)


def _single_edges(model, pairs: Pairs, edges, chunk_size, memory_budget, progress) -> np.ndarray:
    cfg = model.cfg
    graph = Graph.of(cfg)
    pairs_idx = np.asarray([graph.edge_index(e) if isinstance(e, str) else tuple(e) for e in edges], np.int64)
    pairs_idx = pairs_idx.reshape(-1, 2)
    if pairs_idx.size and not graph.mask[pairs_idx[:, 0], pairs_idx[:, 1]].all():
        bad = pairs_idx[~graph.mask[pairs_idx[:, 0], pairs_idx[:, 1]]][0]
        graph.edge_index(f"{graph.sources[bad[0]]}->{graph.destinations[bad[1]]}")  # raises, naming the nearest
    model = pairs.model  # placed on the mesh, if one is given
    if not len(pairs_idx):
        return np.zeros(0, np.float32)
    rows = np.zeros((len(pairs_idx), 4), np.int32)
    rows[:, 0] = pairs_idx[:, 0]
    for r, j in enumerate(pairs_idx[:, 1]):
        kind, layer, head = graph.dest_site(int(j))
        rows[r, 1] = 4 if j == len(graph.destinations) - 1 else _KIND_IDS.index(kind)
        rows[r, 2], rows[r, 3] = layer, -1 if head is None else head
    diff = _output_diff(model, pairs.source, jnp.asarray(pairs.target_tokens), pairs.mask)
    order = np.argsort(rows[:, 2], kind="stable")  # layer-major: each chunk starts as late as it can
    chunk = pairs.chunk(max(1, min(chunk_size or auto_chunk(cfg, pairs.B, pairs.T, memory_budget), len(rows))))

    def score(part):
        return _single_edge_chunk(model, jnp.asarray(pairs.target_tokens), pairs.mask, pairs.positions, pairs.resid,
                                  diff, pairs.metric, jnp.int32(part[:, 2].min()), pairs.rows(part))  # fmt: skip

    return in_chunks(rows, chunk, score, "patching edges", progress, order=order)


@takes_task
def edge_patch_all(model: Transformer, task: Task, *, ablation: str = "resample", noising: bool | None = None,
                   chunk_size=None, progress: bool = True, mesh=None) -> EdgeScores:  # fmt: skip
    """Exact change of the metric from patching every edge alone (one forward per edge, in one compiled
    program): the ground truth for EAP (with the same `ablation`). Affordable on small models; SmolLM2
    has about 73k edges."""
    t0 = time.perf_counter()
    check_chunking(chunk_size, 4 * 2**30)
    graph = Graph.of(model.cfg)
    pairs = edge_pairs(model, task, ablation=ablation, noising=noising, mesh=mesh)
    s, d = np.nonzero(graph.mask)
    raw = _single_edges(pairs.model, pairs, np.stack([s, d], 1), chunk_size, 4 * 2**30, progress)
    scores = np.zeros(graph.mask.shape, np.float32)
    scores[s, d] = raw - (pairs.clean_metric if pairs.noising else pairs.corrupt_metric)
    flag = degenerate(pairs.clean_metric, pairs.corrupt_metric, "exact edge patching")
    report_nonfinite(scores, ("source", "destination"), "exact edge patching")
    return EdgeScores(scores, graph, pairs.clean_metric, pairs.corrupt_metric, "exact", time.perf_counter() - t0,
                      pairs.ablation, pairs.noising, flag)  # fmt: skip


@dataclasses.dataclass(frozen=True, repr=False)
class PathPatchResult(Result):
    """Path patching of each sender (rows of `result`) into each receiver group."""

    result: np.ndarray  # normalised metric, [receiver groups, *sender shape] (leading axis dropped for one group)
    raw: np.ndarray
    clean_metric: float
    corrupt_metric: float
    axes: tuple[str, ...]
    receivers: list[list[str]]  # the destination names of each group
    senders: list[str]
    seconds: float

    ablation: str = "resample"
    noising: bool = False
    degenerate: bool = False  # clean and corrupt give the same metric: `result` is NaN


@takes_task
def path_patch(
    model: Transformer, task: Task, receivers: str | Sequence[str], senders: str | Sequence[str] = "heads", *,
    ablation: str = "resample", noising: bool | None = None, chunk_size: int | None = None, progress: bool = True,
    mesh=None,
) -> PathPatchResult:  # fmt: skip
    """Path patching (Wang et al. 2022): each sender's effect through its direct paths to the receivers only.

    receivers: one spec, or a list of specs (one result row each); a spec is a comma list of destination
        names or globs: `"a9.h6<q>"`, `"a9.h*<q>"`, `"m12"`, `"logits"`.
    senders: "heads" (result `[layer, head]`), "mlps" (`[layer]`), or a list of source names / globs
        (`[n]`). Each sender is patched alone; the senders of one chunk run as one `vmap`.
    The receiver's input gets the sender's output difference (source minus target run); every other
    path holds its target value; the receivers' changed outputs then flow on to the logits.
    Normalised like patching: 1 = the clean metric, 0 = corrupt (denoising: clean into corrupt).
    `ablation="zero" | "mean"`: the senders' outputs become zeros or means in the clean run (noising),
    and 0 is the empty circuit (every edge ablated).
    """
    t0 = time.perf_counter()
    cfg = model.cfg
    check_chunking(chunk_size, 4 * 2**30)
    graph = Graph.of(cfg)
    specs = [receivers] if isinstance(receivers, str) else list(receivers)
    groups = [graph.select(sp) for sp in specs]
    if senders == "heads":
        send = np.asarray([graph.source_index(f"a{l}.h{h}") for l in range(cfg.n_layers) for h in range(cfg.n_heads)])
        shape, axes = (cfg.n_layers, cfg.n_heads), ("layer", "head")
    elif senders == "mlps":
        if cfg.attn_only:
            raise KeyError("senders='mlps': this model is attention-only")
        send = np.asarray([graph.source_index(f"m{l}") for l in range(cfg.n_layers)])
        shape, axes = (cfg.n_layers,), ("layer",)
    else:
        send = graph.select(senders, of="sources")
        shape, axes = (len(send),), ("sender",)
    pairs = edge_pairs(model, task, ablation=ablation, noising=noising, mesh=mesh)
    model = pairs.model  # placed on the mesh, if one is given
    raws = []
    for dests in groups:  # row i: sender i to every receiver it reaches (no dense [n, S, D] sets)
        sub = (np.eye(len(send), dtype=np.float32)[:, :, None] * graph.mask[send][:, dests][None]).astype(np.float32)
        raws.append(_patch_weights(model, pairs, send, dests, sub, chunk_size, 4 * 2**30, progress).reshape(shape))
    raw = np.stack(raws)
    flag = degenerate(pairs.clean_metric, pairs.corrupt_metric, "path patching")
    report_nonfinite(raw, ("receiver", *axes), "path patching")
    with np.errstate(divide="ignore", invalid="ignore"):
        result = ((raw - pairs.corrupt_metric) / (pairs.clean_metric - pairs.corrupt_metric)).astype(np.float32)
    if flag:
        result = np.full_like(result, np.nan)
    if isinstance(receivers, str):
        raw, result = raw[0], result[0]
    else:
        axes = ("receiver", *axes)
    return PathPatchResult(result, raw, pairs.clean_metric, pairs.corrupt_metric, axes,
                           [[graph.destinations[j] for j in d] for d in groups],
                           [graph.sources[i] for i in send], time.perf_counter() - t0, pairs.ablation, pairs.noising,
                           flag)  # fmt: skip
