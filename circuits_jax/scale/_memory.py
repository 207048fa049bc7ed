"""Memory planning: chunk sizes for sweeps and batch sizes for training, measured by XLA.

A sweep scores its patches in chunks of C rows with one compiled program (`_patching._score_chunk`);
a dictionary trains in batches of N tokens with one compiled step (`_sae_train.make_step`). How
much memory a program needs is not guessed here: the very program is compiled on *abstract*
inputs (`jax.ShapeDtypeStruct`: shapes only, nothing allocated or computed) at two sizes, and
`compiled.memory_analysis()` gives what XLA's buffer assignment will allocate:

    bytes(n) = argument + output + temp - alias      (alias: outputs that reuse an argument's buffer)

Arguments (the model's weights, the cached residual stream `[L, B, T, D]` and source activations
`[L, B, *act]`, the train state) do not grow with n; the temporaries of the vmapped runs (or of the
`[N, F]` latents) do. Two compiles fit `bytes(n) = fixed + n * per_item`; the line proposes the
largest n with `bytes(n) <= safety * budget`, capped (`max_chunk`, `max_batch`), and the proposal is
compiled too and lowered until its own compile fits (the footprint is only piecewise linear: XLA
picks other kernels and buffer reuse as sizes grow), so a plan's size is always a measured one.
When even n = 1 does not fit, `DoesNotFit` says so before any compute, naming every number and
what to change. On CPU the compiled numbers are what the process allocates: a SmolLM2 sweep
chunk's resident-memory growth matched its compiled temp + output to 0.1 % (docs/memory_planning.md).

The budget defaults to `device_memory()`: the accelerator's `bytes_limit` where the backend reports
it (GPU, TPU), else the host's available memory (CPU). What this does not count: buffers that live
outside the planned program (e.g. the model's activations while a sweep builds its caches, the
activation store's shuffle buffer in host memory).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..dictionaries._activations import _available_memory
from ..core._metrics import LogitDiff
from ..patching._sweep import _check_site_axes, _score_chunk, auto_chunk
from ..core._sites import Site, site_shape


def device_memory(device=None) -> int | None:
    """Bytes one device can hold: `memory_stats()["bytes_limit"]` where the backend reports it
    (GPU / TPU), else the host's available memory (CPU); None when neither is known."""
    device = jax.devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return _available_memory()


def _fmt(b: float) -> str:
    """Bytes, readable: '1.2 GiB', '21 MiB', '512 B'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= size:
            v = b / size
            return f"{v:.1f} {unit}" if abs(v) < 10 else f"{v:.0f} {unit}"
    return f"{int(b)} B"


class Footprint(NamedTuple):
    """What XLA allocates for one compiled program (from `compiled.memory_analysis()`)."""

    argument: int
    output: int
    temp: int
    alias: int

    @property
    def total(self) -> int:
        return self.argument + self.output + self.temp - self.alias


def _is_leaf_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def abstract(tree):
    """The pytree with every array (or ShapeDtypeStruct) leaf as a `jax.ShapeDtypeStruct`; other leaves kept."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype) if _is_leaf_array(x) else x, tree)


def compiled_footprint(fn: Callable, *args) -> Footprint:
    """Compile `fn(*args)` on abstract inputs (array leaves traced, every other leaf static, as
    `eqx.filter_jit` does) and read XLA's memory analysis. Nothing is computed or allocated.
    Every array argument counts, read or not."""
    dyn, static = eqx.partition(abstract(args), _is_leaf_array)
    # keep_unused: an argument the program never reads (the embedding, in a sweep that starts from a
    # cached residual) is still on the device, so it counts
    compiled = jax.jit(lambda d: fn(*eqx.combine(d, static)), keep_unused=True).lower(dyn).compile()
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis of compiled programs")
    get = lambda name: int(getattr(m, name, 0) or 0)  # noqa: E731  (a field missing in a jax version counts 0)
    return Footprint(get("argument_size_in_bytes"), get("output_size_in_bytes"), get("temp_size_in_bytes"),
                     get("alias_size_in_bytes"))  # fmt: skip


