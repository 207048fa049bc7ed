"""Concept probes, diff-of-means, TCAV, PCA and PURE on synthetic data and tiny random models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.toolshed import _concepts as C
from tests.conftest import tiny_configs


@pytest.fixture(scope="module")
def tiny():
    return cj.init_model(tiny_configs()["llamalike"], key=jax.random.key(0))


def _separable(seed=0, n=240, d=8):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 5, size=d)  # features of different scales
    m = x @ w
    keep = np.abs(m) > 0.5 * np.std(m)  # a margin
    return x[keep].astype(np.float32), (m[keep] > 0).astype(np.int32)


def test_probe_separable_full_heldout_accuracy():
    x, y = _separable()
    tr, te = np.arange(0, len(x) * 3 // 4), np.arange(len(x) * 3 // 4, len(x))
    p = C.train_probe(x[tr], y[tr], steps=200, l2=0.0)
    assert C.probe_accuracy(p, x[te], y[te]) == 1.0
    # the probe's raw-space direction classifies like the probe (up to its bias)
    assert np.asarray(p.direction).shape == (x.shape[1],)


def test_probe_layers_vmap_equals_loop():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60).astype(np.int32)
    acts = rng.normal(size=(3, 60, 5)).astype(np.float32)
    acts[:, :, 0] += (np.array([0.5, 1.0, 3.0])[:, None] * (2 * y - 1))  # separability grows with the layer
    tr, te = np.arange(40), np.arange(40, 60)
    res = C.probe_layers(acts, y, tr, te, steps=50, seed=3)
    for l in range(3):
        key = jax.random.fold_in(jax.random.key(3), l)
        p = C.train_probe(acts[l, tr], y[tr], steps=50, key=key)
        np.testing.assert_allclose(np.asarray(res.probes.w[l]), np.asarray(p.w), rtol=1e-4, atol=1e-5)
        assert res.accuracy[l] == pytest.approx(C.probe_accuracy(p, acts[l, te], y[te]))
    assert res.accuracy[2] == 1.0


def test_probe_bad_input_errors():
    with pytest.raises(ValueError, match="labels must be"):
        C.train_probe(np.zeros((4, 2)), np.array([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="overlap"):
        C.probe_layers(np.zeros((1, 4, 2)), np.array([0, 1, 0, 1]), [0, 1, 2], [2, 3])


def test_diff_of_means_direction_and_accuracy():
    x, y = _separable(2)
    d = x[y == 1].mean(0) - x[y == 0].mean(0)
    np.testing.assert_allclose(C.diff_of_means(x, y), d / np.linalg.norm(d), rtol=1e-5, atol=1e-6)
    v, thr, acc = C.diff_of_means_accuracy(x, y, x, y)
    proj = x @ v
    assert thr == pytest.approx(0.5 * (proj[y == 1].mean() + proj[y == 0].mean()), rel=1e-5)
    assert acc == pytest.approx(np.mean((proj > thr) == (y == 1)))
    accs, dirs = C.diff_of_means_layers(np.stack([x, -x]), y, np.arange(100), np.arange(100, len(x)))
    np.testing.assert_allclose(dirs[1], -dirs[0], atol=1e-6)
    assert accs[0] == pytest.approx(accs[1])


def test_layer_activations_last_and_mean_respect_padding(tiny):
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 23, n).tolist() for n in (3, 6, 4)]
    T = 6
    toks = np.zeros((3, T), np.int32)
    mask = np.zeros((3, T), bool)
    for i, r in enumerate(rows):
        toks[i, : len(r)], mask[i, : len(r)] = r, True
    acts = C.layer_activations(tiny, toks, ["embed", 1], attention_mask=mask, chunk=2)
    mean = C.layer_activations(tiny, toks, [1], attention_mask=mask, position="mean")
    assert acts.shape == (2, 3, 16)
    # reference: no mask; the model is causal, so the right padding cannot change earlier positions
    out = cj.run(tiny, toks, cache=["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"]).cache
    for i, r in enumerate(rows):
        n = len(r)
        np.testing.assert_allclose(acts[0, i], out["blocks.0.hook_resid_pre"][i, n - 1], atol=1e-5)
        np.testing.assert_allclose(acts[1, i], out["blocks.1.hook_resid_post"][i, n - 1], atol=1e-5)
        np.testing.assert_allclose(mean[0, i], out["blocks.1.hook_resid_post"][i, 1:n].mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        C.layer_activations(tiny, toks, [3])


def test_tcav_directional_derivative_matches_finite_difference(tiny):
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 23, (4, 5)).astype(np.int32)
    target = C.logit_diff_target(1, 2)
    g = C.activation_gradients(tiny, toks, 1, target)
    v = rng.normal(size=16).astype(np.float32)
    v /= np.linalg.norm(v)
    _, S = C.tcav_scores(g, v)

    def f(eps):
        delta = np.zeros((4, 5, 16), np.float32)
        delta[:, -1] = eps * v
        logits = cj.run(tiny, toks, hooks={"blocks.1.hook_resid_post": cj.Add(delta)}).logits[:, -1]
        return np.asarray(target(logits), np.float64)

    eps = 1e-3  # small next to the residual norm (~0.1 in this random model)
    fd = (f(eps) - f(-eps)) / (2 * eps)
    np.testing.assert_allclose(S[0], fd, rtol=1e-2, atol=2e-3 * np.abs(fd).max())


def test_tcav_significance_gradient_concept_vs_random(tiny):
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 23, (40, 6)).astype(np.int32)
    target = C.logit_diff_target(1, 2)
    g = C.activation_gradients(tiny, toks, 1, target)
    gdir = g.mean(0) / np.linalg.norm(g.mean(0))
    randoms = [rng.normal(size=(30, 16)).astype(np.float32) for _ in range(10)]
    concept = (rng.normal(size=(30, 16)) + 4 * gdir).astype(np.float32)
    res = C.tcav(tiny, toks, concept, randoms, 1, target, steps=100)
    assert res.score > 0.9 and res.p_value < 0.05
    assert res.derivatives.shape == (10, 40)
    # a random "concept" is not significant (fixed seeds: deterministic)
    fake = rng.normal(size=(30, 16)).astype(np.float32)
    null = C.tcav(tiny, toks, fake, randoms, 1, target, steps=100)
    assert null.p_value > 0.05


def test_pca_matches_numpy_svd():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 7)) @ rng.normal(size=(7, 7))
    comps, ratio, proj = C.pca(x, 3)
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    for i in range(3):
        sign = np.sign(comps[i] @ vt[i])
        np.testing.assert_allclose(comps[i], sign * vt[i], atol=1e-5)
        np.testing.assert_allclose(proj[:, i], sign * xc @ vt[i], atol=1e-4)
    np.testing.assert_allclose(ratio, (s**2 / (s**2).sum())[:3], rtol=1e-5)
    assert ratio.sum() <= 1 + 1e-6 and np.all(np.diff(ratio) <= 0)
    with pytest.raises(ValueError, match="k must be"):
        C.pca(x, 8)


def test_pure_recovers_planted_circuits():
    rng = np.random.default_rng(0)
    N, Cn = 80, 30
    truth = rng.integers(0, 2, N)
    A = 0.1 * rng.normal(size=(N, Cn))
    A[truth == 0, 0:3] += rng.uniform(1, 2, size=((truth == 0).sum(), 3))
    A[truth == 1, 10:13] += rng.uniform(1, 2, size=((truth == 1).sum(), 3))
    act = np.abs(A).sum(1)
    names = [f"c{i}" for i in range(Cn)]
    r = C.pure_split(A, act, names, top=3)
    agree = np.mean(r.labels == truth)
    assert max(agree, 1 - agree) == 1.0
    sets = [{n for n, _ in c} for c in r.circuits]
    assert {frozenset(s) for s in sets} == {frozenset({"c0", "c1", "c2"}), frozenset({"c10", "c11", "c12"})}
    assert r.silhouette > 0.5
    assert np.all(np.diag(r.circuit_fraction) > 0.5) and np.all(r.circuit_fraction[[0, 1], [1, 0]] < 0.2)
    np.testing.assert_allclose(r.virtual_activations.sum(0), act)


def test_pure_attributions_are_gradient_times_activation(tiny):
    rng = np.random.default_rng(1)
    toks = rng.integers(0, 23, (3, 6)).astype(np.int32)
    layer, neuron = 2, 5
    att = C.neuron_attributions(tiny, toks, layer, neuron, chunk=2)
    assert att.attributions.shape == (3, layer * tiny.cfg.n_heads + tiny.cfg.d_mlp)

    H, M = tiny.cfg.n_heads, tiny.cfg.d_mlp
    z_mask = np.zeros((1, 1, H, 1), bool)
    z_mask[..., 2, :] = True  # L1H2
    n_mask = np.zeros((1, 1, M), bool)
    n_mask[..., 7] = True  # L1N7

    def act(fz, fn):  # one program: both scale factors are traced arrays
        hooks = {"blocks.1.attn.hook_z": cj.Scale(jnp.float32(fz), z_mask),
                 "blocks.1.mlp.hook_post": cj.Scale(jnp.float32(fn), n_mask)}  # fmt: skip
        c = cj.run(tiny, toks, hooks=hooks, cache=[f"blocks.{layer}.mlp.hook_post"]).cache
        return np.asarray(c[f"blocks.{layer}.mlp.hook_post"])[np.arange(3), att.position, neuron].astype(np.float64)

    np.testing.assert_allclose(act(1.0, 1.0), att.activation, rtol=1e-5, atol=1e-7)
    eps = 1e-2
    scale = np.abs(att.attributions).max()
    for comp, up, down in (("L1H2", (1 + eps, 1.0), (1 - eps, 1.0)), ("L1N7", (1.0, 1 + eps), (1.0, 1 - eps))):
        fd = (act(*up) - act(*down)) / (2 * eps)
        j = att.components.index(comp)
        np.testing.assert_allclose(att.attributions[:, j], fd, rtol=2e-2, atol=1e-3 * scale)
