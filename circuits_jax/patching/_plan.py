"""Memory plans for patching sweeps: the chunk size, measured by compiling the chunk program.

`scale`'s planner compiles the very program (`core.score_chunk`) on abstract inputs at two sizes,
fits a line, and verifies its proposal with a compile at that size (see `scale/_memory.py`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..core import LogitDiff, Site, auto_chunk, check_site_axes, score_chunk, site_shape
from ..scale import (
    DoesNotFit,
    MemoryPlan,
    check_budget,
    check_sizes,
    compiled_footprint,
    fit_line,
    fmt_bytes,
    largest_fitting,
    line_near,
    nbytes,
    need_at_one,
    search_size,
    upto,
)


def plan_sweep(
    model,
    clean_tokens,
    site: str = "resid_pre",
    by: Sequence[str] = ("layer", "pos"),
    *,
    metric=None,
    attention_mask=None,
    budget: int | None = None,
    safety: float = 0.8,
    max_chunk: int | None = None,
    sizes: Sequence[int] = (2, 8),
) -> MemoryPlan:
    """The chunk size (patches per compiled call) of `patch_sweep(model, clean, corrupt, metric, site, by)`.

    clean_tokens: int `[B, T]` or `[T]` (only the shape is used); metric: the sweep's metric
        (default: a `LogitDiff` on dummy ids; a metric's own memory is negligible).
    attention_mask: pass one (any `[B, T]` bool) if the sweep will.
    budget: bytes of the device (default `device_memory()`); the plan uses `safety * budget`.
    max_chunk: cap (default: `auto_chunk`'s, 64 on CPU and 1024 elsewhere); also capped at the
        sweep's number of patches.
    sizes: the two chunk sizes compiled first, to fit the line that proposes a size; the proposal
        is then compiled itself, and lowered until its compile fits.
    Raises `DoesNotFit` when one patch per call does not fit.
    """
    cfg = model.cfg
    kind, axes = check_site_axes(site, by, cfg)
    shape = np.shape(clean_tokens)
    if len(shape) == 1:
        shape = (1, *shape)
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"clean_tokens must be [B, T] or [T] token ids, got shape {np.shape(clean_tokens)}")
    B, T = (int(s) for s in shape)
    if attention_mask is not None and np.shape(attention_mask) != (B, T):
        raise ValueError(f"attention_mask has shape {np.shape(attention_mask)}, the tokens {(B, T)}")
    budget = check_budget(budget, safety)
    usable = safety * budget
    sizes = check_sizes(sizes)
    if max_chunk is not None and max_chunk < 1:
        raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
    L = cfg.n_layers
    act_shape = site_shape(Site(kind, 0), cfg, B, T)[1:]
    free = tuple(by)[1:]
    axis_of = tuple(axes[a] for a in free)
    n_patches = L * int(np.prod([act_shape[axes[a]] for a in free], dtype=np.int64))
    if metric is None:
        metric = LogitDiff(answer=jnp.zeros(B, jnp.int32), wrong=jnp.zeros(B, jnp.int32))
    sds = jax.ShapeDtypeStruct
    dtype = model.W_E.dtype
    resid = sds((L, B, T, cfg.d_model), dtype)
    source = sds((L, B, *act_shape), dtype)
    mask = None if attention_mask is None else sds((B, T), jnp.bool_)
    tokens, positions = sds((B, T), jnp.int32), sds((B,), jnp.int32)

    def bytes_at(n: int) -> int:
        rows = sds((n, 1 + len(free)), jnp.int32)
        args = (model, tokens, mask, positions, resid, source, metric, sds((), jnp.int32), rows)
        return compiled_footprint(lambda *a: score_chunk(*a, kind, axis_of, act_shape), *args).total

    measured = {n: bytes_at(n) for n in sizes}
    proposed = largest_fitting(*fit_line(*measured.items()), usable)
    cap = auto_chunk(cfg, B, T, 2**62) if max_chunk is None else int(max_chunk)
    what = f"patching {site} by {','.join(by)} (B={B}, T={T})"
    size = search_size(bytes_at, measured, max(1, min(proposed, cap, n_patches)), usable, pow2=False)
    if size is None:
        need, fixed, per = need_at_one(measured)
        raise DoesNotFit(
            f"{what} does not fit: one patch per call needs {fmt_bytes(need)} ({need} bytes; about {fmt_bytes(fixed)} fixed: "
            f"model weights {fmt_bytes(nbytes(model))}, cached residual stream [{L}, {B}, {T}, {cfg.d_model}] "
            f"{fmt_bytes(nbytes(resid))}, source activations [{L}, {B}, {', '.join(map(str, act_shape))}] {fmt_bytes(nbytes(source))}, "
            f"the rest XLA's fixed temporaries; + about {fmt_bytes(per)} per patch), over the budget {fmt_bytes(usable)} "
            f"({safety:.0%} of {fmt_bytes(budget)}). To fit: fewer prompts (B={B}) or shorter ones (T={T}), or shard the "
            f"model over a device mesh with a 'model' axis (mesh=)"
        )
    fixed, per = line_near(measured, size)
    limit = largest_fitting(fixed, per, usable)
    if size == n_patches and size < limit:
        note = f"every patch of the sweep ({n_patches}) in one call; {upto(limit)} would fit"
    elif size == cap and size < limit:
        why = "max_chunk" if max_chunk is not None else f"auto_chunk's {jax.default_backend()} cap"
        note = f"capped by {why} ({cap}); {upto(limit)} would fit"
    else:
        note = "the most that fits"
    return MemoryPlan(what, "patch", int(size), measured[size], fixed, per, budget, safety,
                      tuple(sorted(measured.items())), int(limit), note)  # fmt: skip
