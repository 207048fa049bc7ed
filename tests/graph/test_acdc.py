"""ACDC: the batched, speculative traversal equals a plain one-edge-at-a-time ACDC on tiny models."""

import jax
import numpy as np
import pytest
from conftest import tiny_configs

import circuits_jax as cj

CONFIGS = {k: v for k, v in tiny_configs().items() if v.causal}


def _setup(name, seed=1):
    cfg = CONFIGS[name]
    model = cj.init_model(cfg, key=jax.random.key(seed), std=0.3)
    rng = np.random.default_rng(0)
    clean = rng.integers(0, cfg.d_vocab, (2, 6)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 1:4] = (corrupt[:, 1:4] + 5) % cfg.d_vocab
    # the answer is the clean run's top token, the wrong one the corrupt run's: clean > corrupt
    answer, wrong = (np.argmax(cj.run(model, t).logits[:, -1], -1) for t in (clean, corrupt))
    return model, clean, corrupt, cj.LogitDiff(answer, wrong)


def _naive_acdc(model, clean, corrupt, threshold):
    """ACDC written out: every candidate is its own full circuit run (no upstream reuse, no batching)."""
    g = cj.Graph.of(model.cfg)
    kl = cj.KLFrom(cj.run(model, clean).logits[:, -1])
    loss = lambda keep: float(cj.circuit_metrics(model, clean, corrupt, kl, keep)[0])  # noqa: E731
    keep = g.mask.copy()
    cur = loss(keep)
    effects = {}
    for j in sorted(range(len(g.destinations)), key=lambda j: (g.dest_order[j], j), reverse=True):
        fed = g.feeds[j]
        if fed.any() and not keep[fed].any():
            keep[:, j] = False
            continue
        for i in np.nonzero(g.mask[:, j])[0][::-1]:
            keep[i, j] = False
            new = loss(keep)
            effects[(i, j)] = new - cur
            if new - cur < threshold:
                cur = new
            else:
                keep[i, j] = True
    return keep, effects


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llamalike", "attn_only"])
def test_batched_acdc_equals_plain_sequential_acdc(name):
    model, clean, corrupt, metric = _setup(name)
    ref_keep, ref_effects = _naive_acdc(model, clean, corrupt, 0.02)
    for window in (1, 5):
        c = cj.acdc(model, clean, corrupt, metric, threshold=0.02, window=window, progress=False)
        np.testing.assert_array_equal(c.edges, ref_keep)
        got = {(i, j): c.scores[i, j] for (i, j) in ref_effects}
        np.testing.assert_allclose(list(got.values()), list(ref_effects.values()), rtol=1e-4, atol=1e-5)
        assert np.isnan(c.scores[c.graph.mask]).sum() == c.meta["edges_skipped"]
    assert 0 < ref_keep.sum() < ref_keep.size  # the threshold decided something both ways


@pytest.mark.slow
def test_node_acdc_circuit_scores_its_own_final_loss_and_matches_window_one():
    model, clean, corrupt, metric = _setup("gpt2like")
    a = cj.acdc(model, clean, corrupt, metric, threshold=0.01, level="node", window=1, progress=False)
    b = cj.acdc(model, clean, corrupt, metric, threshold=0.01, level="node", window=4, progress=False)
    np.testing.assert_array_equal(a.edges, b.edges)
    kl = cj.KLFrom(cj.run(model, clean).logits[:, -1])
    # node removal (hooked outputs) and edge cuts of every outgoing edge are the same ablation
    np.testing.assert_allclose(cj.circuit_metrics(model, clean, corrupt, kl, b.edges)[0], b.meta["final_loss"], rtol=1e-4, atol=1e-5)
    assert set(b.meta["node_scores"]) == set(b.graph.sources[1:])


def test_threshold_that_prunes_everything_warns_and_reports_empty_metric():
    model, clean, corrupt, metric = _setup("attn_only")
    with pytest.warns(UserWarning, match="pruned every edge"):
        c = cj.acdc(model, clean, corrupt, metric, threshold=1e9, progress=False)
    assert not c.edges[:, -1].any() and c.meta["faithfulness"] == 0.0
    np.testing.assert_allclose(c.meta["metric"], c.meta["metric_empty"])
    with pytest.warns(UserWarning, match="pruned every head and MLP"):  # node level keeps the input node
        c = cj.acdc(model, clean, corrupt, metric, threshold=1e9, level="node", progress=False)
    assert c.nodes == ["input"]


def test_task_metric_loss_and_bad_arguments():
    model, clean, corrupt, metric = _setup("attn_only")
    c = cj.acdc(model, clean, corrupt, metric, threshold=0.05, loss="metric", progress=False)
    assert c.meta["metric_full"] > c.meta["metric_empty"] and c.edges[:, -1].any()
    np.testing.assert_allclose(c.meta["final_loss"], -c.meta["metric"], rtol=1e-4, atol=1e-5)  # loss = -metric
    with pytest.raises(KeyError, match="valid: kl, metric"):
        cj.acdc(model, clean, corrupt, metric, threshold=0.1, loss="kld")
    with pytest.raises(KeyError, match="valid: edge, node"):
        cj.acdc(model, clean, corrupt, metric, threshold=0.1, level="head")


@pytest.mark.slow
def test_padded_batches_score_the_found_circuit_consistently():
    """Right-padded rows with their own answer positions: the walk's final loss is the found circuit's KL."""
    model, clean, corrupt, metric = _setup("llamalike")
    clean, corrupt = np.concatenate([clean, clean[:1]]), np.concatenate([corrupt, corrupt[:1]])
    mask = np.ones(clean.shape, bool)
    mask[2, 4:] = False
    pos = np.array([5, 5, 3])
    metric = cj.LogitDiff(np.array([1, 2, 3]), np.array([4, 5, 6]))
    c = cj.acdc(model, clean, corrupt, metric, threshold=0.01, window=3, attention_mask=mask, answer_pos=pos, progress=False)
    kl = cj.KLFrom(cj.run(model, clean, attention_mask=mask).logits[np.arange(3), pos])
    found = cj.circuit_metrics(model, clean, corrupt, kl, c.edges, attention_mask=mask, answer_pos=pos)[0]
    np.testing.assert_allclose(found, c.meta["final_loss"], rtol=1e-4, atol=1e-6)
    assert 0 < c.n_edges < c.graph.n_edges
