"""Activation-site names, following TransformerLens.

A *site* is an intermediate activation a researcher can read (cache) or
rewrite (intervene on). Full names match TransformerLens:
`blocks.{l}.attn.hook_z`, `hook_embed`, `ln_final.hook_scale`, ...
Internally a site is a pair `(kind, layer)`: `("attn.hook_z", 5)`; global
sites have `layer=None`.

Shapes (B batch, T positions, H query heads, K kv heads, E d_head,
D d_model, M d_mlp):

    hook_embed, hook_pos_embed, hook_resid_{pre,mid,post}   [B, T, D]
    hook_attn_out, hook_mlp_out                             [B, T, D]
    ln*.hook_scale                                          [B, T, 1]
    ln*.hook_normalized                                     [B, T, D]
    attn.hook_q, attn.hook_rot_q, attn.hook_z               [B, T, H, E]
    attn.hook_k, attn.hook_v, attn.hook_rot_k               [B, T, K, E]
    attn.hook_attn_scores, attn.hook_pattern                [B, H, T(query), T(key)]
    attn.hook_result, hook_q_input                          [B, T, H, D]
    hook_k_input, hook_v_input                              [B, T, K, D]
    hook_mlp_in                                             [B, T, D]

The split inputs (`hook_q_input`, ...) are TransformerLens's `use_split_qkv_input`: each
head reads its own copy of the residual stream, so an edge into one head's query can be
patched alone. They exist only while hooked or cached; the `ln1` sites then do not.
    mlp.hook_pre, mlp.hook_pre_linear, mlp.hook_post        [B, T, M]
"""

from __future__ import annotations

import difflib
from typing import NamedTuple

from ._config import Config


class Site(NamedTuple):
    """A parsed activation site: its kind (e.g. `attn.hook_z`) and layer (None for global sites)."""

    kind: str
    layer: int | None

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"blocks.{self.layer}.{self.kind}"


ATTN_KINDS = (
    "hook_resid_pre",
    "hook_q_input",
    "hook_k_input",
    "hook_v_input",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "attn.hook_result",
    "hook_attn_out",
)
MLP_KINDS = (
    "hook_resid_mid",
    "hook_mlp_in",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "hook_mlp_out",
)

# TransformerLens-style shorthands: ("z", 5) -> blocks.5.attn.hook_z
_SHORT = {
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "rot_q": "attn.hook_rot_q",
    "rot_k": "attn.hook_rot_k",
    "attn_scores": "attn.hook_attn_scores",
    "scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern",
    "attn": "attn.hook_pattern",
    "z": "attn.hook_z",
    "result": "attn.hook_result",
    "pre": "mlp.hook_pre",
    "pre_linear": "mlp.hook_pre_linear",
    "post": "mlp.hook_post",
    "mlp_post": "mlp.hook_post",
    "mlp_pre": "mlp.hook_pre",
    "q_input": "hook_q_input",
    "k_input": "hook_k_input",
    "v_input": "hook_v_input",
    "mlp_in": "hook_mlp_in",
}

SPLIT_INPUTS = ("hook_q_input", "hook_k_input", "hook_v_input")

# Site short name -> (site kind, the activation axes (after batch) each sweep axis indexes)
PATCH_SITES: dict[str, tuple[str, dict[str, int]]] = {
    "resid_pre": ("hook_resid_pre", {"pos": 0}),
    "resid_mid": ("hook_resid_mid", {"pos": 0}),
    "resid_post": ("hook_resid_post", {"pos": 0}),
    "attn_out": ("hook_attn_out", {"pos": 0}),
    "mlp_out": ("hook_mlp_out", {"pos": 0}),
    "z": ("attn.hook_z", {"pos": 0, "head": 1}),
    "q": ("attn.hook_q", {"pos": 0, "head": 1}),
    "k": ("attn.hook_k", {"pos": 0, "head": 1}),  # head = kv head under grouped-query attention
    "v": ("attn.hook_v", {"pos": 0, "head": 1}),
    "pattern": ("attn.hook_pattern", {"head": 0, "dest": 1, "src": 2}),
    "mlp_post": ("mlp.hook_post", {"pos": 0, "neuron": 1}),
}


def layer_kinds(cfg: Config) -> tuple[str, ...]:
    """Per-layer site kinds that exist in models of this config."""
    kinds = list(ATTN_KINDS)
    if cfg.normalization is None:
        kinds = [k for k in kinds if not k.startswith("ln1.")]
    if cfg.positional != "rotary":
        kinds = [k for k in kinds if "rot_" not in k]
    if not cfg.attn_only:
        mlp = [k for k in MLP_KINDS if cfg.normalization is not None or not k.startswith("ln2.")]
        if not cfg.gated_mlp:
            mlp.remove("mlp.hook_pre_linear")
        kinds += mlp
    kinds.append("hook_resid_post")
    return tuple(kinds)


def global_kinds(cfg: Config) -> tuple[str, ...]:
    kinds = ["hook_embed"]
    if cfg.positional == "learned":
        kinds.append("hook_pos_embed")
    if cfg.normalization is not None:
        kinds += ["ln_final.hook_scale", "ln_final.hook_normalized"]
    return tuple(kinds)


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
        kind = _SHORT.get(short, short)
        if short in ("scale", "normalized"):
            layer = rest[0] if rest else None
            ln = rest[1] if len(rest) > 1 else ("ln_final" if layer is None else "ln1")
            kind = f"{ln}.hook_{short}"
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


def site_shape(site: Site, cfg: Config, batch: int, pos: int) -> tuple[int, ...]:
    """Shape of a site's activation for a `[batch, pos]` token array."""
    B, T, D, H, K, E = batch, pos, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head
    kind = site.kind
    if kind.endswith("hook_scale"):
        return (B, T, 1)
    if kind in ("attn.hook_q", "attn.hook_rot_q", "attn.hook_z"):
        return (B, T, H, E)
    if kind in ("attn.hook_k", "attn.hook_v", "attn.hook_rot_k"):
        return (B, T, K, E)
    if kind in ("attn.hook_attn_scores", "attn.hook_pattern"):
        return (B, H, T, T)
    if kind in ("attn.hook_result", "hook_q_input"):
        return (B, T, H, D)
    if kind in ("hook_k_input", "hook_v_input"):
        return (B, T, K, D)
    if kind.startswith("mlp."):
        return (B, T, cfg.d_mlp)
    return (B, T, D)
