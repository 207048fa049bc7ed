"""Attribution graphs (circuit tracing): one prompt's computation as a graph of transcoder features.

Nodes: the active transcoder features (layer, position, feature), one error node per (layer,
position) (the real MLP output minus the transcoder's reconstruction), one node per input token
(its embedding), and the top output logits (those covering `logit_mass` of the probability, at
most `max_logits`). With attention patterns and normalisation denominators frozen
(`_replacement.linear_forward`), every feature's pre-activation and every logit is an affine
function of the nodes' output vectors, so the edge from source s to target t is exactly

    A[t, s] = (gradient of t's read-out with respect to s's write position) . (s's output vector)

and a node's pre-activation equals the sum of its incoming edges plus a constant (biases),
which is tested. Each row of A is one vector-Jacobian product; `attribute` batches `batch_size`
rows into one compiled `vmap(vjp)` call and visits feature rows in order of their estimated
influence on the logits, up to `max_feature_nodes`.

Pruning and scores follow circuit-tracer's definitions: influence is the logit-probability
weighted sum of all path products of the row-normalised |A| (power iteration; the graph is a
DAG, so it ends); keep the nodes holding `node_threshold` of influence and the edges holding
`edge_threshold`; the replacement score is the share of token-to-logit influence that avoids
error nodes, the completeness score the influence-weighted share of node inputs that are not
errors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..core import Result, Transformer, run
from ..models import write_text
from ._replacement import Trace, Transcoders, token_embeddings, linear_forward, trace


@dataclasses.dataclass(frozen=True, repr=False)
class AttributionGraph(Result):
    """A direct-effect graph. Node order: features (S), errors (layer-major, L*T), tokens (T),
    logits (K); `adjacency[target, source]`. `save` writes a compressed .npz (the adjacency is sparse)."""

    _compress = True

    prompt: str
    tokens: np.ndarray  # [T]
    token_strs: list[str]
    features: np.ndarray  # [S, 3] (layer, position, feature index)
    activations: np.ndarray  # [S]
    logit_tokens: np.ndarray  # [K]
    logit_strs: list[str]
    logit_probs: np.ndarray  # [K]
    logit_values: np.ndarray  # [K] demeaned logits (each logit node's value)
    adjacency: np.ndarray  # [N, N]
    n_layers: int
    error_norms: np.ndarray  # [L, T]
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.adjacency.shape[0]

    @property
    def error_slice(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_errors)

    @property
    def token_slice(self) -> slice:
        s = self.n_features + self.n_errors
        return slice(s, s + self.n_pos)

    @property
    def logit_slice(self) -> slice:
        return slice(self.n_nodes - len(self.logit_tokens), self.n_nodes)

    def logit_weights(self) -> np.ndarray:
        w = np.zeros(self.n_nodes)
        w[self.logit_slice] = self.logit_probs
        return w

    def node_ids(self) -> list[str]:
        """circuit-tracer node ids: features `{l}_{f}_{p}`, errors `{l}_-1_{p}`, tokens `E_{id}_{p}`, logits `{L+1}_{id}_{p}`."""
        ids = [f"{l}_{f}_{p}" for l, p, f in self.features.tolist()]
        ids += [f"{l}_-1_{p}" for l in range(self.n_layers) for p in range(self.n_pos)]
        ids += [f"E_{t}_{p}" for p, t in enumerate(self.tokens.tolist())]
        ids += [f"{self.n_layers + 1}_{t}_{self.n_pos - 1}" for t in self.logit_tokens.tolist()]
        return ids

    @classmethod
    def load(cls, path: str | os.PathLike) -> AttributionGraph:
        """Read a graph written by `save`, also one written before graphs were `Result`s (JSON under `meta`)."""
        with np.load(path, allow_pickle=False) as z:
            if "__meta__" in z.files or "meta" not in z.files:
                legacy = None
            else:
                legacy = json.loads(str(z["meta"])), {k: z[k] for k in z.files if k != "meta"}
        if legacy is None:
            return super().load(path)
        meta, arrays = legacy
        return cls(prompt=meta["prompt"], token_strs=meta["token_strs"], logit_strs=meta["logit_strs"], n_layers=meta["n_layers"],
                   info=meta["info"], **arrays)  # fmt: skip


# ---------------------------------------------------------------- rows of the adjacency matrix


class _Sources(eqx.Module):
    """Every source node's output vector, where it is written: features in per-(layer,
    position) slots `[L, T, K, D]` (zero-padded), errors `[L, T, D]`, embeddings `[T, D]`."""

    feat_vecs: jax.Array
    errors: jax.Array
    embed: jax.Array


@eqx.filter_jit
def _rows(model: Transformer, frozen, src: _Sources, ct_layer, ct_pos, ct_vec, ct_final, stop, skips=None):
    """Edges into `B` targets from every source, by one batched VJP of the frozen linear model.

    Target b reads `ct_vec[b]` at transcoder input (`ct_layer[b]`, `ct_pos[b]`) plus `ct_final[b]`
    at the final position's normalised residual. Layers from `stop` on are skipped (no target
    reads them). Returns feature edges `[B, L, T, K]`, error edges `[B, L, T]`, token edges `[B, T]`."""
    L, T, _, D = src.feat_vecs.shape
    B = ct_vec.shape[0]
    inj0 = jnp.zeros((L, 1, T, D), src.errors.dtype)
    emb0 = src.embed[None]
    _, vjp = jax.vjp(lambda inj, emb: linear_forward(model, frozen, inj, emb, stop, skips), inj0, emb0)
    ct_reads = jnp.zeros((B, L, 1, T, D), ct_vec.dtype).at[jnp.arange(B), ct_layer, 0, ct_pos].set(ct_vec)
    ct_fin = jnp.zeros((B, 1, T, D), ct_vec.dtype).at[:, 0, T - 1].set(ct_final)
    g_inj, g_emb = jax.vmap(vjp)((ct_reads, ct_fin))
    g_inj, g_emb = g_inj[:, :, 0], g_emb[:, 0]  # [B, L, T, D], [B, T, D]
    return (jnp.einsum("bltd,ltkd->bltk", g_inj, src.feat_vecs), jnp.einsum("bltd,ltd->blt", g_inj, src.errors),
            jnp.einsum("btd,td->bt", g_emb, src.embed))  # fmt: skip


def _logit_targets(logits_last: np.ndarray, mass: float, max_logits: int) -> np.ndarray:
    p = np.exp(logits_last - logits_last.max())
    p /= p.sum()
    order = np.argsort(-p)
    n = int(np.searchsorted(np.cumsum(p[order]), mass) + 1)
    return order[: max(1, min(n, max_logits))], p


def _influence_estimate(rows_abs: np.ndarray, target_src: np.ndarray, w: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    """Influence on the logits of every source column, from the rows computed so far.

    rows_abs [R, n_src]: |edges| into the R visited targets (row-normalised here);
    target_src [R]: each target's own source column (-1 for logits); w [R]: logit weights."""
    sums = rows_abs.sum(1, keepdims=True)
    norm = rows_abs / np.maximum(sums, 1e-10)
    prod = w @ norm
    total = prod.copy()
    feat_rows = np.flatnonzero(target_src >= 0)
    cols = target_src[feat_rows]
    for _ in range(max_iter):
        prod = prod[cols] @ norm[feat_rows]
        if not prod.any():
            break
        total += prod
    return total


