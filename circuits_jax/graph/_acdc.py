"""ACDC (Conmy et al. 2023): automatic circuit discovery by sequential edge pruning, batched.

ACDC visits the destinations of `Graph.of(cfg)` from the logits back to layer 0. At each one it
tries removing its incoming edges one at a time, latest source first: an edge is removed (ablated
for good) when the loss of the circuit rises by less than the threshold τ over the current loss,
and kept otherwise. The loss is the KL divergence from the full model's output (ACDC's default) or
the negated task metric. A destination whose node no longer reaches the logits loses every incoming
edge untested, as in ACDC. `level="node"` does the same over whole heads and MLPs.

Two facts make this one compiled program per step instead of one forward per edge:

- **upstream is the full model.** When a destination at layer l is visited, no edge into a layer
  below l has been touched, so every run starts at layer l from the full run's cached residual
  stream and source outputs.
- **speculative batches keep the sequential semantics exact.** For a window of the next W
  candidates, row r of one `vmap`ped program removes candidates 1..r on top of the current circuit.
  Walking the rows in order, each decision compares row r with row r-1, which is exactly the state
  ACDC would have if candidates 1..r-1 were all removed. The first kept candidate makes the later
  rows stale; the walk stops there and the next window starts after it. ACDC removes most edges, so
  a window is usually used whole; each kept edge wastes at most W-1 rows.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..core import (
    ALL_LAYERS,
    Graph,
    Hook,
    KLFrom,
    Pairs,
    PerLayer,
    Replace,
    hooked_metric,
    progress_bar,
    run,
    Task,
    as_task,
    at_positions,
    score_resid,
    source_outputs,
    takes_task,
    source_sites,
    unembed,
)
from ._circuit import Circuit, circuit_metrics, circuit_resid, pairs_outputs

LOSSES = ("kl", "metric")


class _Negated(eqx.Module):
    """Loss from a task metric: lower is better, as ACDC minimises."""

    metric: Callable

    def __call__(self, logits):
        return -self.metric(logits)


def _full_run(model, pairs: Pairs):
    """The full model on the clean prompts: every source's output `[S, B, T, D]`, the stream entering
    every layer and leaving the last `[L + 1, B, T, D]`, and the logits at the scored positions."""
    cfg = model.cfg
    names = source_sites(cfg) + [f"blocks.{l}.hook_resid_pre" for l in range(cfg.n_layers)]
    out = run(model, jnp.asarray(pairs.clean), cache=names, attention_mask=pairs.mask, return_logits=False)
    resid = jnp.stack([out.cache[f"blocks.{l}.hook_resid_pre"] for l in range(cfg.n_layers)] + [out.resid])
    logits = unembed(model, at_positions(out.resid, pairs.positions))
    return source_outputs(cfg, out.cache), resid, logits


@eqx.filter_jit
def _edge_losses(model, tokens, mask, positions, loss, ablated, buf, resid, start, cuts):
    """Loss of each circuit `cuts [W, S, D]` (1 = ablated), runs starting at layer `start`."""
    gap = ablated - buf

    def one(cut):
        return score_resid(model, circuit_resid(model, tokens, mask, ablated, cut, start, resid[start], gap), positions, loss)

    return jax.vmap(one)(cuts)


@eqx.filter_jit
def _node_losses(model, tokens, mask, positions, loss, heads, mlps, resid, start, head_cut, mlp_cut):
    """Loss with the heads `head_cut [W, L, H]` and MLPs `mlp_cut [W, L]` replaced by their ablated outputs."""

    def one(hc, mc):
        hooks = [Hook("attn.hook_result", ALL_LAYERS, PerLayer(Replace(heads, hc[:, None, None, :, None])))]
        if mlps is not None:
            hooks.append(Hook("hook_mlp_out", ALL_LAYERS, PerLayer(Replace(mlps, mc[:, None, None, None]))))
        return hooked_metric(model, tokens, mask, positions, loss, hooks, start, resid[start])

    return jax.vmap(one)(head_cut, mlp_cut)


@dataclasses.dataclass
class _Walk:
    """ACDC's sequential accept/reject over candidates, evaluated in speculative windows."""

    threshold: float
    abs_value: bool
    window: int
    cur: float
    calls: int = 0
    rows: int = 0
    decided: int = 0

    def run(self, candidates, chain: Callable, remove: Callable, record: Callable, bar=None):
        """`chain(batch)`: losses with the current circuit plus `batch[:r + 1]` removed, per row r;
        `remove(c)` commits a removal, `record(c, change)` keeps each candidate's loss change."""
        pending = list(candidates)
        while pending:
            batch = pending[: self.window]
            losses = chain(batch)
            self.calls, self.rows = self.calls + 1, self.rows + self.window
            used = len(batch)
            for r, c in enumerate(batch):
                change = float(losses[r]) - self.cur
                record(c, change)
                self.decided += 1
                if (abs(change) if self.abs_value else change) < self.threshold:
                    remove(c)
                    self.cur = float(losses[r])
                else:
                    used = r + 1
                    break
            pending = pending[used:]
            if bar is not None:
                bar.update(used)


