"""The edge graph, edge patching, path patching and EAP / EAP-IG on tiny models."""

import jax
import numpy as np
import pytest
from conftest import tiny_configs

import circuits_jax as cj
from circuits_jax import Config, Graph

CONFIGS = {k: v for k, v in tiny_configs().items() if v.causal}


def _setup(name, std=0.3):
    cfg = CONFIGS[name]
    model = cj.init_model(cfg, key=jax.random.key(1), std=std)
    rng = np.random.default_rng(0)
    clean = rng.integers(0, cfg.d_vocab, (2, 6)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 5) % cfg.d_vocab
    return model, clean, corrupt, cj.LogitDiff(np.array([1, 2]), np.array([3, 4]))


def test_graph_of_smollm2_shape():
    cfg = Config(d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_head=64, d_mlp=1536, d_vocab=100, n_ctx=64,
                 normalization="rmsnorm", positional="rotary", gated_mlp=True, act="silu")  # fmt: skip
    g = Graph.of(cfg)
    assert len(g.sources) == 1 + 30 * 9 + 30 and len(g.destinations) == 30 * (9 + 3 + 3 + 1) + 1
    m = g.mask
    assert m[g.source_index("input")].all()  # the embedding reaches everything
    assert m[:, g.destination_index("logits")].all()  # everything reaches the logits
    assert m[g.source_index("a3.h2"), g.destination_index("m3")]  # a layer's heads feed its own MLP
    assert not m[g.source_index("a3.h2"), g.destination_index("a3.h5<q>")]  # but not its own heads
    assert not m[g.source_index("m3"), g.destination_index("a3.kv0<k>")]
    assert m[g.source_index("m3"), g.destination_index("a4.kv2<v>")]
    assert len(g.edges()) == g.n_edges == int(m.sum())


def test_bad_edge_names_the_nearest_valid_ones():
    g = Graph.of(CONFIGS["gpt2like"])
    with pytest.raises(KeyError, match=r"nearest valid edges: .*a0\.h1->a1\.h2<q>"):
        g.edge_index("a1.h1->a1.h2<q>")  # same layer: no edge
    with pytest.raises(KeyError, match=r"nearest valid: .*a2\.h3<q>"):
        g.edge_index("a0.h1->a2.h3<x>")
    with pytest.raises(KeyError, match="not of the form"):
        g.edge_index("a0.h1")
    with pytest.raises(KeyError, match="unknown destination 'a9.h9<q>'"):
        g.select("a9.h9<q>")


def test_split_inputs_leave_the_forward_unchanged_and_refuse_ln1():
    model, clean, _, _ = _setup("llamalike")
    base = cj.run(model, clean).logits
    split = cj.run(model, clean, cache=["blocks.1.hook_q_input", "blocks.0.hook_mlp_in"])
    np.testing.assert_allclose(np.asarray(split.logits), np.asarray(base), atol=1e-5)
    assert split.cache["blocks.1.hook_q_input"].shape == (2, 6, 4, 16)
    with pytest.raises(ValueError, match="split q/k/v inputs"):
        cj.run(model, clean, cache=["blocks.1.hook_k_input", "blocks.1.ln1.hook_scale"])


