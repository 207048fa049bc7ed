"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", ROME).

Where in the network does a model recall a fact such as "The Eiffel Tower is located in the
city of" -> " Paris"? Causal tracing runs the prompt three ways:

1. clean: the plain forward pass; `clean` is p(answer) at the last position.
2. corrupted: Gaussian noise `noise * N(0, 1)` is added to the token embeddings (`hook_embed`)
   of the subject's tokens, `samples` independent draws (the samples are a batch axis).
   `corrupt` is p(answer) averaged over the draws: the model no longer knows which subject it is.
3. corrupted-with-restoration: the same noise draws, and one activation set back to its clean
   value. `scores[l, t]` is p(answer) (averaged over the draws) after restoring
   - kind "resid": `blocks.{l}.hook_resid_post` (the hidden-state output of layer l) at token t;
   - kind "mlp" / "attn": `hook_mlp_out` / `hook_attn_out` at token t in every layer of the
     window `[max(0, l - window // 2), min(L, l + ceil(window / 2)))` (Meng et al.'s window
     `range(l - w//2, l - (-w//2))` clipped to the model: 10 layers for window=10 away from the edges,
     fewer near them).
   The indirect effect of a site is `scores - corrupt` (`indirect_effect`).

Every (layer, token) restoration of one kind runs in ONE compiled program: the restoration is a
single `Hook(site, ALL_LAYERS, PerLayer(Replace(clean_stack [L, 1, T, D], mask [L, 1, T, 1])))`
whose mask is computed from a traced `(l, t)` pair, and `jax.vmap` maps it over pairs. The
L * T pairs run layer-major in chunks of `chunk` rows (the last chunk padded, so one program serves
all), each chunk starting at its lowest restored layer from the corrupted run's residual stream:
memory is `chunk * samples * T * max(D, M)` floats per layer, never `L * T * ...`. Only the last
position is unembedded.

Shapes: tokens `[T]`; scores `[L, T]`; L layers, T positions, D d_model.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from ..core import ALL_LAYERS, Add, Hook, PerLayer, Replace, Result, Transformer, run, unembed

KINDS = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


@dataclasses.dataclass(frozen=True, repr=False)
class CausalTrace(Result):
    """The result of `causal_trace`; probabilities of the answer token at the last position."""

    scores: np.ndarray  # [L, T]: p(answer) after restoring (layer l, token t), averaged over noise draws
    clean: float  # p(answer) in the clean run
    corrupt: float  # p(answer) with the subject's embeddings noised, no restoration (mean over draws)
    tokens: np.ndarray  # [T] the prompt's token ids
    subject_span: tuple[int, int]  # [start, stop) token positions of the subject
    answer_id: int
    kind: str  # "resid", "mlp" or "attn"
    window: int  # layers restored per score (1 for "resid")
    noise: float  # standard deviation of the added Gaussian noise
    samples: int
    seconds: float  # wall time of the restoration sweep, compile included
    first_chunk_seconds: float  # wall time of its first compiled call (compiles unless cached)

    @property
    def indirect_effect(self) -> np.ndarray:
        """`scores - corrupt` [L, T]: how much restoring each site brings the answer back."""
        return self.scores - self.corrupt

    def peak(self) -> tuple[int, int, float]:
        """`(layer, token, score)` of the largest restored probability."""
        l, t = np.unravel_index(int(np.argmax(self.scores)), self.scores.shape)
        return int(l), int(t), float(self.scores[l, t])


def subject_positions(tok, tokens: Sequence[int], subject: str) -> tuple[int, int]:
    """`(start, stop)`: the token span of `subject` in the prompt `tokens`.

    Matches the token ids of " subject" and of "subject" (a word inside a prompt usually carries
    its leading space; at the start it does not), last occurrence first. A ValueError shows the
    prompt's token split and the subject's tokenizations when neither is found.
    """
    ids = [int(i) for i in np.ravel(np.asarray(tokens))]
    text = subject.strip()
    if not text:
        raise ValueError("the subject is empty")
    candidates = []
    for variant in (" " + text, text):
        c = tok.encode(variant, prepend_bos=False)
        if c and c not in candidates:
            candidates.append(c)
    for c in candidates:
        n = len(c)
        for start in range(len(ids) - n, -1, -1):
            if ids[start : start + n] == c:
                return start, start + n
    splits = " or ".join(str([tok.decode([i]) for i in c]) for c in candidates)
    raise ValueError(
        f"subject {subject!r} not found in the prompt: the prompt splits into {[tok.decode([i]) for i in ids]}, "
        f"the subject into {splits}; give the subject exactly as it appears in the prompt"
    )