class MemoryPlan(NamedTuple):
    """A chosen chunk / batch size, verified by a compile at that size, and the linear model around it."""

    what: str  # e.g. "patching z by layer,pos,head (B=8, T=15)"
    item: str  # "patch" or "token"
    size: int  # the chosen chunk (patches per compiled call) or batch size (tokens per step)
    size_bytes: int  # what XLA allocates at `size` (compiled, not fitted)
    fixed_bytes: int  # the line through the two compiles nearest `size`: what does not grow with it...
    per_item_bytes: int  # ... and what each patch / token adds
    budget_bytes: int  # the device's memory the plan is for (before `safety`)
    safety: float  # the plan uses at most safety * budget_bytes
    measured: tuple[tuple[int, int], ...]  # every (size, compiled bytes) the search compiled, by size
    limit: int  # the largest size that fits by the line (an estimate beyond `size`; uncapped)
    note: str  # why `size` is what it is

    def predicted(self, n: int) -> int:
        """Bytes the program needs at size `n`, by the line."""
        return self.fixed_bytes + n * self.per_item_bytes

    def __str__(self) -> str:
        kind = "chunk" if self.item == "patch" else "batch"
        items = self.item if self.size == 1 else f"{self.item}es" if self.item == "patch" else f"{self.item}s"
        return (
            f"{self.what}: {kind} of {self.size} {items} needs "
            f"{_fmt(self.size_bytes)} (compiled; line: {_fmt(self.fixed_bytes)} fixed + {_fmt(self.per_item_bytes)} per "
            f"{self.item}), budget {_fmt(self.safety * self.budget_bytes)} ({self.safety:.0%} of "
            f"{_fmt(self.budget_bytes)}); {self.note}"
        )


class DoesNotFit(MemoryError):
    """Raised before any compute when even the smallest request (one patch, one token) exceeds the budget."""


def _line(p1: tuple[int, int], p2: tuple[int, int]) -> tuple[int, int]:
    """`(fixed, per_item)` of the line through two `(size, bytes)` points (per_item >= 0)."""
    (n1, b1), (n2, b2) = sorted((p1, p2))
    per = max(0.0, (b2 - b1) / (n2 - n1))
    return int(round(b1 - n1 * per)), int(np.ceil(per))


def _line_near(measured: dict[int, int], n: int) -> tuple[int, int]:
    """The line through the compile at `n` and its nearest measured neighbour below (above if none)."""
    below = [m for m in measured if m < n]
    other = max(below) if below else min(m for m in measured if m > n)
    return _line((n, measured[n]), (other, measured[other]))


def _largest(fixed: int, per: int, usable: float) -> int:
    """The largest n with fixed + n * per <= usable (2**62 for a flat line)."""
    return 2**62 if per == 0 else int((usable - fixed) // per)


def _search(bytes_at, measured: dict[int, int], start: int, usable: float, pow2: bool) -> int | None:
    """The largest size from `start` down whose compile fits `usable` bytes, or None if not even 1.

    Each size tried is compiled; a failed one moves to the line through it and the nearest measured
    size below (the footprint is only piecewise linear: XLA's buffer assignment and the kernels it
    picks change with size), at least one step down (to the next power of two below, with `pow2`)."""
    n = start
    while n >= 1:
        if n not in measured:
            measured[n] = bytes_at(n)
        if measured[n] <= usable:
            return n
        if n == 1:
            return None
        below = [m for m in measured if m < n]
        nxt = n - 1
        if below:
            nxt = min(nxt, _largest(*_line((n, measured[n]), (max(below), measured[max(below)])), usable))
        nxt = max(1, nxt)
        n = 1 << (nxt.bit_length() - 1) if pow2 else nxt
    return None


def _check_budget(budget, safety) -> int:
    if not 0 < safety <= 1:
        raise ValueError(f"safety must be in (0, 1], got {safety}")
    if budget is None:
        budget = device_memory()
        if budget is None:
            raise ValueError("the device's memory is unknown here (no bytes_limit, no /proc/meminfo): pass budget= in bytes")
    if budget <= 0:
        raise ValueError(f"budget must be a positive number of bytes, got {budget}")
    return int(budget)


def _check_sizes(sizes) -> tuple[int, int]:
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != 2 or not 1 <= sizes[0] < sizes[1]:
        raise ValueError(f"sizes must be two increasing sizes >= 1 to fit the line through, got {sizes}")
    return sizes


def _upto(limit: int) -> str:
    return "any size" if limit >= 2**62 else f"about {limit}"


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract(tree))
               if isinstance(x, jax.ShapeDtypeStruct))  # fmt: skip


