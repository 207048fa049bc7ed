"""Distributed alignment search (Geiger et al. 2023): find a linear subspace of one site that
carries a high-level causal variable.

An interchange intervention at site `s` (a `[B, T, D]` residual-like activation), position
`pos[b]` of each base row, with an orthonormal basis `R` (`[n, D]`, rows orthonormal) and
per-direction weights `w` (`[n]`, 1 = swap that rotated coordinate, 0 = keep it):

    h' = h_base + R^T diag(w) (R h_src - R h_base)

Variants (`method=`):
    "das"        full DAS: a learned `D x D` rotation, the first `k` rotated coordinates swapped
                 (`w = [1]*k + [0]*(D-k)`). Since the other rows get weight 0, the intervention only
                 depends on the first k rows; the full rotation is the paper's parametrisation.
    "low_rank"   a learned `[k, D]` orthonormal basis only (cheaper: QR of `[D, k]`).
    "boundless"  Boundless DAS (Wu et al. 2023): full rotation, a soft mask
                 `w_i = sigmoid((boundary - i) / temperature)` with a learned boundary and a
                 temperature annealed geometrically from `temperature[0]` to `temperature[1]`
                 during training; a penalty `boundary_penalty * boundary / D` keeps it small.

Orthogonality: the basis is the Q factor of a free matrix (`jnp.linalg.qr`, signs fixed so that
diag(R) > 0, which makes the map smooth and unique). Chosen over the matrix exponential because it
is exact to float precision for any parameter value, and because low-rank DAS needs only a
`[D, k]` QR (O(D k^2)) while `expm` of a skew-symmetric matrix always costs O(D^3).

The source activation comes from one cached source run (`run(..., cache=[site])`); the base
run is the ordinary `run` with a `Hook(kind, layer, Interchange(...))` - no second forward path.
Layers are searched by one compiled program: the layer is a traced int (in the `Hook` and in
`start_layer`: the base run starts at the searched layer from its cached `hook_resid_pre`, so the
unchanged earlier layers are not recomputed); `chunk > 1` vmaps that many layers at once.

Training: Adam (optax) on the cross-entropy of the candidate-token logits (at `readout_pos`)
of the intervened base run against the high-level model's counterfactual label. IIA
(interchange-intervention accuracy) = fraction of held-out pairs whose argmax over the
candidate tokens equals the counterfactual label.

Shapes: tokens int `[N, T]`; `pos`, `source_pos`, `readout_pos`, `labels` int `[N]`;
`candidates` int `[N, C]` (token ids); source activation `[N, D]`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ..core import Hook, Intervention, Result, Transformer, layer_kinds, parse_site, run, unembed
from ..scale import check_divides, round_to, shard_model

METHODS = ("das", "low_rank", "boundless")


# ---------------------------------------------------------------------------------------------
# The intervention


def orthonormal_rows(param: Array) -> Array:
    """`[D, n]` free matrix (n <= D) -> `[n, D]` with orthonormal rows (QR, signs fixed by diag(R) > 0)."""
    q, r = jnp.linalg.qr(param)
    sign = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(q.dtype)
    return (q * sign[None, :]).T


def random_basis(key: Array, d_model: int, k: int) -> Array:
    """A random `[k, D]` orthonormal basis (the first k rows of a Haar-random rotation)."""
    _check_k(k, d_model)
    return orthonormal_rows(jax.random.normal(key, (d_model, k), jnp.float32))


def boundless_mask(boundary: Array, temperature: Array | float, n: int) -> Array:
    """Soft interchange weights `sigmoid((boundary - i) / temperature)`, i = 0.5, 1.5, ... (`[n]`)."""
    i = jnp.arange(n, dtype=jnp.float32) + 0.5
    return jax.nn.sigmoid((boundary - i) / jnp.asarray(temperature, jnp.float32))


def interchange(x: Array, source: Array, pos: Array, basis: Array, weights: Array) -> Array:
    """`x [B, T, D]` with row b at `pos[b]` replaced by `h + R^T diag(w) (R s - R h)` (s = `source [B, D]`)."""
    rows = jnp.arange(x.shape[0])
    h = x[rows, pos]
    coef = ((source.astype(x.dtype) - h) @ basis.T) * weights  # [B, n]
    return x.at[rows, pos].add((coef @ basis).astype(x.dtype))


class Interchange(Intervention):
    """The DAS interchange as an intervention: holds the source activation, positions and basis."""

    source: Array  # [B, D] source activation at the swapped position of each row
    pos: Array  # [B] int, base position of each row
    basis: Array  # [n, D] orthonormal rows
    weights: Array  # [n], 1 = swap this rotated coordinate

    def __call__(self, x):
        return interchange(x, self.source, self.pos, self.basis, self.weights)

    def check(self, x, site):
        if x.ndim != 3:
            raise ValueError(f"DAS interchanges a [B, T, D] activation; site {site!r} has shape {tuple(x.shape)}")
        B, _, D = x.shape
        if tuple(self.source.shape) != (B, D):
            raise ValueError(f"source activation for site {site!r} has shape {tuple(self.source.shape)}, but the base "
                             f"run there needs [B, D] = {(B, D)} (activation shape {tuple(x.shape)})")
        if tuple(self.pos.shape) != (B,):
            raise ValueError(f"pos for site {site!r} has shape {tuple(self.pos.shape)}; need one position per row, {(B,)}")
        if self.basis.ndim != 2 or self.basis.shape[1] != D or self.weights.shape != self.basis.shape[:1]:
            raise ValueError(f"basis {tuple(self.basis.shape)} / weights {tuple(self.weights.shape)} for site {site!r} "
                             f"need shapes [n, {D}] / [n]")


# ---------------------------------------------------------------------------------------------
# Parameters


class DASParams(eqx.Module):
    """Trainable DAS parameters: `param [D, n]` (basis = QR of it) and `log_boundary` (Boundless only)."""

    param: Array
    log_boundary: Array


def _check_k(k, d_model):
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= d_model):
        raise ValueError(f"k (the number of interchanged dimensions) must be an int in [1, {d_model}] (d_model), got {k!r}")


def das_init(key: Array, d_model: int, k: int, method: str = "das") -> DASParams:
    """Random orthonormal start: `[D, D]` for "das"/"boundless", `[D, k]` for "low_rank"; boundary k."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_k(k, d_model)
    n = k if method == "low_rank" else d_model
    param = orthonormal_rows(jax.random.normal(key, (d_model, n), jnp.float32)).T
    return DASParams(param, jnp.log(jnp.float32(k)))


