"""Attribution-graph speed on CPU: seconds per graph, compiled backward passes, FLOP utilisation.

One process, one SmolLM2 prompt of `--tokens` tokens (BOS included), per-layer transcoders from
`--transcoders` (or random ones of the same shape with `--random`, labelled as such). For each
batch size it times `attribution_graph` twice: cold (trace + compile + run) and warm, and
counts the compiled `vmap(vjp)` calls. The unbatched baseline computes `--single-rows` rows one
VJP at a time (batch size 1, what a loop of one backward pass per target does) and extrapolates
to the whole graph. FLOPs are counted analytically (transposed O and V projections and the frozen pattern per row and
layer run, plus the edge dot products); utilisation is against a float32 matmul timed in the same run.

    .venv/bin/python benchmarks/attribution_graph.py --transcoders runs/transcoders --json benchmarks/results/attribution_graph.json
    .venv/bin/python benchmarks/attribution_graph.py --random --batch-sizes 64 --single-rows 8     # smoke, no trained transcoders
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import circuits_jax as cj

PROMPT = "Fact: the capital of the state containing Dallas is called the city of"  # 15 tokens with BOS


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, a).block_until_ready()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, a).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / float(np.median(ts))


def graph_flops(cfg, T: int, k_slots: int, row_layers: int, rows: int) -> float:
    """FLOPs of the rows' backward passes (multiply-adds x 2): per row and layer run, the
    transposed O and V projections and the frozen pattern; per row, the edge dot products."""
    H, K, E, D = cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_model
    per_layer = T * (H * E * D + K * E * D) + H * T * T * E
    edges = cfg.n_layers * T * (k_slots + 1) * D + T * D
    return 2.0 * (row_layers * per_layer + rows * edges)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transcoders", default="runs/transcoders")
    p.add_argument("--random", action="store_true", help="random TopK transcoders (width 2304, k 16) instead of trained ones")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--batch-sizes", default="32,64,128")
    p.add_argument("--single-rows", type=int, default=32, help="rows timed one VJP at a time")
    p.add_argument("--json")
    args = p.parse_args()
    model, tok = cj.load("smollm2")
    if args.random:
        ds = [cj.init_sae(576, 2304, key=jax.random.key(l), arch="topk", k=16, in_site=f"blocks.{l}.ln2.hook_normalized",
                       out_site=f"blocks.{l}.hook_mlp_out") for l in range(model.cfg.n_layers)]  # fmt: skip
        ts = cj.stack_transcoders(ds, model_name="smollm2")
        label = "random TopK transcoders (width 2304, k 16)"
    else:
        ts = cj.load_transcoders(args.transcoders, model=model, model_name="smollm2")
        label = f"trained transcoders from {args.transcoders} (width {ts.width}, {ts.arch} k={ts.k})"
    ids = tok.encode(args.prompt, prepend_bos=True)
    peak = matmul_flops()
    print(f"prompt: {args.prompt!r} ({len(ids)} tokens with BOS); {label}")
    print(f"devices: {jax.devices()}; float32 matmul 2048^3: {peak / 1e9:.1f} GFLOP/s")
    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        t0 = time.perf_counter()
        g = cj.attribution_graph(model, ts, ids, batch_size=bs, progress=False)
        cold = time.perf_counter() - t0
        g = cj.attribution_graph(model, ts, ids, batch_size=bs, progress=False)
        warm = g.info["seconds"]
        n_rows = g.info["visited_features"] + len(g.logit_tokens)
        fl = graph_flops(model.cfg, len(ids), ts.k or 16, g.info["row_layers"], n_rows)
        rows.append(dict(batch_size=bs, cold_s=cold, warm_s=warm, backward_passes=g.info["backward_passes"], rows=n_rows,
                         rows_per_s=n_rows / warm, gflop_per_row=fl / n_rows / 1e9, utilisation=fl / warm / peak,
                         active_features=g.info["active_features"], mean_layers_per_row=g.info["row_layers"] / (g.info["backward_passes"] * bs)))  # fmt: skip
        r = rows[-1]
        print(f"batch {bs:4d}: cold {cold:6.1f} s, warm {warm:6.1f} s, {r['backward_passes']} compiled backward passes for "
              f"{n_rows} rows ({r['rows_per_s']:.0f} rows/s), {r['gflop_per_row']:.3f} GFLOP/row, "
              f"{100 * r['utilisation']:.1f}% of the matmul rate", flush=True)  # fmt: skip
    n1 = args.single_rows
    cj.attribution_graph(model, ts, ids, batch_size=1, max_feature_nodes=2, progress=False)  # compile
    g1 = cj.attribution_graph(model, ts, ids, batch_size=1, max_feature_nodes=n1, progress=False)
    per_row = g1.info["seconds"] / (n1 + len(g1.logit_tokens))
    full_rows = rows[-1]["rows"] if rows else n1
    single = dict(batch_size=1, rows_timed=n1 + len(g1.logit_tokens), s_per_row=per_row, extrapolated_graph_s=per_row * full_rows)
    best = min(rows, key=lambda r: r["warm_s"]) if rows else None
    print(f"one row per backward pass: {1e3 * per_row:.1f} ms/row -> {single['extrapolated_graph_s']:.0f} s for the graph's "
          f"{full_rows} rows" + (f" ({single['extrapolated_graph_s'] / best['warm_s']:.1f}x the best batched time)" if best else ""))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(dict(prompt=args.prompt, tokens=len(ids), transcoders=label, matmul_flops=peak,
                                                   batched=rows, single=single, cpu_count=os.cpu_count()), indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
