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

import dataclasses
import time
from typing import Sequence

import numpy as np

from ..core import (
    PATCH_SITES,
    Config,
    Pairs,
    Result,
    Site,
    Task,
    Transformer,
    auto_chunk,
    check_chunking,
    check_site_axes,
    degenerate,
    report_nonfinite,
    normalise,
    site_shape,
    takes_task,
)


@dataclasses.dataclass(frozen=True, repr=False)
class PatchResult(Result):
    """A patching sweep's result in TransformerLens's shape: normalised (clean 1, corrupt 0) and raw metric.

    Under zero or mean ablation there is no corrupt run: `corrupt_metric` is then the metric with
    every patch of the sweep applied at once (the site ablated at every layer), which is what 0 means."""

    result: np.ndarray  # normalised metric, TransformerLens shape (axes in `axes`)
    raw: np.ndarray  # the metric itself, same shape
    clean_metric: float
    corrupt_metric: float
    axes: tuple[str, ...]
    seconds: float
    chunk_size: int
    ablation: str = "resample"
    noising: bool = False
    degenerate: bool = False  # clean and corrupt give the same metric: `result` is NaN, nothing was measured


def patch_result(pairs: Pairs, raw, axes, t0, chunk) -> PatchResult:
    """A sweep's raw metrics as a `PatchResult`, normalised by the pair's clean and corrupt metrics;
    warns about (and marks) a degenerate task and NaN / Inf values."""
    flag = degenerate(pairs.clean_metric, pairs.corrupt_metric, "patching")
    report_nonfinite(raw, axes, "patching")
    with np.errstate(divide="ignore", invalid="ignore"):
        result = np.asarray(normalise(raw, pairs.clean_metric, pairs.corrupt_metric), np.float32)
    if flag:  # 0/0, or rounding noise over a vanishing gap: not a measurement
        result = np.full_like(result, np.nan)
    return PatchResult(result, raw, pairs.clean_metric, pairs.corrupt_metric, tuple(axes), time.perf_counter() - t0, chunk,
                       pairs.ablation, pairs.noising, flag)  # fmt: skip


def prepare(model: Transformer, task: Task, *, ablation: str, noising: bool | None, mesh, kinds: Sequence[str] = ()) -> Pairs:
    """`Pairs` for a sweep over `kinds`; under zero or mean ablation its `corrupt_metric` is the metric
    with those kinds ablated at every layer at once."""
    pairs = Pairs(model, task, ablation=ablation, noising=noising, mesh=mesh)
    if pairs.ablation != "resample" and kinds:
        pairs.corrupt_metric = pairs.ablated_metric(kinds)
    return pairs


