"""Sparse dictionaries as pytrees with their losses: SAEs, transcoders, cross-layer transcoders.

Axes: N tokens (any leading shape), D model width, F latents (features), L layers of a CLT.

    pre   = (x * in_scale) @ W_enc + b_enc                      [N, F]
    acts  = sparsify(pre)                                        [N, F]   (the architecture)
    y_hat = (acts @ W_dec + b_dec) / out_scale                   [N, D]

An SAE reads and writes one site (`in_site == out_site`); a transcoder reads an MLP's input
and writes its output. `in_scale`/`out_scale` fold the store's normalisation into the
dictionary, so it maps raw activations to raw activations and splices into a model as is.
The layout (`W_enc [D, F]`, `b_enc`, `W_dec [F, D]`, `b_dec`, `threshold`) is Gemma Scope's,
which is why there is no pre-encoder `b_dec` subtraction: it is a reparametrisation of `b_enc`.

Architectures (`arch`):
    relu       ReLU; loss MSE + l1_coeff * sum_f a_f ||W_dec f|| ("weighted", Anthropic's
               April 2024 update) or + l1_coeff * sum_f a_f with unit-norm decoder rows ("unit").
    topk       keep each token's k largest pre-activations (ReLU'd); AuxK: the top k_aux
               *dead* latents reconstruct the residual error (OpenAI, Gao et al. 2024).
    batchtopk  keep the batch's k*N largest; inference uses a learned global threshold
               (Bussmann et al. 2024), so it is a JumpReLU with one threshold at eval.
    jumprelu   a * [a > threshold] with straight-through (rectangle kernel) gradients for the
               threshold and an L0 penalty (Rajamanoharan et al. 2024, Gemma Scope).

Every loss returns `(loss, Stats)` in normalised units; the trainer (`_sae_train`) is one
optax loop for all of them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array, lax

ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka", "gated")
K_ARCHS = ("topk", "batchtopk", "matryoshka")  # the ones with k active latents per token
BATCH_K = ("batchtopk", "matryoshka")  # k per token on average over a batch; a learned threshold at inference


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Hyperparameters of the sparsity terms (which apply depends on `arch`)."""

    l1_coeff: float = 5.0  # relu, gated
    l1: str = "weighted"  # relu: "weighted" (norm-weighted L1) or "unit" (unit-norm decoder rows)
    l0_coeff: float = 1e-3  # jumprelu: coefficient of the (straight-through) L0 penalty
    bandwidth: float = 1e-3  # jumprelu: width of the rectangle kernel of the pseudo-derivative
    aux_coeff: float = 1 / 32  # topk / batchtopk: weight of the AuxK loss
    k_aux: int = 256  # topk / batchtopk: dead latents used by AuxK
    threshold_decay: float = 0.99  # batchtopk, matryoshka: EMA of the smallest kept activation
    prefixes: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4, 1 / 2)  # matryoshka: the nested dictionaries (shares of the width)
    # topk: decode the k active rows only, with a sparse backward into the encoder (`_topk_codes`). Off by default:
    # on XLA's CPU backend the gather and scatter-add cost more than the dense matmuls they replace at k/F = 32/4608
    # (26 and 28 ms against 18 and 19 ms, benchmarks/sae_training.py); equal results either way (tested)
    sparse: bool = False

    def __post_init__(self):
        if self.l1 not in ("weighted", "unit"):
            raise ValueError(f"l1 must be 'weighted' or 'unit', got {self.l1!r}")


class Stats(NamedTuple):
    """Per-batch training statistics (scalars except `fired`)."""

    loss: Array
    mse: Array  # mean over tokens of ||y - y_hat||^2 (normalised units)
    sparsity: Array  # the sparsity or AuxK term, before its coefficient
    l0: Array  # mean active latents per token
    fve: Array  # 1 - SSE / SST of this batch
    fired: Array  # [F] (or [L, F]) bool: latent active on some token of the batch
    min_kept: Array  # batchtopk: smallest kept activation (for the inference threshold); else 0


# ---------------------------------------------------------------- straight-through JumpReLU


def _rect(u):
    return (jnp.abs(u) < 0.5).astype(u.dtype)


