"""The scoring rows every sweep shares: a prepared clean/corrupt batch, the metric of a run, and
chunked, vmapped scoring of rows of patches.

A sweep is rows `(layer, index...)`; one jitted function scores a chunk of rows (`jax.vmap`
over them); a Python loop over *chunks* (not rows) bounds memory and drives the progress bar
(`in_chunks`). `Pairs` holds a batch of prompt pairs prepared once (tokens, scored positions, the
target run's residual stream, both metrics), placed on a mesh when one is given.
"""

from __future__ import annotations

import difflib
import functools
import math
import warnings
from typing import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from ..scale import replicate, round_to, shard_batch, shard_model, shard_rows, to_host
from ._checks import check_metric, check_tokens
from ._config import Config
from ._forward import run, unembed
from ._interventions import ALL_LAYERS, Hook, PerLayer, Replace
from ._sites import KIND, PATCH_SITES, Site, parse_site, site_shape
from ._task import Task

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
    """Scored positions: `answer_pos` (`[B]`, or `[B, n]` for several per row) or each row's last real token."""
    if answer_pos is not None:
        pos = jnp.asarray(answer_pos, jnp.int32)
        return pos if pos.ndim == 2 else jnp.broadcast_to(pos, (B,))
    if attention_mask is None:
        return jnp.full((B,), T - 1, jnp.int32)
    # last real token of each row (works for left and right padding)
    return (T - 1 - jnp.argmax(jnp.asarray(attention_mask)[:, ::-1], axis=1)).astype(jnp.int32)


def at_positions(x, positions):
    """`x [B, T, ...]` at each row's scored position(s): `[B, ...]` for positions `[B]`, `[B, n, ...]` for `[B, n]`."""
    rows = jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (positions.ndim - 1))
    return x[rows, positions]


def score_resid(model, resid, positions, metric):
    """The metric of a run: final norm and unembedding of each row's scored position(s) only
    (`positions [B]` gives the metric logits `[B, V]`, `[B, n]` gives `[B, n, V]`)."""
    return metric(unembed(model, at_positions(resid, positions)))


def source_metric(model, resid, positions, metric):
    """The metric of a source run, or NaN for zero and mean ablation, which have no run (`resid` None)."""
    return jnp.float32(jnp.nan) if resid is None else score_resid(model, resid, positions, metric)


def flat(largest_estimate: float, gap: float, largest_gradient: float) -> bool:
    """Whether a gradient estimate is flat where it was taken: the gradient is zero, or every estimate is
    below 1e-4 of the clean-corrupt gap (a metric measuring distance to the point where it is taken,
    such as KL to the clean logits in noising mode, has zero gradient there up to rounding)."""
    if largest_gradient == 0:
        return True
    return bool(np.isfinite(gap) and gap != 0 and largest_estimate <= 1e-4 * abs(gap))


def degenerate(clean_metric: float, corrupt_metric: float, what: str) -> bool:
    """Warn (and say so) when clean and corrupt give the same metric (equal up to the rounding of two
    float32 programs computing it): nothing separates them, so no patch can move the metric between them and
    every normalised number is 0/0 (or noise). Returns whether so.

    The tolerance, 1e-5 relative with a floor of 1, covers two programs (a plain run and a gradient or
    patching program) whose logits differ by a few ulps each: 1.1e-6 was measured on identical
    prompts under XLA's older CPU code generator, which a 1e-6 tolerance missed. A real gap that small
    would make the normalised numbers noise anyway."""
    if abs(clean_metric - corrupt_metric) <= 1e-5 * max(1.0, abs(clean_metric), abs(corrupt_metric)):
        warnings.warn(f"{what}: the clean and corrupt runs give the same metric ({clean_metric:.6g}): nothing to patch "
                      "between them (identical prompts, or answer = wrong?). The normalised result is NaN and the "
                      "result is marked degenerate", stacklevel=3)  # fmt: skip
        return True
    return False


