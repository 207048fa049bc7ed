"""Shapley values of patched components, estimated from sampled permutations.

A *component* is one patch, `(site, layer, {axis: index})` as in `patch_set`: a head of `z`, a
whole layer's `mlp_out`, a neuron, a position of the residual stream... The value of a
coalition S is the metric of the target run with every component of S patched from the source
run (denoising, the default: clean into corrupt; noising: corrupt into clean). A component's
Shapley value is its marginal contribution `v(S + c) - v(S)` averaged over the orders in which
the components can be added; it is estimated from sampled orders (permutations), whose
marginals sum to `v(all) - v(empty)` in every permutation (efficiency holds exactly for the
estimate, not only in expectation).

How it runs: every prefix of every sampled permutation is a coalition, a boolean row over the
components; duplicate coalitions (every permutation starts empty and ends full) are scored once.
Each site of the components gets one `Hook(kind, ALL_LAYERS, PerLayer(Replace(source, mask)))`
whose mask is the union of the coalition's components at that site, built inside the program
from the coalition row; `jax.vmap` scores a chunk of coalitions in one compiled call, starting at
the lowest layer any component patches (from the target's cached residual stream).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from ..core import (
    Result,
    Task,
    takes_task,
    ALL_LAYERS,
    PATCH_SITES,
    Hook,
    Pairs,
    PerLayer,
    Replace,
    Site,
    Transformer,
    auto_chunk,
    check_chunking,
    degenerate,
    check_site_axes,
    hooked_metric,
    in_chunks,
    site_shape,
)


@dataclasses.dataclass(frozen=True, repr=False)
class ShapleyResult(Result):
    """Shapley values of the chosen components: normalised and raw means with their standard errors."""

    result: np.ndarray  # [n] mean marginal contribution / (clean_metric - corrupt_metric)
    raw: np.ndarray  # [n] mean marginal contribution, in metric units
    stderr: np.ndarray  # [n] standard error of `result` over the sampled permutations
    raw_stderr: np.ndarray  # [n] standard error of `raw`
    marginals: np.ndarray  # [n_permutations, n] each permutation's marginal contribution of each component (raw)
    permutations: np.ndarray  # [n_permutations, n] the orders used
    components: tuple  # the components, as (site, layer, {axis: index})
    n_permutations: int
    clean_metric: float
    corrupt_metric: float
    empty_metric: float  # v(no component patched): the target run, scored by the same program
    full_metric: float  # v(every component patched)
    seconds: float
    chunk_size: int
    ablation: str = "resample"
    degenerate: bool = False  # clean and corrupt give the same metric: `result` is NaN


def _components(components, site: str, cfg) -> list[tuple[str, int, dict]]:
    """Normalise to `(site, layer, {axis: index})`; a tuple of ints `(layer, *indices)` is shorthand
    for `site`, its indices naming the site's axes other than "pos" in order (patched at every
    position): `(9, 3)` with site "z" is head 3 of layer 9; `(4,)` with "mlp_out" is layer 4's MLP."""
    out = []
    for i, c in enumerate(components):
        c = tuple(c)
        if len(c) in (2, 3) and isinstance(c[0], str):
            s, layer, index = c[0], c[1], dict(c[2]) if len(c) == 3 else {}
        elif c and all(isinstance(x, (int, np.integer)) for x in c):
            if site not in PATCH_SITES:
                raise KeyError(f"unknown patching site {site!r}; valid sites: {', '.join(PATCH_SITES)}")
            names = [a for a in PATCH_SITES[site][1] if a != "pos"]
            if len(c) - 1 > len(names):
                raise ValueError(f"component {i} {c}: site {site!r} takes (layer, {', '.join(names)}) at most")
            s, layer, index = site, c[0], dict(zip(names, c[1:]))
        else:
            raise ValueError(f"component {i} {c!r}: give (site, layer, {{axis: index}}) or (layer, *indices) of `site`")
        check_site_axes(s, ("layer", *index), cfg)
        if not 0 <= int(layer) < cfg.n_layers:
            raise ValueError(f"component {i} ({s}, layer {layer}): the model has layers 0..{cfg.n_layers - 1}")
        out.append((s, int(layer), {a: int(j) for a, j in index.items()}))
    return out


