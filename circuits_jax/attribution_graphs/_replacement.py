"""The local replacement model: every MLP swapped for its transcoder, for attribution graphs.

On one prompt, the replacement model runs the real model's own layer (`_model._block`) with a
tap that (a) freezes the attention patterns and normalisation denominators at their values in
the real run, when asked, and (b) writes `transcoder(MLP input) + error` in place of each MLP's
output, where the *error* is the real MLP output minus the transcoder's reconstruction on the
real run. With both frozen and the errors added back, the replacement model's logits are the
real logits (tested to 1e-4); with the nonlinearities frozen the map from MLP outputs and token
embeddings to every later transcoder input and to the logits is linear, which is what
`_attribution_graph` differentiates.

BOS is explicit: no transcoder feature is read at position 0 (the transcoders never saw BOS in
training); that position's MLP output is all error.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from ..core import (
    ALL_LAYERS,
    Hook,
    Result,
    Tap,
    Transformer,
    Zero,
    embed,
    forward,
    next_token_nll,
    norm,
    positions_from_mask,
    run,
)
from ..dictionaries import SAE


class Transcoders(eqx.Module):
    """Per-layer transcoders for every layer of one model, stacked on a leading layer axis.

    Layer l reads `blocks.{l}.ln2.hook_normalized` and writes `blocks.{l}.hook_mlp_out`."""

    W_enc: Array  # [L, D, F]
    b_enc: Array  # [L, F]
    W_dec: Array  # [L, F, D]
    b_dec: Array  # [L, D]
    threshold: Array  # [L, F]
    in_scale: Array  # [L]
    out_scale: Array  # [L]
    arch: str = eqx.field(static=True)
    k: int | None = eqx.field(static=True, default=None)
    model_name: str = eqx.field(static=True, default="")
    W_skip: Array | None = None  # [L, D, D]: skip transcoders' affine paths (a linear path of the graph, not error)

    @property
    def n_layers(self) -> int:
        return self.W_enc.shape[0]

    @property
    def width(self) -> int:
        return self.W_enc.shape[2]

    def at(self, layer) -> SAE:
        """Layer `layer`'s transcoder (`layer` may be traced)."""
        return SAE(self.W_enc[layer], self.b_enc[layer], self.W_dec[layer], self.b_dec[layer], self.threshold[layer],
                   self.in_scale[layer], self.out_scale[layer], arch=self.arch, k=self.k,
                   W_skip=None if self.W_skip is None else self.W_skip[layer])  # fmt: skip

    def encode_vectors(self) -> Array:
        """`[L, D, F]`: feature f at layer l's pre-activation is `x @ W[l][:, f] + b_enc[l, f]` for raw input x."""
        return self.W_enc * self.in_scale[:, None, None]

    def decode_vectors(self) -> Array:
        """`[L, F, D]`: a unit activation of feature f at layer l adds this row to the MLP output."""
        return self.W_dec / self.out_scale[:, None, None]


def mlp_sites(layer: int) -> tuple[str, str]:
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"


def stack_transcoders(dicts: list[SAE], *, model_name: str = "") -> Transcoders:
    """Stack per-layer transcoders, `dicts[l]` for layer l, checking each one's sites."""
    if any(d.arch == "gated" for d in dicts):
        raise NotImplementedError("attribution graphs take transcoders whose active features equal their "
                                  "pre-activations (relu, topk, batchtopk, jumprelu, matryoshka); gated ones do not")
    skips = [l for l, d in enumerate(dicts) if d.W_skip is not None]
    if skips and len(skips) != len(dicts):
        raise ValueError(f"the transcoders of layers {skips} have a skip connection (W_skip) and the others do not; "
                         "a replacement model takes all with or all without")  # fmt: skip
    for l, d in enumerate(dicts):
        want = mlp_sites(l)
        if (d.in_site, d.out_site) != want and (d.in_site or d.out_site):
            raise ValueError(f"the transcoder for layer {l} maps {d.in_site} -> {d.out_site}; the replacement model needs {want[0]} -> {want[1]}")
    kinds = {(d.arch, d.k, d.width, d.W_enc.shape[0], d.W_dec.shape[1]) for d in dicts}
    if len(kinds) != 1:
        raise ValueError(f"the transcoders differ in (arch, k, width, d_in, d_out): {sorted(kinds, key=str)}")
    st = lambda name: jnp.stack([getattr(d, name) for d in dicts])  # noqa: E731
    return Transcoders(st("W_enc"), st("b_enc"), st("W_dec"), st("b_dec"), st("threshold"), st("in_scale"), st("out_scale"),
                       arch=dicts[0].arch, k=dicts[0].k, model_name=model_name,
                       W_skip=st("W_skip") if skips else None)  # fmt: skip


