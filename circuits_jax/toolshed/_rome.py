"""ROME: rank-one model editing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

An MLP layer is read as a linear associative memory. With the row convention of `_model.py`,
`mlp_out = post @ W_out + b_out`, the *key* `k` is `blocks.{l}.mlp.hook_post` `[M]` (for SwiGLU,
`silu(gate) * linear`) and the *value* is the MLP output `[D]`. To make a subject recall a new
object, ROME

1. estimates the keys' uncentred second moment `C = E[k k^T]` `[M, M]` over a text corpus
   (`key_covariance`; `corpus_tokens` packs one),
2. takes the subject's key `k*` `[M]`: the mean, over the fact prompt behind a few short prefixes,
   of the key at the subject's last token (`subject_key`),
3. finds the value `v*` `[D]` that makes the model say the new object: a vector `delta` added to the
   MLP output at the subject's last token, optimised with Adam to maximise `log p(target_new)` over
   the prefixed prompts, with a KL term that keeps "{subject} is a" predicting what it did, a weight
   decay on `|delta|` and a clamp `|delta| <= clamp * |v0|`, where `v0 = k*^T W + b` (`compute_value`),
4. inserts `k* -> v*` with the smallest change in the `C^{-1}` metric:
   `W' = W + u Lambda^T`, `u = C^{-1} k* / (k*^T C^{-1} k*)`, `Lambda = v* - b - k*^T W = delta`, so
   `k*^T W' + b = v*` exactly and every key `k` with `k^T C^{-1} k* = 0` maps as before
   (`rank_one_update`, `rome_edit`). `C` is regularised as `C + lam * mean(diag C) * I`.

`evaluate_edit` scores an edit with CounterFact's definitions (efficacy, paraphrase and
neighbourhood scores: fractions of prompts where one answer's probability beats the other's).

Everything is a pure function of the model pytree: the edited model is a new pytree made with
`eqx.tree_at`; activations come from `run` with `cache=`/`hooks=`, the value optimisation is one
jitted optax step through `run` with a `cj.Add(delta, mask)` hook at `blocks.{l}.hook_mlp_out`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array

from ..core import Add, Hook, Result, Transformer, run
from ..dictionaries import pack_contexts, read_corpus

# Short neutral texts put before the fact prompt (Meng et al. sample them from the model; fixed texts
# keep edits reproducible without a generation step). "" is the bare prompt.
DEFAULT_PREFIXES = (
    "",
    "Here is a fact. ",
    "I read this in a book. ",
    "The news was short today. ",
    "Let me tell you something. ",
    "This is well known. ",
)
ESSENCE_PROMPT = "{} is a"


@dataclasses.dataclass(frozen=True, repr=False)
class RomeInfo(Result):
    """What `rome_edit` did. Arrays are float32 numpy."""

    layer: int
    k_star: np.ndarray  # [M] the subject's key
    v_star: np.ndarray  # [D] the MLP output the edited layer now gives k_star
    v_old: np.ndarray  # [D] k_star^T W + b before the edit
    u: np.ndarray  # [M] left factor, C^{-1} k* / (k*^T C^{-1} k*)
    Lambda: np.ndarray  # [D] right factor, v* - b - k*^T W
    losses: np.ndarray  # [steps] total loss per optimisation step
    nll: np.ndarray  # [steps] mean per-token -log p(target_new) over the prefixed prompts
    kl: np.ndarray  # [steps] KL(edited || original) at the essence prompt
    seconds: float  # wall time of the whole edit


@dataclasses.dataclass(frozen=True, repr=False)
class EditScores(Result):
    """`evaluate_edit`'s CounterFact-style scores of one edit; reads like the dict it was (`s["efficacy"]`).

    pre / post: the scores before and after the edit, dicts of `p_new`, `p_true`, `efficacy`,
    `paraphrase_p_new`, `paraphrase_p_true`, `paraphrase`, `neighborhood_p_true`,
    `neighborhood_p_new`, `neighborhood` (Python floats and lists)."""

    pre: dict[str, Any]
    post: dict[str, Any]
    neighborhood_dp_true: float  # mean change of the neighbours' p(true answer)
    essence_kl: float  # KL(after || before) of the next token after "{subject} is a"
    efficacy: float  # post["efficacy"]
    paraphrase: float  # post["paraphrase"]
    neighborhood: float  # post["neighborhood"]


# --------------------------------------------------------------------------- checks and token positions


def _check_layer(model: Transformer, layer: int) -> int:
    L = model.cfg.n_layers
    if model.blocks.W_out is None:
        raise ValueError("ROME edits an MLP, but this model has no MLP (attention-only)")
    if not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < L:
        raise ValueError(f"layer must be an int in [0, {L - 1}] (the model has {L} layers), got {layer!r}")
    return int(layer)


def _post_site(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_post"


def _single(tok, answer: str, what: str) -> list[int]:
    ids = tok.encode(answer, prepend_bos=False)
    if not ids:
        raise ValueError(f"{what} {answer!r} tokenizes to no tokens")
    return ids


def locate_subject(tok, text: str, subject: str, *, prepend_bos: bool | None = None) -> tuple[list[int], int]:
    """`(token ids of text, index of the subject's last token)`, for the subject's last occurrence.

    The span comes from `subject_positions` (causal tracing's, the one place that finds a subject):
    a subject that is absent, or whose tokens merge with the text around it, raises a ValueError
    showing both token splits."""
    from ._causal_tracing import subject_positions

    ids = tok.encode(text, prepend_bos)
    _, stop = subject_positions(tok, ids, subject)
    return ids, stop - 1


def _pad(rows: Sequence[Sequence[int]], pad_id: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded `(tokens [B, T], mask [B, T])`, T rounded up to a multiple of `multiple`."""
    T = -(-max(len(r) for r in rows) // multiple) * multiple
    tokens = np.full((len(rows), T), pad_id, np.int32)
    mask = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, True
    return tokens, mask


# --------------------------------------------------------------------------- 1. key covariance


def corpus_tokens(tok, source: str = "pydoc-topics", *, ctx_len: int = 128, max_contexts: int | None = None):
    """`(tokens [N, ctx_len], count_mask [N, ctx_len])` from `read_corpus(source)` packed by
    `pack_contexts`; `count_mask` is False at the BOS column (an attention sink, not a text key)."""
    tokens = pack_contexts(tok, read_corpus(source), ctx_len, max_contexts=max_contexts)
    count = np.ones(tokens.shape, bool)
    if tok.bos_token_id is not None:
        count[:, 0] = False
    return tokens, count


def key_covariance(
    model: Transformer,
    tokens,
    layer: int | Sequence[int],
    *,
    attention_mask=None,
    count_mask=None,
    chunk: int = 16,
    progress: bool = True,
) -> Array:
    """Uncentred second moment `E[k k^T]` of `blocks.{layer}.mlp.hook_post` over corpus positions.

    tokens: int `[N, T]`; attention_mask: bool `[N, T]` (False at padding, passed to `run`);
    count_mask: bool `[N, T]`, which positions count (default: the attention mask, or all).
    layer: an int -> `[M, M]`; a sequence of layers -> `[len(layers), M, M]` from one pass.
    Rows are run `chunk` at a time (the last chunk padded with uncounted rows, so one program);
    each chunk's `k^T k` is float32, the running sum float64 numpy. Returns float32.
    """
    layers = [layer] if isinstance(layer, (int, np.integer)) else list(layer)
    if not layers:
        raise ValueError("layer: give an int or a non-empty sequence of ints")
    layers = [_check_layer(model, l) for l in layers]
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [N, T], got shape {tokens.shape}")
    N, T = tokens.shape
    am = None if attention_mask is None else np.asarray(attention_mask, bool)
    cm = am if count_mask is None else np.asarray(count_mask, bool)
    cm = np.ones((N, T), bool) if cm is None else cm
    for name, m in (("attention_mask", am), ("count_mask", cm)):
        if m is not None and m.shape != (N, T):
            raise ValueError(f"{name} has shape {m.shape}; tokens have shape {(N, T)}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    sites = [_post_site(l) for l in layers]

    @jax.jit
    def moments(toks, amask, cmask):
        out = run(model, toks, cache=sites, attention_mask=amask, stop_layer=max(layers) + 1, return_logits=False)
        w = cmask.astype(jnp.float32)[..., None]
        ks = [(out.cache[s] * w).reshape(-1, out.cache[s].shape[-1]) for s in sites]
        return jnp.stack([k.T @ k for k in ks])

    M = model.cfg.d_mlp
    total = np.zeros((len(layers), M, M), np.float64)
    from tqdm.auto import tqdm

    for i in tqdm(range(0, N, chunk), desc="key covariance", unit="chunk", disable=not progress):
        n = min(chunk, N - i)
        toks = np.zeros((chunk, T), np.int32)
        cmask = np.zeros((chunk, T), bool)
        amask = np.ones((chunk, T), bool)
        toks[:n], cmask[:n] = tokens[i : i + n], cm[i : i + n]
        if am is not None:
            amask[:n] = am[i : i + n]
        total += np.asarray(moments(toks, amask if am is not None else None, cmask), np.float64)
    count = int(cm.sum())
    if count == 0:
        raise ValueError("no corpus positions are counted (count_mask / attention_mask are all False)")
    cov = jnp.asarray(total / count, jnp.float32)
    return cov[0] if isinstance(layer, (int, np.integer)) else cov


# --------------------------------------------------------------------------- 2. the subject's key


def subject_key(model: Transformer, tok, prompts: Sequence[str], subject: str, layer: int, *,
                prepend_bos: bool | None = None) -> Array:  # fmt: skip
    """k* `[M]`: the mean over `prompts` (full texts, each containing `subject`) of the key
    `blocks.{layer}.mlp.hook_post` at the subject's last token. One right-padded run."""
    layer = _check_layer(model, layer)
    if isinstance(prompts, str):
        prompts = [prompts]
    located = [locate_subject(tok, p, subject, prepend_bos=prepend_bos) for p in prompts]
    tokens, mask = _pad([ids for ids, _ in located], tok.pad_token_id)
    idx = jnp.asarray([i for _, i in located])
    site = _post_site(layer)
    out = run(model, tokens, cache=[site], attention_mask=mask, stop_layer=layer + 1, return_logits=False)
    keys = out.cache[site][jnp.arange(len(prompts)), idx]  # [P, M]
    return keys.mean(axis=0)


# --------------------------------------------------------------------------- 3. the new value


def _request(request: Mapping[str, Any]) -> tuple[str, str, str]:
    missing = [k for k in ("prompt", "subject", "target_new") if k not in request]
    if missing:
        raise ValueError(f"request needs keys prompt, subject, target_new; missing {missing} in {sorted(request)}")
    prompt, subject, target = request["prompt"], request["subject"], request["target_new"]
    if "{}" not in prompt:
        raise ValueError(f"request prompt must contain '{{}}' where the subject goes, got {prompt!r}")
    return prompt, subject, target


def _logprobs(model: Transformer, batch: dict, delta: Array) -> Array:
    """Log-probs `[B, T, V]` with `delta` added to `hook_mlp_out` at the (traced) layer where `mask`."""
    hook = Hook("hook_mlp_out", batch["layer"], Add(delta, batch["mask"]))
    logits = run(model, batch["tokens"], hooks=[hook], attention_mask=batch["amask"]).logits
    return jax.nn.log_softmax(logits, axis=-1)


def _value_loss(delta, model, batch, kl_init, v0, hp):
    lp = _logprobs(model, batch, delta)
    P = batch["tpos"].shape[0]
    tl = lp[jnp.arange(P)[:, None], batch["tpos"], batch["tids"]]  # [P, n]
    nll = -tl.mean(axis=1).mean()
    kl_lp = lp[P, batch["kl_pos"]]
    kl = jnp.sum(jnp.exp(kl_lp) * (kl_lp - kl_init))
    wd = hp["weight_decay"] * jnp.sum(delta * delta) / jnp.sum(v0 * v0)
    return nll + hp["kl_weight"] * kl + wd, (nll, kl)


@eqx.filter_jit
def _value_step(model, batch, kl_init, v0, delta, state, hp):
    """One Adam step on delta, then the clamp `|delta| <= clamp |v0|`. Everything is traced (the
    layer too), so one program serves every edit of the same padded shape."""
    (loss, (nll, kl)), g = jax.value_and_grad(_value_loss, has_aux=True)(delta, model, batch, kl_init, v0, hp)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 step count with float decays
        upd, state = optax.adam(hp["lr"]).update(g, state, delta)
    delta = optax.apply_updates(delta, upd)
    max_norm = hp["clamp"] * jnp.sqrt(jnp.sum(v0 * v0))
    delta = delta * jnp.minimum(1.0, max_norm / jnp.maximum(jnp.linalg.norm(delta), 1e-12))
    return delta, state, (loss, nll, kl)


def compute_value(
    model: Transformer,
    tok,
    request: Mapping[str, Any],
    layer: int,
    k_star,
    *,
    prefixes: Sequence[str] = DEFAULT_PREFIXES,
    steps: int = 25,
    lr: float = 0.5,
    kl_weight: float = 0.0625,
    weight_decay: float = 0.5,
    clamp: float = 4.0,
    stop_nll: float = 0.05,
    prepend_bos: bool | None = None,
) -> tuple[Array, dict]:
    """v* `[D]` = `v0 + delta`, `v0 = k*^T W_out[l] + b_out[l]`, with `delta` found by Adam.

    Rows: `prefix + prompt.format(subject) + target_new` for each prefix (teacher-forced; the loss is
    the mean over rows of the mean per-token `-log p(target_new)`, so multi-token targets are
    allowed), plus the essence row `"{subject} is a"`. `delta` is added to `blocks.{l}.hook_mlp_out`
    at every row's last subject token. Loss = nll + kl_weight * KL(edited || original) at the essence
    row's last token + weight_decay * |delta|^2 / |v0|^2; after each step `|delta|` is clamped to
    `clamp * |v0|`. Stops early once nll < `stop_nll`. One jitted step (one compile).
    Returns `(v_star, {"losses", "nll", "kl"})` (per-step numpy arrays).
    """
    layer = _check_layer(model, layer)
    prompt, subject, target = _request(request)
    tids = _single(tok, target, "target_new")
    n = len(tids)
    rows, sub_idx, tpos = [], [], []
    for pre in prefixes:
        ids, i = locate_subject(tok, pre + prompt.format(subject), subject, prepend_bos=prepend_bos)
        rows.append(ids + tids[:-1])
        sub_idx.append(i)
        tpos.append([len(ids) - 1 + j for j in range(n)])
    ids, i = locate_subject(tok, ESSENCE_PROMPT.format(subject), subject, prepend_bos=prepend_bos)
    rows.append(ids)
    sub_idx.append(i)
    P = len(prefixes)
    tokens, amask = _pad(rows, tok.pad_token_id, multiple=8)  # bucketed lengths: edits share programs
    B, T = tokens.shape
    mask = np.zeros((B, T, 1), bool)
    mask[np.arange(B), sub_idx] = True
    batch = dict(tokens=tokens, amask=amask, mask=mask, tpos=np.asarray(tpos, np.int32),
                 tids=np.asarray([tids] * P, np.int32), kl_pos=np.int32(len(ids) - 1), layer=np.int32(layer))  # fmt: skip
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    k_star = jnp.asarray(k_star, jnp.float32)
    v0 = k_star @ model.blocks.W_out[layer]
    if model.blocks.b_out is not None:
        v0 = v0 + model.blocks.b_out[layer]
    hp = dict(lr=lr, kl_weight=kl_weight, weight_decay=weight_decay, clamp=clamp)
    hp = {k: jnp.float32(v) for k, v in hp.items()}
    delta = jnp.zeros_like(v0)
    kl_init = _logprobs(model, batch, delta)[P, batch["kl_pos"]]  # [V]
    state = optax.adam(1.0).init(delta)  # Adam's state does not depend on the learning rate
    trace: dict[str, list] = {"losses": [], "nll": [], "kl": []}
    for _ in range(steps):
        new, state, (loss, nll, kl) = _value_step(model, batch, kl_init, v0, delta, state, hp)
        trace["losses"].append(float(loss))
        trace["nll"].append(float(nll))
        trace["kl"].append(float(kl))
        if float(nll) < stop_nll:  # the loss was measured at `delta`: keep it
            break
        delta = new
    return v0 + delta, {k: np.asarray(v, np.float32) for k, v in trace.items()}


# --------------------------------------------------------------------------- 4. the rank-one update


def rank_one_update(cov, k_star, v_star, W, b=None, *, lam: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """`(u [M], Lambda [D])` with `W' = W + u Lambda^T` giving `k*^T W' + b = v*` exactly.

    `u = C_r^{-1} k* / (k*^T C_r^{-1} k*)`, `C_r = C + lam * mean(diag C) * I` (solved in float64),
    `Lambda = v* - b - k*^T W`. Keys with `k^T C_r^{-1} k* = 0` keep their output."""
    C = np.asarray(cov, np.float64)
    k = np.asarray(k_star, np.float64)
    W64 = np.asarray(W, np.float64)
    M = W64.shape[0]
    if C.shape != (M, M) or k.shape != (M,):
        raise ValueError(
            f"cov has shape {C.shape} and k_star {k.shape}; W_out is {W64.shape}, so expected {(M, M)} and {(M,)}"
        )
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    Cr = C + lam * np.mean(np.diag(C)) * np.eye(M)
    Ck = np.linalg.solve(Cr, k)
    u = Ck / (k @ Ck)
    Lam = np.asarray(v_star, np.float64) - k @ W64
    if b is not None:
        Lam = Lam - np.asarray(b, np.float64)
    return u.astype(np.float32), Lam.astype(np.float32)


def apply_rank_one(model: Transformer, layer: int, u, Lambda) -> Transformer:
    """The model with `W_out[layer] += u Lambda^T` (a new pytree; the input is unchanged)."""
    layer = _check_layer(model, layer)
    W = model.blocks.W_out[layer]
    W_new = W + jnp.outer(jnp.asarray(u, W.dtype), jnp.asarray(Lambda, W.dtype))
    return eqx.tree_at(lambda m: m.blocks.W_out, model, model.blocks.W_out.at[layer].set(W_new))


def rome_edit(
    model: Transformer,
    tok,
    request: Mapping[str, Any],
    layer: int,
    cov,
    *,
    lam: float = 1e-2,
    prefixes: Sequence[str] = DEFAULT_PREFIXES,
    prepend_bos: bool | None = None,
    **value_kw,
) -> tuple[Transformer, RomeInfo]:
    """Edit `request = dict(prompt="{} is in the city of", subject="The Eiffel Tower", target_new=" Rome")`
    into `W_out[layer]`; `cov` is `key_covariance(model, ..., layer)` `[M, M]`. `value_kw` go to
    `compute_value` (steps, lr, kl_weight, weight_decay, clamp, stop_nll). Returns `(new_model, RomeInfo)`."""
    t0 = time.perf_counter()
    layer = _check_layer(model, layer)
    prompt, subject, _ = _request(request)
    M = model.cfg.d_mlp
    if tuple(np.shape(cov)) != (M, M):
        raise ValueError(f"cov has shape {tuple(np.shape(cov))}; layer {layer}'s keys need {(M, M)} (d_mlp={M})")
    texts = [pre + prompt.format(subject) for pre in prefixes]
    k_star = subject_key(model, tok, texts, subject, layer, prepend_bos=prepend_bos)
    v_star, trace = compute_value(model, tok, request, layer, k_star, prefixes=prefixes, prepend_bos=prepend_bos,
                                  **value_kw)  # fmt: skip
    W = model.blocks.W_out[layer]
    b = None if model.blocks.b_out is None else model.blocks.b_out[layer]
    u, Lam = rank_one_update(cov, k_star, v_star, W, b, lam=lam)
    new = apply_rank_one(model, layer, u, Lam)
    v_old = k_star @ W + (0.0 if b is None else b)
    jax.block_until_ready(new.blocks.W_out)
    info = RomeInfo(layer, np.asarray(k_star), np.asarray(v_star), np.asarray(v_old), u, Lam, trace["losses"],
                    trace["nll"], trace["kl"], time.perf_counter() - t0)  # fmt: skip
    return new, info


# --------------------------------------------------------------------------- 5. evaluation


def answer_logprobs(model: Transformer, tok, texts: Sequence[str], answers: Sequence[str], *,
                    prepend_bos: bool | None = None) -> np.ndarray:  # fmt: skip
    """Mean per-token `log p(answer | text)` `[n]` (teacher-forced; for one-token answers, log p)."""
    if len(texts) != len(answers):
        raise ValueError(f"{len(texts)} texts but {len(answers)} answers")
    rows, pos, ids = [], [], []
    for text, ans in zip(texts, answers):
        p = tok.encode(text, prepend_bos)
        a = _single(tok, ans, "answer")
        rows.append(p + a[:-1])
        pos.append([len(p) - 1 + j for j in range(len(a))])
        ids.append(a)
    n = max(len(a) for a in ids)
    pos_a = np.array([q + [q[-1]] * (n - len(q)) for q in pos])
    ids_a = np.array([a + [a[-1]] * (n - len(a)) for a in ids])
    valid = np.array([[j < len(a) for j in range(n)] for a in ids], np.float32)
    tokens, mask = _pad(rows, tok.pad_token_id, multiple=8)  # bucketed lengths: fewer compiles
    lp = jax.nn.log_softmax(run(model, tokens, attention_mask=mask).logits, axis=-1)
    got = np.asarray(lp[np.arange(len(rows))[:, None], pos_a, ids_a])
    return (got * valid).sum(1) / valid.sum(1)


def _next_logprobs(model, tok, text, prepend_bos):
    ids = tok.encode(text, prepend_bos)
    return np.asarray(jax.nn.log_softmax(run(model, np.asarray([ids], np.int32)).logits[0, -1]), np.float64)


def evaluate_edit(model_before: Transformer, model_after: Transformer, tok, case: Mapping[str, Any], *,
                  prepend_bos: bool | None = None) -> EditScores:  # fmt: skip
    """CounterFact-style scores of one edit, before and after (an `EditScores`, read as `s["efficacy"]`).

    case: `prompt` (with "{}"), `subject`, `target_new`, `target_true`, `paraphrase_prompts` (texts,
    "{}" is filled with the subject), `neighborhood_prompts` (`(text, its true answer)` pairs: other
    subjects of the relation). Following CounterFact, answers are compared by mean per-token log p:
    efficacy = [p(new) > p(true)] on the prompt; paraphrase = fraction of paraphrases with
    p(new) > p(true); neighbourhood = fraction of neighbours whose own true answer beats target_new
    (neighbours whose true answer is target_new are skipped). Also the probabilities, the mean change
    of the neighbours' p(true), and essence drift: KL(after || before) of the next token after
    "{subject} is a". Values are Python floats / lists.
    """
    prompt, subject, new = _request(case)
    true = case["target_true"]
    para = [p.format(subject) if "{}" in p else p for p in case.get("paraphrase_prompts", ())]
    neigh = [(t, a) for t, a in case.get("neighborhood_prompts", ()) if a.strip() != new.strip()]
    texts = [prompt.format(subject)] + para
    out: dict[str, Any] = {}
    for tag, m in (("pre", model_before), ("post", model_after)):
        both = answer_logprobs(m, tok, texts * 2, [new] * len(texts) + [true] * len(texts), prepend_bos=prepend_bos)
        lp_new, lp_true = both[: len(texts)], both[len(texts) :]
        r = {
            "p_new": float(np.exp(lp_new[0])), "p_true": float(np.exp(lp_true[0])),
            "efficacy": float(lp_new[0] > lp_true[0]),
            "paraphrase_p_new": np.exp(lp_new[1:]).tolist(), "paraphrase_p_true": np.exp(lp_true[1:]).tolist(),
            "paraphrase": float(np.mean(lp_new[1:] > lp_true[1:])) if para else float("nan"),
        }  # fmt: skip
        if neigh:
            nt = [t for t, _ in neigh]
            both = answer_logprobs(m, tok, nt * 2, [a for _, a in neigh] + [new] * len(nt), prepend_bos=prepend_bos)
            n_true, n_new = both[: len(nt)], both[len(nt) :]
            r.update(neighborhood_p_true=np.exp(n_true).tolist(), neighborhood_p_new=np.exp(n_new).tolist(),
                     neighborhood=float(np.mean(n_true > n_new)))  # fmt: skip
        else:
            r.update(neighborhood_p_true=[], neighborhood_p_new=[], neighborhood=float("nan"))
        out[tag] = r
    dp = np.subtract(out["post"]["neighborhood_p_true"], out["pre"]["neighborhood_p_true"])
    out["neighborhood_dp_true"] = float(np.mean(dp)) if neigh else float("nan")
    ess = ESSENCE_PROMPT.format(subject)
    a, b = _next_logprobs(model_before, tok, ess, prepend_bos), _next_logprobs(model_after, tok, ess, prepend_bos)
    out["essence_kl"] = float(np.sum(np.exp(b) * (b - a)))
    out["efficacy"], out["paraphrase"], out["neighborhood"] = (
        out["post"]["efficacy"], out["post"]["paraphrase"], out["post"]["neighborhood"])
    return EditScores(**out)
