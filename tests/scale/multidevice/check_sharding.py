"""Sharded sweeps, training, checkpoints and models on 8 simulated CPU devices.

Run by `tests/test_sharding.py` in a subprocess with `--xla_force_host_platform_device_count=8`
(the main test process keeps one device); skipped when fewer than 8 devices exist.
"""

import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.scale import _sharding as sh
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from conftest import tiny_configs  # noqa: E402
from test_sae_train import SAE_SITE, CHUNK, sparse_data, write_store, _key  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

MESHES = [(8, 1, 1), (4, 2, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]


def _pairs(cfg, B=4, T=7, seed=0):
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, cfg.d_vocab, (B, T)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 1) % cfg.d_vocab
    corrupt[:, 4] = (corrupt[:, 4] + 3) % cfg.d_vocab
    metric = cj.LogitDiff(answer=jnp.arange(1, B + 1), wrong=jnp.arange(5, B + 5))
    return clean, corrupt, metric


@pytest.fixture(scope="module", params=["llamalike", "gpt2like"])
def setup(request):
    cfg = tiny_configs()[request.param]
    return cj.init_model(cfg, key=jax.random.key(0)), *_pairs(cfg)


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_patch_sweep_equals_the_single_device_sweep(setup, shape):
    model, clean, corrupt, metric = setup
    ref = cj.patch_sweep(model, clean, corrupt, metric, "z", ("layer", "pos", "head"), progress=False, chunk_size=8)
    got = cj.patch_sweep(model, clean, corrupt, metric, "z", ("layer", "pos", "head"), progress=False, chunk_size=8,
                         mesh=sh.make_mesh(*shape))  # fmt: skip
    np.testing.assert_allclose(got.raw, ref.raw, rtol=1e-5, atol=1e-5)
    assert got.result.shape == ref.result.shape


def test_sweep_rows_that_do_not_divide_the_sweep_axis_are_padded(setup):
    model, clean, corrupt, metric = setup
    ref = cj.patch_sweep(model, clean, corrupt, metric, "mlp_out", ("layer", "pos"), progress=False, chunk_size=5)
    got = cj.patch_sweep(model, clean, corrupt, metric, "mlp_out", ("layer", "pos"), progress=False, chunk_size=5,
                         mesh=sh.make_mesh(8))  # fmt: skip
    assert got.chunk_size == 8  # 5 rounded up to the sweep axis
    np.testing.assert_allclose(got.raw, ref.raw, rtol=1e-5, atol=1e-5)


def test_every_sweep_and_attribution_takes_a_mesh():
    cfg = tiny_configs()["gpt2like"]
    model, (clean, corrupt, metric) = cj.init_model(cfg, key=jax.random.key(0)), _pairs(cfg)
    mesh = sh.make_mesh(2, 2, 2)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)  # noqa: E731
    patches = [("z", 1, {"head": 2}), ("resid_pre", 2, {"pos": 3}), ("mlp_post", 0, {})]
    close(cj.patch_set(model, clean, corrupt, metric, patches, progress=False, mesh=mesh).raw,
          cj.patch_set(model, clean, corrupt, metric, patches, progress=False).raw)
    close(cj.path_patch(model, clean, corrupt, metric, "logits", progress=False, mesh=mesh).raw,
          cj.path_patch(model, clean, corrupt, metric, "logits", progress=False).raw)
    close(cj.edge_attribution(model, clean, corrupt, metric, "eap-ig", steps=3, mesh=mesh).scores,
          cj.edge_attribution(model, clean, corrupt, metric, "eap-ig", steps=3).scores)
    close(cj.attribution_patch(model, clean, corrupt, metric, "z", ("layer", "pos", "head"), mesh=mesh).raw,
          cj.attribution_patch(model, clean, corrupt, metric, "z", ("layer", "pos", "head")).raw)
    close(cj.atp_star(model, clean, corrupt, metric, "k", ("layer", "head"), mesh=mesh).raw,
          cj.atp_star(model, clean, corrupt, metric, "k", ("layer", "head")).raw)
    edges = ["a0.h1->a2.h0<q>", "m0->logits", "input->m1"]
    close(cj.patch_single_edges(model, clean, corrupt, metric, edges, progress=False, mesh=mesh),
          cj.patch_single_edges(model, clean, corrupt, metric, edges, progress=False))


def test_a_batch_that_does_not_divide_the_data_axis_is_refused_with_the_sizes(setup):
    model, clean, corrupt, metric = setup
    with pytest.raises(ValueError, match=r"a batch of prompts of 3 does not divide over the mesh's 'data' axis of size 2"):
        three = cj.LogitDiff(metric.answer[:3], metric.wrong[:3])  # one answer per prompt: only the mesh is wrong
        cj.patch_sweep(model, clean[:3], corrupt[:3], three, progress=False, mesh=sh.make_mesh(4, 2, 1))


