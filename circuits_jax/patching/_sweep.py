"""Activation and attention patching sweeps, each one compiled program.

A sweep patches one component at a time — a (layer, position, head) of `z`, a
(layer, neuron) of the MLP, a (layer, head, dest, src) entry of an attention
pattern — from a *source* run into a *target* run and scores every result.
Denoising (default): source = clean, target = corrupt. Noising: the reverse.

How it runs: the source activations of the site and the target's residual
stream are cached once for every layer. Patches are rows `(layer, index...)`
in layer-major order; one jitted function scores a chunk of rows: `jax.vmap`
over them, each a `Replace(value, one-hot mask)` hook at its own (batched)
layer, and every run of the chunk starts at the chunk's lowest layer from the
cached target residual (lower layers are skipped at run time). Layers are
traced values, so the number of compiled programs does not grow with depth; a
Python loop over *chunks* (not patches) drives it, bounds memory and shows
progress. Rows whose source value equals the target's are not run at all.

Results use TransformerLens's shapes: `[layer, pos]`, `[layer, pos, head]`,
`[layer, head]`, `[layer, head, dest, src]`, `[layer, neuron]`, ...
normalised so clean = 1 and corrupt = 0.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from typing import Callable, NamedTuple, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from ..scale import _sharding
from ..core._config import Config
from ..core._interventions import Hook, Replace
from ..core._metrics import normalise
from ..core._model import Transformer, run, unembed
from ..core._sites import Site, site_shape

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
    """A patching sweep's result in TransformerLens's shape: normalised (clean 1, corrupt 0) and raw metric."""

    result: np.ndarray  # normalised metric, TransformerLens shape (axes in `axes`)
    raw: np.ndarray  # the metric itself, same shape
    clean_metric: float
    corrupt_metric: float
    axes: tuple[str, ...]
    seconds: float
    chunk_size: int

    def __repr__(self) -> str:  # shapes and names, not array contents (see _repr.py)
        from ..core._repr import summary

        return summary(self)


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
    the later patches' own. On the 2-core development CPU, a resid_pre [layer, pos] sweep of SmolLM2
    ran fastest at 64 of the sizes tried (32, 64, 146); that is the CPU cap.
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


def _score(model, resid, positions, metric):
    """The metric of a run: final norm and unembedding of each row's scored position only."""
    return metric(unembed(model, resid[jnp.arange(resid.shape[0]), positions]))


def _hit(act_shape, axis_of, index):
    """Boolean mask over one example's activation: true where every indexed axis matches (-1: all)."""
    hit = jnp.ones(act_shape, bool)
    for a, ax in enumerate(axis_of):
        grid = jax.lax.broadcasted_iota(jnp.int32, act_shape, ax)
        hit = hit & ((index[a] < 0) | (grid == index[a]))
    return hit


@eqx.filter_jit
def _score_chunk(model, tokens, mask, positions, resid, source, metric, start, rows, kind, axis_of, act_shape):
    """Metric of each patch in `rows` `[C, 1 + n_axes]` (layer, then indices), one compiled program.

    All patched runs of the chunk start at `start` (the chunk's lowest layer, an unbatched scalar,
    so lower layers are skipped at run time); each patch's own layer is a batched hook layer.
    """

    def one(row):
        layer = row[0]
        hook = Hook(kind, layer, Replace(source[layer], _hit(act_shape, axis_of, row[1:])[None]))
        return _hooked_metric(model, tokens, mask, positions, metric, [hook], start, resid[start])

    return jax.vmap(one)(rows)


@eqx.filter_jit
def _rows_changed(source, target, rows, axis_of, act_shape):
    """Whether each patch would change the target run at all (source differs somewhere under its mask)."""
    diff = jnp.any(source != target, axis=1)  # [L, *act_shape], over the batch

    def one(row):
        return jnp.any(diff[row[0]] & _hit(act_shape, axis_of, row[1:]))

    # batched, not one vmap over all rows: each row's mask is activation-sized
    return jax.lax.map(one, rows, batch_size=256)


