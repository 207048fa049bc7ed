"""penzai models: import a transformer built by penzai's llama-like builder.

penzai (`penzai.models.transformer`) builds Llama, Mistral and Gemma 1 from one
family (`llamalike_common.build_llamalike_transformer`): RMSNorm, rotary
embeddings, grouped-query attention, gated MLPs, no biases. Its `ApplyRoPE`
splits each head into halves (Hugging Face's rotate-half convention, the one
`_model._rope` uses) with the same frequencies, so Q/K weights are copied as
they are, with no permutation. Queries are scaled by `1/sqrt(projection_dim)`,
as ours are.

The conversion walks the model's structure with `pz.select` rather than trusting
parameter labels (users rename them), and refuses, naming the penzai config
field, anything `Config` cannot express exactly: attention or final-logit
soft-capping, sliding-window attention, Gemma 2's post-attention /
post-feedforward norms, a non-default query scale, GPT-NeoX's parallel
attention + MLP blocks and partial rotary embeddings. Layers a user inserted
(probes, interventions) are refused too: convert the plain model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..core import Blocks, Config, Transformer
from ._finite import check_finite


def _pz():
    try:
        from penzai import pz
        from penzai.models.transformer import model_parts
    except ImportError as e:
        raise ImportError("from_penzai needs penzai (pip install penzai)") from e
    return pz, model_parts


class _Problems(list):
    """Unsupported features found while walking the model, reported together."""

    def check(self):
        if self:
            lines = "\n".join(f"  - {p}" for p in dict.fromkeys(self))
            raise NotImplementedError(f"this penzai model cannot be expressed exactly by circuits_jax.Config:\n{lines}")


# Layer types the llama-like family is built from. Anything else (a user's probe,
# an intervention, another family's layer) is refused by name.
_LLAMALIKE_LAYERS = {
    "TransformerLM", "Sequential", "TransformerBlock", "TransformerFeedForward", "NamedGroup", "Residual",
    "LayerStack", "EmbeddingLookup", "EmbeddingDecode", "CastToDType", "ConstantRescale", "RMSLayerNorm",
    "RMSStandardize", "Linear", "Attention", "ApplyRoPE", "NamedEinsum", "ApplyCausalAttentionMask", "Softmax",
    "BranchAndMultiplyTogether", "Elementwise",
}  # fmt: skip
# Layers with a specific message below.
_EXPLAINED = {
    "TanhSoftCap", "ApplyCausalSlidingWindowAttentionMask", "ApplyRoPEToSubset", "BranchAndAddTogether",
    "KVCachingAttention", "LayerNorm", "Standardize", "Affine", "AddBias", "Identity",
}  # fmt: skip


def _scalar(x) -> float:
    """A Python float from a float, a jax scalar, or a (LayerStack-stacked) named scalar."""
    pz, _ = _pz()
    if isinstance(x, pz.nx.NamedArrayBase):
        x = x.unwrap(*x.named_shape)
    a = np.asarray(x, np.float64).reshape(-1)
    if a.size == 0 or not np.all(a == a[0]):
        raise NotImplementedError(f"a constant that differs between stacked layers ({a}) is not supported")
    return float(a[0])


def _value(param, axes: tuple[str, ...], stack_axis: str | None) -> np.ndarray:
    """A parameter's named array as float32 numpy, axes in the order given (the stack axis first)."""
    pz, _ = _pz()
    if isinstance(param, pz.ParameterSlot):
        raise ValueError(f"penzai parameter {param.label!r} is an unbound slot; bind it first (pz.bind_variables)")
    value = param.value
    order = ((stack_axis,) if stack_axis is not None else ()) + tuple(axes)
    if value.positional_shape or set(value.named_shape) != set(order):
        label = getattr(param, "label", type(param).__name__)
        raise ValueError(f"penzai parameter {label!r} has axes {dict(value.named_shape)}; expected the axes {order}")
    return np.asarray(value.unwrap(*order), np.float32)


