"""Attribution patching (AtP): the first-order estimate of every patch from one backward pass.

For a patch that moves a site from its target value `t` to the source value `s`, the metric
changes by about `(s - t) · dmetric/dactivation`, the gradient taken on the target run. The
gradient with respect to every layer's activation comes from a single `jax.grad` through a
zero `PerLayer(Add(...))` hook on each site: one forward and one backward for all sites and
layers at once. Estimates are reduced to the same shapes (and normalisation) as `patch_sweep`,
so the exact and the estimated results plot side by side.

`atp_star` adds the two corrections of AtP* (Kramár et al. 2024): queries and keys are
linearised only after the attention softmax (which is recomputed exactly), and GradDrop
re-estimates every node with the gradient through one layer's outputs dropped at a time.
"""

from __future__ import annotations

import time
import warnings
from typing import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from ..core import (
    ALL_LAYERS,
    Source,
    Task,
    flat,
    source_metric,
    parse_site,
    takes_task,
    IG_BATCH,
    PATCH_SITES,
    Add,
    Hook,
    Intervention,
    Pairs,
    PerLayer,
    Replace,
    Site,
    Transformer,
    check_site_axes,
    degenerate,
    report_nonfinite,
    hooked_metric,
    run,
    score_resid,
    site_shape,
)
from ._sweep import PatchResult, patch_result


@eqx.filter_jit
def _atp(model, source: Source, target_tokens, mask, positions, metric, kinds: tuple[str, ...]):
    """Source values, one target forward + backward: `(source metric, target metric, estimates)`.

    estimates[kind] `[L, B, ...]` = (source - target activation) * d metric / d activation (on the target).
    """
    L = model.cfg.n_layers
    names = [f"blocks.{l}.{k}" for k in kinds for l in range(L)]

    def stacks(cache):
        return {k: jnp.stack([cache[f"blocks.{l}.{k}"] for l in range(L)]) for k in kinds}

    source, src_resid = source.stacks(model, kinds, *target_tokens.shape)

    def f(deltas):
        hooks = [Hook(k, ALL_LAYERS, PerLayer(Add(d))) for k, d in deltas.items()]
        out = run(model, target_tokens, hooks=hooks, cache=names, attention_mask=mask, return_logits=False)
        return score_resid(model, out.resid, positions, metric), stacks(out.cache)

    zeros = {k: jnp.zeros_like(v) for k, v in source.items()}
    (target_metric, target), grads = jax.value_and_grad(f, has_aux=True)(zeros)
    estimates = {k: (source[k] - target[k]) * grads[k] for k in kinds}
    largest = jnp.max(jnp.stack([jnp.max(jnp.abs(e)) for e in estimates.values()]))
    grad = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grads)]))
    return source_metric(model, src_resid, positions, metric), target_metric, estimates, (largest, grad)


def _flat_warning(method: str, pairs: Pairs) -> None:
    warnings.warn(
        f"{method}: the metric's gradient is zero at the {'clean' if pairs.noising else 'corrupt'} run where it is taken, "
        "so every estimate is 0. A metric that measures distance to the clean run (KL to its logits, a squared "
        "error) has zero gradient at the clean run; in noising mode (zero and mean ablation are noising) use a "
        "metric such as a logit difference, or integrated gradients (EAP-IG, integrated_gradients), which average "
        "the gradient along the path instead of taking it at the flat end", stacklevel=3)  # fmt: skip


def _metrics(pairs: Pairs, source_metric, target_metric, kinds) -> None:
    """Set the pair's clean and corrupt metrics from a technique's own passes (zero / mean: corrupt is
    every one of `kinds` ablated at once)."""
    if pairs.noising:
        pairs.clean_metric = float(target_metric)
        pairs.corrupt_metric = float(source_metric) if pairs.ablation == "resample" else pairs.ablated_metric(kinds)
    else:
        pairs.clean_metric, pairs.corrupt_metric = float(source_metric), float(target_metric)


