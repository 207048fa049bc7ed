"""Generation with a KV cache: equal to full recomputation, padding-exact, seeded sampling,
interventions at every step or at the prompt only, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj

from conftest import tiny_configs

TOKS = jnp.array([[1, 5, 7, 3, 9], [2, 4, 6, 8, 10]], jnp.int32)


@pytest.fixture(scope="module", params=["llamalike", "gpt2like"])
def model(request):
    return cj.init_model(tiny_configs()[request.param], key=jax.random.key(0), std=0.5)


def _recompute(model, toks, n, hooks=None):
    """Greedy generation by a full forward pass per new token (no cache). The sequence grows inside a
    buffer of its final length: causal attention keeps the unwritten positions (zeros) from the
    position read, and one compiled forward serves every step instead of one per length."""
    assert model.cfg.causal
    B, T = toks.shape
    seq, logits = jnp.zeros((B, T + n), toks.dtype).at[:, :T].set(toks), []
    for i in range(n):
        lg = cj.run(model, seq, hooks=hooks).logits[:, T - 1 + i]
        logits.append(lg)
        seq = seq.at[:, T + i].set(jnp.argmax(lg, -1).astype(seq.dtype))
    return seq[:, T:], jnp.stack(logits, 1)


def test_kv_cache_equals_full_recomputation(model):
    g = cj.generate(model, TOKS, 6)
    toks, logits = _recompute(model, TOKS, 6)
    np.testing.assert_array_equal(g.tokens, toks)
    np.testing.assert_allclose(g.logits, logits, atol=1e-4)


def test_left_padded_rows_generate_what_they_generate_alone(model):
    mask = jnp.array([[True] * 5, [False, False, True, True, True]])
    both = cj.generate(model, TOKS, 4, attention_mask=mask)
    alone = cj.generate(model, TOKS[1:, 2:], 4)
    np.testing.assert_array_equal(both.tokens[1], alone.tokens[0])
    np.testing.assert_allclose(both.logits[1], alone.logits[0], atol=1e-4)


@pytest.mark.slow_after_first
def test_interventions_at_every_step_or_at_the_prompt(model):
    D = model.cfg.d_model
    base = cj.generate(model, TOKS, 6)  # 6 new tokens throughout this file: one compiled generation each
    zero = cj.generate(model, TOKS, 6, hooks=[cj.Hook("hook_resid_pre", 1, cj.Add(jnp.zeros(D)))])
    np.testing.assert_array_equal(zero.logits, base.logits)  # a zero steering vector changes nothing
    v = 3.0 * jax.random.normal(jax.random.key(3), (D,))
    hooks = [cj.Hook("hook_resid_pre", 1, cj.Add(v))]
    steered = cj.generate(model, TOKS, 6, hooks=hooks)
    toks, logits = _recompute(model, TOKS, 6, hooks=hooks)  # the hook on every position of every pass
    np.testing.assert_array_equal(steered.tokens, toks)
    np.testing.assert_allclose(steered.logits, logits, atol=1e-4)
    assert float(jnp.max(jnp.abs(steered.logits - base.logits))) > 1e-2
    prompt_only = cj.generate(model, TOKS, 6, hooks=hooks, hooks_on="prompt")
    np.testing.assert_allclose(prompt_only.logits[:, 0], steered.logits[:, 0], atol=1e-5)  # the first token sees only the prompt
    assert float(jnp.max(jnp.abs(prompt_only.logits[:, 1:] - steered.logits[:, 1:]))) > 1e-3


@pytest.mark.slow_after_first
def test_sampling_is_seeded_and_its_filters_work(model):
    kw = dict(temperature=1.0, top_k=5, top_p=0.9)
    a, b = cj.generate(model, TOKS, 6, seed=1, **kw), cj.generate(model, TOKS, 6, seed=1, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    others = [cj.generate(model, TOKS, 6, seed=s, **kw).tokens for s in range(2, 6)]
    assert any(not np.array_equal(o, a.tokens) for o in others)
    greedy = cj.generate(model, TOKS, 6)
    np.testing.assert_array_equal(cj.generate(model, TOKS, 6, temperature=2.0, top_k=1, seed=7).tokens, greedy.tokens)
    np.testing.assert_array_equal(cj.generate(model, TOKS, 6, temperature=2.0, top_p=1e-6, seed=7).tokens, greedy.tokens)
    # every sampled token is among the top 5 of the logits it was drawn from
    top5 = jax.lax.top_k(a.logits, 5)[1]
    assert bool(jnp.all(jnp.any(top5 == a.tokens[..., None], -1)))


def test_generate_errors(model):
    with pytest.raises(ValueError, match="hooks_on must be 'all' or 'prompt'"):
        cj.generate(model, TOKS, 2, hooks_on="never")
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        cj.generate(model, TOKS, 0)
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        cj.generate(model, TOKS, 2, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        cj.generate(model, TOKS, 2, attention_mask=jnp.ones((2, 4), bool))
    with pytest.raises(KeyError):
        cj.generate(model, TOKS, 2, hooks=[("blocks.0.hook_resid_pots", cj.Zero())])


def test_generate_on_smollm2(smollm2):
    model, tok = smollm2
    ids = jnp.asarray([tok.encode("The capital of France is", prepend_bos=True)], jnp.int32)
    g = cj.generate(model, ids, 6)
    toks, logits = _recompute(model, ids, 6)
    np.testing.assert_array_equal(g.tokens, toks)
    np.testing.assert_allclose(g.logits, logits, atol=1e-3)
    assert tok.decode([int(g.tokens[0, 0])]) == " Paris"