def _targets(model: Transformer, tokens: np.ndarray, logits_last: np.ndarray, target, logit_mass: float,
             max_logits: int, decode) -> tuple:  # fmt: skip
    """The graph's target nodes: `(read-out directions [K, D] in the unembedding's space (a column of W_U is one),
    ids [K] (-1 for a target that is not one token), labels, weights [K] (summing to 1 where they are
    probabilities), values [K])`. `target`: None (the top logits covering `logit_mass`), a token id, a pair of
    token ids (the logit difference), or a `[D]` direction."""
    D, V = model.W_U.shape
    dm = logits_last - logits_last.mean()
    cols = lambda ids: np.asarray(model.W_U[:, np.asarray(ids)], np.float64).T  # noqa: E731  the columns asked for only
    mean = lambda: np.asarray(jnp.mean(model.W_U.astype(jnp.float32), 1), np.float64)[None]  # noqa: E731
    if target is None:
        ids, probs = _logit_targets(logits_last, logit_mass, max_logits)
        dirs = cols(ids) - mean()
        return dirs, np.asarray(ids, np.int64), [decode(int(t)) for t in ids], probs[ids], dm[ids]
    if isinstance(target, (int, np.integer)) or (isinstance(target, tuple) and len(target) == 2):
        pair = target if isinstance(target, tuple) else (int(target),)
        bad = [t for t in pair if not (isinstance(t, (int, np.integer)) and 0 <= t < V)]
        if bad:
            raise ValueError(f"target token ids {bad} are outside the vocabulary of {V}")
        if len(pair) == 1:
            t = pair[0]
            return cols([t]) - mean(), np.asarray([t], np.int64), [decode(int(t))], np.ones(1), dm[[t]]
        a, b = pair
        return (cols([a]) - cols([b]), np.asarray([-1], np.int64), [f"{decode(int(a))} - {decode(int(b))}"],
                np.ones(1), np.asarray([logits_last[a] - logits_last[b]]))  # fmt: skip
    v = np.asarray(target, np.float64)
    if v.shape != (D,):
        raise ValueError(f"target must be None, a token id, a pair of token ids or a direction of shape ({D},); got "
                         f"{type(target).__name__} of shape {v.shape}")  # fmt: skip
    h = np.asarray(run(model, jnp.asarray(tokens)[None], cache=["ln_final.hook_normalized"]).cache["ln_final.hook_normalized"])
    lnf = np.ones(D) if model.lnf_w is None else np.asarray(model.lnf_w, np.float64)
    shift = 0.0 if model.lnf_b is None else np.asarray(model.lnf_b, np.float64)
    return v[None], np.asarray([-1], np.int64), ["direction"], np.ones(1), np.asarray([(h[0, -1] * lnf + shift) @ v])