@jax.custom_vjp
def jumprelu(z: Array, threshold: Array, bandwidth: float) -> Array:
    """`z * [z > threshold]`; d/dθ = -(θ/ε) rect((z-θ)/ε) (the JumpReLU paper's estimator)."""
    return z * (z > threshold).astype(z.dtype)


def _jumprelu_fwd(z, threshold, bandwidth):
    return jumprelu(z, threshold, bandwidth), (z, threshold, bandwidth)


def _jumprelu_bwd(res, g):
    z, t, eps = res
    dz = g * (z > t).astype(z.dtype)
    dt = g * (-(t / eps) * _rect((z - t) / eps))
    return dz, _sum_to(dt, t.shape), None


@jax.custom_vjp
def step(z: Array, threshold: Array, bandwidth: float) -> Array:
    """Heaviside `[z > threshold]`; d/dθ = -(1/ε) rect((z-θ)/ε), d/dz = 0."""
    return (z > threshold).astype(z.dtype)


def _step_fwd(z, threshold, bandwidth):
    return step(z, threshold, bandwidth), (z, threshold, bandwidth)


def _step_bwd(res, g):
    z, t, eps = res
    dt = g * (-(1.0 / eps) * _rect((z - t) / eps))
    return jnp.zeros_like(z), _sum_to(dt, t.shape), None


def _sum_to(x, shape):
    extra = x.ndim - len(shape)
    return jnp.sum(x, axis=tuple(range(extra))) if extra else x


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)
step.defvjp(_step_fwd, _step_bwd)


# ---------------------------------------------------------------- sparsifiers (shared by SAE and CLT)


def _topk(pre: Array, k: int) -> tuple[Array, Array]:
    """Dense `[N, F]` activations keeping each row's top k (ReLU'd), and the values/indices."""
    vals, idx = lax.top_k(pre, k)
    vals = jax.nn.relu(vals)
    rows = jnp.arange(pre.shape[0])[:, None]
    return jnp.zeros_like(pre).at[rows, idx].set(vals), (vals, idx)


