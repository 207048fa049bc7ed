"""Circuits from edge scores (top-n, greedy, pruning) and ROC AUC against a known circuit."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import circuits_jax as cj
from circuits_jax import Config
from circuits_jax.graph._circuit import _auc

CFG = Config(d_model=16, n_layers=3, n_heads=4, d_head=4, d_vocab=23, n_ctx=32, d_mlp=32, n_kv_heads=2)


def _scores(seed=0):
    g = cj.Graph.of(CFG)
    return g, np.where(g.mask, np.random.default_rng(seed).normal(size=g.mask.shape), 0.0)


@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=12),
       st.lists(st.integers(-3, 3).map(float), min_size=1, max_size=12))  # fmt: skip
@settings(max_examples=60, deadline=None)
def test_auc_is_the_fraction_of_correctly_ordered_pairs(pos, neg):
    pos, neg = np.asarray(pos), np.asarray(neg)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert _auc(pos, neg) == pytest.approx(brute)


def test_topn_keeps_exactly_n_largest_and_greedy_grows_from_the_logits():
    g, s = _scores()
    top = cj.circuit_from_scores(s, 20, graph=g)
    assert top.n_edges == 20
    assert np.abs(s[top.edges]).min() >= np.abs(s[g.mask & ~top.edges]).max()
    greedy = cj.circuit_from_scores(s, 20, method="greedy", graph=g)
    assert greedy.n_edges == 20 and greedy.edges[:, -1].any()
    # every kept edge's destination feeds a node that itself sends a kept edge (or is the logits)
    sends = greedy.edges.any(axis=1)
    for j in np.nonzero(greedy.edges.any(axis=0))[0]:
        assert j == len(g.destinations) - 1 or sends[g.feeds[j]].any()
    # pruning keeps a greedy circuit's destination side intact and never adds edges
    pruned = cj.prune_dangling(g, top.edges)
    assert (pruned <= top.edges).all() and cj.prune_dangling(g, pruned).sum() == pruned.sum()
    with pytest.raises(KeyError, match="valid: topn, greedy"):
        cj.circuit_from_scores(s, 5, method="best", graph=g)


def test_roc_auc_perfect_reversed_and_sweep():
    g, s = _scores(1)
    truth = np.zeros_like(g.mask)
    truth[0, -1] = truth[3, 20] = truth[5, -1] = True
    truth &= g.mask
    perfect = np.where(truth, 10.0, np.abs(s))
    auc = cj.roc_auc(perfect, truth, graph=g)
    assert (auc.edge, auc.node, auc["edge"], auc["node"]) == (1.0, 1.0, 1.0, 1.0) and auc.edge_points is None
    assert cj.roc_auc(-perfect, truth, graph=g, absolute=False)["edge"] == 0.0
    exact = cj.Circuit(g, truth)
    sweep = cj.roc_sweep([exact, cj.Circuit(g, g.mask), cj.Circuit(g, np.zeros_like(truth))], truth)
    assert sweep["edge"] == 1.0 and sweep["node"] == 1.0
    # a circuit that keeps everything but the truth is worse than chance
    assert cj.roc_sweep([cj.Circuit(g, g.mask & ~truth)], truth)["edge"] < 0.5


def test_node_ranking_top_edges_are_the_subgraph_induced_by_the_top_nodes():
    g = cj.Graph.of(CFG)
    scores = {name: float(v) for name, v in zip(g.sources[1:], np.random.default_rng(3).permutation(len(g.sources) - 1) + 1.0)}
    rank = cj.node_ranking(g, scores)
    top = sorted(scores, key=scores.get, reverse=True)[:6]
    kept = set(top) | {"input"}
    # every edge whose source and destination node are both kept, and no other, for the size that set has
    induced = np.array([[g.mask[i, j] and s in kept and (j == len(g.destinations) - 1 or
                         any(g.sources[k] in kept for k in np.nonzero(g.feeds[j])[0]))
                         for j in range(len(g.destinations))] for i, s in enumerate(g.sources)])  # fmt: skip
    got = cj.top_edges(rank, g.mask, induced.sum() / g.n_edges)
    np.testing.assert_array_equal(got, induced)
