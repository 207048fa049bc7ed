"""DAS: the interchange algebra, and recovery of a variable planted in a rotated subspace."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.toolshed import _das as das
D, V = 16, 34  # 32 value tokens + 2 answer tokens


def _planted(seed=0):
    """A 2-layer attention-only model whose residual is the token embedding (W_O = 0) and whose
    answer logits read one rotated direction: the value token's bit a is planted in rotated
    coordinate 0 (causal) and copied into coordinate 1 (a distractor nothing reads); the other
    14 rotated coordinates are noise. Returns (model, Q [D, D] with the planted directions as rows, bits [V-2])."""
    cfg = cj.Config(d_model=D, n_layers=2, n_heads=2, d_head=4, d_vocab=V, normalization=None, positional="none")
    model = cj.init_model(cfg, key=jax.random.key(seed))
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.normal(size=(D, D)))[0].T.astype(np.float32)  # rows: the planted basis
    bits = np.arange(V - 2) % 2
    z = rng.normal(size=(V, D)).astype(np.float32)
    z[: V - 2, 0] = 2 * bits - 1
    z[: V - 2, 1] = 2 * bits - 1
    z[V - 2 :] = 0
    W_U = np.zeros((D, V), np.float32)
    W_U[:, V - 1], W_U[:, V - 2] = 4 * Q[0], -4 * Q[0]  # logit(yes) - logit(no) = 8 * z0
    model = eqx.tree_at(lambda m: (m.W_E, m.W_U, m.blocks.W_O),
                        model, (jnp.asarray(z @ Q), jnp.asarray(W_U), jnp.zeros_like(model.blocks.W_O)))  # fmt: skip
    return model, Q, bits


def _pairs(bits, n, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, V - 2, n)
    source = np.array([rng.choice(np.flatnonzero(bits != bits[b])) for b in base])  # the answer must change
    filler = rng.integers(0, V - 2, n)
    tok = lambda t: np.stack([filler, t], 1).astype(np.int32)  # noqa: E731
    candidates = np.tile(np.array([V - 2, V - 1], np.int32), (n, 1))
    return tok(base), tok(source), bits[source].astype(np.int32), candidates


def test_orthonormal_and_random_basis():
    p = jax.random.normal(jax.random.key(1), (D, D))
    R = das.orthonormal_rows(p)
    np.testing.assert_allclose(np.asarray(R.T @ R), np.eye(D), atol=1e-5)
    np.testing.assert_allclose(np.asarray(R @ R.T), np.eye(D), atol=1e-5)
    Rk = das.random_basis(jax.random.key(2), D, 3)
    assert Rk.shape == (3, D)
    np.testing.assert_allclose(np.asarray(Rk @ Rk.T), np.eye(3), atol=1e-5)
    params = das.das_init(jax.random.key(3), D, 4, "low_rank")
    basis, w = das.basis_and_weights(params, 4, "low_rank")
    assert basis.shape == (4, D) and np.all(np.asarray(w) == 1)


def test_interchange_identities():
    model, _, bits = _planted()
    base, source, _, _ = _pairs(bits, 6, seed=1)
    site = "blocks.1.hook_resid_pre"
    src_act = cj.run(model, source, cache=[site]).cache[site][:, -1]
    base_act = cj.run(model, base, cache=[site]).cache[site]
    pos = jnp.full((6,), 1, jnp.int32)
    R = das.orthonormal_rows(jax.random.normal(jax.random.key(0), (D, D)))
    # source == base: nothing changes, whatever the basis and weights
    same = das.interchange(base_act, base_act[:, -1], pos, R, jnp.linspace(0.0, 1.0, D))
    np.testing.assert_allclose(np.asarray(same), np.asarray(base_act), atol=1e-5)
    # k = D (all weights 1): the position is replaced by the source activation, i.e. activation patching
    full = das.interchange(base_act, src_act, pos, R, jnp.ones(D))
    np.testing.assert_allclose(np.asarray(full[:, 1]), np.asarray(src_act), atol=1e-5)
    np.testing.assert_allclose(np.asarray(full[:, 0]), np.asarray(base_act[:, 0]), atol=0)
    cand = jnp.tile(jnp.array([V - 2, V - 1]), (6, 1))
    got = das.intervened_logits(model, base, src_act, pos, R, jnp.ones(D), cand, kind="hook_resid_pre", layer=1)
    patch = cj.Replace(jnp.zeros_like(base_act).at[:, 1].set(src_act), jnp.zeros((6, 2, 1), bool).at[:, 1].set(True))
    want = cj.run(model, base, hooks={site: patch}).logits[:, -1][:, np.array([V - 2, V - 1])]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
    # starting the base run at the layer from its cached stream gives the same logits
    skip = das.intervened_logits(model, base, src_act, pos, R, jnp.ones(D), cand, layer=jnp.int32(1), base_resid=base_act)
    np.testing.assert_allclose(np.asarray(skip), np.asarray(got), atol=1e-4)


@pytest.mark.slow_after_first
@pytest.mark.parametrize("method", ["das", "low_rank", "boundless"])
def test_das_recovers_planted_variable(method):
    model, Q, bits = _planted()
    base, source, labels, cand = _pairs(bits, 320, seed=3)
    res = das.das_search(model, base, source, labels, cand, layers=[0, 1], k=1, method=method, n_train=192,
                         steps=120, batch_size=48, lr=3e-2, chunk=2, progress=False)  # fmt: skip
    assert res.iia.shape == (2,) and res.n_test == 128 and res.correct.shape == (2, 128)
    assert np.all(res.iia >= 0.99), res.iia
    assert np.all(res.iia_random <= 0.3), res.iia_random  # a random direction barely touches the planted one
    assert np.all(res.iia_full >= 0.99)  # the full vector carries the source's bit too
    assert res.base_accuracy == 0.0  # every pair's answer changes under the interchange
    if method != "boundless":  # the learned direction lies in the plane of the planted bit (causal + copy)
        # (the copy equals the causal coordinate on every input, so (e0 + e1)/sqrt(2) swaps the bit exactly
        # too: the data cannot tell them apart). A random unit vector has ~sqrt(2/16) = 0.35 of its norm there.
        inside = np.linalg.norm(res.basis[:, 0] @ Q[:2].T, axis=-1)
        assert np.all(inside > 0.85), inside
        assert np.all(np.abs(res.basis[:, 0] @ Q[0]) > 0.6)
    else:
        assert np.all(res.weights.sum(-1) < 4), res.weights.sum(-1)


@pytest.mark.slow
def test_search_one_layer_loop_matches_chunks():
    model, _, bits = _planted()
    base, source, labels, cand = _pairs(bits, 96, seed=4)
    kw = dict(layers=[0, 1], k=1, n_train=64, steps=20, batch_size=32, progress=False)
    a = das.das_search(model, base, source, labels, cand, chunk=1, **kw)
    b = das.das_search(model, base, source, labels, cand, chunk=2, **kw)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-3, atol=1e-4)


def test_bad_input():
    model, _, bits = _planted()
    base, source, labels, cand = _pairs(bits, 12, seed=5)
    with pytest.raises(ValueError, match=r"layers 0\.\.1"):
        das.das_search(model, base, source, labels, cand, layers=[2], progress=False)
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        das.das_search(model, base, source, labels, cand, k=17, progress=False)
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        das.das_init(jax.random.key(0), D, 0)
    with pytest.raises(KeyError, match="hook_resid_pre"):
        das.das_search(model, base, source, labels, cand, kind="hook_resid_pr", progress=False)
    R = das.random_basis(jax.random.key(0), D, 2)
    with pytest.raises(ValueError, match=r"blocks\.0\.hook_resid_pre.*\(12, 8\)"):
        das.intervened_logits(model, base, jnp.zeros((12, 8)), jnp.ones(12, jnp.int32), R, jnp.ones(2), cand,
                              layer=0)  # fmt: skip
    with pytest.raises(ValueError, match="one source per base"):
        das.das_search(model, base, source[:5], labels, cand, progress=False)


@pytest.mark.slow
def test_position_search_finds_the_planted_position():
    """The bit lives at the value token (position 1); the filler (position 0) carries nothing the answer
    reads (W_O = 0), so a search over both positions must find position 1 and nothing at position 0."""
    model, _, bits = _planted()
    base, source, labels, cand = _pairs(bits, 192, seed=6)
    res = das.das_position_search(model, base, source, labels, cand, {"filler": 0, "value": 1}, layers=[0, 1], k=1,
                                  method="low_rank", n_train=128, steps=120, batch_size=48, lr=3e-2, progress=False)  # fmt: skip
    assert res.iia.shape == (2, 2) and res.names == ["filler", "value"]
    assert np.all(res.iia[1] >= 0.99), res.iia
    assert np.all(res.iia[0] <= 0.05), res.iia  # every pair's answer changes, so chance is 0 here
    assert res.best()[0] == "value"
    np.testing.assert_array_equal(res.results["value"].iia, res.iia[1])
    with pytest.raises(ValueError, match=r"position 'bad'.*\[0, 1\]"):
        das.das_position_search(model, base, source, labels, cand, {"bad": 5}, layers=[0], progress=False)