def _batch_topk(pre: Array, k: int) -> tuple[Array, Array]:
    """Keep the batch's k*N largest ReLU'd pre-activations.

    Exact unless one row holds more than `min(F, 4k)` of them: the candidates are each
    row's top `4k`, which keeps `lax.top_k` off the full `N*F` array (slow on CPU)."""
    n, f = pre.shape
    m = min(f, 4 * k)
    vals, idx = lax.top_k(pre, m)
    flat = vals.reshape(-1)
    kept, _ = lax.top_k(flat, k * n)
    cut = kept[-1]
    vals = jnp.where(vals >= cut, jax.nn.relu(vals), 0.0)
    rows = jnp.arange(n)[:, None]
    return jnp.zeros_like(pre).at[rows, idx].set(vals), jnp.maximum(cut, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _topk_codes(x: Array, W_enc: Array, b_enc: Array, k: int) -> tuple[Array, Array]:
    """A TopK encoder's `(values [N, k], indices [N, k])` of `x [N, D]`, ReLU'd: the forward is the dense
    `x @ W_enc + b_enc` and its top k; the backward touches only the k chosen columns of each row (a scatter-add of
    N*k columns into dW_enc instead of the dense `x.T @ dpre`), as EleutherAI sparsify's fused encoder does."""
    vals, idx = lax.top_k(x @ W_enc + b_enc, k)
    return jax.nn.relu(vals), idx


def _topk_codes_fwd(x, W_enc, b_enc, k):
    vals, idx = _topk_codes(x, W_enc, b_enc, k)
    return (vals, idx), (x, W_enc, idx, vals > 0)


def _topk_codes_bwd(k, res, cts):
    x, W_enc, idx, live = res
    g = cts[0] * live.astype(cts[0].dtype)  # [N, k]; the indices carry no gradient
    flat = idx.reshape(-1)
    d_b = jnp.zeros(W_enc.shape[1], g.dtype).at[flat].add(g.reshape(-1))
    d_W = jnp.zeros(W_enc.shape[::-1], g.dtype).at[flat].add((g[..., None] * x[:, None, :]).reshape(-1, x.shape[-1])).T
    d_x = jnp.einsum("nk,nkd->nd", g, W_enc.T[idx])
    return d_x, d_W, d_b


_topk_codes.defvjp(_topk_codes_fwd, _topk_codes_bwd)


def _sparsify(arch: str, k: int | None, threshold: Array, pre: Array, hp: LossConfig | None) -> tuple[Array, Array]:
    """Activations of pre-activations `[..., F]` (every leading row a token, or a token at one
    CLT layer), and batchtopk's smallest kept activation (0 otherwise). With `hp` the training
    form: jumprelu's straight-through gradients, batchtopk's cut over the whole batch. Without
    it the inference form, where batchtopk uses its threshold so a token's code does not depend
    on the rest of the batch."""
    none = jnp.zeros((), pre.dtype)
    if arch == "relu":
        return jax.nn.relu(pre), none
    rows = pre.reshape(-1, pre.shape[-1])
    if arch == "topk":
        return _topk(rows, k)[0].reshape(pre.shape), none
    if arch in BATCH_K and hp is not None:
        acts, cut = _batch_topk(rows, k)
        return acts.reshape(pre.shape), cut
    if arch == "jumprelu" and hp is not None:
        return jumprelu(pre, threshold, hp.bandwidth), none
    return pre * (pre > threshold).astype(pre.dtype), none  # jumprelu, batchtopk at inference


def _aux_k(pre: Array, dead: Array, err: Array, W_dec: Array, k_aux: int) -> Array:
    """AuxK: normalised MSE of the residual error reconstructed by the top-k_aux dead latents."""
    k_aux = min(k_aux, pre.shape[-1])
    err = lax.stop_gradient(err)

    def aux(pre, W_dec):
        # with at most k_aux dead latents the top k_aux of them are all of them: no top-k needed
        # (exact, and much cheaper on CPU, where top-k of a few hundred is slow)
        acts = lax.cond(
            jnp.sum(dead) <= k_aux,
            lambda p: jax.nn.relu(p) * dead.astype(p.dtype),
            lambda p: _topk(jnp.where(dead, p, -jnp.inf), k_aux)[0],  # -inf ReLUs to 0
            pre,
        )
        sst = jnp.sum((err - err.mean(0)) ** 2)
        return jnp.sum((err - acts @ W_dec) ** 2) / jnp.maximum(sst, 1e-12)

    # skipped at run time while no latent is dead
    return lax.cond(jnp.any(dead), aux, lambda p, w: jnp.zeros((), p.dtype), pre, W_dec)


def check_arch(arch: str, k: int | None):
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if arch in K_ARCHS and (k is None or k < 1):
        raise ValueError(f"arch={arch!r} needs k >= 1 (active latents per token)")


def _nested_mse(acts: Array, W_dec: Array, y: Array, y_hat: Array, prefixes: tuple[float, ...]) -> Array:
    """Matryoshka's reconstruction loss: the mean of the MSEs of the nested dictionaries made of the first
    `prefix * F` latents (and of the whole one, `y_hat`), so early latents learn general features on their own
    (Bussmann et al. 2025, Nabeshima 2024). Each prefix's reconstruction is the whole one minus the later
    latents' share, so the cost is one more decode of the latents past the smallest prefix."""
    F = acts.shape[-1]
    ends = sorted({min(F, max(1, round(p * F))) for p in prefixes} - {F})
    mses = [jnp.mean(jnp.sum((y - y_hat) ** 2, -1))]
    rest = y_hat
    for lo, hi in zip(ends[::-1], [F] + ends[::-1][:-1]):  # peel the latents [lo, hi) off, largest prefix first
        rest = rest - acts[:, lo:hi] @ W_dec[lo:hi]
        mses.append(jnp.mean(jnp.sum((y - rest) ** 2, -1)))
    return sum(mses) / len(mses)


def _fve(y, y_hat):
    sst = jnp.sum((y - y.mean(0)) ** 2)
    return 1.0 - jnp.sum((y - y_hat) ** 2) / jnp.maximum(sst, 1e-12)


# ---------------------------------------------------------------- SAE / transcoder


class SAE(eqx.Module):
    """A sparse autoencoder (`in_site == out_site`) or a per-layer transcoder."""

    W_enc: Array  # [D_in, F]
    b_enc: Array  # [F]
    W_dec: Array  # [F, D_out]
    b_dec: Array  # [D_out]
    threshold: Array  # [F]: jumprelu's thresholds, batchtopk's inference threshold; else zeros
    in_scale: Array  # [] multiplies the raw input
    out_scale: Array  # [] multiplies the raw target
    arch: str = eqx.field(static=True)
    k: int | None = eqx.field(static=True, default=None)
    in_site: str = eqx.field(static=True, default="")
    out_site: str = eqx.field(static=True, default="")
    W_skip: Array | None = None  # [D_in, D_out]: a skip transcoder's affine path, x @ W_skip added to the output
    # gated (Rajamanoharan et al. 2024): b_enc is the gate's bias; the magnitude path shares W_enc, scaled per
    # latent by exp(r_mag), with its own bias b_mag
    r_mag: Array | None = None  # [F]
    b_mag: Array | None = None  # [F]

    @property
    def width(self) -> int:
        return self.W_enc.shape[1]

    @property
    def is_transcoder(self) -> bool:
        return self.in_site != self.out_site

    @property
    def in_sites(self) -> list[str]:
        return [self.in_site]

    @property
    def out_sites(self) -> list[str]:
        return [self.out_site]

    def pre(self, x: Array) -> Array:
        """Pre-activations; `x` is read in the dictionary's dtype (a bfloat16 model's activations, float32 weights)."""
        return (x.astype(self.W_enc.dtype) * self.in_scale) @ self.W_enc + self.b_enc

    def magnitude(self, pre: Array) -> Array:
        """A gated SAE's magnitudes, `relu(x' @ (W_enc * exp(r_mag)) + b_mag)`, from the gate's pre-activations
        (`x' @ W_enc` is `pre - b_enc`, so the shared encoder is applied once)."""
        return jax.nn.relu((pre - self.b_enc) * jnp.exp(self.r_mag) + self.b_mag)

    def activate(self, pre: Array) -> Array:
        """Inference activations (batchtopk uses its threshold, so one token's code does not
        depend on the rest of the batch; gated: the magnitude where the gate is open)."""
        if self.arch == "gated":
            return (pre > 0).astype(pre.dtype) * self.magnitude(pre)
        return _sparsify(self.arch, self.k, self.threshold, pre, None)[0]

    def encode(self, x: Array) -> Array:
        """Latent activations `[..., F]` of raw activations `[..., D_in]`."""
        return self.activate(self.pre(x))

    def decode(self, acts: Array) -> Array:
        """Raw-unit output `[..., D_out]` of latent activations."""
        return (acts @ self.W_dec + self.b_dec) / self.out_scale

    def skip(self, x: Array) -> Array:
        """The skip path's raw-unit output `x @ W_skip` (zero without one): linear in the raw input, so
        it is part of the reconstruction, not of the error."""
        if self.W_skip is None:
            return jnp.zeros((*x.shape[:-1], self.W_dec.shape[1]), self.W_dec.dtype)
        return x.astype(self.W_skip.dtype) @ self.W_skip

    def __call__(self, x: Array) -> Array:
        return self.decode(self.encode(x)) + self.skip(x)

    def loss(self, x: Array, y: Array, dead: Array, hp: LossConfig) -> tuple[Array, Stats]:
        """Training loss on a batch `x [N, D_in]`, target `y [N, D_out]` (raw units), with `dead [F]`
        the latents that have not fired for a while (used by AuxK only)."""
        pre = self.pre(x)
        y_n = y * self.out_scale
        if self.arch == "topk" and hp.sparse:  # the k active decoder rows only, gathered: k/F of a dense decode
            vals, idx = _topk_codes(x.astype(self.W_enc.dtype) * self.in_scale, self.W_enc, self.b_enc, self.k)
            rows = jnp.arange(x.shape[0])[:, None]
            acts, min_kept = jnp.zeros_like(pre).at[rows, idx].set(lax.stop_gradient(vals)), jnp.zeros((), pre.dtype)
            y_hat = jnp.einsum("nk,nkd->nd", vals, self.W_dec[idx]) + self.b_dec
        elif self.arch == "gated":
            acts, min_kept = self.activate(pre), jnp.zeros((), pre.dtype)  # the gate passes no gradient
            y_hat = acts @ self.W_dec + self.b_dec
        else:
            acts, min_kept = _sparsify(self.arch, self.k, self.threshold, pre, hp)
            y_hat = acts @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            y_hat = y_hat + self.skip(x) * self.out_scale
        mse = jnp.mean(jnp.sum((y_n - y_hat) ** 2, -1))
        recon = mse if self.arch != "matryoshka" else _nested_mse(acts, self.W_dec, y_n, y_hat, hp.prefixes)
        if self.arch == "relu":
            w = _safe_norm(self.W_dec) if hp.l1 == "weighted" else 1.0
            sparsity = jnp.mean(jnp.sum(acts * w, -1))
            loss = mse + hp.l1_coeff * sparsity
        elif self.arch == "jumprelu":
            sparsity = jnp.mean(jnp.sum(step(pre, self.threshold, hp.bandwidth), -1))
            loss = mse + hp.l0_coeff * sparsity
        elif self.arch == "gated":  # L1 on the gate's ReLU (decoder-norm weighted) and the gate's own reconstruction
            gate = jax.nn.relu(pre)  # through a frozen decoder, so the gate learns to reconstruct, not to shrink
            sparsity = jnp.mean(jnp.sum(gate * _safe_norm(self.W_dec), -1))
            frozen = gate @ lax.stop_gradient(self.W_dec) + lax.stop_gradient(self.b_dec)
            loss = mse + hp.l1_coeff * sparsity + jnp.mean(jnp.sum((y_n - frozen) ** 2, -1))
        else:
            sparsity = _aux_k(pre, dead, y_n - y_hat, self.W_dec, hp.k_aux)
            loss = recon + hp.aux_coeff * sparsity
        active = acts > 0
        stats = Stats(loss, mse, sparsity, jnp.mean(jnp.sum(active, -1)), _fve(y_n, y_hat), jnp.any(active, 0), min_kept)
        return loss, stats

    def project(self, hp: LossConfig, stats: Stats) -> SAE:
        """After an optimiser step: unit-norm decoder rows ("unit" L1), positive thresholds,
        batchtopk's inference threshold as an EMA of the smallest kept activation."""
        out = self
        if self.arch == "relu" and hp.l1 == "unit":
            out = eqx.tree_at(lambda s: s.W_dec, out, _unit_rows(out.W_dec))
        return _project_threshold(out, hp, stats)


def _project_threshold(d, hp: LossConfig, stats: Stats):
    """Positive jumprelu thresholds; batchtopk's inference threshold as an EMA of the smallest
    kept activation (started at the first batch's)."""
    if d.arch == "jumprelu":
        return eqx.tree_at(lambda s: s.threshold, d, jnp.maximum(d.threshold, 1e-6))
    if d.arch in BATCH_K:
        r = hp.threshold_decay
        t = jnp.where(d.threshold > 0, r * d.threshold + (1 - r) * stats.min_kept, stats.min_kept)
        return eqx.tree_at(lambda s: s.threshold, d, t)
    return d


class Stacked(eqx.Module):
    """N dictionaries of one shape trained as one: `members` is an `SAE` whose arrays carry a leading axis of
    N (what is checkpointed and sharded); `ks`, `l1s` and `sites` are each member's k, L1 coefficient and
    (in, out) sites. `_train.make_step` trains all N in one compiled step, each member with its own k, L1
    coefficient, gradient clipping and Adam state, as in separate runs; when the sites differ, each member
    reads its own input (`own_inputs`)."""

    members: SAE
    ks: tuple[int | None, ...] = eqx.field(static=True)
    l1s: tuple[float | None, ...] = eqx.field(static=True)  # None: the training config's
    sites: tuple[tuple[str, str], ...] = eqx.field(static=True)

    @classmethod
    def of(cls, dicts: list[SAE], l1s=None) -> Stacked:
        """Stack `dicts` (SAEs or transcoders of one architecture and shape, any k / site / values); `l1s`: each
        member's L1 coefficient (relu), default the training config's."""
        if not dicts or not all(isinstance(d, SAE) for d in dicts):
            raise TypeError("Stacked.of takes a non-empty list of SAEs / per-layer transcoders")
        kinds = {(d.arch, d.W_enc.shape, d.W_dec.shape, d.W_skip is None) for d in dicts}
        if len(kinds) != 1:
            raise ValueError(f"dictionaries trained together need one architecture and shape; got {sorted(kinds, key=str)}")
        same = [dataclasses.replace(d, k=dicts[0].k, in_site=dicts[0].in_site, out_site=dicts[0].out_site) for d in dicts]
        l1s = (None,) * len(dicts) if l1s is None else tuple(None if v is None else float(v) for v in l1s)
        if len(l1s) != len(dicts):
            raise ValueError(f"{len(l1s)} L1 coefficients for {len(dicts)} dictionaries")
        return cls(jax.tree.map(lambda *a: jnp.stack(a), *same), tuple(d.k for d in dicts), l1s,
                   tuple((d.in_site, d.out_site) for d in dicts))  # fmt: skip

    @property
    def n(self) -> int:
        return len(self.sites)

    @property
    def arch(self) -> str:
        return self.members.arch

    @property
    def threshold(self) -> Array:
        return self.members.threshold

    @property
    def own_inputs(self) -> bool:
        return len(set(self.sites)) > 1

    @property
    def in_sites(self) -> list[str]:
        return list(dict.fromkeys(s for s, _ in self.sites))

    @property
    def out_sites(self) -> list[str]:
        return list(dict.fromkeys(s for _, s in self.sites))

    def slot(self, i: int) -> SAE:
        """Member i's arrays as stored, with the stack's k and sites (one tree structure for every slot, which
        the optimiser states of the members share)."""
        return jax.tree.map(lambda a: a[i], self.members)

    def member(self, i: int) -> SAE:
        """Member i, with its own k and sites."""
        return dataclasses.replace(self.slot(i), k=self.ks[i], in_site=self.sites[i][0], out_site=self.sites[i][1])

    def unstack(self) -> list[SAE]:
        """The N dictionaries, each with its own k and sites."""
        return [self.member(i) for i in range(self.n)]


def gather_xy(d, acts) -> tuple[Array, Array]:
    """A dictionary's `(x, y)` from activations keyed by site name (a store batch, a model cache);
    a cross-layer transcoder stacks its layers on axis -2 (`[..., L, D]`); a `Stacked` whose members
    read different sites stacks theirs on a leading axis (`[N, ..., D]`)."""
    if isinstance(d, Stacked):
        if not d.own_inputs:
            return acts[d.sites[0][0]], acts[d.sites[0][1]]
        return jnp.stack([acts[s] for s, _ in d.sites]), jnp.stack([acts[s] for _, s in d.sites])
    x = [acts[s] for s in d.in_sites]
    y = [acts[s] for s in d.out_sites]
    if isinstance(d, CrossLayerTranscoder):
        return jnp.stack(x, -2), jnp.stack(y, -2)
    return x[0], y[0]


def _safe_norm(w):
    """Row norms with a finite gradient at a zero row."""
    return jnp.sqrt(jnp.sum(w * w, axis=-1) + 1e-12)


def _unit_rows(w):
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-8)