@takes_task
def patch_sweep(
    model: Transformer,
    task: Task,
    site: str = "resid_pre",
    by: Sequence[str] = ("layer", "pos"),
    *,
    ablation: str = "resample",
    noising: bool | None = None,
    chunk_size: int | None = None,
    memory_budget: int = 4 * 2**30,
    progress: bool = True,
    skip_unchanged: bool = True,
    layers: Sequence[int] | None = None,
    mesh=None,
) -> PatchResult:
    """Patch every index of `site` along `by` and score each with the task's metric (normalised: clean 1, corrupt 0).

    task: a `Task` (clean and corrupt tokens `[B, T]` of equal shape, the metric, scored positions,
        attention mask), or, the explicit way, `clean_tokens, corrupt_tokens, metric` with the
        keywords `attention_mask` (bool `[B, T]` for padded batches, shared by both runs) and
        `answer_pos` (the scored position; default: the last real token of each row).
    site: one of `PATCH_SITES`; by: axes, 'layer' first, e.g. `("layer", "pos", "head")`.
    ablation: where patched-in values come from. "resample" (default): denoising, clean values
        patched into the corrupt run, or with `noising=True` corrupt values into the clean run;
        "zero" / "mean" (over `task.reference`, else the clean batch): noising the clean run with
        zeros / means (no corrupt inputs needed; 0 is then the site ablated at every layer at once).
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
    check_chunking(chunk_size, memory_budget)
    kind, axes = check_site_axes(site, by, cfg)
    L = cfg.n_layers
    chosen = np.arange(L) if layers is None else np.asarray(list(layers), np.int32)
    if chosen.size == 0 or chosen.min() < 0 or chosen.max() >= L:
        raise ValueError(f"layers {list(chosen)} out of range: the model has layers 0..{L - 1}")
    pairs = prepare(model, task, ablation=ablation, noising=noising, mesh=mesh, kinds=(kind,))
    act_shape = site_shape(Site(kind, 0), cfg, pairs.B, pairs.T)[1:]
    free = by[1:]
    sizes = [act_shape[axes[a]] for a in free]
    grid = np.indices((len(chosen), *sizes)).reshape(1 + len(sizes), -1).T.astype(np.int32)  # layer-major
    rows = np.concatenate([chosen[grid[:, :1]], grid[:, 1:]], axis=1)
    if chunk_size == "plan":  # measured: the compiled chunk program's memory, on abstract inputs
        from ._plan import plan_sweep

        plan = plan_sweep(model, pairs.clean, site, by, metric=task.metric, attention_mask=task.attention_mask,
                          budget=memory_budget)  # fmt: skip
        if progress:
            print(f"memory plan: {plan}", flush=True)
        chunk_size = plan.size
    chunk = chunk_size or auto_chunk(cfg, pairs.B, pairs.T, memory_budget)
    raw, chunk = pairs.score(kind, tuple(axes[a] for a in free), rows, chunk=chunk, skip_unchanged=skip_unchanged,
                             progress=progress, desc=f"patching {site} by {','.join(by)}")  # fmt: skip
    return patch_result(pairs, raw.reshape(len(chosen), *sizes), by, t0, chunk)


@takes_task
def patch_set(
    model: Transformer,
    task: Task,
    patches: Sequence[tuple[str, int, dict]],
    *,
    ablation: str = "resample",
    noising: bool | None = None,
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
    check_chunking(chunk_size, memory_budget)
    kinds = sorted({PATCH_SITES[s][0] for s, _, _ in patches if s in PATCH_SITES})
    pairs = prepare(model, task, ablation=ablation, noising=noising, mesh=mesh, kinds=kinds)
    chunk = pairs.chunk(chunk_size or auto_chunk(cfg, pairs.B, pairs.T, memory_budget))
    raw = np.zeros(len(patches), np.float32)
    groups: dict[str, list[int]] = {}
    for i, (site, layer, index) in enumerate(patches):
        kind, axes = check_site_axes(site, ("layer", *index), cfg)
        if not 0 <= int(layer) < cfg.n_layers:
            raise ValueError(f"patch {i} ({site}, layer {layer}): the model has layers 0..{cfg.n_layers - 1}")
        groups.setdefault(site, []).append(i)
    for site, ids in groups.items():
        kind, axes = PATCH_SITES[site]
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
    return patch_result(pairs, raw, ("patch",), t0, chunk)


def _every(model, task, sweeps, **kwargs):
    t0 = time.perf_counter()
    parts = [patch_sweep(model, task, site, by, **kwargs) for site, by in sweeps]
    first = parts[0]
    result = np.stack([_to_query_heads(model.cfg, p.result) for p in parts])
    raw = np.stack([_to_query_heads(model.cfg, p.raw) for p in parts])
    return PatchResult(result, raw, first.clean_metric, first.corrupt_metric, ("site", *first.axes),
                       time.perf_counter() - t0, first.chunk_size, first.ablation, first.noising, first.degenerate)  # fmt: skip


def _to_query_heads(cfg: Config, a: np.ndarray) -> np.ndarray:
    """k/v results per kv head, repeated for the query heads each serves (grouped-query attention)."""
    if a.ndim == 2 and a.shape[1] == cfg.kv_heads and cfg.kv_heads != cfg.n_heads:
        return np.repeat(a, cfg.group_size, axis=1)
    return a


@takes_task
def patch_every_head(model: Transformer, task: Task, **kwargs) -> PatchResult:
    """`[5, layer, head]`: z, q, k, v and pattern of each head, patched at all positions.

    Under grouped-query attention, k and v belong to kv heads; their rows repeat each kv head's
    result for the query heads it serves.
    """
    sweeps = [(s, ("layer", "head")) for s in ("z", "q", "k", "v", "pattern")]
    return _every(model, task, sweeps, **kwargs)


@takes_task
def patch_every_block(model: Transformer, task: Task, **kwargs) -> PatchResult:
    """`[3, layer, pos]`: resid_pre, attn_out and mlp_out patched at each (layer, position)."""
    sweeps = [(s, ("layer", "pos")) for s in ("resid_pre", "attn_out", "mlp_out")]
    return _every(model, task, sweeps, **kwargs)