def window_layers(layer: int, window: int, n_layers: int) -> tuple[int, int]:
    """`[lo, hi)`: the layers restored around `layer` (Meng et al.'s window, clipped to `[0, n_layers)`)."""
    return max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2)


def default_noise(model: Transformer) -> float:
    """3 x the standard deviation of all entries of the token-embedding matrix `W_E` [V, D].

    Meng et al. use 3 x the standard deviation of the embeddings of subject tokens over their
    dataset; the whole vocabulary's embedding matrix is the dataset-free version of that.
    """
    return 3.0 * float(jnp.std(model.W_E.astype(jnp.float32)))


def noise_delta(key, samples: int, T: int, D: int, span: tuple[int, int], noise: float) -> Array:
    """`[samples, T, D]` Gaussian noise (std `noise`) at the subject's positions, zero elsewhere."""
    eps = jax.random.normal(key, (samples, T, D), jnp.float32) * jnp.float32(noise)
    at = (jnp.arange(T) >= span[0]) & (jnp.arange(T) < span[1])
    return jnp.where(at[None, :, None], eps, jnp.zeros_like(eps))


def _answer_prob(model: Transformer, resid: Array, answer_id) -> Array:
    """Mean over the batch of p(answer) at the last position of `resid [B, T, D]`."""
    logits = unembed(model, resid[:, -1]).astype(jnp.float32)
    return jnp.mean(jax.nn.softmax(logits, axis=-1)[:, answer_id])


