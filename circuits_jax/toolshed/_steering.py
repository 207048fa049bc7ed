"""Steering vectors: build them (ActAdd, CAA, SAE-feature steering), add them, sweep their size.

A steering vector is a direction added to one site's activation (by default the residual
stream entering a layer, `blocks.{layer}.hook_resid_pre`, shape `[B, T, D]`):

    actadd            [n, D]  activation(positive prompt) - activation(negative prompt), position
                              by position (Turner et al. 2023, "Activation Addition"); added to the
                              first n positions of the steered prompt.
    caa               [D]     mean over contrast pairs of the difference at each text's last token
                              (Rimsky et al. 2024, "Contrastive Activation Addition"); added at every
                              position (or the ones given).
    feature_steering  [D]     unit vector: the SAE latents that fire more on positive than on negative
                              prompts (top k, mean over non-BOS tokens), decoded through `W_dec`
                              without the decoder bias (feature-guided activation addition, FGAA-style).
    any unit direction        is steered with the same `steering_hook`; there is no separate path.

Steering is one `Hook` with an `Add`-like intervention whose array is `coeff * vector`, so a sweep
over coefficients is `jax.vmap` over that array: `steering_sweep` and `perplexity_sweep` compile the
whole sweep into one XLA program (optionally `lax.map` over chunks of coefficients to bound memory,
since each coefficient holds a full `[B, T, V]` logits array).

Alignment rule of `actadd` (explicit): the two prompts must tokenize to the same length
(`align="error"`, the default, raises and shows both token splits); `align="pad"` right-pads the
shorter one with the tokenizer's space token `" "`. BOS: when the tokenizer prepends one, position 0
is BOS in both prompts and, the model being causal, its activation is identical, so the difference
there is exactly zero; without BOS, position 0 is the first word and carries a difference.
"""

from __future__ import annotations

from typing import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from ..core import Hook, Intervention, Transformer, layer_kinds, next_token_nll, parse_site, run

_NOT_PER_POSITION = ("attn.hook_attn_scores", "attn.hook_pattern")


def _site_name(model: Transformer, layer, site: str) -> str:
    """Validate `layer` (0..L-1) and `site` (a per-layer, per-position kind); return the full name."""
    cfg = model.cfg
    L = cfg.n_layers
    if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"layer must be an int in 0..{L - 1}, got {layer!r}")
    if not 0 <= int(layer) < L:
        raise ValueError(f"layer {layer} is out of range: the model has {L} layers, valid layers are 0..{L - 1}")
    if site in _NOT_PER_POSITION:
        raise ValueError(f"cannot steer {site!r} (shape [B, H, T, S]): pick a per-position site such as hook_resid_pre")
    name = f"blocks.{int(layer)}.{site}"
    if site not in layer_kinds(cfg):
        try:
            parse_site(name, cfg)
        except KeyError as e:  # unknown site: the message names the closest valid ones
            raise ValueError(e.args[0]) from None
    return name


class AddAt(Intervention):
    """Add `delta` at every position (`positions=None`, `delta` shaped like one position) or at the
    given positions (`delta` `[P, ...]`, or one position's shape broadcast to all P). Positions are
    indices into the activation's T axis; they are static, so a bad index fails at trace time."""

    delta: Array
    positions: tuple[int, ...] | None = eqx.field(static=True, default=None)

    def __call__(self, x):
        d = jnp.asarray(self.delta, x.dtype)
        if self.positions is None:
            return x + d
        idx = np.asarray(self.positions, np.int32)
        return x.at[:, idx].add(jnp.broadcast_to(d, (len(idx), *x.shape[2:])))

    def check(self, x, site):
        one = tuple(x.shape[2:])
        shape = tuple(self.delta.shape)
        if self.positions is None:
            if shape != one:
                raise ValueError(f"steering vector for site {site!r} has shape {shape}; the activation there has shape "
                                 f"{tuple(x.shape)}, so a vector for every position must have shape {one}")  # fmt: skip
            return
        P, T = len(self.positions), x.shape[1]
        if shape not in (one, (P, *one)):
            raise ValueError(f"steering vector for site {site!r} has shape {shape}; the activation there has shape "
                             f"{tuple(x.shape)}: expected {one} or {(P, *one)} for {P} positions")  # fmt: skip
        bad = [p for p in self.positions if not -T <= p < T]
        if bad:
            raise ValueError(f"steering positions {bad} at {site!r} are outside the {T} positions of this run; an [n, D] "
                             "(ActAdd) vector needs a prompt of at least n tokens, and in `generate` hooks_on='prompt'")  # fmt: skip


