"""AtP*: queries and keys are exact up to the linearisation after the attention pattern; GradDrop
equals a loop of backward passes with one layer's gradient stopped, and keeps its invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.patching._attribution import atp_star, attribution_patch

from conftest import tiny_configs

CLEAN = np.array([[3, 7, 1, 9, 4, 2, 8], [5, 5, 0, 11, 21, 6, 1]], np.int32)
CORRUPT = CLEAN.copy()
CORRUPT[:, 3] = [12, 2]
CORRUPT[:, 6] = [0, 13]  # the scored query differs too, so query patches at the last position matter
METRIC = cj.LogitDiff(np.array([4, 7]), np.array([9, 2]))

# left padding in row 0, right padding in row 1 (the scored position is each row's last real token)
PADDED_CLEAN = np.array([[0, 0, 3, 7, 1, 9, 4, 2, 8], [5, 5, 0, 11, 21, 6, 1, 0, 0]], np.int32)
PADDED_CORRUPT = PADDED_CLEAN.copy()
PADDED_CORRUPT[0, [5, 8]] = [12, 0]
PADDED_CORRUPT[1, [3, 6]] = [2, 13]
PAD_MASK = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0, 0]], bool)


def _attn_only(n_layers, gqa_rope):
    """No norm, no MLP: the metric is linear in the last layer's attention pattern."""
    cfg = tiny_configs()["attn_only"].replace(n_layers=n_layers)
    return cfg.replace(n_kv_heads=2, positional="rotary") if gqa_rope else cfg


# per (query or key) position and head, and keys of all positions at once (the other code path)
QK_SWEEPS = [("q", ("layer", "pos", "head")), ("k", ("layer", "pos", "head")), ("k", ("layer", "head"))]


@pytest.mark.slow
@pytest.mark.parametrize("gqa_rope", [False, True], ids=["mha", "gqa-rope"])
@pytest.mark.parametrize("noising", [False, True], ids=["denoise", "noise"])
def test_queries_and_keys_are_exact_where_only_the_softmax_is_nonlinear(gqa_rope, noising):
    """Attention only, no norms: the metric is linear in the last layer's pattern, so recomputing its
    softmax leaves nothing to linearise (the first layer's pattern still feeds the second layer's
    softmax: not exact, not checked). std=1 saturates the softmax, where plain AtP is far off."""
    m = cj.init_model(_attn_only(2, gqa_rope), key=jax.random.key(3), std=1.0)
    for site, by in QK_SWEEPS:
        exact = cj.patch_sweep(m, CLEAN, CORRUPT, METRIC, site, by, noising=noising, progress=False)
        star = atp_star(m, CLEAN, CORRUPT, METRIC, site, by, noising=noising)
        plain = attribution_patch(m, CLEAN, CORRUPT, METRIC, site, by, noising=noising)
        assert star.result.shape == exact.result.shape and star.axes == exact.axes
        exact, star, plain = exact.raw[-1], star.raw[-1], plain.raw[-1]
        scale = np.abs(exact - exact.flat[0]).max() + np.abs(exact).max()
        np.testing.assert_allclose(star, exact, atol=2e-6 * scale, err_msg=f"{site} {by}")
        assert np.abs(plain - exact).max() > 0.05 * scale, "the check would not tell AtP* from AtP"


@pytest.mark.slow
@pytest.mark.parametrize("std", [1.0, 3.0])
def test_keys_stay_exact_in_saturated_padded_rows(std):
    """Left and right padding, GQA and RoPE; std=3 saturates many rows to P = 1 in float32 (other
    keys' weights underflow), where `1 - P` would lose them."""
    m = cj.init_model(_attn_only(1, True), key=jax.random.key(4), std=std)
    kw = dict(attention_mask=PAD_MASK)
    for site, by in [("q", ("layer", "pos", "head")), ("k", ("layer", "pos", "head")), ("k", ("layer", "head"))]:
        exact = cj.patch_sweep(m, PADDED_CLEAN, PADDED_CORRUPT, METRIC, site, by, progress=False, **kw)
        star = atp_star(m, PADDED_CLEAN, PADDED_CORRUPT, METRIC, site, by, **kw)
        scale = np.abs(exact.raw - exact.corrupt_metric).max()
        assert np.isfinite(star.raw).all()
        np.testing.assert_allclose(star.raw, exact.raw, atol=3e-6 * scale, err_msg=f"{site} {by}")


@pytest.fixture(scope="module", params=["gpt2like", "llamalike"])
def model(request):
    return cj.init_model(tiny_configs()[request.param], key=jax.random.key(7), std=0.4)