def _types(layer) -> tuple[str, ...]:
    """Type names of a Sequential's (or NamedGroup's) sublayers, or of the layer itself when it is neither."""
    pz, _ = _pz()
    if isinstance(layer, pz.nn.Sequential | pz.nn.NamedGroup):
        return tuple(type(s).__name__ for s in layer.sublayers)
    return (type(layer).__name__,)


def _all_layers(tree):
    """Every `pz.nn.Layer` in `tree`, nested ones included."""
    pz, _ = _pz()
    for layer in pz.select(tree).at_instances_of(pz.nn.Layer).get_sequence():
        yield layer
        for child in pz.select(layer).at_children().get_sequence():
            yield from _all_layers(child)


def _activation(fn) -> str | None:
    """Our `Config.act` for penzai's elementwise MLP activation, None when there is none."""
    if fn is jax.nn.silu:
        return "silu"
    if fn is jax.nn.relu:
        return "relu"
    if fn is jax.nn.gelu:  # jax's default is the tanh approximation
        return "gelu_new"
    if isinstance(fn, functools.partial) and fn.func is jax.nn.gelu and not fn.args:
        return "gelu_new" if fn.keywords.get("approximate", True) else "gelu"
    return None


def _model_wide_problems(body, E: int) -> _Problems:
    """Unsupported features visible anywhere in the model, by layer type."""
    pz, _ = _pz()
    problems = _Problems()
    sel = pz.select(body)
    names = {type(l).__name__ for l in _all_layers(body)}
    foreign = sorted(names - _LLAMALIKE_LAYERS - _EXPLAINED)
    if foreign:
        problems.append(f"penzai layer types {foreign} (strip probes / interventions and convert the plain model)")
    attn_caps = sel.at_instances_of(pz.nn.Attention).at_instances_of(pz.nn.TanhSoftCap).get_sequence()
    for cap in attn_caps:
        problems.append(f"attn_logits_soft_cap={_scalar(cap.soft_cap):g} (attention logit soft-capping)")
    if sel.at_instances_of(pz.nn.TanhSoftCap).count() > len(attn_caps):
        caps = sel.at_instances_of(pz.nn.TanhSoftCap).get_sequence()[-1]
        problems.append(f"final_logit_softcap={_scalar(caps.soft_cap):g} (final logit soft-capping)")
    for win in sel.at_instances_of(pz.nn.ApplyCausalSlidingWindowAttentionMask).get_sequence():
        problems.append(
            f"attention_type=AttentionTypeSlidingWindowCausal(window_size={win.sliding_window_size})"
            " (sliding-window attention)"
        )
    if sel.at_instances_of(pz.nn.BranchAndAddTogether).count():
        problems.append(
            "parallel attention + MLP blocks (GPT-NeoX: y = x + attn(ln1(x)) + mlp(ln2(x)));"
            " Config runs them in sequence"
        )
    for sub in sel.at_instances_of(pz.nn.ApplyRoPEToSubset).get_sequence():
        if sub.rope_subset_size != E:
            problems.append(
                f"partial rotary embeddings (rope_subset_size={sub.rope_subset_size} of projection_dim={E})"
            )
    for res in sel.at_instances_of(pz.nn.Residual).get_sequence():
        if pz.select(res).at_instances_of(pz.nn.RMSLayerNorm).count() > 1:
            attn = pz.select(res).at_instances_of(pz.nn.Attention).count()
            field, what = ("use_post_attn_norm", "attention") if attn else ("use_post_ffw_norm", "feedforward")
            problems.append(f"{field}=True (an extra norm after the {what} branch, as in Gemma 2)")
    for attn in sel.at_instances_of(pz.nn.Attention).get_sequence():
        for rescale in pz.select(attn.input_to_query).at_instances_of(pz.nn.ConstantRescale).get_sequence():
            scale = _scalar(rescale.by)
            if not np.isclose(scale, E**-0.5, rtol=1e-6, atol=0):
                default = f"only the default 1/sqrt(projection_dim) = {E**-0.5:g}"
                problems.append(f"query_scaling_factor={scale:g} ({default})")
    if sel.at_instances_of(pz.nn.KVCachingAttention).count():
        problems.append("KVCachingAttention (a sampling-mode model; convert the plain TransformerLM)")
    if names & {"LayerNorm", "Standardize", "Affine", "AddBias"}:
        problems.append("LayerNorm / biases (only penzai's bias-free RMSNorm llama-like family is imported)")
    eps = {_scalar(s.epsilon) for s in sel.at_instances_of(pz.nn.RMSStandardize | pz.nn.Standardize).get_sequence()}
    if len(eps) > 1:
        problems.append(f"different norm epsilons {sorted(eps)} (Config has a single norm_eps)")
    return problems


