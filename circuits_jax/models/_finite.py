"""Refusing weights that are not finite: a NaN or Inf weight is a damaged file or a diverged model.

Such a model still runs, and every number it gives is NaN (or a steered generation repeats one
token), so the loaders check every weight as it is read and refuse the first tensor that holds a
NaN or an Inf, naming it as the file names it (`model.layers.3.mlp.up_proj.weight`,
`blk.3.ffn_up.weight`) or, for a converted model, as our field (`blocks.W_in`, with its layer).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


class NonFiniteWeights(ValueError):
    """A weight holds a NaN or an Inf (a ValueError, so code that catches bad input catches it)."""


def _bad(a) -> bool:
    """Whether float array `a` holds a NaN or an Inf (computed where `a` lives: a device array is not copied)."""
    if not np.issubdtype(np.dtype(a.dtype), np.floating) and np.dtype(a.dtype).name != "bfloat16":
        return False
    if isinstance(a, np.ndarray):
        return not bool(np.isfinite(a).all())
    import jax.numpy as jnp

    return not bool(jnp.isfinite(a).all())


def _describe(a, name: str, source: str, stacked: bool) -> str:
    a = np.asarray(a, np.float32)
    bad = ~np.isfinite(a)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    where = f"layer {first[0]}, index {list(first[1:])}" if stacked and a.ndim > 1 else f"index {list(first)}"
    return (f"{source}: weight {name} holds {int(np.isnan(a).sum())} NaN and {int(np.isinf(a).sum())} Inf values "
            f"(first at {where}); the file is damaged or the model diverged, so it is not loaded")  # fmt: skip


def check_finite(weights: Any, source: str) -> None:
    """Raise `NonFiniteWeights` (a ValueError) naming the first weight of `weights` that holds a NaN or an Inf.

    `weights`: a mapping of tensor names to arrays (as a file names them), or a model (any pytree:
    its array leaves are named by their path, e.g. `blocks.W_in`, and a `blocks.*` weight's first
    axis is reported as the layer). `source` names the file or model in the message."""
    if isinstance(weights, Mapping):
        items = [(str(k), v, False) for k, v in weights.items()]
    else:
        import jax

        leaves = jax.tree_util.tree_flatten_with_path(weights)[0]
        items = []
        for path, leaf in leaves:
            if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
                name = jax.tree_util.keystr(path).lstrip(".")
                items.append((name, leaf, name.startswith("blocks.")))
    for name, a, stacked in items:
        if _bad(a):
            raise NonFiniteWeights(_describe(a, name, source, stacked))
