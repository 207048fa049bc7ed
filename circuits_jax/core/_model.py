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

from typing import Any, Callable, Iterable, Mapping, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from ._config import Config
from ._interventions import ALL_LAYERS, Hook, Intervention, PerLayer
from ._sites import SPLIT_INPUTS, Site, global_kinds, layer_kinds, parse_site, site_shape


class Blocks(eqx.Module):
    """Parameters of all layers, stacked along a leading L axis. Absent parts are None."""

    W_Q: Array  # [L, H, D, E]
    W_K: Array  # [L, K, D, E]
    W_V: Array  # [L, K, D, E]
    W_O: Array  # [L, H, E, D]
    b_Q: Array | None = None  # [L, H, E]
    b_K: Array | None = None  # [L, K, E]
    b_V: Array | None = None  # [L, K, E]
    b_O: Array | None = None  # [L, D]
    ln1_w: Array | None = None  # [L, D]
    ln1_b: Array | None = None  # [L, D]
    ln2_w: Array | None = None
    ln2_b: Array | None = None
    W_in: Array | None = None  # [L, D, M] (the "up" projection when gated)
    b_in: Array | None = None  # [L, M]
    W_gate: Array | None = None  # [L, D, M]
    b_gate: Array | None = None
    W_out: Array | None = None  # [L, M, D]
    b_out: Array | None = None  # [L, D]


class Transformer(eqx.Module):
    """A decoder (or bidirectional encoder) transformer as a pytree of arrays.

    Calling it on tokens `[B, T]` gives logits `[B, T, V]`; `run` gives caches
    and interventions. Patching a weight is `eqx.tree_at`; patching an
    activation is a `Hook`.
    """

    cfg: Config = eqx.field(static=True)
    W_E: Array  # [V, D]
    blocks: Blocks
    W_U: Array  # [D, V]
    W_pos: Array | None = None  # [n_ctx, D]
    lnf_w: Array | None = None
    lnf_b: Array | None = None
    b_U: Array | None = None  # [V]

    def __call__(self, tokens: Array, attention_mask: Array | None = None) -> Array:
        return run(self, tokens, attention_mask=attention_mask).logits


class RunOutput(NamedTuple):
    """What `run` returns: logits (or None), the final residual stream, and the requested cache by site name."""

    logits: Array | None  # [B, T, V]; None when stopped early at a static layer
    resid: Array  # residual stream after the last layer run, [B, T, D]
    cache: dict[str, Array]  # requested sites, by full name

    def __repr__(self) -> str:  # shapes and site names, not array contents
        from ._repr import summary

        return summary(self, items=8)


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
    if norm:
        parts.update(ln1_w=ones(L, D), ln1_b=zeros(L, D) if cfg.normalization == "layernorm" else None)
    if not cfg.attn_only:
        M = cfg.d_mlp
        parts.update(W_in=normal(L, D, M), W_out=normal(L, M, D))
        if cfg.gated_mlp:
            parts.update(W_gate=normal(L, D, M))
        if cfg.mlp_bias:
            parts.update(b_in=zeros(L, M), b_out=zeros(L, D), b_gate=zeros(L, M) if cfg.gated_mlp else None)
        if norm:
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


# ---------------------------------------------------------------------------
# Hooks and caches
# ---------------------------------------------------------------------------

HookSpec = Hook | tuple[Any, Callable] | Mapping[Any, Callable]


def normalize_hooks(hooks: HookSpec | Iterable[HookSpec] | None, cfg: Config) -> tuple[Hook, ...]:
    """Accept `{name: fn}`, `[(name, fn), ...]` or `Hook`s; return validated `Hook`s."""
    if hooks is None:
        return ()
    if isinstance(hooks, Mapping):
        hooks = list(hooks.items())
    elif isinstance(hooks, Hook):
        hooks = [hooks]
    out = []
    for h in hooks:
        if isinstance(h, Hook):
            if isinstance(h.layer, str) and h.layer != ALL_LAYERS:
                raise ValueError(f"hook layer {h.layer!r}: give an int, a traced int, None or ALL_LAYERS")
            valid = layer_kinds(cfg) if h.layer is not None else global_kinds(cfg)
            if h.kind not in valid:
                parse_site(h.name if h.layer is not None else h.kind, cfg)  # raises with suggestions
            out.append(h)
            continue
        name, fn = h
        site = parse_site(name, cfg)
        out.append(Hook(site.kind, site.layer, fn))
    return tuple(out)