def load_transcoders(path: str | os.PathLike, *, model: Transformer | None = None, model_name: str | None = None) -> Transcoders:
    """Transcoders for every layer from a directory written by `train_transcoders` (or any
    directory of `layer_XX/dictionary` folders). Refused, with the mismatch named, when they
    were trained for another model, read or write other sites, miss a layer, or do not fit
    `model`'s width."""
    from ..dictionaries import dictionary_info, load_dictionary

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory of transcoders (train them with experiments/train_transcoders.py)")
    manifest = json.loads((path / "transcoders.json").read_text()) if (path / "transcoders.json").exists() else {}
    dirs = {}
    for sub in sorted(path.glob("layer_*/dictionary")):
        try:
            dirs[int(sub.parent.name.split("_")[1])] = sub
        except ValueError:
            continue
    if not dirs:
        raise FileNotFoundError(f"{path} holds no layer_XX/dictionary folders (train them with experiments/train_transcoders.py)")
    L = model.cfg.n_layers if model is not None else max(dirs) + 1
    missing = [l for l in range(L) if l not in dirs]
    if missing:
        raise ValueError(f"{path} has no transcoder for layers {missing} (the model has {L} layers); finish training them first")
    names = {manifest.get("model")} if manifest.get("model") else set()
    dicts = []
    for l in range(L):
        info = dictionary_info(dirs[l])
        trained_for = info.get("info", {}).get("model") or manifest.get("model")
        if trained_for:
            names.add(trained_for)
        if model_name and trained_for and trained_for != model_name:
            raise ValueError(f"the transcoder at {dirs[l]} was trained for model {trained_for!r}, not {model_name!r}")
        want = mlp_sites(l)
        got = (info.get("in_site"), info.get("out_site"))
        if info.get("kind") != "sae" or got != want:
            raise ValueError(f"the dictionary at {dirs[l]} maps {got[0]} -> {got[1]}; layer {l} of the replacement model needs "
                             f"{want[0]} -> {want[1]}")  # fmt: skip
        if model is not None and (info["d_in"], info["d_out"]) != (model.cfg.d_model, model.cfg.d_model):
            raise ValueError(f"the transcoder at {dirs[l]} maps {info['d_in']} -> {info['d_out']} dimensions; the model's "
                             f"d_model is {model.cfg.d_model}")  # fmt: skip
        dicts.append(load_dictionary(dirs[l]))
    if len(names) > 1:
        raise ValueError(f"the transcoders in {path} were trained for different models: {sorted(names)}")
    return stack_transcoders(dicts, model_name=next(iter(names), model_name or ""))


# ---------------------------------------------------------------- the replacement forward


class Frozen(NamedTuple):
    """A run's nonlinear denominators, per layer (batch axis kept)."""

    scale1: Array | None  # [L, B, T, 1]  ln1.hook_scale (None: no normalisation)
    scale2: Array | None  # [L, B, T, 1]
    pattern: Array  # [L, B, H, T, T]
    scale_final: Array | None  # [B, T, 1]


class FeatureEdit(eqx.Module):
    """Set or scale transcoder features: `acts' = where(set_mask, set_value, acts * scale)`, all `[L, B, T, F]`."""

    set_mask: Array
    set_value: Array
    scale: Array

    def __call__(self, l, acts):
        return jnp.where(self.set_mask[l], self.set_value[l], acts * self.scale[l])


