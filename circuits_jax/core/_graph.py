"""The computational graph of a transformer as data: which nodes write to the residual stream
(sources), which read it (destinations), and the `[sources, destinations]` mask of real edges.

Sources: `input` (token plus position embedding), every attention head `a{l}.h{h}` (its `z @ W_O`)
and every MLP `m{l}`. Destinations: each head's query, key and value input `a{l}.h{h}<q>`,
`a{l}.h{j}<k>`, `a{l}.h{j}<v>` (under grouped-query attention keys and values belong to kv heads:
`a{l}.kv{j}<k>`), each MLP's input `m{l}`, and `logits`. Names follow the EAP-IG and ACDC graphs.
This is the one vocabulary of edges that path patching, EAP, ACDC, circuits, causal scrubbing and
the known circuits of `tasks` share; the techniques that run on it live in `graph/`.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
from typing import Sequence

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jax import Array

from ._config import Config
from ._forward import run

INPUT_KINDS = ("hook_q_input", "hook_k_input", "hook_v_input")


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    """Sources, destinations and the `[sources, destinations]` mask of real edges of one config.

    `order` gives each node's place in the forward pass (input 0; layer l's heads 2l+1 and MLP
    2l+2 as sources; layer l's q/k/v inputs 2l+1, its MLP input 2l+2, logits 2L+1 as
    destinations); an edge exists where the source comes strictly before the destination.
    """

    cfg: Config
    sources: tuple[str, ...]
    destinations: tuple[str, ...]
    source_order: np.ndarray
    dest_order: np.ndarray

    def __repr__(self) -> str:  # counts, not the thousands of node names
        return f"Graph({self.cfg.n_layers} layers, {len(self.sources)} sources, {len(self.destinations)} destinations, {self.n_edges} edges)"

    @staticmethod
    @functools.lru_cache(maxsize=32)
    def of(cfg: Config) -> "Graph":
        cfg.check_additive("the edge graph (EAP, path and edge patching, circuits, ACDC, scrubbing)")
        L, H, K = cfg.n_layers, cfg.n_heads, cfg.kv_heads
        mlp = not cfg.attn_only
        kv = "kv" if K != H else "h"
        src, s_ord = ["input"], [0]
        dst, d_ord = [], []
        for l in range(L):
            src += [f"a{l}.h{h}" for h in range(H)]
            s_ord += [2 * l + 1] * H
            dst += [f"a{l}.h{h}<q>" for h in range(H)]
            dst += [f"a{l}.{kv}{j}<k>" for j in range(K)] + [f"a{l}.{kv}{j}<v>" for j in range(K)]
            d_ord += [2 * l + 1] * (H + 2 * K)
            if mlp:
                src.append(f"m{l}")
                s_ord.append(2 * l + 2)
                dst.append(f"m{l}")
                d_ord.append(2 * l + 2)
        dst.append("logits")
        d_ord.append(2 * L + 1)
        return Graph(cfg, tuple(src), tuple(dst), np.asarray(s_ord), np.asarray(d_ord))

    @functools.cached_property
    def mask(self) -> np.ndarray:
        """`[S, D]` bool: True for every real edge."""
        return self.source_order[:, None] < self.dest_order[None, :]

    @functools.cached_property
    def feeds(self) -> np.ndarray:
        """`[D, S]` bool: destination j is an input of source node i (a head's q/k/v, an MLP's input;
        under grouped-query attention a kv input feeds every head of its group). Logits feed nothing."""
        out = np.zeros((len(self.destinations), len(self.sources)), bool)
        G = self.cfg.group_size
        for j in range(len(self.destinations) - 1):
            kind, layer, head = self.dest_site(j)
            if kind == "hook_mlp_in":
                out[j, self.source_index(f"m{layer}")] = True
                continue
            heads = [head] if kind == "hook_q_input" else range(head * G, (head + 1) * G)
            for h in heads:
                out[j, self.source_index(f"a{layer}.h{h}")] = True
        return out

    def dest_layer(self, j: int) -> int:
        """The layer whose block reads destination j (`n_layers` for logits)."""
        return self.cfg.n_layers if j == len(self.destinations) - 1 else self.dest_site(j)[1]

    @property
    def n_edges(self) -> int:
        return int(self.mask.sum())

    def edges(self) -> list[str]:
        """Every edge name, `source->destination`, in matrix (row-major) order."""
        s, d = np.nonzero(self.mask)
        return [f"{self.sources[i]}->{self.destinations[j]}" for i, j in zip(s, d)]

    def source_index(self, name: str) -> int:
        return _index(name, self.sources, "source node")

    def destination_index(self, name: str) -> int:
        return _index(name, self.destinations, "destination")

    def edge_index(self, name: str) -> tuple[int, int]:
        """`(source, destination)` of an edge named `src->dst`; a missing edge names the nearest real ones."""
        if "->" not in name:
            raise KeyError(f"edge {name!r} is not of the form 'source->destination', e.g. 'a0.h1->a2.h3<q>'")
        s, d = (p.strip() for p in name.split("->", 1))
        i, j = self.source_index(s), self.destination_index(d)
        if not self.mask[i, j]:
            close = difflib.get_close_matches(f"{s}->{d}", self.edges(), n=5, cutoff=0.6)
            hint = f"; nearest valid edges: {', '.join(close)}" if close else ""
            raise KeyError(f"no edge {name!r}: {s} does not come before {d} in the forward pass{hint}")
        return i, j

    def select(self, spec: str | Sequence[str], of: str = "destinations") -> np.ndarray:
        """Indices of the nodes matching a comma list of names or glob patterns (`a9.h*<q>`, `m*`)."""
        names = self.destinations if of == "destinations" else self.sources
        patterns = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
        picked: list[int] = []
        for p in patterns:
            hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, p)]
            if not hits:
                _index(p, names, of[:-1].replace("source", "source node"))  # raises with the nearest names
            picked += [i for i in hits if i not in picked]
        return np.asarray(picked, np.int64)

    def dest_site(self, j: int) -> tuple[str, int, int | None]:
        """The model site a destination reads: `(kind, layer, head)`; logits: the last resid_post."""
        cfg, H, K = self.cfg, self.cfg.n_heads, self.cfg.kv_heads
        if j == len(self.destinations) - 1:
            return "hook_resid_post", cfg.n_layers - 1, None
        per = H + 2 * K + (0 if cfg.attn_only else 1)
        l, r = divmod(j, per)
        if r < H:
            return "hook_q_input", l, r
        if r < H + K:
            return "hook_k_input", l, r - H
        if r < H + 2 * K:
            return "hook_v_input", l, r - H - K
        return "hook_mlp_in", l, None


def _index(name: str, names: Sequence[str], what: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; nearest valid: {', '.join(close)}" if close else f"; e.g. {', '.join(names[:3])}, ..."
        raise KeyError(f"unknown {what} {name!r}{hint}") from None


# ---------------------------------------------------------------------------
# Source outputs and destination gradients
# ---------------------------------------------------------------------------


def source_sites(cfg: Config) -> list[str]:
    """Site names whose cached values make up every source's output (`source_outputs`)."""
    L = cfg.n_layers
    names = ["hook_embed", *(["hook_pos_embed"] if cfg.positional == "learned" else [])]
    names += [f"blocks.{l}.attn.hook_result" for l in range(L)]
    if not cfg.attn_only:
        names += [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    return names


def source_outputs(cfg: Config, cache) -> Array:
    """`[S, B, T, D]`: every source's write to the residual stream, in `Graph.sources` order."""
    L = cfg.n_layers
    x = cache["hook_embed"]
    if cfg.positional == "learned":
        x = x + cache["hook_pos_embed"]
    heads = jnp.stack([cache[f"blocks.{l}.attn.hook_result"] for l in range(L)])  # [L, B, T, H, D]
    per_layer = [heads]
    if not cfg.attn_only:
        per_layer.append(jnp.stack([cache[f"blocks.{l}.hook_mlp_out"] for l in range(L)])[:, :, :, None])
    stacked = jnp.concatenate(per_layer, axis=3)  # [L, B, T, H(+1), D]
    stacked = jnp.moveaxis(stacked, 3, 1).reshape(-1, *x.shape)
    return jnp.concatenate([x[None], stacked])


def dest_kinds(cfg: Config) -> tuple[str, ...]:
    """The per-layer site kinds a destination reads: the split q/k/v inputs and the MLP input."""
    return INPUT_KINDS + (() if cfg.attn_only else ("hook_mlp_in",))


def dest_stack(cfg: Config, per_kind: dict[str, Array], final: Array) -> Array:
    """Per-kind `[L, B, T, (heads,) D]` arrays and the final-stream one -> `[Dst, B, T, D]` in graph order."""
    parts = [per_kind[k] for k in INPUT_KINDS]
    if not cfg.attn_only:
        parts.append(per_kind["hook_mlp_in"][:, :, :, None])
    stacked = jnp.concatenate(parts, axis=3)  # [L, B, T, H + 2K (+1), D]
    stacked = jnp.moveaxis(stacked, 3, 1).reshape(-1, *final.shape)
    return jnp.concatenate([stacked, final[None]])


@eqx.filter_jit
def outputs_of(model, tokens, mask):
    return source_outputs(model.cfg, run(model, tokens, cache=source_sites(model.cfg), attention_mask=mask,
                                   return_logits=False).cache)  # fmt: skip