def _hooked_metric(model, tokens, mask, positions, metric, hooks=(), start=0, resid=None):
    """The metric of one run with `hooks`, from layer `start` (entering it with `resid`) to the scored positions."""
    out = run(model, tokens, hooks=list(hooks), attention_mask=mask, start_layer=start, resid=resid, return_logits=False)
    return _score(model, out.resid, positions, metric)


@eqx.filter_jit
def _metric_of(model, tokens, mask, positions, metric):
    return _hooked_metric(model, tokens, mask, positions, metric)


class _Pairs:
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
        self.positions = _answer_positions(self.B, self.T, self.mask, answer_pos)
        self.clean, self.corrupt = clean, corrupt
        self.mesh = mesh
        if mesh is not None:  # the same programs, on placed inputs: GSPMD splits them (see _sharding)
            self.model, self.metric = _sharding.shard_model(model, mesh), _sharding.replicate(metric, mesh)
            self.clean, self.corrupt = (_sharding.shard_batch(t, mesh, what="a batch of prompts") for t in (clean, corrupt))
            self.mask = _sharding.shard_batch(self.mask, mesh, what="a batch of prompts")
            self.positions = _sharding.shard_batch(self.positions, mesh, what="a batch of prompts")
        self.source_tokens, self.target_tokens = (self.corrupt, self.clean) if noising else (self.clean, self.corrupt)

    def chunk(self, chunk: int) -> int:
        """A chunk size every device of the mesh's `sweep` axis gets an equal share of."""
        return _sharding.round_to(chunk, self.mesh)

    def rows(self, part):
        """A chunk of sweep rows, split over the mesh's `sweep` axis (as given without a mesh)."""
        return part if self.mesh is None else _sharding.shard_rows(part, self.mesh)

    # Computed on first use (an estimator that gets them from its own passes assigns them instead).
    @functools.cached_property
    def resid(self) -> Array:
        """`[L, B, T, D]`: the target run's residual stream entering every layer."""
        return self.site_stack("hook_resid_pre", source=False)

    @functools.cached_property
    def clean_metric(self) -> float:
        return float(_metric_of(self.model, jnp.asarray(self.clean), self.mask, self.positions, self.metric))

    @functools.cached_property
    def corrupt_metric(self) -> float:
        return float(_metric_of(self.model, jnp.asarray(self.corrupt), self.mask, self.positions, self.metric))

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
            changed = _rows_changed(source, self.site_stack(kind, source=False), jnp.asarray(rows), axis_of, act_shape)
            todo = np.flatnonzero(np.asarray(changed))
        chunk = self.chunk(max(1, min(chunk, max(len(todo), 1))))

        def score(part):
            return _score_chunk(self.model, self.target_tokens, self.mask, self.positions, self.resid, source,
                                self.metric, jnp.int32(part[:, 0].min()), self.rows(part), kind, axis_of, act_shape)  # fmt: skip

        raw[todo] = in_chunks(rows, chunk, score, desc, progress, order=todo)[todo]
        return raw, chunk

    def result(self, raw, axes, t0, chunk) -> PatchResult:
        if self.clean_metric == self.corrupt_metric:
            warnings.warn(f"clean and corrupt metrics are equal ({self.clean_metric}); the normalised result is NaN")
        with np.errstate(divide="ignore", invalid="ignore"):
            result = np.asarray(normalise(raw, self.clean_metric, self.corrupt_metric), np.float32)
        return PatchResult(result, raw, self.clean_metric, self.corrupt_metric, tuple(axes), time.perf_counter() - t0, chunk)


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
    mesh=None,
) -> PatchResult:
    """Patch every index of `site` along `by` and score each with `metric` (normalised: clean 1, corrupt 0).

    clean_tokens, corrupt_tokens: int `[B, T]` of equal shape (a batch of prompt pairs; `[T]` for one).
    metric: function of the logits at the scored position `[B, V]` to a scalar, e.g. `LogitDiff`.
    site: one of `SITES`; by: axes, 'layer' first, e.g. `("layer", "pos", "head")`.
    attention_mask: bool `[B, T]` for padded batches (shared by both runs).
    answer_pos: position scored (default: the last real token of each row).
    chunk_size: patches per compiled call (default: from `memory_budget` bytes by a rough formula;
        "plan": `plan_sweep`, measured from the compiled program, raising `DoesNotFit` up front).
    layers: patch only these layers (the result's layer axis follows this order); default all.
    skip_unchanged: patches whose source value equals the target's (e.g. every position before the
        first token where clean and corrupt differ, in a causal model) leave the target run exactly
        as it is; they get the target metric without being run.
    mesh: a `make_mesh` mesh: patches split over its `sweep` axis (a chunk is rounded up to a
        multiple of it), prompts over `data`, weights over `model`; the result equals the
        single-device one. Every sweep and attribution function takes it.
    """
    t0 = time.perf_counter()
    cfg = model.cfg
    kind, axes = _check_site_axes(site, by, cfg)
    L = cfg.n_layers
    chosen = np.arange(L) if layers is None else np.asarray(list(layers), np.int32)
    if chosen.size == 0 or chosen.min() < 0 or chosen.max() >= L:
        raise ValueError(f"layers {list(chosen)} out of range: the model has layers 0..{L - 1}")
    pairs = _Pairs(model, clean_tokens, corrupt_tokens, metric, noising, attention_mask, answer_pos, mesh)
    act_shape = site_shape(Site(kind, 0), cfg, pairs.B, pairs.T)[1:]
    free = by[1:]
    sizes = [act_shape[axes[a]] for a in free]
    grid = np.indices((len(chosen), *sizes)).reshape(1 + len(sizes), -1).T.astype(np.int32)  # layer-major
    rows = np.concatenate([chosen[grid[:, :1]], grid[:, 1:]], axis=1)
    if chunk_size == "plan":  # measured: the compiled chunk program's memory, on abstract inputs
        from ..scale._memory import plan_sweep

        plan = plan_sweep(model, pairs.clean, site, by, metric=metric, attention_mask=attention_mask, budget=memory_budget)
        if progress:
            print(f"memory plan: {plan}", flush=True)
        chunk_size = plan.size
    chunk = chunk_size or auto_chunk(cfg, pairs.B, pairs.T, memory_budget)
    raw, chunk = pairs.score(kind, tuple(axes[a] for a in free), rows, chunk=chunk, skip_unchanged=skip_unchanged,
                             progress=progress, desc=f"patching {site} by {','.join(by)}")  # fmt: skip
    return pairs.result(raw.reshape(len(chosen), *sizes), by, t0, chunk)