def basis_and_weights(params: DASParams, k: int, method: str, temperature: Array | float = 0.1) -> tuple[Array, Array]:
    """`(basis [n, D], weights [n])` of the interchange these parameters define."""
    basis = orthonormal_rows(params.param)
    n = basis.shape[0]
    if method == "boundless":
        return basis, boundless_mask(jnp.exp(params.log_boundary), temperature, n)
    return basis, (jnp.arange(n) < k).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Intervened runs


def _check_layer_kind(model, kind, layer):
    cfg = model.cfg
    if kind not in layer_kinds(cfg):
        parse_site(f"blocks.0.{kind}", cfg)  # raises with the closest valid names
    if isinstance(layer, (int, np.integer)) and not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer {layer} is out of range: this model has layers 0..{cfg.n_layers - 1}")


def intervened_logits(model: Transformer, tokens: Array, source: Array, pos: Array, basis: Array, weights: Array,
                      candidates: Array, *, kind: str = "hook_resid_pre", layer: Any = 0,
                      readout_pos: Array | None = None, attention_mask: Array | None = None,
                      base_resid: Array | None = None) -> Array:  # fmt: skip
    """Candidate logits `[B, C]` at `readout_pos` of the base run with the interchange at `blocks.{layer}.{kind}`.

    base_resid: the base run's `blocks.{layer}.hook_resid_pre` `[B, T, D]`; when given the run
    starts at `layer` (the earlier layers' output is unchanged by the intervention).
    """
    tokens = jnp.asarray(tokens)
    B, T = tokens.shape
    hook = Hook(kind, layer, Interchange(jnp.asarray(source), jnp.asarray(pos, jnp.int32), basis, weights))
    kw = dict(hooks=[hook], attention_mask=attention_mask, return_logits=False)
    if base_resid is not None:
        kw.update(start_layer=jnp.asarray(layer, jnp.int32), resid=base_resid)
    resid = run(model, tokens, **kw).resid
    readout = jnp.full((B,), T - 1, jnp.int32) if readout_pos is None else jnp.asarray(readout_pos, jnp.int32)
    logits = unembed(model, resid[jnp.arange(B), readout])
    return jnp.take_along_axis(logits, jnp.asarray(candidates, jnp.int32), axis=-1)