def _reduce(full, axes: dict[str, int], by: Sequence[str]):
    """`[L, B, *act]` per-element attributions -> `[L, *by sizes]`: summed over batch and unindexed axes.

    Works on NumPy and (traced) JAX arrays alike."""
    free = list(by[1:])
    keep = [axes[a] for a in free]
    summed = full.sum(axis=(1, *[2 + a for a in range(full.ndim - 2) if a not in keep]))
    order = sorted(keep)  # remaining activation axes, in activation order
    return summed.transpose((0, *[1 + order.index(axes[a]) for a in free]))


@takes_task
def attribution_patch_all(
    model: Transformer, task: Task, sites: Sequence[str] | None = None, *, ablation: str = "resample",
    noising: bool | None = None, mesh=None,
) -> tuple[dict[str, np.ndarray], Pairs]:  # fmt: skip
    """Per-element AtP estimates `[L, B, *activation]` of the metric change for each site, one backward.

    `ablation` as in `patch_sweep` ("resample", or "zero" / "mean" noising without corrupt inputs).
    The estimates stay on the device (JAX arrays): copying every site's `[L, B, ...]` array to the
    host costs more than computing it on a GPU. `np.asarray` them where needed."""
    cfg = model.cfg
    sites = [s for s in PATCH_SITES if not (cfg.attn_only and PATCH_SITES[s][0].startswith("mlp."))] if sites is None else list(sites)
    for s in sites:
        check_site_axes(s, ("layer",), cfg)
    pairs = Pairs(model, task, ablation=ablation, noising=noising, mesh=mesh)
    model, metric = pairs.model, pairs.metric  # placed on the mesh, if one is given
    kinds = {s: PATCH_SITES[s][0] for s in sites}
    unique = tuple(sorted(set(kinds.values())))
    source_metric, target_metric, per_kind, (largest, grad) = _atp(model, pairs.source, jnp.asarray(pairs.target_tokens),
                                                                   pairs.mask, pairs.positions, metric, unique)  # fmt: skip
    _metrics(pairs, source_metric, target_metric, unique)
    if flat(float(largest), pairs.clean_metric - pairs.corrupt_metric, float(grad)):
        _flat_warning("AtP", pairs)
    return {s: per_kind[kinds[s]] for s in sites}, pairs


@takes_task
def attribution_patch(
    model: Transformer, task: Task, site: str = "resid_pre", by: Sequence[str] = ("layer", "pos"), *,
    ablation: str = "resample", noising: bool | None = None, mesh=None,
) -> PatchResult:  # fmt: skip
    """AtP estimate of `patch_sweep(...)` with the same arguments, shape and normalisation."""
    t0 = time.perf_counter()
    kind, axes = check_site_axes(site, by, model.cfg)
    est, pairs = attribution_patch_all(model, task, [site], ablation=ablation, noising=noising, mesh=mesh)
    change = np.asarray(_reduce(est[site], axes, by))
    base = pairs.clean_metric if pairs.noising else pairs.corrupt_metric
    return patch_result(pairs, (base + change).astype(np.float32), by, t0, 0)




@eqx.filter_jit
def _ig(model, source: Source, target_tokens, mask, positions, metric, kind: str, steps: int):
    """Mean gradient of the metric w.r.t. every layer's `kind` activation along the straight path
    from the target's token embedding to the source's (midpoint rule), and both runs' activations."""
    cfg = model.cfg
    L = cfg.n_layers
    names = [f"blocks.{l}.{kind}" for l in range(L)]

    def stack(cache):
        return jnp.stack([cache[n] for n in names])

    B, T = target_tokens.shape
    shapes = {n: site_shape(parse_site(n, cfg), cfg, B, T) for n in [*names, "hook_embed"]}
    src, _ = source.values(model, [*names, "hook_embed"], shapes)
    tgt = run(model, target_tokens, cache=names + ["hook_embed"], attention_mask=mask, return_logits=False)
    e_src, e_tgt = src["hook_embed"], tgt.cache["hook_embed"]
    zeros = jnp.zeros_like(stack(tgt.cache))

    def grad_at(alpha):
        def f(delta):
            hooks = [Hook("hook_embed", None, Replace(e_tgt + alpha.astype(e_src.dtype) * (e_src - e_tgt))),
                     Hook(kind, ALL_LAYERS, PerLayer(Add(delta)))]  # fmt: skip
            return hooked_metric(model, target_tokens, mask, positions, metric, hooks)

        return jax.grad(f)(zeros)

    alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
    mean_grad = jnp.mean(jax.lax.map(grad_at, alphas, batch_size=IG_BATCH), axis=0)
    return stack(src), stack(tgt.cache), mean_grad


