"""Invariants of the forward pass and of interventions, on a spread of tiny random architectures."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import circuits_jax as cj
from circuits_jax.core._sites import layer_kinds

from conftest import tiny_configs

CONFIGS = tiny_configs()
TOKENS = np.array([[3, 7, 1, 9, 4, 2, 8], [5, 5, 0, 11, 21, 6, 1]], np.int32)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return cj.init_model(CONFIGS[request.param], key=jax.random.key(1), std=0.3)


@pytest.mark.slow_after_first
def test_every_site_has_its_documented_shape(model):
    from circuits_jax.core._sites import SPLIT_INPUTS, site_shape

    names = cj.all_site_names(model.cfg)
    split = [n for n in names if n.split(".", 2)[-1] in SPLIT_INPUTS]  # not in one run with the ln1 sites
    assert len(split) == 3 * model.cfg.n_layers
    for part in ([n for n in names if n not in split], split):
        out = cj.run(model, TOKENS, cache=part)
        assert set(out.cache) == set(part)
        for name, value in out.cache.items():
            assert value.shape == site_shape(cj.parse_site(name, model.cfg), model.cfg, *TOKENS.shape), name
        assert out.logits.shape == (*TOKENS.shape, model.cfg.d_vocab)


def _split(names):
    """The split q/k/v inputs apart: they cannot share a run with the ln1 sites."""
    from circuits_jax.core._sites import SPLIT_INPUTS

    split = [n for n in names if n.split(".", 2)[-1] in SPLIT_INPUTS]
    return [n for n in names if n not in split], split


def _assert_unchanged(got, want, names):
    """Bit-exact, except that hooking `attn.hook_result` sums per-head outputs (a reassociated sum) and
    split inputs normalise each head's copy of the stream on its own (another order of the same sums)."""
    from circuits_jax.core._sites import SPLIT_INPUTS

    if any(n.endswith("attn.hook_result") or n.split(".", 2)[-1] in SPLIT_INPUTS for n in names):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow_after_first
def test_identity_intervention_changes_nothing(model):
    clean = model(TOKENS)
    names, split = _split(cj.all_site_names(model.cfg))
    exact = [n for n in names if not n.endswith("attn.hook_result")]
    for chosen in (exact, names, split):
        hooks = [(name, cj.Apply(lambda x: x)) for name in chosen]
        _assert_unchanged(cj.run(model, TOKENS, hooks=hooks).logits, clean, chosen)


@pytest.mark.slow_after_first
def test_replacing_every_site_with_its_cached_value_changes_nothing(model):
    names, split = _split(cj.all_site_names(model.cfg))
    out = cj.run(model, TOKENS, cache=names)
    exact = [n for n in names if not n.endswith("attn.hook_result")]
    for chosen in (exact, names):
        hooks = {name: cj.Replace(out.cache[name]) for name in chosen}
        _assert_unchanged(cj.run(model, TOKENS, hooks=hooks).logits, out.logits, chosen)
    split_out = cj.run(model, TOKENS, cache=split)
    hooks = {name: cj.Replace(split_out.cache[name]) for name in split}
    _assert_unchanged(cj.run(model, TOKENS, hooks=hooks).logits, out.logits, split)


@pytest.mark.slow_after_first
def test_interventions_change_what_they_touch(model):
    clean = model(TOKENS)
    zeroed = cj.run(model, TOKENS, hooks={"blocks.1.hook_attn_out": cj.Zero()}).logits
    assert np.abs(zeroed - clean).max() > 1e-3
    # effects are causal: zeroing the attention output at the last position leaves earlier logits alone
    mask = np.zeros((1, TOKENS.shape[1], 1), bool)
    mask[:, -1] = True
    last = cj.run(model, TOKENS, hooks={"blocks.1.hook_attn_out": cj.Zero(mask=mask)}).logits
    if model.cfg.causal:
        np.testing.assert_array_equal(last[:, :-1], clean[:, :-1])
    assert np.abs(last[:, -1] - clean[:, -1]).max() > 1e-4


@pytest.mark.slow_after_first
def test_compose_equals_sequential_hooks(model):
    site = "blocks.2.hook_resid_pre"
    delta = jnp.full((model.cfg.d_model,), 0.5)
    a = cj.run(model, TOKENS, hooks={site: cj.Compose((cj.Add(delta), cj.Scale(2.0)))}).logits
    b = cj.run(model, TOKENS, hooks=[(site, cj.Add(delta)), (site, cj.Scale(2.0))]).logits
    c = cj.run(model, TOKENS, hooks={site: cj.Apply(lambda x: (x + 0.5) * 2.0)}).logits
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, atol=1e-5)


@pytest.mark.slow_after_first
@pytest.mark.parametrize("start", [0, 1, 2])
def test_starting_at_a_layer_from_the_cached_residual_reproduces_the_forward(model, start):
    out = cj.run(model, TOKENS, cache=[f"blocks.{start}.hook_resid_pre"])
    resumed = cj.run(model, TOKENS, start_layer=start, resid=out.cache[f"blocks.{start}.hook_resid_pre"])
    np.testing.assert_allclose(resumed.logits, out.logits, atol=1e-5)


def test_stop_layer_returns_the_residual_entering_that_layer(model):
    out = cj.run(model, TOKENS, cache=["blocks.2.hook_resid_pre"])
    stopped = cj.run(model, TOKENS, stop_layer=2)
    assert stopped.logits is None
    np.testing.assert_array_equal(stopped.resid, out.cache["blocks.2.hook_resid_pre"])