# ---------------------------------------------------------------------------------------------
# Training and the layer search


@dataclasses.dataclass(frozen=True, repr=False)
class DASResult(Result):
    """Per searched layer: IIA of the trained interchange, a random rotation (same k) and the full
    vector (k = D, ordinary activation patching), on held-out pairs; training curves and bases."""

    kind: str
    layers: list[int]
    k: int
    method: str
    iia: np.ndarray  # [L] trained, held-out
    iia_random: np.ndarray  # [L]
    iia_full: np.ndarray  # [L]
    iia_train: np.ndarray  # [L] trained, on the training pairs
    correct: np.ndarray  # [L, n_test] bool, per held-out pair (trained), for IIA over any subset
    correct_random: np.ndarray  # [L, n_test]
    correct_full: np.ndarray  # [L, n_test]
    base_accuracy: float  # unintervened argmax == counterfactual label on held-out pairs
    losses: np.ndarray  # [L, steps]
    basis: np.ndarray  # [L, n, D]
    weights: np.ndarray  # [L, n] interchange weights at the end (soft for boundless)
    n_train: int
    n_test: int

    def to_json(self) -> dict:
        return dict(kind=self.kind, layers=self.layers, k=self.k, method=self.method, n_train=self.n_train,
                    n_test=self.n_test, iia=self.iia.tolist(), iia_random=self.iia_random.tolist(),
                    iia_full=self.iia_full.tolist(), iia_train=self.iia_train.tolist(),
                    base_accuracy=self.base_accuracy, final_loss=self.losses[:, -1].tolist(),
                    effective_k=self.weights.sum(-1).tolist())  # fmt: skip


