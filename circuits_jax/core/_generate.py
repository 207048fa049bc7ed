"""Text generation with a KV cache, under interventions.

The prompt runs once through the model's one forward pass (`_forward.forward`) with a tap
(`KVCacheTap`) that also writes each layer's keys (after RoPE) and values into fixed-size buffers
`[L, B, S, K, E]`; each new token then runs alone, its tap writing its key and value into the next
slot and handing the whole buffer to attention, with a key mask over the filled slots. Shapes never change, so prefill and
the `lax.scan` over new tokens compile to one program per (batch, prompt length, new tokens).

Interventions are the ordinary `Hook`s of `run`; `hooks_on="all"` applies them at the prompt and
at every generated token (they must then broadcast over one position, e.g. a steering vector
`[D]`), `"prompt"` at the prompt only. Left-padded batches (`attention_mask`) generate exactly what
each row generates alone: positions count real tokens only and padding slots are never attended.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array, lax

from ._checks import check_tokens
from ._forward import HookTap, Tap, Taps, final, forward, normalize_hooks, positions_from_mask
from ._model import Transformer


class Generation(NamedTuple):
    """Generated tokens and the logits each was drawn from."""

    tokens: Array  # [B, N] the generated tokens
    logits: Array  # [B, N, V] the logits each was drawn from (after interventions, before sampling filters)

    def __repr__(self) -> str:  # shapes and names, not array contents (see _repr.py)
        from ._repr import summary

        return summary(self)


class KVCacheTap(Tap):
    """Writes each layer's key (after RoPE, if any) and value into that layer's cache slice at `slot`;
    when decoding, attention then reads the whole cache. Per-layer input and output: `(keys, values)`
    `[B, S, K, E]` each."""

    slot: Any
    decode: bool = eqx.field(static=True)
    key_kind: str = eqx.field(static=True)

    def enter(self, layer, carry, xs):
        return xs

    def __call__(self, kind, x, kv):
        if kv is None or kind not in (self.key_kind, "attn.hook_v"):
            return x, kv
        ck, cv = kv
        if kind == self.key_kind:
            ck = lax.dynamic_update_slice_in_dim(ck, x.astype(ck.dtype), self.slot, axis=1)
            return (ck if self.decode else x), (ck, cv)
        cv = lax.dynamic_update_slice_in_dim(cv, x.astype(cv.dtype), self.slot, axis=1)
        return (cv if self.decode else x), (ck, cv)

    def leave(self, kv):
        return None, kv


def _step(model: Transformer, tokens, positions, key_mask, cache, slot, hooks, decode: bool, extra=None):
    """Logits at the last position `[B, V]` and the updated cache, for `tokens` `[B, T]` written at `slot`;
    `extra`: another tap, after the hooks (its layer inputs None)."""
    key_kind = "attn.hook_rot_k" if model.cfg.positional == "rotary" else "attn.hook_k"
    parts = (HookTap(hooks),) + (() if extra is None else (extra,)) + (KVCacheTap(slot, decode, key_kind),)
    tap = Taps(parts)
    xs = (None,) * (len(parts) - 1) + (cache,)
    out = forward(model, tokens, tap=tap, xs=xs, positions=positions, key_mask=key_mask, logits=False)
    logits, _ = final(model, out.resid[:, -1:], tap, tap.enter(None, out.carry, None))
    return logits[:, 0], out.ys[-1]


def _sample(logits: Array, key, temperature: float, top_k: int | None, top_p: float | None) -> Array:
    if temperature == 0:
        return jnp.argmax(logits, -1)
    z = logits / temperature
    if top_k is not None:
        kth = lax.top_k(z, top_k)[0][..., -1:]
        z = jnp.where(z < kth, -jnp.inf, z)
    if top_p is not None:
        srt = jnp.sort(z, -1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(srt, -1), -1)
        # the smallest logit still inside the nucleus (the first token is always kept)
        cut = jnp.take_along_axis(srt, jnp.sum(cum < top_p, -1, keepdims=True).clip(0, z.shape[-1] - 1), -1)
        z = jnp.where(z < cut, -jnp.inf, z)
    return jax.random.categorical(key, z, -1)


@eqx.filter_jit
def _generate(model, tokens, attention_mask, hooks, max_new_tokens: int, hooks_on: str, temperature: float, top_k, top_p, key,
              tap=None):  # fmt: skip
    cfg = model.cfg
    B, T = tokens.shape
    S = T + max_new_tokens
    K, E = cfg.kv_heads, cfg.d_head
    dtype = model.W_E.dtype
    cache = (jnp.zeros((cfg.n_layers, B, S, K, E), dtype), jnp.zeros((cfg.n_layers, B, S, K, E), dtype))
    mask = jnp.ones((B, T), bool) if attention_mask is None else attention_mask
    positions = positions_from_mask(attention_mask, B, T)
    logits, cache = _step(model, tokens, positions, mask, cache, 0, hooks, decode=False, extra=tap)
    step_hooks, step_tap = (hooks, tap) if hooks_on == "all" else ((), None)
    key_mask = jnp.concatenate([mask, jnp.zeros((B, max_new_tokens), bool)], 1)
    next_pos = positions[:, -1] + 1

    def step(carry, i):
        logits, cache, key_mask, pos = carry
        tok = _sample(logits, jax.random.fold_in(key, i), temperature, top_k, top_p)
        slot = T + i
        key_mask = key_mask.at[:, slot].set(True)
        new_logits, cache = _step(model, tok[:, None], pos[:, None], key_mask, cache, slot, step_hooks, decode=True,
                                  extra=step_tap)  # fmt: skip
        return (new_logits, cache, key_mask, pos + 1), (tok, logits)

    _, (toks, lgs) = lax.scan(step, (logits, cache, key_mask, next_pos), jnp.arange(max_new_tokens))
    return Generation(toks.T, jnp.swapaxes(lgs, 0, 1))


def generate(
    model: Transformer,
    tokens,
    max_new_tokens: int,
    *,
    attention_mask=None,
    hooks=None,
    hooks_on: str = "all",
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    tap: Tap | None = None,
) -> Generation:
    """Generate `max_new_tokens` after `tokens` `[B, T]` (left-pad a batch and pass its
    `attention_mask`), greedily (`temperature=0`) or by sampling with optional top-k / top-p,
    seeded. `hooks` (as in `run`) apply at the prompt and every new token (`hooks_on="all"`) or
    at the prompt only (`"prompt"`). `tap`: any other intervention written as a `Tap` (for instance
    `attribution_graphs.steer_features`, transcoder features set or scaled), applied where the hooks are."""
    if hooks_on not in ("all", "prompt"):
        raise ValueError(f"hooks_on must be 'all' or 'prompt', got {hooks_on!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 1; got {temperature}, {top_p}, {top_k}")
    check_tokens(tokens, model.cfg.d_vocab, "prompt tokens")
    tokens = jnp.atleast_2d(jnp.asarray(tokens, jnp.int32))
    B, T = tokens.shape
    cfg = model.cfg
    if cfg.positional == "learned" and T + max_new_tokens > cfg.n_ctx:
        raise ValueError(f"{T} prompt + {max_new_tokens} new tokens exceed the model's context of {cfg.n_ctx}")
    if attention_mask is not None:
        attention_mask = jnp.atleast_2d(jnp.asarray(attention_mask)).astype(bool)
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}; tokens have shape {(B, T)}")
    hooks = normalize_hooks(hooks, cfg)
    if any(h.kind in ("hook_q_input", "hook_k_input", "hook_v_input") for h in hooks):
        raise ValueError("generation does not support the split q/k/v input sites; hook ln1 or the residual stream instead")
    return _generate(model, tokens, attention_mask, hooks, max_new_tokens, hooks_on, float(temperature), top_k,
                     None if top_p is None else float(top_p), jax.random.key(seed), tap)  # fmt: skip
