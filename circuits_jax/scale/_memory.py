"""Memory planning: chunk sizes for sweeps and batch sizes for training, measured by XLA.

This module is the planner; the plans live beside what they plan: `patching.plan_sweep` (a sweep
scores its patches in chunks of C rows with one compiled program, `core.score_chunk`) and
`dictionaries.plan_training` (a dictionary trains in batches of N tokens with one compiled step,
`make_step`). How
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

import os
from pathlib import Path
from typing import Callable, NamedTuple

import equinox as eqx
import jax
import numpy as np


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
    return available_memory()


def available_memory() -> int | None:
    """Bytes of host memory available now (`MemAvailable`), or None when the system does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return None



def fmt_bytes(b: float) -> str:
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


def is_leaf_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def abstract(tree):
    """The pytree with every array (or ShapeDtypeStruct) leaf as a `jax.ShapeDtypeStruct`; other leaves kept."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype) if is_leaf_array(x) else x, tree)


def compiled_footprint(fn: Callable, *args) -> Footprint:
    """Compile `fn(*args)` on abstract inputs (array leaves traced, every other leaf static, as
    `eqx.filter_jit` does) and read XLA's memory analysis. Nothing is computed or allocated.
    Every array argument counts, read or not."""
    dyn, static = eqx.partition(abstract(args), is_leaf_array)
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
            f"{fmt_bytes(self.size_bytes)} (compiled; line: {fmt_bytes(self.fixed_bytes)} fixed + {fmt_bytes(self.per_item_bytes)} per "
            f"{self.item}), budget {fmt_bytes(self.safety * self.budget_bytes)} ({self.safety:.0%} of "
            f"{fmt_bytes(self.budget_bytes)}); {self.note}"
        )


class DoesNotFit(MemoryError):
    """Raised before any compute when even the smallest request (one patch, one token) exceeds the budget."""


def fit_line(p1: tuple[int, int], p2: tuple[int, int]) -> tuple[int, int]:
    """`(fixed, per_item)` of the line through two `(size, bytes)` points (per_item >= 0)."""
    (n1, b1), (n2, b2) = sorted((p1, p2))
    per = max(0.0, (b2 - b1) / (n2 - n1))
    return int(round(b1 - n1 * per)), int(np.ceil(per))


def line_near(measured: dict[int, int], n: int) -> tuple[int, int]:
    """The line through the compile at `n` and its nearest measured neighbour below (above if none)."""
    below = [m for m in measured if m < n]
    other = max(below) if below else min(m for m in measured if m > n)
    return fit_line((n, measured[n]), (other, measured[other]))


def largest_fitting(fixed: int, per: int, usable: float) -> int:
    """The largest n with fixed + n * per <= usable (2**62 for a flat line)."""
    return 2**62 if per == 0 else int((usable - fixed) // per)


def search_size(bytes_at, measured: dict[int, int], start: int, usable: float, pow2: bool) -> int | None:
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
            nxt = min(nxt, largest_fitting(*fit_line((n, measured[n]), (max(below), measured[max(below)])), usable))
        nxt = max(1, nxt)
        n = 1 << (nxt.bit_length() - 1) if pow2 else nxt
    return None


def check_budget(budget, safety) -> int:
    if not 0 < safety <= 1:
        raise ValueError(f"safety must be in (0, 1], got {safety}")
    if budget is None:
        budget = device_memory()
        if budget is None:
            raise ValueError("the device's memory is unknown here (no bytes_limit, no /proc/meminfo): pass budget= in bytes")
    if budget <= 0:
        raise ValueError(f"budget must be a positive number of bytes, got {budget}")
    return int(budget)


def check_sizes(sizes) -> tuple[int, int]:
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != 2 or not 1 <= sizes[0] < sizes[1]:
        raise ValueError(f"sizes must be two increasing sizes >= 1 to fit the line through, got {sizes}")
    return sizes


def upto(limit: int) -> str:
    return "any size" if limit >= 2**62 else f"about {limit}"


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract(tree))
               if isinstance(x, jax.ShapeDtypeStruct))  # fmt: skip


def need_at_one(measured: dict[int, int]) -> tuple[int, int, int]:
    """Bytes at size 1 and the line through the two smallest compiles (for DoesNotFit)."""
    a, b = sorted(measured)[:2]
    return measured[1], *fit_line((a, measured[a]), (b, measured[b]))