def _restore_mask(kind: str, layer, pos, window: int, L: int, T: int) -> Array:
    """`[L, 1, T, 1]` bool: where the clean activation is put back for the pair (layer, pos)."""
    ls = jnp.arange(L)
    if kind == "resid":
        in_window = ls == layer
    else:
        in_window = (ls >= jnp.maximum(0, layer - window // 2)) & (ls < jnp.minimum(L, layer + (window + 1) // 2))
    return (in_window[:, None] & (jnp.arange(T) == pos)[None, :])[:, None, :, None]


@eqx.filter_jit
def _sweep_chunk(model, tokens, corrupt_resid, clean_stack, answer_id, layers, positions, kind: str, window: Array):
    """p(answer) for each `(layers[i], positions[i])` restoration: one vmapped program (window traced too).

    Layers below the chunk's lowest restored layer are the same corrupted run for every row, so
    each run starts there, entering with the corrupted residual stream (`corrupt_resid [L, S, T, D]`,
    `hook_resid_pre` of every layer): rows are layer-major, so this skips about half the work."""
    L, T = model.cfg.n_layers, tokens.shape[1]
    start = jnp.min(layers) if kind == "resid" else jnp.maximum(0, jnp.min(layers) - window // 2)

    def one(layer, pos):
        mask = _restore_mask(kind, layer, pos, window, L, T)
        restore = Hook(KINDS[kind], ALL_LAYERS, PerLayer(Replace(clean_stack, mask)))
        out = run(model, tokens, hooks=[restore], start_layer=start, resid=corrupt_resid[start], return_logits=False)
        return _answer_prob(model, out.resid, answer_id)

    return jax.vmap(one)(layers, positions)


def causal_trace(
    model: Transformer,
    tokens,
    subject_span: tuple[int, int],
    answer_id: int,
    *,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    kind: str = "resid",
    window: int = 10,
    chunk: int | None = None,
    progress: bool = False,
) -> CausalTrace:
    """Causal trace of one prompt: `scores [L, T]`, p(answer) after restoring each (layer, token).

    tokens: int `[T]` (or `[1, T]`); subject_span: `(start, stop)` from `subject_positions`;
    answer_id: the answer's token id. noise: std of the Gaussian noise added to the subject's
    token embeddings (default `default_noise(model)`, 3 x std of `W_E`'s entries). samples:
    noise draws (a batch; the same draws for every restoration). kind: "resid" restores
    `hook_resid_post` of layer l; "mlp"/"attn" restore `hook_mlp_out`/`hook_attn_out` over the
    `window` layers around l (see `window_layers`). chunk: restorations per compiled call
    (default: equal chunks of at most 64). See the module docstring for the method.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    tokens = np.asarray(tokens)
    if tokens.ndim == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.ndim != 1 or tokens.size == 0:
        raise ValueError(f"tokens must be one prompt, shape [T] or [1, T]; got shape {tokens.shape}")
    cfg = model.cfg
    L, T, D = cfg.n_layers, int(tokens.shape[0]), cfg.d_model
    start, stop = (int(subject_span[0]), int(subject_span[1]))
    if not 0 <= start < stop <= T:
        raise ValueError(f"subject_span {subject_span} must satisfy 0 <= start < stop <= {T} (the prompt's length)")
    if not 0 <= int(answer_id) < cfg.d_vocab:
        raise ValueError(f"answer_id {answer_id} is outside the vocabulary [0, {cfg.d_vocab})")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    noise = default_noise(model) if noise is None else float(noise)
    window = 1 if kind == "resid" else int(window)
    site = KINDS[kind]
    answer = jnp.int32(answer_id)

    clean_out = run(model, tokens[None], cache=[f"blocks.{l}.{site}" for l in range(L)], return_logits=False)
    clean_prob = float(_answer_prob(model, clean_out.resid, answer))
    clean_stack = jnp.stack([clean_out.cache[f"blocks.{l}.{site}"] for l in range(L)])  # [L, 1, T, D]

    batch = jnp.broadcast_to(jnp.asarray(tokens, jnp.int32)[None], (samples, T))
    delta = noise_delta(jax.random.key(seed), samples, T, D, (start, stop), noise)
    corrupt_out = run(model, batch, hooks=[Hook("hook_embed", None, Add(delta))], cache=[f"blocks.{l}.hook_resid_pre" for l in range(L)],
                      return_logits=False)  # fmt: skip
    corrupt_prob = float(_answer_prob(model, corrupt_out.resid, answer))
    corrupt_resid = jnp.stack([corrupt_out.cache[f"blocks.{l}.hook_resid_pre"] for l in range(L)])  # [L, samples, T, D]

    pairs = np.stack(np.meshgrid(np.arange(L), np.arange(T), indexing="ij"), -1).reshape(-1, 2).astype(np.int32)
    n = len(pairs)
    if chunk is None:  # at most 64 rows per call, in equal chunks (little padding)
        chunk = -(-n // -(-n // 64))
    chunk = max(1, min(int(chunk), n))
    n_chunks = -(-n // chunk)
    padded = np.concatenate([pairs, np.repeat(pairs[-1:], n_chunks * chunk - n, 0)])
    steps = range(n_chunks)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"causal trace ({kind})", unit="chunk")
    t0 = time.perf_counter()
    out, first = [], 0.0
    for c in steps:
        rows = padded[c * chunk : (c + 1) * chunk]
        p = _sweep_chunk(model, batch, corrupt_resid, clean_stack, answer, jnp.asarray(rows[:, 0]), jnp.asarray(rows[:, 1]), kind, jnp.int32(window))
        out.append(np.asarray(p))
        first = first or time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    scores = np.concatenate(out)[:n].reshape(L, T).astype(np.float32)
    return CausalTrace(
        scores=scores, clean=clean_prob, corrupt=corrupt_prob, tokens=tokens.astype(np.int32), subject_span=(start, stop),
        answer_id=int(answer_id), kind=kind, window=window, noise=noise, samples=int(samples), seconds=seconds,
        first_chunk_seconds=first,
    )  # fmt: skip


def trace_fact(
    model: Transformer,
    tok,
    prompt: str,
    subject: str,
    answer: str | None = None,
    *,
    kinds: Sequence[str] = ("resid", "mlp", "attn"),
    prepend_bos: bool | None = None,
    **kwargs,
) -> dict[str, CausalTrace]:
    """Causal traces of a prompt for several kinds: `{kind: CausalTrace}`.

    answer: one token (e.g. " Paris"); default the model's top next token. The same noise draws
    (same `seed`) serve every kind, so their `corrupt` probabilities agree.
    """
    ids = tok.encode(prompt, prepend_bos=prepend_bos)
    if not ids:
        raise ValueError("the prompt tokenizes to nothing")
    span = subject_positions(tok, ids, subject)
    if answer is None:
        logits = run(model, np.asarray([ids], np.int32)).logits[0, -1]
        answer_id = int(jnp.argmax(logits))
    else:
        answer_id = tok.to_single_token(answer)
    return {k: causal_trace(model, ids, span, answer_id, kind=k, **kwargs) for k in kinds}
