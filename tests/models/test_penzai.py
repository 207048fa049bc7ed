"""`from_penzai` against penzai's own forward pass on tiny random llama-like models (float32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pz = pytest.importorskip("penzai.pz")
from penzai.models.transformer.variants import gpt_neox, llamalike_common  # noqa: E402

import circuits_jax as cj  # noqa: E402
from circuits_jax.models._penzai import from_penzai  # noqa: E402

BASE = dict(
    num_kv_heads=2, query_head_multiplier=2, embedding_dim=32, projection_dim=8, mlp_hidden_dim=48,
    num_decoder_blocks=2, vocab_size=61, mlp_variant="swiglu", tie_embedder_and_logits=False,
)  # fmt: skip


def _build(seed=0, **changes):
    """A random penzai llama-like model drawn from an explicit key.

    penzai's own initializers run eagerly and compile per parameter (seconds per
    model), so the parameter shapes come from `jax.eval_shape` of its builder and
    the values are drawn here; norm scales are random too, so ln1 / ln2 / final
    mix-ups show.
    """
    cfg = llamalike_common.LlamalikeTransformerConfig(**{**BASE, **changes})

    def init(key):
        model = llamalike_common.build_llamalike_transformer(cfg, init_base_rng=key)
        return [p.freeze() for p in pz.unbind_params(model)[1]]

    shapes = jax.eval_shape(init, jax.random.key(seed))
    sizes = [int(np.prod(tuple(s.value.named_shape.values()))) for s in shapes]
    k_normal, k_uniform = jax.random.split(jax.random.key(seed))
    # One draw for all parameters: a draw per shape would compile once per shape.
    normal = np.asarray(jax.random.normal(k_normal, (sum(sizes),)))
    uniform = np.asarray(jax.random.uniform(k_uniform, (sum(sizes),), minval=0.5, maxval=1.5))
    params, start = [], 0
    for shape, size in zip(shapes, sizes):
        named = shape.value.named_shape
        if shape.label.endswith("scale.weights"):
            value = uniform[start : start + size]
        elif shape.label.endswith("embedder.embeddings"):
            value = normal[start : start + size]
        else:
            value = normal[start : start + size] / np.float32(np.sqrt(cfg.embedding_dim))
        start += size
        value = jnp.asarray(value.reshape(tuple(named.values())))
        params.append(pz.Parameter(value=pz.nx.wrap(value).tag(*named), label=shape.label))
    model = llamalike_common.build_llamalike_transformer(cfg, init_base_rng=None)
    return pz.bind_variables(model, params)


@jax.jit
def _penzai_forward(frozen_model, tokens):
    """penzai's forward: named tokens [batch, seq] plus the `token_positions` side input."""
    named = pz.nx.wrap(tokens).tag("batch", "seq")
    positions = pz.nx.arange("seq", tokens.shape[1])
    return frozen_model(named, token_positions=positions).unwrap("batch", "seq", "vocabulary")


def _penzai_logits(model, tokens):
    with jax.numpy_dtype_promotion("standard"):  # penzai mixes int and float; conftest makes jax strict
        return np.asarray(_penzai_forward(pz.freeze_params(model), jnp.asarray(tokens)))


TOKENS = np.asarray(jax.random.randint(jax.random.key(7), (3, 11), 0, BASE["vocab_size"]))


@pytest.mark.slow_after_first
@pytest.mark.parametrize(
    "changes",
    [
        {},  # grouped-query attention, SwiGLU (Llama / Mistral)
        {"use_layer_stack": True, "num_kv_heads": 1, "query_head_multiplier": 4},  # LayerStack, multi-query
        {"num_kv_heads": 4, "query_head_multiplier": 1, "rope_wavelength": 500.0, "rms_norm_eps": 1e-5},  # full MHA
        {"tie_embedder_and_logits": True, "mlp_variant": "geglu_approx"},  # Gemma 1: sqrt(D)-scaled tied embeddings
    ],
    ids=["gqa", "layer_stack_mqa", "mha_theta_eps", "gemma1"],
)
def test_logits_match_penzai(changes):
    model = _build(**changes)
    ours = from_penzai(model)
    cfg, want = ours.cfg, {**BASE, **changes}
    assert (cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_mlp, cfg.n_layers) == (4, want["num_kv_heads"], 8, 48, 2)
    assert cfg.rope_theta == want.get("rope_wavelength", 10_000)
    assert cfg.norm_eps == pytest.approx(want.get("rms_norm_eps", 1e-6))
    np.testing.assert_allclose(cj.run(ours, TOKENS).logits, _penzai_logits(model, TOKENS), atol=1e-4, rtol=0)


def test_frozen_parameters_convert_the_same():
    model = _build()
    a, b = from_penzai(model), from_penzai(pz.freeze_params(model))
    assert cj.tree_allclose(a, b)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"attn_logits_soft_cap": 50.0}, "attn_logits_soft_cap=50"),
        ({"final_logit_softcap": 30.0}, "final_logit_softcap=30"),
        ({"attention_type": llamalike_common.AttentionTypeSlidingWindowCausal(4)}, "window_size=4"),
        ({"use_post_attn_norm": True, "use_post_ffw_norm": True}, "use_post_ffw_norm"),
        ({"query_scaling_factor": 0.125}, "query_scaling_factor"),
    ],
)
def test_unsupported_llamalike_config_is_named(changes, field):
    with pytest.raises(NotImplementedError, match=field):
        from_penzai(_build(**changes))


def test_gpt_neox_is_refused_with_reasons():
    cfg = gpt_neox.GPTNeoXTransformerConfig(
        num_attention_heads=4, embedding_dim=32, projection_dim=8, mlp_hidden_dim=48, num_decoder_blocks=2,
        vocab_size=61, activation_fn="gelu_exact", rope_subset_size=2, rope_wavelength=10_000.0,
        layernorm_epsilon=1e-5, parameter_dtype=jnp.float32, activation_dtype=jnp.float32,
    )  # fmt: skip
    model = gpt_neox.build_gpt_neox_transformer(cfg, init_base_rng=None)  # the structure alone is refused
    with pytest.raises(NotImplementedError, match="parallel attention") as err:
        from_penzai(model)
    assert "rope_subset_size=2" in str(err.value)


@pz.pytree_dataclass
class _Probe(pz.nn.Layer):
    """A user's inserted layer (an identity here): the importer cannot know what it does."""

    def __call__(self, x, **_side_inputs):
        return x


def test_foreign_layers_and_wrong_types_are_refused():
    model = _build()
    probed = pz.select(model).at_instances_of(pz.nn.Attention).insert_after(_Probe())
    with pytest.raises(NotImplementedError, match="_Probe"):
        from_penzai(probed)
    with pytest.raises(TypeError, match="TransformerLM"):
        from_penzai(model.body)
