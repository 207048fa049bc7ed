"""Sampled Shapley values: the axioms that hold exactly for the estimate, and the 2-player formula."""

import itertools

import jax
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.patching._shapley import shapley_values

from conftest import tiny_configs

CLEAN = np.array([[3, 7, 1, 9, 4, 2, 8], [5, 5, 0, 11, 21, 6, 1]], np.int32)
CORRUPT = CLEAN.copy()
CORRUPT[:, 3] = [12, 2]
METRIC = cj.LogitDiff(np.array([4, 7]), np.array([9, 2]))

# mixed sites and granularities: two heads, a whole MLP layer, one position of the residual stream
MIXED = [("z", 0, {"head": 1}), ("z", 1, {"head": 2}), ("mlp_out", 1, {}), ("resid_pre", 2, {"pos": 3}),
         ("z", 2, {"head": 0, "pos": 6})]  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return cj.init_model(tiny_configs()["llamalike"], key=jax.random.key(7), std=0.4)


def _patched_metric(model, patches, noising=False):
    """Reference v(S): one plain run with every patch of S as its own `Replace` hook."""
    src_tokens, tgt_tokens = (CORRUPT, CLEAN) if noising else (CLEAN, CORRUPT)
    hooks = []
    for site, layer, index in patches:
        kind, axes = cj.PATCH_SITES[site]
        name = f"blocks.{layer}.{kind}"
        source = cj.run(model, src_tokens, cache=[name]).cache[name]
        hit = np.ones(source.shape[1:], bool)
        for a, j in index.items():
            sel = [slice(None)] * hit.ndim
            sel[axes[a]] = np.arange(hit.shape[axes[a]]) != j
            hit[tuple(sel)] = False
        hooks.append(cj.Hook(kind, layer, cj.Replace(source, hit[None])))
    return float(METRIC(cj.run(model, tgt_tokens, hooks=hooks).logits[:, -1]))


@pytest.mark.slow
@pytest.mark.parametrize("noising", [False, True], ids=["denoise", "noise"])
def test_efficiency_holds_exactly_for_sampled_permutations(model, noising):
    sv = shapley_values(model, CLEAN, CORRUPT, METRIC, MIXED, n_permutations=6, key=jax.random.key(0),
                        noising=noising, chunk_size=8, progress=False)  # fmt: skip
    assert sv.result.shape == sv.raw.shape == sv.stderr.shape == (5,) and sv.n_permutations == 6
    assert sv.marginals.shape == sv.permutations.shape == (6, 5)
    # every permutation's marginals telescope to v(all) - v(empty), so the means do too
    np.testing.assert_allclose(sv.marginals.sum(1), sv.full_metric - sv.empty_metric, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sv.raw.sum(), sv.full_metric - sv.empty_metric, rtol=1e-5, atol=1e-6)
    # the coalition program's endpoints are the target run and an independent run with everything patched
    target = sv.clean_metric if noising else sv.corrupt_metric
    np.testing.assert_allclose(sv.empty_metric, target, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sv.full_metric, _patched_metric(model, MIXED, noising), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sv.result, sv.raw / (sv.clean_metric - sv.corrupt_metric), rtol=1e-5)
    assert (sv.stderr >= 0).all()
    again = shapley_values(model, CLEAN, CORRUPT, METRIC, MIXED, n_permutations=6, key=jax.random.key(0),
                           noising=noising, chunk_size=8, progress=False)  # fmt: skip
    np.testing.assert_array_equal(again.raw, sv.raw)  # the key fixes the sample


def test_two_players_match_the_formula(model):
    """With both orders, the estimate is the exact 2-player Shapley value, from independent runs:
    phi_a = ((v(a) - v()) + (v(ab) - v(b))) / 2."""
    a, b = ("z", 1, {"head": 3}), ("mlp_out", 0, {})
    singles = cj.patch_set(model, CLEAN, CORRUPT, METRIC, [a, b], progress=False, skip_unchanged=False)
    v_a, v_b = singles.raw
    v_none, v_ab = singles.corrupt_metric, _patched_metric(model, [a, b])
    sv = shapley_values(model, CLEAN, CORRUPT, METRIC, [a, b], permutations=[[0, 1], [1, 0]], progress=False)
    expected = [((v_a - v_none) + (v_ab - v_b)) / 2, ((v_b - v_none) + (v_ab - v_a)) / 2]
    np.testing.assert_allclose(sv.raw, expected, rtol=1e-4, atol=1e-5)


def test_shorthand_components_name_the_site_axes_without_pos(model):
    heads = [(1, 3), (2, 0)]
    short = shapley_values(model, CLEAN, CORRUPT, METRIC, heads, site="z", permutations=[[0, 1], [1, 0]],
                           progress=False)  # fmt: skip
    full = shapley_values(model, CLEAN, CORRUPT, METRIC, [("z", 1, {"head": 3}), ("z", 2, {"head": 0})],
                          permutations=[[0, 1], [1, 0]], progress=False)  # fmt: skip
    np.testing.assert_array_equal(short.raw, full.raw)
    assert short.components == full.components
    layers = shapley_values(model, CLEAN, CORRUPT, METRIC, [(0,), (2,)], site="mlp_out",
                            permutations=[[0, 1], [1, 0]], progress=False)  # fmt: skip
    assert layers.components == (("mlp_out", 0, {}), ("mlp_out", 2, {}))


def test_dummy_and_symmetric_components(model):
    """All 24 orders of 4 components (exact values): a head at a position before the first corrupted
    token has the same value in both runs (a dummy: 0), and a component listed twice is two
    symmetric players (equal values)."""
    dummy = ("z", 0, {"head": 1, "pos": 1})
    a, b = ("z", 1, {"head": 2}), ("mlp_out", 1, {})
    perms = list(itertools.permutations(range(4)))
    sv = shapley_values(model, CLEAN, CORRUPT, METRIC, [dummy, a, a, b], permutations=perms, progress=False)
    np.testing.assert_allclose(sv.raw[0], 0.0, atol=1e-6)
    np.testing.assert_allclose(sv.raw[1], sv.raw[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sv.raw.sum(), sv.full_metric - sv.empty_metric, rtol=1e-5, atol=1e-6)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="key"):
        shapley_values(model, CLEAN, CORRUPT, METRIC, [(1, 3)], progress=False)
    with pytest.raises(ValueError, match="layers 0..2"):
        shapley_values(model, CLEAN, CORRUPT, METRIC, [("z", 5, {"head": 0})], key=jax.random.key(0))
    with pytest.raises(ValueError, match="out of range"):
        shapley_values(model, CLEAN, CORRUPT, METRIC, [("z", 1, {"head": 9})], key=jax.random.key(0))
    with pytest.raises(ValueError, match="permutations"):
        shapley_values(model, CLEAN, CORRUPT, METRIC, [(1, 3), (2, 0)], permutations=[[0, 0]])
    with pytest.raises(KeyError, match="invalid axes"):
        shapley_values(model, CLEAN, CORRUPT, METRIC, [("z", 1, {"neuron": 0})], key=jax.random.key(0))
