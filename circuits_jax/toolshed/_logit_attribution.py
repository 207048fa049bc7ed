"""Direct logit attribution, residual decomposition and the logit lens.

The final residual stream at a position is exactly the sum of its writers: the embedding (and
position embedding), every head's output (`z @ W_O`), each layer's attention bias, and every
MLP's output. With the final norm's scale frozen at its value in the run (the usual DLA
convention), the logit is linear in that sum, so each writer gets an exact share: the shares plus
the constant terms (final-norm bias, unembedding bias) sum to the logit.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from ..core import Result, Transformer, run, unembed


@dataclasses.dataclass(frozen=True, repr=False)
class Decomposition(Result):
    """The residual stream at one position split into its writers (embeddings, heads, attention biases, MLPs)."""

    components: np.ndarray  # [C, B, D]: writers to the residual stream at the position
    labels: list[str]  # C names: "embed", "pos_embed", "L{l}H{h}", "L{l}.attn_bias", "L{l}.mlp"


def _at(a, pos):
    return a[jnp.arange(a.shape[0]), pos]


def _positions(tokens, pos):
    B, T = tokens.shape
    return jnp.broadcast_to(jnp.asarray(pos % T if isinstance(pos, int) else pos, jnp.int32), (B,))


def _run_at(model: Transformer, tokens, pos, attention_mask, names: list[str]):
    """One run caching `names` (and the final norm's scale); the scored position of each row."""
    tokens = np.atleast_2d(np.asarray(tokens, np.int32))
    if model.cfg.normalization is not None:
        names = [*names, "ln_final.hook_scale"]
    out = run(model, tokens, cache=names, attention_mask=attention_mask)
    return out, _positions(tokens, pos)


def _component_names(model: Transformer) -> list[str]:
    cfg, L = model.cfg, model.cfg.n_layers
    cfg.check_additive("decomposing the residual stream into heads", ("heads",))
    names = ["hook_embed", *(["hook_pos_embed"] if cfg.positional == "learned" else [])]
    names += [f"blocks.{l}.attn.hook_z" for l in range(L)]
    if not cfg.attn_only:
        names += [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    return names


def _components(model: Transformer, out, p) -> Decomposition:
    cfg = model.cfg
    comps, labels = [_at(out.cache["hook_embed"], p)], ["embed"]
    if cfg.positional == "learned":
        comps.append(_at(out.cache["hook_pos_embed"], p))
        labels.append("pos_embed")
    for l in range(cfg.n_layers):
        z = _at(out.cache[f"blocks.{l}.attn.hook_z"], p)  # [B, H, E]
        heads = jnp.einsum("bhe,hed->hbd", z, model.blocks.W_O[l])
        comps += list(heads)
        labels += [f"L{l}H{h}" for h in range(cfg.n_heads)]
        if model.blocks.b_O is not None:
            comps.append(jnp.broadcast_to(model.blocks.b_O[l], heads.shape[1:]))
            labels.append(f"L{l}.attn_bias")
        if not cfg.attn_only:
            comps.append(_at(out.cache[f"blocks.{l}.hook_mlp_out"], p))
            labels.append(f"L{l}.mlp")
    return Decomposition(np.asarray(jnp.stack(comps)), labels)


def decompose_resid(model: Transformer, tokens, pos=-1, attention_mask=None) -> tuple[Decomposition, dict]:
    """Every writer to the final residual stream at `pos` (int or `[B]`); they sum to it exactly."""
    out, p = _run_at(model, tokens, pos, attention_mask, _component_names(model))
    return _components(model, out, p), {"out": out, "pos": p}


def _readout(model: Transformer, out, p, answer, wrong):
    """`(answer [B], wrong [B] | None, direction [B, D], frozen final-norm scale [B, 1] | None)`."""
    B = p.shape[0]
    answer = np.broadcast_to(np.asarray(answer), (B,))
    wrong = None if wrong is None else np.broadcast_to(np.asarray(wrong), (B,))
    W_U = model.W_U
    direction = W_U[:, jnp.asarray(answer)].T
    if wrong is not None:
        direction = direction - W_U[:, jnp.asarray(wrong)].T
    scale = _at(out.cache["ln_final.hook_scale"], p) if model.cfg.normalization is not None else None
    return answer, wrong, direction, scale


def _through_final_norm(model: Transformer, x, scale):
    """Linear map of the final norm with its scale frozen: centre (LayerNorm), divide, weight."""
    if model.cfg.normalization is None:
        return x
    if model.cfg.normalization == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    return x / scale * model.lnf_w


def direct_logit_attribution(model: Transformer, tokens, answer, wrong=None, pos=-1, attention_mask=None):
    """`(attributions [C, B], labels, constant [B], logit [B])`: each writer's share of the answer logit
    (or of `logit[answer] - logit[wrong]`); `attributions.sum(0) + constant == logit`."""
    model.cfg.check_additive("direct logit attribution", ("heads", "logits"))
    dec, ctx = decompose_resid(model, tokens, pos, attention_mask)
    out, p = ctx["out"], ctx["pos"]
    answer, wrong, direction, scale = _readout(model, out, p, answer, wrong)
    B = p.shape[0]
    normed = _through_final_norm(model, jnp.asarray(dec.components), scale)  # [C, B, D]
    attributions = jnp.einsum("cbd,bd->cb", normed, direction)
    constant = jnp.zeros(B)
    if model.lnf_b is not None:
        constant = constant + direction @ model.lnf_b
    if model.b_U is not None:
        constant = constant + model.b_U[answer] - (0 if wrong is None else model.b_U[wrong])
    logits = _at(out.logits, p)
    logit = logits[jnp.arange(B), answer] - (0 if wrong is None else logits[jnp.arange(B), wrong])
    return np.asarray(attributions), dec.labels, np.asarray(constant), np.asarray(logit)


def neuron_logit_attribution(model: Transformer, tokens, answer, wrong=None, pos=-1, attention_mask=None):
    """`[L, B, M]`: each MLP neuron's direct share of the logit (final-norm scale frozen)."""
    model.cfg.check_additive("neuron logit attribution", ("neurons", "logits"))
    L = model.cfg.n_layers
    out, p = _run_at(model, tokens, pos, attention_mask, [f"blocks.{l}.mlp.hook_post" for l in range(L)])
    _, _, direction, scale = _readout(model, out, p, answer, wrong)
    rows = []
    for l in range(L):
        post = _at(out.cache[f"blocks.{l}.mlp.hook_post"], p)  # [B, M]
        writes = post[:, :, None] * model.blocks.W_out[l][None]  # [B, M, D]
        normed = _through_final_norm(model, writes, None if scale is None else scale[:, None])
        rows.append(jnp.einsum("bmd,bd->bm", normed, direction))
    return np.asarray(jnp.stack(rows))


def logit_lens(model: Transformer, tokens, pos=-1, attention_mask=None) -> np.ndarray:
    """`[L + 1, B, V]`: the accumulated residual stream entering each layer (and the final one),
    read out through the final norm and unembedding at `pos`."""
    L = model.cfg.n_layers
    out, p = _run_at(model, tokens, pos, attention_mask, [f"blocks.{l}.hook_resid_pre" for l in range(L)])
    resid = jnp.stack([_at(out.cache[f"blocks.{l}.hook_resid_pre"], p) for l in range(L)] + [_at(out.resid, p)])
    return np.asarray(unembed(model, resid))