def _block_parts(block, problems: _Problems):
    """Check one pre-norm llama-like block; return (attention, ln1 scale, ln2 scale, MLP linears, act, theta)."""
    pz, model_parts = _pz()
    subs = block.sublayers if isinstance(block, pz.nn.Sequential) else []
    if len(subs) != 2 or not all(isinstance(s, pz.nn.Residual) for s in subs):
        problems.append(f"transformer block of {_types(block)}; expected two pre-norm Residual branches")
        return None
    branches = []
    for res, core in [(subs[0], pz.nn.Attention), (subs[1], model_parts.TransformerFeedForward)]:
        items = list(res.delta.sublayers) if isinstance(res.delta, pz.nn.Sequential) else [res.delta]
        if len(items) != 2 or type(items[0]) is not pz.nn.RMSLayerNorm or not isinstance(items[1], core):
            problems.append(f"residual branch of {_types(res.delta)}; expected (RMSLayerNorm, {core.__name__})")
            return None
        if _types(items[0]) != ("RMSStandardize", "Linear"):
            problems.append(f"RMSLayerNorm of {_types(items[0])}; expected (RMSStandardize, Linear)")
            return None
        branches.append(items)
    (norm1, attn), (norm2, ffw) = branches

    # Attention: q = rope(W_Q x) * scale, k = rope(W_K x), v = W_V x, causal softmax, W_O.
    for name, expected in [
        ("input_to_query", ("Linear", "ApplyRoPE", "ConstantRescale")),
        ("input_to_key", ("Linear", "ApplyRoPE")),
        ("input_to_value", ("Linear",)),
        ("attn_value_to_output", ("NamedEinsum", "Linear")),
    ]:
        got = _types(getattr(attn, name))
        if got != expected or not isinstance(getattr(attn, name), pz.nn.Sequential):
            problems.append(f"attention {name} is {got}; expected {expected}")
            return None
    qk = _types(attn.query_key_to_attn)  # soft caps and sliding windows were refused model-wide
    if qk != ("NamedEinsum", "ApplyCausalAttentionMask", "Softmax"):
        expected = "(NamedEinsum, ApplyCausalAttentionMask, Softmax)"
        problems.append(f"attention query_key_to_attn is {qk}; expected {expected}")
    thetas = {attn.input_to_query.sublayers[1].max_wavelength, attn.input_to_key.sublayers[1].max_wavelength}
    if len(thetas) > 1:
        problems.append(f"different RoPE wavelengths for queries and keys {sorted(thetas)}")

    # Gated MLP: out(act(gate(x)) * value(x)).
    if _types(ffw) != ("BranchAndMultiplyTogether", "Linear") or len(ffw.sublayers[0].branches) != 2:
        problems.append(f"feedforward block of {_types(ffw)}; expected a gated MLP (BranchAndMultiplyTogether, Linear)")
        return None
    gate = value = act = None
    for branch in ffw.sublayers[0].branches:
        if isinstance(branch, pz.nn.Linear):
            value = branch
        elif _types(branch) == ("Linear", "Elementwise"):
            gate, act = branch.sublayers[0], _activation(branch.sublayers[1].fn)
            if act is None:
                supported = "silu, tanh-approximate gelu, exact gelu, relu"
                problems.append(f"MLP activation {branch.sublayers[1].fn!r} (supported: {supported})")
    if gate is None or value is None:
        problems.append("feedforward without one (Linear, Elementwise) gate branch and one Linear value branch")
        return None
    mlp = (gate, value, ffw.sublayers[1])
    return attn, norm1.sublayers[1].weights, norm2.sublayers[1].weights, mlp, act, thetas.pop()