class ReplacementTap(Tap):
    """The tap of the replacement model (and of its linear form).

    Per-layer inputs: `(frozen, error)` (`frozen` = this layer's `(ln1 scale, ln2 scale, pattern)`,
    entries None where absent; in the linear form `error` is the injected MLP output). Frozen values
    replace the computed ones where asked; each MLP output becomes `transcoder(ln2.hook_normalized)`,
    edited, plus the error (or, linear, the injected output); a skip transcoder's `read @ W_skip` is added
    in both forms (`skips`), so its skip path is a linear path of the graph, never error. Per-layer outputs: the feature
    activations (linear form: the transcoder inputs). At the final norm, `frozen_final` replaces the
    scale when norms are frozen, and the carry returns `ln_final.hook_normalized`."""

    ts: Any  # Transcoders, or None in the linear form
    edit: Any  # FeatureEdit or None
    frozen_final: Array | None
    freeze_attention: bool = eqx.field(static=True)
    freeze_norms: bool = eqx.field(static=True)
    linear: bool = eqx.field(static=True, default=False)
    skips: Array | None = None  # [L, D_in, D_out] skip transcoders' W_skip

    def enter(self, layer, carry, xs):
        return dict(layer=layer, xs=xs, read=carry if layer is None else None, acts=None)

    def leave(self, st):
        if st["layer"] is None:
            return st["read"], None
        return None, (st["read"] if self.linear else st["acts"])

    def __call__(self, kind, x, st):
        if st["layer"] is None:  # the final norm
            if kind == "ln_final.hook_scale" and self.freeze_norms and self.frozen_final is not None:
                return self.frozen_final, st
            if kind == "ln_final.hook_normalized":
                return x, {**st, "read": x}
            return x, st
        (s1, s2, pat), inject = st["xs"]
        if kind == "ln1.hook_scale" and self.freeze_norms and s1 is not None:
            return s1, st
        if kind == "ln2.hook_scale" and self.freeze_norms and s2 is not None:
            return s2, st
        if kind == "attn.hook_pattern" and self.freeze_attention:
            return pat, st
        if kind == "ln2.hook_normalized":
            return x, {**st, "read": x}
        if kind == "hook_mlp_out":
            skip = 0.0 if self.skips is None else st["read"] @ self.skips[st["layer"]]
            if self.linear:  # the MLP output is an input of the linear map (plus the skip path, linear in the read)
                return inject + skip, st
            l, T = st["layer"], x.shape[1]
            sae = self.ts.at(l)
            acts = sae.encode(st["read"]) * (jnp.arange(T) > 0).astype(x.dtype)[None, :, None]  # no features at BOS
            if self.edit is not None:
                acts = self.edit(l, acts)
            out = sae.decode(acts) + skip
            return (out if inject is None else out + inject), {**st, "acts": acts}
        return x, st


def token_embeddings(model: Transformer, tokens: Array) -> Array:
    return embed(model, tokens, positions_from_mask(None, *tokens.shape))[0]


def _frozen_layers(frozen: Frozen | None, L: int):
    return (None, None, jnp.zeros((L,))) if frozen is None else (frozen.scale1, frozen.scale2, frozen.pattern)


def replacement_forward(
    model: Transformer,
    ts: Transcoders,
    tokens: Array,
    *,
    frozen: Frozen | None = None,
    errors: Array | None = None,
    edit: FeatureEdit | None = None,
    freeze_attention: bool = True,
    freeze_norms: bool = False,
) -> tuple[Array, Array]:
    """`(logits [B, T, V], feature activations [L, B, T, F])` of the replacement model.

    frozen: the real run's patterns and denominators (`trace`), used where frozen.
    errors: `[L, B, T, D]` added to each transcoder's output (None: the bare replacement).
    edit: feature interventions, applied to each layer's activations before decoding."""
    tokens = jnp.atleast_2d(tokens)
    if (freeze_attention or freeze_norms) and frozen is None:
        raise ValueError("freezing attention or norms needs `frozen` from the real run (trace)")
    sf = None if frozen is None else frozen.scale_final
    tap = ReplacementTap(ts, edit, sf, freeze_attention, freeze_norms, skips=ts.W_skip)
    out = forward(model, tokens, tap=tap, xs=(_frozen_layers(frozen, model.cfg.n_layers), errors))
    return out.logits, out.ys