def attribute(
    model: Transformer,
    ts: Transcoders,
    tokens,
    *,
    target=None,
    prompt: str = "",
    token_strs: list[str] | None = None,
    decode=None,
    max_logits: int = 10,
    logit_mass: float = 0.95,
    max_feature_nodes: int | None = None,
    batch_size: int = 64,
    update_every: int = 4,
    progress: bool = True,
) -> AttributionGraph:
    """The attribution graph of `tokens` `[T]` (BOS first) under transcoders `ts`.

    target: what the graph explains: None, the top logits (those covering `logit_mass` of the
        probability, at most `max_logits`, each weighted by its probability); a token id (its logit,
        demeaned over the vocabulary); a pair of token ids `(a, b)` (the logit difference a - b); or a
        `[d_model]` direction read from the final norm's output as a column of W_U is. Each
        target is a read-out vector through the same frozen final norm, so all share one path.
    max_feature_nodes: feature rows to compute (default: every active feature). With a budget,
        after the logit rows the pending features are visited in order of their influence on
        the logits estimated from the rows so far (re-estimated every `update_every` batches);
        features never visited are left out of the graph, as in circuit-tracer.
    batch_size: target rows per compiled backward pass (one program for every batch).
    decode: token id -> string, for labels."""
    t_start = time.perf_counter()
    tokens = np.asarray(tokens, np.int32).reshape(-1)
    T = len(tokens)
    L = model.cfg.n_layers
    tr: Trace = trace(model, ts, jnp.asarray(tokens)[None])
    logits_last = np.asarray(tr.logits[0, -1], np.float64)
    decode = decode or (lambda i: str(i))
    t_dirs, targets, t_labels, w, t_values = _targets(model, tokens, logits_last, target, logit_mass, max_logits, decode)
    K_log = len(targets)

    # active features, arranged in per-(layer, position) slots
    acts = np.asarray(tr.acts[:, 0])  # [L, T, F]
    active = acts > 0
    Ks = max(1, int(active.sum(-1).max()))
    slot_feat = np.zeros((L, T, Ks), np.int32)
    slot_act = np.zeros((L, T, Ks), np.float32)
    feats = []
    for l in range(L):
        for p in range(T):
            idx = np.flatnonzero(active[l, p])
            slot_feat[l, p, : len(idx)] = idx
            slot_act[l, p, : len(idx)] = acts[l, p, idx]
            feats += [(l, p, int(f), s) for s, f in enumerate(idx)]
    S = len(feats)
    feat_lpf = np.array([(l, p, f) for l, p, f, _ in feats], np.int64).reshape(-1, 3)
    feat_slot = np.array([(l * T + p) * Ks + s for l, p, _, s in feats], np.int64)
    dec = ts.decode_vectors()  # [L, F, D]
    vecs = jnp.asarray(slot_act)[..., None] * dec[jnp.arange(L)[:, None, None], jnp.asarray(slot_feat)]
    emb = token_embeddings(model, jnp.asarray(tokens)[None])[0]
    src = _Sources(vecs, tr.errors[:, 0], emb)
    n_src = S + L * T + T

    enc = ts.encode_vectors()  # [L, D, F]
    lnf = jnp.ones(model.cfg.d_model) if model.lnf_w is None else model.lnf_w
    logit_dirs = lnf[None] * jnp.asarray(t_dirs, jnp.float32)  # [K, D]: the targets' read-outs of the normalised stream
    D = model.cfg.d_model
    n_calls = row_layers = 0

    def run_rows(ct_l, ct_p, ct_v, ct_f, stop):
        nonlocal n_calls, row_layers
        n = len(ct_l)
        pad = batch_size - n
        ct_l, ct_p = np.pad(ct_l, (0, pad)), np.pad(ct_p, (0, pad))
        ct_v = jnp.pad(ct_v, ((0, pad), (0, 0)))
        ct_f = jnp.pad(ct_f, ((0, pad), (0, 0)))
        fe, ee, te = _rows(model, tr.frozen, src, jnp.asarray(ct_l), jnp.asarray(ct_p), ct_v, ct_f, jnp.int32(stop),
                           ts.W_skip)  # fmt: skip
        n_calls += 1
        row_layers += batch_size * stop
        fe = np.asarray(fe).reshape(batch_size, -1)[:n, feat_slot]
        return np.concatenate([fe, np.asarray(ee).reshape(batch_size, -1)[:n], np.asarray(te)[:n]], 1)

    from tqdm.auto import tqdm

    budget = S if max_feature_nodes is None else min(S, max_feature_nodes)
    bar = tqdm(total=K_log + budget, desc="attribution rows", unit="row", disable=not progress)
    logit_rows = []
    for b in range(0, K_log, batch_size):
        k = min(batch_size, K_log - b)
        logit_rows.append(run_rows(np.zeros(k, np.int32), np.zeros(k, np.int32), jnp.zeros((k, D)), logit_dirs[b : b + k], L))
        bar.update(k)
    logit_rows = np.concatenate(logit_rows)
    feat_rows = np.zeros((S, n_src), np.float32)
    visited = np.zeros(S, bool)
    order: list[int] = []
    # all of them: any order, so layer by layer (a batch's backward pass stops at its highest layer)
    pending_rank = np.argsort(feat_lpf[:, 0], kind="stable")[::-1] if budget == S else None
    n_batches = 0
    while len(order) < budget:
        if pending_rank is None or (budget < S and n_batches % update_every == 0):
            rows = np.concatenate([logit_rows, feat_rows[order]]) if order else logit_rows
            tsrc = np.concatenate([np.full(K_log, -1), np.asarray(order, np.int64)])
            wt = np.concatenate([w, np.zeros(len(order))])
            inf = _influence_estimate(np.abs(rows), tsrc, wt)[:S]
            inf[visited] = -np.inf
            pending_rank = np.argsort(-inf, kind="stable")[::-1]  # popped from the end
        take = []
        while len(take) < min(batch_size, budget - len(order)) and len(pending_rank):
            i = int(pending_rank[-1])
            pending_rank = pending_rank[:-1]
            if not visited[i]:
                take.append(i)
        if not take:
            break
        sel = feat_lpf[take]
        vec = enc[sel[:, 0], :, sel[:, 2]]  # [n, D]
        feat_rows[take] = run_rows(sel[:, 0].astype(np.int32), sel[:, 1].astype(np.int32), vec, jnp.zeros((len(take), D)),
                                   int(sel[:, 0].max()) + 1)  # fmt: skip
        visited[take] = True
        order += take
        n_batches += 1
        bar.update(len(take))
    bar.close()

    kept = np.sort(np.asarray(order, np.int64))
    keep_cols = np.concatenate([kept, np.arange(S, n_src)])
    Sk = len(kept)
    N = Sk + L * T + T + K_log
    A = np.zeros((N, N), np.float32)
    A[:Sk, : Sk + L * T + T] = feat_rows[kept][:, keep_cols]
    A[N - K_log :, : Sk + L * T + T] = logit_rows[:, keep_cols]
    graph = AttributionGraph(
        prompt=prompt, tokens=tokens, token_strs=token_strs or [decode(int(t)) for t in tokens], features=feat_lpf[kept],
        activations=acts[feat_lpf[kept, 0], feat_lpf[kept, 1], feat_lpf[kept, 2]].astype(np.float32),
        logit_tokens=targets, logit_strs=t_labels, logit_probs=np.asarray(w, np.float32),
        logit_values=np.asarray(t_values, np.float32), adjacency=A, n_layers=L,
        error_norms=np.linalg.norm(np.asarray(tr.errors[:, 0]), axis=-1),
        info=dict(active_features=S, visited_features=Sk, backward_passes=n_calls, batch_size=batch_size, row_layers=row_layers,
                  seconds=time.perf_counter() - t_start, model=ts.model_name),
    )  # fmt: skip
    return graph