def _default_window(level: str, gap_bytes: int) -> int:
    """Candidates per call. Accelerators run a window's rows side by side: wide windows. On CPU rows
    cost their FLOPs and memory traffic whatever the batching, and every kept candidate wastes the
    rest of its window: measured on SmolLM2 IOI (2 cores, 8 prompts), node rows ran 1.6-2.3x faster
    in windows of 8-16 than alone, edge rows (each carrying every source's output, 83 MB) 1.1-1.15x
    faster in windows of 4-16 (1.64 s alone at full depth, 1.43 s at 4)."""
    if jax.default_backend() != "cpu":
        return 32 if level == "node" else 16
    if gap_bytes < 8 * 2**20:
        return 16
    return 8 if level == "node" else 4


def _pad(rows: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([rows, np.repeat(rows[-1:], n - len(rows), axis=0)])


@takes_task
def acdc(
    model, task: Task, *, threshold: float, loss: str = "kl", level: str = "edge", ablation: str = "resample",
    abs_value: bool = False, window: int | None = None, progress: bool = True,
) -> Circuit:  # fmt: skip
    """ACDC's circuit for a task: edges (or heads and MLPs) whose removal raises the loss by < `threshold`
    are ablated, visiting destinations from the logits back.

    metric: the task metric (higher = more of the behaviour); it scores the found circuit, and is the
        loss (negated) when `loss="metric"`. `loss="kl"`: KL(full model || circuit) at the scored positions.
    level: "edge", or "node" (heads and MLPs kept or removed whole).
    ablation: what a removed edge carries: "resample" (the corrupt prompt's output), "zero", "mean" (zero and
        mean need no corrupt prompt).
    abs_value: compare |change| with the threshold (ACDC's `abs_value_threshold`).
    window: candidates evaluated per compiled call (default: `_default_window`, by backend and size).

    Returns a `Circuit` whose `scores` hold each tested edge's loss change (NaN untested) and whose
    `meta` has the found circuit's metric and faithfulness, and the counts: compiled calls, rows run,
    edges decided by a run, edges dropped untested, seconds.
    """
    if loss not in LOSSES:
        raise KeyError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
    if level not in ("edge", "node"):
        raise KeyError(f"unknown level {level!r}; valid: edge, node")
    t0 = time.perf_counter()
    cfg = model.cfg
    graph = Graph.of(cfg)
    metric = task.metric
    pairs = Pairs(model, task, ablation=ablation, noising=True)
    buf, resid, logits = _full_run(model, pairs)
    ablated = pairs_outputs(pairs)
    loss_fn = KLFrom(logits) if loss == "kl" else _Negated(metric)
    tokens = jnp.asarray(pairs.clean)
    if window is None:
        window = _default_window(level, ablated.size * 4)
    cur = float(loss_fn(logits))
    walk = _Walk(threshold, abs_value, window, cur)
    effects: dict = {}
    if level == "edge":
        keep, skipped = _edge_level(model, graph, pairs, tokens, loss_fn, ablated, buf, resid, walk, effects, progress)
        scores = np.full(graph.mask.shape, np.nan, np.float32)
        for (i, j), v in effects.items():
            scores[i, j] = v
        node_scores = None
    else:
        keep, skipped, node_scores = _node_level(model, graph, pairs, tokens, loss_fn, ablated, resid, walk, effects, progress)
        scores = np.where(graph.mask, np.asarray([node_scores.get(s, np.nan) for s in graph.sources], np.float32)[:, None], np.nan)
    seconds = time.perf_counter() - t0
    kept = Circuit(graph, keep).edges
    m = circuit_metrics(model, task, np.stack([graph.mask, np.zeros_like(keep), kept]), ablation=ablation)
    full, empty, found = (float(v) for v in m)
    if not kept[:, -1].any():  # nothing reaches the logits: this is the empty circuit
        found = empty
    f = (found - empty) / (full - empty) if full != empty else float("nan")
    meta = dict(threshold=threshold, loss=loss, ablation=pairs.ablation, abs_value=abs_value, window=window,
                metric_full=full, metric_empty=empty, metric=found, faithfulness=f, final_loss=walk.cur,
                compiled_calls=walk.calls, rows_run=walk.rows, edges_tested=walk.decided, edges_skipped=skipped,
                seconds=seconds)  # fmt: skip
    if node_scores is not None:
        meta["node_scores"] = node_scores
    circuit = Circuit(graph, keep, scores, method="acdc", level=level, meta=meta)
    if level == "node" and circuit.nodes == ["input"]:
        warnings.warn(
            f"ACDC with threshold {threshold} pruned every head and MLP: only the direct path input -> logits is "
            f"left, f = {f:.3g} (m = {found:.4g}; m(∅) = {empty:.4g}, full model {full:.4g}); lower the threshold",
            stacklevel=2,
        )
    if not circuit.edges[:, -1].any():
        warnings.warn(
            f"ACDC with threshold {threshold} pruned every edge into the logits: the circuit is empty and scores "
            f"f = 0, its metric m(∅) = {empty:.4g} (full model {full:.4g}); lower the threshold", stacklevel=2
        )
    return circuit


def _edge_level(model, graph, pairs, tokens, loss_fn, ablated, buf, resid, walk, effects, progress):
    keep = graph.mask.copy()
    skipped = 0
    order = sorted(range(len(graph.destinations)), key=lambda j: (graph.dest_order[j], j), reverse=True)
    bar = progress_bar(len(order), "ACDC destinations", progress)
    for j in order:
        bar.update(1)
        bar.set_postfix(edges=int(keep.sum()), refresh=False)
        fed = graph.feeds[j]
        if fed.any() and not keep[fed].any():  # its node reaches nothing: its inputs cannot matter
            skipped += int(keep[:, j].sum())
            keep[:, j] = False
            continue
        parents = [i for i in np.nonzero(graph.mask[:, j])[0][::-1]]
        start = jnp.int32(graph.dest_layer(j))

        def chain(batch, j=j, start=start):
            cuts = np.repeat((graph.mask & ~keep)[None].astype(np.float32), len(batch), 0)
            for r, i in enumerate(batch):
                cuts[r:, i, j] = 1.0
            out = _edge_losses(model, tokens, pairs.mask, pairs.positions, loss_fn, ablated, buf, resid, start,
                               jnp.asarray(_pad(cuts, walk.window)))  # fmt: skip
            return np.asarray(out)

        def remove(i, j=j):
            keep[i, j] = False

        walk.run(parents, chain, remove, lambda i, v, j=j: effects.__setitem__((int(i), j), v))
    bar.close()
    return keep, skipped


def _node_chain(model, pairs, tokens, loss_fn, ablated, resid, window):
    """`chain(removed, batch)`: the loss with the nodes `removed` plus `batch[:r + 1]` ablated, per row r."""
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    per = H + (0 if cfg.attn_only else 1)
    by_layer = ablated[1:].reshape(L, per, *ablated.shape[1:])
    heads = jnp.moveaxis(by_layer[:, :H], 1, 3)  # [L, B, T, H, D]
    mlps = None if cfg.attn_only else by_layer[:, H]

    def cut_of(rm):
        hc, mc = np.zeros((L, H), bool), np.zeros(L, bool)
        for i in rm:
            l, r = divmod(i - 1, per)
            if r < H:
                hc[l, r] = True
            else:
                mc[l] = True
        return hc, mc

    def chain(removed, batch):
        hcs, mcs, rm = [], [], set(removed)
        for i in batch:
            rm.add(i)
            hc, mc = cut_of(rm)
            hcs.append(hc)
            mcs.append(mc)
        start = jnp.int32(min((i - 1) // per for i in rm))  # the lowest layer touched: upstream is the full run
        out = _node_losses(model, tokens, pairs.mask, pairs.positions, loss_fn, heads, mlps, resid, start,
                           jnp.asarray(_pad(np.stack(hcs), window)), jnp.asarray(_pad(np.stack(mcs), window)))  # fmt: skip
        return np.asarray(out)[: len(batch)]

    return chain


def node_chain_losses(model, task, corrupt_tokens=None, nodes=None, *, ablation: str = "resample", attention_mask=None,
                      answer_pos=None) -> np.ndarray:  # fmt: skip
    """KL from the full model after ablating `nodes[:r + 1]` (graph source names or indices), for every r,
    in one compiled call: the rows of one ACDC node-level window, for checking against other code.
    `node_chain_losses(model, task, nodes=...)`, or explicitly `(model, clean_tokens, corrupt_tokens, nodes)`."""
    graph = Graph.of(model.cfg)
    if nodes is None:
        raise TypeError("node_chain_losses needs nodes")
    idx = [graph.source_index(n) if isinstance(n, str) else int(n) for n in nodes]
    task = as_task(task, corrupt_tokens, attention_mask=attention_mask, answer_pos=answer_pos)
    pairs = Pairs(model, task, ablation=ablation, noising=True)
    buf, resid, logits = _full_run(model, pairs)
    ablated = pairs_outputs(pairs)
    chain = _node_chain(model, pairs, jnp.asarray(pairs.clean), KLFrom(logits), ablated, resid, len(idx))
    return chain([], idx)


def _node_level(model, graph, pairs, tokens, loss_fn, ablated, resid, walk, effects, progress):
    nodes = list(range(len(graph.sources) - 1, 0, -1))  # latest first; `input` is always kept
    removed: set[int] = set()
    node_chain = _node_chain(model, pairs, tokens, loss_fn, ablated, resid, walk.window)

    def chain(batch):
        return node_chain(removed, batch)

    bar = progress_bar(len(nodes), "ACDC nodes", progress)
    walk.run(nodes, chain, removed.add, effects.__setitem__, bar)
    bar.close()
    keep = graph.mask.copy()
    gone = np.zeros(len(graph.sources), bool)
    gone[list(removed)] = True
    keep[gone] = False  # a removed node's output is ablated for every reader
    keep[:, graph.feeds.any(1) & ~(graph.feeds & ~gone).any(1)] = False  # and what only removed nodes read is moot
    return keep, 0, {graph.sources[i]: float(v) for i, v in effects.items()}