def report_nonfinite(values, axes: Sequence[str], what: str) -> None:
    """Warn when a result holds NaN or Inf, naming how many and the first index where one appears."""
    values = np.asarray(values)
    bad = ~np.isfinite(values)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        at = ", ".join(f"{a}={i}" for a, i in zip(axes, first)) if len(axes) == len(first) else str(list(first))
        warnings.warn(f"{what}: {int(bad.sum())} of {values.size} values are NaN or Inf, the first at {at} "
                      f"({values[first]}); check the metric's token ids and the model's weights", stacklevel=3)  # fmt: skip


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


_EXPLICIT = ("clean_tokens", "corrupt_tokens", "metric")


def as_task(clean_or_task, corrupt=None, metric=None, *, attention_mask=None, answer_pos=None, name: str = "task") -> Task:
    """A `Task` from the explicit arguments (clean tokens, corrupt tokens or None, metric), or the task itself."""
    if isinstance(clean_or_task, Task):
        if corrupt is not None or metric is not None or attention_mask is not None or answer_pos is not None:
            raise TypeError("give a Task, or clean tokens, corrupt tokens and a metric (with attention_mask / "
                            "answer_pos), not both")  # fmt: skip
        return clean_or_task
    return Task(name, clean_or_task, corrupt, metric, attention_mask=attention_mask, answer_pos=answer_pos)


def takes_task(fn: Callable) -> Callable:
    """Let a technique `fn(model, task, *args, **kwargs)` also be called the explicit way,
    `fn(model, clean_tokens, corrupt_tokens, metric, *args, attention_mask=..., answer_pos=..., **kwargs)`
    (corrupt tokens may be None for zero and mean ablation). The explicit form builds the `Task`."""

    @functools.wraps(fn)
    def technique(model, *args, **kwargs):
        explicit = {k: kwargs.pop(k) for k in (*_EXPLICIT, "attention_mask", "answer_pos") if k in kwargs}
        if args and isinstance(args[0], Task):
            task = args[0]
            clash = [k for k, v in explicit.items() if v is not None and v is not getattr(task, k, None)]
            if clash:
                raise TypeError(f"{fn.__name__}: give a Task, or {', '.join(_EXPLICIT)} with attention_mask / answer_pos, "
                                f"not both (got {', '.join(clash)} beside a Task; the task holds its own)")  # fmt: skip
            return fn(model, *args, **kwargs)
        missing = [k for k in _EXPLICIT if k not in explicit]
        if len(args) < len(missing):
            raise TypeError(f"{fn.__name__}(model, task, ...) or {fn.__name__}(model, clean_tokens, corrupt_tokens, "
                            f"metric, ...): missing {', '.join(missing[len(args):])}")  # fmt: skip
        explicit.update(zip(missing, args))
        task = as_task(explicit["clean_tokens"], explicit["corrupt_tokens"], explicit["metric"],
                       attention_mask=explicit.get("attention_mask"), answer_pos=explicit.get("answer_pos"))  # fmt: skip
        return fn(model, task, *args[len(missing):], **kwargs)

    return technique


ABLATIONS = ("resample", "zero", "mean")
_SYNONYMS = {"patching": "resample", "corrupt": "resample"}


