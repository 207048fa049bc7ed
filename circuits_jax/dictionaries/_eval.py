"""Evaluating a sparse dictionary inside its model.

Reconstruction (L0, fraction of variance explained) is measured on held-out contexts, and
the dictionary is *spliced* into the forward pass through the ordinary intervention
machinery: a `Hook` at its output site replaces the activation by the reconstruction at every
non-BOS position (for a transcoder, the reconstruction from the clean MLP input, which the
splice cannot change since the MLP output comes later). Next-token cross-entropy and KL to
the clean model are compared with zero-ablating the same site:

    CE recovered = (CE_zero - CE_splice) / (CE_zero - CE_clean)
    KL recovered = 1 - KL(clean || splice) / KL(clean || zero)

Latent density (fraction of non-BOS tokens where a latent is active) gives the dead (never
active) and dense (active on more than `dense_threshold` of tokens) fractions and the
log-density histogram.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..core import Hook, Replace, Result, Transformer, Zero, next_token_nll, parse_site, run
from ._sae import CrossLayerTranscoder, gather_xy


@dataclasses.dataclass(frozen=True, repr=False)
class Evaluation(Result):
    """A dictionary's evaluation: sparsity (L0), variance explained, CE / KL recovered when spliced in, dead and dense latents."""

    l0: float
    fve: float  # 1 - SSE/SST over all held-out tokens (raw units)
    ce_clean: float
    ce_splice: float
    ce_zero: float
    ce_recovered: float
    kl_splice: float
    kl_zero: float
    kl_recovered: float
    dead: float  # fraction of latents never active on the held-out tokens
    dense: float  # fraction active on more than `dense_threshold` of them
    density: np.ndarray  # [F] (or [L, F])
    n_tokens: int
    layer_fvu: list[float] | None = None  # CLT: fraction of variance unexplained per target layer

    def summary(self) -> dict:
        """Every field but the per-latent density (JSON-ready)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "density"}


def _hooks(cfg, d, x, mask, *, zero: bool):
    """Hooks writing the reconstruction (or zeros) into the dictionary's output site(s)."""
    if isinstance(d, CrossLayerTranscoder):
        y_hat = d(x)  # [B, T, L, D]
        sites = [parse_site(s, cfg) for s in d.out_sites]
        return [Hook(s.kind, s.layer, Zero(mask) if zero else Replace(y_hat[:, :, i], mask)) for i, s in enumerate(sites)]
    s = parse_site(d.out_site, cfg)
    return [Hook(s.kind, s.layer, Zero(mask) if zero else Replace(d(x), mask))]


@eqx.filter_jit
def _eval_batch(model: Transformer, d, tokens):
    out = run(model, tokens, cache=list(dict.fromkeys(d.in_sites + d.out_sites)))
    x, y = (a.astype(jnp.float32) for a in gather_xy(d, out.cache))  # a bfloat16 model's activations, scored in float32
    B, T = tokens.shape
    mask = jnp.broadcast_to((jnp.arange(T) > 0)[None, :, None], (B, T, 1))  # non-BOS positions
    clt = isinstance(d, CrossLayerTranscoder)
    acts = d.encode(x)
    y_hat = d.decode(acts) if clt else d.decode(acts) + d.skip(x)
    logp = jax.nn.log_softmax(out.logits[:, :-1])

    def ce_kl(logits):
        lq = jax.nn.log_softmax(logits[:, :-1])
        return next_token_nll(logits, tokens)[0], jnp.sum(jnp.exp(logp) * (logp - lq))

    ce_s, kl_s = ce_kl(run(model, tokens, hooks=_hooks(model.cfg, d, x, mask, zero=False)).logits)
    ce_z, kl_z = ce_kl(run(model, tokens, hooks=_hooks(model.cfg, d, x, mask, zero=True)).logits)
    ce_clean = next_token_nll(out.logits, tokens)[0]
    err = (y - y_hat)[:, 1:]
    yv = y[:, 1:]
    return dict(
        active=jnp.sum((acts[:, 1:] > 0), (0, 1)),
        l0=jnp.sum(acts[:, 1:] > 0),
        sse=jnp.sum(err**2, (0, 1, 3) if clt else None),  # CLT: per target layer
        s1=jnp.sum(yv, (0, 1)),
        s2=jnp.sum(yv * yv, (0, 1)),
        ce=jnp.stack([ce_clean, ce_s, ce_z]),
        kl=jnp.stack([kl_s, kl_z]),
    )


def evaluate(
    model: Transformer,
    dictionary,
    contexts: np.ndarray,
    *,
    batch_size: int = 8,
    dense_threshold: float = 0.1,
    progress: bool = True,
) -> Evaluation:
    """Evaluate `dictionary` on `contexts` `[N, T]` (BOS first): reconstruction, spliced CE and KL
    against zero ablation, and latent density. One compiled program per batch shape."""
    contexts = np.asarray(contexts, np.int32)
    N, T = contexts.shape
    from tqdm.auto import tqdm

    tot: dict[str, np.ndarray] = {}
    for b in tqdm(range(0, N, batch_size), desc="evaluate", unit="batch", disable=not progress, leave=False):
        part = contexts[b : b + batch_size]  # a smaller last batch costs one more compile, counts stay exact
        got = jax.device_get(_eval_batch(model, dictionary, jnp.asarray(part)))
        for k, v in got.items():
            tot[k] = tot.get(k, 0) + np.asarray(v, np.float64)
    n_tok = N * (T - 1)  # scored positions; also the number of next-token predictions
    sst = tot["s2"] - tot["s1"] ** 2 / n_tok  # per dim (CLT: [L, D])
    fve = 1.0 - tot["sse"].sum() / max(sst.sum(), 1e-12)
    l0 = tot["l0"] / n_tok  # a CLT sums its layers
    clt = isinstance(dictionary, CrossLayerTranscoder)
    layer_fvu = (tot["sse"] / np.maximum(sst.sum(-1), 1e-12)).tolist() if clt else None
    ce_clean, ce_splice, ce_zero = tot["ce"] / n_tok
    kl_splice, kl_zero = tot["kl"] / n_tok
    density = tot["active"] / n_tok
    return Evaluation(
        l0=float(l0), fve=float(fve), ce_clean=float(ce_clean), ce_splice=float(ce_splice), ce_zero=float(ce_zero),
        ce_recovered=float((ce_zero - ce_splice) / (ce_zero - ce_clean)) if ce_zero != ce_clean else float("nan"),
        kl_splice=float(kl_splice), kl_zero=float(kl_zero),
        kl_recovered=float(1 - kl_splice / kl_zero) if kl_zero > 0 else float("nan"),
        dead=float(np.mean(density == 0)), dense=float(np.mean(density > dense_threshold)), density=density,
        n_tokens=n_tok, layer_fvu=layer_fvu,
    )  # fmt: skip


def density_histogram(density: np.ndarray, *, bins: int = 40) -> tuple[np.ndarray, np.ndarray, int]:
    """Histogram of log10 latent density over live latents: `(counts, edges, n_dead)`."""
    d = np.ravel(density)
    live = d[d > 0]
    lo = np.floor(np.log10(live.min())) if live.size else -6.0
    counts, edges = np.histogram(np.log10(live), bins=bins, range=(min(lo, -6.0), 0.0))
    return counts, edges, int(np.sum(d == 0))
