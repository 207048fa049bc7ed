"""Edge attribution (EAP, EAP-IG) and path patching: cost, agreement with exact edge patching and with TransformerLens.

    .venv/bin/python benchmarks/edges.py [--edges 2000] [--steps 8] [--no-tl] [--json out.json]

In one process run:
A. cost on SmolLM2 IOI (one prompt pair): one jitted forward, EAP over every edge of the graph,
   EAP-IG (inputs and activations, `--steps`), path patching of every head into the logits;
B. approximation quality on SmolLM2: exact single-edge patches of the `--top` edges by |EAP|
   plus `--edges` edges drawn at random (0: every edge, feasible on a GPU), against each estimate;
C. the same on small models where every edge is patched exactly: the reference tiny GPT-2 and
   tiny Llama checkpoints (`../shared/reference`, near-linear random weights) and a random
   tiny model with large weights (strongly non-linear);
D. TransformerLens 4.x (`transformer_lens.tools.analysis.attribution_patching`, CPU, one
   prompt pair at a time): its node attribution on SmolLM2 (heads' z and MLP outputs per
   position) and its edge attribution on the tiny GPT-2 (its edge mode refuses grouped-query
   attention, so not SmolLM2), beside ours: time and the largest difference of the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import circuits_jax as cj

from attribution import median_time, spearman  # the sibling benchmark's helpers

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
REFERENCE = Path(os.environ.get("CIRCUITS_JAX_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "reference"


def _median(fn, repeats):
    return median_time(fn, repeats)


def _corr(exact, est):
    return dict(pearson=float(np.corrcoef(exact, est)[0, 1]), spearman=spearman(exact, est))


def _estimates(model, clean, corrupt, metric, steps):
    out = {}
    for method in cj.EDGE_METHODS:
        r = cj.edge_attribution(model, clean, corrupt, metric, method, steps=steps)
        out[method] = r
    return out


def cost(model, clean, corrupt, metric, steps, repeats) -> dict:
    forward = jax.jit(lambda m, t: m(t))
    forward(model, jnp.asarray(corrupt)).block_until_ready()
    fwd = _median(lambda: forward(model, jnp.asarray(corrupt)), repeats)
    row = dict(forward_ms=fwd * 1e3)
    for method in cj.EDGE_METHODS:
        t = time.perf_counter()
        cj.edge_attribution(model, clean, corrupt, metric, method, steps=steps)
        first = time.perf_counter() - t
        s = _median(lambda: cj.edge_attribution(model, clean, corrupt, metric, method, steps=steps).scores, repeats)
        row[method] = dict(first_s=first, ms=s * 1e3, x_forward=s / fwd)
    t = time.perf_counter()
    cj.path_patch(model, clean, corrupt, metric, receivers="logits", progress=False)
    first = time.perf_counter() - t
    s = _median(lambda: cj.path_patch(model, clean, corrupt, metric, receivers="logits", progress=False).raw, 1)
    row["path_patch_heads_to_logits"] = dict(first_s=first, s=s, patches=model.cfg.n_layers * model.cfg.n_heads)
    return row


def quality_sample(model, clean, corrupt, metric, est, n_random, n_top, seed=0) -> dict:
    """Exact single-edge patches of the top-|EAP| edges and of random edges, against each estimate."""
    g = cj.Graph.of(model.cfg)
    s, d = np.nonzero(g.mask)
    eap = est["eap"].scores[s, d]
    top = np.argsort(-np.abs(eap))[:n_top]
    rest = np.setdiff1d(np.arange(len(s)), top)
    rand = rest if n_random == 0 or n_random >= len(rest) else np.random.default_rng(seed).choice(rest, n_random, replace=False)
    pick = np.concatenate([top, rand])
    t = time.perf_counter()
    raw = cj.patch_single_edges(model, clean, corrupt, metric, np.stack([s[pick], d[pick]], 1), progress=False)
    secs = time.perf_counter() - t
    exact = raw - est["eap"].corrupt_metric
    out = dict(edges=len(pick), top=len(top), random=len(rand), exact_s=secs, exact_ms_per_edge=secs / len(pick) * 1e3)
    for method, r in est.items():
        e = r.scores[s[pick], d[pick]]
        out[method] = dict(all=_corr(exact, e), random=_corr(exact[len(top):], e[len(top):]),
                           top=_corr(exact[: len(top)], e[: len(top)]))  # fmt: skip
    return out


def quality_all(name, model, clean, corrupt, metric, steps) -> dict:
    exact = cj.edge_patch_all(model, clean, corrupt, metric, progress=False)
    m = exact.mask
    row = dict(model=name, edges=int(m.sum()), exact_s=exact.seconds)
    for method, r in _estimates(model, clean, corrupt, metric, steps).items():
        row[method] = _corr(exact.scores[m], r.scores[m])
    return row


def tiny_models():
    models = []
    for name in ("tiny_gpt2", "tiny_llama"):
        if (REFERENCE / name).exists():
            models.append((name, cj.load_hf(REFERENCE / name)))
    cfg = cj.Config(d_model=32, n_layers=3, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=32, n_kv_heads=2,
                    normalization="rmsnorm", positional="rotary", gated_mlp=True, act="silu")  # fmt: skip
    models.append(("random llama-like, std 0.3", cj.init_model(cfg, key=jax.random.key(0), std=0.3)))
    return models


def tiny_pair(cfg, seed=0):
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, cfg.d_vocab, (4, 8)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 3] = (corrupt[:, 3] + 7) % cfg.d_vocab
    return clean, corrupt, cj.LogitDiff(np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8]))


# ---------------------------------------------------------------------------
# TransformerLens
# ---------------------------------------------------------------------------


def tl_nodes_smollm2(model, tok, clean, corrupt, metric, answer, wrong, repeats) -> dict:
    import torch
    import transformers
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.tools.analysis import attribution_patching as ap

    with tempfile.TemporaryDirectory() as tmp:
        cj.export_hf(model, tmp)
        hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tok, eos_token="<|im_end|>")
        bridge = TransformerBridge.boot_transformers(tmp, device="cpu", dtype=torch.float32, tokenizer=hf_tok)
    bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    ct, xt = (torch.from_numpy(t.astype(np.int64)) for t in (clean, corrupt))

    def metric_fn(logits):
        return (logits[:, -1, answer] - logits[:, -1, wrong]).sum()

    t = time.perf_counter()
    res = ap.attribution_patch(bridge, ct, xt, metric_fn)
    tl_s = time.perf_counter() - t
    L, H, T = model.cfg.n_layers, model.cfg.n_heads, clean.shape[1]
    tl_z, tl_mlp = np.full((L, T, H), np.nan), np.full((L, T), np.nan)
    for node, v in res.node_scores.items():
        if node.kind == "attn_head_out":
            tl_z[node.layer, node.position, node.head] = v
        elif node.kind == "mlp_out":
            tl_mlp[node.layer, node.position] = v

    def ours():
        est, _ = cj.attribution_patch_all(model, clean, corrupt, metric, ["z", "mlp_out"])
        return est

    ours()
    our_s = _median(lambda: ours()["z"], repeats)
    est = ours()
    z = np.asarray(est["z"]).sum(axis=(1, 4))  # [L, B, T, H, E] -> [L, T, H]
    mlp = np.asarray(est["mlp_out"]).sum(axis=(1, 3))  # [L, B, T, D] -> [L, T]
    scale = max(np.nanmax(np.abs(tl_z)), np.nanmax(np.abs(tl_mlp)))
    return dict(nodes=int(np.isfinite(tl_z).sum() + np.isfinite(tl_mlp).sum()), tl_s=tl_s, ours_s=our_s,
                speedup=tl_s / our_s, max_abs_diff_z=float(np.nanmax(np.abs(z - tl_z))),
                max_abs_diff_mlp=float(np.nanmax(np.abs(mlp - tl_mlp))), largest_score=float(scale))  # fmt: skip


def tl_edges_tiny(repeats) -> dict | None:
    if not (REFERENCE / "tiny_gpt2").exists():
        return None
    import torch
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.tools.analysis import attribution_patching as ap

    model = cj.load_hf(REFERENCE / "tiny_gpt2")
    clean, corrupt, _ = tiny_pair(model.cfg)
    clean, corrupt = clean[:1], corrupt[:1]
    metric = cj.LogitDiff(np.array([1]), np.array([5]))
    bridge = TransformerBridge.boot_transformers(str(REFERENCE / "tiny_gpt2"), device="cpu", dtype=torch.float32)
    bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    ct, xt = (torch.from_numpy(t.astype(np.int64)) for t in (clean, corrupt))
    t = time.perf_counter()
    res = ap.attribution_patch(bridge, ct, xt, lambda lg: (lg[:, -1, 1] - lg[:, -1, 5]).sum(),
                               ap.EdgeAttributionConfig(granularity="edge"))  # fmt: skip
    tl_s = time.perf_counter() - t
    g = cj.Graph.of(model.cfg)

    def src(n):
        return "input" if n.kind == "embed" else f"a{n.layer}.h{n.head}" if n.kind == "attn_head_out" else f"m{n.layer}"

    def dst(n):
        if n.kind == "logits":
            return "logits"
        if n.kind == "mlp_in":
            return f"m{n.layer}"
        return f"a{n.layer}.h{n.head}<{n.kind[0]}>"

    tl = np.zeros(g.mask.shape)
    for (w, r), v in res.edge_scores.items():  # per position: sum to our per-edge totals
        tl[g.source_index(src(w)), g.destination_index(dst(r))] += v
    cj.edge_attribution(model, clean, corrupt, metric, "eap")
    our_s = _median(lambda: cj.edge_attribution(model, clean, corrupt, metric, "eap").scores, repeats)
    ours = cj.edge_attribution(model, clean, corrupt, metric, "eap").scores
    m = g.mask
    return dict(edges=int(m.sum()), tl_edge_entries=len(res.edge_scores), tl_s=tl_s, ours_s=our_s, speedup=tl_s / our_s,
                max_abs_diff=float(np.abs(ours[m] - tl[m]).max()), largest_score=float(np.abs(tl[m]).max()))  # fmt: skip


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--edges", type=int, default=2000, help="random SmolLM2 edges patched exactly (0: all)")
    ap.add_argument("--top", type=int, default=500, help="top-|EAP| SmolLM2 edges patched exactly")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-tl", action="store_true")
    ap.add_argument("--parts", default="ABCD", help="which sections to run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    report: dict = dict(device=str(jax.devices()[0]), steps=args.steps)
    model, tok = cj.load("smollm2")
    clean, corrupt = tok.to_tokens(CLEAN), tok.to_tokens(CORRUPT)
    answer, wrong = tok.to_single_token(" Mary"), tok.to_single_token(" John")
    metric = cj.LogitDiff(np.array([answer]), np.array([wrong]))
    g = cj.Graph.of(model.cfg)
    print(f"SmolLM2 IOI, {clean.shape[1]} tokens, {jax.devices()[0]}; graph: {len(g.sources)} sources, "
          f"{len(g.destinations)} destinations, {g.n_edges} edges")  # fmt: skip

    if "A" in args.parts:
        c = report["cost"] = cost(model, clean, corrupt, metric, args.steps, args.repeats)
        print(f"\nA. cost: one forward {c['forward_ms']:.1f} ms")
        for m in cj.EDGE_METHODS:
            print(f"  {m:<20} every edge: {c[m]['ms']:8.1f} ms = {c[m]['x_forward']:6.1f}x forward "
                  f"(first call {c[m]['first_s']:.1f} s)")  # fmt: skip
        p = c["path_patch_heads_to_logits"]
        print(f"  path patching, {p['patches']} heads -> logits: {p['s']:.2f} s (first call {p['first_s']:.1f} s)")

    if "B" in args.parts:
        est = _estimates(model, clean, corrupt, metric, args.steps)
        q = report["smollm2_sample"] = quality_sample(model, clean, corrupt, metric, est, args.edges, args.top)
        print(f"\nB. SmolLM2: {q['edges']} edges patched exactly ({q['top']} top-|EAP| + {q['random']} random) in "
              f"{q['exact_s']:.1f} s ({q['exact_ms_per_edge']:.2f} ms/edge)")  # fmt: skip
        print("| estimate | Pearson (all) | Spearman (all) | Pearson (random) | Spearman (random) | Pearson (top) | Spearman (top) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for m in cj.EDGE_METHODS:
            r = q[m]
            print(f"| {m} | {r['all']['pearson']:.3f} | {r['all']['spearman']:.3f} | {r['random']['pearson']:.3f} | "
                  f"{r['random']['spearman']:.3f} | {r['top']['pearson']:.3f} | {r['top']['spearman']:.3f} |")  # fmt: skip

    if "C" in args.parts:
        print("\nC. every edge patched exactly (4 random prompt pairs of 8 tokens):")
        print("| model | edges | exact s | " + " | ".join(f"{m} Pearson | {m} Spearman" for m in cj.EDGE_METHODS) + " |")
        print("|---|---:|---:|" + "---:|" * (2 * len(cj.EDGE_METHODS)))
        report["tiny"] = []
        for name, tiny in tiny_models():
            tc, tx, tm = tiny_pair(tiny.cfg)
            r = quality_all(name, tiny, tc, tx, tm, args.steps)
            report["tiny"].append(r)
            print(f"| {name} | {r['edges']} | {r['exact_s']:.1f} | "
                  + " | ".join(f"{r[m]['pearson']:.3f} | {r[m]['spearman']:.3f}" for m in cj.EDGE_METHODS) + " |")  # fmt: skip

    if "D" in args.parts and not args.no_tl:
        n = report["tl_nodes_smollm2"] = tl_nodes_smollm2(model, tok, clean, corrupt, metric, answer, wrong, args.repeats)
        print(f"\nD. TransformerLens node attribution_patch on SmolLM2 ({n['nodes']} head/MLP x position nodes): "
              f"TL {n['tl_s']:.2f} s, ours (z and mlp_out, one backward) {n['ours_s'] * 1e3:.0f} ms = {n['speedup']:.0f}x; "
              f"max |diff| z {n['max_abs_diff_z']:.2e}, mlp {n['max_abs_diff_mlp']:.2e} (largest score {n['largest_score']:.2f})")  # fmt: skip
        e = report["tl_edges_tiny_gpt2"] = tl_edges_tiny(args.repeats)
        if e:
            print(f"   TransformerLens edge attribution_patch on tiny GPT-2 ({e['edges']} edges, {e['tl_edge_entries']} "
                  f"per-position entries): TL {e['tl_s']:.2f} s, ours {e['ours_s'] * 1e3:.1f} ms = {e['speedup']:.0f}x; "
                  f"max |diff| {e['max_abs_diff']:.2e} (largest score {e['largest_score']:.2e})")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
