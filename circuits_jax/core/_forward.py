"""The forward pass, written once.

    tokens [B, T] ─embed─► x [B, T, D] ─► lax.scan over the stacked layers: block ─► final norm ─► unembed ─► [B, T, V]

Every consumer of a model runs this pass: `run` (hooks and a cache), circuit runs (edge ablation),
generation (a KV cache), the replacement model of attribution graphs, and whatever a user writes.
What differs between them is a *tap*, passed in as a value.

A tap (`Tap`) sees every activation as the pass computes it, may rewrite it, and threads a state
of its own through the pass; nothing is mutated while the pass is traced. The pass calls:

    state = tap.enter(layer, carry, xs)   before a layer: `layer` a traced int, `carry` what the previous
                                          layer's `leave` returned, `xs` this layer's slice of the
                                          per-layer inputs; `layer=None` (and `xs=None`) before the
                                          global sites (the embedding, the final norm)
    x, state = tap(kind, x, state)        at each site, in forward order (`kind` e.g. "attn.hook_z",
                                          the names of `_sites.py`)
    carry, ys = tap.leave(state)          after a layer; `ys` are stacked over the layers

and asks, at trace time, `tap.observes(kinds)` / `tap.rewrites(kinds)` to decide whether the
optional sites are computed at all: the per-head split inputs (`hook_q_input`, ...), which exist
only when observed, and the per-head `attn.hook_result`, which feeds the stream (summed over heads)
only when rewritten and is otherwise computed beside the fused output, so the plain pass keeps its
numerics. `Taps(a, b)` runs several taps in order (its carry, xs and ys are tuples, one per part).

A model feature (an embedding multiplier, a post-attention norm, local attention) is written here
and nowhere else, so every consumer sees the same model.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jaxtyping import Bool, Float, Int

from ._checks import check_tokens, layer_index
from ._config import Config
from ._interventions import ALL_LAYERS, Hook, Intervention, PerLayer
from ._sites import SPLIT_INPUTS, Site, global_kinds, layer_kinds, parse_site, site_dtype, site_shape

# ---------------------------------------------------------------------------
# Taps
# ---------------------------------------------------------------------------


class Tap(eqx.Module):
    """Base tap: observes nothing and changes nothing. Subclass it (an equinox module: arrays are
    traced leaves, other fields static) and override what you need; see the module docstring."""

    def observes(self, kinds: Iterable[str]) -> bool:
        """Whether this tap reads or rewrites any of `kinds` (decides which optional sites exist)."""
        return False

    def rewrites(self, kinds: Iterable[str]) -> bool:
        """Whether this tap may change any of `kinds` (the per-head result then feeds the stream)."""
        return False

    def enter(self, layer, carry, xs):
        """The state at the start of a layer (`layer` traced) or of the global sites (`layer=None`)."""
        return carry

    def __call__(self, kind: str, x: Array, state) -> tuple[Array, Any]:
        return x, state

    def leave(self, state) -> tuple[Any, Any]:
        """`(carry, ys)` at the end of a layer (or of the global sites, where `ys` is dropped)."""
        return state, None


NO_TAP = Tap()


class Taps(Tap):
    """Several taps in order: each sees what the ones before it wrote. Carry, xs, ys are tuples."""

    parts: tuple[Tap, ...]

    def observes(self, kinds):
        kinds = tuple(kinds)
        return any(p.observes(kinds) for p in self.parts)

    def rewrites(self, kinds):
        kinds = tuple(kinds)
        return any(p.rewrites(kinds) for p in self.parts)

    def enter(self, layer, carry, xs):
        n = len(self.parts)
        carry = (None,) * n if carry is None else carry
        xs = (None,) * n if xs is None else xs
        return tuple(p.enter(layer, c, x) for p, c, x in zip(self.parts, carry, xs))

    def __call__(self, kind, x, state):
        out = []
        for p, s in zip(self.parts, state):
            x, s = p(kind, x, s)
            out.append(s)
        return x, tuple(out)

    def leave(self, state):
        left = [p.leave(s) for p, s in zip(self.parts, state)]
        return tuple(c for c, _ in left), tuple(y for _, y in left)


def _apply(hook: Hook, x: Array, name: str) -> Array:
    fn = hook.fn
    if isinstance(fn, Intervention):
        fn.check(x, name)
    y = fn(x)
    if y.shape != x.shape:
        raise ValueError(f"intervention at {name!r} returned shape {y.shape}; the activation has shape {x.shape}")
    return y.astype(x.dtype)


class HookTap(Tap):
    """Applies `Hook`s: global ones at their site, per-layer ones where their layer matches (a traced
    layer compares at run time under `lax.cond`; `ALL_LAYERS` with `PerLayer` slices per layer)."""

    hooks: tuple[Hook, ...]

    def observes(self, kinds):
        kinds = tuple(kinds)
        return any(h.kind in kinds for h in self.hooks)

    rewrites = observes

    def enter(self, layer, carry, xs):
        return layer

    def __call__(self, kind, x, layer):
        for h in self.hooks:
            if h.kind != kind or (h.layer is None) != (layer is None):
                continue
            if layer is None:  # a global site
                x = _apply(h, x, kind)
            elif isinstance(h.layer, str):  # ALL_LAYERS: every layer, a PerLayer intervention sliced here
                fn = h.fn.at(layer) if isinstance(h.fn, PerLayer) else h.fn
                x = _apply(Hook(kind, None, fn), x, f"blocks.*.{kind}")
            else:
                name = f"blocks.{h.layer}.{kind}" if isinstance(h.layer, int) else f"blocks.<l>.{kind}"
                x = lax.cond(layer == h.layer, lambda a, h=h, n=name: _apply(h, a, n), lambda a: a, x)
        return x, layer

    def leave(self, layer):
        return None, None


class CacheTap(Tap):
    """Records sites into the carry, a dict: per-layer kinds into buffers `[slots + 1, ...]` at the
    slot `slots[kind][layer]` (the last slot is scratch for layers nobody asked for), global kinds
    by name."""

    slots: dict[str, Array]  # kind -> int [L]
    global_record: tuple[str, ...] = eqx.field(static=True)

    def observes(self, kinds):
        return any(k in self.slots or k in self.global_record for k in kinds)

    def enter(self, layer, carry, xs):
        return layer, carry

    def __call__(self, kind, x, state):
        layer, bufs = state
        if layer is None:
            if kind in self.global_record:
                bufs = {**bufs, kind: x}
        elif kind in self.slots:
            b = bufs[kind]
            bufs = {**bufs, kind: lax.dynamic_update_index_in_dim(b, x.astype(b.dtype), self.slots[kind][layer], 0)}
        return x, (layer, bufs)

    def leave(self, state):
        return state[1], None


# ---------------------------------------------------------------------------
# The pieces of the pass
# ---------------------------------------------------------------------------


def add_bias(x, b):
    """`x + b` in `x`'s dtype, or `x` when the model has no such bias."""
    return x if b is None else x + b.astype(x.dtype)


