"""Checks at the boundary: every technique's inputs, refused with one error naming what is wrong.

They run on concrete Python and NumPy values before anything is traced (inside an outer
`jit` / `vmap` / `grad` the values are tracers and only shapes are checked), so a compiled program
pays nothing for them, and they sit where every technique enters: `run` and `generate` (tokens,
layers), `Pairs` (a task's tokens and metric), the sweep and training entry points (sizes).

Layers: a Python int layer counts from 0; a negative one counts from the end (-1 is the last layer),
as in Python indexing, wherever a layer is given as an int (hooks, `start_layer` / `stop_layer`,
sweep layer lists). Traced layers are taken as they are.
"""

from __future__ import annotations

import numbers

import jax
import numpy as np


def is_concrete(x) -> bool:
    """Whether `x` holds values now (not a tracer inside jit / vmap / grad)."""
    return not isinstance(x, jax.core.Tracer)


def check_tokens(tokens, vocab: int, what: str = "tokens") -> None:
    """Refuse token ids outside `0 .. vocab - 1` (they would be clamped silently by the embedding lookup)."""
    if not is_concrete(tokens):
        return
    t = np.asarray(tokens)
    if t.size == 0:
        raise ValueError(f"{what} are empty (shape {t.shape}); give at least one token per row")
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"{what} must be integer token ids, got dtype {t.dtype}")
    bad = (t < 0) | (t >= vocab)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{what} hold id {int(t[where])} at {list(where)}, outside the vocabulary 0..{vocab - 1} "
                         f"({int(bad.sum())} such ids)")  # fmt: skip


def layer_index(layer, n_layers: int, what: str, *, allow_end: bool = False):
    """A Python int layer in range, negative counting from the end; a traced layer passes unchanged and a
    concrete array layer (a run-time value: one program serves every value) must be in `0 .. n_layers - 1`.

    allow_end: `n_layers` itself is valid (a stop bound)."""
    top = n_layers if allow_end else n_layers - 1
    if not is_concrete(layer):
        return layer
    if isinstance(layer, (jax.Array, np.ndarray)):
        if np.ndim(layer) != 0 or not np.issubdtype(np.asarray(layer).dtype, np.integer):
            raise TypeError(f"{what}: a layer is an integer, got an array of shape {np.shape(layer)} and dtype "
                            f"{np.asarray(layer).dtype}")  # fmt: skip
        if not 0 <= int(layer) <= top:
            raise ValueError(f"{what}={int(layer)} is out of range: the model has {n_layers} layers, 0..{n_layers - 1} "
                             "(an array layer is a run-time value and cannot count from the end)")  # fmt: skip
        return layer
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise TypeError(f"{what}={layer!r}: a layer is an integer (0..{n_layers - 1}, or negative from the end)")
    if not -n_layers <= layer <= top:
        stop = f"; a stop bound may also be {n_layers}" if allow_end else ""
        raise ValueError(f"{what}={layer} is out of range: the model has {n_layers} layers, 0..{n_layers - 1} "
                         f"(negative layers count from the end, {-n_layers}..-1){stop}")  # fmt: skip
    return int(layer) + n_layers if layer < 0 else int(layer)


def positive(value, name: str, *, integer: bool = True, allow_none: bool = False):
    """Refuse zero, negative, NaN (and, for counts, non-integer) sizes and budgets, naming the argument."""
    if value is None and allow_none:
        return value
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (integer and not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name}={value!r}: give {kind} > 0")
    if not value > 0:
        raise ValueError(f"{name}={value!r}: give {kind} > 0")
    return value


def check_metric(metric, batch: int, vocab: int, positions_shape: tuple[int, ...]) -> None:
    """A metric against the task: its per-example arrays have one row per example (or one for all),
    its token ids are in the vocabulary, and it returns one number for the batch."""
    if metric is None:
        return
    name = type(metric).__name__
    fields = getattr(type(metric), "__dataclass_fields__", {})
    for field in fields:
        value = getattr(metric, field, None)
        if value is None or not hasattr(value, "shape") or not is_concrete(value):
            continue
        shape = tuple(np.shape(value))
        if len(shape) >= 1 and shape[0] not in (1, batch):
            raise ValueError(f"metric {name}.{field} has {shape[0]} rows (shape {shape}) but the batch has {batch} "
                             "examples: give one per example (or one for all)")  # fmt: skip
        arr = np.asarray(value)
        if np.issubdtype(arr.dtype, np.integer) and arr.size:
            bad = (arr < 0) | (arr >= vocab)
            if bad.any():
                where = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ValueError(f"metric {name}.{field} holds token id {int(arr[where])} at {list(where)}, outside the "
                                 f"vocabulary 0..{vocab - 1}")  # fmt: skip
    logits = jax.ShapeDtypeStruct((*positions_shape, vocab), np.float32)
    try:
        out = jax.eval_shape(metric, logits)
    except Exception as e:  # the metric cannot even take logits of this shape
        raise ValueError(f"metric {name} fails on logits of shape {logits.shape} (batch, [positions,] vocabulary): "
                         f"{type(e).__name__}: {e}") from None  # fmt: skip
    shape = getattr(out, "shape", None)
    if shape is None or tuple(shape) != ():
        raise ValueError(f"metric {name} returns shape {shape} on logits of shape {logits.shape}; a metric returns one "
                         "number for the batch (e.g. the mean over examples)")  # fmt: skip


def check_chunking(chunk_size, memory_budget) -> None:
    """A sweep's `chunk_size` (None, "plan" or an integer > 0) and `memory_budget` (bytes > 0)."""
    if chunk_size != "plan":
        positive(chunk_size, "chunk_size", allow_none=True)
    positive(memory_budget, "memory_budget")