def linear_forward(model: Transformer, frozen: Frozen, mlp_out: Array, embed: Array, stop=None,
                   skips: Array | None = None) -> tuple[Array, Array]:  # fmt: skip
    """The model with every nonlinearity frozen, as a linear (affine) map of its MLP outputs
    `[L, B, T, D]` and token embeddings `[B, T, D]`: returns every transcoder input
    (`ln2.hook_normalized`, `[L, B, T, D]`) and the final norm's input divided by its frozen
    scale (`ln_final.hook_normalized`, `[B, T, D]`). No MLP weight is on any path.

    stop: run layers `0 .. stop-1` only (a traced int: one program serves every value); the
    reads of later layers are zero. A backward pass for targets below `stop` then skips the
    layers above them (the transpose of a `lax.cond` is a `lax.cond`).

    skips: skip transcoders' `W_skip` `[L, D, D]`: each layer's MLP output also carries `read @ W_skip[l]`."""
    tap = ReplacementTap(None, None, frozen.scale_final, True, True, linear=True, skips=skips)
    out = forward(model, tap=tap, xs=(_frozen_layers(frozen, model.cfg.n_layers), mlp_out), resid=embed,
                  stop_layer=stop, logits=False)  # fmt: skip
    if model.cfg.normalization is None:
        return out.ys, out.resid
    _, st = norm(model.cfg, out.resid, model.lnf_w, model.lnf_b, "ln_final", tap, tap.enter(None, None, None))
    return out.ys, st["read"]


# ---------------------------------------------------------------- one prompt, traced


class Trace(NamedTuple):
    """The real run on one or more prompts, as the replacement model sees it."""

    tokens: Array  # [B, T]
    logits: Array  # [B, T, V] of the real model
    frozen: Frozen
    reads: Array  # [L, B, T, D] transcoder inputs
    mlp_out: Array  # [L, B, T, D] real MLP outputs
    acts: Array  # [L, B, T, F] transcoder features (zero at BOS)
    errors: Array  # [L, B, T, D] real MLP output minus the transcoder's reconstruction

    def __repr__(self) -> str:  # shapes and names, not array contents (see _repr.py)
        from ..core import summary

        return summary(self)


def _stack(cache, kind, L):
    return jnp.stack([cache[f"blocks.{l}.{kind}"] for l in range(L)])


@eqx.filter_jit
def trace(model: Transformer, ts: Transcoders, tokens: Array) -> Trace:
    """Run the real model on `tokens` `[B, T]` (BOS first) and record what the replacement
    model needs: patterns, denominators, transcoder inputs and features, error terms."""
    cfg = model.cfg
    if ts.n_layers != cfg.n_layers:
        raise ValueError(f"{ts.n_layers} transcoders for a model of {cfg.n_layers} layers")
    if ts.W_enc.shape[1] != cfg.d_model:
        raise ValueError(f"the transcoders read {ts.W_enc.shape[1]} dimensions; the model's d_model is {cfg.d_model}")
    tokens = jnp.atleast_2d(tokens)
    L = cfg.n_layers
    normed = cfg.normalization is not None
    kinds = ["attn.hook_pattern", "ln2.hook_normalized", "hook_mlp_out"] + (["ln1.hook_scale", "ln2.hook_scale"] if normed else [])
    names = [f"blocks.{l}.{k}" for k in kinds for l in range(L)] + (["ln_final.hook_scale"] if normed else [])
    out = run(model, tokens, cache=names)
    c = out.cache
    frozen = Frozen(_stack(c, "ln1.hook_scale", L) if normed else None, _stack(c, "ln2.hook_scale", L) if normed else None,
                    _stack(c, "attn.hook_pattern", L), c["ln_final.hook_scale"] if normed else None)  # fmt: skip
    reads, mlp_out = _stack(c, "ln2.hook_normalized", L), _stack(c, "hook_mlp_out", L)
    T = tokens.shape[1]
    nonbos = (jnp.arange(T) > 0).astype(reads.dtype)[None, :, None]
    acts = jax.vmap(lambda l, x: ts.at(l).encode(x) * nonbos)(jnp.arange(L), reads)
    recon = jax.vmap(lambda l, a, x: ts.at(l).decode(a) + ts.at(l).skip(x))(jnp.arange(L), acts, reads)
    return Trace(tokens, out.logits, frozen, reads, mlp_out, acts, mlp_out - recon)


# ---------------------------------------------------------------- interventions