def _fit_layer(model, layer, src, base_resid, data, init, key, *, kind, k, method, steps, lr, boundary_lr,
               temps, boundary_penalty, mesh=None):  # fmt: skip
    """Train one layer's interchange and evaluate it (pure; `layer` may be traced). Returns a dict.

    mesh: each minibatch is split over its `data` axis (a sharding constraint; gradients are
    all-reduced by XLA)."""
    tr, te = data["train"], data["test"]
    if mesh is None:
        split = lambda x: x  # noqa: E731
    else:
        split = lambda x: jax.lax.with_sharding_constraint(  # noqa: E731
            x, NamedSharding(mesh, P("data", *([None] * (x.ndim - 1)))))
    D = model.cfg.d_model
    labels = lambda p: "bnd" if p == "log_boundary" else "rot"  # noqa: E731
    opt = optax.multi_transform({"rot": optax.adam(lr), "bnd": optax.adam(boundary_lr)},
                                DASParams(labels("param"), labels("log_boundary")))  # fmt: skip

    def logits_of(p, part, idx, temp):
        basis, w = basis_and_weights(p, k, method, temp)
        return intervened_logits(model, split(part["tokens"][idx]), split(src[part["which"]][idx]),
                                 split(part["pos"][idx]), basis, w, split(part["candidates"][idx]), kind=kind,
                                 layer=layer, readout_pos=split(part["readout"][idx]),
                                 attention_mask=None if part["mask"] is None else split(part["mask"][idx]),
                                 base_resid=split(base_resid[part["which"]][idx]))  # fmt: skip

    def loss_fn(p, idx, temp):
        logits = logits_of(p, tr, idx, temp)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, tr["labels"][idx]).mean()
        if method == "boundless":
            loss = loss + boundary_penalty * jnp.exp(p.log_boundary) / D
        return loss

    def step(carry, xs):
        p, s = carry
        idx, temp = xs
        loss, g = jax.value_and_grad(loss_fn)(p, idx, temp)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction raises a float to an int32 count
            upd, s = opt.update(g, s, p)
        return (optax.apply_updates(p, upd), s), loss

    (p, _), losses = jax.lax.scan(step, (init, opt.init(init)), (data["batches"], temps))
    final_t = temps[-1]
    all_te = jnp.arange(te["tokens"].shape[0])
    all_tr = jnp.arange(tr["tokens"].shape[0])

    def acc(part, idx, basis, w):
        logits = intervened_logits(model, part["tokens"][idx], src[part["which"]][idx], part["pos"][idx], basis, w,
                                   part["candidates"][idx], kind=kind, layer=layer, readout_pos=part["readout"][idx],
                                   attention_mask=None if part["mask"] is None else part["mask"][idx],
                                   base_resid=base_resid[part["which"]][idx])  # fmt: skip
        return jnp.argmax(logits, axis=-1) == part["labels"][idx]  # [n] per-pair success

    basis, w = basis_and_weights(p, k, method, final_t)
    rand = random_basis(key, D, k)
    eye = jnp.eye(D, dtype=jnp.float32)
    return dict(correct=acc(te, all_te, basis, w), correct_train=acc(tr, all_tr, basis, w),
                correct_random=acc(te, all_te, rand, jnp.ones((k,), jnp.float32)),
                correct_full=acc(te, all_te, eye, jnp.ones((D,), jnp.float32)), losses=losses, basis=basis, weights=w)


# Module-level compiled programs, so that every `das_search` call (other positions, other pair sets of
# the same shapes, the CLI run twice in a process) reuses them instead of compiling a fresh closure.
_fit_one = eqx.filter_jit(_fit_layer)


@eqx.filter_jit
def _fit_stack(model, layers, src, base_resid, data, inits, keys, **hp):
    """`_fit_layer` vmapped over a chunk of layers (their sources, base streams, inits and keys)."""
    mesh = hp.get("mesh")
    axis = None if mesh is None else "sweep"  # the layer axis of the stack is split over `sweep`
    fit = lambda l, s, b, i, kk: _fit_layer(model, l, s, b, data, i, kk, **hp)  # noqa: E731
    return jax.vmap(fit, spmd_axis_name=axis)(layers, src, base_resid, inits, keys)