@pytest.mark.slow
def test_shapes_and_normalisation_match_the_sweep():
    """Grouped-query attention: keys are per kv head, as in `patch_sweep`."""
    model = cj.init_model(tiny_configs()["llamalike"], key=jax.random.key(7), std=0.4)
    for site, by in [("k", ("layer", "pos", "head")), ("z", ("layer", "head"))]:
        exact = cj.patch_sweep(model, CLEAN, CORRUPT, METRIC, site, by, progress=False)
        for graddrop in (False, True):
            star = atp_star(model, CLEAN, CORRUPT, METRIC, site, by, graddrop=graddrop)
            assert star.result.shape == exact.result.shape and star.axes == exact.axes
            assert star.result.dtype == np.float32 and star.raw.dtype == np.float32
            np.testing.assert_allclose([star.clean_metric, star.corrupt_metric],
                                       [exact.clean_metric, exact.corrupt_metric], rtol=1e-5)  # fmt: skip
    star = atp_star(model, CLEAN, CORRUPT, METRIC, "k", ("layer", "pos", "head"))
    np.testing.assert_allclose(star.result, cj.normalise(star.raw, star.clean_metric, star.corrupt_metric), rtol=1e-6)


@pytest.mark.slow_after_first
def test_other_sites_are_plain_atp(model):
    for site, by in [("z", ("layer", "pos", "head")), ("z", ("layer", "head"))]:
        plain = attribution_patch(model, CLEAN, CORRUPT, METRIC, site, by)
        star = atp_star(model, CLEAN, CORRUPT, METRIC, site, by)
        np.testing.assert_allclose(star.raw, plain.raw, rtol=1e-6, atol=1e-6)


def _graddrop_loop(model, site_kind, noising=False):
    """Reference GradDrop for `z`-like sites by (layer, pos, head): a Python loop over the dropped
    layer, each a fresh backward pass with `Apply(stop_gradient)` at that layer's outputs."""
    cfg = model.cfg
    L = cfg.n_layers
    src_tokens, tgt_tokens = (CORRUPT, CLEAN) if noising else (CLEAN, CORRUPT)
    names = [f"blocks.{l}.{site_kind}" for l in range(L)]
    src = jnp.stack([cj.run(model, src_tokens, cache=names).cache[n] for n in names])
    tgt = jnp.stack([cj.run(model, tgt_tokens, cache=names).cache[n] for n in names])
    outs = ["hook_attn_out"] + ([] if cfg.attn_only else ["hook_mlp_out"])
    total = 0.0
    for dropped in range(L):
        def metric_of(delta):
            hooks = [cj.Hook(site_kind, cj.ALL_LAYERS, cj.PerLayer(cj.Add(delta)))]
            hooks += [cj.Hook(k, jnp.int32(dropped), cj.Apply(jax.lax.stop_gradient)) for k in outs]  # one program
            return METRIC(cj.run(model, tgt_tokens, hooks=hooks).logits[:, -1])

        grad = jax.grad(metric_of)(jnp.zeros_like(src))
        term = np.asarray(((src - tgt) * grad).sum(axis=(1, 4)))  # [L, T, H]: over batch and d_head
        total = total + np.abs(term)
    return total / (L - 1)


@pytest.mark.slow
@pytest.mark.parametrize("noising", [False, True], ids=["denoise", "noise"])
def test_graddrop_equals_a_loop_of_stopped_backward_passes(model, noising):
    gd = atp_star(model, CLEAN, CORRUPT, METRIC, "z", ("layer", "pos", "head"), graddrop=True, noising=noising)
    reference = _graddrop_loop(model, "attn.hook_z", noising)
    np.testing.assert_allclose(gd.raw, reference, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gd.result, gd.raw / abs(gd.clean_metric - gd.corrupt_metric), rtol=1e-6)


@pytest.mark.slow_after_first
@pytest.mark.parametrize("site,by", [("q", ("layer", "pos", "head")), ("k", ("layer", "pos", "head"))])
def test_graddrop_invariants(model, site, by):
    """Unsigned; and a node of the last layer is the magnitude of its AtP* estimate: dropping any layer
    below leaves its gradient as it is (L - 1 terms of |AtP*|), dropping its own layer zeroes it."""
    gd = atp_star(model, CLEAN, CORRUPT, METRIC, site, by, graddrop=True)
    star = atp_star(model, CLEAN, CORRUPT, METRIC, site, by)
    assert (gd.result >= 0).all() and (gd.raw >= 0).all()
    np.testing.assert_allclose(gd.raw[-1], np.abs(star.raw[-1] - star.corrupt_metric), rtol=1e-4, atol=1e-6)
    if "pos" in by and site == "q":  # queries before the first corrupted token see identical runs
        np.testing.assert_allclose(gd.raw[:, :3], 0.0, atol=1e-6)


@pytest.mark.slow
def test_graddrop_needs_two_layers():
    m = cj.init_model(_attn_only(1, False), key=jax.random.key(0))
    with pytest.raises(ValueError, match="GradDrop"):
        atp_star(m, CLEAN, CORRUPT, METRIC, "z", graddrop=True)