def no_edit(acts_shape) -> FeatureEdit:
    """An edit that changes nothing, of activations shaped `[L, B, T, F]`."""
    return FeatureEdit(jnp.zeros(acts_shape, bool), jnp.zeros(acts_shape), jnp.ones(acts_shape))


def edit_features(acts_shape, *, set=(), scale=(), batch: int | None = None) -> FeatureEdit:
    """Feature interventions on activations `[L, B, T, F]`.

    set: `(layer, pos, feature, value)` tuples: the feature's activation becomes `value`.
    scale: `(layer, pos, feature, factor)` tuples: it is multiplied by `factor` (0 removes it).
    `pos` may be a slice or `None` (every position); `batch` limits the edit to one row."""
    e = no_edit(acts_shape)
    b = slice(None) if batch is None else batch
    m, v, s = e.set_mask, e.set_value, e.scale
    for l, p, f, val in set:
        p = slice(None) if p is None else p
        m = m.at[l, b, p, f].set(True)
        v = v.at[l, b, p, f].set(val)
    for l, p, f, fac in scale:
        p = slice(None) if p is None else p
        s = s.at[l, b, p, f].multiply(fac)
    return FeatureEdit(m, v, s)


def inject_features(target: Trace, source: Trace, *, positions: list[tuple[int, int]], layers=None, remove=None) -> FeatureEdit:
    """Swap one concept for another: at each `(target_pos, source_pos)` pair and each of
    `layers` (default: all), the target prompt's whole feature vector is replaced by the
    source prompt's. `remove`: extra `(layer, pos, feature)` of the target to switch off."""
    L = target.acts.shape[0]
    layers = range(L) if layers is None else layers
    e = no_edit(target.acts.shape)
    m, v, s = e.set_mask, e.set_value, e.scale
    for tp, sp in positions:
        for l in layers:
            m = m.at[l, :, tp].set(True)
            v = v.at[l, :, tp].set(source.acts[l, 0, sp])
    for l, p, f in remove or ():
        m = m.at[l, :, p, f].set(True)
        v = v.at[l, :, p, f].set(0.0)
    return FeatureEdit(m, v, s)


@eqx.filter_jit
def intervene(model: Transformer, ts: Transcoders, tr: Trace, edit: FeatureEdit, *, freeze_attention: bool = True,
              freeze_norms: bool = False) -> tuple[Array, Array]:  # fmt: skip
    """Logits `[B, T, V]` and activations `[L, B, T, F]` of the replacement model on the traced
    prompt after `edit`, with the error terms held at their traced values (so an empty edit
    gives the real logits), attention frozen or recomputed, later features recomputed."""
    return replacement_forward(model, ts, tr.tokens, frozen=tr.frozen, errors=tr.errors, edit=edit,
                               freeze_attention=freeze_attention, freeze_norms=freeze_norms)  # fmt: skip


class FeatureSteerTap(Tap):
    """Transcoder features set or scaled inside the real model, for generation (`cj.generate(..., tap=)`): at
    each layer the MLP output gets `(edited - acts) @ W_dec / out_scale`, where `acts` are the layer's
    transcoder features of the live MLP input and `edited = where(set_mask, set_value, acts * scale)`
    (`[L, F]` each). So the model runs as it is everywhere the edit is silent, and an edited feature's
    decoder row moves the output exactly as much as its activation changed. The first position of a prompt
    (BOS) carries no features, as in `trace`."""

    ts: Transcoders
    set_mask: Array
    set_value: Array
    scale: Array

    def observes(self, kinds):
        return any(k in ("ln2.hook_normalized", "hook_mlp_out") for k in kinds)

    def rewrites(self, kinds):
        return "hook_mlp_out" in tuple(kinds)

    def enter(self, layer, carry, xs):
        return dict(layer=layer, read=None)

    def __call__(self, kind, x, st):
        if st["layer"] is None:
            return x, st
        if kind == "ln2.hook_normalized":
            return x, {**st, "read": x}
        if kind != "hook_mlp_out":
            return x, st
        l, sae = st["layer"], self.ts.at(st["layer"])
        acts = sae.encode(st["read"])
        edited = jnp.where(self.set_mask[l], self.set_value[l], acts * self.scale[l])
        delta = (edited - acts) @ sae.W_dec / sae.out_scale
        if x.shape[1] > 1:  # a prompt: nothing at its first position
            delta = delta.at[:, 0].set(0.0)
        return x + delta.astype(x.dtype), st

    def leave(self, st):
        return None, None