def from_penzai(pz_model, *, n_ctx: int = 2048) -> Transformer:
    """Convert a penzai llama-like `TransformerLM` (Llama, Mistral without sliding windows, Gemma 1).

    Weights are copied into our TransformerLens layout as float32 (bfloat16
    parameters are upcast; penzai's `activation_dtype` is not kept). Blocks
    built one by one or as a `LayerStack` both work; parameters may be bound
    `pz.Parameter`s or frozen `pz.ParameterValue`s. Gemma's tied embeddings,
    scaled by sqrt(d_model) on the way in, become a pre-scaled `W_E` and an
    unscaled `W_U`, so the result has `tied_embeddings=False`. penzai records
    no context length; `n_ctx` only fills in `Config.n_ctx` (rotary models
    have no learned positions to bound it).

    Raises NotImplementedError naming each feature `Config` cannot express
    (soft-capping, sliding windows, post norms, a non-default query scale,
    GPT-NeoX's parallel blocks or partial rotary, foreign layers), TypeError
    for anything but a penzai `TransformerLM`, and `NonFiniteWeights` (a ValueError) naming the first
    weight that holds a NaN or an Inf.
    """
    pz, model_parts = _pz()
    if not isinstance(pz_model, model_parts.TransformerLM):
        raise TypeError(f"from_penzai expects a penzai TransformerLM, got {type(pz_model).__name__}")
    md = pz_model.metadata
    common, qonly = tuple(md.common_head_axes), tuple(md.query_only_head_axes)
    K = int(np.prod([md.common_head_axes[a] for a in common], dtype=np.int64))
    G = int(np.prod([md.query_only_head_axes[a] for a in qonly], dtype=np.int64))
    D, E, M, V = md.embedding_dim, md.projection_dim, md.mlp_hidden_dim, md.vocab_size
    body = pz_model.body

    problems = _model_wide_problems(body, E)
    if len(common) > 1 or len(qonly) > 1:
        problems.append(f"head axes {common + qonly}; expected at most one kv-head and one query-head axis")
    problems.check()

    # Top level: lookup, [cast], [scale], blocks | LayerStack, final norm, unembed.
    layers = list(body.sublayers) if isinstance(body, pz.nn.Sequential) else []
    if not layers or not isinstance(layers[0], pz.nn.EmbeddingLookup):
        raise NotImplementedError(f"expected a Sequential body starting with EmbeddingLookup, got {_types(body)}")
    table = layers.pop(0).table
    embed_scale = np.float32(1.0)
    while layers and isinstance(layers[0], pz.nn.CastToDType | pz.nn.ConstantRescale):
        layer = layers.pop(0)
        if isinstance(layer, pz.nn.ConstantRescale):  # Gemma's sqrt(d_model) embedding scale
            embed_scale = embed_scale * np.float32(_scalar(layer.by))
    final_ok = len(layers) >= 3 and type(layers[-2]) is pz.nn.RMSLayerNorm
    if not final_ok or _types(layers[-2]) != ("RMSStandardize", "Linear"):
        raise NotImplementedError(f"expected (..., TransformerBlocks, RMSLayerNorm, unembedding), got {_types(body)}")
    *block_layers, final_norm, unembed = layers
    if len(block_layers) == 1 and isinstance(block_layers[0], pz.nn.LayerStack):
        stack = block_layers[0]
        blocks, stack_axis, L = [stack.stacked_sublayers], stack.stack_axis, stack.stack_axis_size
    else:
        blocks, stack_axis, L = block_layers, None, len(block_layers)
        bad = sorted({type(b).__name__ for b in blocks if not isinstance(b, model_parts.TransformerBlock)})
        if bad:
            problems.append(f"top-level layers {bad} between the embedding and the final norm; expected blocks")
    if not isinstance(unembed, pz.nn.Linear | pz.nn.EmbeddingDecode):
        problems.append(f"unembedding is {type(unembed).__name__}; expected Linear or EmbeddingDecode")
    if L == 0:
        problems.append("no transformer blocks")
    problems.check()

    per_block = [_block_parts(b, problems) for b in blocks]
    problems.check()
    acts = {p[4] for p in per_block}
    thetas = {p[5] for p in per_block}
    if len(acts) > 1:
        problems.append(f"different MLP activations across layers {sorted(acts)}")
    if len(thetas) > 1:
        problems.append(f"different RoPE wavelengths across layers {sorted(thetas)}")
    problems.check()

    def stacked(get, axes, shape):
        """One weight for every layer, [L, *shape], from the LayerStack's axis or the block list."""
        if stack_axis is not None:
            return jnp.asarray(_value(get(per_block[0]), axes, stack_axis).reshape(L, *shape))
        return jnp.asarray(np.stack([_value(get(p), axes, None).reshape(shape) for p in per_block]))

    # Query heads flatten as (kv head, query head within its group): kv head k serves
    # query heads k*G .. k*G+G-1, the order Config's grouped-query attention assumes.
    q_heads = common + qonly
    H = K * G

    def attn_w(path):
        return lambda p: getattr(p[0], path[0]).sublayers[path[1]].weights

    blocks_out = Blocks(
        W_Q=stacked(attn_w(("input_to_query", 0)), (*q_heads, "embedding", "projection"), (H, D, E)),
        W_K=stacked(attn_w(("input_to_key", 0)), (*common, "embedding", "projection"), (K, D, E)),
        W_V=stacked(attn_w(("input_to_value", 0)), (*common, "embedding", "projection"), (K, D, E)),
        W_O=stacked(attn_w(("attn_value_to_output", 1)), (*q_heads, "projection", "embedding"), (H, E, D)),
        ln1_w=stacked(lambda p: p[1], ("embedding",), (D,)),
        ln2_w=stacked(lambda p: p[2], ("embedding",), (D,)),
        W_gate=stacked(lambda p: p[3][0].weights, ("embedding", "neurons"), (D, M)),
        W_in=stacked(lambda p: p[3][1].weights, ("embedding", "neurons"), (D, M)),
        W_out=stacked(lambda p: p[3][2].weights, ("neurons", "embedding"), (M, D)),
    )  # fmt: skip
    W_E = _value(table.embeddings, (table.vocabulary_axis, "embedding"), None)
    if isinstance(unembed, pz.nn.EmbeddingDecode):
        W_U = _value(unembed.table.embeddings, (unembed.table.vocabulary_axis, "embedding"), None).T
    else:
        W_U = _value(unembed.weights, ("embedding", "vocabulary"), None)
    cfg = Config(
        d_model=D, n_layers=L, n_heads=H, n_kv_heads=K, d_head=E, d_vocab=V, n_ctx=n_ctx, d_mlp=M,
        normalization="rmsnorm", norm_eps=_scalar(final_norm.sublayers[0].epsilon), act=acts.pop(), gated_mlp=True,
        positional="rotary", rope_theta=float(thetas.pop()), tied_embeddings=False, family="llama",
    )  # fmt: skip
    model = Transformer(
        cfg=cfg,
        W_E=jnp.asarray(W_E * embed_scale),
        blocks=blocks_out,
        W_U=jnp.asarray(np.ascontiguousarray(W_U)),
        lnf_w=jnp.asarray(_value(final_norm.sublayers[1].weights, ("embedding",), None)),
    )
    check_finite(model, "penzai model")  # named as our fields (blocks.W_in, layer ...)
    return model
