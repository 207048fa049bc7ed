"""Patching sweeps: the vmapped program equals the Python loop of single patches, plus invariants."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.core import PATCH_SITES as SITES
from circuits_jax.core._sites import Site, site_shape

from conftest import tiny_configs

CLEAN = np.array([[3, 7, 1, 9, 4, 2, 8], [5, 5, 0, 11, 21, 6, 1]], np.int32)
CORRUPT = CLEAN.copy()
CORRUPT[:, 3] = [12, 2]
METRIC = cj.LogitDiff(np.array([4, 7]), np.array([9, 2]))

SWEEPS = [
    ("resid_pre", ("layer", "pos")), ("resid_mid", ("layer", "pos")), ("resid_post", ("layer", "pos")),
    ("attn_out", ("layer", "pos")), ("mlp_out", ("layer", "pos")),
    ("z", ("layer", "pos", "head")), ("z", ("layer", "head")), ("q", ("layer", "pos", "head")),
    ("k", ("layer", "head")), ("v", ("layer", "pos", "head")),
    ("pattern", ("layer", "head")), ("pattern", ("layer", "head", "dest")), ("pattern", ("layer", "head", "dest", "src")),
    ("mlp_post", ("layer", "neuron")), ("mlp_post", ("layer", "pos", "neuron")),
]  # fmt: skip


@pytest.fixture(scope="module", params=["gpt2like", "llamalike"])
def model(request):
    return cj.init_model(tiny_configs()[request.param], key=jax.random.key(7), std=0.4)


_SOURCE_CACHE: dict = {}


def _source_cache(model, tokens):
    """Every swept site of every layer from one plain run (one program per model, shared by all cases);
    the model is kept in the dict so that its id stays its own."""
    key = (id(model), tokens.tobytes())
    if key not in _SOURCE_CACHE:
        kinds = sorted({kind for kind, _ in SITES.values()})
        names = [f"blocks.{l}.{k}" for l in range(model.cfg.n_layers) for k in kinds]
        _SOURCE_CACHE[key] = (model, cj.run(model, tokens, cache=names).cache)
    return _SOURCE_CACHE[key][1]


def _loop(model, site, by, noising=False, layers=None):
    """Reference: one full forward per patch, a plain Python loop. The layer is a traced int
    (`Hook(kind, jnp.int32(l), ...)`), so one program per site kind serves every layer and every case
    of that kind; `test_traced_layer_index_patches_the_right_layer` checks it equals the static name."""
    kind, axes = SITES[site]
    src_tokens, tgt_tokens = (CORRUPT, CLEAN) if noising else (CLEAN, CORRUPT)
    L = model.cfg.n_layers
    src = _source_cache(model, src_tokens)
    shape = site_shape(Site(kind, 0), model.cfg, *CLEAN.shape)[1:]
    free = by[1:]
    sizes = [shape[axes[a]] for a in free]
    clean_m = float(METRIC(model(CLEAN)[:, -1]))
    corrupt_m = float(METRIC(model(CORRUPT)[:, -1]))
    layers = range(L) if layers is None else layers
    out = np.zeros((len(layers), *sizes), np.float32)
    for i, l in enumerate(layers):
        for index in itertools.product(*map(range, sizes)):
            hit = np.ones(shape, bool)
            for a, j in zip(free, index):
                sel = [slice(None)] * len(shape)
                sel[axes[a]] = np.arange(shape[axes[a]]) != j
                hit[tuple(sel)] = False
            value = src[f"blocks.{l}.{kind}"]
            logits = cj.run(model, tgt_tokens, hooks=[cj.Hook(kind, jnp.int32(l), cj.Replace(value, hit[None]))]).logits
            out[(i, *index)] = float(METRIC(logits[:, -1]))
    return cj.normalise(out, clean_m, corrupt_m)


@pytest.mark.slow_after_first
@pytest.mark.parametrize("site,by", SWEEPS, ids=[f"{s}-{'.'.join(b)}" for s, b in SWEEPS])
def test_vmapped_sweep_equals_python_loop(model, site, by):
    got = cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, site, by, progress=False)
    want = _loop(model, site, by)
    assert got.result.shape == want.shape
    np.testing.assert_allclose(got.result, want, atol=2e-4, rtol=1e-4)
    assert np.abs(want).max() > 1e-3  # the sweep found effects: the comparison is not of zeros


@pytest.mark.slow_after_first
def test_noising_equals_python_loop(model):
    got = cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, "z", ("layer", "pos", "head"), noising=True, progress=False)
    np.testing.assert_allclose(got.result, _loop(model, "z", ("layer", "pos", "head"), noising=True), atol=2e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("site,by", [("z", ("layer", "pos", "head")), ("mlp_post", ("layer", "neuron")), ("pattern", ("layer", "head", "dest", "src"))])
def test_chunked_unchunked_and_unskipped_sweeps_agree(model, site, by):
    base = cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, site, by, progress=False, skip_unchanged=False, chunk_size=10_000)
    for kwargs in [dict(chunk_size=1), dict(chunk_size=7), dict(skip_unchanged=True, chunk_size=5), dict(memory_budget=2**20)]:
        other = cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, site, by, progress=False, **kwargs)
        np.testing.assert_allclose(other.result, base.result, atol=1e-5, rtol=1e-5)


@pytest.mark.slow_after_first
def test_patching_a_run_into_itself_changes_nothing(model):
    for site, by in SWEEPS:
        with pytest.warns(UserWarning, match="give the same metric.*marked degenerate"):
            r = cj.patch_sweep(model, CLEAN, CLEAN, METRIC, site, by, progress=False, skip_unchanged=False)
        np.testing.assert_allclose(r.raw, r.clean_metric, atol=1e-5, err_msg=site)
        assert r.degenerate and np.isnan(r.result).all()


@pytest.mark.slow_after_first
def test_patching_the_whole_residual_stream_restores_the_clean_metric(model):
    for site in ("resid_pre", "resid_post"):
        r = cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, site, ("layer",), progress=False)
        np.testing.assert_allclose(r.result, 1.0, atol=1e-5)
        np.testing.assert_allclose(r.raw, r.clean_metric, atol=1e-5)


def test_positions_before_the_first_difference_score_exactly_zero(model):
    r = cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, "resid_pre", ("layer", "pos"), progress=False)
    assert np.all(r.result[:, :3] == 0.0)


def test_layers_option_selects_rows(model):
    full = cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, "z", ("layer", "pos", "head"), progress=False)
    some = cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, "z", ("layer", "pos", "head"), layers=[2, 0], progress=False)
    np.testing.assert_allclose(some.result, full.result[[2, 0]], atol=1e-6)


@pytest.mark.slow
def test_padded_dataset_of_pairs_matches_each_pair_alone(model):
    clean = [[3, 7, 1, 9, 4, 2, 8], [5, 0, 11, 21, 6]]
    corrupt = [[3, 7, 1, 12, 4, 2, 8], [5, 0, 2, 21, 6]]
    answer, wrong = np.array([4, 7]), np.array([9, 2])
    tokens = np.zeros((2, 2, 7), np.int32)
    mask = np.zeros((2, 7), bool)
    for i in range(2):  # right padding
        n = len(clean[i])
        tokens[0, i, :n], tokens[1, i, :n], mask[i, :n] = clean[i], corrupt[i], True
    got = cj.patch_sweep(model, tokens[0], tokens[1], cj.LogitDiff(answer, wrong), "z", ("layer", "head"),
                         attention_mask=mask, progress=False)  # fmt: skip
    raws = [cj.patch_sweep(model, np.array([clean[i]]), np.array([corrupt[i]]), cj.LogitDiff(answer[i:i + 1], wrong[i:i + 1]),
                           "z", ("layer", "head"), progress=False).raw for i in range(2)]  # fmt: skip
    np.testing.assert_allclose(got.raw, np.mean(raws, axis=0), atol=1e-4)


def test_bad_input_errors(model):
    with pytest.raises(ValueError, match=r"clean tokens have shape \(1, 7\) and corrupt tokens \(1, 6\).*to_padded"):
        cj.patch_sweep(model, CLEAN[:1], CLEAN[:1, :6], METRIC, progress=False)
    with pytest.raises(KeyError, match="valid sites: resid_pre"):
        cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, "zz", progress=False)
    with pytest.raises(KeyError, match=r"invalid axes 'layer,neuron' for site 'z'.*'pos', 'head'"):
        cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, "z", ("layer", "neuron"), progress=False)
    with pytest.raises(KeyError, match="'layer' first"):
        cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, "z", ("pos", "head"), progress=False)
    with pytest.raises(ValueError, match="out of range"):
        cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, "z", layers=[5], progress=False)


def test_repeated_sweeps_do_not_recompile(model):
    from circuits_jax.core import score_chunk as _score_chunk

    cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, "z", ("layer", "pos", "head"), chunk_size=8, progress=False)
    before = _score_chunk._cached._cache_size()
    cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, "z", ("layer", "pos", "head"), chunk_size=8, progress=False)
    cj.patch_sweep(model, CORRUPT, CLEAN, METRIC, "z", ("layer", "pos", "head"), chunk_size=8, progress=False)
    assert _score_chunk._cached._cache_size() == before


@pytest.mark.slow
def test_patch_set_equals_the_matching_sweep_entries(model):
    z = cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, "z", ("layer", "pos", "head"), progress=False)
    z_all = cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, "z", ("layer", "head"), progress=False)
    neurons = cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, "mlp_post", ("layer", "neuron"), progress=False)
    patches = [("z", 2, {"pos": 5, "head": 1}), ("mlp_post", 1, {"neuron": 3}), ("z", 0, {"head": 2}),
               ("z", 1, {"pos": 3, "head": 0}), ("resid_pre", 2, {})]  # fmt: skip
    got = cj.patch_set(model, CLEAN, CORRUPT, METRIC, patches, progress=False, chunk_size=2)
    want = [z.result[2, 5, 1], neurons.result[1, 3], z_all.result[0, 2], z.result[1, 3, 0], 1.0]
    np.testing.assert_allclose(got.result, want, atol=1e-5)
    with pytest.raises(ValueError, match="head=9 out of range"):
        cj.patch_set(model, CLEAN, CORRUPT, METRIC, [("z", 0, {"head": 9})], progress=False)


@pytest.mark.slow
def test_every_variants_stack_the_single_sweeps(model):
    heads = cj.patch_every_head(model, CLEAN, CORRUPT, METRIC, progress=False)
    cfg = model.cfg
    assert heads.result.shape == (5, cfg.n_layers, cfg.n_heads)
    k = cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, "k", ("layer", "head"), progress=False).result
    np.testing.assert_allclose(heads.result[2], np.repeat(k, cfg.group_size, axis=1), atol=1e-6)
    blocks = cj.patch_every_block(model, CLEAN, CORRUPT, METRIC, progress=False)
    assert blocks.result.shape == (3, cfg.n_layers, CLEAN.shape[1])
    mlp = cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, "mlp_out", ("layer", "pos"), progress=False).result
    np.testing.assert_allclose(blocks.result[2], mlp, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("n_layers", [2, 6])
def test_one_compiled_program_per_sweep_whatever_the_depth(n_layers):
    from circuits_jax.core import score_chunk as _score_chunk

    deep = cj.init_model(tiny_configs()["llamalike"].replace(n_layers=n_layers), key=jax.random.key(8), std=0.4)
    before = _score_chunk._cached._cache_size()
    cj.patch_sweep(deep, CLEAN, CORRUPT, METRIC, "z", ("layer", "pos", "head"), chunk_size=16, progress=False)
    assert _score_chunk._cached._cache_size() == before + 1