def patch_set(
    model: Transformer,
    clean_tokens,
    corrupt_tokens,
    metric: Callable[[Array], Array],
    patches: Sequence[tuple[str, int, dict]],
    *,
    noising: bool = False,
    attention_mask=None,
    answer_pos=None,
    chunk_size: int | None = None,
    memory_budget: int = 4 * 2**30,
    progress: bool = True,
    skip_unchanged: bool = True,
    mesh=None,
) -> PatchResult:
    """Score an arbitrary list of single patches `(site, layer, {axis: index})`; result `[n_patches]`.

    Axes left out of the dict are patched whole: `("z", 9, {"head": 3})` patches head 3 at every
    position, `("resid_pre", 4, {})` the whole residual stream. Patches of one site share a compiled
    program; results come back in the order given.
    """
    t0 = time.perf_counter()
    cfg = model.cfg
    pairs = _Pairs(model, clean_tokens, corrupt_tokens, metric, noising, attention_mask, answer_pos, mesh)
    chunk = pairs.chunk(chunk_size or auto_chunk(cfg, pairs.B, pairs.T, memory_budget))
    raw = np.zeros(len(patches), np.float32)
    groups: dict[str, list[int]] = {}
    for i, (site, layer, index) in enumerate(patches):
        kind, axes = _check_site_axes(site, ("layer", *index), cfg)
        if not 0 <= int(layer) < cfg.n_layers:
            raise ValueError(f"patch {i} ({site}, layer {layer}): the model has layers 0..{cfg.n_layers - 1}")
        groups.setdefault(site, []).append(i)
    for site, ids in groups.items():
        kind, axes = SITES[site]
        names = list(axes)
        act_shape = site_shape(Site(kind, 0), cfg, pairs.B, pairs.T)[1:]
        rows = np.full((len(ids), 1 + len(names)), -1, np.int32)
        for r, i in enumerate(ids):
            _, layer, index = patches[i]
            rows[r, 0] = layer
            for a, j in index.items():
                if not 0 <= int(j) < act_shape[axes[a]]:
                    raise ValueError(f"patch {i} ({site}): {a}={j} out of range 0..{act_shape[axes[a]] - 1}")
                rows[r, 1 + names.index(a)] = j
        order = np.argsort(rows[:, 0], kind="stable")  # layer-major, so chunks start as late as they can
        got, _ = pairs.score(kind, tuple(axes[a] for a in names), rows[order], chunk=chunk,
                             skip_unchanged=skip_unchanged, progress=progress, desc=f"patching {site}")  # fmt: skip
        raw[np.asarray(ids)[order]] = got
    return pairs.result(raw, ("patch",), t0, chunk)