def init_sae(
    d_in: int,
    width: int,
    *,
    key: Array,
    arch: str = "topk",
    k: int | None = None,
    d_out: int | None = None,
    in_site: str = "",
    out_site: str | None = None,
    b_dec: Array | None = None,
    in_scale: float = 1.0,
    out_scale: float = 1.0,
    threshold: float = 1e-3,
    dec_norm: float | None = None,
    skip: bool = False,
) -> SAE:
    """A new dictionary: decoder rows of norm `dec_norm` in random directions, the encoder their
    transpose (tied initialisation), `b_dec` the target mean if given. `dec_norm` defaults to 1
    for topk/batchtopk (whose latents need no L1 pressure to stay small; unit rows make the
    initial codes of normalised inputs the right size) and 0.1 for relu/jumprelu. `skip` adds a
    skip transcoder's `W_skip` path, started at zero."""
    if dec_norm is None:
        dec_norm = 1.0 if arch in K_ARCHS else 0.1
    check_arch(arch, k)
    d_out = d_in if d_out is None else d_out
    out_site = in_site if out_site is None else out_site
    if arch in K_ARCHS and k > width:
        raise ValueError(f"k={k} exceeds the width {width}")
    w = jax.random.normal(key, (width, d_out), jnp.float32)
    W_dec = dec_norm * _unit_rows(w)
    W_enc = W_dec.T if d_in == d_out else dec_norm * _unit_rows(jax.random.normal(jax.random.fold_in(key, 1), (width, d_in))).T
    t = threshold if arch == "jumprelu" else 0.0
    return SAE(
        W_enc=W_enc,
        b_enc=jnp.zeros(width, jnp.float32),
        W_dec=W_dec,
        b_dec=jnp.zeros(d_out, jnp.float32) if b_dec is None else jnp.asarray(b_dec, jnp.float32) * out_scale,
        threshold=jnp.full(width, t, jnp.float32),
        in_scale=jnp.asarray(in_scale, jnp.float32),
        out_scale=jnp.asarray(out_scale, jnp.float32),
        arch=arch,
        k=k,
        in_site=in_site,
        out_site=out_site,
        W_skip=jnp.zeros((d_in, d_out), jnp.float32) if skip else None,
        r_mag=jnp.zeros(width, jnp.float32) if arch == "gated" else None,
        b_mag=jnp.zeros(width, jnp.float32) if arch == "gated" else None,
    )