# ---------------------------------------------------------------- influence, pruning, scores


def normalize_rows(A: np.ndarray) -> np.ndarray:
    """|A| with every row scaled to sum to one (all-zero rows stay zero)."""
    a = np.abs(A).astype(np.float64)
    return a / np.maximum(a.sum(1, keepdims=True), 1e-10)


def influence(norm: np.ndarray, w: np.ndarray, max_iter: int = 10_000) -> np.ndarray:
    """`w @ (N + N^2 + ...)`: each node's total influence on the weighted targets (a DAG's power series ends)."""
    prod = w @ norm
    total = prod.copy()
    for _ in range(max_iter):
        prod = prod @ norm
        if not prod.any():
            return total
        total += prod
    raise RuntimeError(f"influence did not converge in {max_iter} iterations: is the graph acyclic?")


def node_influence(g: AttributionGraph) -> np.ndarray:
    """Each node's total (direct and indirect) influence on the graph's logit nodes, weighted by their probabilities."""
    return influence(normalize_rows(g.adjacency), g.logit_weights())


def _threshold(scores: np.ndarray, frac: float) -> float:
    s = np.sort(np.ravel(scores))[::-1]
    tot = s.sum()
    if tot <= 0:
        return 0.0
    i = min(int(np.searchsorted(np.cumsum(s) / tot, frac)), len(s) - 1)
    return float(s[i])


