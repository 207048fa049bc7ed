"""Activation-site names, following TransformerLens: the one table every part of the library reads.

A *site* is an intermediate activation a researcher can read (cache) or rewrite (intervene on).
Full names match TransformerLens: `blocks.{l}.attn.hook_z`, `hook_embed`, `ln_final.hook_scale`, ...
Internally a site is a pair `(kind, layer)`: `("attn.hook_z", 5)`; global sites have `layer=None`.

`SITE_KINDS` below is the table: every kind with its shape, the shorthands that name it
(`("z", 5)` -> `blocks.5.attn.hook_z`), the axes a patching sweep may index, and which
architectures have it. `parse_site`, `site_shape`, `layer_kinds`, the patching sweeps
(`PATCH_SITES`), the CLI's `--site` / `--kind` options and every "did you mean" error read it;
a family that adds a site (a post-attention norm, q/k norms) adds a row here.

With post-norms (Gemma 2/3, OLMo-2), `hook_attn_out` / `hook_mlp_out` read what enters the residual
stream: the output of `ln1_post` / `ln2_post` (TransformerLens's convention); the un-normed output
is `ln1_post.hook_normalized` times its scale. With `parallel_residual` (GPT-NeoX) there is no
`hook_resid_mid`, and `hook_mlp_in` is the layer's input (`hook_resid_pre`).

Shape letters: B batch, T positions (S keys), H query heads, K kv heads, E d_head, D d_model,
M d_mlp, 1 a kept unit axis. The split inputs (`hook_q_input`, ...) are TransformerLens's
`use_split_qkv_input`: each head reads its own copy of the residual stream, so an edge into one
head's query can be patched alone. They exist only while hooked or cached; the `ln1` sites then
do not.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import NamedTuple

from ._config import Config


@dataclasses.dataclass(frozen=True)
class SiteKind:
    """One row of the site table."""

    kind: str  # e.g. "attn.hook_z"
    shape: str  # axis letters after nothing else, e.g. "B T H E"
    short: tuple[str, ...] = ()  # shorthands, e.g. ("z",)
    sweep: tuple[tuple[str, int], ...] | None = None  # axes a patching sweep may index: (name, axis after batch)
    per_layer: bool = True
    needs: str = ""  # "norm", "rotary", "mlp", "gated", "learned" (positions), "prenorm" (ln1/ln2 before attention
    # and MLP), "qknorm", "postattn", "postmlp" (post-norms), "serial" (not parallel_residual): absent without it
    float32: bool = False  # computed in float32 whatever the weights' dtype (norm statistics, attention scores)


SITE_KINDS: tuple[SiteKind, ...] = (
    # global, before the layers
    SiteKind("hook_embed", "B T D", ("embed",), per_layer=False),
    SiteKind("hook_pos_embed", "B T D", ("pos_embed",), per_layer=False, needs="learned"),
    # attention half of a layer, in forward order
    SiteKind("hook_resid_pre", "B T D", ("resid_pre",), sweep=(("pos", 0),)),
    SiteKind("hook_q_input", "B T H D", ("q_input",)),
    SiteKind("hook_k_input", "B T K D", ("k_input",)),
    SiteKind("hook_v_input", "B T K D", ("v_input",)),
    SiteKind("ln1.hook_scale", "B T 1", needs="norm prenorm", float32=True),
    SiteKind("ln1.hook_normalized", "B T D", needs="norm prenorm", float32=True),
    SiteKind("attn.hook_q", "B T H E", ("q",), sweep=(("pos", 0), ("head", 1))),
    SiteKind("attn.hook_k", "B T K E", ("k",), sweep=(("pos", 0), ("head", 1))),  # head = kv head under GQA
    SiteKind("attn.hook_v", "B T K E", ("v",), sweep=(("pos", 0), ("head", 1))),
    SiteKind("attn.hook_q_normed", "B T H E", ("q_normed",), needs="qknorm"),  # q after its norm, before RoPE
    SiteKind("attn.hook_k_normed", "B T K E", ("k_normed",), needs="qknorm"),
    SiteKind("attn.hook_rot_q", "B T H E", ("rot_q",), needs="rotary"),
    SiteKind("attn.hook_rot_k", "B T K E", ("rot_k",), needs="rotary"),
    SiteKind("attn.hook_attn_scores", "B H T S", ("attn_scores", "scores"), float32=True),
    SiteKind("attn.hook_pattern", "B H T S", ("pattern", "attn"), sweep=(("head", 0), ("dest", 1), ("src", 2)), float32=True),
    SiteKind("attn.hook_z", "B T H E", ("z",), sweep=(("pos", 0), ("head", 1))),
    SiteKind("attn.hook_result", "B T H D", ("result",)),
    SiteKind("ln1_post.hook_scale", "B T 1", needs="postattn", float32=True),  # the post-attention norm (Gemma 2/3, OLMo-2)
    SiteKind("ln1_post.hook_normalized", "B T D", needs="postattn", float32=True),
    SiteKind("hook_attn_out", "B T D", ("attn_out",), sweep=(("pos", 0),)),
    # MLP half
    SiteKind("hook_resid_mid", "B T D", ("resid_mid",), sweep=(("pos", 0),), needs="mlp serial"),
    SiteKind("hook_mlp_in", "B T D", ("mlp_in",), needs="mlp"),
    SiteKind("ln2.hook_scale", "B T 1", needs="mlp norm prenorm", float32=True),
    SiteKind("ln2.hook_normalized", "B T D", needs="mlp norm prenorm", float32=True),
    SiteKind("mlp.hook_pre", "B T M", ("pre", "mlp_pre"), needs="mlp"),
    SiteKind("mlp.hook_pre_linear", "B T M", ("pre_linear",), needs="mlp gated"),
    SiteKind("mlp.hook_post", "B T M", ("post", "mlp_post"), sweep=(("pos", 0), ("neuron", 1)), needs="mlp"),
    SiteKind("ln2_post.hook_scale", "B T 1", needs="mlp postmlp", float32=True),  # the post-MLP norm
    SiteKind("ln2_post.hook_normalized", "B T D", needs="mlp postmlp", float32=True),
    SiteKind("hook_mlp_out", "B T D", ("mlp_out",), sweep=(("pos", 0),), needs="mlp"),
    SiteKind("hook_resid_post", "B T D", ("resid_post",), sweep=(("pos", 0),)),
    # global, after the layers
    SiteKind("ln_final.hook_scale", "B T 1", per_layer=False, needs="norm", float32=True),
    SiteKind("ln_final.hook_normalized", "B T D", per_layer=False, needs="norm", float32=True),
)
KIND = {k.kind: k for k in SITE_KINDS}
LAYER_KINDS = tuple(k.kind for k in SITE_KINDS if k.per_layer)  # every per-layer kind of any architecture
GLOBAL_KINDS = tuple(k.kind for k in SITE_KINDS if not k.per_layer)
SHORTHANDS = {s: k.kind for k in SITE_KINDS for s in k.short}  # ("z", 5) -> blocks.5.attn.hook_z
SPLIT_INPUTS = ("hook_q_input", "hook_k_input", "hook_v_input")

# What a patching sweep may patch: shorthand -> (kind, {axis name: activation axis after batch})
PATCH_SITES: dict[str, tuple[str, dict[str, int]]] = {
    k.short[-1] if k.kind == "mlp.hook_post" else k.short[0]: (k.kind, dict(k.sweep)) for k in SITE_KINDS if k.sweep
}


def _has(cfg: Config, k: SiteKind) -> bool:
    need = k.needs.split()
    return not (("norm" in need and cfg.normalization is None) or ("rotary" in need and cfg.positional != "rotary")
                or ("learned" in need and cfg.positional != "learned") or ("mlp" in need and cfg.attn_only)
                or ("gated" in need and not cfg.gated_mlp) or ("prenorm" in need and not cfg.pre_norm)
                or ("qknorm" in need and not cfg.qk_norm) or ("postattn" in need and not cfg.post_attn_norm)
                or ("postmlp" in need and not cfg.post_mlp_norm) or ("serial" in need and cfg.parallel_residual))  # fmt: skip


class Site(NamedTuple):
    """A parsed activation site: its kind (e.g. `attn.hook_z`) and layer (None for global sites)."""

    kind: str
    layer: int | None

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"blocks.{self.layer}.{self.kind}"


def layer_kinds(cfg: Config) -> tuple[str, ...]:
    """Per-layer site kinds that exist in models of this config, in forward order."""
    return tuple(k.kind for k in SITE_KINDS if k.per_layer and _has(cfg, k))


def global_kinds(cfg: Config) -> tuple[str, ...]:
    """Global site kinds (embedding, final norm) that exist in models of this config."""
    return tuple(k.kind for k in SITE_KINDS if not k.per_layer and _has(cfg, k))


def all_site_names(cfg: Config) -> list[str]:
    """Every valid TransformerLens site name of a model of `cfg` (global sites, then each layer's)."""
    names = list(global_kinds(cfg))
    names += [f"blocks.{l}.{k}" for l in range(cfg.n_layers) for k in layer_kinds(cfg)]
    return names


def _unknown(name: str, cfg: Config, why: str = "") -> KeyError:
    close = difflib.get_close_matches(name, all_site_names(cfg), n=5, cutoff=0.5)
    hint = f"; closest valid names: {', '.join(close)}" if close else ""
    return KeyError(f"unknown activation site {name!r}{why}{hint}")


def parse_site(name, cfg: Config) -> Site:
    """Resolve a full name, a `Site`, or a shorthand tuple `("z", 5)` / `("scale", 3, "ln1")`."""
    if isinstance(name, Site):
        name = name.name
    if isinstance(name, tuple):
        short, *rest = name
        kind = SHORTHANDS.get(short, short)
        if short in ("scale", "normalized"):
            layer = rest[0] if rest else None
            ln = rest[1] if len(rest) > 1 else ("ln_final" if layer is None else "ln1")
            kind = f"{ln}.hook_{short}"
        if rest and rest[0] is not None:  # a shorthand's layer may count from the end, like every int layer
            from ._checks import layer_index

            rest[0] = layer_index(rest[0], cfg.n_layers, f"the layer of site {name!r}")
        name = kind if not rest or rest[0] is None else f"blocks.{int(rest[0])}.{kind}"
    if not isinstance(name, str):
        raise TypeError(f"site must be a name, a Site or a shorthand tuple, got {name!r}")
    if name in global_kinds(cfg):
        return Site(name, None)
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        layer, kind = int(parts[1]), parts[2]
        if kind in layer_kinds(cfg):
            if layer < cfg.n_layers:
                return Site(kind, layer)
            raise _unknown(name, cfg, f" (the model has {cfg.n_layers} layers, 0..{cfg.n_layers - 1})")
    raise _unknown(name, cfg)


def site_dtype(kind: str, dtype):
    """The dtype a site of `kind` holds in a model whose weights are `dtype`: float32 for the norm statistics and
    attention scores and pattern (kept in float32 as the reference implementations keep them), else `dtype`."""
    import numpy as np

    return np.dtype(np.float32) if KIND[kind].float32 else dtype


def site_shape(site: Site, cfg: Config, batch: int, pos: int) -> tuple[int, ...]:
    """Shape of a site's activation for a `[batch, pos]` token array (from the table's letters)."""
    size = dict(B=batch, T=pos, S=pos, D=cfg.d_model, H=cfg.n_heads, K=cfg.kv_heads, E=cfg.d_head, M=cfg.d_mlp)
    size["1"] = 1
    return tuple(size[a] for a in KIND[site.kind].shape.split())