def steering_hook(vector, layer, coeff=1.0, *, site: str = "hook_resid_pre", positions=None, model=None) -> Hook:
    """The `Hook` adding `coeff * vector` at `blocks.{layer}.{site}`.

    vector `[D]` (one position's shape): added at every position, or at `positions` if given.
    vector `[n, D]` (ActAdd): added to the first n positions (or to `positions`, n of them).
    `coeff` and `layer` may be traced (a sweep vmaps over `coeff`); with `model`, a Python-int
    layer is checked against the model's range (a hook at a missing layer would do nothing).
    """
    if model is not None:
        _site_name(model, layer, site)
    elif isinstance(layer, (int, np.integer)) and layer < 0:
        raise ValueError(f"layer must be >= 0, got {layer}")
    vector = jnp.asarray(vector)
    if vector.ndim == 0:
        raise ValueError("steering vector must be at least 1-D ([D] or [n, D]), got a scalar")
    per_position = 2 if site.startswith("attn.hook_") or site in ("hook_q_input", "hook_k_input", "hook_v_input") else 1
    if positions is None and vector.ndim == per_position + 1:  # [n, ...]: the first n positions (ActAdd)
        positions = tuple(range(vector.shape[0]))
    if positions is not None:
        positions = tuple(int(p) for p in np.ravel(positions))
    delta = jnp.asarray(coeff, jnp.float32) * vector.astype(jnp.float32)
    return Hook(site, layer, AddAt(delta, positions))


# ---------------------------------------------------------------- building vectors


def _cache_site(model, tokens, name, attention_mask=None) -> Array:
    """Activations at one site `[B, T, ...]`, running only the layers up to it."""
    site = parse_site(name, model.cfg)
    out = run(model, jnp.asarray(tokens, jnp.int32), cache=[name], attention_mask=attention_mask,
              stop_layer=jnp.int32(site.layer + 1), return_logits=False)  # fmt: skip
    return out.cache[name]


def actadd(model, tok, positive: str, negative: str, layer: int, *, site: str = "hook_resid_pre", align: str = "error",
           prepend_bos: bool | None = None) -> Array:  # fmt: skip
    """ActAdd steering vector `[n, D]`: `act(positive) - act(negative)` at `blocks.{layer}.{site}`,
    position by position (n = the prompts' token length).

    align="error" (default): prompts of different token lengths raise a ValueError showing both
    token splits. align="pad": the shorter prompt is right-padded with the tokenizer's space token
    (`" "`, which must be a single token) up to the longer one's length.
    BOS: `prepend_bos` (None: the tokenizer's default). With BOS, row 0 of the result is exactly
    zero (both prompts start with the same token and attention is causal).
    Steer with `steering_hook(v, layer, coeff, site=site)`: it adds row i at position i of the steered
    prompt, i < n (so the prompt must have at least n tokens; in `generate`, `hooks_on="prompt"`).
    """
    if align not in ("error", "pad"):
        raise ValueError(f"align must be 'error' or 'pad', got {align!r}")
    name = _site_name(model, layer, site)
    a, b = tok.encode(positive, prepend_bos), tok.encode(negative, prepend_bos)
    if len(a) != len(b):
        if align == "error":
            raise ValueError(
                f"ActAdd prompts tokenize to different lengths: positive {positive!r} -> {len(a)} tokens "
                f"{tok.to_str_tokens(a)}, negative {negative!r} -> {len(b)} tokens {tok.to_str_tokens(b)}; "
                "make them the same length or pass align='pad' (right-pads the shorter with the space token ' ')"
            )
        space = tok.to_single_token(" ")
        n = max(len(a), len(b))
        a, b = a + [space] * (n - len(a)), b + [space] * (n - len(b))
    if not a:
        raise ValueError("the ActAdd prompts tokenize to nothing")
    acts = _cache_site(model, np.asarray([a, b], np.int32), name)
    return acts[0] - acts[1]


def _last_index(mask) -> Array:
    return jnp.sum(jnp.asarray(mask, jnp.int32), -1) - 1