@dataclasses.dataclass(frozen=True, repr=False)
class Pruned(Result):
    """`prune`'s choice: which nodes and edges of an `AttributionGraph` are kept, and at which thresholds."""

    node_mask: np.ndarray  # [N]
    edge_mask: np.ndarray  # [N, N]
    cumulative: np.ndarray  # [N]: share of influence held by this node and every node above it
    node_threshold: float
    edge_threshold: float


def prune(g: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Keep the nodes holding `node_threshold` of the influence on the logits (tokens and logits
    always kept), then the edges holding `edge_threshold` of the influence among them, then drop
    nodes left without a path (features and errors without outputs, features without inputs)."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {v}")
    w = g.logit_weights()
    inf = node_influence(g)
    keep = inf >= _threshold(inf, node_threshold)
    fixed = g.token_slice.start  # tokens and logits from here on
    keep[fixed:] = True
    A = np.where(keep[:, None] & keep[None, :], g.adjacency, 0.0)
    norm = normalize_rows(A)
    edge_scores = norm * (influence(norm, w) + w)[:, None]
    edges = edge_scores >= _threshold(edge_scores, edge_threshold)
    edges &= A != 0
    S = g.n_features
    while True:
        old = keep.copy()
        edges &= keep[:, None] & keep[None, :]
        keep[:fixed] &= edges[:, :fixed].any(0)  # features and errors need an outgoing edge
        keep[:S] &= edges[:S].any(1)  # features need an incoming edge
        if (keep == old).all():
            break
    order = np.argsort(-inf, kind="stable")
    cum = np.zeros_like(inf)
    cum[order] = np.cumsum(inf[order]) / max(inf.sum(), 1e-30)
    return Pruned(keep, edges, cum, node_threshold, edge_threshold)


@dataclasses.dataclass(frozen=True, repr=False)
class GraphScores(Result):
    """`graph_scores`: the replacement and completeness scores of a graph; reads like the dict it was (`s["replacement"]`)."""

    replacement: float
    completeness: float


