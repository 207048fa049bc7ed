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
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from ._graph import Graph, _outputs_of
from ._model import Transformer, _block, positions_from_mask
from ._patching import _Pairs, _score
from ._sites import SPLIT_INPUTS


@dataclasses.dataclass
class Circuit:
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
        self.edges = np.asarray(self.edges, bool) & self.graph.mask

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


class _CircuitTap:
    """Layer `i`'s tap in a circuit run: rewrites each destination input, records each source output."""

    def __init__(self, cfg, i, buf, ablated, cut):
        self.cfg, self.i, self.buf, self.ablated, self.cut = cfg, i, buf, ablated, cut
        H, K = cfg.n_heads, cfg.kv_heads
        self.per_dest = H + 2 * K + (0 if cfg.attn_only else 1)
        self.per_src = H + (0 if cfg.attn_only else 1)
        self.offsets = {"hook_q_input": (0, H), "hook_k_input": (H, K), "hook_v_input": (H + K, K), "hook_mlp_in": (H + 2 * K, 1)}

    def wants(self, kinds) -> bool:
        return any(k in SPLIT_INPUTS for k in kinds)

    def _correction(self, kind):
        start, n = self.offsets[kind]
        cols = lax.dynamic_slice_in_dim(self.cut, self.i * self.per_dest + start, n, axis=1)  # [S, n]
        return jnp.einsum("sn,sbtd->btnd", cols, self.ablated - self.buf)

    def __call__(self, kind, x):
        if kind in SPLIT_INPUTS:
            return x + self._correction(kind).astype(x.dtype)
        if kind == "hook_mlp_in":
            return x + self._correction(kind)[:, :, 0].astype(x.dtype)
        if kind == "attn.hook_result":  # [B, T, H, D]: this layer's heads become current sources
            heads = jnp.moveaxis(x, 2, 0)
            self.buf = lax.dynamic_update_slice_in_dim(self.buf, heads.astype(self.buf.dtype), 1 + self.i * self.per_src, 0)
        if kind == "hook_mlp_out":
            self.buf = lax.dynamic_update_slice_in_dim(self.buf, x[None].astype(self.buf.dtype), 1 + self.i * self.per_src + self.cfg.n_heads, 0)
        return x


def _circuit_resid(model: Transformer, tokens, mask, ablated, cut):
    """Final residual stream of the circuit run; `cut [S, D]` float, 1 where an edge is ablated."""
    cfg = model.cfg
    B, T = tokens.shape
    positions = positions_from_mask(mask, B, T)
    x = model.W_E[tokens]
    if cfg.positional == "learned":
        x = x + model.W_pos[positions]
    buf = jnp.zeros_like(ablated).at[0].set(x)

    def body(carry, xs):
        x, buf = carry
        params, i = xs
        tap = _CircuitTap(cfg, i, buf, ablated, cut)
        y = _block(cfg, params, x, positions, mask, tap, False, True)
        return (y, tap.buf), None

    (x, buf), _ = lax.scan(body, (x, buf), (model.blocks, jnp.arange(cfg.n_layers)))
    return x + jnp.einsum("s,sbtd->btd", cut[:, -1], ablated - buf)


@eqx.filter_jit
def _circuits_metric(model, tokens, mask, positions, metric, ablated, cuts):
    def one(cut):
        return _score(model, _circuit_resid(model, tokens, mask, ablated, cut), positions, metric)

    return jax.vmap(one)(cuts)


ABLATIONS = ("patching", "resample", "zero", "mean")


def ablated_outputs(model: Transformer, tokens, corrupt_tokens=None, ablation: str = "patching", attention_mask=None):
    """`[S, B, T, D]`: what an ablated edge carries from each source: its output on the corrupt prompt
    ("patching", or its synonym "resample": ACDC's resample ablation), zero ("zero"), or its mean over
    the batch and positions of `tokens` ("mean")."""
    mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
    if ablation in ("patching", "resample"):
        if corrupt_tokens is None:
            raise ValueError("ablation='patching' needs corrupt tokens")
        return _outputs_of(model, jnp.asarray(corrupt_tokens), mask)
    out = _outputs_of(model, jnp.asarray(tokens), mask)
    if ablation == "zero":
        return jnp.zeros_like(out)
    if ablation == "mean":
        return jnp.broadcast_to(out.mean(axis=(1, 2), keepdims=True), out.shape)
    raise KeyError(f"unknown ablation {ablation!r}; valid: {', '.join(ABLATIONS)}")


