"""penzai models: import a transformer built by penzai's builders.

penzai (`penzai.models.transformer`) builds Llama, Mistral and Gemma 1 / 2 from
one family (`llamalike_common.build_llamalike_transformer`: RMSNorm, rotary
embeddings, grouped-query attention, gated MLPs; Gemma 2 adds attention and
final-logit soft-caps, alternating sliding-window layers, norms after attention
and MLP and its own query scale) and GPT-NeoX / Pythia from another
(`gpt_neox`: parallel attention + MLP, LayerNorm, biases, partial rotary). Both
map onto `Config`'s family options; no second forward. penzai's `ApplyRoPE`
splits each head into halves (Hugging Face's rotate-half convention, the one
`_forward.rope` uses) with the same frequencies, and `ApplyRoPEToSubset`
rotates a prefix of each head the same way (`Config.rotary_dim`), so Q/K
weights are copied as they are. penzai stores Gemma's norm scales as `1 + w`,
as we do.

The conversion walks the model's structure with `pz.select` rather than trusting
parameter labels (users rename them), and refuses, naming it, anything `Config`
cannot express exactly: settings that differ between layers where `Config` has
one (activation, RoPE wavelength, soft cap, query scale, window size, norm
epsilon), and layers a user inserted (probes, interventions): convert the plain
model.
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


# Layer types penzai's llama-like and GPT-NeoX builders use. Anything else (a user's
# probe, an intervention, another family's layer) is refused by name.
_KNOWN_LAYERS = {
    "TransformerLM", "Sequential", "TransformerBlock", "TransformerFeedForward", "NamedGroup", "Residual",
    "LayerStack", "EmbeddingLookup", "EmbeddingDecode", "CastToDType", "ConstantRescale", "RMSLayerNorm",
    "RMSStandardize", "Linear", "Attention", "ApplyRoPE", "NamedEinsum", "ApplyCausalAttentionMask", "Softmax",
    "BranchAndMultiplyTogether", "Elementwise", "TanhSoftCap", "ApplyCausalSlidingWindowAttentionMask",
    "ApplyRoPEToSubset", "BranchAndAddTogether", "LayerNorm", "Standardize", "Affine", "AddBias", "Identity",
}  # fmt: skip


def _scalar(x) -> float:
    """A Python float from a float, a jax scalar, or a (LayerStack-stacked) named scalar."""
    pz, _ = _pz()
    if isinstance(x, pz.nx.NamedArrayBase):
        x = x.unwrap(*x.named_shape)
    a = np.asarray(x)
    narrow = a.dtype.kind == "f" and a.dtype.itemsize < 8
    a = a.astype(np.float64).reshape(-1)
    if a.size == 0 or not np.all(a == a[0]):
        raise NotImplementedError(f"a constant that differs between stacked layers ({a}) is not supported")
    # a float32 constant as the shortest decimal that is the same float32 (1e-06, not 9.99999997e-07)
    return float(str(np.float32(a[0]))) if narrow else float(a[0])


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


def _dense(layer):
    """(weights, bias or None) of a `Linear` or an `Affine` (Linear + AddBias); None for anything else."""
    pz, _ = _pz()
    if type(layer) is pz.nn.Linear:
        return layer.weights, None
    if type(layer) is pz.nn.Affine and _types(layer) == ("Linear", "AddBias"):
        return layer.sublayers[0].weights, layer.sublayers[1].bias
    return None


def _norm(layer, where: str, problems: _Problems):
    """(kind, epsilon, scale, shift or None) of penzai's RMSLayerNorm or LayerNorm; None (and a problem) otherwise."""
    pz, _ = _pz()
    subs = _types(layer)
    if type(layer) is pz.nn.RMSLayerNorm and subs == ("RMSStandardize", "Linear"):
        return "rmsnorm", _scalar(layer.sublayers[0].epsilon), layer.sublayers[1].weights, None
    if type(layer) is pz.nn.LayerNorm and subs == ("Standardize", "Linear", "AddBias"):
        return "layernorm", _scalar(layer.sublayers[0].epsilon), layer.sublayers[1].weights, layer.sublayers[2].bias
    problems.append(f"{where} is {type(layer).__name__} of {subs}; expected penzai's RMSLayerNorm or LayerNorm")
    return None


