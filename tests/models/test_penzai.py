"""`from_penzai` against penzai's own forward pass on tiny random llama-like (Llama, Mistral, Gemma 1 / 2) and
GPT-NeoX models (float32, CPU), and the imported models exported to transformers, which must compute penzai's
logits too."""

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


NEOX = dict(
    num_attention_heads=4, embedding_dim=32, projection_dim=8, mlp_hidden_dim=48, num_decoder_blocks=2,
    vocab_size=61, activation_fn="gelu_exact", rope_subset_size=4, rope_wavelength=10_000.0,
    layernorm_epsilon=1e-5, parameter_dtype=jnp.float32, activation_dtype=jnp.float32,
)  # fmt: skip
GEMMA2 = dict(
    tie_embedder_and_logits=True, mlp_variant="geglu_approx", use_post_attn_norm=True, use_post_ffw_norm=True,
    attn_logits_soft_cap=1.5, final_logit_softcap=2.0, query_scaling_factor=0.2,
    attention_type=(llamalike_common.AttentionTypeSlidingWindowCausal(4), llamalike_common.AttentionTypeGlobalCausal()),
)  # soft caps small enough to bend random scores, a window shorter than the prompts


def _build(seed=0, neox=False, **changes):
    """A random penzai llama-like (or, with `neox`, GPT-NeoX) model drawn from an explicit key.

    penzai's own initializers run eagerly and compile per parameter (seconds per
    model), so the parameter shapes come from `jax.eval_shape` of its builder and
    the values are drawn here; norm scales are random too, so ln1 / ln2 / final
    mix-ups show.
    """
    if neox:
        cfg, build = gpt_neox.GPTNeoXTransformerConfig(**{**NEOX, **changes}), gpt_neox.build_gpt_neox_transformer
    else:
        cfg = llamalike_common.LlamalikeTransformerConfig(**{**BASE, **changes})
        build = llamalike_common.build_llamalike_transformer

    def init(key):
        model = build(cfg, init_base_rng=key)
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
    return pz.bind_variables(build(cfg, init_base_rng=None), params)


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


def test_gemma2_and_sliding_windows_match_penzai():
    """Soft caps, post norms, a query scale and alternating local / global layers (Gemma 2), and a LayerStack of
    sliding-window layers (Mistral) become Config's family options."""
    gemma2 = _build(**GEMMA2)
    ours = from_penzai(gemma2)
    cfg = ours.cfg
    assert (cfg.family, cfg.attn_softcap, cfg.final_softcap, cfg.sliding_window) == ("gemma2", 1.5, 2.0, 4)
    assert cfg.layer_types == ("sliding_attention", "full_attention") and cfg.post_attn_norm and cfg.post_mlp_norm
    assert cfg.attn_scale == pytest.approx(0.2) and cfg.embedding_multiplier == 32**0.5 and cfg.tied_embeddings
    np.testing.assert_allclose(cj.run(ours, TOKENS).logits, _penzai_logits(gemma2, TOKENS), atol=1e-4, rtol=0)

    mistral = _build(use_layer_stack=True, attention_type=llamalike_common.AttentionTypeSlidingWindowCausal(3))
    ours = from_penzai(mistral)
    assert (ours.cfg.family, ours.cfg.sliding_window, ours.cfg.layer_types) == ("mistral", 3, None)
    np.testing.assert_allclose(cj.run(ours, TOKENS).logits, _penzai_logits(mistral, TOKENS), atol=1e-4, rtol=0)


def test_gpt_neox_matches_penzai():
    """Parallel attention + MLP, LayerNorm with shifts, biases everywhere, rotary on half of each head, and
    penzai's final norm, built with epsilon 1e-6 whatever the blocks use."""
    model = _build(neox=True)
    ours = from_penzai(model)
    cfg = ours.cfg
    assert (cfg.family, cfg.parallel_residual, cfg.normalization, cfg.rotary_dim, cfg.act) == (
        "gpt_neox", True, "layernorm", 4, "gelu")
    assert (cfg.norm_eps, cfg.final_norm_eps, cfg.attn_bias, cfg.mlp_bias) == (1e-5, 1e-6, True, True)
    np.testing.assert_allclose(cj.run(ours, TOKENS).logits, _penzai_logits(model, TOKENS), atol=1e-4, rtol=0)


@pytest.mark.slow_after_first
@pytest.mark.parametrize("kind", ["gemma2", "gpt_neox"])
def test_imported_models_export_to_transformers(kind, tmp_path):
    """A third implementation: transformers, given the exported weights, computes penzai's logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = _build(**GEMMA2) if kind == "gemma2" else _build(neox=True, layernorm_epsilon=1e-6)
    path = cj.export_hf(from_penzai(model), tmp_path / kind)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = hf(torch.tensor(TOKENS.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(logits, _penzai_logits(model, TOKENS), atol=1e-4, rtol=0)


def test_what_config_cannot_hold_is_named(tmp_path):
    windows = (llamalike_common.AttentionTypeSlidingWindowCausal(4), llamalike_common.AttentionTypeSlidingWindowCausal(6))
    with pytest.raises(NotImplementedError, match=r"different sliding-window sizes \[4, 6\]"):
        from_penzai(_build(attention_type=windows))
    neox = _build(neox=True)
    final_export = from_penzai(neox)
    with pytest.raises(NotImplementedError, match="final_norm_eps=1e-06"):
        cj.export_hf(final_export, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


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
