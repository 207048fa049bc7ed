"""Config (circuits_jax/core/_config.py) and the weights it promises (core/_model.check_shapes).

`attn_scale`: None is 1/sqrt(d_head) as a division, bit for bit what the pass always computed; a value s
multiplies q.k by s, which is the same model as W_Q (and b_Q) scaled by s * sqrt(d_head); a value that
is not positive is refused. Every weight is checked against the config when a `Transformer` is built,
and a mismatch names the weight, the config fields it depends on and both shapes.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj

from conftest import tiny_configs

TOKENS = jnp.array([[1, 5, 7, 3, 9, 2], [1, 4, 6, 8, 10, 12]], jnp.int32)
CONFIGS = ["gpt2like", "llamalike"]  # learned positions and biases; RoPE, GQA, RMSNorm, SwiGLU


@pytest.fixture(scope="module", params=CONFIGS)
def model(request):
    return cj.init_model(tiny_configs()[request.param], key=jax.random.key(0), std=0.3)


def test_default_attn_scale_is_the_division_by_sqrt_d_head(model):
    """attn_scale=None: the scores are q.k / sqrt(d_head), bit for bit (recomputed from the cached q, k)."""
    cfg = model.cfg
    assert cfg.attn_scale is None
    q_kind = "attn.hook_rot_q" if cfg.positional == "rotary" else "attn.hook_q"
    k_kind = "attn.hook_rot_k" if cfg.positional == "rotary" else "attn.hook_k"
    names = [f"blocks.{l}.{k}" for l in range(cfg.n_layers) for k in (q_kind, k_kind, "attn.hook_attn_scores")]
    cache = cj.run(model, TOKENS, cache=names).cache
    B, T = TOKENS.shape
    H, K, G, E = cfg.n_heads, cfg.kv_heads, cfg.group_size, cfg.d_head

    @jax.jit
    def scores(q, k):  # what the pass computed before attn_scale existed
        return jnp.einsum("btkge,bske->bkgts", q.reshape(B, T, K, G, E), k).reshape(B, H, T, T) / np.sqrt(E).astype(np.float32)

    causal = np.tril(np.ones((T, T), bool))
    for l in range(cfg.n_layers):
        want = np.asarray(scores(cache[f"blocks.{l}.{q_kind}"], cache[f"blocks.{l}.{k_kind}"]))
        got = np.asarray(cache[f"blocks.{l}.attn.hook_attn_scores"])
        np.testing.assert_array_equal(got[..., causal], want[..., causal])
        assert (got[..., ~causal] == np.finfo(np.float32).min).all()


@pytest.mark.slow_after_first
@pytest.mark.parametrize("s", [0.1, 1.0, 3.0])
def test_attn_scale_equals_scaling_the_queries(model, s):
    """attn_scale=s gives the logits of attn_scale=None with W_Q and b_Q scaled by s * sqrt(d_head)."""
    cfg = model.cfg
    c = s * math.sqrt(cfg.d_head)
    scaled = cj.Transformer(cfg.replace(attn_scale=s), model.W_E, model.blocks, model.W_U, model.W_pos, model.lnf_w,
                            model.lnf_b, model.b_U)  # fmt: skip
    blocks = dataclasses.replace(model.blocks, W_Q=c * model.blocks.W_Q,
                                 b_Q=None if model.blocks.b_Q is None else c * model.blocks.b_Q)  # fmt: skip
    queries = dataclasses.replace(model, blocks=blocks)
    got, want = cj.run(scaled, TOKENS).logits, cj.run(queries, TOKENS).logits
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if not math.isclose(c, 1.0):
        assert float(jnp.max(jnp.abs(got - cj.run(model, TOKENS).logits))) > 1e-3


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), -math.inf])
def test_non_positive_attn_scale_is_refused(bad):
    with pytest.raises(ValueError, match=r"attn_scale=.*positive number, or None for 1/sqrt\(d_head\)"):
        dataclasses.replace(tiny_configs()["gpt2like"], attn_scale=bad)


# The config fields each weight's axes come from, written out here independently of core/_model.py.
FIELDS = {
    "W_E": ("d_vocab", "d_model"), "W_U": ("d_model", "d_vocab"), "W_pos": ("n_ctx", "d_model"),
    "lnf_w": ("d_model",), "lnf_b": ("d_model",), "b_U": ("d_vocab",),
    "blocks.W_Q": ("n_layers", "n_heads", "d_model", "d_head"), "blocks.W_K": ("n_layers", "n_kv_heads", "d_model", "d_head"),
    "blocks.W_V": ("n_layers", "n_kv_heads", "d_model", "d_head"), "blocks.W_O": ("n_layers", "n_heads", "d_head", "d_model"),
    "blocks.b_Q": ("n_layers", "n_heads", "d_head"), "blocks.b_K": ("n_layers", "n_kv_heads", "d_head"),
    "blocks.b_V": ("n_layers", "n_kv_heads", "d_head"), "blocks.b_O": ("n_layers", "d_model"),
    "blocks.ln1_w": ("n_layers", "d_model"), "blocks.ln1_b": ("n_layers", "d_model"),
    "blocks.ln2_w": ("n_layers", "d_model"), "blocks.ln2_b": ("n_layers", "d_model"),
    "blocks.W_in": ("n_layers", "d_model", "d_mlp"), "blocks.b_in": ("n_layers", "d_mlp"),
    "blocks.W_gate": ("n_layers", "d_model", "d_mlp"), "blocks.b_gate": ("n_layers", "d_mlp"),
    "blocks.W_out": ("n_layers", "d_mlp", "d_model"), "blocks.b_out": ("n_layers", "d_model"),
}  # fmt: skip


def _with(model, name, value):
    """`model` with weight `name` replaced, built through the constructors (so the check runs)."""
    if name.startswith("blocks."):
        return dataclasses.replace(model, blocks=dataclasses.replace(model.blocks, **{name[7:]: value}))
    return dataclasses.replace(model, **{name: value})


def _weights(model):
    out = {k: getattr(model, k) for k in ("W_E", "W_U", "W_pos", "lnf_w", "lnf_b", "b_U")}
    out.update({f"blocks.{f.name}": getattr(model.blocks, f.name) for f in dataclasses.fields(model.blocks)})
    return {k: v for k, v in out.items() if v is not None}


def test_every_weight_is_checked_against_the_config(model):
    cfg = model.cfg
    assert cj.core.expected_shapes(cfg).keys() >= _weights(model).keys()
    sizes = {f: getattr(cfg, f) for f in ("d_vocab", "d_model", "n_ctx", "n_layers", "n_heads", "d_head", "d_mlp")}
    sizes["n_kv_heads"] = cfg.kv_heads
    for name, w in _weights(model).items():
        want = tuple(sizes[f] for f in FIELDS[name])
        assert w.shape == want, name  # the table above agrees with init_model
        bad = jnp.zeros(w.shape[:-1] + (w.shape[-1] + 1,), w.dtype)
        with pytest.raises(ValueError) as err:
            _with(model, name, bad)
        msg = str(err.value)
        for part in (f"weight {name} ", str(bad.shape), str(want), ", ".join(FIELDS[name])):
            assert part in msg, f"{name}: {part!r} missing from {msg!r}"


def test_an_unembedding_of_the_wrong_width_is_refused():
    cfg = tiny_configs()["gpt2like"]
    model = cj.init_model(cfg, key=jax.random.key(1))
    wide = cfg.replace(d_vocab=cfg.d_vocab + 7)
    with pytest.raises(ValueError, match=r"weight W_E has shape \(23, 16\), but the config gives \(30, 16\) \(d_vocab, d_model\)"):
        cj.Transformer(wide, model.W_E, model.blocks, model.W_U, model.W_pos, model.lnf_w, model.lnf_b, model.b_U)
    W_U = jnp.zeros((cfg.d_model, cfg.d_vocab + 1))
    with pytest.raises(ValueError, match=r"weight W_U has shape \(16, 24\), but the config gives \(16, 23\) \(d_model, d_vocab\)"):
        dataclasses.replace(model, W_U=W_U)
    # abstract weights (eval_shape) are checked too, and pass when they fit
    assert jax.eval_shape(lambda: cj.init_model(cfg, key=jax.random.key(0))).W_U.shape == (16, 23)