def _masks(components, cfg, B: int, T: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per site kind: each of its components' mask `[n_kind, L, 1, *act]` (float 0/1; axes that no
    component can index kept at size 1, to broadcast) and the components' columns `[n_kind]`."""
    masks: dict[str, list[np.ndarray]] = {}
    cols: dict[str, list[int]] = {}
    for i, (site, layer, index) in enumerate(components):
        kind, axes = PATCH_SITES[site]
        act = site_shape(Site(kind, 0), cfg, B, T)[1:]
        indexable = set(axes.values())
        shape = tuple(n if a in indexable else 1 for a, n in enumerate(act))
        hit = np.zeros((cfg.n_layers, 1, *shape), np.float32)
        sel: list = [layer, 0] + [slice(None)] * len(shape)
        for a, j in index.items():
            if not 0 <= j < act[axes[a]]:
                raise ValueError(f"component {i} ({site}): {a}={j} out of range 0..{act[axes[a]] - 1}")
            sel[2 + axes[a]] = j
        hit[tuple(sel)] = 1.0
        masks.setdefault(kind, []).append(hit)
        cols.setdefault(kind, []).append(i)
    return {k: np.stack(v) for k, v in masks.items()}, {k: np.asarray(v, np.int32) for k, v in cols.items()}


@eqx.filter_jit
def _coalition_values(model, tokens, mask, positions, metric, start, resid, sources, masks, cols, coalitions):
    """Metric of the target run with each coalition `[C, n]` (bool) patched, one compiled program."""

    def one(coalition):
        hooks = []
        for kind, source in sources.items():
            members = coalition[cols[kind]].astype(jnp.float32)
            hit = jnp.tensordot(members, masks[kind], axes=1) > 0.5  # [L, 1, *act]: the union of its members
            hooks.append(Hook(kind, ALL_LAYERS, PerLayer(Replace(source, hit))))
        return hooked_metric(model, tokens, mask, positions, metric, hooks, start, resid)

    return jax.vmap(one)(coalitions)