def steer_features(ts: Transcoders, *, set=(), scale=()) -> FeatureSteerTap:
    """A `FeatureSteerTap`: `set` `(layer, feature, value)` and `scale` `(layer, feature, factor)` at every
    position (but a prompt's first), for `cj.generate(model, tokens, n, tap=...)`: the steered continuation."""
    L, F = ts.n_layers, ts.width
    mask, value, factor = np.zeros((L, F), bool), np.zeros((L, F), np.float32), np.ones((L, F), np.float32)
    for l, f, v in set:
        mask[l, f], value[l, f] = True, v
    for l, f, s in scale:
        factor[l, f] *= s
    return FeatureSteerTap(ts, jnp.asarray(mask), jnp.asarray(value), jnp.asarray(factor))


# ---------------------------------------------------------------- evaluation of a set


@eqx.filter_jit
def _eval_batch(model: Transformer, ts: Transcoders, tokens):
    tr = trace(model, ts, tokens)
    y = tr.mlp_out[:, :, 1:]
    err = tr.errors[:, :, 1:]

    def ce(logits):
        return next_token_nll(logits, tokens)[0]

    replaced, _ = replacement_forward(model, ts, tokens, freeze_attention=False)
    zero = run(model, tokens, hooks=[Hook("hook_mlp_out", ALL_LAYERS, Zero())]).logits
    return dict(sse=jnp.sum(err**2, (1, 2, 3)), s1=jnp.sum(y, (1, 2)), s2=jnp.sum(y * y, (1, 2)),
                l0=jnp.sum(tr.acts[:, :, 1:] > 0, (1, 2, 3)), ce=jnp.stack([ce(tr.logits), ce(replaced), ce(zero)]))  # fmt: skip


@dataclasses.dataclass(frozen=True, repr=False)
class TranscoderEvaluation(Result):
    """`evaluate_transcoders`: per-layer reconstruction and the spliced-in next-token loss; reads
    like the dict it was (`ev["ce_recovered"]`; `dict(ev)` for JSON)."""

    fve: list[float]  # [L] fraction of variance of each MLP output the transcoder explains
    l0: list[float]  # [L] mean active features per token
    ce_clean: float  # next-token loss of the real model
    ce_replaced: float  # every MLP replaced by its transcoder (no error terms, nothing frozen)
    ce_zero: float  # every MLP zeroed
    ce_recovered: float  # (ce_zero - ce_replaced) / (ce_zero - ce_clean)


def evaluate_transcoders(model: Transformer, ts: Transcoders, contexts, *, batch_size: int = 8,
                         progress: bool = True) -> TranscoderEvaluation:  # fmt: skip
    """Per-layer fraction of variance explained and L0 on held-out `contexts` `[N, T]` (BOS
    first, BOS excluded), and the next-token loss of the real model, of the model with every
    MLP replaced by its transcoder (no error terms, nothing frozen) and with every MLP zeroed."""
    contexts = np.asarray(contexts, np.int32)
    N, T = contexts.shape
    from tqdm.auto import tqdm

    tot: dict[str, np.ndarray] = {}
    for b in tqdm(range(0, N, batch_size), desc="evaluate transcoders", disable=not progress, leave=False):
        got = jax.device_get(_eval_batch(model, ts, jnp.asarray(contexts[b : b + batch_size])))
        for k, v in got.items():
            tot[k] = tot.get(k, 0) + np.asarray(v, np.float64)
    n = N * (T - 1)
    sst = (tot["s2"] - tot["s1"] ** 2 / n).sum(-1)
    ce_clean, ce_rep, ce_zero = tot["ce"] / n
    return TranscoderEvaluation(
        fve=(1 - tot["sse"] / np.maximum(sst, 1e-12)).tolist(), l0=(tot["l0"] / n).tolist(), ce_clean=float(ce_clean),
        ce_replaced=float(ce_rep), ce_zero=float(ce_zero),
        ce_recovered=float((ce_zero - ce_rep) / (ce_zero - ce_clean)) if ce_zero != ce_clean else float("nan"),
    )  # fmt: skip