def _apply(hook: Hook, x: Array, name: str) -> Array:
    fn = hook.fn
    if isinstance(fn, Intervention):
        fn.check(x, name)
    y = fn(x)
    if y.shape != x.shape:
        raise ValueError(f"intervention at {name!r} returned shape {y.shape}; the activation has shape {x.shape}")
    return y.astype(x.dtype)


class _Tap:
    """Applies the hooks of one site kind and records requested activations (trace-time only)."""

    def __init__(self, hooks: tuple[Hook, ...], layer: Array | None, record: set[str]):
        self.hooks, self.layer, self.record, self.seen = hooks, layer, record, {}

    def wants(self, kinds) -> bool:
        """Whether any of `kinds` is hooked or recorded (decides, e.g., split q/k/v inputs)."""
        return any(h.kind in kinds for h in self.hooks) or any(k in self.record for k in kinds)

    def __call__(self, kind: str, x: Array) -> Array:
        for h in self.hooks:
            if h.kind != kind:
                continue
            if self.layer is None:  # a global site
                x = _apply(h, x, kind)
            elif isinstance(h.layer, str):  # ALL_LAYERS: every layer, a PerLayer intervention sliced here
                fn = h.fn.at(self.layer) if isinstance(h.fn, PerLayer) else h.fn
                x = _apply(Hook(kind, None, fn), x, f"blocks.*.{kind}")
            else:
                name = f"blocks.{h.layer}.{kind}" if isinstance(h.layer, int) else f"blocks.<l>.{kind}"
                x = lax.cond(
                    self.layer == h.layer, lambda a, h=h, n=name: _apply(h, a, n), lambda a: a, x
                )
        if kind in self.record:
            self.seen[kind] = x
        return x


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


def _norm(cfg: Config, x: Array, w, b, prefix: str, tap) -> Array:
    """LayerNorm / RMSNorm with TransformerLens's hook points (`hook_normalized` is before the weight)."""
    if cfg.normalization is None:
        return x
    if cfg.normalization == "layernorm":
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    scale = tap(f"{prefix}.hook_scale", jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps))
    x = tap(f"{prefix}.hook_normalized", x / scale) * w
    return x if b is None else x + b


def _activation(cfg: Config, x: Array) -> Array:
    match cfg.act:
        case "gelu_new":
            return jax.nn.gelu(x, approximate=True)
        case "gelu":
            return jax.nn.gelu(x, approximate=False)
        case "relu":
            return jax.nn.relu(x)
        case "silu":
            return jax.nn.silu(x)
    raise ValueError(cfg.act)


