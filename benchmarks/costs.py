"""What each technique costs on SmolLM2's shape, against one forward pass and a matmul, in one process run.

    .venv/bin/python benchmarks/costs.py [--random-init] [--batch 1] [--all-edges] [--json out.json]

Times (median of `--repeats` calls after a first, compiling call, whose time is printed too):
one jitted forward; attribution patching of every site at every layer (AtP, one backward);
AtP* for q and k (and GradDrop for z); EAP over every edge, EAP-IG (inputs, activations);
path patching of every head into the logits; exact patching sweeps (z by layer, pos, head;
resid_pre by layer, pos); with `--all-edges`, every one of the ~70k edges patched exactly.
The forward's FLOP rate is set beside a square float32 matmul measured in the same run.

`--random-init` builds a model of SmolLM2's exact config with random weights: costs do not
depend on the weights, and the GPU machines cannot reach the model file (nor hold it in the
64 MiB that travels there). The accuracy figures need the real weights: benchmarks/edges.py,
benchmarks/attribution.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import circuits_jax as cj

SMOLLM2 = dict(d_model=576, n_layers=30, n_heads=9, d_head=64, d_vocab=49152, n_ctx=8192, d_mlp=1536, n_kv_heads=3,
               normalization="rmsnorm", norm_eps=1e-5, act="silu", gated_mlp=True, positional="rotary",
               rope_theta=100000.0, tied_embeddings=True, family="llama")  # fmt: skip
T, DIFFER = 14, 9  # the IOI prompt's length and the position where clean and corrupt differ


def _timed(fn, repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return dict(first_s=first, s=float(np.median(times)))


def forward_flop(cfg, B, T) -> float:
    """Matmul FLOPs of one forward with all-position logits (2 per multiply-add)."""
    D, H, K, E, M, V = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    per_token_layer = 2 * D * E * (H + 2 * K) + 2 * H * E * D + 2 * 3 * D * M + 2 * 2 * H * T * E
    return float(B * T * (cfg.n_layers * per_token_layer + 2 * D * V))


def matmul_rate(n=4096, repeats=5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    r = _timed(lambda: f(a), repeats)
    return 2 * n**3 / r["s"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--all-edges", action="store_true", help="also patch every edge exactly (long on a CPU)")
    ap.add_argument("--skip", default="", help="comma list of rows to skip (e.g. eap-ig-activations,graddrop)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    B = args.batch
    if args.random_init:
        model = cj.init_model(cj.Config(**SMOLLM2), key=jax.random.key(0), std=0.05)
        rng = np.random.default_rng(0)
        clean = rng.integers(0, model.cfg.d_vocab, (B, T)).astype(np.int32)
        corrupt = clean.copy()
        corrupt[:, DIFFER] = (corrupt[:, DIFFER] + 1) % model.cfg.d_vocab
        metric = cj.LogitDiff(np.full(B, 11), np.full(B, 12))
        what = "SmolLM2 config, random weights"
    else:
        model, tok = cj.load("smollm2")
        clean = np.repeat(tok.to_tokens("When Mary and John went to the store, John gave a drink to"), B, 0)
        corrupt = np.repeat(tok.to_tokens("When Mary and John went to the store, Mary gave a drink to"), B, 0)
        metric = cj.LogitDiff(np.full(B, tok.to_single_token(" Mary")), np.full(B, tok.to_single_token(" John")))
        what = "SmolLM2"
    cfg = model.cfg
    dev = jax.devices()[0]
    report: dict = dict(device=str(dev), device_kind=getattr(dev, "device_kind", ""), model=what, batch=B, tokens=T)
    print(f"{what}; batch {B} x {T} tokens; {dev} ({report['device_kind']})")

    peak = matmul_rate()
    fwd_fn = jax.jit(lambda m, t: m(t))
    fwd = _timed(lambda: fwd_fn(model, jnp.asarray(corrupt)), args.repeats)
    flop = forward_flop(cfg, B, T)
    report["matmul_f32_tflops"] = peak / 1e12
    report["forward"] = dict(**fwd, tflops=flop / fwd["s"] / 1e12)
    print(f"float32 matmul 4096^3: {peak / 1e12:.1f} TFLOP/s; forward {fwd['s'] * 1e3:.2f} ms = "
          f"{flop / fwd['s'] / 1e12:.2f} TFLOP/s ({flop / fwd['s'] / peak:.1%} of the matmul)")  # fmt: skip

    g = cj.Graph.of(cfg)
    s_idx, d_idx = np.nonzero(g.mask)
    rows = {  # the cheap and the headline rows first: a run cut short still reports them
        "atp, every site x layer": lambda: cj.attribution_patch_all(model, clean, corrupt, metric)[0]["z"],
        f"eap, {g.n_edges} edges": lambda: cj.edge_attribution(model, clean, corrupt, metric, "eap").scores,
        f"path patching, {cfg.n_layers * cfg.n_heads} heads -> logits": lambda: cj.path_patch(
            model, clean, corrupt, metric, receivers="logits", progress=False).raw,
        f"exact z [layer,pos,head], {cfg.n_layers * T * cfg.n_heads} patches": lambda: cj.patch_sweep(
            model, clean, corrupt, metric, "z", ("layer", "pos", "head"), progress=False).raw,
        f"exact resid_pre [layer,pos], {cfg.n_layers * T} patches": lambda: cj.patch_sweep(
            model, clean, corrupt, metric, "resid_pre", ("layer", "pos"), progress=False).raw,
        f"exact, every edge alone ({g.n_edges})": lambda: cj.patch_single_edges(
            model, clean, corrupt, metric, np.stack([s_idx, d_idx], 1), progress=False),
        "atp* q [layer,pos,head]": lambda: cj.atp_star(model, clean, corrupt, metric, "q", ("layer", "pos", "head")).raw,
        "atp* k [layer,pos,head]": lambda: cj.atp_star(model, clean, corrupt, metric, "k", ("layer", "pos", "head")).raw,
        "eap-ig (8 steps)": lambda: cj.edge_attribution(model, clean, corrupt, metric, "eap-ig", steps=8).scores,
        "graddrop z [layer,head]": lambda: cj.atp_star(model, clean, corrupt, metric, "z", ("layer", "head"),
                                                       graddrop=True).raw,  # fmt: skip
        "eap-ig-activations (8 steps)": lambda: cj.edge_attribution(model, clean, corrupt, metric, "eap-ig-activations",
                                                                    steps=8).scores,  # fmt: skip
    }  # fmt: skip
    if not args.all_edges:
        rows = {k: v for k, v in rows.items() if "every edge alone" not in k}
    report["rows"] = {}
    print("\n| what | first call s | median s | x forward |")
    print("|---|---:|---:|---:|")
    for name, fn in rows.items():
        if any(k in name for k in skip):
            continue
        r = _timed(fn, 1 if "exact" in name or "activations" in name or "graddrop" in name else args.repeats)
        r["x_forward"] = r["s"] / fwd["s"]
        report["rows"][name] = r
        print(f"| {name} | {r['first_s']:.2f} | {r['s']:.3f} | {r['x_forward']:.1f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