def _need(measured: dict[int, int]) -> tuple[int, int, int]:
    """Bytes at size 1 and the line through the two smallest compiles (for DoesNotFit)."""
    a, b = sorted(measured)[:2]
    return measured[1], *_line((a, measured[a]), (b, measured[b]))


# ---------------------------------------------------------------- sweeps


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
    kind, axes = _check_site_axes(site, by, cfg)
    shape = np.shape(clean_tokens)
    if len(shape) == 1:
        shape = (1, *shape)
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"clean_tokens must be [B, T] or [T] token ids, got shape {np.shape(clean_tokens)}")
    B, T = (int(s) for s in shape)
    if attention_mask is not None and np.shape(attention_mask) != (B, T):
        raise ValueError(f"attention_mask has shape {np.shape(attention_mask)}, the tokens {(B, T)}")
    budget = _check_budget(budget, safety)
    usable = safety * budget
    sizes = _check_sizes(sizes)
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
        return compiled_footprint(lambda *a: _score_chunk(*a, kind, axis_of, act_shape), *args).total

    measured = {n: bytes_at(n) for n in sizes}
    proposed = _largest(*_line(*measured.items()), usable)
    cap = auto_chunk(cfg, B, T, 2**62) if max_chunk is None else int(max_chunk)
    what = f"patching {site} by {','.join(by)} (B={B}, T={T})"
    size = _search(bytes_at, measured, max(1, min(proposed, cap, n_patches)), usable, pow2=False)
    if size is None:
        need, fixed, per = _need(measured)
        raise DoesNotFit(
            f"{what} does not fit: one patch per call needs {_fmt(need)} ({need} bytes; about {_fmt(fixed)} fixed: "
            f"model weights {_fmt(_nbytes(model))}, cached residual stream [{L}, {B}, {T}, {cfg.d_model}] "
            f"{_fmt(_nbytes(resid))}, source activations [{L}, {B}, {', '.join(map(str, act_shape))}] {_fmt(_nbytes(source))}, "
            f"the rest XLA's fixed temporaries; + about {_fmt(per)} per patch), over the budget {_fmt(usable)} "
            f"({safety:.0%} of {_fmt(budget)}). To fit: fewer prompts (B={B}) or shorter ones (T={T}), or shard the "
            f"model over a device mesh with a 'model' axis (mesh=)"
        )
    fixed, per = _line_near(measured, size)
    limit = _largest(fixed, per, usable)
    if size == n_patches and size < limit:
        note = f"every patch of the sweep ({n_patches}) in one call; {_upto(limit)} would fit"
    elif size == cap and size < limit:
        why = "max_chunk" if max_chunk is not None else f"auto_chunk's {jax.default_backend()} cap"
        note = f"capped by {why} ({cap}); {_upto(limit)} would fit"
    else:
        note = "the most that fits"
    return MemoryPlan(what, "patch", int(size), measured[size], fixed, per, budget, safety,
                      tuple(sorted(measured.items())), int(limit), note)  # fmt: skip


# ---------------------------------------------------------------- training