def check_ablation(ablation: str, task: Task, noising: bool | None = None) -> tuple[str, bool]:
    """`(ablation, noising)` checked against the task: resample needs corrupt inputs; zero and mean
    ablate the clean run (noising), so `noising=False` is refused with them. `noising=None` means
    denoising for resample (clean patched into corrupt), noising for zero and mean."""
    name = _SYNONYMS.get(ablation, ablation)
    if name not in ABLATIONS:
        close = difflib.get_close_matches(str(ablation), [*ABLATIONS, *_SYNONYMS], n=1)
        raise KeyError(f"unknown ablation {ablation!r}; valid: {', '.join(ABLATIONS)}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))  # fmt: skip
    if name == "resample":
        if task.corrupt is None:
            raise ValueError(f"ablation='resample' takes values from corrupt inputs, and task {task.name!r} has none: "
                             "give corrupt tokens, or ablation='zero' or 'mean'")  # fmt: skip
        return name, bool(noising)
    if noising is False:
        raise ValueError(f"ablation={name!r} replaces clean activations by {name} values, which is noising: there is no "
                         f"{name}-ablated run to patch clean values into; leave noising unset (or True)")  # fmt: skip
    return name, True


class Source(eqx.Module):
    """Where patched-in values come from, as a value a compiled program takes.

    `"run"`: a forward pass on `tokens` (the clean run when denoising, the corrupt one under
    resample noising); `"zero"`: zeros; `"mean"`: each site's mean over `tokens` (the task's
    reference set, or its clean batch), over the batch and over real token positions where the
    site has a position axis, broadcast to the target's shape.
    """

    kind: str = eqx.field(static=True)
    tokens: Array | None = None
    mask: Array | None = None

    def values(self, model, names: Sequence[str], shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, Array], Array | None]:
        """`({name: value shaped shapes[name]}, residual stream after the last layer or None)`."""
        if self.kind == "zero":
            dtype = model.W_E.dtype
            return {n: jnp.zeros(shapes[n], dtype) for n in names}, None
        out = run(model, self.tokens, cache=list(names), attention_mask=self.mask, return_logits=False)
        if self.kind == "run":
            return out.cache, out.resid
        cfg = model.cfg
        w = jnp.ones(self.tokens.shape, jnp.float32) if self.mask is None else jnp.asarray(self.mask, jnp.float32)
        means = {}
        for n in names:
            x = out.cache[n]
            letters = KIND[parse_site(n, cfg).kind].shape.split()
            if len(letters) > 1 and letters[1] == "T":  # batch and positions, real tokens only
                ww = w.reshape(w.shape + (1,) * (x.ndim - 2)).astype(x.dtype)
                m = jnp.sum(x * ww, axis=(0, 1), keepdims=True) / jnp.sum(ww, axis=(0, 1), keepdims=True)
            else:  # attention patterns and scores: over the batch
                m = jnp.mean(x, axis=0, keepdims=True)
            means[n] = jnp.broadcast_to(m, shapes[n])
        return means, None

    def stacks(self, model, kinds: Sequence[str], B: int, T: int) -> tuple[dict[str, Array], Array | None]:
        """`({kind: [L, B, ...] values at every layer}, source residual or None)` for per-layer kinds."""
        cfg = model.cfg
        L = cfg.n_layers
        names = [f"blocks.{l}.{k}" for k in kinds for l in range(L)]
        got, resid = self.values(model, names, {n: site_shape(parse_site(n, cfg), cfg, B, T) for n in names})
        return {k: jnp.stack([got[f"blocks.{l}.{k}"] for l in range(L)]) for k in kinds}, resid


