"""Attribution patching and direct logit attribution: exact where they must be, first-order where not."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.patching._attribution import attribution_patch, attribution_patch_all
from circuits_jax.toolshed._logit_attribution import decompose_resid, direct_logit_attribution, logit_lens, neuron_logit_attribution

from conftest import tiny_configs

CLEAN = np.array([[3, 7, 1, 9, 4, 2, 8], [5, 5, 0, 11, 21, 6, 1]], np.int32)
CORRUPT = CLEAN.copy()
CORRUPT[:, 3] = [12, 2]
METRIC = cj.LogitDiff(np.array([4, 7]), np.array([9, 2]))
SWEEPS = [("resid_pre", ("layer", "pos")), ("z", ("layer", "pos", "head")), ("z", ("layer", "head")),
          ("k", ("layer", "pos", "head")), ("pattern", ("layer", "head", "dest", "src")), ("mlp_post", ("layer", "neuron"))]  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return cj.init_model(tiny_configs()["llamalike"], key=jax.random.key(7), std=0.1)


@pytest.mark.slow
def test_atp_is_the_directional_derivative_of_the_patch(model):
    """AtP's estimate for a patch equals d/de metric(target + e (source - target)) at e = 0."""
    at = attribution_patch(model, CLEAN, CORRUPT, METRIC, "z", ("layer", "pos", "head"))
    src = cj.run(model, CLEAN, cache=["blocks.1.attn.hook_z"]).cache["blocks.1.attn.hook_z"]
    tgt = cj.run(model, CORRUPT, cache=["blocks.1.attn.hook_z"]).cache["blocks.1.attn.hook_z"]
    mask = np.zeros(src.shape, bool)
    mask[:, 4, 2] = True

    def metric_at(e):
        value = jnp.where(mask, tgt + e * (src - tgt), tgt)
        return METRIC(cj.run(model, CORRUPT, hooks={"blocks.1.attn.hook_z": cj.Replace(value)}).logits[:, -1])

    derivative = jax.grad(metric_at)(0.0)
    np.testing.assert_allclose(at.raw[1, 4, 2] - at.corrupt_metric, derivative, rtol=1e-4, atol=1e-6)


@pytest.mark.slow_after_first
@pytest.mark.parametrize("site,by", SWEEPS, ids=[f"{s}-{'.'.join(b)}" for s, b in SWEEPS])
def test_atp_has_the_sweep_shape_and_tracks_it(model, site, by):
    exact = cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, site, by, progress=False)
    at = attribution_patch(model, CLEAN, CORRUPT, METRIC, site, by)
    assert at.result.shape == exact.result.shape and at.axes == exact.axes
    assert np.corrcoef(exact.result.ravel(), at.result.ravel())[0, 1] > 0.8


def test_atp_is_exact_where_the_metric_is_linear():
    """No norm, no MLP: the last layer's resid_post reaches the logits linearly."""
    m = cj.init_model(tiny_configs()["attn_only"], key=jax.random.key(3), std=0.3)
    exact = cj.patch_sweep(m, CLEAN, CORRUPT, METRIC, "resid_post", ("layer", "pos"), progress=False)
    at = attribution_patch(m, CLEAN, CORRUPT, METRIC, "resid_post", ("layer", "pos"))
    np.testing.assert_allclose(at.result[-1], exact.result[-1], atol=1e-4)


def test_atp_of_every_site_in_one_backward(model):
    est, pairs = attribution_patch_all(model, CLEAN, CORRUPT, METRIC)
    assert set(est) == set(cj.PATCH_SITES)
    assert est["z"].shape == (3, 2, 7, 4, 4) and est["k"].shape == (3, 2, 7, 2, 4)
    # identical prefix: nothing to attribute (up to float noise: the hooked target run fuses differently)
    np.testing.assert_allclose(est["resid_pre"][:, :, :3], 0.0, atol=1e-6)


