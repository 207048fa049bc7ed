"""Causal scrubbing (Chan et al. 2022): test a hypothesis by resampling everything it calls unimportant.

A hypothesis is a tree of interpretation nodes over `Graph.of(cfg)`. The root, `output`, is the
logits. Every other node claims a set of edges `source -> destination` whose destinations are
inputs of its parent's sources (the logits, for children of the root), and an equivalence rule: a
`feature(tokens [N, T]) -> [N, ...]` per input; two inputs are equivalent for the node when their
feature rows are equal (`feature=None`: the exact same tokens). The node's *value* is the output of
its edges' sources.

Scrubbing one sampled tree, from a reference input x_ref drawn from the dataset:

- the root runs on x_ref; each child node gets an input drawn uniformly from the dataset rows whose
  feature equals its parent's input's feature (recursively: equivalence to the parent, not to x_ref);
- each node instance u (input x_u) also draws an independent random row r_u: every edge into u's
  sources that no child of u claims carries the source's output on r_u; every claimed edge carries
  the source's output computed in the claiming child's instance. So the tree is already treeified:
  a source claimed under two parents is computed twice, on two inputs.

Realisation: instances are evaluated children first, two runs each over a batch of trees
`[B, T]`: run A on r_u caches every source output `[S, B, T, D]` and destination input
`[Dst, B, T, D]`; run B, on x_u, *replaces* every destination input by

    input_d = input_d(r_u) + sum_{claimed (s, d), child C} (output_s(C) - output_s(r_u))

(biases come with the cached inputs) and records every source output and the logits. Replacing,
rather than adding, holds every input fixed whatever changed upstream in run B, so a source's output
is exactly its function of the inputs the hypothesis gives it. All instances of all trees of a
chunk are one compiled program; trees are sampled up front with numpy from a seed.

Loss recovered: f = (L_empty - L_hyp) / (L_empty - L_model), where L_model is the unscrubbed loss on
x_ref and L_empty the empty hypothesis (the logits read everything from a random input), all on the
same reference inputs. The identity hypothesis (`identity_hypothesis`: every edge of every path
claimed, exact-input equivalence) recovers 1 and the empty one 0; the 95 % interval is a
bootstrap over trees.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
from typing import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from ..core import (
    Pairs,
    Result,
    Task,
    check_ablation,
    ALL_LAYERS,
    Config,
    Graph,
    Hook,
    PerLayer,
    Replace,
    Transformer,
    dest_kinds,
    dest_stack,
    in_chunks,
    run,
    source_outputs,
    source_sites,
)
from ._circuit import pairs_outputs

ROOT = "output"


@dataclasses.dataclass(frozen=True)
class Node:
    """An interpretation node: `edges` (names or globs `"a0.h*->a1.h2<k>"`, a comma string or a list)
    it claims into its `parent`'s sources, and the `feature` its inputs must share with the parent's
    (None: the exact tokens)."""

    name: str
    edges: str | Sequence[str]
    parent: str = ROOT
    feature: Callable[[np.ndarray], np.ndarray] | None = None


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """Interpretation nodes forming a tree under `output` (the logits); `Hypothesis(())` is the empty one."""

    nodes: tuple[Node, ...] = ()
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "nodes", tuple(self.nodes))


@dataclasses.dataclass(frozen=True)
class _Tree:
    """A validated hypothesis: nodes in evaluation order (children first, root last)."""

    names: tuple[str, ...]  # index i = instance i; the root is last
    children: tuple[tuple[int, ...], ...]
    claims: np.ndarray  # [I, S, Dst] bool: the edges node i claims into its parent
    parents: tuple[int, ...]  # -1 for the root
    features: tuple


def _edges_of(graph: Graph, node: Node) -> np.ndarray:
    """`[S, Dst]` bool of the edges a node claims; unknown names raise with the nearest valid ones."""
    specs = node.edges.split(",") if isinstance(node.edges, str) else list(node.edges)
    out = np.zeros(graph.mask.shape, bool)
    for spec in (s.strip() for s in specs if s.strip()):
        if "->" not in spec:
            raise KeyError(f"node {node.name!r}: edge {spec!r} is not of the form 'source->destination', "
                           "e.g. 'a0.h1->a1.h2<k>'")  # fmt: skip
        s, d = (p.strip() for p in spec.split("->", 1))
        try:
            si, di = graph.select(s, of="sources"), graph.select(d)
        except KeyError as e:
            raise KeyError(f"node {node.name!r}: {e.args[0]}") from None
        real = graph.mask[np.ix_(si, di)]
        if not real.any():
            if "*" not in spec and "?" not in spec:
                graph.edge_index(f"{s}->{d}")  # raises, naming the nearest real edges
            raise KeyError(f"node {node.name!r}: {spec!r} matches no edge (every source comes after every destination)")
        out[np.ix_(si, di)] |= real
    if not out.any():
        raise ValueError(f"node {node.name!r} claims no edges")
    return out


def build_tree(cfg: Config, hypothesis: Hypothesis) -> _Tree:
    """Validate a hypothesis against `Graph.of(cfg)` and order it for evaluation.

    Refused: duplicate or unknown node names and parents (nearest names given), unknown or missing
    edges, two nodes with the same parent claiming an edge in common (both nodes and the edges named:
    one treeified site cannot carry two inputs), and a node whose edges do not enter its parent's
    sources (unreachable from the output through the claimed edges), named with its destinations.
    """
    graph = Graph.of(cfg)
    nodes = list(hypothesis.nodes)
    names = [n.name for n in nodes]
    for n in names:
        if n == ROOT or names.count(n) > 1:
            raise ValueError(f"interpretation node name {n!r} is {'reserved for the root' if n == ROOT else 'used twice'}")
    valid = [ROOT, *names]
    claims = {n.name: _edges_of(graph, n) for n in nodes}
    for n in nodes:
        if n.parent not in valid:
            close = difflib.get_close_matches(n.parent, valid, n=3, cutoff=0.5)
            raise KeyError(f"node {n.name!r}: unknown parent {n.parent!r}; nearest: {', '.join(close) or ', '.join(valid[:4])}")
    # every chain of parents must reach the root
    by_name = {n.name: n for n in nodes}
    for n in nodes:
        seen, p = [n.name], n.parent
        while p != ROOT:
            if p in seen:
                raise ValueError(f"interpretation nodes {' -> '.join(seen + [p])} form a cycle; the tree must end at {ROOT!r}")
            seen.append(p)
            p = by_name[p].parent
    # siblings may not claim a site in common
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            both = claims[a.name] & claims[b.name]
            if a.parent == b.parent and both.any():
                s, d = np.nonzero(both)
                over = ", ".join(f"{graph.sources[x]}->{graph.destinations[y]}" for x, y in zip(s[:5], d[:5]))
                raise ValueError(f"interpretation nodes {a.name!r} and {b.name!r} (both under {a.parent!r}) claim "
                                 f"overlapping sites: {over}{' ...' if len(s) > 5 else ''}")  # fmt: skip
    # every claimed edge must enter the parent's sources
    logits = len(graph.destinations) - 1
    for n in nodes:
        if n.parent == ROOT:
            ok = np.zeros(len(graph.destinations), bool)
            ok[logits] = True
            into = "the logits"
        else:
            srcs = claims[n.parent].any(axis=1)  # the parent's sources
            ok = (graph.feeds & srcs[None]).any(axis=1)  # destinations that are inputs of those sources
            into = f"{n.parent!r}'s sources ({', '.join(graph.sources[i] for i in np.flatnonzero(srcs))})"
        bad = claims[n.name].any(axis=0) & ~ok
        if bad.any():
            raise ValueError(f"interpretation node {n.name!r} is unreachable from the output: its edges into "
                             f"{', '.join(graph.destinations[j] for j in np.flatnonzero(bad))} do not enter {into}")  # fmt: skip
    # children-first order (post-order from the root)
    kids: dict[str, list[str]] = {ROOT: []}
    for n in nodes:
        kids.setdefault(n.parent, []).append(n.name)
    order: list[str] = []

    def visit(name):
        for c in kids.get(name, []):
            visit(c)
        order.append(name)

    visit(ROOT)
    idx = {n: i for i, n in enumerate(order)}
    zero = np.zeros(graph.mask.shape, bool)
    return _Tree(
        names=tuple(order),
        children=tuple(tuple(idx[c] for c in kids.get(n, [])) for n in order),
        claims=np.stack([claims.get(n, zero) for n in order]),
        parents=tuple(-1 if n == ROOT else idx[by_name[n].parent] for n in order),
        features=tuple(None if n == ROOT else by_name[n].feature for n in order),
    )


def identity_hypothesis(cfg: Config) -> Hypothesis:
    """Every edge on every path to the logits claimed, each treeified copy its own node, with exact-input
    equivalence: scrubbing it reproduces the model. Node count grows exponentially with depth (49 nodes
    for 2 layers of 4 heads); meant for tests and small models."""
    graph = Graph.of(cfg)
    nodes: list[Node] = []

    def grow(parent: str, dest_ids: np.ndarray):
        for s in np.flatnonzero(graph.mask[:, dest_ids].any(axis=1)):
            src = graph.sources[s]
            dests = [graph.destinations[j] for j in dest_ids if graph.mask[s, j]]
            name = f"{parent}/{src}" if parent != ROOT else src
            nodes.append(Node(name, [f"{src}->{d}" for d in dests], parent))
            grow(name, np.flatnonzero(graph.feeds[:, s]))

    grow(ROOT, np.asarray([len(graph.destinations) - 1]))
    return Hypothesis(tuple(nodes), "identity")


# ---------------------------------------------------------------------------
# Sampling trees (numpy, seeded)
# ---------------------------------------------------------------------------


def _classes(feature, tokens: np.ndarray) -> np.ndarray:
    """`[N]` int: the equivalence class of every dataset row under a feature (None: the row itself)."""
    f = tokens if feature is None else np.asarray(feature(tokens))
    if f.shape[0] != tokens.shape[0]:
        raise ValueError(f"a feature must give one row per input: got shape {f.shape} for {tokens.shape[0]} inputs")
    f = f.reshape(f.shape[0], -1)
    return np.unique(f, axis=0, return_inverse=True)[1].reshape(-1)


def sample_trees(tree: _Tree, tokens: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """`[n, 1 + 2 I]` int rows of dataset indices: the reference input, the I nodes' inputs, then their I
    random inputs (nodes in `tree.names` order, the root last). References come first from the seed, so
    every hypothesis sampled with one seed shares its reference inputs."""
    rng = np.random.default_rng(seed)
    N = len(tokens)
    refs = rng.integers(0, N, n)
    I = len(tree.names)
    inputs, randoms = np.zeros((I, n), np.int64), rng.integers(0, N, (I, n))
    inputs[I - 1] = refs
    for i in reversed(range(I - 1)):  # parents come after their children: fill top-down
        cls = _classes(tree.features[i], tokens)
        order = np.argsort(cls, kind="stable")
        starts = np.searchsorted(cls[order], np.arange(cls.max() + 1))
        counts = np.bincount(cls)
        want = cls[inputs[tree.parents[i]]]
        pick = np.floor(rng.random(n) * counts[want]).astype(np.int64)
        inputs[i] = order[starts[want] + pick]
    return np.concatenate([refs[:, None], inputs.T, randoms.T], axis=1)


# ---------------------------------------------------------------------------
# The scrubbed runs: one compiled program per hypothesis and chunk size
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NextTokenLoss:
    """Per-example cross-entropy of `tokens[:, p + 1]` predicted at each position p, averaged over
    `positions` (negative positions count from the end)."""

    positions: tuple[int, ...] = (-2,)

    def __call__(self, logits: Array, tokens: Array) -> Array:
        T = tokens.shape[1]
        p = jnp.asarray([q % T for q in self.positions])
        logp = jax.nn.log_softmax(logits[:, p].astype(jnp.float32), axis=-1)
        target = tokens[:, p + 1]
        return -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0].mean(axis=1)


def _dest_names(cfg: Config) -> list[str]:
    return [f"blocks.{l}.{k}" for l in range(cfg.n_layers) for k in dest_kinds(cfg)]


def _unstack_dests(cfg: Config, dest: Array) -> dict[str, Array]:
    """Inverse of `dest_stack`: `[Dst, B, T, D]` -> per kind `[L, B, T, (n,) D]` and `"final"` `[B, T, D]`."""
    L, H, K = cfg.n_layers, cfg.n_heads, cfg.kv_heads
    per = H + 2 * K + (0 if cfg.attn_only else 1)
    body = jnp.moveaxis(dest[:-1].reshape(L, per, *dest.shape[1:]), 1, 3)  # [L, B, T, per, D]
    out = {"hook_q_input": body[:, :, :, :H], "hook_k_input": body[:, :, :, H : H + K],
           "hook_v_input": body[:, :, :, H + K : H + 2 * K], "final": dest[-1]}  # fmt: skip
    if not cfg.attn_only:
        out["hook_mlp_in"] = body[:, :, :, -1]
    return out


def _plain(model, tokens):
    """Run A: every source output `[S, B, T, D]` and destination input `[Dst, B, T, D]` on `tokens`."""
    cfg = model.cfg
    L = cfg.n_layers
    out = run(model, tokens, cache=source_sites(cfg) + _dest_names(cfg) + [f"blocks.{L - 1}.hook_resid_post"],
              return_logits=False)  # fmt: skip
    per_kind = {k: jnp.stack([out.cache[f"blocks.{l}.{k}"] for l in range(L)]) for k in dest_kinds(cfg)}
    return source_outputs(cfg, out.cache), dest_stack(cfg, per_kind, out.cache[f"blocks.{L - 1}.hook_resid_post"])


def _given_inputs(model, tokens, dest):
    """Run B: every destination input replaced by `dest [Dst, B, T, D]`; source outputs and logits."""
    cfg = model.cfg
    parts = _unstack_dests(cfg, dest)
    hooks = [Hook(k, ALL_LAYERS, PerLayer(Replace(parts[k]))) for k in dest_kinds(cfg)]
    hooks.append(Hook("hook_resid_post", cfg.n_layers - 1, Replace(parts["final"])))
    out = run(model, tokens, hooks=hooks, cache=source_sites(cfg))
    return source_outputs(cfg, out.cache), out.logits


@eqx.filter_jit
def _scrubbed_loss(model, tokens, rows, claims, children: tuple, loss, ablated=None):
    """Per-tree loss `[B]` of the scrubbed runs: `rows [B, 1 + 2 I]` from `sample_trees`.

    ablated: None (resample: unclaimed edges carry the source's output on the random row r_u), or
    `[S, 1, 1, D]` values every unclaimed edge carries instead (zero or mean ablation)."""
    I = len(children)
    ref = tokens[rows[:, 0]]
    outs, logits = [], None
    mask = jnp.asarray(Graph.of(model.cfg).mask, jnp.float32)
    for i in range(I):  # children first: every instance's inputs are known when it runs
        x, r = tokens[rows[:, 1 + i]], tokens[rows[:, 1 + I + i]]
        out_r, dest_r = _plain(model, r)
        if ablated is not None:  # inputs = what every source ablated gives (biases kept): swap r's outputs out
            a = jnp.broadcast_to(ablated, out_r.shape)
            dest_r = dest_r + jnp.einsum("sd,sbtm->dbtm", mask, a - out_r)
            out_r = a
        delta = jnp.zeros_like(dest_r)
        for c in children[i]:
            delta = delta + jnp.einsum("sd,sbtm->dbtm", claims[c], outs[c] - out_r)
        out_i, logits = _given_inputs(model, x, dest_r + delta)
        outs.append(out_i)
    return loss(logits, ref)


@eqx.filter_jit
def _model_loss(model, tokens, rows, loss):
    ref = tokens[rows[:, 0]]
    return loss(model(ref), ref)


def _ablated_values(model, tokens_np: np.ndarray, ablation: str):
    """None for resample; else the `[S, 1, 1, D]` value every unclaimed edge carries (zero, or each source's
    mean output over the dataset's inputs and positions)."""
    name, _ = check_ablation(ablation, Task("scrub", tokens_np[:1], tokens_np[:1]), None)
    if name == "resample":
        return None
    out = pairs_outputs(Pairs(model, Task("scrub", tokens_np), ablation=name, noising=True))  # [S, N, T, D] broadcast
    return out[:, :1, :1]


def scrub_losses(model: Transformer, tokens, hypothesis: Hypothesis, loss: Callable = NextTokenLoss(), *,
                 n: int = 1000, seed: int = 0, chunk_size: int = 256, progress: bool = True,
                 ablation: str = "resample") -> np.ndarray:  # fmt: skip
    """`[n]` per-tree loss of the hypothesis scrubbed over `n` trees sampled from `tokens [N, T]` (seeded).
    `ablation`: what an unclaimed edge carries: "resample" (its source's output on a random input, causal
    scrubbing proper), "zero", or "mean" (over the dataset)."""
    tree = build_tree(model.cfg, hypothesis)
    tokens_np = np.asarray(tokens)
    rows = sample_trees(tree, tokens_np, n, seed)
    claims = jnp.asarray(tree.claims.astype(np.float32))
    toks = jnp.asarray(tokens_np, jnp.int32)
    ablated = _ablated_values(model, tokens_np, ablation)
    return in_chunks(rows, max(1, min(chunk_size, n)), lambda part: _scrubbed_loss(
        model, toks, jnp.asarray(part), claims, tree.children, loss, ablated),
        f"scrubbing {hypothesis.name or 'hypothesis'}", progress)  # fmt: skip


@dataclasses.dataclass(frozen=True, repr=False)
class ScrubResult(Result):
    """Loss recovered by each hypothesis, with per-tree losses (all on the same reference inputs)."""

    recovered: dict[str, float]
    ci: dict[str, tuple[float, float]]  # 95 % bootstrap interval over trees
    loss: dict[str, float]  # mean scrubbed loss per hypothesis
    model_loss: float
    empty_loss: float
    per_tree: dict[str, np.ndarray]  # includes "model" and "empty"
    n: int
    seconds: float
    ablation: str = "resample"

    def table(self) -> str:
        w = max([28, *map(len, self.recovered)])
        rows = [f"{'hypothesis':<{w}} {'loss':>8} {'recovered':>10}  95% CI",
                f"{'model (unscrubbed)':<{w}} {self.model_loss:8.4f} {1.0:10.3f}",
                f"{'empty (all resampled)':<{w}} {self.empty_loss:8.4f} {0.0:10.3f}"]  # fmt: skip
        for k, v in self.recovered.items():
            lo, hi = self.ci[k]
            rows.append(f"{k:<{w}} {self.loss[k]:8.4f} {v:10.3f}  [{lo:.3f}, {hi:.3f}]")
        return "\n".join(rows)


def _recovered(model_l, empty_l, hyp_l) -> float:
    return float((empty_l.mean() - hyp_l.mean()) / (empty_l.mean() - model_l.mean()))


def bootstrap_ci(model_l, empty_l, hyp_l, *, reps: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the loss recovered, resampling trees (paired across the three)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(hyp_l), (reps, len(hyp_l)))
    m, e, h = model_l[idx].mean(1), empty_l[idx].mean(1), hyp_l[idx].mean(1)
    f = (e - h) / (e - m)
    a = (1 - level) / 2
    return float(np.quantile(f, a)), float(np.quantile(f, 1 - a))


def scrub(model: Transformer, tokens, hypotheses: Hypothesis | dict[str, Hypothesis], loss: Callable = NextTokenLoss(),
          *, n: int = 1000, seed: int = 0, chunk_size: int = 256, progress: bool = True,
          ablation: str = "resample") -> ScrubResult:  # fmt: skip
    """Causal scrubbing of each hypothesis over `n` sampled trees of inputs from `tokens [N, T]`.

    loss: `loss(logits [B, T, V], tokens [B, T]) -> [B]` per example, scored against the reference
    input (default: next-token cross-entropy at the second-to-last position). Every hypothesis, the
    unscrubbed model and the empty hypothesis share the reference inputs (the same `seed`).
    Returns the fraction of loss recovered, (L_empty - L_hyp) / (L_empty - L_model), per hypothesis
    with a 95 % bootstrap interval over trees. `ablation`: what an unclaimed edge carries, "resample"
    (causal scrubbing proper: the source's output on a random input), "zero" or "mean" (over `tokens`).
    `tokens` may be a `Task` (its clean inputs are the dataset).
    """
    t0 = time.perf_counter()
    if isinstance(hypotheses, Hypothesis):
        hypotheses = {hypotheses.name or "hypothesis": hypotheses}
    tokens_np = np.asarray(tokens.clean if isinstance(tokens, Task) else tokens)
    if tokens_np.ndim != 2:
        raise ValueError(f"tokens must be a [N, T] dataset of inputs, got shape {tokens_np.shape}")
    if n < 2:
        raise ValueError(f"n={n}: need at least 2 sampled trees for an interval")
    for h in hypotheses.values():
        build_tree(model.cfg, h)  # refuse bad hypotheses before any compute
    _ablated_values(model, tokens_np[:1], ablation)  # refuse a bad ablation before any compute
    kw = dict(n=n, seed=seed, chunk_size=chunk_size, progress=progress, ablation=ablation)
    refs = sample_trees(build_tree(model.cfg, Hypothesis()), tokens_np, n, seed)
    model_l = in_chunks(refs, max(1, min(chunk_size, n)), lambda part: _model_loss(
        model, jnp.asarray(tokens_np, jnp.int32), jnp.asarray(part), loss), "unscrubbed", progress)  # fmt: skip
    empty_l = scrub_losses(model, tokens_np, Hypothesis((), "empty"), loss, **kw)
    per = {"model": model_l, "empty": empty_l}
    rec, ci, mean = {}, {}, {}
    for name, h in hypotheses.items():
        hl = scrub_losses(model, tokens_np, dataclasses.replace(h, name=name), loss, **kw)
        per[name] = hl
        rec[name] = _recovered(model_l, empty_l, hl)
        ci[name] = bootstrap_ci(model_l, empty_l, hl, seed=seed)
        mean[name] = float(hl.mean())
    return ScrubResult(rec, ci, mean, float(model_l.mean()), float(empty_l.mean()), per, n, time.perf_counter() - t0,
                       ablation)  # fmt: skip


# ---------------------------------------------------------------------------
# The induction hypothesis (worked example: `experiments/scrub_induction.py`)
# ---------------------------------------------------------------------------


def _match(tokens: np.ndarray) -> np.ndarray:
    """`[N]`: m, the position after the first earlier occurrence of the current token `tokens[:, -2]`
    (the key an induction head at the scored position should attend to)."""
    t = np.asarray(tokens)
    T = t.shape[1]
    eq = t[:, : T - 2] == t[:, T - 2 : T - 1]
    if not eq.any(axis=1).all():
        bad = int(np.flatnonzero(~eq.any(axis=1))[0])
        raise ValueError(f"row {bad}: its current token (position {T - 2}) does not occur earlier; the induction "
                         "features need repeated sequences")  # fmt: skip
    return eq.argmax(axis=1) + 1


def current_token(tokens: np.ndarray) -> np.ndarray:
    """The token at the scored position (`tokens[:, -2]`, predicting the last token)."""
    return np.asarray(tokens)[:, -2]


def token_before_match(tokens: np.ndarray) -> np.ndarray:
    """`[N, 2]`: (m, token at m - 1): what the previous-token head writes at the matching key position."""
    m = _match(tokens)
    return np.stack([m, np.asarray(tokens)[np.arange(len(m)), m - 1]], axis=1)


def token_at_match(tokens: np.ndarray) -> np.ndarray:
    """`[N, 2]`: (m, token at m): the token an induction head copies (the answer, on repeated sequences)."""
    m = _match(tokens)
    return np.stack([m, np.asarray(tokens)[np.arange(len(m)), m]], axis=1)


def induction_hypothesis(prev_heads: Sequence[int], induction_heads: Sequence[int], *, name: str = "induction",
                         value_feature: Callable | None = None, k_composition: bool = True) -> Hypothesis:  # fmt: skip
    """The induction hypothesis on a 2-layer attention-only model, at the scored position (`tokens[:, -2]`):

    - `induction`: the induction heads' output into the logits is the token after the current token's
      earlier occurrence (`token_at_match`), computed from
      - `q` (input -> their queries): the current token (`current_token`);
      - `k` (previous-token heads -> their keys): at the matching position m, the token at m - 1
        (`token_before_match`), computed from `prev_v` (input -> the previous-token heads' values),
        the same token;
      - `v` (input -> their values): the token at m (`token_at_match`; `value_feature` overrides it).
    Everything else (other heads, the direct path, positional q/k of layer 0, ...) is claimed unimportant.
    `k_composition=False` drops `k` and `prev_v`: the keys then come from a random input.
    """
    P, I = list(prev_heads), list(induction_heads)
    nodes = [Node("induction", [f"a1.h{i}->logits" for i in I], feature=token_at_match),
             Node("q", [f"input->a1.h{i}<q>" for i in I], "induction", current_token),
             Node("v", [f"input->a1.h{i}<v>" for i in I], "induction", value_feature or token_at_match)]  # fmt: skip
    if k_composition:
        nodes += [Node("k", [f"a0.h{p}->a1.h{i}<k>" for p in P for i in I], "induction", token_before_match),
                  Node("prev_v", [f"input->a0.h{p}<v>" for p in P], "k", token_before_match)]  # fmt: skip
    return Hypothesis(tuple(nodes), name)


def repeated_dataset(rows: int, n: int = 10, vocab: int = 50, seed: int = 0) -> np.ndarray:
    """`[rows, 2n + 1]` int32: `[BOS=0, r_1..r_n, r_1..r_n]` with n distinct tokens from 1..vocab-1 per row;
    the scored position (second to last) predicts r_n, which follows its earlier occurrence at position n."""
    if not 3 <= n < vocab:
        raise ValueError(f"n={n}: need 3 <= n < vocab={vocab} distinct tokens per row")
    rng = np.random.default_rng(seed)
    r = np.argsort(rng.random((rows, vocab - 1)), axis=1)[:, :n].astype(np.int32) + 1
    return np.concatenate([np.zeros((rows, 1), np.int32), r, r], axis=1)