def _every(model, clean_tokens, corrupt_tokens, metric, sweeps, **kwargs):
    t0 = time.perf_counter()
    parts = [patch_sweep(model, clean_tokens, corrupt_tokens, metric, site, by, **kwargs) for site, by in sweeps]
    first = parts[0]
    result = np.stack([_to_query_heads(model.cfg, p.result) for p in parts])
    raw = np.stack([_to_query_heads(model.cfg, p.raw) for p in parts])
    return PatchResult(result, raw, first.clean_metric, first.corrupt_metric, ("site", *first.axes),
                       time.perf_counter() - t0, first.chunk_size)  # fmt: skip


def _to_query_heads(cfg: Config, a: np.ndarray) -> np.ndarray:
    """k/v results per kv head, repeated for the query heads each serves (grouped-query attention)."""
    if a.ndim == 2 and a.shape[1] == cfg.kv_heads and cfg.kv_heads != cfg.n_heads:
        return np.repeat(a, cfg.group_size, axis=1)
    return a


def patch_every_head(model, clean_tokens, corrupt_tokens, metric, **kwargs) -> PatchResult:
    """`[5, layer, head]`: z, q, k, v and pattern of each head, patched at all positions.

    Under grouped-query attention, k and v belong to kv heads; their rows repeat each kv head's
    result for the query heads it serves.
    """
    sweeps = [(s, ("layer", "head")) for s in ("z", "q", "k", "v", "pattern")]
    return _every(model, clean_tokens, corrupt_tokens, metric, sweeps, **kwargs)


def patch_every_block(model, clean_tokens, corrupt_tokens, metric, **kwargs) -> PatchResult:
    """`[3, layer, pos]`: resid_pre, attn_out and mlp_out patched at each (layer, position)."""
    sweeps = [(s, ("layer", "pos")) for s in ("resid_pre", "attn_out", "mlp_out")]
    return _every(model, clean_tokens, corrupt_tokens, metric, sweeps, **kwargs)


def in_chunks(rows: np.ndarray, chunk: int, score: Callable, desc: str, progress: bool, order=None,
              dtype=np.float32) -> np.ndarray:  # fmt: skip
    """`score(part)` over chunks of `chunk` rows taken in `order` (default: as given); the last chunk is
    padded by repeating its final row, so one compiled program serves every chunk. Returns the values
    in the rows' own order (rows left out of `order` stay 0). The Python loop runs over chunks, not
    rows, and drives the progress bar."""
    order = np.arange(len(rows)) if order is None else np.asarray(order)
    out = np.zeros(len(rows), dtype)
    n_chunks = math.ceil(len(order) / chunk)
    bar = _progress(n_chunks, desc, progress)
    for c in range(n_chunks):
        ids = order[c * chunk : (c + 1) * chunk]
        part = rows[np.concatenate([ids, np.repeat(ids[-1:], chunk - len(ids))])]
        out[ids] = _sharding.to_host(score(part))[: len(ids)]
        bar.update(1)
    bar.close()
    return out


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="chunk", disable=not enabled or total <= 1, leave=False)