@takes_task
def shapley_values(
    model: Transformer,
    task: Task,
    components: Sequence,
    *,
    site: str = "z",
    n_permutations: int = 32,
    key: Array | None = None,
    permutations=None,
    ablation: str = "resample",
    noising: bool | None = None,
    chunk_size: int | None = None,
    memory_budget: int = 4 * 2**30,
    progress: bool = True,
) -> ShapleyResult:
    """Permutation-sampled Shapley values of `components` for the patched metric.

    components: `(site, layer, {axis: index})` patches as in `patch_set` (axes left out are
        patched whole), mixed sites allowed; or `(layer, *indices)` tuples of `site` whose indices
        name its axes other than "pos": `[(9, 3), (10, 7)]` with site "z" are two heads.
    The value of a coalition S is the metric with S patched from the source run into the target
    run (denoising: clean into corrupt; `noising=True`: corrupt into clean; `ablation="zero" | "mean"`:
    zeros or means into clean, where 0 of `result` is every component ablated at once).
    n_permutations, key: how many uniformly random orders to sample, and the `jax.random` key.
    permutations: int `[P, n]`, the orders to use instead of sampling (e.g. all `n!` for an exact
        value); `n_permutations` and `key` are then ignored.
    Returns the mean marginal contribution per component (`raw`, metric units; `result` divided
    by `clean_metric - corrupt_metric`, so under denoising the results sum to the normalised
    effect of patching every component, 1 when that restores the clean metric, and under noising
    to minus the share destroyed), its standard error over the permutations (NaN for one), the
    per-permutation marginals, and `v(empty)` / `v(all)`. In every permutation the marginals sum
    to `full_metric - empty_metric` exactly (up to float rounding), hence so do the means.
    Costs one forward per distinct coalition (at most `P (n - 1) + 2`), `chunk_size` per call.
    """
    t0 = time.perf_counter()
    cfg = model.cfg
    check_chunking(chunk_size, memory_budget)
    comps = _components(components, site, cfg)
    n = len(comps)
    if n == 0:
        raise ValueError("no components given")
    if permutations is None:
        if key is None:
            raise ValueError("give `key` (a jax.random key) to sample permutations, or `permutations`")
        if n_permutations < 1:
            raise ValueError(f"n_permutations must be at least 1, got {n_permutations}")
        keys = jax.random.split(key, int(n_permutations))
        perms = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, n))(keys), np.int64)
    else:
        perms = np.atleast_2d(np.asarray(permutations, np.int64))
        if perms.ndim != 2 or perms.shape[1] != n or (np.sort(perms, axis=1) != np.arange(n)).any():
            raise ValueError(f"permutations must be rows that each order all {n} components once, "
                             f"got shape {perms.shape}")  # fmt: skip
    P = perms.shape[0]

    pairs = Pairs(model, task, ablation=ablation, noising=noising)
    metric = task.metric
    masks, cols = _masks(comps, cfg, pairs.B, pairs.T)
    sources = {kind: pairs.site_stack(kind) for kind in masks}

    # every prefix of every permutation: [P, n + 1, n], deduplicated
    ranks = np.empty_like(perms)
    np.put_along_axis(ranks, perms, np.arange(n)[None].repeat(P, 0), axis=1)  # ranks[p, c]: c's place in p
    prefixes = ranks[:, None, :] < np.arange(n + 1)[None, :, None]
    coalitions, inverse = np.unique(prefixes.reshape(-1, n), axis=0, return_inverse=True)
    inverse = inverse.reshape(P, n + 1)

    start = min(layer for _, layer, _ in comps)
    resid = pairs.resid[start]
    chunk = max(1, min(chunk_size or auto_chunk(cfg, pairs.B, pairs.T, memory_budget), len(coalitions)))

    def score(part):
        return _coalition_values(model, pairs.target_tokens, pairs.mask, pairs.positions, metric, jnp.int32(start),
                                 resid, sources, masks, cols, jnp.asarray(part))  # fmt: skip

    values = in_chunks(coalitions, chunk, score, f"Shapley values of {n} components", progress, dtype=np.float64)

    v = values[inverse]  # [P, n + 1]: v(prefix of length k) for every permutation
    marginals = np.zeros((P, n), np.float64)
    np.put_along_axis(marginals, perms, np.diff(v, axis=1), axis=1)
    raw = marginals.mean(axis=0)
    raw_stderr = marginals.std(axis=0, ddof=1) / np.sqrt(P) if P > 1 else np.full(n, np.nan)
    if pairs.ablation != "resample":  # no corrupt run: 0 is every component ablated at once
        pairs.corrupt_metric = float(v[0, -1])
    gap = pairs.clean_metric - pairs.corrupt_metric
    flag = degenerate(pairs.clean_metric, pairs.corrupt_metric, "Shapley values")
    with np.errstate(divide="ignore", invalid="ignore"):
        result, stderr = raw / gap, raw_stderr / abs(gap)
    if flag:
        result, stderr = np.full_like(raw, np.nan), np.full_like(raw, np.nan)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return ShapleyResult(
        f32(result), f32(raw), f32(stderr), f32(raw_stderr), f32(marginals), perms, tuple(comps), P,
        pairs.clean_metric, pairs.corrupt_metric, float(v[0, 0]), float(v[0, -1]), time.perf_counter() - t0, chunk,
        pairs.ablation, flag,
    )  # fmt: skip