def das_search(model: Transformer, base_tokens, source_tokens, labels, candidates, *, kind: str = "hook_resid_pre",
               layers=None, pos=None, source_pos=None, readout_pos=None, attention_mask=None,
               source_attention_mask=None, k: int = 1, method: str = "das", n_train: int | None = None,
               steps: int = 100, batch_size: int = 32, lr: float = 1e-2, boundary_lr: float = 5e-2,
               temperature: tuple[float, float] = (50.0, 0.1), boundary_penalty: float = 1.0, chunk: int = 1,
               seed: int = 0, progress: bool = True, mesh=None) -> DASResult:  # fmt: skip
    """Train DAS at `blocks.{l}.{kind}` for every `l` in `layers` and measure held-out IIA.

    Pairs: row i is base `base_tokens[i]` with source `source_tokens[i]`; the high-level model's
    counterfactual answer is `candidates[i, labels[i]]`. The first `n_train` pairs train (default
    two thirds), the rest are held out. `pos` / `source_pos`: the swapped position in the base /
    source row (default the last real token); `readout_pos`: where the answer is read (default the
    last real token of the base row). `chunk`: layers trained at once by `jax.vmap` (1: a loop
    over layers reusing one compiled program, which skips the layers below each searched one).
    mesh: a `make_mesh` mesh: each minibatch split over `data` (`batch_size` must divide it), a
        chunk of layers over `sweep` (`chunk` is rounded up to a multiple of it), weights over `model`.
    """
    cfg = model.cfg
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_k(k, cfg.d_model)
    layers = list(range(cfg.n_layers)) if layers is None else [int(l) for l in np.atleast_1d(layers)]
    for l in layers:
        _check_layer_kind(model, kind, l)
    base_tokens, source_tokens = np.asarray(base_tokens, np.int32), np.asarray(source_tokens, np.int32)
    N, T = base_tokens.shape
    if source_tokens.shape[0] != N:
        raise ValueError(f"base_tokens has {N} rows but source_tokens has {source_tokens.shape[0]}: one source per base")
    labels, candidates = np.asarray(labels, np.int32), np.asarray(candidates, np.int32)
    if labels.shape != (N,) or candidates.ndim != 2 or candidates.shape[0] != N:
        raise ValueError(f"labels {labels.shape} / candidates {candidates.shape} must be [N] / [N, C] with N = {N}")
    if labels.min() < 0 or labels.max() >= candidates.shape[1]:
        raise ValueError(f"labels index candidates: need values in [0, {candidates.shape[1] - 1}]")
    last = lambda m, n, t: np.full(n, t - 1, np.int32) if m is None else np.asarray(m).sum(1).astype(np.int32) - 1  # noqa: E731
    pos = last(attention_mask, N, T) if pos is None else np.asarray(pos, np.int32)
    source_pos = last(source_attention_mask, N, source_tokens.shape[1]) if source_pos is None else np.asarray(source_pos, np.int32)
    readout_pos = last(attention_mask, N, T) if readout_pos is None else np.asarray(readout_pos, np.int32)
    n_train = (2 * N) // 3 if n_train is None else int(n_train)
    if mesh is not None:
        check_divides(min(batch_size, n_train), mesh, "data", "a DAS minibatch")
        model = shard_model(model, mesh)
    if not 0 < n_train < N:
        raise ValueError(f"n_train must leave pairs for both training and held-out evaluation: 0 < n_train < {N}")

    # Source activations at every searched layer, and the base stream entering each (one run each).
    src_names = [f"blocks.{l}.{kind}" for l in layers]
    src_cache = run(model, source_tokens, cache=src_names, attention_mask=source_attention_mask,
                    return_logits=False).cache  # fmt: skip
    for n in src_names:
        if src_cache[n].shape != (N, source_tokens.shape[1], cfg.d_model):
            raise ValueError(f"DAS needs a [B, T, D] site; {n!r} has shape {tuple(src_cache[n].shape)}")
    src = jnp.stack([src_cache[n][jnp.arange(N), source_pos] for n in src_names])  # [L, N, D]
    base_out = run(model, base_tokens, cache=[f"blocks.{l}.hook_resid_pre" for l in layers],
                   attention_mask=attention_mask)  # fmt: skip
    base_resid = jnp.stack([base_out.cache[f"blocks.{l}.hook_resid_pre"] for l in layers])  # [L, N, T, D]
    test = np.arange(n_train, N)
    base_logits = np.asarray(base_out.logits)[test, readout_pos[test]]
    base_acc = float(np.mean(np.argmax(np.take_along_axis(base_logits, candidates[test], 1), 1) == labels[test]))

    mask = None if attention_mask is None else np.asarray(attention_mask, bool)
    part = lambda idx: dict(which=jnp.asarray(idx), tokens=jnp.asarray(base_tokens[idx]), pos=jnp.asarray(pos[idx]),  # noqa: E731
                            candidates=jnp.asarray(candidates[idx]), readout=jnp.asarray(readout_pos[idx]),
                            labels=jnp.asarray(labels[idx]), mask=None if mask is None else jnp.asarray(mask[idx]))
    rng = np.random.default_rng(seed)
    bs = min(batch_size, n_train)
    batches = np.stack([rng.choice(n_train, bs, replace=False) for _ in range(steps)]).astype(np.int32)
    t0, t1 = temperature
    temps = jnp.asarray(np.geomspace(t0, t1, steps) if method == "boundless" else np.full(steps, t1), jnp.float32)
    data = dict(train=part(np.arange(n_train)), test=part(test), batches=jnp.asarray(batches))

    keys = jax.random.split(jax.random.key(seed), 2 * len(layers)).reshape(len(layers), 2)
    inits = [das_init(keys[i, 0], cfg.d_model, k, method) for i in range(len(layers))]
    hp = dict(kind=kind, k=k, method=method, steps=steps, lr=lr, boundary_lr=boundary_lr, temps=temps,
              boundary_penalty=boundary_penalty, mesh=mesh)  # floats, strings, the mesh: static
    chunk = max(1, min(int(chunk), len(layers)))
    if mesh is not None and chunk > 1:
        chunk = round_to(chunk, mesh)
    place = (lambda a: a) if mesh is None or chunk == 1 else (  # noqa: E731
        lambda a: jax.device_put(a, NamedSharding(mesh, P("sweep"))))
    outs = []
    starts = range(0, len(layers), chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"DAS {method} k={k} over {len(layers)} layers", unit="chunk")
    for s in starts:
        idx = list(range(s, min(s + chunk, len(layers))))
        idx += [idx[-1]] * (chunk - len(idx))  # pad the last chunk so one program serves every chunk
        stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
        li = jnp.asarray([layers[i] for i in idx], jnp.int32)
        args = (li, src[jnp.asarray(idx)], base_resid[jnp.asarray(idx)], data, stack([inits[i] for i in idx]),
                keys[jnp.asarray(idx), 1])  # fmt: skip
        args = (*jax.tree.map(place, args[:3]), data, *jax.tree.map(place, args[4:]))
        if chunk == 1:
            args = (args[0][0], args[1][0], args[2][0], data, inits[idx[0]], args[5][0])
            out = jax.tree.map(lambda a: np.asarray(a)[None], _fit_one(model, *args, **hp))
        else:
            out = jax.tree.map(np.asarray, _fit_stack(model, *args, **hp))
        n_real = min(s + chunk, len(layers)) - s
        outs.append(jax.tree.map(lambda a: a[:n_real], out))
    cat = {key: np.concatenate([o[key] for o in outs]) for key in outs[0]}
    mean = lambda c: c.astype(np.float32).mean(-1)  # noqa: E731
    return DASResult(kind=kind, layers=layers, k=k, method=method, iia=mean(cat["correct"]),
                     iia_random=mean(cat["correct_random"]), iia_full=mean(cat["correct_full"]),
                     iia_train=mean(cat["correct_train"]), correct=cat["correct"],
                     correct_random=cat["correct_random"], correct_full=cat["correct_full"], base_accuracy=base_acc,
                     losses=cat["losses"], basis=cat["basis"], weights=cat["weights"], n_train=n_train,
                     n_test=N - n_train)  # fmt: skip


