"""Running a circuit: the model with every edge outside a chosen subgraph ablated.

A circuit is a `[sources, destinations]` boolean matrix over `Graph.of(cfg)` (edges kept). In
the circuit run every destination reads, for each of its incoming edges, the source's *current*
output if the edge is kept and the source's *ablated* output otherwise (its output on the corrupt
prompt, zero, or its mean):

    input_d = resid_d + sum_{s upstream, (s, d) not kept} (ablated_s - current_s)

so removing an edge changes that destination only, and the change then flows downstream through
every kept edge: ACDC's and MIB's semantics. Unlike `patch_edges` (path patching, outputs from the
unpatched runs), the current outputs are the circuit run's own, so the run carries a buffer of
every source's output so far `[S, B, T, D]` through the layer scan.

`circuit_metrics` scores many circuits (for example the top-k% edges for every k of a
faithfulness curve) as one `vmap`: one compiled program for all of them.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from ..core import (
    Result,
    Source,
    Task,
    as_task,
    parse_site,
    site_shape,
    source_outputs,
    source_sites,
    takes_task,
    SPLIT_INPUTS,
    Config,
    Graph,
    Pairs,
    Tap,
    Transformer,
    embed,
    forward,
    positions_from_mask,
    score_resid,
)


@dataclasses.dataclass(frozen=True, repr=False)
class Circuit(Result):
    """A circuit as data: the kept edges `[sources, destinations]` of `graph`, with per-edge scores.

    edges: bool `[S, D]`, True for a kept edge (always within `graph.mask`).
    scores: float `[S, D]` or None: what the method measured per edge (ACDC: the metric change when
        the edge was removed; EAP: the attribution), NaN where untested.
    level: "edge", or "node" when whole heads and MLPs were kept or removed (`nodes` lists them).
    """

    graph: Graph
    edges: np.ndarray
    scores: np.ndarray | None = None
    method: str = ""
    level: str = "edge"
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "edges", np.asarray(self.edges, bool) & self.graph.mask)

    def __repr__(self) -> str:  # shapes and names, not array contents (see _repr.py)
        from ..core import summary

        return summary(self, skip=("graph", "edges"), extra=dict(edges=f"{self.n_edges} of {self.graph.n_edges} kept", graph=repr(self.graph)))

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    @property
    def nodes(self) -> list[str]:
        """Sources with a kept outgoing edge, in graph order (heads `a{l}.h{h}`, MLPs `m{l}`, `input`)."""
        return [self.graph.sources[i] for i in np.nonzero(self.edges.any(axis=1))[0]]

    def edge_list(self) -> list[tuple[str, str, float]]:
        """`(source, destination, score)` of every kept edge, largest |score| first (NaN scores last)."""
        s, d = np.nonzero(self.edges)
        sc = np.full(len(s), np.nan) if self.scores is None else np.asarray(self.scores, np.float64)[s, d]
        order = np.argsort(-np.nan_to_num(np.abs(sc), nan=-1.0), kind="stable")
        g = self.graph
        return [(g.sources[s[i]], g.destinations[d[i]], float(sc[i])) for i in order]


class CircuitTap(Tap):
    """The tap of a circuit run: rewrites each destination input, records each source output.

    Its carry is `gap [S, B, T, D]`, every source's ablated output minus its current one (sources not
    yet run hold their full-model gap, never read before they are overwritten). The big read of `gap`
    happens once per layer: one einsum gives every destination of the layer its correction from the
    sources before the layer, and the MLP input adds what this layer's heads changed since.
    """

    cfg: Config = eqx.field(static=True)
    ablated: Array  # [S, B, T, D]
    cut: Array  # [S, Dst] float, 1 where an edge is ablated

    def observes(self, kinds):
        return any(k in SPLIT_INPUTS or k in ("hook_mlp_in", "attn.hook_result", "hook_mlp_out") for k in kinds)

    def rewrites(self, kinds):
        return any(k in SPLIT_INPUTS or k == "hook_mlp_in" for k in kinds)

    @property
    def per_dest(self) -> int:
        return self.cfg.n_heads + 2 * self.cfg.kv_heads + (0 if self.cfg.attn_only else 1)

    @property
    def per_src(self) -> int:
        return self.cfg.n_heads + (0 if self.cfg.attn_only else 1)

    def enter(self, layer, gap, xs):
        if layer is None:
            return gap
        cols = lax.dynamic_slice_in_dim(self.cut, layer * self.per_dest, self.per_dest, axis=1)  # [S, per_dest]
        return dict(layer=layer, gap=gap, cols=cols, corr=None, mlp_extra=0.0)

    def leave(self, state):
        return (state if not isinstance(state, dict) else state["gap"]), None

    def _correction(self, st, kind):
        if st["corr"] is None:  # the layer's first destination: every correction at once
            st = {**st, "corr": jnp.einsum("sn,sbtd->btnd", st["cols"], st["gap"])}
        H, K = self.cfg.n_heads, self.cfg.kv_heads
        start, n = {"hook_q_input": (0, H), "hook_k_input": (H, K), "hook_v_input": (H + K, K), "hook_mlp_in": (H + 2 * K, 1)}[kind]
        return st["corr"][:, :, start : start + n], st

    def _record(self, st, first, outputs, heads=False):  # outputs [n, B, T, D] of sources first .. first + n - 1
        gap = st["gap"]
        ablated = lax.dynamic_slice_in_dim(self.ablated, first, outputs.shape[0], 0)
        new = ablated - outputs.astype(gap.dtype)
        if heads and not self.cfg.attn_only:  # this layer's heads feed its MLP
            old = lax.dynamic_slice_in_dim(gap, first, outputs.shape[0], 0)
            to_mlp = lax.dynamic_slice_in_dim(st["cols"][:, -1], first, outputs.shape[0], 0)
            st = {**st, "mlp_extra": jnp.einsum("n,nbtd->btd", to_mlp, new - old)}
        return {**st, "gap": lax.dynamic_update_slice_in_dim(gap, new, first, 0)}

    def __call__(self, kind, x, st):
        if not isinstance(st, dict):  # the global sites
            return x, st
        if kind in SPLIT_INPUTS:
            corr, st = self._correction(st, kind)
            return x + corr.astype(x.dtype), st
        if kind == "hook_mlp_in":
            corr, st = self._correction(st, kind)
            return x + (corr[:, :, 0] + st["mlp_extra"]).astype(x.dtype), st
        if kind == "attn.hook_result":  # [B, T, H, D]: this layer's heads become current sources
            st = self._record(st, 1 + st["layer"] * self.per_src, jnp.moveaxis(x, 2, 0), heads=True)
        if kind == "hook_mlp_out":
            st = self._record(st, 1 + st["layer"] * self.per_src + self.cfg.n_heads, x[None])
        return x, st


def circuit_resid(model: Transformer, tokens, mask, ablated, cut, start=None, x0=None, gap0=None):
    """Final residual stream of the circuit run; `cut [S, D]` float, 1 where an edge is ablated.

    With `start` (a traced layer), layers below it are skipped: the run begins from `x0`, the stream
    entering `start`, and `gap0`, every source's ablated minus full-model output. Valid when no edge
    into a destination below `start` is cut, so that everything upstream equals the full model's run
    (ACDC's traversal).
    """
    B, T = tokens.shape
    positions = positions_from_mask(mask, B, T)
    if start is None:
        x, _ = embed(model, tokens, positions)
        gap, start = ablated.at[0].add(-x), 0
    else:
        x, gap = x0, gap0
    out = forward(model, tap=CircuitTap(model.cfg, ablated, cut), carry=gap, positions=positions, key_mask=mask, resid=x,
                  start_layer=start, logits=False)  # fmt: skip
    return out.resid + jnp.einsum("s,sbtd->btd", cut[:, -1], out.carry)


@eqx.filter_jit
def _circuits_metric(model, tokens, mask, positions, metric, ablated, cuts):
    def one(cut):
        return score_resid(model, circuit_resid(model, tokens, mask, ablated, cut), positions, metric)

    return jax.vmap(one)(cuts)


@eqx.filter_jit
def _source_outputs(model, source: Source, B: int, T: int):
    cfg = model.cfg
    names = tuple(source_sites(cfg))
    values, _ = source.values(model, names, {n: site_shape(parse_site(n, cfg), cfg, B, T) for n in names})
    return source_outputs(cfg, values)


def pairs_outputs(pairs: Pairs) -> Array:
    """`[S, B, T, D]`: what an ablated edge carries from each source under the pair's ablation."""
    return _source_outputs(pairs.model, pairs.source, pairs.B, pairs.T)


def ablated_outputs(model: Transformer, tokens, corrupt_tokens=None, ablation: str = "resample", attention_mask=None):
    """`[S, B, T, D]`: what an ablated edge carries from each source: its output on the corrupt prompt
    ("resample", or its synonym "patching": ACDC's resample ablation), zero ("zero"), or its mean over
    the batch and (real) positions of the reference set, by default `tokens` ("mean"). `tokens` may be a
    `Task` (then give neither corrupt tokens nor a mask)."""
    task = as_task(tokens, corrupt_tokens, attention_mask=attention_mask)
    return pairs_outputs(Pairs(model, task, ablation=ablation, noising=True))


@takes_task
def circuit_metrics(model: Transformer, task: Task, circuits, *, ablation: str = "resample") -> np.ndarray:
    """The metric of the clean run with every edge outside each circuit ablated, `[n]`, one compiled program.

    circuits: bool `[n, S, D]` (or `[S, D]`) over `Graph.of(cfg)`: True keeps the edge. Entries off the
    graph's mask are ignored. Keeping every edge gives the clean run; keeping none with resample
    ablation gives the corrupt run. `ablation`: "resample" (the corrupt prompt's outputs), "zero" or
    "mean" (no corrupt prompt needed).
    """
    graph = Graph.of(model.cfg)
    keep = np.asarray(circuits, bool)
    if keep.ndim == 2:
        keep = keep[None]
    if keep.shape[1:] != graph.mask.shape:
        raise ValueError(f"circuits have shape {keep.shape[1:]}; the graph's [sources, destinations] is {graph.mask.shape}")
    pairs = Pairs(model, task, ablation=ablation, noising=True)
    cuts = (graph.mask & ~keep).astype(np.float32)
    out = _circuits_metric(model, jnp.asarray(pairs.clean), pairs.mask, pairs.positions, task.metric, pairs_outputs(pairs),
                           jnp.asarray(cuts))  # fmt: skip
    return np.asarray(out)


@dataclasses.dataclass(frozen=True, repr=False)
class Faithfulness(Result):
    """MIB's faithfulness curve: `f[i]` of the circuit of the top `ks[i]` fraction of edges (`edges[i]` of
    them, metric `metric[i]`), normalised by the full model's metric and the empty circuit's; CPR and CMD
    are the areas under f and under |1 - f|. Reads like the dict it replaced (`r["cpr"]`)."""

    ks: np.ndarray
    f: np.ndarray
    metric: np.ndarray
    full: float
    empty: float
    edges: list
    cpr: float
    cmd: float
    ablation: str = "resample"


FAITHFULNESS_KS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # MIB's 0.1% .. 100% of edges


def _edge_count(fraction: float, n_edges: int) -> int:
    """Edges in a circuit of `fraction` of the graph: rounded, at least one if the fraction is positive."""
    n = int(round(fraction * n_edges))
    return max(n, 1) if fraction > 0 else 0


def _top_n(scores: np.ndarray, mask: np.ndarray, n: int, absolute: bool) -> np.ndarray:
    """`[S, D]` bool: the `n` real edges with the largest (absolute) score, ties in matrix order."""
    vals = np.where(mask, np.abs(scores) if absolute else scores, -np.inf).ravel()
    keep = np.zeros(vals.shape, bool)
    keep[np.argsort(-vals, kind="stable")[:n]] = True
    return keep.reshape(mask.shape) & mask


def top_edges(scores: np.ndarray, mask: np.ndarray, fraction: float, absolute: bool = True) -> np.ndarray:
    """`[S, D]` bool: the `fraction` of real edges with the largest (absolute) score (at least one if > 0)."""
    return _top_n(scores, mask, _edge_count(fraction, int(mask.sum())), absolute)


@takes_task
def faithfulness(
    model: Transformer, task: Task, scores, *, ks=FAITHFULNESS_KS, ablation: str = "resample", absolute: bool = True,
    method: str = "topn",
) -> Faithfulness:  # fmt: skip
    """MIB's faithfulness curve of the circuits made of the top-k fraction of edges by score
    (`method="topn"`, or "greedy": grown from the logits, see `circuit_from_scores`).

    f(k) = (m(C_k) - m(empty)) / (m(model) - m(empty)), for every k in `ks` (fractions of the graph's
    edges), all circuits (and the full and empty ones) in one compiled program. `scores` is an
    `EdgeScores` or an `[S, D]` array. CPR is the area under f (trapezoid over k), CMD the area under
    |1 - f|: higher CPR and lower CMD are better.
    """
    graph = Graph.of(model.cfg)
    s = np.asarray(getattr(scores, "scores", scores))
    chosen = [circuit_from_scores(s, _edge_count(k, graph.n_edges), method=method, absolute=absolute, graph=graph).edges
              for k in ks]  # fmt: skip
    circuits = np.stack([graph.mask, np.zeros_like(graph.mask)] + chosen)
    m = circuit_metrics(model, task, circuits, ablation=ablation)
    full, empty, curve = float(m[0]), float(m[1]), m[2:]
    with np.errstate(divide="ignore", invalid="ignore"):
        f = (curve - empty) / (full - empty)
    k = np.asarray(ks, np.float64)
    return Faithfulness(k, f, curve, full, empty, [int(c.sum()) for c in circuits[2:]], float(np.trapezoid(f, k)),
                        float(np.trapezoid(np.abs(1 - f), k)), ablation)  # fmt: skip


# ---------------------------------------------------------------------------
# Circuits from edge scores, and scoring them against a known circuit
# ---------------------------------------------------------------------------


def prune_dangling(graph: Graph, keep: np.ndarray) -> np.ndarray:
    """Drop kept edges that cannot matter: into a node that reaches no kept path to the logits, or out of
    a node (other than `input`) that nothing kept feeds. Repeats until nothing changes."""
    keep = np.asarray(keep, bool) & graph.mask
    feeds = graph.feeds  # [D, S]
    while True:
        used = keep.any(axis=1)  # a source with a kept outgoing edge
        used[0] = True
        fed = (feeds & keep.any(axis=0)[:, None]).any(axis=0)  # a node with a kept incoming edge
        fed[0] = True
        dead_dest = feeds.any(axis=1) & ~(feeds & used[None]).any(axis=1)
        new = keep & ~dead_dest[None] & fed[:, None]
        if (new == keep).all():
            return new
        keep = new


def circuit_from_scores(
    scores, n_edges: int, *, method: str = "topn", absolute: bool = True, prune: bool = False, graph: Graph | None = None
) -> Circuit:  # fmt: skip
    """A circuit of `n_edges` edges chosen by their scores (an `EdgeScores`, or `[S, D]` with `graph`).

    "topn": the `n_edges` largest (absolute) scores. "greedy" (Hanna et al. 2024): start from the logits
    and repeatedly add the best-scoring edge into a node already in the circuit, so every edge lies on a
    path to the logits. `prune=True` then drops edges left dangling (`prune_dangling`).
    """
    graph = graph if graph is not None else scores.graph
    s = np.asarray(getattr(scores, "scores", scores), np.float64)
    if method == "topn":
        keep = _top_n(s, graph.mask, n_edges, absolute)
    elif method == "greedy":
        keep = _greedy(graph, np.abs(s) if absolute else s, n_edges)
    else:
        raise KeyError(f"unknown method {method!r}; valid: topn, greedy")
    if prune:
        keep = prune_dangling(graph, keep)
    name = getattr(scores, "method", "scores")
    return Circuit(graph, keep, np.where(graph.mask, s, np.nan).astype(np.float32), method=f"{name}-{method}",
                   meta=dict(requested_edges=n_edges, absolute=absolute, prune=prune))  # fmt: skip


def node_ranking(graph: Graph, node_scores: dict) -> np.ndarray:
    """`[S, D]` edge ranking from per-node scores (`{"a3.h1": v, "m2": v}`): an edge ranks by the smaller
    |score| of the two nodes it joins (`input` and `logits` rank first), so the top edges of any size
    are the subgraph induced by the top nodes: the faithfulness curve of a node-level method."""
    src = np.asarray([np.inf if n == "input" else abs(node_scores.get(n, 0.0)) for n in graph.sources])
    src = np.nan_to_num(src, nan=0.0, posinf=np.inf)
    dst = np.where(graph.feeds.any(axis=1), np.where(graph.feeds, src[None], -np.inf).max(axis=1), np.inf)
    return np.where(graph.mask, np.minimum(src[:, None], dst[None, :]), 0.0)


def _greedy(graph: Graph, key: np.ndarray, n: int) -> np.ndarray:
    """Grow from the logits: pop the best edge into an open destination, then open its source's inputs."""
    import heapq

    keep = np.zeros(graph.mask.shape, bool)
    kept = 0
    active = np.zeros(len(graph.destinations), bool)
    heap: list = []

    def open_dest(j):
        if not active[j]:
            active[j] = True
            for i in np.nonzero(graph.mask[:, j])[0]:
                heapq.heappush(heap, (-key[i, j], int(i), int(j)))

    open_dest(len(graph.destinations) - 1)
    while heap and kept < n:
        _, i, j = heapq.heappop(heap)
        keep[i, j] = True
        kept += 1
        for d in np.nonzero(graph.feeds[:, i])[0]:  # the source's own inputs become candidates
            open_dest(d)
    return keep


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive outranks a negative), ties counting one half (the Mann-Whitney U statistic)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    _, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # 1-based ranks, ties sharing their average
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def node_truth(graph: Graph, truth: np.ndarray) -> np.ndarray:
    """`[S]` bool: heads and MLPs with an edge of the circuit leaving them (`input` excluded)."""
    nodes = np.asarray(truth, bool).any(axis=1)
    nodes[0] = False
    return nodes


