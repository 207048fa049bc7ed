"""Training sparse dictionaries (`circuits_jax.dictionaries._train`) on synthetic activation stores.

The stores are real chunk files plus `store.json` (the layout `build_store` writes) opened with
`open_store`, holding numpy data with a planted sparse structure: each row is a positive
combination of a few of 32 unit directions in 16 dimensions.
"""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.dictionaries._activations import open_store
from circuits_jax.dictionaries._sae import LossConfig, init_clt, init_sae
from circuits_jax.dictionaries._train import TrainConfig, init_state, make_step, train

D, N_DIRS, CHUNK, N_CHUNKS = 16, 32, 512, 8
SAE_SITE = "blocks.0.hook_resid_post"
CLT_IN = ["blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized"]
CLT_OUT = ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]


def _key(seed):
    return jax.random.key(seed, impl="rbg")  # compiles much faster on CPU than threefry


def write_store(path, arrays, sites, chunk_tokens=CHUNK):
    """Chunk files and store.json in `build_store`'s layout; opened with `open_store`."""
    path.mkdir(parents=True, exist_ok=True)
    n_chunks = len(arrays[0]) // chunk_tokens
    for c in range(n_chunks):
        for s, a in enumerate(arrays):
            np.save(path / f"chunk_{c:05d}.{s}.npy", np.asarray(a[c * chunk_tokens : (c + 1) * chunk_tokens], np.float32))
    meta = dict(sites=list(sites), ctx_len=9, chunk_tokens=chunk_tokens, dtype="float32", normalize=False, n_chunks=n_chunks,
                dims=[int(a.shape[1]) for a in arrays], scales=[1.0] * len(sites), means=[a.mean(0).tolist() for a in arrays],
                info={})  # fmt: skip
    (path / "store.json").write_text(json.dumps(meta))
    return open_store(path)


def sparse_data(n, *, seed, per_token=3):
    """`[n, D]` rows: each a sum of `per_token` of N_DIRS unit directions with coefficients in [0.5, 2]."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(N_DIRS, D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    idx = np.argsort(rng.random((n, N_DIRS)), axis=1)[:, :per_token]
    codes = np.zeros((n, N_DIRS))
    np.put_along_axis(codes, idx, rng.uniform(0.5, 2.0, (n, per_token)), axis=1)
    return (codes @ dirs).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store with an SAE site and the four sites of a two-layer CLT (targets are a fixed
    linear function of the inputs, layer 1 also reading layer 0)."""
    n = CHUNK * N_CHUNKS
    x = sparse_data(n, seed=0)
    x0, x1 = sparse_data(n, seed=1), sparse_data(n, seed=2)
    rng = np.random.default_rng(3)
    A0, A1, B = (rng.normal(size=(D, D)).astype(np.float32) / 4 for _ in range(3))
    y0, y1 = x0 @ A0, x0 @ B + x1 @ A1
    return write_store(tmp_path_factory.mktemp("store"), [x, x0, x1, y0, y1], [SAE_SITE, *CLT_IN, *CLT_OUT])


def params(d):
    return jax.tree.leaves(eqx.filter(d, eqx.is_array))


