"""Patching metrics: pure functions of the logits at the scored position, `[B, V] -> scalar`.

Each is an `equinox.Module` holding its per-example targets, so a dataset of
prompt pairs with its own answers is just a batch. Any user function of the
same form works too. `normalise` maps a metric to clean = 1, corrupt = 0.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array
from jaxtyping import Float, Int


def _rows(logits: Array, ids: Array) -> Array:
    """`logits[..., ids]` per scored position: `logits [B, V]` with ids `[B]`, or `[B, n, V]` with ids
    `[B, n]` (or `[B]`: the same id at each of a row's positions)."""
    ids = jnp.asarray(ids, jnp.int32)
    lead = logits.shape[:-1]
    ids = jnp.broadcast_to(ids.reshape(ids.shape + (1,) * (len(lead) - ids.ndim)), lead) if ids.ndim < len(lead) else ids
    return jnp.take_along_axis(logits, ids[..., None], axis=-1)[..., 0]


class LogitDiff(eqx.Module):
    """Mean over the batch of `logit[answer] - logit[wrong]`."""

    answer: Int[Array, "B *n"]
    wrong: Int[Array, "B *n"]

    def __call__(self, logits):
        return jnp.mean(_rows(logits, self.answer) - _rows(logits, self.wrong))


class AnswerProb(eqx.Module):
    """Mean probability of the answer token."""

    answer: Int[Array, "B *n"]

    def __call__(self, logits):
        return jnp.mean(_rows(jax.nn.softmax(logits, axis=-1), self.answer))


class CrossEntropy(eqx.Module):
    """Mean `-log p(answer)`."""

    answer: Int[Array, "B *n"]

    def __call__(self, logits):
        return -jnp.mean(_rows(jax.nn.log_softmax(logits, axis=-1), self.answer))


class KLFrom(eqx.Module):
    """Mean KL(reference || patched) over the batch; `reference` is e.g. the clean run's logits."""

    reference: Float[Array, "B *n V"]

    def __call__(self, logits):
        ref = jax.nn.log_softmax(self.reference, axis=-1)
        return jnp.mean(jnp.sum(jnp.exp(ref) * (ref - jax.nn.log_softmax(logits, axis=-1)), axis=-1))


def next_token_nll(logits, tokens, attention_mask=None):
    """`(summed next-token NLL, number of scored targets)` of `tokens [B, T]` under `logits [B, T, V]`:
    position t predicts token t + 1; with `attention_mask`, a target counts when it and the token
    before it are both real. Cross-entropy is the ratio, perplexity its exp."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    tgt = tokens[:, 1:]
    nll = -jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    w = jnp.ones(tgt.shape, jnp.float32)
    if attention_mask is not None:
        w = (attention_mask[:, 1:] & attention_mask[:, :-1]).astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)


def normalise(value, clean, corrupt):
    """`(value - corrupt) / (clean - corrupt)`: 1 where the clean behaviour is restored, 0 at corrupt."""
    return (value - corrupt) / (clean - corrupt)


class ProbMassDiff(eqx.Module):
    """Mean over rows of `p(up) - p(down)`, each the softmax mass on a per-row token set.

    Hanna et al.'s greater-than metric: mass on years after the start year minus mass on the
    others. Masks are bool `[B, V]`; tokens in neither set count for nothing.
    """

    up: Array  # [B, V] bool
    down: Array  # [B, V] bool

    def __call__(self, logits):
        p = jax.nn.softmax(logits, axis=-1)
        mass = lambda mask: jnp.sum(jnp.where(mask, p, jnp.zeros_like(p)), axis=-1)  # noqa: E731
        return jnp.mean(mass(self.up) - mass(self.down))