@dataclasses.dataclass(frozen=True, repr=False)
class ROC(Result):
    """Edge and node ROC AUC against a known circuit (`roc_sweep` adds the operating points it went
    through). Reads like the dict it replaced (`r["edge"]`)."""

    edge: float
    node: float
    edge_points: list | None = None
    node_points: list | None = None


def roc_auc(scores, truth: np.ndarray, *, graph: Graph | None = None, absolute: bool = True) -> ROC:
    """Edge and node ROC AUC of per-edge scores against a known circuit `truth [S, D]`.

    Edges are ranked by (absolute) score over the graph's real edges; a node (head or MLP) by the largest
    score of its outgoing edges. NaN scores (untested edges) rank lowest. A `Circuit` ranks its kept
    edges above the others (one operating point: AUC = (TPR + TNR) / 2); use `roc_sweep` for ACDC's
    threshold sweep.
    """
    if isinstance(scores, Circuit):
        graph, s = scores.graph, scores.edges.astype(np.float64)
    else:
        graph = graph if graph is not None else scores.graph
        s = np.asarray(getattr(scores, "scores", scores), np.float64)
        s = np.abs(s) if absolute else s
    s = np.nan_to_num(s, nan=-np.inf)
    truth = np.asarray(truth, bool) & graph.mask
    m = graph.mask
    edge = _auc(s[m & truth], s[m & ~truth])
    node_s = np.where(m, s, -np.inf).max(axis=1)[1:]
    nt = node_truth(graph, truth)[1:]
    return ROC(edge, _auc(node_s[nt], node_s[~nt]))


def roc_sweep(circuits: list[Circuit], truth: np.ndarray) -> ROC:
    """ACDC's ROC: each circuit (e.g. one per threshold) is a point (FPR, TPR); AUC by the trapezoid
    through the points with (0, 0) and (1, 1) added, for edges and for nodes."""
    graph = circuits[0].graph
    truth = np.asarray(truth, bool) & graph.mask
    nt = node_truth(graph, truth)[1:]
    out = {}
    for level in ("edge", "node"):
        pts = [(0.0, 0.0), (1.0, 1.0)]
        for c in circuits:
            if level == "edge":
                got, t = c.edges[graph.mask], truth[graph.mask]
            else:
                got, t = node_truth(graph, c.edges)[1:], nt
            pts.append((float((got & ~t).sum() / max((~t).sum(), 1)), float((got & t).sum() / max(t.sum(), 1))))
        pts = sorted(set(pts))
        fpr, tpr = np.array(pts).T
        tpr = np.maximum.accumulate(tpr)  # the ROC hull's upper envelope through the operating points
        out[level] = float(np.trapezoid(tpr, fpr))
        out[f"{level}_points"] = pts
    return ROC(**out)