def _attention(attn, E: int, problems: _Problems) -> dict | None:
    """Projections and settings of one `pz.nn.Attention`: q = rope(W_Q x + b) * scale, k = rope(W_K x + b),
    v = W_V x + b, scores -> [soft cap] -> causal [sliding-window] mask -> softmax, then W_O."""
    pz, _ = _pz()
    if type(attn) is not pz.nn.Attention:
        problems.append(f"{type(attn).__name__} (a sampling-mode or foreign attention; convert the plain TransformerLM)")
        return None
    rope = ("ApplyRoPE", "ApplyRoPEToSubset")
    parts = {}
    for name, shape in [("input_to_query", ("dense", rope, "ConstantRescale")), ("input_to_key", ("dense", rope)),
                        ("input_to_value", ("dense",)), ("attn_value_to_output", ("NamedEinsum", "dense"))]:  # fmt: skip
        seq = getattr(attn, name)
        subs = list(seq.sublayers) if type(seq) is pz.nn.Sequential else [seq]
        ok = len(subs) == len(shape) and all(
            _dense(sub) is not None if want == "dense" else type(sub).__name__ in (want if isinstance(want, tuple) else (want,))
            for sub, want in zip(subs, shape)
        )
        if not ok:
            expected = tuple("Linear|Affine" if w == "dense" else "|".join(w) if isinstance(w, tuple) else w for w in shape)
            problems.append(f"attention {name} is {_types(seq)}; expected {expected}")
            return None
        parts[name] = subs
    q, k = parts["input_to_query"][1], parts["input_to_key"][1]
    if (q.max_wavelength, getattr(q, "rope_subset_size", E)) != (k.max_wavelength, getattr(k, "rope_subset_size", E)):
        problems.append("different RoPE settings for queries and keys")
    qk = list(attn.query_key_to_attn.sublayers) if type(attn.query_key_to_attn) is pz.nn.Sequential else []
    names = tuple(type(x).__name__ for x in qk)
    cap = None
    if len(names) == 4 and names[1] == "TanhSoftCap":
        cap = _scalar(qk.pop(1).soft_cap)
        names = names[:1] + names[2:]
    masks = ("ApplyCausalAttentionMask", "ApplyCausalSlidingWindowAttentionMask")
    if len(names) != 3 or names[0] != "NamedEinsum" or names[1] not in masks or names[2] != "Softmax":
        problems.append(f"attention query_key_to_attn is {_types(attn.query_key_to_attn)}; expected "
                        "(NamedEinsum, [TanhSoftCap], ApplyCausal[SlidingWindow]AttentionMask, Softmax)")  # fmt: skip
        return None
    return dict(
        q=_dense(parts["input_to_query"][0]), k=_dense(parts["input_to_key"][0]),
        v=_dense(parts["input_to_value"][0]), o=_dense(parts["attn_value_to_output"][1]),
        theta=float(q.max_wavelength), rot=int(getattr(q, "rope_subset_size", E)),
        scale=_scalar(parts["input_to_query"][2].by), cap=cap,
        window=int(qk[1].sliding_window_size) if names[1] == masks[1] else None,
    )  # fmt: skip


def _feedforward(ffw, problems: _Problems) -> dict | None:
    """A gated MLP, out(act(gate(x)) * value(x)) (penzai's llama-like), or a plain one, out(act(in(x)))
    (GPT-NeoX); each projection a Linear or an Affine."""
    pz, model_parts = _pz()
    subs = list(ffw.sublayers) if isinstance(ffw, model_parts.TransformerFeedForward) else []
    names = _types(ffw)
    if len(subs) == 3 and names[1] == "Elementwise" and _dense(subs[0]) and _dense(subs[2]):
        gate, up, act_fn, out = None, _dense(subs[0]), subs[1].fn, _dense(subs[2])
    elif len(subs) == 2 and names[0] == "BranchAndMultiplyTogether" and _dense(subs[1]):
        gate = up = act_fn = None
        for branch in subs[0].branches:
            if _dense(branch):
                up = _dense(branch)
            elif _types(branch)[-1:] == ("Elementwise",) and len(branch.sublayers) == 2 and _dense(branch.sublayers[0]):
                gate, act_fn = _dense(branch.sublayers[0]), branch.sublayers[1].fn
        if gate is None or up is None or len(subs[0].branches) != 2:
            problems.append("a gated feedforward without one (Linear, Elementwise) gate and one Linear value branch")
            return None
        out = _dense(subs[1])
    else:
        problems.append(f"feedforward of {names}; expected (Linear, Elementwise, Linear) or a gated MLP "
                        "(BranchAndMultiplyTogether, Linear)")  # fmt: skip
        return None
    act = _activation(act_fn)
    if act is None:
        problems.append(f"MLP activation {act_fn!r} (supported: silu, tanh-approximate gelu, exact gelu, relu)")
        return None
    return dict(gate=gate, up=up, out=out, act=act)