@dataclasses.dataclass(frozen=True, repr=False)
class PositionSearch(Result):
    """DAS over named positions x layers: `iia [P, L]` (held-out) and each position's `DASResult`."""

    names: list[str]
    layers: list[int]
    iia: np.ndarray  # [P, L]
    iia_random: np.ndarray  # [P, L]
    iia_full: np.ndarray  # [P, L]
    results: dict[str, DASResult]

    def best(self) -> tuple[str, int, float]:
        """`(position name, layer, IIA)` of the highest held-out IIA."""
        p, l = np.unravel_index(int(np.argmax(self.iia)), self.iia.shape)
        return self.names[p], self.layers[l], float(self.iia[p, l])


def das_position_search(model: Transformer, base_tokens, source_tokens, labels, candidates,
                        positions: Mapping[str, Any], **kwargs) -> PositionSearch:  # fmt: skip
    """`das_search` at each named position: `positions[name]` is the base position `[N]` (an int for
    every row, or per row), or a `(pos, source_pos)` pair. Positions enter the compiled program as
    arrays, so every (position, layer) reuses the one program of `das_search` (same pair shapes)."""
    if not positions:
        raise ValueError("positions: give at least one {name: pos} entry")
    N = np.asarray(base_tokens).shape[0]
    results = {}
    for name, p in positions.items():
        pos, src_pos = p if isinstance(p, tuple) else (p, None)
        pos = np.broadcast_to(np.asarray(pos, np.int32), (N,))
        src_pos = pos if src_pos is None else np.broadcast_to(np.asarray(src_pos, np.int32), (N,))
        T = np.asarray(base_tokens).shape[1]
        if pos.min() < 0 or pos.max() >= T:
            raise ValueError(f"position {name!r}: indices must be in [0, {T - 1}], got {pos.min()}..{pos.max()}")
        results[name] = das_search(model, base_tokens, source_tokens, labels, candidates, pos=pos, source_pos=src_pos, **kwargs)
    names = list(results)
    r0 = results[names[0]]
    grid = lambda f: np.stack([getattr(results[n], f) for n in names])  # noqa: E731
    return PositionSearch(names, r0.layers, grid("iia"), grid("iia_random"), grid("iia_full"), results)