@takes_task
def integrated_gradients(
    model: Transformer, task: Task, site: str = "resid_pre", by: Sequence[str] = ("layer", "pos"), *,
    steps: int = 16, ablation: str = "resample", noising: bool | None = None, mesh=None,
) -> PatchResult:  # fmt: skip
    """Integrated-gradients estimate of `patch_sweep(...)` (EAP-IG's node score, inputs variant).

    The token embedding moves in `steps` midpoint steps from the target prompt's to the source's
    (zero ablation: to zero, mean: to the mean embedding); each patch's score is `(source - target
    activation) · mean gradient along that path`. With one step at alpha 0 this would be AtP; more
    steps average the gradient where AtP takes it at one end. The steps run as one compiled
    `lax.map` of forward + backward passes.
    """
    t0 = time.perf_counter()
    cfg = model.cfg
    kind, axes = check_site_axes(site, by, cfg)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    pairs = Pairs(model, task, ablation=ablation, noising=noising, mesh=mesh)
    if pairs.ablation != "resample":
        pairs.corrupt_metric = pairs.ablated_metric([kind])
    model, metric = pairs.model, pairs.metric  # placed on the mesh, if one is given
    source, target, grad = _ig(model, pairs.source, jnp.asarray(pairs.target_tokens), pairs.mask, pairs.positions, metric,
                               kind, int(steps))  # fmt: skip
    change = _reduce(np.asarray((source - target) * grad), axes, by)
    base = pairs.clean_metric if pairs.noising else pairs.corrupt_metric
    return patch_result(pairs, (base + change).astype(np.float32), by, t0, 0)


# ---------------------------------------------------------------------------
# AtP*: attention-saturation correction for queries and keys, and GradDrop
# ---------------------------------------------------------------------------

_Q, _K = "attn.hook_q", "attn.hook_k"
_SCORES, _PATTERN = "attn.hook_attn_scores", "attn.hook_pattern"


class _StopGrad(Intervention):
    """The identity on the forward pass; where `drop` is true no gradient flows back through it.
    `PerLayer(_StopGrad(flags))` with `flags` bool `[L]` drops the chosen layers' gradients."""

    drop: Array

    def __call__(self, x):
        return jnp.where(self.drop, jax.lax.stop_gradient(x), x)


def _qk_kinds(cfg) -> tuple[str, str]:
    """The query and key activations the scores are made of (after the rotary embedding, if any)."""
    return ("attn.hook_rot_q", "attn.hook_rot_k") if cfg.positional == "rotary" else (_Q, _K)


