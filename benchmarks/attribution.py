"""Attribution patching on SmolLM2 IOI: cost against one forward pass, agreement with the exact sweeps.

    .venv/bin/python benchmarks/attribution.py [--repeats 5]

Prints the steady-state time of one jitted forward pass (all-position logits), of AtP for every
site at every layer (one clean forward, one corrupt forward + backward), their ratio, and for
several sweeps the Pearson and Spearman correlation between the AtP estimates (and the
integrated-gradients estimates, 16 steps) and the exact patching results (`patch_sweep`), in the
same process run.
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
          ("z", ("layer", "head")), ("z", ("layer", "pos", "head")), ("v", ("layer", "head")), ("q", ("layer", "head"))]  # fmt: skip


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _spearman(a, b):
    """Rank correlation with tied values sharing their average rank (many entries are exactly 0)."""
    from scipy.stats import rankdata

    return float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model, tok = cj.load("smollm2")
    clean, corrupt = tok.to_tokens(CLEAN), tok.to_tokens(CORRUPT)
    metric = cj.LogitDiff(np.array([tok.to_single_token(" Mary")]), np.array([tok.to_single_token(" John")]))
    forward = jax.jit(lambda m, t: m(t))
    forward(model, corrupt).block_until_ready()
    fwd = _median_time(lambda: forward(model, corrupt), args.repeats)
    t = time.perf_counter()
    cj.attribution_patch_all(model, clean, corrupt, metric)
    first = time.perf_counter() - t
    atp = _median_time(lambda: cj.attribution_patch_all(model, clean, corrupt, metric)[0]["z"], args.repeats)
    print(f"SmolLM2, {clean.shape[1]} tokens, {jax.devices()[0]}")
    print(f"forward (jitted, all-position logits): {fwd * 1e3:.0f} ms")
    print(f"AtP, all {len(cj.PATCH_SITES)} sites x {model.cfg.n_layers} layers: {atp * 1e3:.0f} ms "
          f"(first call with compile {first:.1f} s) = {atp / fwd:.1f}x one forward")  # fmt: skip
    print("\n| sweep | entries | AtP Pearson | AtP Spearman | IG Pearson | IG Spearman | exact s | AtP s | IG s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for site, by in SWEEPS:
        exact = cj.patch_sweep(model, clean, corrupt, metric, site, by, progress=False)
        est = cj.attribution_patch(model, clean, corrupt, metric, site, by)
        ig = cj.integrated_gradients(model, clean, corrupt, metric, site, by, steps=16)
        a, b, c = exact.result.ravel(), est.result.ravel(), ig.result.ravel()
        print(f"| {site} [{', '.join(by)}] | {a.size} | {np.corrcoef(a, b)[0, 1]:.3f} | {_spearman(a, b):.3f} | "
              f"{np.corrcoef(a, c)[0, 1]:.3f} | {_spearman(a, c):.3f} | {exact.seconds:.1f} | {est.seconds:.1f} | {ig.seconds:.1f} |")


if __name__ == "__main__":
    main()