def graph_scores(g: AttributionGraph) -> GraphScores:
    """`replacement`: share of the token-to-logit influence that reaches the logits without
    passing through an error node's share; `completeness`: influence-weighted share of every
    node's inputs that come from features and tokens rather than errors."""
    w = g.logit_weights()
    norm = normalize_rows(g.adjacency)
    inf = influence(norm, w)
    tok, err = inf[g.token_slice].sum(), inf[g.error_slice].sum()
    non_error = 1.0 - norm[:, g.error_slice].sum(1)
    out = inf + w
    return GraphScores(replacement=float(tok / max(tok + err, 1e-30)),
                       completeness=float((non_error * out).sum() / max(out.sum(), 1e-30)))  # fmt: skip


# ---------------------------------------------------------------- circuit-tracer / Neuronpedia JSON


def graph_json(g: AttributionGraph, pruned: Pruned | None = None, *, slug: str = "graph", scan: str = "",
               supernodes=(), scores: GraphScores | dict | None = None, labels: dict | None = None) -> dict:  # fmt: skip
    """The graph in the schema circuit-tracer writes and Neuronpedia's graph viewer reads.

    supernodes: `[[name, node_id, ...], ...]`; labels: `{"{layer}_{feature}": text}` for `clerp`."""
    pruned = pruned or prune(g)
    ids = g.node_ids()
    keep = np.flatnonzero(pruned.node_mask)
    nodes = []
    S, T = g.n_features, g.n_pos
    for i in keep.tolist():
        base = dict(node_id=ids[i], influence=float(pruned.cumulative[i]), run_idx=0, reverse_ctx_idx=0, token_prob=0.0,
                    is_target_logit=False, clerp="", activation=None)  # fmt: skip
        if i < S:
            l, p, f = (int(x) for x in g.features[i])
            label = (labels or {}).get(f"{l}_{f}", "")
            nodes.append(dict(base, feature=f, layer=str(l), ctx_idx=p, feature_type="cross layer transcoder",
                              jsNodeId=f"{l}_{f}-0", activation=float(g.activations[i]), clerp=label))  # fmt: skip
        elif i < g.token_slice.start:
            l, p = divmod(i - S, T)
            nodes.append(dict(base, feature=-1, layer=str(l), ctx_idx=p, feature_type="mlp reconstruction error",
                              jsNodeId=f"{l}_-1-{p}", activation=float(g.error_norms[l, p])))  # fmt: skip
        elif i < g.logit_slice.start:
            p = i - g.token_slice.start
            nodes.append(dict(base, feature=p, layer="E", ctx_idx=p, feature_type="embedding", jsNodeId=f"E_{int(g.tokens[p])}-{p}",
                              clerp=g.token_strs[p]))  # fmt: skip
        else:
            j = i - g.logit_slice.start
            prob = float(g.logit_probs[j])
            nodes.append(dict(base, feature=int(g.logit_tokens[j]), layer=str(g.n_layers + 1), ctx_idx=T - 1, feature_type="logit",
                              jsNodeId=f"L_{int(g.logit_tokens[j])}-{T - 1}", token_prob=prob, is_target_logit=j == 0,
                              activation=float(g.logit_values[j]), clerp=f'Output "{g.logit_strs[j]}" (p={prob:.3f})'))  # fmt: skip
    tgt, srcs = np.nonzero(pruned.edge_mask & pruned.node_mask[:, None] & pruned.node_mask[None, :])
    links = [dict(source=ids[s], target=ids[t], weight=float(g.adjacency[t, s])) for t, s in zip(tgt.tolist(), srcs.tolist())]
    meta = dict(slug=slug, scan=scan or g.info.get("model", ""), transcoder_list=[], prompt_tokens=g.token_strs, prompt=g.prompt,
                node_threshold=pruned.node_threshold, schema_version=1, model=g.info.get("model", ""),
                info={k: v for k, v in g.info.items() if isinstance(v, (int, float, str))})  # fmt: skip
    if scores:
        meta.update(replacement_score=scores["replacement"], completeness_score=scores["completeness"])
    qp = dict(pinnedIds=[], supernodes=[list(s) for s in supernodes], linkType="both", clickedId="", sg_pos="")
    return dict(metadata=meta, qParams=qp, nodes=nodes, links=links)


# ---------------------------------------------------------------- feature examples and files


@eqx.filter_jit
def _feature_acts(model: Transformer, ts: Transcoders, tokens, layers, feats):
    acts = trace(model, ts, tokens).acts  # [L, B, T, F]
    return acts[layers, :, :, feats]  # [n, B, T]


