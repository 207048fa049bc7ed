"""Interventions: pure functions from an activation to a new activation.

An intervention is an `equinox.Module`, so the arrays it carries (a patch
value, a steering vector, a mask) are pytree leaves: a sweep is `jax.vmap`
over a batch of interventions, and `jax.grad` flows into their values.
A `Hook` attaches one to a site; the layer may be a Python int or a traced
integer, which is what lets one compiled program patch any layer.
"""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array


class Intervention(eqx.Module):
    """Base class: `__call__(x) -> x'` with `x'` of the same shape and dtype."""

    def __call__(self, x: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, x: Array, site: str) -> None:
        """Raise a clear error before tracing if this cannot apply to `x`."""


def _check_broadcast(what: str, value, x, site: str) -> None:
    shape = tuple(np.shape(value))
    try:
        out = np.broadcast_shapes(shape, x.shape)
    except ValueError:
        out = None
    if out != tuple(x.shape):
        raise ValueError(
            f"{what} for site {site!r} has shape {shape}, but the activation there has shape {tuple(x.shape)}"
        )


def _masked(mask, new, x):
    return new if mask is None else jnp.where(mask, new, x)


class Replace(Intervention):
    """Replace the activation (where `mask` is true) by `value`, broadcast to the site's shape
    (a `[D]` vector replaces every position's `[D]`)."""

    value: Array
    mask: Array | None = None

    def __call__(self, x):
        return _masked(self.mask, jnp.broadcast_to(jnp.asarray(self.value, x.dtype), x.shape), x)

    def check(self, x, site):
        _check_broadcast("patch value", self.value, x, site)
        if self.mask is not None:
            _check_broadcast("patch mask", self.mask, x, site)


class Add(Intervention):
    """Add `delta` (a steering vector, a feature direction, ...)."""

    delta: Array
    mask: Array | None = None

    def __call__(self, x):
        return _masked(self.mask, x + jnp.asarray(self.delta, x.dtype), x)

    def check(self, x, site):
        _check_broadcast("added vector", self.delta, x, site)
        if self.mask is not None:
            _check_broadcast("mask", self.mask, x, site)


class Scale(Intervention):
    """Multiply by `factor`."""

    factor: Array | float
    mask: Array | None = None

    def __call__(self, x):
        return _masked(self.mask, x * jnp.asarray(self.factor, x.dtype), x)

    def check(self, x, site):
        _check_broadcast("scale factor", self.factor, x, site)


class Zero(Intervention):
    """Zero ablation."""

    mask: Array | None = None

    def __call__(self, x):
        return _masked(self.mask, jnp.zeros_like(x), x)

    def check(self, x, site):
        if self.mask is not None:
            _check_broadcast("mask", self.mask, x, site)


class Mean(Intervention):
    """Mean ablation: replace by `mean`, or by the mean over the batch axis when `mean` is None."""

    mean: Array | None = None
    mask: Array | None = None

    def __call__(self, x):
        m = jnp.mean(x, axis=0, keepdims=True) if self.mean is None else jnp.asarray(self.mean, x.dtype)
        return _masked(self.mask, jnp.broadcast_to(m, x.shape), x)

    def check(self, x, site):
        if self.mean is not None:
            _check_broadcast("mean", self.mean, x, site)


class Apply(Intervention):
    """Any user function of the activation (must be pure and shape-preserving)."""

    fn: Callable[[Array], Array] = eqx.field(static=True)

    def __call__(self, x):
        return self.fn(x)


class Compose(Intervention):
    """Apply several interventions in order."""

    parts: tuple[Any, ...]

    def __call__(self, x):
        for p in self.parts:
            x = p(x)
        return x

    def check(self, x, site):
        for p in self.parts:
            if isinstance(p, Intervention):
                p.check(x, site)


class PerLayer(Intervention):
    """An intervention whose arrays carry a leading layer axis; hooked with `layer=ALL_LAYERS`,
    layer l applies slice l. `Hook("attn.hook_z", ALL_LAYERS, PerLayer(Add(deltas)))` adds
    `deltas[l]` at every layer's z in one hook: the gradient of one backward pass reaches all."""

    stacked: Any

    def at(self, layer) -> Any:
        arrays, static = eqx.partition(self.stacked, eqx.is_array)
        return eqx.combine(jax.tree.map(lambda a: a[layer], arrays), static)

    def __call__(self, x):  # pragma: no cover - only meaningful through `at`
        raise TypeError("PerLayer is applied per layer: hook it with layer=ALL_LAYERS")


ALL_LAYERS = "all"


class Hook(eqx.Module):
    """An intervention at a site: `kind` (e.g. "attn.hook_z"), `layer` (int, traced int, None for a
    global site, or `ALL_LAYERS`)."""

    kind: str = eqx.field(static=True)
    layer: Any
    fn: Any

    @property
    def name(self) -> str:
        if self.layer is None:
            return self.kind
        if isinstance(self.layer, str):
            return f"blocks.*.{self.kind}"
        try:
            return f"blocks.{int(self.layer)}.{self.kind}"
        except Exception:  # traced layer
            return f"blocks.<traced>.{self.kind}"