def _with_biases(name):
    m = cj.init_model(tiny_configs()[name], key=jax.random.key(5), std=0.3)
    leaves = lambda t: [x for x in (t.lnf_b, t.b_U, t.blocks.b_O, t.blocks.b_out) if x is not None]  # noqa: E731
    return eqx.tree_at(leaves, m, [x + 0.05 * (i + 1) for i, x in enumerate(leaves(m))])


@pytest.mark.slow_after_first
@pytest.mark.parametrize("name", sorted(tiny_configs()))
def test_direct_logit_attributions_sum_to_the_logit(name):
    m = _with_biases(name)
    for wrong in (None, np.array([9, 2])):
        attributions, labels, constant, logit = direct_logit_attribution(m, CLEAN, np.array([4, 7]), wrong)
        assert len(labels) == attributions.shape[0]
        np.testing.assert_allclose(attributions.sum(0) + constant, logit, atol=1e-4, rtol=1e-5)
    dec, ctx = decompose_resid(m, CLEAN, pos=3)
    np.testing.assert_allclose(dec.components.sum(0), ctx["out"].resid[:, 3], atol=1e-5)


@pytest.mark.slow
def test_neurons_sum_to_their_mlp_minus_its_bias():
    m = _with_biases("gpt2like")
    attributions, labels, _, _ = direct_logit_attribution(m, CLEAN, np.array([4, 7]))
    neurons = neuron_logit_attribution(m, CLEAN, np.array([4, 7]))
    mlp = np.array([attributions[labels.index(f"L{l}.mlp")] for l in range(3)])
    assert neurons.shape == (3, 2, 32)
    scale = cj.run(m, CLEAN, cache=["ln_final.hook_scale"]).cache["ln_final.hook_scale"][:, -1]
    direction = m.W_U[:, np.array([4, 7])].T
    b = m.blocks.b_out
    bias_share = np.einsum("lbd,bd->lb", (b[:, None] - b.mean(-1, keepdims=True)[:, None]) / scale[None] * m.lnf_w, direction)
    np.testing.assert_allclose(neurons.sum(-1), mlp - bias_share, atol=1e-4)


def test_logit_lens_ends_at_the_logits(model):
    lens = logit_lens(model, CLEAN)
    assert lens.shape == (4, 2, 23)
    np.testing.assert_allclose(lens[-1], model(CLEAN)[:, -1], atol=1e-5)


def test_integrated_gradients_is_complete_along_the_input_path():
    """The embedding path's endpoints are the two runs, so layer 0's whole residual stream gets the
    full metric change (exact up to the midpoint rule)."""
    from circuits_jax.patching._attribution import integrated_gradients

    m = cj.init_model(tiny_configs()["llamalike"], key=jax.random.key(7), std=0.3)
    ig = integrated_gradients(m, CLEAN, CORRUPT, METRIC, "resid_pre", ("layer",), steps=64)
    np.testing.assert_allclose(ig.raw[0] - ig.corrupt_metric, ig.clean_metric - ig.corrupt_metric, rtol=1e-3)
    sweep = integrated_gradients(m, CLEAN, CORRUPT, METRIC, "z", ("layer", "pos", "head"), steps=4)
    assert sweep.result.shape == (3, 7, 4)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        integrated_gradients(m, CLEAN, CORRUPT, METRIC, steps=0)


def test_integrated_gradients_is_exact_where_the_metric_is_linear():
    from circuits_jax.patching._attribution import integrated_gradients

    m = cj.init_model(tiny_configs()["attn_only"], key=jax.random.key(3), std=0.3)
    exact = cj.patch_sweep(m, CLEAN, CORRUPT, METRIC, "resid_post", ("layer", "pos"), progress=False)
    ig = integrated_gradients(m, CLEAN, CORRUPT, METRIC, "resid_post", ("layer", "pos"), steps=3)
    np.testing.assert_allclose(ig.result[-1], exact.result[-1], atol=1e-4)