def assert_same(a, b):
    assert type(a) is type(b) and a.arch == b.arch
    for u, v in zip(params(a), params(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# ---------------------------------------------------------------- AuxK revives dead latents

LIVE, WIDTH = 16, 64
PLANTED = np.arange(LIVE, WIDTH)  # 48 latents that cannot win the top k at the start


def planted_topk():
    """A TopK SAE whose latents LIVE.. have tiny encoder columns (pre-activations about ±0.05)
    while the live ones get a +1 encoder bias: the planted latents never make a token's top 4,
    but their pre-activations are positive on some tokens, so AuxK's gradient reaches them."""
    d = init_sae(D, WIDTH, key=_key(0), arch="topk", k=4, in_site=SAE_SITE)
    W_enc = np.array(d.W_enc)
    W_enc[:, PLANTED] *= 0.02
    b_enc = np.zeros(WIDTH, np.float32)
    b_enc[:LIVE] = 1.0
    return eqx.tree_at(lambda s: (s.W_enc, s.b_enc), d, (jnp.asarray(W_enc), jnp.asarray(b_enc)))


def _auxk_run(store, aux_coeff):
    cfg = TrainConfig(n_tokens=64 * 160, batch_size=64, lr=1e-2, warmup_steps=10, dead_after=128, log_every=20,
                      loss=LossConfig(aux_coeff=aux_coeff, k_aux=WIDTH), checkpoint_every=10**6)  # fmt: skip
    return train(planted_topk(), store, cfg, progress=False)


@pytest.mark.slow
def test_auxk_revives_planted_dead_latents(store):
    d0 = planted_topk()
    x = np.asarray(store.chunk(0)[0][:1024])
    assert not np.any(np.asarray(d0.encode(x))[:, PLANTED] > 0)  # dead by construction
    pre = np.asarray(d0.pre(x))[:, PLANTED]
    assert np.mean(pre > 0) > 0.2  # but reachable by AuxK

    off = _auxk_run(store, 0.0)
    # without AuxK nothing reaches them: they never fire and their weights never move
    assert not np.any(np.asarray(off.dictionary.encode(x))[:, PLANTED] > 0)
    np.testing.assert_array_equal(np.asarray(off.dictionary.W_enc)[:, PLANTED], np.asarray(d0.W_enc)[:, PLANTED])
    np.testing.assert_array_equal(np.asarray(off.dictionary.W_dec)[PLANTED], np.asarray(d0.W_dec)[PLANTED])
    assert all(r["dead"] >= len(PLANTED) / WIDTH for r in off.history[1:])

    on = _auxk_run(store, 1 / 32)
    fires = np.any(np.asarray(on.dictionary.encode(x))[:, PLANTED] > 0, axis=0)
    assert fires.mean() > 0.2, f"only {fires.sum()} of {len(PLANTED)} planted latents revived"
    assert on.history[-1]["dead"] < off.history[-1]["dead"] - 0.05, [r["dead"] for r in on.history]
    assert on.history[-1]["fve"] > off.history[-1]["fve"]  # the revived latents are useful


def test_since_fired_counter_resets_when_a_latent_fires(store):
    """The step's bookkeeping: tokens since each latent last fired, reset to 0 when it fires."""
    cfg = TrainConfig(n_tokens=64 * 4, batch_size=64, dead_after=128, loss=LossConfig(k_aux=WIDTH))
    d = planted_topk()
    state = init_state(d, cfg)
    step = make_step(cfg)
    x = np.asarray(store.chunk(0)[0][:64])
    since = np.zeros(WIDTH, np.int64)
    for i in range(3):
        state, stats = step(state, x, x)
        fired = np.asarray(stats.fired)
        assert fired.any()
        np.testing.assert_array_equal(np.asarray(state.since_fired), np.where(fired, 0, since + 64))
        since = np.asarray(state.since_fired)
    assert not fired[PLANTED].any() and np.all(since[PLANTED] == 3 * 64)
    assert int(state.step) == 3
    # a cross-layer transcoder's batch is [tokens, layers, D]: its counters advance by tokens, not layers
    clt = init_clt(D, 32, (0, 1), key=_key(1), arch="topk", k=2)
    state = init_state(clt, cfg)
    xs = np.stack([np.asarray(store.chunk(0)[i][:64]) for i in (1, 2)], 1)  # [64, 2, D]
    state, stats = step(state, xs, xs)
    np.testing.assert_array_equal(np.asarray(state.since_fired), np.where(np.asarray(stats.fired), 0, 64))


# ---------------------------------------------------------------- resume, determinism


def _resume_cfg(seed=0):
    return TrainConfig(n_tokens=32 * 24, batch_size=32, lr=3e-3, warmup_steps=4, dead_after=64, log_every=4,
                       checkpoint_every=4, seed=seed, loss=LossConfig(k_aux=16))  # fmt: skip


def _resume_dict():
    return init_sae(D, 32, key=_key(5), arch="topk", k=3, in_site=SAE_SITE)


@pytest.fixture(scope="module")
def uninterrupted(store, tmp_path_factory):
    return train(_resume_dict(), store, _resume_cfg(), checkpoint_dir=tmp_path_factory.mktemp("full"), progress=False)


@pytest.mark.slow
def test_resume_after_interruption_matches_an_uninterrupted_run(store, uninterrupted, tmp_path):
    cfg, full = _resume_cfg(), uninterrupted
    assert full.resumed_from == 0 and full.history[-1]["step"] == cfg.steps == 24

    part = train(_resume_dict(), store, cfg, checkpoint_dir=tmp_path, stop_after=12, progress=False)
    assert part.history[-1]["step"] == 12 and part.resumed_from == 0
    rest = train(_resume_dict(), store, cfg, checkpoint_dir=tmp_path, progress=False)
    assert rest.resumed_from == 12
    assert_same(rest.dictionary, full.dictionary)
    assert cj.tree_allclose(rest.dictionary, full.dictionary, rtol=0, atol=0)
    # the history carries over from the checkpoint: same rows as the uninterrupted run
    assert [r["step"] for r in rest.history] == [r["step"] for r in full.history]
    np.testing.assert_array_equal([r["loss"] for r in rest.history], [r["loss"] for r in full.history])
    # a finished run is not retrained
    again = train(_resume_dict(), store, cfg, checkpoint_dir=tmp_path, progress=False)
    assert again.resumed_from == cfg.steps
    assert_same(again.dictionary, full.dictionary)


@pytest.mark.slow
def test_same_seed_same_parameters_other_seed_differs(store, uninterrupted):
    a = uninterrupted.dictionary  # seed 0, checkpointed along the way
    b = train(_resume_dict(), store, _resume_cfg(seed=0), progress=False).dictionary
    c = train(_resume_dict(), store, _resume_cfg(seed=1), progress=False).dictionary
    assert_same(a, b)
    assert not cj.tree_allclose(a, c, rtol=0, atol=1e-6)
    assert not np.allclose(np.asarray(a.W_dec), np.asarray(_resume_dict().W_dec))  # it did train


# ---------------------------------------------------------------- ActivationStore.batches


@pytest.fixture(scope="module")
def id_store(tmp_path_factory):
    """6 chunks of 64 rows; column 0 of site 0 is the row's id, site 1 is site 0 times -2."""
    n = 6 * 64
    a = np.zeros((n, 3), np.float32)
    a[:, 0] = np.arange(n)
    a[:, 1:] = np.random.default_rng(0).normal(size=(n, 2))
    return write_store(tmp_path_factory.mktemp("ids"), [a, -2 * a], ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"], 64)


def _ids(batch):
    return batch[0][:, 0].astype(int)


def test_batches_start_i_equals_the_ith_batch(id_store):
    it = id_store.batches(32, seed=3, buffer_chunks=2)  # 4 batches a window, 3 windows an epoch
    first = [next(it) for _ in range(30)]  # two and a half epochs
    for i, b in enumerate(first):
        got = next(id_store.batches(32, seed=3, start=i, buffer_chunks=2))
        for u, v in zip(got, b, strict=True):
            np.testing.assert_array_equal(u, v)
        np.testing.assert_array_equal(b[1], -2 * b[0])  # the sites stay row-aligned
        assert b[0].dtype == np.float32 and b[0].shape == (32, 3)
    other = [next(id_store.batches(32, seed=4, start=i, buffer_chunks=2)) for i in range(3)]
    assert any(not np.array_equal(_ids(o), _ids(f)) for o, f in zip(other, first))


@pytest.mark.parametrize("buffer_chunks", [6, 8, 2, 3])
def test_an_epoch_visits_every_row_once(id_store, buffer_chunks):
    """When the buffer covers the store (or its windows tile it), an epoch sees each row exactly once."""
    per_epoch = 6 * 64 // 32
    it = id_store.batches(32, seed=1, buffer_chunks=buffer_chunks)
    e0 = np.concatenate([_ids(next(it)) for _ in range(per_epoch)])
    e1 = np.concatenate([_ids(next(it)) for _ in range(per_epoch)])
    np.testing.assert_array_equal(np.sort(e0), np.arange(6 * 64))
    np.testing.assert_array_equal(np.sort(e1), np.arange(6 * 64))
    assert not np.array_equal(e0, e1)  # epochs reshuffle


def test_batches_refuse_a_batch_larger_than_the_buffer(id_store):
    with pytest.raises(ValueError, match="exceeds the shuffle buffer"):
        next(id_store.batches(129, buffer_chunks=2))


# ---------------------------------------------------------------- every architecture learns


ARCH_CASES = [("relu", None), ("topk", 4), ("batchtopk", 4), ("jumprelu", None), ("matryoshka", 4), ("gated", None)]


@pytest.mark.slow_after_first
@pytest.mark.parametrize("arch,k", ARCH_CASES)
def test_every_sae_architecture_reduces_the_loss(store, arch, k):
    d = init_sae(D, 48, key=_key(1), arch=arch, k=k, in_site=SAE_SITE, b_dec=np.asarray(store.means[0]))
    cfg = TrainConfig(n_tokens=64 * 100, batch_size=64, lr=3e-3, warmup_steps=10, log_every=10, dead_after=640,
                      loss=LossConfig(l1_coeff=0.05, l0_coeff=1e-3, k_aux=32))  # fmt: skip
    res = train(d, store, cfg, progress=False)
    h = res.history
    assert len(h) == 10 and all(np.isfinite(r["loss"]) for r in h)
    assert h[-1]["loss"] < 0.7 * h[0]["loss"], [r["loss"] for r in h]
    assert h[-1]["fve"] > h[0]["fve"]
    if arch in ("batchtopk", "matryoshka"):
        assert float(res.dictionary.threshold[0]) > 0  # the inference threshold was learned
        np.testing.assert_array_equal(np.asarray(res.dictionary.threshold), float(res.dictionary.threshold[0]))
    if k is not None:
        assert h[-1]["l0"] <= k + 1e-6


@pytest.mark.slow
def test_cross_layer_transcoder_reduces_the_loss(store):
    d = init_clt(D, 48, (0, 1), key=_key(2), arch="topk", k=4)
    cfg = TrainConfig(n_tokens=64 * 100, batch_size=64, lr=3e-3, warmup_steps=10, log_every=10, dead_after=640,
                      loss=LossConfig(l1_coeff=0.05, k_aux=32))  # fmt: skip
    res = train(d, store, cfg, progress=False)
    h = res.history
    assert h[-1]["loss"] < 0.7 * h[0]["loss"], [r["loss"] for r in h]
    W = np.asarray(res.dictionary.W_dec)
    assert np.all(W[1, 0] == 0)  # layer 1's features never write to layer 0
    assert np.any(W[0, 1] != 0)


def test_train_refuses_a_store_without_the_sites(store):
    d = init_sae(D, 8, key=_key(0), arch="relu", in_site="blocks.2.hook_resid_post")
    with pytest.raises(ValueError, match="blocks.2.hook_resid_post"):
        train(d, store, TrainConfig(n_tokens=64, batch_size=64), progress=False)


def test_train_runs_under_strict_promotion(store):
    d = init_sae(D, 8, key=_key(0), arch="relu", in_site=SAE_SITE)
    train(d, store, TrainConfig(n_tokens=64 * 2, batch_size=64), progress=False)


# ---------------------------------------------------------------- many dictionaries in one program


@pytest.mark.parametrize("arch,ks,l1s,sites", [
    ("topk", (2, 4, 8), None, None),  # three k, one program
    ("batchtopk", (3, 6), None, None),
    ("relu", (None, None), (0.02, 0.2), None),  # two L1 coefficients
    ("topk", (4, 4), None, (SAE_SITE, CLT_IN[0])),  # two sites: each member reads its own input
])  # fmt: skip
def test_dictionaries_trained_together_equal_each_trained_alone(store, arch, ks, l1s, sites):
    from circuits_jax.dictionaries import Stacked

    sites = sites or (SAE_SITE,) * len(ks)
    dicts = [init_sae(D, 24, key=_key(i), arch=arch, k=k, in_site=s, b_dec=np.asarray(store.means[0]))
             for i, (k, s) in enumerate(zip(ks, sites))]  # fmt: skip
    base = dict(n_tokens=64 * 30, batch_size=64, lr=3e-3, warmup_steps=5, log_every=10, dead_after=640,
                checkpoint_every=10**6)  # fmt: skip
    cfgs = [TrainConfig(**base, loss=LossConfig(l1_coeff=l1, k_aux=16)) for l1 in (l1s or (5.0,) * len(ks))]
    alone = [train(d, store, c, progress=False) for d, c in zip(dicts, cfgs)]
    together = train(Stacked.of(dicts, l1s), store, cfgs[0], progress=False)
    members = together.dictionary.unstack()
    for i, (a, m) in enumerate(zip(alone, members)):
        assert (m.k, m.in_site, m.arch) == (a.dictionary.k, a.dictionary.in_site, arch)
        for u, v in zip(params(a.dictionary), params(m), strict=True):
            np.testing.assert_allclose(np.asarray(v), np.asarray(u), rtol=2e-4, atol=2e-5, err_msg=f"member {i}")
        assert [r["loss"][i] for r in together.history] == pytest.approx([r["loss"] for r in a.history], rel=1e-4)


def test_matryoshka_loss_is_the_mean_of_the_nested_dictionaries_errors():
    from circuits_jax.dictionaries._sae import _nested_mse

    rng = np.random.default_rng(0)
    acts = jnp.asarray(np.maximum(rng.normal(size=(6, 16)), 0).astype(np.float32))
    W_dec, b, y = (jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in ((16, 5), (5,), (6, 5)))
    full = acts @ W_dec + b
    direct = [float(jnp.mean(jnp.sum((y - (acts[:, :m] @ W_dec[:m] + b)) ** 2, -1))) for m in (1, 4, 8, 16)]
    got = float(_nested_mse(acts, W_dec, y, full, (1 / 16, 1 / 4, 1 / 2)))
    assert got == pytest.approx(np.mean(direct), rel=1e-5)
    with pytest.raises(ValueError, match="matryoshka is an SAE"):
        cj.init_clt(8, 16, (0, 1), key=_key(0), arch="matryoshka", k=2)


def test_sparse_topk_decoding_gives_the_dense_loss_and_gradients():
    """The gathered decoder and the encoder's sparse backward (`LossConfig(sparse=True)`) against the
    dense path: the same loss, statistics and gradients, dead latents (AuxK) included."""
    rng = np.random.default_rng(0)
    d = init_sae(D, 48, key=_key(3), arch="topk", k=5, in_site=SAE_SITE, in_scale=1.3, out_scale=0.7,
                 b_dec=rng.normal(size=D).astype(np.float32))  # fmt: skip
    d = eqx.tree_at(lambda s: s.b_enc, d, jnp.asarray(rng.normal(size=48).astype(np.float32) * 0.1))
    x = jnp.asarray(sparse_data(64, seed=5))
    y = jnp.asarray(rng.normal(size=(64, D)).astype(np.float32))
    for dead in (jnp.zeros(48, bool), jnp.arange(48) % 3 == 0):
        out = {}
        for sparse in (False, True):
            hp = LossConfig(sparse=sparse, k_aux=8)
            (loss, stats), g = eqx.filter_value_and_grad(lambda m: m.loss(x, y, dead, hp), has_aux=True)(d)
            out[sparse] = loss, stats, g
        (l0, s0, g0), (l1, s1, g1) = out[False], out[True]
        assert float(l1) == pytest.approx(float(l0), rel=1e-5)
        np.testing.assert_array_equal(np.asarray(s1.fired), np.asarray(s0.fired))
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            np.testing.assert_allclose(np.asarray(getattr(g1, name)), np.asarray(getattr(g0, name)), rtol=1e-4, atol=1e-5,
                                       err_msg=name)  # fmt: skip