def _logits(q: Array, k: Array) -> Array:
    """Attention logits of queries `[L, B, T, H, E]` against keys `[L, B, S, K, E]`: `[L, B, H, T, S]`
    (grouped-query: query head h reads kv head h // G), computed as the model computes them."""
    L, B, T, H, E = q.shape
    K, S = k.shape[3], k.shape[2]
    s = jnp.einsum("lbtkge,lbske->lbkgts", q.reshape(L, B, T, K, H // K, E), k)
    return s.reshape(L, B, H, T, S) / np.sqrt(E).astype(np.float32)


def _leave_one_out_mean(x: Array, g: Array) -> tuple[Array, Array]:
    """For every key s of each row: `logsumexp_{j != s} x[j]` and `sum_{j != s} softmax_{j != s}(x)[j] g[j]`
    (the row's mean of `g` with key s left out), along the last axis, without forming `1 - P[s]`.

    Running (max, sum of exp, sum of exp * g) states are combined by prefix and suffix scans, so
    a saturated row keeps the tiny weights of its other keys where `1 - P[s]` would round to 0.
    """
    low = jnp.finfo(x.dtype).min  # the empty state's max; masked scores hold it too, with weight exp(0)

    def combine(left, right):
        (m1, a1, b1), (m2, a2, b2) = left, right
        m = jnp.maximum(m1, m2)
        w1, w2 = jnp.exp(m1 - m), jnp.exp(m2 - m)
        return m, a1 * w1 + a2 * w2, b1 * w1 + b2 * w2

    state = (x, jnp.ones_like(x), g)
    before = jax.lax.associative_scan(combine, state, axis=x.ndim - 1)
    after = jax.lax.associative_scan(combine, state, reverse=True, axis=x.ndim - 1)
    empty = (jnp.full_like(x[..., :1], low), jnp.zeros_like(x[..., :1]), jnp.zeros_like(x[..., :1]))
    before = tuple(jnp.concatenate([e, p[..., :-1]], axis=-1) for e, p in zip(empty, before))
    after = tuple(jnp.concatenate([p[..., 1:], e], axis=-1) for e, p in zip(empty, after))
    m, a, b = combine(before, after)  # a >= 1 unless the row has no other key (then a = b = 0)
    return m + jnp.log(a), b / jnp.maximum(a, 1.0)


def _repatterned(scores: Array, new_logits: Array) -> Array:
    """The softmax of `new_logits` under the target's masking (masked scores hold `finfo.min`)."""
    masked = scores == jnp.finfo(scores.dtype).min
    return jax.nn.softmax(jnp.where(masked, scores, new_logits), axis=-1)


def _query_star(cfg, src, tgt, grad) -> Array:
    """Saturation-corrected estimate for queries, `[L, B, T, H]` (attn.hook_q's pos, head).

    Patching query (t, h) changes row t of head h's pattern only, so one patched score matrix
    (every row with its source query) gives every row's exact new pattern at once; the metric is
    linearised from the pattern onwards: `sum_s (P_patched - P)[t, s] · dmetric/dP[t, s]`.
    """
    qk, kk = _qk_kinds(cfg)
    patched = _repatterned(tgt[_SCORES], _logits(src[qk], tgt[kk]))
    return jnp.sum((patched - tgt[_PATTERN]) * grad, axis=-1).transpose(0, 1, 3, 2)


def _key_star(cfg, src, tgt, grad, each_key: bool) -> Array:
    """Saturation-corrected estimate for keys, `[L, B, S, K]` (attn.hook_k's pos, kv head).

    each_key: nodes are single key positions. Patching key s adds `d = q[t] · (k_src[s] - k_tgt[s])
    / sqrt(E)` to logit s of every row t of the heads that read it (0 where masked). Only the
    weight of key s changes freely; the other keys keep their proportions, so with
    `P[t, s] = sigmoid(x[t, s] - lse_{j != s} x[t, j])` and `P'` the same with `x + d`:
    `sum_j (P' - P)[t, j] g[t, j] = (P'[t, s] - P[t, s]) (g[t, s] - mean_{j != s} g[t, j])` (mean under
    the row's softmax without key s): every (t, s) at once, no loop, no overflow (the closed form
    `Z' = 1 + P[t, s] expm1(d)` of the renormalisation, written in logits so that rows saturated to
    P = 1 in float32 keep their other keys' weights). Otherwise (a node spans all positions) every
    key of the node changes together: the patched score matrix is recomputed whole.
    """
    qk, kk = _qk_kinds(cfg)
    scores, g = tgt[_SCORES], grad
    if each_key:
        masked = scores == jnp.finfo(scores.dtype).min
        d = jnp.where(masked, 0.0, _logits(tgt[qk], src[kk] - tgt[kk]))
        lse_rest, g_rest = _leave_one_out_mean(scores, g)
        moved = jax.nn.sigmoid(scores + d - lse_rest) - jax.nn.sigmoid(scores - lse_rest)
        est = moved * (g - g_rest)  # [L, B, H, T, S]
        L, B, H, T, S = est.shape
        return est.reshape(L, B, cfg.kv_heads, H // cfg.kv_heads, T, S).sum(axis=(3, 4)).transpose(0, 1, 3, 2)
    patched = _repatterned(scores, _logits(tgt[qk], src[kk]))
    est = jnp.sum((patched - tgt[_PATTERN]) * g, axis=(-2, -1))  # [L, B, H]
    L, B, H = est.shape
    return est.reshape(L, B, cfg.kv_heads, H // cfg.kv_heads).sum(axis=3)[:, :, None, :]  # pos axis summed


@eqx.filter_jit
def _atp_star(model, source: Source, target_tokens, mask, positions, metric, kind: str, each_key: bool,
              graddrop_by: tuple | None):  # fmt: skip
    """`(source metric, target metric, estimate)`.

    Without GradDrop (`graddrop_by` None) the estimate is the signed per-element AtP* change
    `[L, B, *act]` (q: `[L, B, T, H]`, k: `[L, B, S or 1, K]`), reduced by the caller. With
    `graddrop_by = (axes, by)`, for every layer ℓ (a `lax.map`: one compiled program) the backward
    pass runs with the gradient stopped at layer ℓ's `hook_attn_out` and `hook_mlp_out` (forward
    values unchanged), each node's estimate is reduced to `[L, *by sizes]`, and the estimate is
    `sum_ℓ |estimate_ℓ| / (L - 1)`.
    """
    cfg = model.cfg
    L = cfg.n_layers
    qk, kk = _qk_kinds(cfg)
    saturated = kind in (_Q, _K)
    src_kinds = ((qk,) if kind == _Q else (kk,)) if saturated else (kind,)
    tgt_kinds = (qk, kk, _SCORES, _PATTERN) if saturated else (kind,)
    grad_kind = _PATTERN if saturated else kind
    stop_kinds = ("hook_attn_out",) if cfg.attn_only else ("hook_attn_out", "hook_mlp_out")

    def names(kinds):
        return [f"blocks.{l}.{k}" for k in kinds for l in range(L)]

    def stacks(cache, kinds):
        return {k: jnp.stack([cache[f"blocks.{l}.{k}"] for l in range(L)]) for k in kinds}

    src, src_resid = source.stacks(model, src_kinds, *target_tokens.shape)
    zeros = jnp.zeros((L, *site_shape(Site(grad_kind, 0), cfg, *target_tokens.shape)), model.W_E.dtype)

    def f(delta, drop):
        hooks = [Hook(grad_kind, ALL_LAYERS, PerLayer(Add(delta)))]  # before the stops: a layer's own output drops too
        if drop is not None:
            hooks += [Hook(k, ALL_LAYERS, PerLayer(_StopGrad(drop))) for k in stop_kinds]
        out = run(model, target_tokens, hooks=hooks, cache=names(tgt_kinds), attention_mask=mask, return_logits=False)
        return score_resid(model, out.resid, positions, metric), stacks(out.cache, tgt_kinds)

    def estimate(tgt, grad):
        if kind == _Q:
            return _query_star(cfg, src, tgt, grad)
        if kind == _K:
            return _key_star(cfg, src, tgt, grad, each_key)
        return (src[kind] - tgt[kind]) * grad

    src_metric = source_metric(model, src_resid, positions, metric)
    if graddrop_by is None:
        (target_metric, tgt), grad = jax.value_and_grad(f, has_aux=True)(zeros, None)
        return src_metric, target_metric, estimate(tgt, grad)

    axes, by = graddrop_by
    target_metric, tgt = f(zeros, None)

    def dropped(layer):
        grad = jax.grad(lambda d: f(d, jnp.arange(L) == layer)[0])(zeros)
        return jnp.abs(_reduce(estimate(tgt, grad), axes, by))

    return src_metric, target_metric, jnp.sum(jax.lax.map(dropped, jnp.arange(L)), axis=0) / (L - 1)


@takes_task
def atp_star(
    model: Transformer, task: Task, site: str = "z", by: Sequence[str] = ("layer", "pos", "head"), *,
    graddrop: bool = False, ablation: str = "resample", noising: bool | None = None, mesh=None,
) -> PatchResult:  # fmt: skip
    """AtP* (Kramár et al. 2024) estimate of `patch_sweep(...)` with the same arguments and shape.

    Queries and keys (`site="q"` / `"k"`): the attention pattern is recomputed exactly with the
    patched query or key (on the target run's keys or queries, under its causal and padding mask)
    and only the rest of the model is linearised: `sum (pattern_patched - pattern) · dmetric/dpattern`.
    AtP linearises through the softmax as well and misses patches that move a saturated softmax.
    Every other site gets plain AtP (`attribution_patch`). The cost stays one forward of each run
    and one backward.

    Without `graddrop` the result is normalised like `attribution_patch` (`raw` = target metric +
    estimated change; clean 1, corrupt 0) and signed.

    graddrop: AtP with the gradient stopped through one layer's outputs at a time, for every layer
        ℓ: `I_ℓ(n)` = the estimate for node n (a patch of the sweep, all batch rows together) with
        no gradient flowing back through layer ℓ's `hook_attn_out` and `hook_mlp_out` (forward
        values unchanged; saturation correction still applied to q and k). The score is
        `sum_ℓ |I_ℓ(n)| / (L - 1)` (the paper's eq. 11). Dropping a layer below the node's leaves
        its estimate as it is; dropping its own layer zeroes it for every site except `resid_*` (the others
        reach the stream only through that layer's outputs), so such a node of the last layer
        scores `|AtP*(n)|`. `raw` holds that magnitude in metric units and `result` is
        `raw / |clean_metric - corrupt_metric|`: unsigned, >= 0, the same shape. It costs one
        forward and backward per layer (one compiled `lax.map`). Needs at least 2 layers.
        The paper takes |.| per prompt before averaging over prompts; here the node is the
        sweep's patch of the whole batch, so |.| is taken of the batch's estimate.
    """
    t0 = time.perf_counter()
    cfg = model.cfg
    kind, axes = check_site_axes(site, by, cfg)
    by = tuple(by)
    if graddrop and cfg.n_layers < 2:
        raise ValueError(f"GradDrop averages over the other layers; the model has {cfg.n_layers} layer")
    pairs = Pairs(model, task, ablation=ablation, noising=noising, mesh=mesh)
    model, metric = pairs.model, pairs.metric  # placed on the mesh, if one is given
    each_key = kind == _K and "pos" in by  # keys one position at a time: the closed form per key
    source_metric, target_metric, change = _atp_star(
        model, pairs.source, jnp.asarray(pairs.target_tokens), pairs.mask, pairs.positions,
        metric, kind, each_key, (dict(axes), by) if graddrop else None,
    )  # fmt: skip
    _metrics(pairs, source_metric, target_metric, [kind])
    if not graddrop:  # one compiled program per site, whatever `by`: reduced here
        change = _reduce(np.asarray(change), axes, by)
        base = pairs.clean_metric if pairs.noising else pairs.corrupt_metric
        return patch_result(pairs, (base + change).astype(np.float32), by, t0, 0)
    change = np.asarray(change, np.float32)
    gap = abs(pairs.clean_metric - pairs.corrupt_metric)
    flag = degenerate(pairs.clean_metric, pairs.corrupt_metric, "AtP* with GradDrop")
    report_nonfinite(change, by, "AtP* with GradDrop")
    with np.errstate(divide="ignore", invalid="ignore"):
        result = np.full_like(change, np.nan) if flag else (change / np.float32(gap)).astype(np.float32)
    return PatchResult(result, change, pairs.clean_metric, pairs.corrupt_metric, by, time.perf_counter() - t0, 0,
                       pairs.ablation, pairs.noising, flag)  # fmt: skip