# ---------------------------------------------------------------- tensor parallelism (large-model path)


def test_a_tensor_parallel_model_holds_an_eighth_of_its_mlp_and_vocabulary_per_device():
    cfg = tiny_configs()["llamalike"]
    cfg = type(cfg)(**{**cfg.__dict__, "d_vocab": 32, "n_heads": 8, "n_kv_heads": 8})
    model = cj.init_model(cfg, key=jax.random.key(1))
    mesh = sh.make_mesh(1, 1, 8)
    placed = sh.shard_model(model, mesh)
    for name in ("W_in", "W_gate", "W_out", "W_Q", "W_K", "W_V", "W_O"):
        a = getattr(placed.blocks, name)
        assert a.addressable_shards[0].data.size * 8 == a.size, name
    assert placed.W_U.addressable_shards[0].data.size * 8 == placed.W_U.size
    tokens = _pairs(cfg)[0]
    np.testing.assert_allclose(np.asarray(cj.run(placed, tokens).logits), np.asarray(cj.run(model, tokens).logits),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_weights_whose_axes_do_not_divide_fall_back_to_the_next_axis_then_replication():
    cfg = tiny_configs()["llamalike"]  # 4 heads of 4 dims, 2 kv heads, d_mlp 24, vocab 23
    lay = sh.layout(cj.init_model(cfg, key=jax.random.key(0)), sh.make_mesh(1, 1, 8))
    assert lay["W_Q"][1] == jax.sharding.PartitionSpec()  # neither 4 heads nor 4 dims split 8 ways
    assert lay["W_in"][1] == jax.sharding.PartitionSpec(None, None, "model")  # 24 columns do
    lay = sh.layout(cj.init_model(cfg, key=jax.random.key(0)), sh.make_mesh(1, 2, 4))
    assert lay["W_K"][1] == jax.sharding.PartitionSpec(None, None, None, "model")  # 2 kv heads: d_head instead


def test_load_model_reads_each_weight_straight_into_its_shards(tmp_path):
    cfg = tiny_configs()["gpt2like"]
    model = cj.init_model(cfg, key=jax.random.key(2))
    cj.save_model(tmp_path / "m", model)
    mesh = sh.make_mesh(1, 2, 4)
    got = cj.load_model(tmp_path / "m", mesh=mesh)
    assert got.blocks.W_in.sharding == jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "model"))
    tokens = _pairs(cfg)[0]
    np.testing.assert_allclose(np.asarray(cj.run(got, tokens).logits), np.asarray(cj.run(model, tokens).logits),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("family", ["qwen2", "gemma3", "pythia"])
def test_a_sharded_hf_directory_is_read_straight_into_shards(family, tmp_path):
    """Safetensors shards (an index and several files) into mesh-sharded arrays: every weight lands where
    `shard_model` would put it, and the logits equal the single-device load's."""
    src = Path(__file__).resolve().parents[2] / "models" / "families" / family
    single = cj.load_hf(src)
    path = cj.export_hf(single, tmp_path / family, shard_size=20_000)
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    mesh = sh.make_mesh(1, 2, 4)
    got = cj.load_hf(path, mesh=mesh)
    want = {name: jax.sharding.NamedSharding(mesh, spec) for name, (_, spec) in sh.layout(single, mesh).items()}
    for name, a in sh._named(got).items():
        assert a.sharding.is_equivalent_to(want[name], a.ndim), name
    assert any(a.sharding.spec != jax.sharding.PartitionSpec() for a in sh._named(got).values())
    tokens = np.arange(1, 15, dtype=np.int32).reshape(2, 7) % single.cfg.d_vocab
    np.testing.assert_allclose(np.asarray(cj.run(got, tokens).logits), np.asarray(cj.run(single, tokens).logits),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    half = cj.load(path, dtype="bfloat16", mesh=mesh)[0]
    assert half.blocks.W_Q.dtype == jnp.bfloat16 and half.blocks.ln1_w.dtype == jnp.float32
    assert half.W_U.sharding.is_equivalent_to(want["W_U"], 2) and half.blocks.W_in.sharding == got.blocks.W_in.sharding


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("store"), [sparse_data(CHUNK * 4, seed=0)], [SAE_SITE])


def _cfg(**kw):
    return cj.TrainConfig(**{**dict(n_tokens=64 * 24, batch_size=64, lr=3e-3, warmup_steps=4, dead_after=128,
                                    log_every=6, checkpoint_every=6, loss=cj.LossConfig(k_aux=16)), **kw})  # fmt: skip


def _sae():
    return cj.init_sae(16, 64, key=_key(3), arch="topk", k=4, in_site=SAE_SITE)


def _close(a, b, tol=2e-5):
    for u, v in zip(jax.tree.leaves(eqx.filter(a, eqx.is_array)), jax.tree.leaves(eqx.filter(b, eqx.is_array)), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def single(store):
    return cj.train_sae(_sae(), store, _cfg(), progress=False)


@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 4, 2), (1, 1, 8)])
def test_sharded_training_equals_the_single_device_run(store, single, shape):
    mesh = sh.make_mesh(*shape)
    got = cj.train_sae(_sae(), store, _cfg(), progress=False, mesh=mesh)
    assert got.dictionary.W_enc.sharding.spec == (jax.sharding.PartitionSpec(None, "model") if shape[2] > 1 else
                                                  got.dictionary.W_enc.sharding.spec)  # fmt: skip
    _close(got.dictionary, single.dictionary)
    np.testing.assert_allclose([r["loss"] for r in got.history], [r["loss"] for r in single.history], rtol=1e-5)