# ---------------------------------------------------------------- cross-layer transcoder


class CrossLayerTranscoder(eqx.Module):
    """Features read at layer l (from that layer's MLP input) and write to the MLP outputs of
    layers l, l+1, ... (Anthropic's circuit-tracing CLT), over the contiguous `layers`.

    x, y: `[N, L, D]` stacked per-layer inputs and targets. `W_dec[s, t]` (`[L, L, F, D]`) is the
    decoder from source layer s to target layer t; entries with t < s are held at zero.
    """

    W_enc: Array  # [L, D, F]
    b_enc: Array  # [L, F]
    W_dec: Array  # [L(src), L(dst), F, D]
    b_dec: Array  # [L, D]
    threshold: Array  # [L, F]
    in_scale: Array  # [L]
    out_scale: Array  # [L]
    arch: str = eqx.field(static=True)
    k: int | None = eqx.field(static=True, default=None)
    layers: tuple[int, ...] = eqx.field(static=True, default=())
    in_kind: str = eqx.field(static=True, default="ln2.hook_normalized")
    out_kind: str = eqx.field(static=True, default="hook_mlp_out")

    @property
    def width(self) -> int:
        return self.W_enc.shape[-1]

    @property
    def in_sites(self) -> list[str]:
        return [f"blocks.{l}.{self.in_kind}" for l in self.layers]

    @property
    def out_sites(self) -> list[str]:
        return [f"blocks.{l}.{self.out_kind}" for l in self.layers]

    def _mask(self):
        L = len(self.layers)
        return jnp.triu(jnp.ones((L, L), self.W_dec.dtype))  # [src, dst]: dst >= src

    def pre(self, x: Array) -> Array:
        return jnp.einsum("nld,ldf->nlf", x.astype(self.W_enc.dtype) * self.in_scale[:, None], self.W_enc) + self.b_enc

    def encode(self, x: Array) -> Array:
        lead = x.shape[:-2]
        x = x.reshape(-1, *x.shape[-2:])
        return _sparsify(self.arch, self.k, self.threshold, self.pre(x), None)[0].reshape(*lead, *x.shape[-2:-1], self.width)

    def _decode_n(self, acts):
        W = self.W_dec * self._mask()[:, :, None, None]
        return jnp.einsum("nsf,stfd->ntd", acts, W) + self.b_dec

    def decode(self, acts: Array) -> Array:
        lead = acts.shape[:-2]
        a = acts.reshape(-1, *acts.shape[-2:])
        return (self._decode_n(a) / self.out_scale[:, None]).reshape(*lead, len(self.layers), -1)

    def __call__(self, x: Array) -> Array:
        return self.decode(self.encode(x))

    def loss(self, x: Array, y: Array, dead: Array, hp: LossConfig) -> tuple[Array, Stats]:
        pre = self.pre(x)
        y_n = y * self.out_scale[:, None]
        acts, min_kept = _sparsify(self.arch, self.k, self.threshold, pre, hp)
        y_hat = self._decode_n(acts)
        mse = jnp.mean(jnp.sum((y_n - y_hat) ** 2, (-1, -2)))
        if self.arch == "relu":
            # decoder norm of a feature: over all the layers it writes to
            w = jnp.sqrt(jnp.sum((self.W_dec * self._mask()[:, :, None, None]) ** 2, (1, 3)) + 1e-12)  # [L, F]
            w = w if hp.l1 == "weighted" else 1.0
            sparsity = jnp.mean(jnp.sum(acts * w, (-1, -2)))
            loss = mse + hp.l1_coeff * sparsity
        elif self.arch == "jumprelu":
            sparsity = jnp.mean(jnp.sum(step(pre, self.threshold, hp.bandwidth), (-1, -2)))
            loss = mse + hp.l0_coeff * sparsity
        else:
            err = y_n - y_hat
            W = self.W_dec * self._mask()[:, :, None, None]
            aux = [
                _aux_k(pre[:, s], dead[s], err.reshape(len(err), -1), W[s].transpose(1, 0, 2).reshape(self.width, -1), hp.k_aux)
                for s in range(len(self.layers))
            ]
            sparsity = jnp.mean(jnp.stack(aux))
            loss = mse + hp.aux_coeff * sparsity
        active = acts > 0
        fve = _fve(y_n, y_hat)
        # l0: active latents per token, summed over the source layers
        return loss, Stats(loss, mse, sparsity, jnp.mean(jnp.sum(active, (-1, -2))), fve, jnp.any(active, 0), min_kept)

    def project(self, hp: LossConfig, stats: Stats) -> CrossLayerTranscoder:
        out = eqx.tree_at(lambda s: s.W_dec, self, self.W_dec * self._mask()[:, :, None, None])
        return _project_threshold(out, hp, stats)

    def layer_errors(self, x: Array, y: Array) -> Array:
        """Per target layer: fraction of variance unexplained `[L]` (raw units in, normalised out)."""
        y_n = y * self.out_scale[:, None]
        y_hat = self._decode_n(_sparsify(self.arch, self.k, self.threshold, self.pre(x), None)[0])
        sse = jnp.sum((y_n - y_hat) ** 2, (0, 2))
        sst = jnp.sum((y_n - y_n.mean(0)) ** 2, (0, 2))
        return sse / jnp.maximum(sst, 1e-12)