def plan_training(
    dictionary,
    train_cfg,
    *,
    budget: int | None = None,
    safety: float = 0.8,
    max_batch: int | None = None,
    sizes: Sequence[int] | None = None,
) -> MemoryPlan:
    """The batch size (tokens per step) to train `dictionary` with `train_cfg` (`TrainConfig`).

    The configured `train_cfg.batch_size` is kept when it fits (a batch size changes the training
    run, so it is not raised behind the user's back; the note says how far it could go); when it
    does not, the plan is the largest power of two whose compile fits. The dictionary's arrays may
    be `jax.ShapeDtypeStruct`s (e.g. `eqx.filter_eval_shape(init_sae, ...)`): nothing is allocated.
    max_batch: cap (default: the power of two at or below `train_cfg.n_tokens`).
    sizes: the two batch sizes compiled first (default: a quarter of the configured one, and it).
    Raises `DoesNotFit` when one token per step does not fit.
    """
    from ..dictionaries._train import init_state, make_step

    budget = _check_budget(budget, safety)
    usable = safety * budget
    configured = int(train_cfg.batch_size)
    if configured < 1:
        raise ValueError(f"train_cfg.batch_size must be >= 1, got {configured}")
    sizes = _check_sizes(sizes if sizes is not None else (max(1, max(configured, 2) // 4), max(configured, 2)))
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    d = abstract(dictionary)
    dyn, static = eqx.partition(d, _is_leaf_array)
    state = jax.eval_shape(lambda dd: init_state(eqx.combine(dd, static), train_cfg), dyn)
    x_shape, y_shape = tuple(d.W_enc.shape[:-1]), tuple(d.b_dec.shape)  # SAE: [D_in], [D_out]; CLT: [L, D], [L, D]
    dtype = d.W_enc.dtype
    step = make_step(train_cfg)

    def bytes_at(n: int) -> int:
        x, y = jax.ShapeDtypeStruct((n, *x_shape), dtype), jax.ShapeDtypeStruct((n, *y_shape), dtype)
        return compiled_footprint(step, state, x, y).total

    measured = {n: bytes_at(n) for n in sizes}
    width = d.W_enc.shape[-1]
    what = f"training a {getattr(d, 'arch', '')} dictionary of width {width} on {list(x_shape)} -> {list(y_shape)}"
    cap = int(max_batch) if max_batch is not None else 1 << max(0, int(train_cfg.n_tokens).bit_length() - 1)
    size = None
    if configured <= cap:
        measured.setdefault(configured, bytes_at(configured))
        if measured[configured] <= usable:
            size = configured
    if size is None:
        proposed = max(1, min(_largest(*_line_near(measured, max(measured)), usable), cap))
        size = _search(bytes_at, measured, 1 << (proposed.bit_length() - 1), usable, pow2=True)
    if size is None:
        need, fixed, per = _need(measured)
        raise DoesNotFit(
            f"{what} does not fit: one token per step needs {_fmt(need)} ({need} bytes; about {_fmt(fixed)} fixed: "
            f"parameters {_fmt(_nbytes(d))}, the train state with Adam's moments {_fmt(_nbytes(state))} and its updated "
            f"copy, XLA's fixed temporaries; + about {_fmt(per)} per token), over the budget {_fmt(usable)} ({safety:.0%} "
            f"of {_fmt(budget)}). To fit: a smaller width (now {width}), or shard the dictionary over a device mesh with "
            f"a 'model' axis (mesh=)"
        )
    fixed, per = _line_near(measured, size)
    limit = _largest(fixed, per, usable)
    if size == configured:
        note = f"the configured batch size fits ({_upto(limit)} would, by the line)"
    elif configured > cap:
        note = f"the configured batch size {configured} exceeds the cap {cap}: the largest power of two under it that fits"
    else:
        note = (f"the configured batch size {configured} does not fit (it needs {_fmt(measured[configured])}): "
                "the largest power of two that fits")  # fmt: skip
    return MemoryPlan(what, "token", int(size), measured[size], fixed, per, budget, safety,
                      tuple(sorted(measured.items())), int(limit), note)  # fmt: skip