def feature_examples(model: Transformer, ts: Transcoders, keys, contexts, *, decode, n_top: int = 5, before: int = 12,
                     after: int = 4, batch_size: int = 4, progress: bool = True) -> dict:  # fmt: skip
    """Top-activating contexts of transcoder features `keys` `[(layer, feature), ...]` over
    `contexts` `[N, T]` (BOS first): `{"{l}_{f}": {"density", "max", "top": [{"tokens", "acts"}]}}`,
    each example a window of `before` tokens up to the maximum and `after` past it."""
    keys = sorted({(int(l), int(f)) for l, f in keys})
    if not keys:
        return {}
    contexts = np.asarray(contexts, np.int32)
    N, T = contexts.shape
    ls, fs = jnp.asarray([k[0] for k in keys]), jnp.asarray([k[1] for k in keys])
    best: list[list[tuple[float, int, int]]] = [[] for _ in keys]  # (max act, context, position)
    fired = np.zeros(len(keys))
    from tqdm.auto import tqdm

    for b in tqdm(range(0, N, batch_size), desc="feature examples", disable=not progress, leave=False):
        part = contexts[b : b + batch_size]
        a = np.asarray(_feature_acts(model, ts, jnp.asarray(part), ls, fs))[:, :, 1:]  # drop BOS
        fired += (a > 0).sum((1, 2))
        mx, pos = a.max(2), a.argmax(2) + 1
        for i in range(len(keys)):
            for r in range(len(part)):
                if mx[i, r] > 0:
                    best[i].append((float(mx[i, r]), b + r, int(pos[i, r])))
            best[i] = sorted(best[i], reverse=True)[:n_top]
    out = {}
    need = {(c, p) for lst in best for _, c, p in lst}
    acts_at: dict[tuple[int, int], np.ndarray] = {}
    if need:  # the activations of each kept window, recomputed for those contexts only
        ctx_ids = sorted({c for c, _ in need})
        for j in range(0, len(ctx_ids), batch_size):
            ids = ctx_ids[j : j + batch_size]
            a = np.asarray(_feature_acts(model, ts, jnp.asarray(contexts[ids]), ls, fs))
            for r, c in enumerate(ids):
                acts_at[c] = a[:, r]
    for i, (l, f) in enumerate(keys):
        top = []
        for m, c, p in best[i]:
            lo, hi = max(1, p - before), min(T, p + after + 1)
            top.append(dict(tokens=[decode(int(t)) for t in contexts[c, lo:hi]], acts=[round(float(x), 4) for x in acts_at[c][i, lo:hi]]))
        out[f"{l}_{f}"] = dict(density=float(fired[i] / (N * (T - 1))), max=best[i][0][0] if best[i] else 0.0, top=top)
    return out


def write_graph(out: str | os.PathLike, g: AttributionGraph, *, slug: str = "graph", node_threshold: float = 0.8,
                edge_threshold: float = 0.98, pruned: Pruned | None = None, features: dict | None = None, supernodes=(),
                title: str = "") -> dict:  # fmt: skip
    """Write `graph.json` (circuit-tracer / Neuronpedia schema, pruned), `graph.html` (the
    standalone viewer), `scores.json` and `graph.npz` (the full graph) into directory `out`, each file
    whole (a temporary name, then renamed).
    `pruned`: a `prune` result already computed for `g` (its thresholds win); else pruned here."""
    from ._html import graph_html

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores = graph_scores(g)
    pruned = pruned or prune(g, node_threshold, edge_threshold)
    node_threshold, edge_threshold = pruned.node_threshold, pruned.edge_threshold
    js = graph_json(g, pruned, slug=slug, supernodes=supernodes, scores=scores,
                    labels={k: v.get("label", "") for k, v in (features or {}).items()})  # fmt: skip
    # each file is written whole (a temporary name, then renamed): an interruption leaves no half file
    write_text(out / "graph.json", json.dumps(js))
    write_text(out / "graph.html", graph_html(js, features, title=title or g.prompt))
    g.save(out / "graph.npz")
    summary = dict(scores, prompt=g.prompt, nodes=len(js["nodes"]), links=len(js["links"]), **g.info,
                   logits={s: float(p) for s, p in zip(g.logit_strs, g.logit_probs)}, node_threshold=node_threshold,
                   edge_threshold=edge_threshold)  # fmt: skip
    write_text(out / "scores.json", json.dumps(summary, indent=1))
    return summary
