"""Circuit runs (edges outside a circuit ablated) and MIB faithfulness, on tiny models."""

import jax
import numpy as np
import pytest
from conftest import tiny_configs

import circuits_jax as cj

CONFIGS = {k: v for k, v in tiny_configs().items() if v.causal}


def _setup(name):
    cfg = CONFIGS[name]
    model = cj.init_model(cfg, key=jax.random.key(1), std=0.3)
    rng = np.random.default_rng(0)
    clean = rng.integers(0, cfg.d_vocab, (2, 6)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 5) % cfg.d_vocab
    return model, clean, corrupt, cj.LogitDiff(np.array([1, 2]), np.array([3, 4]))


def _metric(model, tokens, metric):
    return float(metric(cj.run(model, tokens).logits[:, -1]))


@pytest.mark.slow_after_first
@pytest.mark.parametrize("name", ["gpt2like", "llamalike", "attn_only"])
def test_full_circuit_is_clean_empty_is_corrupt_one_cut_is_its_noising_patch(name):
    model, clean, corrupt, metric = _setup(name)
    g = cj.Graph.of(model.cfg)
    full, empty = cj.circuit_metrics(model, clean, corrupt, metric, np.stack([g.mask, np.zeros_like(g.mask)]))
    np.testing.assert_allclose(full, _metric(model, clean, metric), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(empty, _metric(model, corrupt, metric), rtol=1e-5, atol=1e-5)
    # one edge cut: the destination alone reads the corrupt output of the source = noising that edge
    rng = np.random.default_rng(2)
    s, d = np.nonzero(g.mask)
    pick = rng.choice(len(s), 5, replace=False)
    circuits = np.repeat(g.mask[None], 5, 0)
    circuits[np.arange(5), s[pick], d[pick]] = False
    cut = cj.circuit_metrics(model, clean, corrupt, metric, circuits)
    noised = cj.patch_single_edges(model, clean, corrupt, metric, np.stack([s[pick], d[pick]], 1), noising=True,
                                   progress=False)  # fmt: skip
    np.testing.assert_allclose(cut, noised, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cutting_every_edge_into_a_node_equals_patching_its_input():
    """Cutting all edges into m1 (its whole input) = running m1 on the corrupt stream: the same as
    cutting every edge out of every source upstream of it into m1, checked against the explicit
    edge sets of path patching in noising mode (all upstream sources -> m1)."""
    model, clean, corrupt, metric = _setup("gpt2like")
    g = cj.Graph.of(model.cfg)
    j = g.destination_index("m1")
    circuit = g.mask.copy()
    circuit[:, j] = False
    got = cj.circuit_metrics(model, clean, corrupt, metric, circuit)
    sets = np.zeros((1, *g.mask.shape), np.float32)
    sets[0, :, j] = 1
    want = cj.patch_edges(model, clean, corrupt, metric, sets, noising=True, progress=False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_faithfulness_curve_ends_at_one_and_reports_the_empty_circuit():
    model, clean, corrupt, metric = _setup("attn_only")
    eap = cj.edge_attribution(model, clean, corrupt, metric, "eap", noising=True)
    r = cj.faithfulness(model, clean, corrupt, metric, eap)
    assert r["f"].shape == (len(cj.FAITHFULNESS_KS),) and r["edges"][-1] == eap.graph.n_edges
    np.testing.assert_allclose(r["f"][-1], 1.0, atol=1e-5)  # every edge: the model itself
    np.testing.assert_allclose(r["empty"], _metric(model, corrupt, metric), rtol=1e-5)
    assert r["edges"] == sorted(r["edges"]) and r["edges"][0] >= 1
    np.testing.assert_allclose(r["cpr"], np.trapezoid(r["f"], r["ks"]))


def test_zero_and_mean_ablation_and_bad_names():
    model, clean, corrupt, metric = _setup("llamalike")
    g = cj.Graph.of(model.cfg)
    zero = cj.ablated_outputs(model, clean, ablation="zero")
    mean = cj.ablated_outputs(model, clean, ablation="mean")
    assert zero.shape == mean.shape == (len(g.sources), 2, 6, model.cfg.d_model) and float(np.abs(zero).max()) == 0
    np.testing.assert_allclose(np.asarray(mean[:, 0, 0]), np.asarray(mean[:, 1, 5]))
    full = cj.circuit_metrics(model, clean, corrupt, metric, g.mask, ablation="zero")
    np.testing.assert_allclose(full, _metric(model, clean, metric), rtol=1e-5, atol=1e-5)  # nothing ablated
    with pytest.raises(KeyError, match="unknown ablation 'random'"):
        cj.circuit_metrics(model, clean, corrupt, metric, g.mask, ablation="random")
    with pytest.raises(ValueError, match="circuits have shape"):
        cj.circuit_metrics(model, clean, corrupt, metric, np.ones((3, 3), bool))
