"""Activation and attention patching sweeps, each one compiled program.

A sweep patches one component at a time — a (layer, position, head) of `z`, a
(layer, neuron) of the MLP, a (layer, head, dest, src) entry of an attention
pattern — from a *source* run into a *target* run and scores every result.
Denoising (default): source = clean, target = corrupt. Noising: the reverse.

How it runs: the source activations of the site and the target's residual
stream are cached once for every layer. One jitted function scores a chunk of
patches of one layer: `jax.vmap` over patch indices, each patch a
`Replace(value, one-hot mask)` hook, and each patched run starts at the patched
layer from the cached target residual (layers below it are skipped at run
time, `run(start_layer=l)`). The layer is a traced argument, so the number of
compiled programs does not grow with depth; a Python loop over *chunks* (not
patches) drives it, bounds memory and shows progress.

Results use TransformerLens's shapes: `[layer, pos]`, `[layer, pos, head]`,
`[layer, head]`, `[layer, head, dest, src]`, `[layer, neuron]`, ...
normalised so clean = 1 and corrupt = 0.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Callable, NamedTuple, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from ._config import Config
from ._interventions import Hook, Replace
from ._metrics import normalise
from ._model import Transformer, run, unembed
from ._sites import Site, site_shape

# Site short name -> (site kind, the activation axes (after batch) each sweep axis indexes)
SITES: dict[str, tuple[str, dict[str, int]]] = {
    "resid_pre": ("hook_resid_pre", {"pos": 0}),
    "resid_mid": ("hook_resid_mid", {"pos": 0}),
    "resid_post": ("hook_resid_post", {"pos": 0}),
    "attn_out": ("hook_attn_out", {"pos": 0}),
    "mlp_out": ("hook_mlp_out", {"pos": 0}),
    "z": ("attn.hook_z", {"pos": 0, "head": 1}),
    "q": ("attn.hook_q", {"pos": 0, "head": 1}),
    "k": ("attn.hook_k", {"pos": 0, "head": 1}),  # head = kv head under grouped-query attention
    "v": ("attn.hook_v", {"pos": 0, "head": 1}),
    "pattern": ("attn.hook_pattern", {"head": 0, "dest": 1, "src": 2}),
    "mlp_post": ("mlp.hook_post", {"pos": 0, "neuron": 1}),
}


class PatchResult(NamedTuple):
    result: np.ndarray  # normalised metric, TransformerLens shape (axes in `axes`)
    raw: np.ndarray  # the metric itself, same shape
    clean_metric: float
    corrupt_metric: float
    axes: tuple[str, ...]
    seconds: float
    chunk_size: int


def _check_site_axes(site: str, by: Sequence[str], cfg: Config) -> tuple[str, dict[str, int]]:
    if site not in SITES:
        raise KeyError(f"unknown patching site {site!r}; valid sites: {', '.join(SITES)}")
    kind, axes = SITES[site]
    valid = ("layer", *axes)
    by = tuple(by)
    if not by or by[0] != "layer" or len(set(by)) != len(by) or any(a not in valid for a in by):
        raise KeyError(f"invalid axes {','.join(by)!r} for site {site!r}; give 'layer' first, then any of {valid[1:]}")
    if kind.startswith("mlp.") and cfg.attn_only:
        raise KeyError(f"site {site!r} needs an MLP; this model is attention-only")
    return kind, axes


def _per_patch_bytes(cfg: Config, B: int, T: int) -> int:
    """Rough live memory of one patched forward (one layer's activations, float32), with headroom."""
    per_token = 8 * cfg.d_model + 4 * (cfg.d_mlp or 0) + 3 * cfg.n_heads * T + 4 * cfg.n_heads * cfg.d_head
    return 4 * B * (T * per_token + cfg.d_vocab) * 3


def auto_chunk(cfg: Config, B: int, T: int, memory_budget: int) -> int:
    """Patches per compiled call: what fits the budget, capped on CPU where larger batches stop paying.

    A chunk's runs all start at its lowest layer, so very long chunks also recompute layers below
    the later patches' own; 64 was the fastest on a 2-core CPU for SmolLM2 (benchmarks/patching.py).
    """
    fit = memory_budget // _per_patch_bytes(cfg, B, T)
    cap = 64 if jax.default_backend() == "cpu" else 1024
    return int(max(1, min(cap, fit)))


def _answer_positions(B: int, T: int, attention_mask, answer_pos):
    if answer_pos is not None:
        return jnp.broadcast_to(jnp.asarray(answer_pos, jnp.int32), (B,))
    if attention_mask is None:
        return jnp.full((B,), T - 1, jnp.int32)
    # last real token of each row (works for left and right padding)
    return (T - 1 - jnp.argmax(jnp.asarray(attention_mask)[:, ::-1], axis=1)).astype(jnp.int32)


@eqx.filter_jit
def _score_chunk(model, tokens, mask, positions, resid, source, metric, start, rows, kind, axis_of, act_shape):
    """Metric of each patch in `rows` `[C, 1 + n_axes]` (layer, then indices), one compiled program.

    All patched runs of the chunk start at `start` (the chunk's lowest layer, an unbatched scalar,
    so lower layers are skipped at run time); each patch's own layer is a batched hook layer.
    """
    B = tokens.shape[0]
    grids = [jax.lax.broadcasted_iota(jnp.int32, act_shape, axis_of[a]) for a in range(len(axis_of))]

    def one(row):
        layer = row[0]
        hit = jnp.ones(act_shape, bool)
        for a, grid in enumerate(grids):
            hit = hit & (grid == row[1 + a])
        hook = Hook(kind, layer, Replace(source[layer], hit[None]))
        out = run(model, tokens, hooks=[hook], attention_mask=mask, start_layer=start, resid=resid[start],
                  return_logits=False)  # fmt: skip
        return metric(unembed(model, out.resid[jnp.arange(B), positions]))

    return jax.vmap(one)(rows)


@eqx.filter_jit
def _metric_of(model, tokens, mask, positions, metric):
    out = run(model, tokens, attention_mask=mask, return_logits=False)
    return metric(unembed(model, out.resid[jnp.arange(tokens.shape[0]), positions]))


def patch_sweep(
    model: Transformer,
    clean_tokens,
    corrupt_tokens,
    metric: Callable[[Array], Array],
    site: str = "resid_pre",
    by: Sequence[str] = ("layer", "pos"),
    *,
    noising: bool = False,
    attention_mask=None,
    answer_pos=None,
    chunk_size: int | None = None,
    memory_budget: int = 4 * 2**30,
    progress: bool = True,
    skip_unchanged: bool = True,
    layers: Sequence[int] | None = None,
) -> PatchResult:
    """Patch every index of `site` along `by` and score each with `metric` (normalised: clean 1, corrupt 0).

    clean_tokens, corrupt_tokens: int `[B, T]` of equal shape (a batch of prompt pairs; `[T]` for one).
    metric: function of the logits at the scored position `[B, V]` to a scalar, e.g. `LogitDiff`.
    site: one of `SITES`; by: axes, 'layer' first, e.g. `("layer", "pos", "head")`.
    attention_mask: bool `[B, T]` for padded batches (shared by both runs).
    answer_pos: position scored (default: the last real token of each row).
    chunk_size: patches per compiled call (default: from `memory_budget` bytes).
    layers: patch only these layers (the result's layer axis follows this order); default all.
    skip_unchanged: patches whose source value equals the target's (e.g. every position before the
        first token where clean and corrupt differ, in a causal model) leave the target run exactly
        as it is; they get the target metric without being run.
    """
    cfg = model.cfg
    kind, axes = _check_site_axes(site, by, cfg)
    clean, corrupt = (np.atleast_2d(np.asarray(t, np.int32)) for t in (clean_tokens, corrupt_tokens))
    if clean.shape != corrupt.shape:
        raise ValueError(
            f"clean tokens have shape {clean.shape} and corrupt tokens {corrupt.shape}; patching needs aligned "
            "prompts of equal length (pad them with Tokenizer.to_padded and pass attention_mask)"
        )
    B, T = clean.shape
    mask = None if attention_mask is None else jnp.asarray(np.atleast_2d(attention_mask), bool)
    positions = _answer_positions(B, T, mask, answer_pos)
    source_tokens, target_tokens = (corrupt, clean) if noising else (clean, corrupt)

    t0 = time.perf_counter()
    L = cfg.n_layers
    src = run(model, source_tokens, attention_mask=mask, cache=[f"blocks.{l}.{kind}" for l in range(L)])
    tgt = run(model, target_tokens, attention_mask=mask, cache=[f"blocks.{l}.hook_resid_pre" for l in range(L)])
    source = jnp.stack([src.cache[f"blocks.{l}.{kind}"] for l in range(L)])
    resid = jnp.stack([tgt.cache[f"blocks.{l}.hook_resid_pre"] for l in range(L)])
    clean_metric = float(_metric_of(model, jnp.asarray(clean), mask, positions, metric))
    corrupt_metric = float(_metric_of(model, jnp.asarray(corrupt), mask, positions, metric))

    act_shape = site_shape(Site(kind, 0), cfg, B, T)[1:]
    free = by[1:]
    sizes = [act_shape[axes[a]] for a in free]
    axis_of = tuple(axes[a] for a in free)
    chosen = np.arange(L) if layers is None else np.asarray(list(layers), np.int32)
    if chosen.size == 0 or chosen.min() < 0 or chosen.max() >= L:
        raise ValueError(f"layers {list(chosen)} out of range: the model has layers 0..{L - 1}")
    grid = np.indices((len(chosen), *sizes)).reshape(1 + len(sizes), -1).T.astype(np.int32)  # layer-major
    rows = np.concatenate([chosen[grid[:, :1]], grid[:, 1:]], axis=1)
    target_metric = corrupt_metric if not noising else clean_metric
    raw = np.full(rows.shape[0], target_metric, np.float32)
    todo = np.arange(rows.shape[0])
    if skip_unchanged:
        target_site = run(model, target_tokens, attention_mask=mask, cache=[f"blocks.{l}.{kind}" for l in range(L)])
        target_site = jnp.stack([target_site.cache[f"blocks.{l}.{kind}"] for l in range(L)])
        todo = np.flatnonzero(_changed(source, target_site, axis_of)[chosen].reshape(-1))
    chunk = chunk_size or auto_chunk(cfg, B, T, memory_budget)
    chunk = max(1, min(chunk, max(len(todo), 1)))
    n_chunks = math.ceil(len(todo) / chunk)
    bar = _progress(n_chunks, f"patching {site} by {','.join(by)}", progress)
    for c in range(n_chunks):
        ids = todo[c * chunk : (c + 1) * chunk]
        part = rows[np.concatenate([ids, np.repeat(ids[-1:], chunk - len(ids))])]
        vals = _score_chunk(model, target_tokens, mask, positions, resid, source, metric, jnp.int32(part[:, 0].min()),
                            part, kind, axis_of, act_shape)  # fmt: skip
        raw[ids] = np.asarray(vals)[: len(ids)]
        bar.update(1)
    bar.close()
    raw = raw.reshape(len(chosen), *sizes)
    if clean_metric == corrupt_metric:
        warnings.warn(f"clean and corrupt metrics are equal ({clean_metric}); the normalised result is NaN")
    with np.errstate(divide="ignore", invalid="ignore"):
        result = np.asarray(normalise(raw, clean_metric, corrupt_metric), np.float32)
    return PatchResult(
        result=result,
        raw=raw,
        clean_metric=clean_metric,
        corrupt_metric=corrupt_metric,
        axes=tuple(by),
        seconds=time.perf_counter() - t0,
        chunk_size=chunk,
    )


@jax.jit
def _changed_impl(source, target):
    return source != target


def _changed(source, target, axis_of) -> np.ndarray:
    """`[L, *indexed sizes]`: whether patching that index changes anything (any batch row, any other axis)."""
    diff = np.asarray(_changed_impl(source, target))  # [L, B, *act_shape]
    act_axes = list(range(2, diff.ndim))
    other = tuple(2 + a for a in range(diff.ndim - 2) if a not in axis_of)
    diff = diff.any(axis=(1, *other))  # [L, *act axes that are indexed, in activation order]
    kept = [a for a in range(len(act_axes)) if a in axis_of]
    return np.transpose(diff, (0, *[1 + kept.index(a) for a in axis_of]))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="chunk", disable=not enabled or total <= 1, leave=False)