def norm(cfg: Config, x: Array, w, b, prefix: str, tap: Tap, state) -> tuple[Array, Any]:
    """LayerNorm / RMSNorm with TransformerLens's sites (`hook_normalized` is before the weight), computed in
    float32 whatever the model's dtype; the output has the input's dtype."""
    if cfg.normalization is None:
        return x, state
    dtype, x = x.dtype, x.astype(jnp.float32)
    if cfg.normalization == "layernorm":
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    eps = cfg.final_norm_eps if prefix == "ln_final" and cfg.final_norm_eps is not None else cfg.norm_eps
    scale, state = tap(f"{prefix}.hook_scale", jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps), state)
    x, state = tap(f"{prefix}.hook_normalized", x / scale, state)
    x = x * w
    return (x if b is None else x + b).astype(dtype), state


def activation(cfg: Config, x: Array) -> Array:
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


class LayerSpec(NamedTuple):
    """What differs between layers besides their weights, one row per layer (static numbers from the config,
    scanned beside the weights as `lax.scan` inputs, so local / global layers cost no extra compilation)."""

    inv_freq: Array  # [L, R/2] float32: RoPE inverse frequencies (local layers: the local base, unscaled)
    rope_factor: Array  # [L] float32: multiplies cos and sin (YaRN's attention factor; 1 elsewhere)
    dynamic: Array  # [L] bool: dynamic NTK scaling on this layer (the base grows with the sequence)
    window: Array  # [L] int32: sliding window in keys; 0 = full attention


