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

from ._interventions import ALL_LAYERS, Add, Hook, PerLayer, Replace
from ._model import Transformer, run
from ._patching import SITES, PatchResult, _check_site_axes, _Pairs, _score


@eqx.filter_jit
def _atp(model, source_tokens, target_tokens, mask, positions, metric, kinds: tuple[str, ...]):
    """One source forward, one target forward + backward: `(source metric, target metric, estimates)`.

    estimates[kind] `[L, B, ...]` = (source - target activation) * d metric / d activation (on the target).
    """
    L = model.cfg.n_layers
    names = [f"blocks.{l}.{k}" for k in kinds for l in range(L)]

    def stacks(cache):
        return {k: jnp.stack([cache[f"blocks.{l}.{k}"] for l in range(L)]) for k in kinds}

    src = run(model, source_tokens, cache=names, attention_mask=mask, return_logits=False)
    source = stacks(src.cache)

    def f(deltas):
        hooks = [Hook(k, ALL_LAYERS, PerLayer(Add(d))) for k, d in deltas.items()]
        out = run(model, target_tokens, hooks=hooks, cache=names, attention_mask=mask, return_logits=False)
        return _score(model, out.resid, positions, metric), stacks(out.cache)

    zeros = {k: jnp.zeros_like(v) for k, v in source.items()}
    (target_metric, target), grads = jax.value_and_grad(f, has_aux=True)(zeros)
    return _score(model, src.resid, positions, metric), target_metric, {k: (source[k] - target[k]) * grads[k] for k in kinds}


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
    source_metric, target_metric, per_kind = _atp(model, jnp.asarray(pairs.source_tokens), jnp.asarray(pairs.target_tokens),
                                                  pairs.mask, pairs.positions, metric, tuple(sorted(set(kinds.values()))))  # fmt: skip
    pairs.clean_metric, pairs.corrupt_metric = (
        (float(target_metric), float(source_metric)) if noising else (float(source_metric), float(target_metric))
    )
    return {s: np.asarray(per_kind[kinds[s]]) for s in sites}, pairs


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


@eqx.filter_jit
def _ig(model, source_tokens, target_tokens, mask, positions, metric, kind: str, steps: int):
    """Mean gradient of the metric w.r.t. every layer's `kind` activation along the straight path
    from the target's token embedding to the source's (midpoint rule), and both runs' activations."""
    L = model.cfg.n_layers
    names = [f"blocks.{l}.{kind}" for l in range(L)]

    def stack(cache):
        return jnp.stack([cache[n] for n in names])

    src = run(model, source_tokens, cache=names + ["hook_embed"], attention_mask=mask, return_logits=False)
    tgt = run(model, target_tokens, cache=names + ["hook_embed"], attention_mask=mask, return_logits=False)
    e_src, e_tgt = src.cache["hook_embed"], tgt.cache["hook_embed"]
    zeros = jnp.zeros_like(stack(tgt.cache))

    def grad_at(alpha):
        def f(delta):
            hooks = [Hook("hook_embed", None, Replace(e_tgt + alpha * (e_src - e_tgt))),
                     Hook(kind, ALL_LAYERS, PerLayer(Add(delta)))]  # fmt: skip
            out = run(model, target_tokens, hooks=hooks, attention_mask=mask, return_logits=False)
            return _score(model, out.resid, positions, metric)

        return jax.grad(f)(zeros)

    alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
    mean_grad = jnp.mean(jax.lax.map(grad_at, alphas), axis=0)
    return stack(src.cache), stack(tgt.cache), mean_grad


def integrated_gradients(
    model: Transformer, clean_tokens, corrupt_tokens, metric: Callable[[Array], Array], site: str = "resid_pre",
    by: Sequence[str] = ("layer", "pos"), *, steps: int = 16, noising: bool = False, attention_mask=None,
    answer_pos=None,
) -> PatchResult:  # fmt: skip
    """Integrated-gradients estimate of `patch_sweep(...)` (EAP-IG's node score, inputs variant).

    The token embedding moves in `steps` midpoint steps from the target prompt's to the source's;
    each patch's score is `(source - target activation) · mean gradient along that path`. With one
    step at alpha 0 this would be AtP; more steps average the gradient where AtP takes it at one end.
    The steps run as one compiled `lax.map` of forward + backward passes.
    """
    t0 = time.perf_counter()
    cfg = model.cfg
    kind, axes = _check_site_axes(site, by, cfg)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    pairs = _Pairs(model, clean_tokens, corrupt_tokens, metric, noising, attention_mask, answer_pos)
    source, target, grad = _ig(model, jnp.asarray(pairs.source_tokens), jnp.asarray(pairs.target_tokens), pairs.mask,
                               pairs.positions, metric, kind, int(steps))  # fmt: skip
    change = _reduce(np.asarray((source - target) * grad), axes, by)
    base = pairs.clean_metric if noising else pairs.corrupt_metric
    return pairs.result((base + change).astype(np.float32), by, t0, 0)