def init_clt(
    d_model: int,
    width: int,
    layers: tuple[int, ...],
    *,
    key: Array,
    arch: str = "topk",
    k: int | None = None,
    b_dec: Array | None = None,
    in_scale=None,
    out_scale=None,
    threshold: float = 1e-3,
    in_kind: str = "ln2.hook_normalized",
    out_kind: str = "hook_mlp_out",
) -> CrossLayerTranscoder:
    """A new CLT over contiguous `layers`; decoder norms shrink with the number of layers a
    feature writes to, so the initial output has the scale of one SAE's."""
    check_arch(arch, k)
    if arch in ("matryoshka", "gated"):
        raise ValueError(f"{arch} is an SAE / per-layer transcoder architecture; a cross-layer transcoder takes "
                         "relu, topk, batchtopk or jumprelu")  # fmt: skip
    layers = tuple(int(l) for l in layers)
    if not layers:
        raise ValueError("a cross-layer transcoder needs at least one layer")
    if list(layers) != list(range(layers[0], layers[0] + len(layers))):
        raise ValueError(f"a cross-layer transcoder needs contiguous layers, got {layers}")
    L = len(layers)
    k1, k2 = jax.random.split(key)
    W_enc = 0.1 * _unit_rows(jax.random.normal(k1, (L, width, d_model))).transpose(0, 2, 1)
    W_dec = (0.1 / math.sqrt(L)) * _unit_rows(jax.random.normal(k2, (L, L, width, d_model)))
    W_dec = W_dec * jnp.triu(jnp.ones((L, L)))[:, :, None, None]
    ones = jnp.ones(L, jnp.float32)
    in_scale = ones if in_scale is None else jnp.asarray(in_scale, jnp.float32)
    out_scale = ones if out_scale is None else jnp.asarray(out_scale, jnp.float32)
    return CrossLayerTranscoder(
        W_enc=W_enc,
        b_enc=jnp.zeros((L, width), jnp.float32),
        W_dec=W_dec,
        b_dec=jnp.zeros((L, d_model), jnp.float32) if b_dec is None else jnp.asarray(b_dec, jnp.float32) * out_scale[:, None],
        threshold=jnp.full((L, width), threshold if arch == "jumprelu" else 0.0, jnp.float32),
        in_scale=in_scale,
        out_scale=out_scale,
        arch=arch,
        k=k,
        layers=layers,
        in_kind=in_kind,
        out_kind=out_kind,
    )