def caa(model, tok, pairs: Sequence[tuple[str, str]], layer: int, *, site: str = "hook_resid_pre",
        prepend_bos: bool | None = None) -> Array:  # fmt: skip
    """CAA steering vector `[D]`: the mean over `(positive_text, negative_text)` pairs of the
    difference of activations at each text's last token (the "answer" position). Texts of any
    lengths are right-padded into one batch and run once; the last real token is read per row."""
    pairs = list(pairs)
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError("caa needs a non-empty list of (positive_text, negative_text) pairs")
    name = _site_name(model, layer, site)
    texts = [t for p in pairs for t in p]
    tokens, mask = tok.to_padded(texts, prepend_bos=prepend_bos, padding_side="right")
    if (mask.sum(-1) == 0).any():
        raise ValueError("a CAA text tokenizes to nothing")
    acts = _cache_site(model, tokens, name, attention_mask=mask)  # [2P, T, ...]
    last = acts[jnp.arange(len(texts)), _last_index(mask)]  # [2P, ...]
    return jnp.mean(last[0::2] - last[1::2], axis=0)


def _mean_latents(model, tok, sae, texts, name, prepend_bos):
    """Mean SAE latents over the non-BOS, non-padding tokens of each text, then over texts `[F]`."""
    tokens, mask = tok.to_padded(list(texts), prepend_bos=prepend_bos, padding_side="right")
    acts = _cache_site(model, tokens, name, attention_mask=mask)
    lat = sae.encode(acts)  # [B, T, F]
    keep = jnp.asarray(mask)
    if tok.bos_token_id is not None:
        keep = keep & (jnp.asarray(tokens) != tok.bos_token_id)
    keep = keep.astype(lat.dtype)
    n = jnp.sum(keep, -1, keepdims=True)
    if bool(jnp.any(n == 0)):
        raise ValueError("a feature-steering prompt has no token besides BOS")
    return jnp.mean(jnp.sum(lat * keep[..., None], 1) / n, 0)


def feature_steering(model, tok, sae, positive: Sequence[str], negative: Sequence[str], *, top_k: int = 20,
                     drop_bos_features: bool = True, density=None, max_density: float = 0.1,
                     prepend_bos: bool | None = None) -> Array:  # fmt: skip
    """SAE-feature steering vector `[D]` (unit norm) for the SAE's site `sae.in_sites[0]`.

    d = mean latents over `positive` prompts - mean over `negative` (each: mean over non-BOS tokens);
    the `top_k` largest positive entries of d are kept, the rest zeroed; the result is decoded
    through the decoder without its bias (`d @ W_dec / out_scale`) and normalised.
    Dropped before the top-k: latents that fire on BOS alone (`drop_bos_features`: the attention-sink
    position's features carry no content and have huge activations) and, given `density [F]` (fraction
    of tokens each latent fires on), dense latents above `max_density` (they fire on almost anything,
    so their difference is noise rather than the concept).
    Steer at the SAE's site: for `blocks.6.hook_resid_post` that is
    `steering_hook(v, 6, c, site="hook_resid_post")`, the same stream as `blocks.7.hook_resid_pre`.
    """
    if getattr(sae, "is_transcoder", False):
        raise ValueError(f"feature steering needs an SAE (in_site == out_site); this reads {sae.in_site} and writes {sae.out_site}")
    name = sae.in_sites[0]
    site = parse_site(name, model.cfg)
    if site.layer is None:
        raise ValueError(f"the SAE reads {name!r}, not a per-layer site")
    F = sae.width
    if not 1 <= top_k <= F:
        raise ValueError(f"top_k must be in 1..{F} (the SAE's width), got {top_k}")
    if not positive or not negative:
        raise ValueError("feature_steering needs at least one positive and one negative prompt")
    d = _mean_latents(model, tok, sae, positive, name, prepend_bos) - _mean_latents(model, tok, sae, negative, name, prepend_bos)
    allowed = jnp.ones(F, bool)
    if drop_bos_features and tok.bos_token_id is not None:
        bos = sae.encode(_cache_site(model, np.asarray([[tok.bos_token_id]], np.int32), name))[0, 0]
        allowed = allowed & (bos <= 0)
    if density is not None:
        density = jnp.asarray(density)
        if density.shape != (F,):
            raise ValueError(f"density has shape {density.shape}; the SAE has {F} latents")
        allowed = allowed & (density <= max_density)
    d = jnp.where(allowed & (d > 0), d, 0.0)
    vals, idx = lax.top_k(d, top_k)
    kept = jnp.zeros(F, d.dtype).at[idx].set(vals)
    if not bool(jnp.any(kept > 0)):
        raise ValueError("no SAE latent fires more on the positive prompts than on the negative ones")
    v = (kept @ sae.W_dec) / sae.out_scale
    return v / jnp.linalg.norm(v)


# ---------------------------------------------------------------- sweeps and perplexity