# ---------------------------------------------------------------------------------------------
# IOI pairs for the SmolLM2 experiment


def _ioi_rows(model, tok, n, seed):
    """IOI prompts the model gets right (IO logit > S logit), with P (0: IO named first) and
    candidates [first name, second name] (token ids)."""
    from ..tasks import ioi_task

    task = ioi_task(tok, n=n, seed=seed)
    clean, io, s = task.clean, task.answers, task.wrong
    first = lambda row, t: int(np.flatnonzero(row == t)[0])  # noqa: E731
    P = np.array([0 if first(r, a) < first(r, b) else 1 for r, a, b in zip(clean, io, s)], np.int32)
    cand = np.where(P[:, None] == 0, np.stack([io, s], 1), np.stack([s, io], 1)).astype(np.int32)
    logits = np.asarray(unembed(model, run(model, clean, return_logits=False).resid[:, -1]))  # last position only
    ok = logits[np.arange(n), io] > logits[np.arange(n), s]
    return clean[ok], P[ok], cand[ok], float(ok.mean())


def ioi_position_pairs(model: Transformer, tok, n_pairs: int = 192, seed: int = 0) -> dict:
    """Base/source IOI pairs for the variable P = position of the IO among the two first names.

    Counterfactual of a pair: the base's name at the source's P, i.e. `labels = P_source` over
    `candidates = [first name, second name]` of the base. Half the pairs change the answer
    (`changed`, P_source != P_base), half keep it. Only prompts the model answers are used.
    Returns `dict(base [N, T], source [N, T], labels [N], candidates [N, 2], changed [N] bool,
    model_accuracy)`.
    """
    base, Pb, cand, acc_b = _ioi_rows(model, tok, 2 * n_pairs, seed)
    src, Ps, _, acc_s = _ioi_rows(model, tok, 4 * n_pairs, seed + 1)
    rng = np.random.default_rng(seed)
    m = min(n_pairs, len(base))
    changed = np.arange(m) % 2 == 0
    rng.shuffle(changed)
    pick = []
    for i in range(m):
        want = 1 - Pb[i] if changed[i] else Pb[i]
        pick.append(rng.choice(np.flatnonzero(Ps == want)))
    pick = np.asarray(pick)
    return dict(base=base[:m], source=src[pick], labels=Ps[pick], candidates=cand[:m], changed=changed,
                model_accuracy=(acc_b + acc_s) / 2)  # fmt: skip
