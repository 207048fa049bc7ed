"""The scoring rows every sweep shares: a prepared clean/corrupt batch, the metric of a run, and
chunked, vmapped scoring of rows of patches.

A sweep is rows `(layer, index...)`; one jitted function scores a chunk of rows (`jax.vmap`
over them); a Python loop over *chunks* (not rows) bounds memory and drives the progress bar
(`in_chunks`). `Pairs` holds a batch of prompt pairs prepared once (tokens, scored positions, the
target run's residual stream, both metrics), placed on a mesh when one is given.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from ..scale import replicate, round_to, shard_batch, shard_model, shard_rows, to_host
from ._config import Config
from ._forward import run, unembed
from ._interventions import Hook, Replace
from ._sites import PATCH_SITES, Site, site_shape

IG_BATCH = 8  # integration-gradient steps vmapped together: one batched pass instead of eight small sequential ones


def check_site_axes(site: str, by: Sequence[str], cfg: Config) -> tuple[str, dict[str, int]]:
    """The site kind and its sweepable axes; a KeyError names the valid sites or axes."""
    if site not in PATCH_SITES:
        raise KeyError(f"unknown patching site {site!r}; valid sites: {', '.join(PATCH_SITES)}")
    kind, axes = PATCH_SITES[site]
    valid = ("layer", *axes)
    by = tuple(by)
    if not by or by[0] != "layer" or len(set(by)) != len(by) or any(a not in valid for a in by):
        raise KeyError(f"invalid axes {','.join(by)!r} for site {site!r}; give 'layer' first, then any of {valid[1:]}")
    if kind.startswith("mlp.") and cfg.attn_only:
        raise KeyError(f"site {site!r} needs an MLP; this model is attention-only")
    return kind, axes


def per_patch_bytes(cfg: Config, B: int, T: int) -> int:
    """Rough live memory of one patched forward (one layer's activations, float32), with headroom."""
    per_token = 8 * cfg.d_model + 4 * (cfg.d_mlp or 0) + 3 * cfg.n_heads * T + 4 * cfg.n_heads * cfg.d_head
    return 4 * B * (T * per_token + cfg.d_vocab) * 3


def auto_chunk(cfg: Config, B: int, T: int, memory_budget: int) -> int:
    """Patches per compiled call: what fits the budget, capped on CPU where larger batches stop paying.

    A chunk's runs all start at its lowest layer, so very long chunks also recompute layers below
    the later patches' own. On the 2-core development CPU, a resid_pre [layer, pos] sweep of SmolLM2
    ran fastest at 64 of the sizes tried (32, 64, 146); that is the CPU cap.
    """
    fit = memory_budget // per_patch_bytes(cfg, B, T)
    cap = 64 if jax.default_backend() == "cpu" else 1024
    return int(max(1, min(cap, fit)))


def answer_positions(B: int, T: int, attention_mask, answer_pos):
    if answer_pos is not None:
        return jnp.broadcast_to(jnp.asarray(answer_pos, jnp.int32), (B,))
    if attention_mask is None:
        return jnp.full((B,), T - 1, jnp.int32)
    # last real token of each row (works for left and right padding)
    return (T - 1 - jnp.argmax(jnp.asarray(attention_mask)[:, ::-1], axis=1)).astype(jnp.int32)


def score_resid(model, resid, positions, metric):
    """The metric of a run: final norm and unembedding of each row's scored position only."""
    return metric(unembed(model, resid[jnp.arange(resid.shape[0]), positions]))


def hit_mask(act_shape, axis_of, index):
    """Boolean mask over one example's activation: true where every indexed axis matches (-1: all)."""
    hit = jnp.ones(act_shape, bool)
    for a, ax in enumerate(axis_of):
        grid = jax.lax.broadcasted_iota(jnp.int32, act_shape, ax)
        hit = hit & ((index[a] < 0) | (grid == index[a]))
    return hit


@eqx.filter_jit
def score_chunk(model, tokens, mask, positions, resid, source, metric, start, rows, kind, axis_of, act_shape):
    """Metric of each patch in `rows` `[C, 1 + n_axes]` (layer, then indices), one compiled program.

    All patched runs of the chunk start at `start` (the chunk's lowest layer, an unbatched scalar,
    so lower layers are skipped at run time); each patch's own layer is a batched hook layer.
    """

    def one(row):
        layer = row[0]
        hook = Hook(kind, layer, Replace(source[layer], hit_mask(act_shape, axis_of, row[1:])[None]))
        return hooked_metric(model, tokens, mask, positions, metric, [hook], start, resid[start])

    return jax.vmap(one)(rows)


@eqx.filter_jit
def rows_changed(source, target, rows, axis_of, act_shape):
    """Whether each patch would change the target run at all (source differs somewhere under its mask)."""
    diff = jnp.any(source != target, axis=1)  # [L, *act_shape], over the batch

    def one(row):
        return jnp.any(diff[row[0]] & hit_mask(act_shape, axis_of, row[1:]))

    # batched, not one vmap over all rows: each row's mask is activation-sized
    return jax.lax.map(one, rows, batch_size=256)


def hooked_metric(model, tokens, mask, positions, metric, hooks=(), start=0, resid=None):
    """The metric of one run with `hooks`, from layer `start` (entering it with `resid`) to the scored positions."""
    out = run(model, tokens, hooks=list(hooks), attention_mask=mask, start_layer=start, resid=resid, return_logits=False)
    return score_resid(model, out.resid, positions, metric)


@eqx.filter_jit
def metric_of(model, tokens, mask, positions, metric):
    return hooked_metric(model, tokens, mask, positions, metric)


class Pairs:
    """A clean/corrupt batch prepared once: tokens, scored positions, metrics and the target residuals."""

    def __init__(self, model, clean_tokens, corrupt_tokens, metric, noising, attention_mask, answer_pos, mesh=None):
        clean, corrupt = (np.atleast_2d(np.asarray(t, np.int32)) for t in (clean_tokens, corrupt_tokens))
        if clean.shape != corrupt.shape:
            raise ValueError(
                f"clean tokens have shape {clean.shape} and corrupt tokens {corrupt.shape}; patching needs aligned "
                "prompts of equal length (pad them with Tokenizer.to_padded and pass attention_mask)"
            )
        self.model, self.metric, self.noising = model, metric, noising
        self.B, self.T = clean.shape
        self.mask = None if attention_mask is None else jnp.asarray(np.atleast_2d(attention_mask), bool)
        self.positions = answer_positions(self.B, self.T, self.mask, answer_pos)
        self.clean, self.corrupt = clean, corrupt
        self.mesh = mesh
        if mesh is not None:  # the same programs, on placed inputs: GSPMD splits them (see _sharding)
            self.model, self.metric = shard_model(model, mesh), replicate(metric, mesh)
            self.clean, self.corrupt = (shard_batch(t, mesh, what="a batch of prompts") for t in (clean, corrupt))
            self.mask = shard_batch(self.mask, mesh, what="a batch of prompts")
            self.positions = shard_batch(self.positions, mesh, what="a batch of prompts")
        self.source_tokens, self.target_tokens = (self.corrupt, self.clean) if noising else (self.clean, self.corrupt)

    def chunk(self, chunk: int) -> int:
        """A chunk size every device of the mesh's `sweep` axis gets an equal share of."""
        return round_to(chunk, self.mesh)

    def rows(self, part):
        """A chunk of sweep rows, split over the mesh's `sweep` axis (as given without a mesh)."""
        return part if self.mesh is None else shard_rows(part, self.mesh)

    # Computed on first use (an estimator that gets them from its own passes assigns them instead).
    @functools.cached_property
    def resid(self) -> Array:
        """`[L, B, T, D]`: the target run's residual stream entering every layer."""
        return self.site_stack("hook_resid_pre", source=False)

    @functools.cached_property
    def clean_metric(self) -> float:
        return float(metric_of(self.model, jnp.asarray(self.clean), self.mask, self.positions, self.metric))

    @functools.cached_property
    def corrupt_metric(self) -> float:
        return float(metric_of(self.model, jnp.asarray(self.corrupt), self.mask, self.positions, self.metric))

    def site_stack(self, kind: str, source: bool = True) -> Array:
        """`[L, B, ...]`: the site at every layer of the source (or target) run."""
        L = self.model.cfg.n_layers
        tokens = self.source_tokens if source else self.target_tokens
        out = run(self.model, tokens, attention_mask=self.mask, cache=[f"blocks.{l}.{kind}" for l in range(L)])
        return jnp.stack([out.cache[f"blocks.{l}.{kind}"] for l in range(L)])

    def score(self, kind, axis_of, rows, *, chunk, skip_unchanged, progress, desc) -> tuple[np.ndarray, int]:
        """Raw metric of every patch row `[layer, index...]` (index -1: the whole axis), and the chunk used."""
        act_shape = site_shape(Site(kind, 0), self.model.cfg, self.B, self.T)[1:]
        source = self.site_stack(kind)
        target_metric = self.clean_metric if self.noising else self.corrupt_metric
        raw = np.full(rows.shape[0], target_metric, np.float32)
        todo = np.arange(rows.shape[0])
        if skip_unchanged and len(rows):
            changed = rows_changed(source, self.site_stack(kind, source=False), jnp.asarray(rows), axis_of, act_shape)
            todo = np.flatnonzero(np.asarray(changed))
        chunk = self.chunk(max(1, min(chunk, max(len(todo), 1))))

        def score(part):
            return score_chunk(self.model, self.target_tokens, self.mask, self.positions, self.resid, source,
                                self.metric, jnp.int32(part[:, 0].min()), self.rows(part), kind, axis_of, act_shape)  # fmt: skip

        raw[todo] = in_chunks(rows, chunk, score, desc, progress, order=todo)[todo]
        return raw, chunk


def in_chunks(rows: np.ndarray, chunk: int, score: Callable, desc: str, progress: bool, order=None,
              dtype=np.float32) -> np.ndarray:  # fmt: skip
    """`score(part)` over chunks of `chunk` rows taken in `order` (default: as given); the last chunk is
    padded by repeating its final row, so one compiled program serves every chunk. Returns the values
    in the rows' own order (rows left out of `order` stay 0). The Python loop runs over chunks, not
    rows, and drives the progress bar."""
    order = np.arange(len(rows)) if order is None else np.asarray(order)
    out = np.zeros(len(rows), dtype)
    n_chunks = math.ceil(len(order) / chunk)
    bar = progress_bar(n_chunks, desc, progress)
    for c in range(n_chunks):
        ids = order[c * chunk : (c + 1) * chunk]
        part = rows[np.concatenate([ids, np.repeat(ids[-1:], chunk - len(ids))])]
        out[ids] = to_host(score(part))[: len(ids)]
        bar.update(1)
    bar.close()
    return out


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="chunk", disable=not enabled or total <= 1, leave=False)