def circuit_metrics(
    model: Transformer, clean_tokens, corrupt_tokens, metric: Callable[[Array], Array], circuits, *,
    ablation: str = "patching", attention_mask=None, answer_pos=None,
) -> np.ndarray:  # fmt: skip
    """The metric of the clean run with every edge outside each circuit ablated, `[n]`, one compiled program.

    circuits: bool `[n, S, D]` (or `[S, D]`) over `Graph.of(cfg)`: True keeps the edge. Entries off the
    graph's mask are ignored. Keeping every edge gives the clean run; keeping none with
    `ablation="patching"` gives the corrupt run.
    """
    graph = Graph.of(model.cfg)
    keep = np.asarray(circuits, bool)
    if keep.ndim == 2:
        keep = keep[None]
    if keep.shape[1:] != graph.mask.shape:
        raise ValueError(f"circuits have shape {keep.shape[1:]}; the graph's [sources, destinations] is {graph.mask.shape}")
    pairs = _Pairs(model, clean_tokens, corrupt_tokens, metric, False, attention_mask, answer_pos)
    ablated = ablated_outputs(model, pairs.clean, pairs.corrupt, ablation, pairs.mask)
    cuts = (graph.mask & ~keep).astype(np.float32)
    out = _circuits_metric(model, jnp.asarray(pairs.clean), pairs.mask, pairs.positions, metric, ablated, jnp.asarray(cuts))
    return np.asarray(out)


FAITHFULNESS_KS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # MIB's 0.1% .. 100% of edges


def top_edges(scores: np.ndarray, mask: np.ndarray, fraction: float, absolute: bool = True) -> np.ndarray:
    """`[S, D]` bool: the `fraction` of real edges with the largest (absolute) score (at least one if > 0)."""
    vals = np.where(mask, np.abs(scores) if absolute else scores, -np.inf).ravel()
    n = int(round(fraction * mask.sum()))
    n = max(n, 1) if fraction > 0 else 0
    keep = np.zeros(vals.shape, bool)
    keep[np.argsort(-vals, kind="stable")[:n]] = True
    return keep.reshape(mask.shape) & mask


def faithfulness(
    model: Transformer, clean_tokens, corrupt_tokens, metric: Callable[[Array], Array], scores, *,
    ks=FAITHFULNESS_KS, ablation: str = "patching", absolute: bool = True, attention_mask=None, answer_pos=None,
) -> dict:  # fmt: skip
    """MIB's faithfulness curve of the circuits made of the top-k fraction of edges by score.

    f(k) = (m(C_k) - m(empty)) / (m(model) - m(empty)), for every k in `ks` (fractions of the graph's
    edges), all circuits (and the full and empty ones) in one compiled program. `scores` is an
    `EdgeScores` or an `[S, D]` array. CPR is the area under f (trapezoid over k), CMD the area under
    |1 - f|: higher CPR and lower CMD are better.
    """
    graph = Graph.of(model.cfg)
    s = np.asarray(getattr(scores, "scores", scores))
    circuits = np.stack([graph.mask, np.zeros_like(graph.mask)] + [top_edges(s, graph.mask, k, absolute) for k in ks])
    m = circuit_metrics(model, clean_tokens, corrupt_tokens, metric, circuits, ablation=ablation,
                        attention_mask=attention_mask, answer_pos=answer_pos)  # fmt: skip
    full, empty, curve = float(m[0]), float(m[1]), m[2:]
    with np.errstate(divide="ignore", invalid="ignore"):
        f = (curve - empty) / (full - empty)
    k = np.asarray(ks, np.float64)
    return dict(ks=k, f=f, metric=curve, full=full, empty=empty, edges=[int(c.sum()) for c in circuits[2:]],
                cpr=float(np.trapezoid(f, k)), cmd=float(np.trapezoid(np.abs(1 - f), k)))  # fmt: skip