def rope_frequencies(cfg: Config, theta: float, scaling) -> tuple[np.ndarray, float]:
    """`(inv_freq [R/2] float32, cos/sin factor)` of RoPE with base `theta` and Hugging Face's scaling
    (`cfg.rope_scaling` items, or None): default, linear, dynamic (its growth is applied in `rope`), yarn, llama3."""
    R = cfg.rot_dim
    exps = np.arange(0, R, 2, dtype=np.float64) / R
    inv = 1.0 / theta**exps
    d = dict(scaling or ())
    kind = d.get("rope_type", d.get("type", "default"))
    factor = 1.0
    if kind == "linear":
        inv = inv / d["factor"]
    elif kind == "llama3":
        f, lo, hi, old = d["factor"], d["low_freq_factor"], d["high_freq_factor"], d["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > old / lo, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, (1 - smooth) * scaled / f + smooth * scaled, scaled)
    elif kind == "yarn":
        old = d["original_max_position_embeddings"]
        f = d.get("factor") or cfg.n_ctx / old

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * np.log(scale) + 1.0

        factor = d.get("attention_factor")
        if factor is None:
            m, m_all = d.get("mscale"), d.get("mscale_all_dim")
            factor = float(mscale(f, m) / mscale(f, m_all)) if m and m_all else mscale(f)
        fast, slow = d.get("beta_fast") or 32, d.get("beta_slow") or 1

        def corr(rot):
            return R * np.log(old / (rot * 2 * np.pi)) / (2 * np.log(theta))

        low, high = corr(fast), corr(slow)
        if d.get("truncate", True):
            low, high = np.floor(low), np.ceil(high)
        low, high = max(low, 0), min(high, R - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(R // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extra = 1 - ramp  # the share of the unscaled frequency
        inv = (inv / f) * (1 - extra) + inv * extra
    return inv.astype(np.float32), float(factor)


def layer_spec(cfg: Config) -> LayerSpec:
    """The per-layer `LayerSpec` of a config (NumPy constants)."""
    sliding = cfg.sliding_layers
    glob, gfac = rope_frequencies(cfg, cfg.rope_theta, cfg.rope_scaling)
    local = None if cfg.rope_local_theta is None else rope_frequencies(cfg, cfg.rope_local_theta, None)[0]
    is_local = [s and local is not None for s in sliding]
    inv = np.stack([local if loc else glob for loc in is_local])
    return LayerSpec(
        inv_freq=inv,
        rope_factor=np.array([1.0 if loc else gfac for loc in is_local], np.float32),
        dynamic=np.array([cfg.rope_type == "dynamic" and not loc for loc in is_local], bool),
        window=np.array([cfg.sliding_window if s else 0 for s in sliding], np.int32),
    )


def _uniform(spec: LayerSpec) -> bool:
    return all(bool(np.all(np.asarray(a) == np.asarray(a)[:1])) for a in spec)


def _layer0_spec(cfg: Config) -> LayerSpec:
    spec = layer_spec(cfg)
    if not _uniform(spec):
        raise ValueError("this model's layers differ (local / global attention); pass block its layer's `spec`")
    return LayerSpec(*(a[0] for a in spec))


def rope(cfg: Config, x: Float[Array, "B T N E"], positions: Int[Array, "B T"], spec: LayerSpec | None = None
         ) -> Float[Array, "B T N E"]:  # fmt: skip
    """Rotary embedding, Hugging Face's rotate-half convention, on the first `cfg.rot_dim` dims of each head.
    `spec` is the layer's row of `layer_spec(cfg)` (default: the full-attention layers' RoPE)."""
    R = cfg.rot_dim
    if spec is None:
        inv, fac = rope_frequencies(cfg, cfg.rope_theta, cfg.rope_scaling)
        spec = LayerSpec(inv, np.float32(fac), np.bool_(cfg.rope_type == "dynamic"), np.int32(0))
    inv_freq = jnp.asarray(spec.inv_freq, jnp.float32)
    if cfg.rope_type == "dynamic":  # dynamic NTK: the base grows once a row is longer than n_ctx (per row)
        f = float(dict(cfg.rope_scaling)["factor"])
        seq = jnp.maximum(jnp.max(positions, axis=-1) + 1, cfg.n_ctx).astype(jnp.float32)  # [B]
        grow = (f * seq / cfg.n_ctx - (f - 1)) ** (R / (R - 2))
        scaled = inv_freq * grow[:, None, None] ** -(jnp.arange(0, R, 2, dtype=jnp.float32) / R)  # [B, 1, R/2]
        inv_freq = jnp.where(spec.dynamic, scaled, inv_freq)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if cfg.rope_type == "yarn":
        cos, sin = cos * spec.rope_factor, sin * spec.rope_factor
    xr, xp = (x, None) if R == x.shape[-1] else (x[..., :R], x[..., R:])
    xr = xr.astype(jnp.float32)  # rotated in float32 whatever the model's dtype
    x1, x2 = xr[..., : R // 2], xr[..., R // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = (xr * cos + rotated * sin).astype(x.dtype)
    if xp is not None:
        out = jnp.concatenate([out, xp], axis=-1)
    return out


def positions_from_mask(attention_mask: Bool[Array, "B T"] | None, batch: int, pos: int) -> Int[Array, "B T"]:
    """Position ids: counted over real tokens only, so left padding does not shift them."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(pos), (batch, pos))
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def embed(model, tokens: Int[Array, "B T"], positions: Int[Array, "B T"], tap: Tap = NO_TAP, state=None):
    """`(x [B, T, D], state)`: what enters the residual stream before layer 0 (token and position embeddings)."""
    cfg = model.cfg
    x = model.W_E[tokens]
    if cfg.embedding_multiplier != 1.0:
        x = x * jnp.asarray(cfg.embedding_multiplier, x.dtype)
    x, state = tap("hook_embed", x, state)
    if cfg.positional == "learned":
        pe, state = tap("hook_pos_embed", model.W_pos[positions], state)
        x = x + pe
    return x, state


def softcap(x: Array, cap: float | None) -> Array:
    """`cap * tanh(x / cap)` (Gemma 2's soft-capping), or `x` when `cap` is None."""
    if cap is None:
        return x
    c = jnp.asarray(cap, x.dtype)
    return jnp.tanh(x / c) * c


def final(model, x: Float[Array, "*B D"], tap: Tap = NO_TAP, state=None):
    """`(logits [..., V], state)`: the final norm and the unembedding of a residual stream (soft-capped if the
    config says so)."""
    h, state = norm(model.cfg, x, model.lnf_w, model.lnf_b, "ln_final", tap, state)
    logits = jnp.matmul(h, model.W_U, preferred_element_type=jnp.float32)  # float32 logits in any model dtype
    return softcap(add_bias(logits, model.b_U), model.cfg.final_softcap), state


def unembed(model, resid: Float[Array, "*B D"]) -> Float[Array, "*B V"]:
    """Final norm and unembedding of a residual stream `[..., D]` (no hooks): logits `[..., V]`."""
    return final(model, resid)[0]


def _rms(cfg: Config, x: Array, w) -> Array:
    """RMSNorm over the last axis without sites (the q / k norms), in float32; the output has `x`'s dtype."""
    xf = x.astype(jnp.float32)
    return (xf / jnp.sqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.norm_eps) * w).astype(x.dtype)


def qk_norm(cfg: Config, x: Float[Array, "B T N E"], w) -> Float[Array, "B T N E"]:
    """The q or k norm: per head over d_head, or (`qk_norm_scope="all"`, OLMo-2) over all heads at once."""
    if cfg.qk_norm_scope == "head":
        return _rms(cfg, x, w)
    return _rms(cfg, x.reshape(*x.shape[:-2], -1), w).reshape(x.shape)


def block(cfg: Config, p, x: Float[Array, "B T D"], positions: Int[Array, "B T"], key_mask: Bool[Array, "B S"] | None,
          tap: Tap, state, spec: LayerSpec | None = None) -> tuple[Float[Array, "B T D"], Any]:  # fmt: skip
    """One transformer layer on the residual stream; `p` is that layer's slice of `Blocks`, `spec` its row of
    `layer_spec(cfg)` (may be omitted when every layer is alike)."""
    B, T, _ = x.shape
    H, K, G, E = cfg.n_heads, cfg.kv_heads, cfg.group_size, cfg.d_head
    if spec is None:
        spec = _layer0_spec(cfg)
    pre = cfg.pre_norm
    x, state = tap("hook_resid_pre", x, state)
    if tap.observes(SPLIT_INPUTS):  # each head reads its own copy of the stream (edges into one head)

        def split(kind, n, W, b, state):
            xi, state = tap(kind, jnp.broadcast_to(x[:, :, None], (B, T, n, x.shape[-1])), state)
            hi = norm(cfg, xi, p.ln1_w, p.ln1_b, "ln1", NO_TAP, None)[0] if pre else xi
            return add_bias(jnp.einsum("btnd,nde->btne", hi, W), b), state

        q, state = split("hook_q_input", H, p.W_Q, p.b_Q, state)
        q, state = tap("attn.hook_q", q, state)
        k, state = split("hook_k_input", K, p.W_K, p.b_K, state)
        k, state = tap("attn.hook_k", k, state)
        v, state = split("hook_v_input", K, p.W_V, p.b_V, state)
        v, state = tap("attn.hook_v", v, state)
    else:
        h, state = norm(cfg, x, p.ln1_w, p.ln1_b, "ln1", tap, state) if pre else (x, state)
        q, state = tap("attn.hook_q", add_bias(jnp.einsum("btd,hde->bthe", h, p.W_Q), p.b_Q), state)
        k, state = tap("attn.hook_k", add_bias(jnp.einsum("bsd,kde->bske", h, p.W_K), p.b_K), state)
        v, state = tap("attn.hook_v", add_bias(jnp.einsum("bsd,kde->bske", h, p.W_V), p.b_V), state)
    if cfg.qk_norm:
        q, state = tap("attn.hook_q_normed", qk_norm(cfg, q, p.q_norm_w), state)
        k, state = tap("attn.hook_k_normed", qk_norm(cfg, k, p.k_norm_w), state)
    if cfg.positional == "rotary":
        q, state = tap("attn.hook_rot_q", rope(cfg, q, positions, spec), state)
        k, state = tap("attn.hook_rot_k", rope(cfg, k, positions, spec), state)
    qg = q.reshape(B, T, K, G, E)
    S = k.shape[1]  # keys: T, or a KV cache's slots when generating (queries are then the last T of them)
    scores = jnp.einsum("btkge,bske->bkgts", qg, k).reshape(B, H, T, S).astype(jnp.float32)  # softmax in float32
    if cfg.attn_scale is None:  # the usual 1/sqrt(d_head), as a division (the numerics every reference has)
        scores = scores / np.sqrt(E).astype(np.float32)
    else:
        scores = scores * np.float32(cfg.attn_scale)
    scores = softcap(scores, cfg.attn_softcap)
    allowed = jnp.ones((T, S), bool)
    if cfg.causal:
        allowed = jnp.tril(allowed, S - T)
    allowed = allowed[None, None]
    if cfg.sliding_window is not None:  # the window counts positions: a KV cache's queries need not be its last slots
        if key_mask is None:
            kpos = positions if S == T else jnp.broadcast_to(jnp.arange(S), (B, S))
        else:  # real keys are contiguous after left padding (a cache's later slots are not yet real)
            kpos = jnp.cumsum(key_mask.astype(jnp.int32), axis=-1) - 1
        dist = positions[:, :, None] - kpos[:, None, :]  # [B, T, S]
        dist = dist if cfg.causal else jnp.abs(dist)
        allowed = allowed & ((spec.window <= 0) | (dist < spec.window))[:, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    scores, state = tap("attn.hook_attn_scores", jnp.where(allowed, scores, jnp.finfo(scores.dtype).min), state)
    pattern, state = tap("attn.hook_pattern", jax.nn.softmax(scores, axis=-1), state)
    z = jnp.einsum("bkgts,bske->btkge", pattern.astype(v.dtype).reshape(B, K, G, T, S), v).reshape(B, T, H, E)
    z, state = tap("attn.hook_z", z, state)
    if tap.rewrites(("attn.hook_result",)):  # the per-head outputs feed the stream only when something rewrites them
        result, state = tap("attn.hook_result", jnp.einsum("bthe,hed->bthd", z, p.W_O), state)
        attn_out = result.sum(axis=2)
    else:  # observed (or not) without changing the numerics of the main path
        if tap.observes(("attn.hook_result",)):
            _, state = tap("attn.hook_result", jnp.einsum("bthe,hed->bthd", z, p.W_O), state)
        attn_out = jnp.einsum("bthe,hed->btd", z, p.W_O)
    attn_out = add_bias(attn_out, p.b_O)
    if cfg.post_attn_norm:  # hook_attn_out is what enters the residual stream: the post-norm's output
        attn_out, state = norm(cfg, attn_out, p.ln1_post_w, None, "ln1_post", tap, state)
    attn_out, state = tap("hook_attn_out", attn_out, state)
    if cfg.attn_only:
        return tap("hook_resid_post", x + attn_out, state)
    if cfg.parallel_residual:  # attention and MLP both read the layer's input
        mid = x
    else:
        mid, state = tap("hook_resid_mid", x + attn_out, state)
    mlp_in, state = tap("hook_mlp_in", mid, state)  # mlp_in feeds the MLP only
    h, state = norm(cfg, mlp_in, p.ln2_w, p.ln2_b, "ln2", tap, state) if pre else (mlp_in, state)
    if cfg.gated_mlp:
        pre_act, state = tap("mlp.hook_pre", add_bias(h @ p.W_gate, p.b_gate), state)
        linear, state = tap("mlp.hook_pre_linear", add_bias(h @ p.W_in, p.b_in), state)
        post = activation(cfg, pre_act) * linear
    else:
        pre_act, state = tap("mlp.hook_pre", add_bias(h @ p.W_in, p.b_in), state)
        post = activation(cfg, pre_act)
    post, state = tap("mlp.hook_post", post, state)
    mlp_out = add_bias(post @ p.W_out, p.b_out)
    if cfg.post_mlp_norm:
        mlp_out, state = norm(cfg, mlp_out, p.ln2_post_w, None, "ln2_post", tap, state)
    mlp_out, state = tap("hook_mlp_out", mlp_out, state)
    if cfg.parallel_residual:
        return tap("hook_resid_post", x + attn_out + mlp_out, state)
    return tap("hook_resid_post", mid + mlp_out, state)


def layers(model, x: Float[Array, "B T D"], positions, key_mask, tap: Tap = NO_TAP, carry=None, xs=None,
           start_layer: int | Array = 0, stop_layer: int | Array | None = None):  # fmt: skip
    """`(x, carry, ys)` after blocks `start_layer .. stop_layer - 1`: the one layer loop (a `lax.scan`).

    Layers outside the bounds pass `x` and the carry through (`ys` zero there); the bounds may be
    traced, so one compiled program serves every value. With `start_layer` the Python int 0 and no
    `stop_layer`, the scan body has no `lax.cond` at all.
    """
    cfg = model.cfg
    every = isinstance(start_layer, int) and start_layer == 0 and (
        stop_layer is None or (isinstance(stop_layer, int) and stop_layer == cfg.n_layers)
    )
    stop = cfg.n_layers if stop_layer is None else stop_layer

    def body(c, inp):
        x, carry = c
        p, i, spec_i, xs_i = inp

        def layer(x, carry):
            state = tap.enter(i, carry, xs_i)
            x, state = block(cfg, p, x, positions, key_mask, tap, state, fixed if spec_i is None else spec_i)
            carry, ys = tap.leave(state)
            return x, carry, ys

        if every:
            x, carry, ys = layer(x, carry)
            return (x, carry), ys

        def skip(x, carry):
            ys = jax.eval_shape(layer, x, carry)[2]
            return x, carry, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ys)

        x, carry, ys = lax.cond((i >= start_layer) & (i < stop), layer, skip, x, carry)
        return (x, carry), ys

    # per-layer RoPE and window: scanned beside the weights when layers differ (never unrolled); constants otherwise
    spec = layer_spec(cfg)
    fixed = LayerSpec(*(a[0] for a in spec)) if _uniform(spec) else None
    spec = None if fixed is not None else jax.tree.map(jnp.asarray, spec)
    (x, carry), ys = lax.scan(body, (x, carry), (model.blocks, jnp.arange(cfg.n_layers), spec, xs))
    return x, carry, ys


class Forward(NamedTuple):
    """What `forward` returns."""

    logits: Array | None  # [B, T, V]; None when not asked for
    resid: Array  # [B, T, D] the residual stream after the last layer run
    carry: Any  # the tap's carry after the last stage
    ys: Any  # the tap's per-layer outputs, stacked on a leading L axis


def forward(model, tokens: Int[Array, "B T"] | None = None, *, tap: Tap = NO_TAP, carry=None, xs=None,
            positions: Int[Array, "B T"] | None = None, key_mask: Bool[Array, "B S"] | None = None,
            resid: Float[Array, "B T D"] | None = None, start_layer: int | Array = 0,
            stop_layer: int | Array | None = None, logits: bool = True) -> Forward:  # fmt: skip
    """The whole pass with a tap: embed `tokens` (or enter at `start_layer` with `resid`), run the
    layers, and (`logits=True`) the final norm and unembedding. `positions` default to
    `0 .. T-1`; `key_mask` masks keys (padding, or a KV cache's empty slots). Pure: arrays in,
    arrays out; wrap it in `jit`/`vmap`/`grad` as needed (`run` is the jitted, validated form)."""
    ref = tokens if tokens is not None else resid
    B, T = ref.shape[0], ref.shape[1]
    if positions is None:
        positions = positions_from_mask(None, B, T)
    if resid is None:
        state = tap.enter(None, carry, None)
        x, state = embed(model, tokens, positions, tap, state)
        carry, _ = tap.leave(state)
    else:
        x = resid
    x, carry, ys = layers(model, x, positions, key_mask, tap, carry, xs, start_layer, stop_layer)
    out = None
    if logits:
        state = tap.enter(None, carry, None)
        out, state = final(model, x, tap, state)
        carry, _ = tap.leave(state)
    return Forward(out, x, carry, ys)


# ---------------------------------------------------------------------------
# run: hooks and a cache, validated
# ---------------------------------------------------------------------------

HookSpec = Hook | tuple[Any, Any] | Mapping[Any, Any]


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
            if h.layer is not None and not isinstance(h.layer, str):
                layer = layer_index(h.layer, cfg.n_layers, f"the layer of the hook at {h.kind!r}")
                h = h if layer is h.layer else Hook(h.kind, layer, h.fn)
            valid = layer_kinds(cfg) if h.layer is not None else global_kinds(cfg)
            if h.kind not in valid:
                parse_site(h.name if h.layer is not None else h.kind, cfg)  # raises with suggestions
            out.append(h)
            continue
        name, fn = h
        site = parse_site(name, cfg)
        out.append(Hook(site.kind, site.layer, fn))
    return tuple(out)


class RunOutput(NamedTuple):
    """What `run` returns: logits (or None), the final residual stream, and the requested cache by site name."""

    logits: Array | None  # [B, T, V]; None when stopped early at a static layer
    resid: Array  # residual stream after the last layer run, [B, T, D]
    cache: dict[str, Array]  # requested sites, by full name

    def __repr__(self) -> str:  # shapes and site names, not array contents
        from ._repr import summary

        return summary(self, items=8)


def run(
    model,
    tokens: Int[Array, "B T"] | Int[Array, " T"],
    *,
    hooks=None,
    cache: Iterable[Any] = (),
    attention_mask: Bool[Array, "B T"] | None = None,
    start_layer: int | Array = 0,
    stop_layer: int | Array | None = None,
    resid: Float[Array, "B T D"] | None = None,
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

    Checked before anything is traced: token ids against the vocabulary, layers against the model
    (a negative Python-int layer counts from the end, in hooks and in `start_layer` / `stop_layer`).
    """
    L = model.cfg.n_layers
    check_tokens(tokens, model.cfg.d_vocab)
    start_layer = layer_index(start_layer, L, "start_layer", allow_end=True)
    if stop_layer is not None:
        stop_layer = layer_index(stop_layer, L, "stop_layer", allow_end=True)
    if isinstance(start_layer, int) and isinstance(stop_layer, int) and start_layer > stop_layer:
        raise ValueError(f"start_layer={start_layer} is after stop_layer={stop_layer}: no layer would run")
    return _run(model, tokens, hooks=hooks, cache=cache, attention_mask=attention_mask, start_layer=start_layer,
                stop_layer=stop_layer, resid=resid, return_logits=return_logits)  # fmt: skip


@eqx.filter_jit
def _run(model, tokens, *, hooks, cache, attention_mask, start_layer, stop_layer, resid, return_logits) -> RunOutput:
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
    if resid is not None:
        resid = jnp.asarray(resid)
        if resid.shape != (B, T, cfg.d_model):
            raise ValueError(
                f"resid (the input to blocks.<start>.hook_resid_pre) has shape {resid.shape}; expected {(B, T, cfg.d_model)}"
            )

    # Per-layer caches: for each requested kind a buffer with one slot per requested
    # layer plus a scratch slot, written with a dynamic index inside the scan.
    by_kind: dict[str, list[int]] = {}
    for s in wanted:
        if s.layer is not None and s.layer not in by_kind.setdefault(s.kind, []):
            by_kind[s.kind].append(s.layer)
    dtype = model.W_E.dtype if resid is None else resid.dtype
    slots, buffers = {}, {}
    for kind, ls in by_kind.items():
        table = np.full(cfg.n_layers, len(ls), np.int32)
        table[ls] = np.arange(len(ls))
        slots[kind] = jnp.asarray(table)
        buffers[kind] = jnp.zeros((len(ls) + 1, *site_shape(Site(kind, 0), cfg, B, T)), site_dtype(kind, dtype))
    tap = Taps((HookTap(hooks), CacheTap(slots, tuple(s.kind for s in wanted if s.layer is None))))
    logits = return_logits and not (isinstance(stop_layer, int) and stop_layer < cfg.n_layers)
    out = forward(model, tokens if resid is None else None, tap=tap, carry=(None, buffers), positions=positions,
                  key_mask=attention_mask, resid=resid, start_layer=start_layer, stop_layer=stop_layer, logits=logits)  # fmt: skip
    recorded = out.carry[1]
    got = {}
    for kind, ls in by_kind.items():
        for j, l in enumerate(ls):
            got[f"blocks.{l}.{kind}"] = recorded[kind][j]
    got.update({k: v for k, v in recorded.items() if k not in by_kind})
    return RunOutput(out.logits, out.resid, {s.name: got[s.name] for s in wanted})


def run_with_cache(model, tokens: Array, names: Iterable[Any], **kwargs) -> tuple[Array, dict[str, Array]]:
    """`(logits, cache)`, TransformerLens style, caching only `names`."""
    out = run(model, tokens, cache=names, **kwargs)
    return out.logits, out.cache