def _branch(seq, core: str, where: str, problems: _Problems):
    """(pre-norm, core layer, post-norm or None) of a `Sequential(norm, core[, norm])` residual branch."""
    pz, _ = _pz()
    items = list(seq.sublayers) if type(seq) is pz.nn.Sequential else [seq]
    if len(items) not in (2, 3) or type(items[1]).__name__ != core:
        problems.append(f"{where} branch of {_types(seq)}; expected (norm, {core}[, norm])")
        return None
    pre = _norm(items[0], f"{where} norm", problems)
    post = _norm(items[2], f"{where} post-norm", problems) if len(items) == 3 else None
    return pre, items[1], post


def _block(block, E: int, problems: _Problems) -> dict | None:
    """One block, sequential (two pre-norm `Residual`s, llama-like) or parallel (GPT-NeoX's
    `BranchAndAddTogether(Identity, norm -> attention, norm -> MLP)`), as a flat dict of parts and settings."""
    pz, _ = _pz()
    subs = list(block.sublayers) if isinstance(block, pz.nn.Sequential) else []
    if len(subs) == 2 and all(type(s) is pz.nn.Residual for s in subs):
        parallel, (a_seq, m_seq) = False, (subs[0].delta, subs[1].delta)
    elif len(subs) == 1 and type(subs[0]) is pz.nn.BranchAndAddTogether and len(subs[0].branches) == 3 \
            and type(subs[0].branches[0]) is pz.nn.Identity:  # fmt: skip
        parallel, (a_seq, m_seq) = True, subs[0].branches[1:]
    else:
        problems.append(f"transformer block of {_types(block)}; expected two Residual branches, or GPT-NeoX's "
                        "BranchAndAddTogether(Identity, attention, MLP)")  # fmt: skip
        return None
    a, m = _branch(a_seq, "Attention", "attention", problems), _branch(m_seq, "TransformerFeedForward", "MLP", problems)
    if a is None or m is None or None in (a[0], m[0]):
        return None
    attn, ffw = _attention(a[1], E, problems), _feedforward(m[1], problems)
    if attn is None or ffw is None:
        return None
    return dict(parallel=parallel, ln1=a[0], ln2=m[0], post1=a[2], post2=m[2], **attn, **ffw)


def _signature(p: dict) -> dict:
    """What must be the same in every layer (Config holds it once)."""
    has = lambda x: x is not None  # noqa: E731
    return dict(
        parallel=p["parallel"], norm=p["ln1"][0], eps=sorted({n[1] for n in (p["ln1"], p["ln2"], p["post1"], p["post2"]) if n}),
        post_attn_norm=has(p["post1"]), post_mlp_norm=has(p["post2"]), act=p["act"], gated=has(p["gate"]),
        rope_wavelength=p["theta"], rope_subset_size=p["rot"], query_scale=p["scale"], attn_soft_cap=p["cap"],
        biases=tuple(has(p[n][1]) for n in ("q", "k", "v", "o", "gate", "up", "out") if p[n] is not None),
        norm_shift=has(p["ln1"][3]),
    )  # fmt: skip


