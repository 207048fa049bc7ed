"""Attribution patching on SmolLM2 IOI: cost against one forward pass, agreement with the exact sweeps.

    .venv/bin/python benchmarks/attribution.py [--repeats 5]

Prints the steady-state time of one jitted forward pass (all-position logits), of AtP for every
site at every layer (one clean forward, one corrupt forward + backward), their ratio, and for
several sweeps the Pearson and Spearman correlation between the AtP estimates (AtP* for q and k,
integrated gradients with 16 steps) and the exact patching results (`patch_sweep`), in the same
process run. MLP neurons are swept exactly at the layers of `--neuron-layers` only (every layer
takes about 15 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import circuits_jax as cj

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
SWEEPS = [("resid_pre", ("layer", "pos")), ("attn_out", ("layer", "pos")), ("mlp_out", ("layer", "pos")),
          ("z", ("layer", "head")), ("z", ("layer", "pos", "head")), ("v", ("layer", "head")), ("q", ("layer", "head")),
          ("q", ("layer", "pos", "head")), ("k", ("layer", "head")), ("k", ("layer", "pos", "head")),
          ("mlp_post", ("layer", "neuron"))]  # fmt: skip


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def spearman(a, b):
    """Rank correlation with tied values sharing their average rank (many entries are exactly 0)."""
    from scipy.stats import rankdata

    return float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--neuron-layers", default="0,15,23,29", help="layers whose MLP neurons are patched exactly")
    args = ap.parse_args()
    model, tok = cj.load("smollm2")
    clean, corrupt = tok.to_tokens(CLEAN), tok.to_tokens(CORRUPT)
    metric = cj.LogitDiff(np.array([tok.to_single_token(" Mary")]), np.array([tok.to_single_token(" John")]))
    forward = jax.jit(lambda m, t: m(t))
    forward(model, corrupt).block_until_ready()
    fwd = median_time(lambda: forward(model, corrupt), args.repeats)
    t = time.perf_counter()
    cj.attribution_patch_all(model, clean, corrupt, metric)
    first = time.perf_counter() - t
    atp = median_time(lambda: cj.attribution_patch_all(model, clean, corrupt, metric)[0]["z"], args.repeats)
    print(f"SmolLM2, {clean.shape[1]} tokens, {jax.devices()[0]}")
    print(f"forward (jitted, all-position logits): {fwd * 1e3:.0f} ms")
    print(f"AtP, all {len(cj.PATCH_SITES)} sites x {model.cfg.n_layers} layers: {atp * 1e3:.0f} ms "
          f"(first call with compile {first:.1f} s) = {atp / fwd:.1f}x one forward")  # fmt: skip
    print("\n| sweep | entries | AtP Pearson | AtP Spearman | AtP* Pearson | AtP* Spearman | IG Pearson | IG Spearman | exact s | AtP s | IG s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    neuron_layers = [int(x) for x in args.neuron_layers.split(",")]
    for site, by in SWEEPS:
        layers = neuron_layers if site == "mlp_post" else None
        pick = slice(None) if layers is None else np.asarray(layers)
        exact = cj.patch_sweep(model, clean, corrupt, metric, site, by, progress=False, layers=layers)
        est = cj.attribution_patch(model, clean, corrupt, metric, site, by)
        star = cj.atp_star(model, clean, corrupt, metric, site, by) if site in ("q", "k") else est
        ig = cj.integrated_gradients(model, clean, corrupt, metric, site, by, steps=16)
        a, b, s, c = exact.result.ravel(), est.result[pick].ravel(), star.result[pick].ravel(), ig.result[pick].ravel()
        name = f"{site} [{', '.join(by)}]" + (f" (layers {args.neuron_layers})" if layers else "")
        print(f"| {name} | {a.size} | {np.corrcoef(a, b)[0, 1]:.3f} | {spearman(a, b):.3f} | "
              f"{np.corrcoef(a, s)[0, 1]:.3f} | {spearman(a, s):.3f} | "
              f"{np.corrcoef(a, c)[0, 1]:.3f} | {spearman(a, c):.3f} | {exact.seconds:.1f} | {est.seconds:.1f} | {ig.seconds:.1f} |",
              flush=True)  # fmt: skip

    tiny_section()


def tiny_section():
    """The same comparison on the reference tiny GPT-2 and tiny Llama (random near-linear weights) and on a
    random tiny Llama-like model with large weights, 4 random prompt pairs of 8 tokens, every layer."""
    import os
    from pathlib import Path

    ref = Path(os.environ.get("CIRCUITS_JAX_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "reference"
    models = [(n, cj.load_hf(ref / n)) for n in ("tiny_gpt2", "tiny_llama") if (ref / n).exists()]
    cfg = cj.Config(d_model=32, n_layers=3, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=32, n_kv_heads=2,
                    normalization="rmsnorm", positional="rotary", gated_mlp=True, act="silu")  # fmt: skip
    models.append(("random llama-like, std 0.3", cj.init_model(cfg, key=jax.random.key(0), std=0.3)))
    print("\n| tiny model | sweep | entries | AtP Pearson | AtP Spearman | AtP* Pearson | AtP* Spearman |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, model in models:
        rng = np.random.default_rng(0)
        clean = rng.integers(0, model.cfg.d_vocab, (4, 8)).astype(np.int32)
        corrupt = clean.copy()
        corrupt[:, 3] = (corrupt[:, 3] + 7) % model.cfg.d_vocab
        metric = cj.LogitDiff(np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8]))
        for site, by in [("z", ("layer", "pos", "head")), ("q", ("layer", "pos", "head")), ("k", ("layer", "pos", "head")),
                         ("mlp_post", ("layer", "neuron"))]:  # fmt: skip
            exact = cj.patch_sweep(model, clean, corrupt, metric, site, by, progress=False).result.ravel()
            est = cj.attribution_patch(model, clean, corrupt, metric, site, by).result.ravel()
            star = cj.atp_star(model, clean, corrupt, metric, site, by).result.ravel()
            print(f"| {name} | {site} [{', '.join(by)}] | {exact.size} | {np.corrcoef(exact, est)[0, 1]:.3f} | "
                  f"{spearman(exact, est):.3f} | {np.corrcoef(exact, star)[0, 1]:.3f} | {spearman(exact, star):.3f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
