"""Attribution patching (AtP): the first-order estimate of every patch from one backward pass.

For a patch that moves a site from its target value `t` to the source value `s`, the metric
changes by about `(s - t) · dmetric/dactivation`, the gradient taken on the target run. The
gradient with respect to every layer's activation comes from a single `jax.grad` through a
zero `PerLayer(Add(...))` hook on each site: one forward and one backward for all sites and
layers at once. Estimates are reduced to the same shapes (and normalisation) as `patch_sweep`,
so the exact and the estimated results plot side by side.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from ._interventions import ALL_LAYERS, Add, Hook, PerLayer
from ._model import Transformer, run, unembed
from ._patching import SITES, PatchResult, _check_site_axes, _Pairs


@eqx.filter_jit
def _gradients(model, tokens, mask, positions, metric, zeros: dict):
    """d metric / d activation at every layer of each site kind in `zeros` (on the target run)."""
    B = tokens.shape[0]

    def f(deltas):
        hooks = [Hook(kind, ALL_LAYERS, PerLayer(Add(d))) for kind, d in deltas.items()]
        out = run(model, tokens, hooks=hooks, attention_mask=mask, return_logits=False)
        return metric(unembed(model, out.resid[jnp.arange(B), positions]))

    return jax.grad(f)(zeros)


def _reduce(full: np.ndarray, axes: dict[str, int], by: Sequence[str]) -> np.ndarray:
    """`[L, B, *act]` per-element attributions -> `[L, *by sizes]`: summed over batch and unindexed axes."""
    free = list(by[1:])
    keep = [axes[a] for a in free]
    summed = full.sum(axis=(1, *[2 + a for a in range(full.ndim - 2) if a not in keep]))
    order = sorted(keep)  # remaining activation axes, in activation order
    return np.transpose(summed, (0, *[1 + order.index(axes[a]) for a in free]))


def attribution_patch_all(
    model: Transformer, clean_tokens, corrupt_tokens, metric: Callable[[Array], Array], sites: Sequence[str] | None = None,
    *, noising: bool = False, attention_mask=None, answer_pos=None,
) -> tuple[dict[str, np.ndarray], _Pairs]:  # fmt: skip
    """Per-element AtP estimates `[L, B, *activation]` of the metric change for each site, one backward."""
    cfg = model.cfg
    sites = [s for s in SITES if not (cfg.attn_only and SITES[s][0].startswith("mlp."))] if sites is None else list(sites)
    for s in sites:
        _check_site_axes(s, ("layer",), cfg)
    pairs = _Pairs(model, clean_tokens, corrupt_tokens, metric, noising, attention_mask, answer_pos)
    kinds = {s: SITES[s][0] for s in sites}
    source = {k: pairs.site_stack(k) for k in set(kinds.values())}
    target = {k: pairs.site_stack(k, source=False) for k in set(kinds.values())}
    zeros = {k: jnp.zeros_like(v) for k, v in target.items()}
    grads = _gradients(model, jnp.asarray(pairs.target_tokens), pairs.mask, pairs.positions, metric, zeros)
    per_kind = {k: np.asarray((source[k] - target[k]) * grads[k]) for k in zeros}
    return {s: per_kind[kinds[s]] for s in sites}, pairs


def attribution_patch(
    model: Transformer, clean_tokens, corrupt_tokens, metric: Callable[[Array], Array], site: str = "resid_pre",
    by: Sequence[str] = ("layer", "pos"), *, noising: bool = False, attention_mask=None, answer_pos=None,
) -> PatchResult:  # fmt: skip
    """AtP estimate of `patch_sweep(...)` with the same arguments, shape and normalisation."""
    t0 = time.perf_counter()
    kind, axes = _check_site_axes(site, by, model.cfg)
    est, pairs = attribution_patch_all(model, clean_tokens, corrupt_tokens, metric, [site], noising=noising,
                                       attention_mask=attention_mask, answer_pos=answer_pos)  # fmt: skip
    change = _reduce(est[site], axes, by)
    base = pairs.clean_metric if noising else pairs.corrupt_metric
    return pairs.result((base + change).astype(np.float32), by, t0, 0)