def from_penzai(pz_model, *, n_ctx: int = 2048) -> Transformer:
    """Convert a penzai `TransformerLM`: Llama, Mistral, Gemma 1 and 2 (the llama-like builder) or GPT-NeoX /
    Pythia (`gpt_neox`).

    Weights are copied into our TransformerLens layout as float32 (bfloat16
    parameters are upcast; penzai's `activation_dtype` is not kept). Blocks
    built one by one or as a `LayerStack` both work; parameters may be bound
    `pz.Parameter`s or frozen `pz.ParameterValue`s. Gemma's tied embedding,
    scaled by sqrt(d_model) on the way in, becomes `embedding_multiplier`;
    Gemma 2's per-layer attention types become `layer_types`; GPT-NeoX's final
    norm, which penzai builds with its default epsilon whatever the blocks
    use, keeps it (`final_norm_eps`). `Config.family` names the Hugging Face
    layout the model matches ("llama", "mistral", "gemma", "gemma2",
    "gpt_neox"), so `save_hf` exports it. penzai records no context length;
    `n_ctx` only fills in `Config.n_ctx`.

    Raises NotImplementedError naming each structure or per-layer difference
    `Config` cannot express, TypeError for anything but a penzai
    `TransformerLM`, and `NonFiniteWeights` (a ValueError) naming the first
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

    problems = _Problems()
    foreign = sorted({type(layer).__name__ for layer in _all_layers(body)} - _KNOWN_LAYERS)
    if foreign:
        problems.append(f"penzai layer types {foreign} (strip probes / interventions and convert the plain model)")
    if len(common) > 1 or len(qonly) > 1:
        problems.append(f"head axes {common + qonly}; expected at most one kv-head and one query-head axis")
    problems.check()

    # Top level: lookup, [cast], [scale], blocks | LayerStack, final norm, unembed, [final soft cap].
    layers = list(body.sublayers) if type(body) is pz.nn.Sequential else []
    if not layers or not isinstance(layers[0], pz.nn.EmbeddingLookup):
        raise NotImplementedError(f"expected a Sequential body starting with EmbeddingLookup, got {_types(body)}")
    table = layers.pop(0).table
    embed_scale = 1.0
    while layers and isinstance(layers[0], pz.nn.CastToDType | pz.nn.ConstantRescale):
        layer = layers.pop(0)
        if isinstance(layer, pz.nn.ConstantRescale):  # Gemma's sqrt(d_model) embedding scale
            embed_scale *= _scalar(layer.by)
    final_cap = _scalar(layers.pop().soft_cap) if layers and type(layers[-1]) is pz.nn.TanhSoftCap else None
    if len(layers) < 3:
        raise NotImplementedError(f"expected (..., TransformerBlocks, final norm, unembedding), got {_types(body)}")
    *block_layers, final_norm, unembed = layers
    final = _norm(final_norm, "final norm", problems)
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

    per_block = [_block(b, E, problems) for b in blocks]
    problems.check()
    first = _signature(per_block[0])
    for i, p in enumerate(per_block[1:], 1):
        for key, value in _signature(p).items():
            if value != first[key]:
                problems.append(f"{key} differs between layers ({first[key]} in block 0, {value} in block {i})")
    windows = [p["window"] for p in per_block]
    if len({w for w in windows if w is not None}) > 1:
        problems.append(f"different sliding-window sizes {sorted({w for w in windows if w is not None})}"
                        " (Config has one sliding_window)")  # fmt: skip
    if len(first["eps"]) > 1:
        problems.append(f"different norm epsilons {first['eps']} within a block (Config has one norm_eps)")
    if final[0] != first["norm"] or (final[3] is not None) != first["norm_shift"]:
        problems.append(f"final norm {final[0]} differs from the blocks' {first['norm']}")
    problems.check()

    def stacked(get, axes, shape):
        """One weight for every layer, [L, *shape], from the LayerStack's axis or the block list; None where
        the model has none."""
        if get(per_block[0]) is None:
            return None
        if stack_axis is not None:
            return jnp.asarray(_value(get(per_block[0]), axes, stack_axis).reshape(L, *shape))
        return jnp.asarray(np.stack([_value(get(p), axes, None).reshape(shape) for p in per_block]))

    # Query heads flatten as (kv head, query head within its group): kv head k serves
    # query heads k*G .. k*G+G-1, the order Config's grouped-query attention assumes.
    q_heads, H = common + qonly, K * G
    w, b = (lambda name: lambda p: p[name][0]), (lambda name: lambda p: p[name][1])  # noqa: E731
    post = lambda name: lambda p: p[name] and p[name][2]  # noqa: E731
    blocks_out = Blocks(
        W_Q=stacked(w("q"), (*q_heads, "embedding", "projection"), (H, D, E)),
        W_K=stacked(w("k"), (*common, "embedding", "projection"), (K, D, E)),
        W_V=stacked(w("v"), (*common, "embedding", "projection"), (K, D, E)),
        W_O=stacked(w("o"), (*q_heads, "projection", "embedding"), (H, E, D)),
        b_Q=stacked(b("q"), (*q_heads, "projection"), (H, E)),
        b_K=stacked(b("k"), (*common, "projection"), (K, E)),
        b_V=stacked(b("v"), (*common, "projection"), (K, E)),
        b_O=stacked(b("o"), ("embedding",), (D,)),
        ln1_w=stacked(lambda p: p["ln1"][2], ("embedding",), (D,)),
        ln1_b=stacked(lambda p: p["ln1"][3], ("embedding",), (D,)),
        ln2_w=stacked(lambda p: p["ln2"][2], ("embedding",), (D,)),
        ln2_b=stacked(lambda p: p["ln2"][3], ("embedding",), (D,)),
        ln1_post_w=stacked(post("post1"), ("embedding",), (D,)),
        ln2_post_w=stacked(post("post2"), ("embedding",), (D,)),
        W_gate=stacked(lambda p: p["gate"] and p["gate"][0], ("embedding", "neurons"), (D, M)),
        b_gate=stacked(lambda p: p["gate"] and p["gate"][1], ("neurons",), (M,)),
        W_in=stacked(w("up"), ("embedding", "neurons"), (D, M)),
        b_in=stacked(b("up"), ("neurons",), (M,)),
        W_out=stacked(w("out"), ("neurons", "embedding"), (M, D)),
        b_out=stacked(b("out"), ("embedding",), (D,)),
    )  # fmt: skip
    W_E = _value(table.embeddings, (table.vocabulary_axis, "embedding"), None)
    tied = isinstance(unembed, pz.nn.EmbeddingDecode)
    if tied:
        W_U = _value(unembed.table.embeddings, (unembed.table.vocabulary_axis, "embedding"), None).T
    else:
        W_U = _value(unembed.weights, ("embedding", "vocabulary"), None)

    sliding = [w is not None for w in windows]
    window = next((w for w in windows if w is not None), None)
    gemma = embed_scale != 1.0
    if np.float32(embed_scale) == np.float32(D**0.5):
        embed_scale = D**0.5  # penzai holds it in float32; Config (and Hugging Face's Gemma) in float64
    if first["parallel"]:
        family = "gpt_neox"
    elif gemma:
        family = "gemma2" if first["post_attn_norm"] or first["attn_soft_cap"] or final_cap or window else "gemma"
    else:
        family = "mistral" if all(sliding) else "llama"
    eps = first["eps"][0]
    cfg = Config(
        d_model=D, n_layers=L, n_heads=H, n_kv_heads=K, d_head=E, d_vocab=V, n_ctx=n_ctx, d_mlp=M,
        normalization=first["norm"], norm_eps=eps, final_norm_eps=None if final[1] == eps else final[1],
        act=first["act"], gated_mlp=first["gated"], positional="rotary", rope_theta=first["rope_wavelength"],
        rotary_dim=None if first["rope_subset_size"] == E else first["rope_subset_size"],
        attn_scale=None if np.isclose(first["query_scale"], E**-0.5, rtol=1e-6, atol=0) else first["query_scale"],
        embedding_multiplier=embed_scale, attn_bias=blocks_out.b_Q is not None or blocks_out.b_O is not None,
        mlp_bias=blocks_out.b_in is not None or blocks_out.b_out is not None, tied_embeddings=tied, family=family,
        sliding_window=window, layer_types=None if all(sliding) or not any(sliding)
        else tuple("sliding_attention" if s else "full_attention" for s in sliding),
        post_attn_norm=first["post_attn_norm"], post_mlp_norm=first["post_mlp_norm"],
        attn_softcap=first["attn_soft_cap"], final_softcap=final_cap, parallel_residual=first["parallel"],
    )  # fmt: skip
    model = Transformer(
        cfg=cfg,
        W_E=jnp.asarray(W_E),
        blocks=blocks_out,
        W_U=jnp.asarray(np.ascontiguousarray(W_U)),
        lnf_w=jnp.asarray(_value(final[2], ("embedding",), None)),
        lnf_b=None if final[3] is None else jnp.asarray(_value(final[3], ("embedding",), None)),
    )
    check_finite(model, "penzai model")  # named as our fields (blocks.W_in, layer ...)
    return model
