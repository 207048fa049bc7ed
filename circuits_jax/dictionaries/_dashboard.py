"""Feature dashboards for a sparse dictionary: what a feature reads and what it writes.

For each feature of an `SAE` (an SAE on one site, or a per-layer transcoder that reads
`in_site` and writes `out_site`), `dashboard_data` gathers

* its density (the fraction of scored tokens where it is active) and its largest activation,
* its top activating contexts: a window of tokens around each context's maximum, with every
  token's activation,
* a histogram of its nonzero activations,
* the output tokens its decoder direction boosts and suppresses most through the direct path
  to the logits (`W_dec[f] @ W_U`, through the final norm's weight, see `direct_logit_effects`),

and `write_dashboards` renders them as one self-contained static HTML page (inline CSS and
SVG, no script and nothing fetched). `feature_stats` and `select_features` choose which
features to show when there are too many to show them all.

Activations are computed by running the model only up to the dictionary's layer
(`stop_layer = layer + 1`, no logits), caching nothing but `in_site`, in fixed-size batches
(one compiled program; the last batch is padded).

**The first token of every row is not scored**: it is usually BOS, an attention sink with a
huge norm on which dictionaries are not trained and fire meaninglessly. Its activations are
set to 0 and it is left out of densities, maxima, histograms and contexts (with an
`attention_mask`, "first" means each row's first real token, so left padding is handled;
padding is never scored either). Pass `exclude_first=False` to score it.
"""

from __future__ import annotations

import dataclasses
from html import escape
from pathlib import Path
from typing import Sequence

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ..core import Result, parse_site, run
from ._sae import SAE, CrossLayerTranscoder

__all__ = [
    "feature_activations",
    "FeatureStats",
    "feature_stats",
    "select_features",
    "direct_logit_effects",
    "dashboard_data",
    "write_dashboards",
]

# Sites whose activation is not `[B, T, ...]` (a per-token vector) cannot be encoded per token.
_NOT_PER_TOKEN = ("attn.hook_attn_scores", "attn.hook_pattern")


# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------


def _check_dictionary(dictionary) -> None:
    if isinstance(dictionary, CrossLayerTranscoder):
        raise TypeError(
            "dashboards take an SAE or a per-layer transcoder (`SAE`); a CrossLayerTranscoder has one "
            "feature set per source layer"
        )
    if not isinstance(dictionary, SAE):
        raise TypeError(f"expected a circuits_jax SAE, got {type(dictionary).__name__}")
    if not dictionary.in_site:
        raise ValueError("the dictionary has no in_site: set it to the site it reads (e.g. 'blocks.3.hook_resid_post')")


def _run_plan(model, site_name: str) -> tuple[str, int | None, bool]:
    """`(full site name, stop_layer, return_logits)` to compute `site_name` and nothing later."""
    site = parse_site(site_name, model.cfg)
    if site.kind in _NOT_PER_TOKEN:
        raise ValueError(f"{site.name!r} is not a per-token activation; a dictionary cannot read it")
    if site.layer is not None:
        return site.name, site.layer + 1, False
    if site.kind.startswith("ln_final."):  # computed only with the logits, after every layer
        return site.name, None, True
    return site.name, 0, False  # hook_embed, hook_pos_embed: before the first layer


@eqx.filter_jit
def _encode_batch(model, dictionary, tokens, attn, valid, feats, site: str, stop_layer, return_logits: bool):
    """Activations `[B, T, F_sel]` of one batch, zero where `valid` is False."""
    out = run(model, tokens, cache=[site], attention_mask=attn, stop_layer=stop_layer, return_logits=return_logits)
    x = out.cache[site]
    x = x.reshape(*x.shape[:2], -1).astype(dictionary.W_enc.dtype)  # [B, T, D_in] (heads flattened)
    acts = dictionary.encode(x)
    if feats is not None:
        acts = jnp.take(acts, feats, axis=-1)
    return jnp.where(valid[..., None], acts, jnp.zeros((), acts.dtype))


@eqx.filter_jit
def _stats_batch(model, dictionary, tokens, attn, valid, site: str, stop_layer, return_logits: bool):
    """Per feature: active-token count `[F]` and max activation `[F]` of one batch."""
    acts = _encode_batch(model, dictionary, tokens, attn, valid, None, site, stop_layer, return_logits)
    flat = acts.reshape(-1, acts.shape[-1])
    return jnp.sum((flat > 0).astype(jnp.int32), axis=0), jnp.max(flat, axis=0)