def test_a_batch_size_that_does_not_divide_the_data_axis_is_refused(store):
    with pytest.raises(ValueError, match=r"batch_size of 60 does not divide over the mesh's 'data' axis of size 8; use 56 or 64"):
        cj.train_sae(_sae(), store, _cfg(batch_size=60), progress=False, mesh=sh.make_mesh(1, 8, 1))


def test_a_checkpoint_saved_on_a_4x2_mesh_restores_on_8x1_and_resumes_to_the_same_run(store, single, tmp_path):
    first = cj.train_sae(_sae(), store, _cfg(), progress=False, mesh=sh.make_mesh(1, 4, 2), checkpoint_dir=tmp_path, stop_after=12)
    assert first.dictionary.W_dec.sharding.mesh.shape == {"sweep": 1, "data": 4, "model": 2}
    mesh = sh.make_mesh(1, 8, 1)
    done = cj.train_sae(_sae(), store, _cfg(), progress=False, mesh=mesh, checkpoint_dir=tmp_path)
    assert done.resumed_from == 12
    assert done.dictionary.W_dec.sharding.mesh.shape == {"sweep": 1, "data": 8, "model": 1}
    _close(done.dictionary, single.dictionary)
    # and the 8x1 state restores on one device too
    back = cj.train_sae(_sae(), store, _cfg(), progress=False, checkpoint_dir=tmp_path)
    assert back.resumed_from == 24
    _close(back.dictionary, single.dictionary)


def test_cross_layer_transcoder_trains_with_its_width_over_model(tmp_path):
    from test_sae_train import CLT_IN, CLT_OUT

    x0, x1 = sparse_data(CHUNK * 4, seed=1), sparse_data(CHUNK * 4, seed=2)
    st = write_store(tmp_path, [x0, x1, x0 * 0.5, x1 - x0], [*CLT_IN, *CLT_OUT])
    clt = lambda: cj.init_clt(16, 32, (0, 1), key=_key(4), arch="topk", k=4)  # noqa: E731
    cfg = _cfg(n_tokens=64 * 8)
    ref = cj.train_sae(clt(), st, cfg, progress=False)
    got = cj.train_sae(clt(), st, cfg, progress=False, mesh=sh.make_mesh(1, 2, 4))
    assert got.dictionary.W_enc.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
    _close(got.dictionary, ref.dictionary)


# ---------------------------------------------------------------- DAS


@pytest.mark.parametrize("shape,chunk", [((2, 4, 1), 2), ((1, 8, 1), 1), ((1, 4, 2), 2)])
def test_sharded_das_equals_the_single_device_search(shape, chunk):
    from test_das import _pairs as das_pairs
    from test_das import _planted

    model, _, bits = _planted()
    base, source, labels, cand = das_pairs(bits, 96, seed=4)
    kw = dict(layers=[0, 1], k=1, n_train=64, steps=20, batch_size=32, progress=False, chunk=chunk)
    ref = cj.das_search(model, base, source, labels, cand, **kw)
    got = cj.das_search(model, base, source, labels, cand, mesh=sh.make_mesh(*shape), **kw)
    np.testing.assert_allclose(got.losses, ref.losses, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got.correct, ref.correct)
    np.testing.assert_allclose(np.abs(got.basis), np.abs(ref.basis), atol=1e-4)


def test_a_das_minibatch_that_does_not_divide_the_data_axis_is_refused():
    from test_das import _pairs as das_pairs
    from test_das import _planted

    model, _, bits = _planted()
    base, source, labels, cand = das_pairs(bits, 96, seed=4)
    with pytest.raises(ValueError, match=r"a DAS minibatch of 30 does not divide over the mesh's 'data' axis of size 8"):
        cj.das_search(model, base, source, labels, cand, batch_size=30, progress=False, mesh=sh.make_mesh(1, 8, 1))