def _rope(cfg: Config, x: Array, positions: Array) -> Array:
    """Rotary embedding, Hugging Face's rotate-half convention. x [B, T, N, E], positions [B, T]."""
    E = cfg.d_head
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, E, 2, dtype=jnp.float32) / E))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, E/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x1, x2 = x[..., : E // 2], x[..., E // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def _add(x, b):
    return x if b is None else x + b


def _no_tap(kind, x):
    return x


def _block(
    cfg: Config, p: Blocks, x: Array, positions: Array, key_mask: Array | None, tap, result_hooked: bool, result_cached: bool
):
    """One transformer layer on the residual stream x [B, T, D]."""
    B, T, _ = x.shape
    H, K, G, E = cfg.n_heads, cfg.kv_heads, cfg.group_size, cfg.d_head
    x = tap("hook_resid_pre", x)
    if tap.wants(SPLIT_INPUTS):  # each head reads its own copy of the stream (edges into one head)
        def split(kind, n, W, b):
            xi = tap(kind, jnp.broadcast_to(x[:, :, None], (B, T, n, x.shape[-1])))
            hi = _norm(cfg, xi, p.ln1_w, p.ln1_b, "ln1", _no_tap)
            return _add(jnp.einsum("btnd,nde->btne", hi, W), b)

        q = tap("attn.hook_q", split("hook_q_input", H, p.W_Q, p.b_Q))
        k = tap("attn.hook_k", split("hook_k_input", K, p.W_K, p.b_K))
        v = tap("attn.hook_v", split("hook_v_input", K, p.W_V, p.b_V))
    else:
        h = _norm(cfg, x, p.ln1_w, p.ln1_b, "ln1", tap)
        q = tap("attn.hook_q", _add(jnp.einsum("btd,hde->bthe", h, p.W_Q), p.b_Q))
        k = tap("attn.hook_k", _add(jnp.einsum("bsd,kde->bske", h, p.W_K), p.b_K))
        v = tap("attn.hook_v", _add(jnp.einsum("bsd,kde->bske", h, p.W_V), p.b_V))
    if cfg.positional == "rotary":
        q = tap("attn.hook_rot_q", _rope(cfg, q, positions))
        k = tap("attn.hook_rot_k", _rope(cfg, k, positions))
    qg = q.reshape(B, T, K, G, E)
    S = k.shape[1]  # keys: T, or a KV cache's slots when generating (queries are then the last T of them)
    scores = jnp.einsum("btkge,bske->bkgts", qg, k).reshape(B, H, T, S) / np.sqrt(E).astype(np.float32)
    allowed = jnp.ones((T, S), bool)
    if cfg.causal:
        allowed = jnp.tril(allowed, S - T)
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    scores = tap("attn.hook_attn_scores", jnp.where(allowed, scores, jnp.finfo(scores.dtype).min))
    pattern = tap("attn.hook_pattern", jax.nn.softmax(scores, axis=-1))
    z = jnp.einsum("bkgts,bske->btkge", pattern.reshape(B, K, G, T, S), v).reshape(B, T, H, E)
    z = tap("attn.hook_z", z)
    if result_hooked:  # the per-head outputs feed the stream only when something rewrites them
        attn_out = tap("attn.hook_result", jnp.einsum("bthe,hed->bthd", z, p.W_O)).sum(axis=2)
    else:  # cached (or not) without changing the numerics of the main path
        if result_cached:
            tap("attn.hook_result", jnp.einsum("bthe,hed->bthd", z, p.W_O))
        attn_out = jnp.einsum("bthe,hed->btd", z, p.W_O)
    attn_out = tap("hook_attn_out", _add(attn_out, p.b_O))
    if cfg.attn_only:
        return tap("hook_resid_post", x + attn_out)
    x = tap("hook_resid_mid", x + attn_out)
    h = _norm(cfg, tap("hook_mlp_in", x), p.ln2_w, p.ln2_b, "ln2", tap)  # mlp_in feeds the MLP only
    if cfg.gated_mlp:
        pre = tap("mlp.hook_pre", _add(h @ p.W_gate, p.b_gate))
        linear = tap("mlp.hook_pre_linear", _add(h @ p.W_in, p.b_in))
        post = _activation(cfg, pre) * linear
    else:
        pre = tap("mlp.hook_pre", _add(h @ p.W_in, p.b_in))
        post = _activation(cfg, pre)
    post = tap("mlp.hook_post", post)
    mlp_out = tap("hook_mlp_out", _add(post @ p.W_out, p.b_out))
    return tap("hook_resid_post", x + mlp_out)


# ---------------------------------------------------------------------------
# The forward pass
# ---------------------------------------------------------------------------


def positions_from_mask(attention_mask: Array | None, batch: int, pos: int) -> Array:
    """Position ids: counted over real tokens only, so left padding does not shift them."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(pos), (batch, pos))
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


@eqx.filter_jit
def run(
    model: Transformer,
    tokens: Array,
    *,
    hooks=None,
    cache: Iterable[Any] = (),
    attention_mask: Array | None = None,
    start_layer: int | Array = 0,
    stop_layer: int | Array | None = None,
    resid: Array | None = None,
    return_logits: bool = True,
) -> RunOutput:
    """Pure forward pass with interventions and a cache of the requested sites only.

    tokens: int `[B, T]` (a `[T]` vector is treated as one row).
    hooks: `{site: intervention}`, `[(site, intervention), ...]` or `Hook`s.
    cache: site names (or shorthand tuples) to return, e.g. `["blocks.3.attn.hook_z"]`.
    attention_mask: bool `[B, T]`, False at padding; positions skip the padding.
    start_layer, stop_layer: run blocks `start_layer .. stop_layer - 1` only. Pass them as
        arrays (`jnp.int32(l)`) and one compiled program serves every value (Python ints are
        static: one program each). With `start_layer > 0`, pass `resid`, the residual stream
        entering `start_layer` (`blocks.{start}.hook_resid_pre`).
    Logits are computed unless `stop_layer` is a Python int below `n_layers` or
    `return_logits=False` (sweeps unembed only the positions they score, see `unembed`).

    Compiled with `equinox.filter_jit`: arrays (weights, tokens, patch values, traced
    layer indices) are traced, everything else (site names, Python-int layers,
    intervention functions) is static, so repeated calls of the same shapes reuse
    one program. Inside an outer `jit`/`vmap`/`grad` it simply inlines.
    """
    cfg = model.cfg
    tokens = jnp.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
        attention_mask = None if attention_mask is None else jnp.asarray(attention_mask)[None]
    B, T = tokens.shape
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask).astype(bool)
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}; tokens have shape {(B, T)}")
    hooks = normalize_hooks(hooks, cfg)
    wanted = [parse_site(n, cfg) for n in cache]
    touched = {h.kind for h in hooks} | {s.kind for s in wanted}
    if touched & set(SPLIT_INPUTS) and any(k.startswith("ln1.") for k in touched):
        raise ValueError(
            "the split q/k/v inputs (hook_q_input, ...) and the ln1 sites cannot be used in one run: with split "
            "inputs every head normalises its own copy of the stream, so there is no single ln1 activation"
        )
    positions = positions_from_mask(attention_mask, B, T)
    if cfg.positional == "learned" and T > cfg.n_ctx:
        raise ValueError(f"{T} positions exceed the model's context of {cfg.n_ctx}")

    if resid is None and isinstance(start_layer, int) and start_layer != 0:
        raise ValueError(f"start_layer={start_layer} needs resid, the residual stream entering that layer")

    global_record = {s.kind for s in wanted if s.layer is None}
    gtap = _Tap(tuple(h for h in hooks if h.layer is None), None, global_record)
    if resid is None:
        x = gtap("hook_embed", model.W_E[tokens])
        if cfg.positional == "learned":
            x = x + gtap("hook_pos_embed", model.W_pos[positions])
    else:
        x = jnp.asarray(resid)
        if x.shape != (B, T, cfg.d_model):
            raise ValueError(
                f"resid (the input to blocks.<start>.hook_resid_pre) has shape {x.shape}; expected {(B, T, cfg.d_model)}"
            )

    # Per-layer caches: for each requested kind a buffer with one slot per requested
    # layer plus a scratch slot, written with a dynamic index inside the scan.
    by_kind: dict[str, list[int]] = {}
    for s in wanted:
        if s.layer is not None and s.layer not in by_kind.setdefault(s.kind, []):
            by_kind[s.kind].append(s.layer)
    slots = {}
    buffers = {}
    for kind, layers in by_kind.items():
        table = np.full(cfg.n_layers, len(layers), np.int32)
        table[layers] = np.arange(len(layers))
        slots[kind] = jnp.asarray(table)
        buffers[kind] = jnp.zeros((len(layers) + 1, *site_shape(Site(kind, 0), cfg, B, T)), x.dtype)

    layer_hooks = tuple(h for h in hooks if h.layer is not None)
    result_hooked = any(h.kind == "attn.hook_result" for h in layer_hooks)
    result_cached = "attn.hook_result" in by_kind
    stop = cfg.n_layers if stop_layer is None else stop_layer
    every_layer = isinstance(start_layer, int) and start_layer == 0 and (
        stop_layer is None or (isinstance(stop_layer, int) and stop_layer == cfg.n_layers)
    )

    def body(carry, xs):
        x, bufs = carry
        params, i = xs

        def layer(x, bufs):
            tap = _Tap(layer_hooks, i, set(by_kind))
            y = _block(cfg, params, x, positions, attention_mask, tap, result_hooked, result_cached)
            bufs = {k: lax.dynamic_update_index_in_dim(b, tap.seen[k].astype(b.dtype), slots[k][i], 0) for k, b in bufs.items()}
            return y, bufs

        if every_layer:  # the common full forward: no run-time layer bounds to test
            return layer(x, bufs), None
        active = (i >= start_layer) & (i < stop)
        return lax.cond(active, layer, lambda x, b: (x, b), x, bufs), None

    (x, buffers), _ = lax.scan(body, (x, buffers), (model.blocks, jnp.arange(cfg.n_layers)))

    out_cache = {}
    for kind, layers in by_kind.items():
        for j, l in enumerate(layers):
            out_cache[f"blocks.{l}.{kind}"] = buffers[kind][j]

    logits = None
    if return_logits and not (isinstance(stop_layer, int) and stop_layer < cfg.n_layers):
        h = _norm(cfg, x, model.lnf_w, model.lnf_b, "ln_final", gtap)
        logits = _add(h @ model.W_U, model.b_U)
    out_cache.update({k: v for k, v in gtap.seen.items()})
    return RunOutput(logits, x, {s.name: out_cache[s.name] for s in wanted})


def unembed(model: Transformer, resid: Array) -> Array:
    """Final norm and unembedding of a residual stream `[..., D]` (no hooks): logits `[..., V]`."""
    h = _norm(model.cfg, resid, model.lnf_w, model.lnf_b, "ln_final", lambda kind, x: x)
    return _add(h @ model.W_U, model.b_U)


def run_with_cache(model: Transformer, tokens: Array, names: Iterable[Any], **kwargs) -> tuple[Array, dict[str, Array]]:
    """`(logits, cache)`, TransformerLens style, caching only `names`."""
    out = run(model, tokens, cache=names, **kwargs)
    return out.logits, out.cache