@pytest.mark.slow_after_first
def test_one_compiled_forward_serves_every_start_and_stop_layer(model):
    f = eqx.filter_jit(lambda m, t, r, a, b: cj.run(m, t, resid=r, start_layer=a, stop_layer=b).resid)
    names = [f"blocks.{l}.hook_resid_pre" for l in range(3)]
    cache = cj.run(model, TOKENS, cache=names).cache
    for a, b in [(0, 1), (1, 3), (0, 2), (2, 3)]:
        got = f(model, TOKENS, cache[names[a]], jnp.int32(a), jnp.int32(b))
        want = cache[names[b]] if b < 3 else cj.run(model, TOKENS).resid
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert f._cached._cache_size() == 1


@pytest.mark.slow_after_first
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_rows_equal_unpadded_rows(model, side):
    rows = [[3, 7, 1, 9, 4], [5, 2], [8, 8, 8, 1]]
    T = max(map(len, rows))
    tokens = np.zeros((3, T), np.int32)
    mask = np.zeros((3, T), bool)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        tokens[i, sl], mask[i, sl] = r, True
    padded = cj.run(model, tokens, attention_mask=mask).logits
    for i, r in enumerate(rows):
        alone = model(np.asarray([r], np.int32))[0]
        np.testing.assert_allclose(padded[i][mask[i]], alone, atol=1e-5)


@pytest.mark.slow_after_first
def test_hooks_work_under_jit_vmap_and_grad(model):
    site = "blocks.1.hook_resid_mid" if not model.cfg.attn_only else "blocks.1.hook_resid_post"

    def loss(delta):
        return cj.run(model, TOKENS, hooks={site: cj.Add(delta)}).logits[:, -1, 0].sum()

    zero = jnp.zeros(model.cfg.d_model)
    g = jax.jit(jax.grad(loss))(zero)
    loss = jax.jit(loss)
    eps = 1e-3
    e0 = zero.at[0].set(eps)
    fd = (loss(e0) - loss(-e0)) / (2 * eps)
    np.testing.assert_allclose(g[0], fd, rtol=2e-2, atol=1e-3)
    # vmap over a batch of interventions == a Python loop over them
    deltas = jax.random.normal(jax.random.key(2), (4, model.cfg.d_model))
    batched = jax.jit(jax.vmap(loss))(deltas)
    np.testing.assert_allclose(batched, [loss(d) for d in deltas], rtol=1e-5, atol=1e-5)


@pytest.mark.slow_after_first
def test_traced_layer_index_patches_the_right_layer(model):
    cache = cj.run(model, TOKENS, cache=[f"blocks.{l}.hook_resid_pre" for l in range(3)]).cache

    def patched(layer):
        hook = cj.Hook("hook_resid_pre", layer, cj.Zero())
        return cj.run(model, TOKENS, hooks=[hook]).logits

    swept = jax.jit(jax.vmap(patched))(jnp.arange(3))
    for l in range(3):
        np.testing.assert_allclose(swept[l], cj.run(model, TOKENS, hooks={f"blocks.{l}.hook_resid_pre": cj.Zero()}).logits, atol=1e-5)
    assert cache  # the sites exist


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_property_replacing_any_site_with_its_own_value_is_exact(data):
    name = data.draw(st.sampled_from(sorted(CONFIGS)))
    model = cj.init_model(CONFIGS[name], key=jax.random.key(3), std=0.3)
    site = data.draw(st.sampled_from(cj.all_site_names(model.cfg)))
    tokens = np.asarray(data.draw(st.lists(st.integers(0, 22), min_size=1, max_size=9)), np.int32)[None]
    out = cj.run(model, tokens, cache=[site])
    _assert_unchanged(cj.run(model, tokens, hooks={site: cj.Replace(out.cache[site])}).logits, out.logits, [site])


def test_every_layer_kind_is_reachable_by_shorthand():
    cfg = CONFIGS["llamalike"]
    assert cj.parse_site(("z", 1), cfg).name == "blocks.1.attn.hook_z"
    assert cj.parse_site(("resid_pre", 0), cfg).name == "blocks.0.hook_resid_pre"
    assert cj.parse_site(("scale", 2, "ln2"), cfg).name == "blocks.2.ln2.hook_scale"
    assert cj.parse_site(("scale",), cfg).name == "ln_final.hook_scale"
    assert cj.parse_site("hook_embed", cfg).layer is None
    assert "attn.hook_rot_q" in layer_kinds(cfg) and "mlp.hook_pre_linear" in layer_kinds(cfg)
    assert "attn.hook_rot_q" not in layer_kinds(CONFIGS["gpt2like"])


def test_traced_program_size_does_not_grow_with_depth():
    def size(n_layers):
        # make_jaxpr reads only shapes: an abstract model (eval_shape) traces the same program without
        # compiling the random initialisation of 2- and 12-layer models (nearly all of the 16 s this took)
        cfg = CONFIGS["llamalike"].replace(n_layers=n_layers)
        m = jax.eval_shape(lambda: cj.init_model(cfg, key=jax.random.key(0)))
        jaxpr = jax.make_jaxpr(lambda m, t: cj.run(m, t, cache=["blocks.1.attn.hook_z"]).logits)(m, TOKENS)
        return len(str(jaxpr).splitlines())  # equations; shapes inside them differ in digits only

    assert size(2) == size(12)


@pytest.mark.smollm2
@pytest.mark.parametrize("side", ["left", "right"])
def test_smollm2_padded_batch_rows_equal_each_prompt_alone(smollm2, side):
    model, tok = smollm2
    texts = ["The capital of France is", "When Mary and John went to the store, John gave a drink to", "Hi"]
    tokens, mask = tok.to_padded(texts, padding_side=side)
    logits = cj.run(model, tokens, attention_mask=mask).logits
    for i, text in enumerate(texts):
        alone = model(tok.to_tokens(text))[0]
        np.testing.assert_allclose(logits[i][mask[i]], alone, atol=1e-3, rtol=1e-5)