def _scored(tokens: np.ndarray, attention_mask, exclude_first: bool) -> np.ndarray:
    """bool `[N, T]`: the positions that are scored (real tokens, minus each row's first if asked)."""
    real = np.ones(tokens.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if real.shape != tokens.shape:
        raise ValueError(f"attention_mask has shape {real.shape}; tokens have shape {tokens.shape}")
    if exclude_first:
        real = real & (np.cumsum(real, axis=1) > 1)
    return real


def _as_tokens(tokens) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be an int array [N, T], got {tokens.dtype} {tokens.shape}")
    if tokens.shape[0] == 0:
        raise ValueError("no token rows given")
    return tokens.astype(np.int32)


def _batches(tokens: np.ndarray, attention_mask, valid: np.ndarray, batch_size: int):
    """Yield `(n_real, tokens, attn, valid)` in batches of one shape; the last one is padded with
    copies of the first row, marked not valid."""
    N = tokens.shape[0]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    B = min(batch_size, N)
    attn_all = None if attention_mask is None else np.asarray(attention_mask).astype(bool)
    for start in range(0, N, B):
        stop = min(start + B, N)
        n = stop - start
        pad = B - n
        tok = tokens[start:stop]
        val = valid[start:stop]
        att = None if attn_all is None else attn_all[start:stop]
        if pad:
            tok = np.concatenate([tok, np.repeat(tokens[:1], pad, 0)])
            val = np.concatenate([val, np.zeros((pad, val.shape[1]), bool)])
            att = None if att is None else np.concatenate([att, np.repeat(attn_all[:1], pad, 0)])
        yield n, jnp.asarray(tok), None if att is None else jnp.asarray(att), jnp.asarray(val)


def feature_activations(
    model,
    dictionary: SAE,
    tokens,
    *,
    features: Sequence[int] | None = None,
    batch_size: int = 8,
    attention_mask=None,
    exclude_first: bool = True,
) -> np.ndarray:
    """float32 `[N, T, F_sel]`: the dictionary's activations on token contexts `tokens [N, T]`.

    `features` restricts (and orders) the features returned (all `F` by default; the full
    array for a wide dictionary can be large). The model runs up to the dictionary's layer
    only, caching `dictionary.in_site`, in batches of `batch_size` (one compiled program;
    the last batch is padded).

    The first token of every row (BOS; with `attention_mask`, each row's first real token)
    is set to 0, as are padded positions, unless `exclude_first=False`.
    """
    _check_dictionary(dictionary)
    tokens = _as_tokens(tokens)
    site, stop, logits = _run_plan(model, dictionary.in_site)
    valid = _scored(tokens, attention_mask, exclude_first)
    feats = None if features is None else jnp.asarray(_feature_ids(features, dictionary.width), jnp.int32)
    out = []
    for n, tok, att, val in _batches(tokens, attention_mask, valid, batch_size):
        acts = _encode_batch(model, dictionary, tok, att, val, feats, site, stop, logits)
        out.append(np.asarray(acts[:n], np.float32))
    return np.concatenate(out, axis=0)


@dataclasses.dataclass(frozen=True, repr=False)
class FeatureStats(Result):
    """`feature_stats`: per-feature activity over scored tokens; reads like the dict it was (`stats["density"]`)."""

    density: np.ndarray  # [F] fraction of scored tokens where the feature is active (> 0)
    n_active: np.ndarray  # [F] int64, how many scored tokens that is
    max_act: np.ndarray  # [F] float32, its largest activation
    n_tokens: int  # scored tokens


def feature_stats(model, dictionary: SAE, tokens, *, batch_size: int = 8, attention_mask=None,
                  exclude_first: bool = True) -> FeatureStats:  # fmt: skip
    """Per-feature statistics over all `F` features, without holding the `[N, T, F]` activations.

    Returns a `FeatureStats` of `density [F]`, `n_active [F]`, `max_act [F]` and `n_tokens`
    (readable as `stats["density"]`, ...): the fraction and the
    number of scored tokens where each feature is active (> 0), its largest activation, and the
    number of scored tokens (the first token of each row and padding are not scored, see
    `feature_activations`). The input `select_features` expects.
    """
    _check_dictionary(dictionary)
    tokens = _as_tokens(tokens)
    site, stop, logits = _run_plan(model, dictionary.in_site)
    valid = _scored(tokens, attention_mask, exclude_first)
    F = dictionary.width
    count = np.zeros(F, np.int64)
    top = np.zeros(F, np.float32)
    for _, tok, att, val in _batches(tokens, attention_mask, valid, batch_size):
        c, m = _stats_batch(model, dictionary, tok, att, val, site, stop, logits)
        count += np.asarray(c, np.int64)
        top = np.maximum(top, np.asarray(m, np.float32))
    n_tokens = int(valid.sum())
    return FeatureStats(density=count / max(n_tokens, 1), n_active=count, max_act=top, n_tokens=n_tokens)


def _feature_ids(features, width: int) -> list[int]:
    ids = [int(f) for f in np.ravel(np.asarray(features))]
    bad = [f for f in ids if not 0 <= f < width]
    if bad:
        raise ValueError(f"feature ids {bad} are out of range for a dictionary of width {width}")
    return ids


def select_features(stats, how: str | Sequence[int] = "top_density", *, n: int = 10, seed: int = 0,
                    max_density: float | None = None, width: int | None = None) -> list[int]:  # fmt: skip
    """Which features to show by default.

    stats: `feature_stats(...)` (or a dict with its keys), or a density array `[F]`.
    how:
        "top_density"  the `n` most frequently active live features (densest first),
        "top_max"      the `n` live features with the largest max activation (needs `stats["max_act"]`),
        "random"       `n` live features drawn without replacement with `seed` (sorted by id),
        a list of ids  those features, checked against the width.
    Dead features (never active) are never chosen by the first three; `max_density` also
    drops very dense features (often uninterpretable), e.g. `max_density=0.1`.
    """
    if isinstance(stats, (dict, Result)):
        density = np.asarray(stats["density"], np.float64)
        max_act = stats.get("max_act")
    else:
        density, max_act = np.asarray(stats, np.float64), None
    F = density.shape[0] if width is None else width
    if not isinstance(how, str):
        return _feature_ids(how, F)
    live = density > 0
    if max_density is not None:
        live &= density <= max_density
    ids = np.flatnonzero(live)
    if how == "top_density":
        order = ids[np.argsort(-density[ids], kind="stable")]
    elif how == "top_max":
        if max_act is None:
            raise ValueError('how="top_max" needs feature_stats(...) with "max_act", not a density array')
        order = ids[np.argsort(-np.asarray(max_act, np.float64)[ids], kind="stable")]
    elif how == "random":
        rng = np.random.default_rng(seed)
        order = np.sort(rng.choice(ids, size=min(n, ids.size), replace=False)) if ids.size else ids
    else:
        raise ValueError(f'how must be "top_density", "top_max", "random" or a list of feature ids, got {how!r}')
    return [int(f) for f in order[:n]]


# ---------------------------------------------------------------------------
# Direct logit effects
# ---------------------------------------------------------------------------


def _residual_directions(model, dictionary: SAE, features: Sequence[int]) -> np.ndarray | None:
    """float64 `[k, D]`: what one unit of each feature adds to the residual stream (raw units),
    or None when the dictionary's output is not (linearly) written to it."""
    cfg = model.cfg
    W = np.asarray(dictionary.W_dec[np.asarray(features, np.int64)], np.float64)
    W = W / float(dictionary.out_scale)  # decode() divides by out_scale
    site = parse_site(dictionary.out_site or dictionary.in_site, cfg)
    resid_kinds = ("hook_embed", "hook_pos_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post",
                   "hook_attn_out", "hook_mlp_out", "hook_mlp_in")  # fmt: skip
    if site.kind in resid_kinds:
        return W
    if site.kind == "mlp.hook_post":  # neuron space: through W_out
        return W @ np.asarray(model.blocks.W_out[site.layer], np.float64)
    if site.kind == "attn.hook_z":  # [H * E]: through W_O
        W_O = np.asarray(model.blocks.W_O[site.layer], np.float64)
        return W @ W_O.reshape(-1, W_O.shape[-1])
    if site.kind == "attn.hook_result":  # [H * D]: the heads' outputs sum into the stream
        return W.reshape(len(W), cfg.n_heads, cfg.d_model).sum(1)
    return None


def direct_logit_effects(model, dictionary: SAE, features: Sequence[int]) -> np.ndarray | None:
    """float64 `[k, V]`: each feature's direct effect on the logits per unit of activation.

    `v = W_dec[f] / out_scale` (mapped into the residual stream through `W_out` / `W_O` for an
    `mlp.hook_post` / `attn.hook_z` dictionary) read by the unembedding as `(v * lnf_w) @ W_U`,
    after subtracting v's mean when the final norm is a LayerNorm.

    An approximation: the final norm's division by the residual stream's scale (a positive
    per-token factor) is ignored, as are later layers and `b_U`, so these values rank tokens
    correctly for a small push on the stream but are not exact logit differences. None when
    the output site is not written to the residual stream (e.g. an `ln2.hook_normalized` SAE).
    """
    v = _residual_directions(model, dictionary, features)
    if v is None:
        return None
    if model.cfg.normalization == "layernorm":
        v = v - v.mean(-1, keepdims=True)
    if model.lnf_w is not None:
        v = v * np.asarray(model.lnf_w, np.float64)
    return v @ np.asarray(model.W_U, np.float64)


# ---------------------------------------------------------------------------
# Dashboard data
# ---------------------------------------------------------------------------


def _str_tokens(tok, ids) -> list[str]:
    ids = [int(i) for i in ids]
    if tok is None:
        return [f"<{i}>" for i in ids]
    if hasattr(tok, "to_str_tokens"):
        return [str(s) for s in tok.to_str_tokens(np.asarray(ids, np.int64))]
    return [tok.decode([i]) for i in ids]


def _token_list(tok, ids, values) -> list[dict]:
    strs = _str_tokens(tok, ids)
    return [{"id": int(i), "token": s, "value": float(v)} for i, s, v in zip(ids, strs, values)]


def dashboard_data(
    model,
    tok,
    dictionary: SAE,
    tokens,
    features: Sequence[int],
    *,
    n_top: int = 10,
    window: tuple[int, int] = (8, 4),
    n_logits: int = 10,
    n_bins: int = 30,
    batch_size: int = 8,
    attention_mask=None,
    exclude_first: bool = True,
) -> list[dict]:
    """Per feature in `features`, a dict for `write_dashboards` (all plain Python / numpy):

        feature, in_site, out_site
        density      fraction of scored tokens where the feature is active (> 0)
        n_active, n_tokens   the counts behind it
        max_act      largest activation (0 for a dead feature)
        contexts     the top `n_top` rows by their max activation (one context per row), each
                     `{"row", "pos", "max_act", "max_index", "ids", "tokens", "acts"}`: the tokens
                     `window[0]` before to `window[1]` after the row's max position `pos`
                     (clipped to the row), their string forms and activations; `max_index`
                     locates `pos` in the window
        hist_counts, hist_edges   `np.histogram` of the nonzero activations (`n_bins` bins)
        top_logits, bottom_logits `n_logits` tokens most boosted (descending) and most
                     suppressed (ascending) by `direct_logit_effects`, as
                     `{"id", "token", "value"}`; empty when the output is not in the stream

    tok: a `Tokenizer` (or anything with `decode([id])`); None shows token ids.
    The first token of every row is not scored (see `feature_activations`).
    """
    _check_dictionary(dictionary)
    tokens = _as_tokens(tokens)
    features = _feature_ids(features, dictionary.width)
    if not features:
        return []
    acts = feature_activations(model, dictionary, tokens, features=features, batch_size=batch_size,
                               attention_mask=attention_mask, exclude_first=exclude_first)  # fmt: skip
    valid = _scored(tokens, attention_mask, exclude_first)
    real = _scored(tokens, attention_mask, False)
    n_tokens = int(valid.sum())
    effects = direct_logit_effects(model, dictionary, features)
    before, after = (int(w) for w in window)
    T = tokens.shape[1]
    out = []
    for j, f in enumerate(features):
        a = acts[..., j]
        active = (a > 0) & valid
        nonzero = a[active]
        row_max = np.where(valid, a, -np.inf).max(axis=1)  # [N]
        rows = np.flatnonzero(row_max > 0)
        rows = rows[np.argsort(-row_max[rows], kind="stable")][:n_top]
        contexts = []
        for r in rows:
            p = int(np.argmax(np.where(valid[r], a[r], -np.inf)))
            lo, hi = max(0, p - before), min(T, p + after + 1)
            keep = np.flatnonzero(real[r, lo:hi]) + lo  # skip padding
            ids = tokens[r, keep]
            contexts.append({
                "row": int(r), "pos": p, "max_act": float(a[r, p]), "max_index": int(np.flatnonzero(keep == p)[0]),
                "ids": [int(i) for i in ids], "tokens": _str_tokens(tok, ids), "acts": [float(x) for x in a[r, keep]],
            })  # fmt: skip
        if nonzero.size:
            counts, edges = np.histogram(nonzero, bins=n_bins)
        else:
            counts, edges = np.zeros(n_bins, np.int64), np.linspace(0.0, 1.0, n_bins + 1)
        top_logits, bottom_logits = [], []
        if effects is not None:
            e = effects[j]
            k = min(n_logits, e.shape[0])
            up = np.argsort(-e, kind="stable")[:k]
            down = np.argsort(e, kind="stable")[:k]
            top_logits, bottom_logits = _token_list(tok, up, e[up]), _token_list(tok, down, e[down])
        out.append({
            "feature": int(f), "in_site": dictionary.in_site, "out_site": dictionary.out_site or dictionary.in_site,
            "density": float(active.sum()) / max(n_tokens, 1), "n_active": int(active.sum()), "n_tokens": n_tokens,
            "max_act": float(nonzero.max()) if nonzero.size else 0.0, "contexts": contexts,
            "hist_counts": counts, "hist_edges": edges, "top_logits": top_logits, "bottom_logits": bottom_logits,
        })  # fmt: skip
    return out


# ---------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------

_STYLE = """
body{font:13px system-ui,sans-serif;margin:16px;color:#222;max-width:1200px}
table{border-collapse:collapse;font-family:monospace}
td,th{padding:1px 8px;text-align:left;border-bottom:1px solid #eee}
th{background:#f4f4f4}
td.num{text-align:right}
section.feature{border-top:2px solid #ccc;margin-top:24px;padding-top:4px}
.meta{color:#555;font-family:monospace}
.cols{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
.ctx{font-family:monospace;white-space:pre;line-height:1.9;margin:2px 0;overflow-x:auto}
.ctx .lab{color:#888;display:inline-block;width:8em}
.t{padding:1px 1px;border-radius:2px;margin:0 1px}
.t.mx{outline:2px solid #c00;outline-offset:0}
.ws{color:#999}
svg{background:#fff;border:1px solid #ddd}
.bar{fill:#e8710a}
.axis{font-size:10px;fill:#666}
.pos{color:#1a7f37}
.neg{color:#b42318}
a{color:#0b57d0}
"""


def _fmt(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.4g}"


def _show_token(s: str) -> str:
    """A token's text, HTML-escaped, with spaces as '·', newlines as '↵' and tabs as '→' (greyed)."""
    if s == "":
        return '<span class="ws">∅</span>'
    marks = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍"}
    out = []
    for ch in s:
        out.append(f'<span class="ws">{marks[ch]}</span>' if ch in marks else escape(ch))
    return "".join(out)


def _context_html(ctx: dict, max_act: float) -> str:
    spans = []
    for i, (t, v) in enumerate(zip(ctx["tokens"], ctx["acts"])):
        alpha = 0.0 if max_act <= 0 else min(max(v / max_act, 0.0), 1.0)
        cls = "t mx" if i == ctx["max_index"] else "t"
        spans.append(f'<span class="{cls}" style="background:rgba(232,113,10,{alpha:.3f})" '
                     f'title="{escape(repr(t))}: {_fmt(v)}">{_show_token(t)}</span>')  # fmt: skip
    lab = f'<span class="lab">{_fmt(ctx["max_act"])} r{ctx["row"]}:{ctx["pos"]}</span>'
    return f'<div class="ctx">{lab}{"".join(spans)}</div>'


def _histogram_svg(counts, edges, width: int = 360, height: int = 140) -> str:
    counts = np.asarray(counts, np.float64)
    edges = np.asarray(edges, np.float64)
    left, bottom, top, right = 36.0, 22.0, 8.0, 8.0
    w, h = width - left - right, height - bottom - top
    peak = counts.max() if counts.size and counts.max() > 0 else 1.0
    bw = w / max(len(counts), 1)
    bars = []
    for i, c in enumerate(counts):
        bh = h * c / peak
        bars.append(f'<rect class="bar" x="{left + i * bw:.1f}" y="{top + h - bh:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                    f'height="{bh:.1f}"><title>[{_fmt(edges[i])}, {_fmt(edges[i + 1])}): {int(c)}</title></rect>')  # fmt: skip
    axes = (
        f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="#999"/>'
        f'<text class="axis" x="{left}" y="{height - 6}">{_fmt(edges[0])}</text>'
        f'<text class="axis" x="{left + w}" y="{height - 6}" text-anchor="end">{_fmt(edges[-1])}</text>'
        f'<text class="axis" x="{left - 4}" y="{top + 8}" text-anchor="end">{int(peak)}</text>'
        f'<text class="axis" x="{left - 4}" y="{top + h}" text-anchor="end">0</text>'
    )
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="histogram of nonzero activations">{axes}{"".join(bars)}</svg>')  # fmt: skip


def _logit_table(rows: list[dict], heading: str, cls: str) -> str:
    body = "".join(f'<tr><td>{_show_token(r["token"])}</td><td class="num {cls}">{r["value"]:+.4g}</td></tr>' for r in rows)
    body = body or '<tr><td colspan="2">(output not written to the residual stream)</td></tr>'
    return f"<div><h4>{heading}</h4><table><thead><tr><th>token</th><th>logit</th></tr></thead><tbody>{body}</tbody></table></div>"


def _section(d: dict) -> str:
    f = int(d["feature"])
    contexts = "".join(_context_html(c, d["max_act"]) for c in d["contexts"]) or "<p>(never active)</p>"
    n_nonzero = int(np.sum(d["hist_counts"]))
    return f"""<section class="feature" id="f{f}">
<h3>Feature {f}</h3>
<p class="meta">density {d["density"]:.4%} ({d["n_active"]} of {d["n_tokens"]} tokens), max activation {_fmt(d["max_act"])};
reads {escape(d["in_site"])}, writes {escape(d["out_site"])}. <a href="#index">back to index</a></p>
<h4>Top activating contexts</h4>
{contexts}
<div class="cols">
<div><h4>Nonzero activations ({n_nonzero})</h4>{_histogram_svg(d["hist_counts"], d["hist_edges"])}</div>
{_logit_table(d["top_logits"], "Boosted tokens", "pos")}
{_logit_table(d["bottom_logits"], "Suppressed tokens", "neg")}
</div>
</section>"""


def write_dashboards(path, data: Sequence[dict], *, title: str = "Feature dashboards") -> Path:
    """Write `dashboard_data(...)` as one self-contained static HTML page and return its path.

    An index table (feature, density, max activation) links to one section per feature: its
    top contexts with each token's background proportional to activation / the feature's max
    (the context's max token outlined; spaces '·', newlines '↵'; hover a token for its value),
    an SVG histogram of its nonzero activations, and its boosted / suppressed tokens with
    their direct logit effects. Inline CSS and SVG only: no script, nothing fetched.
    """
    index = "".join(
        f'<tr><td><a href="#f{int(d["feature"])}">{int(d["feature"])}</a></td><td class="num">{d["density"]:.4%}</td>'
        f'<td class="num">{_fmt(d["max_act"])}</td></tr>'
        for d in data
    )
    sites = sorted({(d["in_site"], d["out_site"]) for d in data})
    about = "; ".join(f"reads {escape(i)}, writes {escape(o)}" if i != o else f"site {escape(i)}" for i, o in sites)
    heading = escape(title)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{heading}</title><style>{_STYLE}</style></head>
<body>
<h2 id="index">{heading}</h2>
<p>{len(data)} features{": " + about if about else ""}. The first token of each context row is not scored.
Boosted / suppressed tokens: the direct effect on the logits of one unit of activation, the decoder row read
through the final norm's weight and W_U, (W_dec[f] * lnf_w) @ W_U (the norm's scale and later layers ignored).</p>
<table><thead><tr><th>feature</th><th>density</th><th>max act</th></tr></thead><tbody>{index}</tbody></table>
{chr(10).join(_section(d) for d in data)}
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
