"""Concept vectors and probes: where (and how linearly) a model represents a concept.

Small pure functions on activations gathered with `run(..., cache=[...])`:

- `layer_activations(model, tokens, layers) -> [L, N, D]`: one cached run per chunk of prompts,
  the activation at the last real token (`position="last"`) or the mean over real tokens after
  the first (`"mean"`, the first being BOS when the tokenizer prepends one).
- Linear probes: `train_probe(x [N, D], y [N]) -> Probe` (logistic regression, optax Adam, full
  batch, jitted); `probe_layers(acts [L, N, D], ...) -> [L]` held-out accuracies, with every layer
  trained in ONE compiled program (`jax.vmap` over the layer axis). Features are standardised with
  the train split's mean and standard deviation (stored in the `Probe`, so it applies to raw
  activations); without it the probe's step size would depend on each layer's residual scale, which
  differs from layer to layer.
- `diff_of_means(x, y) -> [D]` unit direction mean(x|y=1) - mean(x|y=0), classified by the midpoint
  of the projected class means (`diff_of_means_layers` for all layers at once).
- TCAV (Kim et al. 2018, "Interpretability Beyond Feature Attribution"): a concept activation vector
  (CAV) is the normal of a probe separating concept from random activations; the directional
  derivative S = grad_h target . CAV at the layer's activation h, taken by `jax.grad` through `run`
  into a zero `Add` delta at the site (the gradient w.r.t. the delta is the gradient w.r.t. h). The
  TCAV score is the fraction of class inputs with S > 0; its significance is a two-sided t-test of
  the concept's scores (one CAV per random set) against random-vs-random CAVs' scores.
- `pca(x [N, D], k)`: SVD of the centred data.
- PURE (Dreyer et al. 2024, "PURE: Turning Polysemantic Neurons Into Pure Features by Identifying
  Relevant Circuits"): per input, gradient x activation of one MLP neuron (at the position where it
  fires most) onto upstream components (the attention heads' `hook_z` of earlier layers and the
  previous layer's MLP neurons); k-means (cosine) on these attribution vectors splits the neuron into
  "virtual neurons", one per circuit.

Shapes: N inputs (prompts), T positions, L layers requested, D the site's width, C CAVs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array

from ..core import ALL_LAYERS, Add, Hook, PerLayer, Result, Transformer, parse_site, run

try:  # tqdm is a dependency of the package, but keep the import soft
    from tqdm.auto import tqdm
except Exception:  # pragma: no cover
    def tqdm(x, **_):
        return x


# ---------------------------------------------------------------------------
# Gathering activations
# ---------------------------------------------------------------------------


def _site_name(layer, site: str, n_layers: int) -> str:
    if isinstance(layer, str):
        if layer != "embed":
            raise ValueError(f"layer {layer!r}: give an int in [0, {n_layers}) or 'embed'")
        return "blocks.0.hook_resid_pre"  # the embedding as it enters layer 0 (positional part included)
    layer = int(layer)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1} (or 'embed')")
    return f"blocks.{layer}.{site}"


def _positions_and_weights(mask: Array, position: str, skip_first: bool) -> Array:
    """Weights [B, T] over positions (one-hot at the last real token, or uniform over the mean's tokens)."""
    mask = mask.astype(jnp.float32)
    T = mask.shape[1]
    if position == "last":
        last = T - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # the last True, whatever the padding side
        return jax.nn.one_hot(last, T, dtype=jnp.float32)
    if position == "mean":
        w = mask
        if skip_first:
            first = jnp.argmax(mask, axis=1)
            w = w * (1.0 - jax.nn.one_hot(first, T, dtype=jnp.float32))
        w = jnp.where(w.sum(1, keepdims=True) > 0, w, mask)  # a one-token prompt: keep its token
        return w / w.sum(1, keepdims=True)
    raise ValueError(f"position must be 'last' or 'mean', got {position!r}")


@eqx.filter_jit
def _gather(model, tokens, mask, names: tuple[str, ...], position: str, skip_first: bool):
    out = run(model, tokens, cache=names, attention_mask=mask, return_logits=False)
    w = _positions_and_weights(mask, position, skip_first)
    return jnp.stack([jnp.einsum("bt,btd->bd", w, out.cache[n].reshape(*tokens.shape, -1)) for n in names])


def _as_mask(tokens: np.ndarray, attention_mask) -> np.ndarray:
    if attention_mask is None:
        return np.ones(tokens.shape, bool)
    m = np.asarray(attention_mask, bool)
    if m.shape != tokens.shape:
        raise ValueError(f"attention_mask has shape {m.shape}; tokens have shape {tokens.shape}")
    return m


def layer_activations(
    model: Transformer,
    tokens,
    layers: Sequence[int | str],
    *,
    site: str = "hook_resid_post",
    position: str = "last",
    attention_mask=None,
    chunk: int = 32,
    skip_first: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """float32 `[L, N, D]`: `site` at each of `layers` (ints, or "embed" for the stream entering layer 0).

    tokens `[N, T]` (right or left padded, with `attention_mask` `[N, T]`). `position="last"` takes
    the last real token; `"mean"` averages real tokens, skipping the first (BOS) when `skip_first`.
    One cached run per chunk of `chunk` prompts; the last chunk is padded so all share one program.
    Per-head sites (e.g. `attn.hook_z`) are flattened to `D = H * E`.
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [N, T], got shape {tokens.shape}")
    mask = _as_mask(tokens, attention_mask)
    if not mask.any(1).all():
        raise ValueError(f"rows {np.flatnonzero(~mask.any(1)).tolist()} of attention_mask have no real token")
    cfg = model.cfg
    names = tuple(_site_name(l, site, cfg.n_layers) for l in layers)
    for n in names:
        parse_site(n, cfg)  # raises with the closest valid names
    if position not in ("last", "mean"):
        raise ValueError(f"position must be 'last' or 'mean', got {position!r}")
    N = tokens.shape[0]
    chunk = max(1, min(chunk, N))
    outs = []
    for s in tqdm(range(0, N, chunk), disable=not progress, desc="activations"):
        t, m = tokens[s : s + chunk], mask[s : s + chunk]
        n = t.shape[0]
        if n < chunk:  # pad with copies of the first row: same shapes, same program
            t = np.concatenate([t, np.repeat(t[:1], chunk - n, 0)])
            m = np.concatenate([m, np.repeat(m[:1], chunk - n, 0)])
        outs.append(np.asarray(_gather(model, jnp.asarray(t), jnp.asarray(m), names, position, skip_first))[:, :n])
    return np.concatenate(outs, axis=1).astype(np.float32)


# ---------------------------------------------------------------------------
# Linear probes
# ---------------------------------------------------------------------------


class Probe(eqx.Module):
    """Logistic regression on standardised features: logit = w . (x - mean) / scale + b."""

    w: Array  # [D]
    b: Array  # []
    mean: Array  # [D]
    scale: Array  # [D]

    def logits(self, x: Array) -> Array:
        """`[N]` logits for raw activations `[N, D]`."""
        return ((x - self.mean) / self.scale) @ self.w + self.b

    @property
    def direction(self) -> Array:
        """The unit normal of the decision boundary in the raw activation space (points to class 1)."""
        v = self.w / self.scale
        return v / jnp.maximum(jnp.linalg.norm(v), 1e-12)


def _check_xy(x, y, what="x"):
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y)
    if x.ndim != 2:
        raise ValueError(f"{what} must be [N, D], got shape {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must be [N] = [{x.shape[0]}] to match {what} {tuple(x.shape)}, got shape {y.shape}")
    yn = np.asarray(y)
    if not np.isin(yn, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {np.unique(yn).tolist()}")
    if len(np.unique(yn)) < 2:
        raise ValueError("labels contain a single class; a probe needs both 0 and 1")
    return x, y.astype(jnp.float32)


def _fit(x: Array, y: Array, key: Array, l2: float, steps: int, lr: float) -> Probe:
    """Traceable logistic-regression fit (vmappable over x, y, key)."""
    mean = x.mean(0)
    scale = x.std(0) + 1e-6
    xs = (x - mean) / scale
    D = x.shape[1]
    params = (1e-3 * jax.random.normal(key, (D,), jnp.float32), jnp.zeros((), jnp.float32))
    opt = optax.adam(lr)

    def loss(p):
        z = xs @ p[0] + p[1]
        return optax.sigmoid_binary_cross_entropy(z, y).mean() + l2 * jnp.sum(p[0] ** 2)

    def step(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction raises a float to an int count
        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return Probe(params[0], params[1], mean, scale)


_fit_jit = jax.jit(_fit, static_argnames=("steps",))
_fit_layers = jax.jit(jax.vmap(_fit, in_axes=(0, None, 0, None, None, None)), static_argnames=("steps",))


def train_probe(x, y, *, l2: float = 1e-3, steps: int = 300, lr: float = 0.05, seed: int = 0,
                key: Array | None = None) -> Probe:  # fmt: skip
    """Logistic regression of `y [N]` (0/1) on `x [N, D]`: full-batch Adam for `steps`, L2 penalty `l2`
    on the standardised weights (initialised N(0, 1e-3) from `key`, default `key(seed)`).
    Standardisation (mean, std per feature) is fitted on `x` only."""
    x, y = _check_xy(x, y)
    return _fit_jit(x, y, jax.random.key(seed) if key is None else key, l2, steps, lr)


def probe_accuracy(probe: Probe, x, y) -> float:
    """Fraction of `x [N, D]` classified as `y [N]` (logit > 0 means class 1)."""
    x = jnp.asarray(x, jnp.float32)
    return float(jnp.mean((probe.logits(x) > 0) == (jnp.asarray(y) == 1)))


def _split(acts, y, train_idx, test_idx):
    acts = jnp.asarray(acts, jnp.float32)
    if acts.ndim != 3:
        raise ValueError(f"acts must be [L, N, D], got shape {acts.shape}")
    N = acts.shape[1]
    tr, te = np.asarray(train_idx), np.asarray(test_idx)
    for name, idx in (("train_idx", tr), ("test_idx", te)):
        if idx.size == 0 or idx.min() < 0 or idx.max() >= N:
            raise ValueError(f"{name} must be non-empty indices in [0, {N}), got range [{idx.min()}, {idx.max()}]")
    if np.intersect1d(tr, te).size:
        raise ValueError(f"train_idx and test_idx overlap at {np.intersect1d(tr, te)[:10].tolist()}")
    _check_xy(acts[0, tr], jnp.asarray(y)[tr], "acts[:, train_idx]")
    yf = jnp.asarray(y).astype(jnp.float32)
    return acts[:, tr], yf[tr], acts[:, te], yf[te]


@dataclasses.dataclass(frozen=True, repr=False)
class LayerProbes(Result):
    """Per-layer logistic probes: held-out and train accuracy, and the probes stacked on a layer axis."""

    accuracy: np.ndarray  # [L] held-out accuracy
    train_accuracy: np.ndarray  # [L]
    probes: Probe  # stacked: w [L, D], b [L], ...


def probe_layers(acts, y, train_idx, test_idx, *, l2: float = 1e-3, steps: int = 300, lr: float = 0.05,
                 seed: int = 0) -> LayerProbes:  # fmt: skip
    """Train one probe per layer of `acts [L, N, D]` on `train_idx`, score on `test_idx`.
    All layers train in one compiled program (vmap over L); layer l uses `fold_in(key(seed), l)`."""
    xtr, ytr, xte, yte = _split(acts, y, train_idx, test_idx)
    L = xtr.shape[0]
    keys = jax.vmap(lambda l: jax.random.fold_in(jax.random.key(seed), l))(jnp.arange(L))
    probes = _fit_layers(xtr, ytr, keys, l2, steps, lr)
    acc = jax.vmap(lambda p, x, yy: jnp.mean((p.logits(x) > 0) == (yy == 1)))
    return LayerProbes(np.asarray(acc(probes, xte, jnp.broadcast_to(yte, xte.shape[:2]))),
                       np.asarray(acc(probes, xtr, jnp.broadcast_to(ytr, xtr.shape[:2]))), probes)  # fmt: skip


# ---------------------------------------------------------------------------
# Difference of means
# ---------------------------------------------------------------------------


def _dom(x: Array, y: Array):
    y1 = y.astype(jnp.float32)
    m1 = (x * y1[:, None]).sum(0) / y1.sum()
    m0 = (x * (1 - y1)[:, None]).sum(0) / (1 - y1).sum()
    d = m1 - m0
    v = d / jnp.maximum(jnp.linalg.norm(d), 1e-12)
    return v, 0.5 * (m1 @ v + m0 @ v)


def diff_of_means(x, y) -> np.ndarray:
    """Unit direction `[D]` from the class-0 mean to the class-1 mean of `x [N, D]`."""
    x, y = _check_xy(x, y)
    return np.asarray(_dom(x, y)[0])


def diff_of_means_accuracy(x_train, y_train, x_test, y_test) -> tuple[np.ndarray, float, float]:
    """`(direction, threshold, held-out accuracy)`: project on the train diff-of-means direction and
    call class 1 above the midpoint of the two projected train class means."""
    x, y = _check_xy(x_train, y_train)
    v, thr = _dom(x, y)
    xt = jnp.asarray(x_test, jnp.float32)
    acc = jnp.mean((xt @ v > thr) == (jnp.asarray(y_test) == 1))
    return np.asarray(v), float(thr), float(acc)


@jax.jit
def _dom_layers(xtr, ytr, xte, yte):
    def one(a, b):
        v, thr = _dom(a, ytr)
        return jnp.mean((b @ v > thr) == (yte == 1)), v

    return jax.vmap(one)(xtr, xte)


def diff_of_means_layers(acts, y, train_idx, test_idx) -> tuple[np.ndarray, np.ndarray]:
    """`(held-out accuracy [L], directions [L, D])` of diff-of-means on every layer of `acts [L, N, D]`."""
    xtr, ytr, xte, yte = _split(acts, y, train_idx, test_idx)
    acc, v = _dom_layers(xtr, ytr, xte, yte)
    return np.asarray(acc), np.asarray(v)


# ---------------------------------------------------------------------------
# TCAV
# ---------------------------------------------------------------------------


def logit_diff_target(good: int, bad: int) -> Callable[[Array], Array]:
    """A TCAV target: `logits[:, good] - logits[:, bad]` on logits `[B, V]` at the scored position."""
    return lambda logits: logits[:, good] - logits[:, bad]


@eqx.filter_jit
def _activation_grads(model, tokens, mask, name: str, target_fn, position: str):
    """Per-input gradient of target(logits at the last real token) w.r.t. the site's activation, [B, D]
    (at the last real token, or summed over real tokens for position="all"). Inputs do not interact,
    so the gradient of the batch sum w.r.t. a zero `Add` delta [B, T, D] holds each input's own."""
    B, T = tokens.shape
    w_last = _positions_and_weights(mask, "last", False)
    D = model.cfg.d_model

    def total(delta):
        out = run(model, tokens, hooks={name: Add(delta)}, attention_mask=mask)
        logits = jnp.einsum("bt,btv->bv", w_last, out.logits)
        return jnp.sum(target_fn(logits))

    g = jax.grad(total)(jnp.zeros((B, T, D), jnp.float32))
    w = w_last if position == "last" else mask.astype(jnp.float32)
    return jnp.einsum("bt,btd->bd", w, g)


def activation_gradients(model: Transformer, tokens, layer, target_fn, *, site: str = "hook_resid_post",
                         attention_mask=None, position: str = "last", chunk: int = 32) -> np.ndarray:  # fmt: skip
    """`[N, D]` gradients of `target_fn(logits [B, V] at each prompt's last real token) -> [B]` w.r.t.
    the residual-stream `site` at `layer` (at the last real token, or summed over tokens with
    `position="all"`). One batched backward pass per chunk (one compiled program)."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [N, T], got shape {tokens.shape}")
    if position not in ("last", "all"):
        raise ValueError(f"position must be 'last' or 'all', got {position!r}")
    name = _site_name(layer, site, model.cfg.n_layers)
    s = parse_site(name, model.cfg)
    if s.kind not in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
        raise ValueError(f"TCAV gradients need a [B, T, D] residual-stream site, got {name!r}")
    mask = _as_mask(tokens, attention_mask)
    N = tokens.shape[0]
    chunk = max(1, min(chunk, N))
    outs = []
    for i in range(0, N, chunk):
        t, m = tokens[i : i + chunk], mask[i : i + chunk]
        n = t.shape[0]
        if n < chunk:
            t = np.concatenate([t, np.repeat(t[:1], chunk - n, 0)])
            m = np.concatenate([m, np.repeat(m[:1], chunk - n, 0)])
        outs.append(np.asarray(_activation_grads(model, jnp.asarray(t), jnp.asarray(m), name, target_fn, position))[:n])
    return np.concatenate(outs).astype(np.float32)


def tcav_scores(grads, cavs) -> tuple[np.ndarray, np.ndarray]:
    """`(scores [C], directional derivatives [C, N])`: S = grads [N, D] . cavs [C, D]; score = frac(S > 0)."""
    grads, cavs = np.asarray(grads, np.float32), np.atleast_2d(np.asarray(cavs, np.float32))
    if grads.ndim != 2 or grads.shape[1] != cavs.shape[1]:
        raise ValueError(f"grads [N, D] and cavs [C, D] disagree: shapes {grads.shape} and {cavs.shape}")
    S = cavs @ grads.T
    return (S > 0).mean(1), S


def significance(concept_scores, random_scores) -> tuple[float, float]:
    """Two-sided Welch t-test of the concept's TCAV scores against random CAVs' scores: `(t, p)`.
    Both samples constant: p = 1 when equal, else 0 (the t statistic is undefined)."""
    a, b = np.asarray(concept_scores, np.float64), np.asarray(random_scores, np.float64)
    if a.std() == 0 and b.std() == 0:
        return (0.0, 1.0) if a.mean() == b.mean() else (float(np.sign(a.mean() - b.mean()) * np.inf), 0.0)
    import warnings

    from scipy.stats import ttest_ind

    with warnings.catch_warnings():  # scipy warns when one sample is (nearly) constant, e.g. all 1.0
        warnings.simplefilter("ignore", RuntimeWarning)
        r = ttest_ind(a, b, equal_var=False)
    return float(r.statistic), float(r.pvalue)


@dataclasses.dataclass(frozen=True, repr=False)
class TCAVResult(Result):
    """TCAV score of a concept with the random-CAV scores it is tested against and the t-test's p-value."""

    score: float  # mean TCAV score of the concept's CAVs
    concept_scores: np.ndarray  # [R] one per random set the concept was contrasted with
    random_scores: np.ndarray  # [R] random_r vs random_{r+1 mod R}
    t: float
    p_value: float
    cav_accuracy: np.ndarray  # [R] train accuracy of the concept CAV probes
    cavs: np.ndarray  # [R, D] unit concept CAVs
    derivatives: np.ndarray  # [R, N] directional derivatives of the class inputs along each concept CAV


def cav_pairs(pairs: Sequence[tuple], *, l2: float = 1e-3, steps: int = 300, lr: float = 0.05,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """`(cavs [R, D], train accuracy [R])`: for each `(positive [P, D], negative [Q, D])` pair, the unit
    probe normal separating positive (label 1) from negative (label 0). Pairs of equal shapes train
    in one vmapped program (pair r uses `fold_in(key(seed), r)`)."""
    pairs = [(np.asarray(a, np.float32), np.asarray(b, np.float32)) for a, b in pairs]
    D = pairs[0][0].shape[-1]
    for a, b in pairs:
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != D or b.shape[1] != D:
            raise ValueError(f"activation sets must be [n, D] with D = {D}, got {a.shape} and {b.shape}")
    cavs, accs = [None] * len(pairs), [None] * len(pairs)
    groups: dict = {}
    for r, (a, b) in enumerate(pairs):
        groups.setdefault((len(a), len(b)), []).append(r)
    for (P, Q), idx in groups.items():
        x = jnp.stack([jnp.concatenate([pairs[r][0], pairs[r][1]]) for r in idx])
        y = jnp.concatenate([jnp.ones(P), jnp.zeros(Q)])
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(jnp.asarray(idx))
        probes = _fit_layers(x, y, keys, l2, steps, lr)
        acc = np.asarray(jax.vmap(lambda p, xx: jnp.mean((p.logits(xx) > 0) == (y == 1)))(probes, x))
        dirs = np.asarray(jax.vmap(lambda p: p.direction)(probes))
        for j, r in enumerate(idx):
            cavs[r], accs[r] = dirs[j], acc[j]
    return np.stack(cavs), np.asarray(accs)


def tcav(model: Transformer, tokens_class, concept_acts, random_acts_list: Sequence, layer, target_fn, *,
         site: str = "hook_resid_post", attention_mask=None, position: str = "last", l2: float = 1e-3,
         steps: int = 300, lr: float = 0.05, seed: int = 0, chunk: int = 32) -> TCAVResult:  # fmt: skip
    """TCAV of a concept for `target_fn` on class inputs `tokens_class [N, T]` at `layer`.

    concept_acts `[P, D]` and each of `random_acts_list` (R >= 2 sets `[Q, D]`) are activations at
    the same layer and site (e.g. from `layer_activations`). Concept CAVs: concept vs random_r for
    every r; random CAVs: random_r vs random_{(r+1) mod R}. The gradients of the class inputs are
    computed once (`activation_gradients`) and dotted with every CAV. p-value: two-sided Welch
    t-test of the R concept scores against the R random scores.
    """
    R = len(random_acts_list)
    if R < 2:
        raise ValueError(f"TCAV's significance test needs at least 2 random sets, got {R}")
    grads = activation_gradients(model, tokens_class, layer, target_fn, site=site, attention_mask=attention_mask,
                                 position=position, chunk=chunk)  # fmt: skip
    D = grads.shape[1]
    if np.shape(concept_acts)[-1] != D:
        raise ValueError(f"concept_acts have width {np.shape(concept_acts)[-1]}; the site has d_model {D}")
    pairs = [(concept_acts, rnd) for rnd in random_acts_list]
    pairs += [(random_acts_list[r], random_acts_list[(r + 1) % R]) for r in range(R)]
    all_cavs, all_acc = cav_pairs(pairs, l2=l2, steps=steps, lr=lr, seed=seed)
    cavs, cav_acc = all_cavs[:R], all_acc[:R]
    c_scores, S = tcav_scores(grads, cavs)
    r_scores, _ = tcav_scores(grads, all_cavs[R:])
    t, p = significance(c_scores, r_scores)
    return TCAVResult(float(c_scores.mean()), c_scores, r_scores, t, p, cav_acc, cavs, S)


# ---------------------------------------------------------------------------
# PCA
# ---------------------------------------------------------------------------


def pca(x, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(components [k, D], explained_variance_ratio [k], projected [N, k])` from the SVD of the centred `x [N, D]`."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"x must be [N, D], got shape {x.shape}")
    if not 1 <= k <= min(x.shape):
        raise ValueError(f"k must be in [1, {min(x.shape)}] for x of shape {x.shape}, got {k}")
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    var = s**2
    ratio = var / var.sum() if var.sum() > 0 else np.zeros_like(var)
    return vt[:k].astype(np.float32), ratio[:k].astype(np.float32), (xc @ vt[:k].T).astype(np.float32)


# ---------------------------------------------------------------------------
# PURE
# ---------------------------------------------------------------------------


@eqx.filter_jit
def _post(model, tokens, mask, layer: int):
    name = f"blocks.{layer}.mlp.hook_post"
    return run(model, tokens, cache=(name,), attention_mask=mask, stop_layer=layer + 1).cache[name]


def neuron_activations(model: Transformer, tokens, layer: int, neurons=None, *, chunk: int = 32,
                       attention_mask=None) -> np.ndarray:  # fmt: skip
    """`[N, T, M']` activations of `blocks.{layer}.mlp.hook_post` (all neurons, or the given indices)."""
    tokens = np.asarray(tokens, np.int32)
    name = f"blocks.{int(layer)}.mlp.hook_post"
    parse_site(name, model.cfg)
    mask = _as_mask(tokens, attention_mask)
    outs = []
    chunk = max(1, min(chunk, len(tokens)))
    for i in range(0, len(tokens), chunk):
        t, m = tokens[i : i + chunk], mask[i : i + chunk]
        n = len(t)
        if n < chunk:  # pad with copies of the first row: one program for every chunk
            t, m = np.concatenate([t, np.repeat(t[:1], chunk - n, 0)]), np.concatenate([m, np.repeat(m[:1], chunk - n, 0)])
        a = np.asarray(_post(model, jnp.asarray(t), jnp.asarray(m), int(layer)))[:n]
        a = np.where(mask[i : i + chunk, :, None], a, -np.inf)
        outs.append(a if neurons is None else a[..., np.asarray(neurons)])
    return np.concatenate(outs)


@eqx.filter_jit
def _neuron_attr(model, tokens, pos, layer: int, neuron: Array, heads: bool, neurons: bool):
    """Gradient x activation of post[b, pos_b, neuron] at `layer` onto the heads (z) of layers < layer
    and the neurons of layer - 1, per input: ([B, layer, H], [B, M]). `neuron` is traced: one program per layer."""
    cfg = model.cfg
    B, T = tokens.shape
    post_name = f"blocks.{layer}.mlp.hook_post"
    prev = f"blocks.{layer - 1}.mlp.hook_post"
    z_names = tuple(f"blocks.{j}.attn.hook_z" for j in range(layer))

    def target(deltas):
        dz, dn = deltas
        hooks = [Hook("attn.hook_z", ALL_LAYERS, PerLayer(Add(dz)))]
        if dn is not None:
            hooks.append(Hook("mlp.hook_post", layer - 1, Add(dn)))
        out = run(model, tokens, hooks=hooks, cache=(post_name, prev, *z_names) if neurons else (post_name, *z_names),
                  stop_layer=layer + 1)  # fmt: skip
        act = out.cache[post_name][jnp.arange(B), pos, neuron]
        return act.sum(), (act, out.cache)

    dz = jnp.zeros((cfg.n_layers, B, T, cfg.n_heads, cfg.d_head), jnp.float32)
    dn = jnp.zeros((B, T, cfg.d_mlp), jnp.float32) if neurons else None
    (gz, gn), (act, cache) = jax.grad(target, has_aux=True)((dz, dn))
    z = jnp.stack([cache[n] for n in z_names]) if layer > 0 else jnp.zeros((0, B, T, cfg.n_heads, cfg.d_head))
    head_attr = jnp.einsum("lbthe,lbthe->blh", gz[:layer], z)
    neuron_attr = jnp.einsum("btm,btm->bm", gn, cache[prev]) if neurons else jnp.zeros((B, 0))
    return act, head_attr, neuron_attr


@dataclasses.dataclass(frozen=True, repr=False)
class NeuronAttribution(Result):
    """PURE's gradient x activation attributions of a neuron onto earlier heads and neurons, per input."""

    activation: np.ndarray  # [N] the neuron's activation at its max position
    position: np.ndarray  # [N] that position
    attributions: np.ndarray  # [N, C] gradient x activation per upstream component
    components: list[str]  # [C] names: "L{j}H{h}" heads, then "L{l-1}N{m}" neurons


def neuron_attributions(model: Transformer, tokens, layer: int, neuron: int, *, heads: bool = True,
                        neurons: bool = True, chunk: int = 16, skip: int = 1,
                        progress: bool = False) -> NeuronAttribution:  # fmt: skip
    """Per input in `tokens [N, T]` (unpadded contexts), gradient x activation of the neuron
    `blocks.{layer}.mlp.hook_post[..., neuron]` at the position (>= `skip`, so BOS is never chosen
    by default) where it fires most, onto upstream
    components: each head's z of layers < layer (summed over positions and d_head) and each neuron of
    layer - 1 (summed over positions). One batched backward per chunk."""
    cfg = model.cfg
    if not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer {layer} is out of range [0, {cfg.n_layers})")
    if cfg.attn_only or cfg.d_mlp is None:
        raise ValueError("PURE needs a model with MLPs")
    if not 0 <= neuron < cfg.d_mlp:
        raise ValueError(f"neuron {neuron} is out of range [0, {cfg.d_mlp})")
    neurons = neurons and layer > 0
    if not (heads and layer > 0) and not neurons:
        raise ValueError(f"layer {layer} has no upstream heads/neurons to attribute to (pick layer >= 1)")
    tokens = np.asarray(tokens, np.int32)
    if not 0 <= skip < tokens.shape[1]:
        raise ValueError(f"skip must be in [0, {tokens.shape[1]}) for contexts of {tokens.shape[1]} tokens, got {skip}")
    acts = neuron_activations(model, tokens, layer, [neuron], chunk=chunk)[..., 0]
    pos = skip + acts[:, skip:].argmax(1)
    res = []
    for i in tqdm(range(0, len(tokens), chunk), disable=not progress, desc="PURE attributions"):
        t, p = tokens[i : i + chunk], pos[i : i + chunk]
        n = len(t)
        if n < chunk:
            t, p = np.concatenate([t, np.repeat(t[:1], chunk - n, 0)]), np.concatenate([p, np.repeat(p[:1], chunk - n)])
        a, h, m = _neuron_attr(model, jnp.asarray(t), jnp.asarray(p), int(layer), jnp.int32(neuron), heads, neurons)
        parts = ([np.asarray(h).reshape(chunk, -1)] if heads else []) + ([np.asarray(m)] if neurons else [])
        res.append((np.asarray(a)[:n], np.concatenate(parts, 1)[:n]))
    names = ([f"L{j}H{h}" for j in range(layer) for h in range(cfg.n_heads)] if heads else []) + (
        [f"L{layer - 1}N{m}" for m in range(cfg.d_mlp)] if neurons else [])  # fmt: skip
    return NeuronAttribution(np.concatenate([r[0] for r in res]), pos, np.concatenate([r[1] for r in res]), names)


def kmeans_cosine(x, k: int = 2, *, seed: int = 0, n_init: int = 10, iters: int = 100) -> np.ndarray:
    """Spherical k-means: cluster the rows of `x [N, C]` after L2 normalisation; `[N]` labels in [0, k).
    The best of `n_init` seeded k-means++ starts (by total cosine similarity to the centroids)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < k:
        raise ValueError(f"x must be [N, C] with N >= k = {k}, got shape {x.shape}")
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    best, best_obj = None, -np.inf
    for _ in range(n_init):
        c = [u[rng.integers(len(u))]]
        for _ in range(1, k):  # k-means++ on cosine distance
            d = np.clip(1 - np.max(u @ np.stack(c).T, axis=1), 0, None)
            c.append(u[rng.choice(len(u), p=d / d.sum())] if d.sum() > 0 else u[rng.integers(len(u))])
        c = np.stack(c)
        lab = None
        for _ in range(iters):
            new = np.argmax(u @ c.T, axis=1)
            if lab is not None and (new == lab).all():
                break
            lab = new
            for j in range(k):
                if (lab == j).any():
                    m = u[lab == j].sum(0)
                    c[j] = m / max(np.linalg.norm(m), 1e-12)
        obj = np.sum(np.max(u @ c.T, axis=1))
        if obj > best_obj:
            best, best_obj = lab, obj
    return best


def silhouette_cosine(x, labels) -> float:
    """Mean silhouette of `labels` on the rows of `x` with cosine distance (1 = well separated, 0 = none)."""
    x = np.asarray(x, np.float64)
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    d = 1 - u @ u.T
    labels = np.asarray(labels)
    ks = np.unique(labels)
    if len(ks) < 2:
        return 0.0
    s = np.zeros(len(u))
    for i in range(len(u)):
        same = labels == labels[i]
        if same.sum() <= 1:
            continue
        a = d[i, same].sum() / (same.sum() - 1)
        b = min(d[i, labels == k].mean() for k in ks if k != labels[i])
        s[i] = (b - a) / max(a, b, 1e-12)
    return float(s.mean())


@dataclasses.dataclass(frozen=True, repr=False)
class PureSplit(Result):
    """A neuron split into virtual neurons: cluster labels, per-cluster activations, each cluster's upstream circuit, silhouette, centroids."""

    labels: np.ndarray  # [N] the virtual neuron (cluster) of each input
    virtual_activations: np.ndarray  # [k, N] the neuron's activation on its cluster's inputs, 0 elsewhere
    circuits: list[list[tuple[str, float]]]  # per cluster: top upstream components (name, mean attribution)
    circuit_fraction: np.ndarray  # [k, k]: inputs of cluster a, share of |attribution| on circuit b's components
    silhouette: float  # cosine silhouette of the clustering
    centroids: np.ndarray  # [k, C] mean attribution vector per cluster


def pure_split(attributions, activation, components: Sequence[str], *, k: int = 2, top: int = 8,
               seed: int = 0) -> PureSplit:  # fmt: skip
    """Split a neuron into `k` virtual neurons by clustering its inputs' attribution vectors.

    attributions `[N, C]` (e.g. `neuron_attributions(...).attributions`), activation `[N]`.
    Circuit of cluster c: the `top` components with the largest mean attribution over its inputs.
    `circuit_fraction[a, b]`: over inputs of cluster a, the mean share of the total |attribution| that
    falls on circuit b's components (a clean split has a large diagonal and a small off-diagonal).
    """
    A = np.asarray(attributions, np.float64)
    act = np.asarray(activation, np.float64)
    if A.ndim != 2 or act.shape != (A.shape[0],) or len(components) != A.shape[1]:
        raise ValueError(f"attributions [N, C] {A.shape}, activation [N] {act.shape} and {len(components)} "
                         "component names must agree")  # fmt: skip
    labels = kmeans_cosine(A, k, seed=seed)
    centroids = np.stack([A[labels == c].mean(0) if (labels == c).any() else np.zeros(A.shape[1]) for c in range(k)])
    tops = [np.argsort(-centroids[c])[:top] for c in range(k)]
    circuits = [[(components[j], float(centroids[c, j])) for j in tops[c]] for c in range(k)]
    tot = np.abs(A).sum(1) + 1e-12
    frac = np.zeros((k, k))
    for a in range(k):
        rows = labels == a
        for b in range(k):
            frac[a, b] = (np.abs(A[rows][:, tops[b]]).sum(1) / tot[rows]).mean() if rows.any() else np.nan
    virtual = np.stack([np.where(labels == c, act, 0.0) for c in range(k)])
    return PureSplit(labels, virtual, circuits, frac, silhouette_cosine(A, labels), centroids)