def _prep(tokens, attention_mask):
    tokens = jnp.atleast_2d(jnp.asarray(tokens, jnp.int32))
    if attention_mask is not None:
        attention_mask = jnp.atleast_2d(jnp.asarray(attention_mask)).astype(bool)
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask has shape {attention_mask.shape}; tokens have shape {tokens.shape}")
    return tokens, attention_mask


def perplexity(model, tokens, *, hooks=None, attention_mask=None) -> Array:
    """exp(mean next-token NLL) over the real tokens of `tokens [B, T]` (a target counts when it and
    the token before it are both unmasked), under `hooks`."""
    tokens, attention_mask = _prep(tokens, attention_mask)
    if tokens.shape[1] < 2:
        raise ValueError("perplexity needs at least 2 tokens per row")
    s, n = next_token_nll(run(model, tokens, hooks=hooks, attention_mask=attention_mask).logits, tokens, attention_mask)
    return jnp.exp(s / n)


@eqx.filter_jit
def _sweep(model, tokens, attention_mask, vector, coeffs, layer, site, positions, metric, chunk):
    def one(c):
        h = Hook(site, layer, AddAt(c * vector, positions))
        return metric(run(model, tokens, hooks=h, attention_mask=attention_mask).logits, tokens, attention_mask)

    C = coeffs.shape[0]
    if chunk is None or chunk >= C:
        return jax.vmap(one)(coeffs)
    n = -(-C // chunk)
    padded = jnp.concatenate([coeffs, jnp.broadcast_to(coeffs[-1:], (n * chunk - C,))])
    out = lax.map(jax.vmap(one), padded.reshape(n, chunk))
    return jax.tree.map(lambda a: a.reshape(n * chunk, *a.shape[2:])[:C], out)


def _sweep_args(model, tokens, vector, layer, coeffs, site, attention_mask, positions, chunk):
    _site_name(model, layer, site)
    tokens, attention_mask = _prep(tokens, attention_mask)
    coeffs = jnp.atleast_1d(jnp.asarray(coeffs, jnp.float32))
    if coeffs.ndim != 1:
        raise ValueError(f"coeffs must be 1-D, got shape {coeffs.shape}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    h = steering_hook(vector, layer, 1.0, site=site, positions=positions)  # resolves the default positions
    return tokens, attention_mask, h.fn.delta, coeffs, jnp.int32(layer), site, h.fn.positions, chunk


class _UserMetric(eqx.Module):
    fn: Callable  # a plain function is static; the arrays of a `jax.tree_util.Partial` / eqx.Module are traced

    def __call__(self, logits, tokens, mask):
        return self.fn(logits)


def _ppl_parts(logits, tokens, mask):
    return next_token_nll(logits, tokens, mask)


def steering_sweep(model, tokens, vector, layer: int, coeffs, metric: Callable[[Array], Array], *,
                   site: str = "hook_resid_pre", attention_mask=None, positions=None, chunk: int | None = None):  # fmt: skip
    """`metric(logits)` for each coefficient, stacked `[C, ...]`: runs of `tokens [B, T]` with
    `coeff * vector` added at `blocks.{layer}.{site}` (see `steering_hook` for the vector's shapes).

    One compiled program: `jax.vmap` over the coefficients (`chunk`: that many at a time under
    `lax.map`, bounding memory to `chunk` logits arrays). `metric` is any JAX function of the logits
    `[B, T, V]`; it is part of the program (pass the same object to reuse the compile). Arrays it closes
    over become constants of the program (slow to compile when large): pass them as the arguments
    of a `jax.tree_util.Partial(fn, *arrays)` (or fields of an eqx.Module) and they are traced inputs.
    """
    args = _sweep_args(model, tokens, vector, layer, coeffs, site, attention_mask, positions, chunk)
    return _sweep(model, *args[:-1], _UserMetric(metric), args[-1])


def perplexity_sweep(model, tokens, vector, layer: int, coeffs, *, site: str = "hook_resid_pre", attention_mask=None,
                     positions=None, chunk: int | None = 1) -> Array:  # fmt: skip
    """Perplexity of `tokens` (as `perplexity`) under each coefficient's steering, `[C]`, in one compiled
    program (chunked one coefficient at a time by default: each holds a `[B, T, V]` logits array)."""
    tokens, attention_mask, *rest = _sweep_args(model, tokens, vector, layer, coeffs, site, attention_mask, positions, chunk)
    if tokens.shape[1] < 2:
        raise ValueError("perplexity needs at least 2 tokens per row")
    s, n = _sweep(model, tokens, attention_mask, rest[0], rest[1], rest[2], rest[3], rest[4], _ppl_parts, rest[5])
    return jnp.exp(s / n)