class Pairs:
    """A task prepared once for a technique: tokens, scored positions, where patched-in values come
    from (`source`: the clean run when denoising; the corrupt run, zeros or means when noising), the
    target run's residual stream and both metrics, placed on a mesh when one is given."""

    def __init__(self, model, task: Task, *, ablation: str = "resample", noising: bool | None = None, mesh=None):
        self.ablation, noising = check_ablation(ablation, task, noising)
        self.task, self.model, self.metric, self.noising = task, model, task.metric, noising
        clean = np.atleast_2d(np.asarray(task.clean, np.int32))
        corrupt = None if task.corrupt is None else np.atleast_2d(np.asarray(task.corrupt, np.int32))
        self.B, self.T = clean.shape
        V = model.cfg.d_vocab
        for what, toks in (("clean tokens", clean), ("corrupt tokens", corrupt), ("reference tokens", task.reference)):
            if toks is not None:
                check_tokens(toks, V, f"task {task.name!r}: {what}")
        if task.attention_mask is not None and np.shape(np.atleast_2d(task.attention_mask)) != clean.shape:
            raise ValueError(f"task {task.name!r}: attention_mask has shape {np.shape(task.attention_mask)}; the tokens "
                             f"have shape {clean.shape}")  # fmt: skip
        self.mask = None if task.attention_mask is None else jnp.asarray(np.atleast_2d(task.attention_mask), bool)
        if task.answer_pos is not None:
            pos = np.asarray(task.answer_pos)
            if pos.ndim > 2 or (pos.ndim >= 1 and pos.shape[0] not in (1, self.B)) or pos.size == 0:
                raise ValueError(f"task {task.name!r}: answer_pos has shape {pos.shape}; give one position per row "
                                 f"([{self.B}]), several ([{self.B}, n]) or one for all")  # fmt: skip
            if ((pos < -self.T) | (pos >= self.T)).any():
                raise ValueError(f"task {task.name!r}: answer_pos holds {int(pos[(pos < -self.T) | (pos >= self.T)][0])}, "
                                 f"outside the {self.T} positions 0..{self.T - 1}")  # fmt: skip
        self.positions = answer_positions(self.B, self.T, self.mask, task.answer_pos)
        check_metric(task.metric, self.B, V, tuple(self.positions.shape))
        self.clean, self.corrupt = clean, corrupt
        reference = task.reference if task.reference is not None else clean
        ref_mask = task.reference_mask if task.reference is not None else task.attention_mask
        ref_mask = None if ref_mask is None else jnp.asarray(np.atleast_2d(ref_mask), bool)
        self.mesh = mesh
        if mesh is not None:  # the same programs, on placed inputs: GSPMD splits them (see _sharding)
            what = "a batch of prompts"
            self.model, self.metric = shard_model(model, mesh), replicate(self.metric, mesh)
            self.clean = shard_batch(clean, mesh, what=what)
            self.corrupt = None if corrupt is None else shard_batch(corrupt, mesh, what=what)
            self.mask = shard_batch(self.mask, mesh, what=what)
            self.positions = shard_batch(self.positions, mesh, what=what)
        if not noising:
            self.source, self.target_tokens = Source("run", jnp.asarray(self.clean), self.mask), self.corrupt
        elif self.ablation == "resample":
            self.source, self.target_tokens = Source("run", jnp.asarray(self.corrupt), self.mask), self.clean
        elif self.ablation == "zero":
            self.source, self.target_tokens = Source("zero"), self.clean
        else:
            self.source, self.target_tokens = Source("mean", jnp.asarray(reference), ref_mask), self.clean

    @property
    def source_tokens(self):
        """The source run's tokens (a resample or denoising source); None for zero and mean."""
        return self.source.tokens if self.source.kind == "run" else None

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
        """The corrupt run's metric; with zero or mean ablation, the metric with everything the technique
        ablates ablated at once (the technique sets it: there is no corrupt run)."""
        if self.corrupt is None:
            raise ValueError("this technique has not set the fully ablated metric of a zero / mean ablation")
        return float(metric_of(self.model, jnp.asarray(self.corrupt), self.mask, self.positions, self.metric))

    def shapes(self, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
        cfg = self.model.cfg
        return {n: site_shape(parse_site(n, cfg), cfg, self.B, self.T) for n in names}

    def site_stack(self, kind: str, source: bool = True) -> Array:
        """`[L, B, ...]`: the site at every layer of the source values (or of the target run)."""
        L = self.model.cfg.n_layers
        names = tuple(f"blocks.{l}.{kind}" for l in range(L))
        if source:
            got = _source_values(self.model, self.source, names, self.shapes(names))
        else:
            got = run(self.model, self.target_tokens, attention_mask=self.mask, cache=names, return_logits=False).cache
        return jnp.stack([got[n] for n in names])

    def ablated_metric(self, kinds: Sequence[str]) -> float:
        """The target run's metric with every one of `kinds` replaced by its source values at every layer
        at once (what 0 means for a sweep of those sites under zero or mean ablation)."""
        stacks = {k: self.site_stack(k) for k in kinds}
        return float(_ablated_metric(self.model, jnp.asarray(self.target_tokens), self.mask, self.positions, self.metric,
                                     stacks))  # fmt: skip

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


@eqx.filter_jit
def _source_values(model, source: Source, names, shapes):
    return source.values(model, names, shapes)[0]


@eqx.filter_jit
def _ablated_metric(model, tokens, mask, positions, metric, stacks):
    hooks = [Hook(kind, ALL_LAYERS, PerLayer(Replace(stack))) for kind, stack in stacks.items()]
    return hooked_metric(model, tokens, mask, positions, metric, hooks)


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