@pytest.mark.slow_after_first
@pytest.mark.parametrize("name", ["gpt2like", "llamalike"])
def test_eap_is_the_derivative_of_exact_edge_patching(name):
    """EAP(s->d) = d/dw metric(patch w of edge s->d) at w = 0: check against finite differences."""
    model, clean, corrupt, metric = _setup(name)
    eap = cj.edge_attribution(model, clean, corrupt, metric, "eap")
    g = eap.graph
    s, d = np.nonzero(g.mask)
    pick = np.random.default_rng(1).choice(len(s), 8, replace=False)
    eps = 1e-2
    sets = np.zeros((8, *g.mask.shape), np.float32)
    sets[np.arange(8), s[pick], d[pick]] = eps
    raw = cj.patch_edges(model, clean, corrupt, metric, sets, progress=False)
    fd = (raw - eap.corrupt_metric) / eps
    np.testing.assert_allclose(fd, eap.scores[s[pick], d[pick]], rtol=0.05, atol=2e-3)
    assert np.all(eap.scores[~g.mask] == 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2like", "llamalike", "attn_only"])
def test_every_path_from_senders_equals_their_activation_patch(name):
    model, clean, corrupt, metric = _setup(name)
    g = Graph.of(model.cfg)
    senders = g.select("a1.h*", of="sources")
    every = np.zeros((1, *g.mask.shape), np.float32)
    every[0, senders] = 1  # to every destination (the mask keeps the downstream ones)
    raw = cj.patch_edges(model, clean, corrupt, metric, every, progress=False)
    exact = cj.patch_set(model, clean, corrupt, metric, [("z", 1, {})], progress=False)
    np.testing.assert_allclose(raw, exact.raw, rtol=1e-4, atol=1e-5)
    # path_patch to every receiver of one sender head is that head's activation patch
    pp = cj.path_patch(model, clean, corrupt, metric, receivers="*", progress=False)
    heads = cj.patch_sweep(model, clean, corrupt, metric, "z", ("layer", "head"), progress=False)
    np.testing.assert_allclose(pp.raw, heads.raw, rtol=1e-4, atol=1e-5)
    assert pp.axes == ("layer", "head") and pp.result.shape == heads.result.shape


def test_no_path_selected_changes_nothing():
    model, clean, corrupt, metric = _setup("gpt2like")
    g = Graph.of(model.cfg)
    raw = cj.patch_edges(model, clean, corrupt, metric, np.zeros((2, *g.mask.shape)), progress=False)
    logits = cj.run(model, corrupt).logits[:, -1]
    corrupt_metric = float(metric(logits))
    np.testing.assert_allclose(raw, corrupt_metric, rtol=1e-6)
    # Senders downstream of the receiver have no path to it: the corrupt run, up to rounding. The edge
    # programs rebuild each destination's input as a sum of source outputs where the plain forward adds
    # them into one residual stream, the same float32 additions in another order, so the metric (a
    # difference of logits of size ~3 here) moves by an ulp or two: 2.4e-7 measured on gpt2like and
    # llamalike. 1e-6 of the largest logit is ~10 ulps. Compared raw: the normalised result divides by
    # clean - corrupt (0.08 here), which scaled that rounding to 3e-6, and exact equality failed on it.
    tol = 1e-6 * float(np.abs(logits).max())
    pp = cj.path_patch(model, clean, corrupt, metric, receivers="a1.h*<q>", progress=False)
    np.testing.assert_allclose(pp.raw[1:], pp.corrupt_metric, rtol=0, atol=tol)
    np.testing.assert_allclose(pp.corrupt_metric, corrupt_metric, rtol=0, atol=tol)
    assert np.any(np.abs(pp.result[0]) > 1e-2)  # while the senders before the receiver do move it


@pytest.mark.slow
def test_single_edge_program_matches_edge_sets_and_names():
    model, clean, corrupt, metric = _setup("llamalike")
    g = Graph.of(model.cfg)
    names = ["input->a0.h1<q>", "a0.h2->a2.kv1<k>", "m1->logits", "a2.h3->m2", "a0.h0->a1.kv0<v>"]
    one = cj.patch_single_edges(model, clean, corrupt, metric, names, progress=False)
    sets = np.zeros((len(names), *g.mask.shape), np.float32)
    for r, n in enumerate(names):
        sets[(r, *g.edge_index(n))] = 1
    np.testing.assert_allclose(one, cj.patch_edges(model, clean, corrupt, metric, sets, progress=False), rtol=1e-5)
    with pytest.raises(KeyError, match="nearest valid edges"):
        cj.patch_single_edges(model, clean, corrupt, metric, ["m2->a2.h0<q>"], progress=False)


@pytest.mark.slow
def test_edge_estimates_track_exact_edge_patching():
    """On an attention-only model (nearly linear paths) every estimator ranks edges like the exact patch."""
    model, clean, corrupt, metric = _setup("attn_only")
    exact = cj.edge_patch_all(model, clean, corrupt, metric, progress=False)
    m = exact.mask
    for method in cj.EDGE_METHODS:
        est = cj.edge_attribution(model, clean, corrupt, metric, method, steps=4)
        assert np.corrcoef(est.scores[m], exact.scores[m])[0, 1] > 0.98, method
    with pytest.raises(KeyError, match="did you mean 'eap-ig'"):
        cj.edge_attribution(model, clean, corrupt, metric, "eap_ig")


@pytest.mark.slow
def test_eap_ig_activations_rows_sum_to_node_integrated_gradients():
    """A source's edges cover all its paths, so its edge scores sum to the source's own IG, here the
    attention output of layer 0 (the sum of its heads' rows) against `integrated_gradients`' estimate
    of patching `attn_out` with the activation itself interpolated."""
    model, clean, corrupt, metric = _setup("gpt2like", std=0.2)
    g = Graph.of(model.cfg)
    est = cj.edge_attribution(model, clean, corrupt, metric, "eap-ig-activations", steps=64)
    heads0 = est.scores[g.select("a0.h*", of="sources")].sum()
    # exact integral of the metric along the same straight line (the fundamental theorem of calculus)
    full = cj.patch_set(model, clean, corrupt, metric, [("attn_out", 0, {})], progress=False)
    np.testing.assert_allclose(heads0, full.raw[0] - full.corrupt_metric, rtol=2e-2, atol=2e-3)
