"""The transformer: one pure-pytree definition for every supported family.

Axis letters used throughout (see `_sites.py` for every site's shape):
B batch, T query positions, S key positions, L layers, D d_model,
H query heads, K kv heads, G = H // K query heads per kv head, E d_head,
M d_mlp, V vocabulary.

Parameters follow TransformerLens's layout (`W_Q [H, D, E]`, `W_O [H, E, D]`,
`W_in [D, M]`, `W_U [D, V]`) so weights read the same in both libraries.
Per-layer parameters are *stacked* along a leading L axis and the layers run
as one `lax.scan`: compile time does not grow with depth, and the start and
stop layers are run-time values, so one compiled forward serves them all.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jaxtyping import Float, Int

from ._config import Config
from ._forward import run


class Blocks(eqx.Module):
    """Parameters of all layers, stacked along a leading L axis. Absent parts are None."""

    W_Q: Float[Array, "L H D E"]
    W_K: Float[Array, "L K D E"]
    W_V: Float[Array, "L K D E"]
    W_O: Float[Array, "L H E D"]
    b_Q: Float[Array, "L H E"] | None = None
    b_K: Float[Array, "L K E"] | None = None
    b_V: Float[Array, "L K E"] | None = None
    b_O: Float[Array, "L D"] | None = None
    ln1_w: Float[Array, "L D"] | None = None
    ln1_b: Float[Array, "L D"] | None = None
    ln2_w: Float[Array, "L D"] | None = None
    ln2_b: Float[Array, "L D"] | None = None
    W_in: Float[Array, "L D M"] | None = None  # (the "up" projection when gated)
    b_in: Float[Array, "L M"] | None = None
    W_gate: Float[Array, "L D M"] | None = None
    b_gate: Float[Array, "L M"] | None = None
    W_out: Float[Array, "L M D"] | None = None
    b_out: Float[Array, "L D"] | None = None
    # family options (see Config): None where the config does not ask for them
    q_norm_w: Float[Array, "L E"] | None = None  # qk_norm: RMSNorm weight over d_head (qk_norm_scope "all": [L, H*E])
    k_norm_w: Float[Array, "L E"] | None = None  # ([L, K*E] with qk_norm_scope "all")
    ln1_post_w: Float[Array, "L D"] | None = None  # post_attn_norm: the norm on the attention output
    ln2_post_w: Float[Array, "L D"] | None = None  # post_mlp_norm: the norm on the MLP output


class Transformer(eqx.Module):
    """A decoder (or bidirectional encoder) transformer as a pytree of arrays.

    Calling it on tokens `[B, T]` gives logits `[B, T, V]`; `run` gives caches
    and interventions. Patching a weight is `eqx.tree_at`; patching an
    activation is a `Hook`.
    """

    cfg: Config = eqx.field(static=True)
    W_E: Float[Array, "V D"]
    blocks: Blocks
    W_U: Float[Array, "D V"]
    W_pos: Float[Array, "n_ctx D"] | None = None
    lnf_w: Float[Array, " D"] | None = None
    lnf_b: Float[Array, " D"] | None = None
    b_U: Float[Array, " V"] | None = None

    def __check_init__(self):
        check_shapes(self)

    def __call__(self, tokens: Int[Array, "B T"], attention_mask: Array | None = None) -> Float[Array, "B T V"]:
        return run(self, tokens, attention_mask=attention_mask).logits


DTYPES = ("float32", "bfloat16", "float16")  # the weight dtypes a model may have


def model_dtype(dtype) -> np.dtype:
    """`dtype` ("bfloat16", `jnp.bfloat16`, `np.float16`, ...) as a numpy dtype, if it is one of `DTYPES`;
    otherwise a ValueError naming it and the valid ones."""
    try:
        d = np.dtype(getattr(jnp, dtype) if isinstance(dtype, str) and hasattr(jnp, dtype) else dtype)
    except TypeError:
        d = None
    if d is None or d.name not in DTYPES:
        raise ValueError(f"unsupported model dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return d


# Norm weights stay float32 in every model dtype: they are small, norms are computed in float32, and Gemma's
# `1 + w` weights would lose `w` in bfloat16 (8 bits of mantissa).
NORM_WEIGHTS = ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "q_norm_w", "k_norm_w", "ln1_post_w", "ln2_post_w", "lnf_w", "lnf_b")


def weight_dtype(field: str, dtype):
    """The dtype weight `field` (a `Blocks` or `Transformer` field name) has in a model of `dtype`: float32
    for norm weights, else `dtype` (None: as given)."""
    return np.dtype(np.float32) if field in NORM_WEIGHTS and dtype is not None else dtype


def cast(model: Transformer, dtype) -> Transformer:
    """`model` with its weights in `dtype` (one of `DTYPES`; norm weights stay float32, `weight_dtype`).
    Activations follow the weights; norms, the attention softmax and logits are float32 in any dtype."""
    d = model_dtype(dtype)

    def conv(obj):
        changes = {}
        for f in dataclasses.fields(obj):
            a = getattr(obj, f.name)
            want = weight_dtype(f.name, d)
            if isinstance(a, jax.Array | np.ndarray) and jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != want:
                changes[f.name] = a.astype(want)
            elif isinstance(a, jax.ShapeDtypeStruct) and a.dtype != want:  # an abstract model (`jax.eval_shape`)
                changes[f.name] = jax.ShapeDtypeStruct(a.shape, want, sharding=getattr(a, "sharding", None))
        return dataclasses.replace(obj, **changes)

    return dataclasses.replace(conv(model), blocks=conv(model.blocks))


def init_model(cfg: Config, *, key: Array, std: float = 0.02) -> Transformer:
    """Random weights for any config (normal(0, std) matrices, zero biases, unit norms)."""
    L, D, H, K, E, V = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_vocab
    keys = iter(jax.random.split(key, 16))

    def normal(*shape):
        return std * jax.random.normal(next(keys), shape, jnp.float32)

    zeros, ones = (lambda *s: jnp.zeros(s, jnp.float32)), (lambda *s: jnp.ones(s, jnp.float32))
    norm = cfg.normalization is not None
    parts: dict[str, Any] = dict(
        W_Q=normal(L, H, D, E), W_K=normal(L, K, D, E), W_V=normal(L, K, D, E), W_O=normal(L, H, E, D)
    )
    if cfg.attn_bias:
        parts.update(b_Q=zeros(L, H, E), b_K=zeros(L, K, E), b_V=zeros(L, K, E), b_O=zeros(L, D))
    if norm and cfg.pre_norm:
        parts.update(ln1_w=ones(L, D), ln1_b=zeros(L, D) if cfg.normalization == "layernorm" else None)
    if cfg.qk_norm:
        parts.update(q_norm_w=ones(L, cfg.q_norm_size), k_norm_w=ones(L, cfg.k_norm_size))
    if cfg.post_attn_norm:
        parts.update(ln1_post_w=ones(L, D))
    if cfg.post_mlp_norm:
        parts.update(ln2_post_w=ones(L, D))
    if not cfg.attn_only:
        M = cfg.d_mlp
        parts.update(W_in=normal(L, D, M), W_out=normal(L, M, D))
        if cfg.gated_mlp:
            parts.update(W_gate=normal(L, D, M))
        if cfg.mlp_bias:
            parts.update(b_in=zeros(L, M), b_out=zeros(L, D), b_gate=zeros(L, M) if cfg.gated_mlp else None)
        if norm and cfg.pre_norm:
            parts.update(ln2_w=ones(L, D), ln2_b=zeros(L, D) if cfg.normalization == "layernorm" else None)
    W_E = normal(V, D)
    return Transformer(
        cfg=cfg,
        W_E=W_E,
        blocks=Blocks(**parts),
        W_U=W_E.T if cfg.tied_embeddings else normal(D, V),
        W_pos=normal(cfg.n_ctx, D) if cfg.positional == "learned" else None,
        lnf_w=ones(D) if norm else None,
        lnf_b=zeros(D) if cfg.normalization == "layernorm" else None,
        b_U=zeros(V) if cfg.unembed_bias else None,
    )


# The config fields each weight's axes come from, by field name (`blocks.` for the per-layer ones);
# `n_kv_heads` stands for `cfg.kv_heads` (n_kv_heads or n_heads). The d_mlp ones exist only with an MLP.
WEIGHT_AXES: dict[str, tuple[str, ...]] = {
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
    "blocks.q_norm_w": ("n_layers", "q_norm_size"), "blocks.k_norm_w": ("n_layers", "k_norm_size"),
    "blocks.ln1_post_w": ("n_layers", "d_model"), "blocks.ln2_post_w": ("n_layers", "d_model"),
}  # fmt: skip


def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """The shape every weight of a model of `cfg` must have, by field name (`blocks.` for per-layer ones)."""
    size = lambda f: cfg.kv_heads if f == "n_kv_heads" else getattr(cfg, f)  # noqa: E731
    return {name: tuple(size(f) for f in axes) for name, axes in WEIGHT_AXES.items()
            if cfg.d_mlp is not None or "d_mlp" not in axes}  # fmt: skip


def check_shapes(model) -> None:
    """Raise a ValueError naming the weight, the config fields it depends on and both shapes when a weight
    does not fit `model.cfg` (leaves without a shape, e.g. placeholders, are not checked)."""
    want = expected_shapes(model.cfg)
    fields = [(f"blocks.{k}", v) for k, v in vars(model.blocks).items()] if model.blocks is not None else []
    fields += [(k, getattr(model, k)) for k in ("W_E", "W_U", "W_pos", "lnf_w", "lnf_b", "b_U")]
    for name, arr in fields:
        shape = getattr(arr, "shape", None)
        if shape is None or name not in want:
            continue
        if tuple(shape) != want[name]:
            how = ", ".join(WEIGHT_AXES[name])
            raise ValueError(f"weight {name} has shape {tuple(shape)}, but the config gives {want[name]} ({how}); "
                             "fix the config or the weight")  # fmt: skip
