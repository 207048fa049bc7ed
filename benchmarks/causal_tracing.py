"""Causal-tracing benchmark: `circuits_jax.causal_trace` against the same trace in TransformerLens.

Everything runs in one process on the same float32 weights. SmolLM2-135M-Instruct is loaded with
`circuits_jax.load("smollm2")`, exported with `circuits_jax.export_hf` to a temporary directory and
booted from there as a TransformerLens 4.x `TransformerBridge` in compatibility mode (patching.py's
`boot_bridge`: TransformerLens's default weight processing, which changes no result).

The trace is the one of `experiments/causal_tracing.py`: "The Eiffel Tower is located in the city of"
-> " Paris", subject "Eiffel Tower" (`cj.subject_positions`), noise `cj.default_noise(model)`, seed 0.
Both libraries use the SAME noise draws: ours (`noise_delta(jax.random.key(seed), ...)`, as `causal_trace` draws them,
[samples, T, D], zero outside the subject) converted to a torch tensor and added to TransformerLens's
`hook_embed` output. The score of (layer l, token t) is p(answer) at the last position, averaged over
the samples, after restoring the clean value at token t of
  * resid: `blocks.{l}.hook_resid_post`;
  * mlp / attn: `blocks.{j}.hook_mlp_out` / `hook_attn_out` for every j in `window_layers(l, window, L)`.

circuits_jax runs all L x T restorations of a kind in vmapped compiled chunks (one program per kind);
TransformerLens runs them the usual way, a Python loop of one `run_with_hooks` forward per restoration
with the noise samples as the batch, under `torch.inference_mode()`.

Reported per kind:
  * ours: wall time of the first `causal_trace` call (compile + run) and of a second one (steady state,
    the compiled program cached), restorations/s;
  * TransformerLens: a deterministic random subset of `--tl-max-pairs` (layer, token) pairs (all of them
    when the grid is smaller), after one untimed warm-up restoration; restorations/s and the full grid's
    time extrapolated from it;
  * the speed ratio (ours steady restorations/s / TL's), the max |difference| of p on the compared pairs,
    and achieved FLOP/s (patching.py's `layer_flop` / `unembed_flop`) as a fraction of a float32 JAX
    matmul measured in the same run (patching.py's `matmul_flops`).

    .venv/bin/python benchmarks/causal_tracing.py --json benchmarks/results/causal_tracing_cpu.json
    .venv/bin/python benchmarks/causal_tracing.py --kinds resid --samples 2 --tl-max-pairs 5   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

import circuits_jax as cj
from circuits_jax.toolshed import KINDS, noise_delta, window_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import OtherLoad, cpu_model, idle_check  # noqa: E402  (the sibling benchmarks)
from patching import git_state, dist_version, boot_bridge, layer_flop, matmul_flops, table, tl_subset, unembed_flop, wait_quiet  # noqa: E402

PROMPT, SUBJECT, ANSWER = "The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris"


# ---------------------------------------------------------------------------
# circuits_jax
# ---------------------------------------------------------------------------


def ours(model, ids, span, answer_id, kind: str, args) -> dict:
    """Two `causal_trace` calls of one kind: the first compiles, the second is the steady state."""
    kw = dict(noise=args.noise, samples=args.samples, seed=args.seed, kind=kind, window=args.window, chunk=args.chunk)
    out = {}
    for label in ("first", "second"):
        if label == "second":
            wait_quiet(args.quiet_wait)
        with OtherLoad() as load:
            t0 = time.perf_counter()
            r = cj.causal_trace(model, ids, span, answer_id, **kw)
            out[f"{label}_s"] = time.perf_counter() - t0
        out[f"{label}_other_cpu"] = load.fraction
        out[f"{label}_first_chunk_s"] = r.first_chunk_seconds
        out[f"{label}_sweep_s"] = r.seconds
    out["result"] = r
    return out


# ---------------------------------------------------------------------------
# TransformerLens
# ---------------------------------------------------------------------------


class TLTrace:
    """The corrupted run and one restoration per call, by hooks on the bridge (noise samples = the batch)."""

    def __init__(self, bridge, ids, delta: np.ndarray, answer_id: int, kind: str, window: int, n_layers: int):
        self.bridge, self.answer, self.kind, self.window, self.L = bridge, answer_id, kind, window, n_layers
        self.site = KINDS[kind]
        S = delta.shape[0]
        self.tokens = torch.tensor([list(ids)] * S, dtype=torch.int64)  # [S, T]
        self.delta = torch.from_numpy(np.array(delta, np.float32))  # [S, T, D], our draws
        names = {f"blocks.{l}.{self.site}" for l in range(n_layers)}
        with torch.inference_mode():
            logits, cache = bridge.run_with_cache(self.tokens[:1], names_filter=lambda n: n in names)
        self.clean_p = float(self.prob(logits))
        self.clean = {n: cache[n].clone() for n in names}  # [1, T, D]
        self.corrupt_p = float(self.prob(bridge.run_with_hooks(self.tokens, fwd_hooks=[("hook_embed", self.add_noise)])))

    def prob(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of p(answer) at the last position."""
        return torch.softmax(logits[:, -1].float(), dim=-1)[:, self.answer].mean()

    def add_noise(self, act, hook):
        return act + self.delta

    def restorer(self, name: str, t: int):
        clean = self.clean[name][:, t]

        def hook(act, hook):
            act = act.clone()
            act[:, t] = clean
            return act

        return hook

    def layers(self, layer: int) -> range:
        return range(layer, layer + 1) if self.kind == "resid" else range(*window_layers(layer, self.window, self.L))

    def __call__(self, layer: int, t: int) -> float:
        hooks = [("hook_embed", self.add_noise)]
        hooks += [(f"blocks.{j}.{self.site}", self.restorer(f"blocks.{j}.{self.site}", t)) for j in self.layers(layer)]
        return float(self.prob(self.bridge.run_with_hooks(self.tokens, fwd_hooks=hooks)))


def tl(bridge, ids, delta, answer_id, kind, args, L, T, seed) -> dict:
    """TransformerLens on a deterministic subset of the (layer, token) grid, after one untimed restoration."""
    flat = tl_subset((L, T), args.tl_max_pairs, seed)
    pairs = np.stack(np.unravel_index(flat, (L, T)), axis=1)
    with torch.inference_mode():
        trace = TLTrace(bridge, ids, delta, answer_id, kind, args.window, L)
        trace(int(pairs[0, 0]), int(pairs[0, 1]))  # warm-up
        wait_quiet(args.quiet_wait)
        with OtherLoad() as load:
            t0 = time.perf_counter()
            p = np.array([trace(int(l), int(t)) for l, t in pairs], np.float64)
            seconds = time.perf_counter() - t0
    return dict(flat=flat, p=p, seconds=seconds, n=len(flat), other_cpu=load.fraction, clean=trace.clean_p, corrupt=trace.corrupt_p)


# ---------------------------------------------------------------------------
# One kind, both libraries
# ---------------------------------------------------------------------------


def bench_kind(kind, model, bridge, ids, span, answer_id, delta, peak, args, seed) -> dict:
    cfg, T, L, S = model.cfg, len(ids), model.cfg.n_layers, args.samples
    o = ours(model, ids, span, answer_id, kind, args)
    r = o.pop("result")
    t = tl(bridge, ids, delta, answer_id, kind, args, L, T, seed)
    n = L * T
    chunk = args.chunk or -(-n // -(-n // 64))  # causal_trace's default chunk
    chunk = max(1, min(chunk, n))
    n_run = -(-n // chunk) * chunk  # restorations executed, padding included
    tl_per_restoration = S * (L * layer_flop(cfg, T) + unembed_flop(cfg, T))  # TL: every layer, every position unembedded
    # useful: what a restoration needs, the layers from the lowest restored one up (below it the corrupted run's
    # cached values serve every restoration). Ours: the grid runs layer-major in chunks, each chunk from its
    # lowest restored layer (causal_trace's start layer), the last position unembedded, padding included.
    low = lambda l: l if kind == "resid" else window_layers(l, args.window, L)[0]  # noqa: E731
    useful = S * sum(T * ((L - low(l)) * layer_flop(cfg, T) + unembed_flop(cfg, 1)) for l in range(L))
    rows_l = [i // T for i in range(n)] + [(n - 1) // T] * (n_run - n)  # the layer of every executed row
    executed = S * sum(chunk * ((L - low(min(rows_l[c : c + chunk]))) * layer_flop(cfg, T) + unembed_flop(cfg, 1))
                       for c in range(0, n_run, chunk))  # fmt: skip
    tl_s = t["seconds"] / t["n"]
    row = dict(
        kind=kind, site=KINDS[kind], window=r.window, grid=[L, T], n_pairs=n, chunk=chunk, n_executed=n_run,
        samples=S, ours_first_s=o["first_s"], ours_second_s=o["second_s"],
        ours_first_chunk_s=o["first_first_chunk_s"], ours_second_first_chunk_s=o["second_first_chunk_s"],
        ours_rps=n / o["second_s"], ours_rps_first=n / o["first_s"],
        tl_pairs_timed=t["n"], tl_s=t["seconds"], tl_ms_per_pair=1e3 * tl_s, tl_rps=1 / tl_s, tl_full_grid_s_est=tl_s * n,
        ours_clean=r.clean, ours_corrupt=r.corrupt, tl_clean=t["clean"], tl_corrupt=t["corrupt"],
        max_abs_diff=float(np.max(np.abs(r.scores.reshape(-1)[t["flat"]] - t["p"]))),
        abs_diff_clean=abs(r.clean - t["clean"]), abs_diff_corrupt=abs(r.corrupt - t["corrupt"]),
        peak=list(r.peak()), flop_ours_call=executed, flop_useful_call=useful, flop_tl_per_pair=tl_per_restoration,
        other_cpu_ours=o["second_other_cpu"], other_cpu_tl=t["other_cpu"],
        other_cpu=max(v or 0.0 for v in (o["first_other_cpu"], o["second_other_cpu"], t["other_cpu"])),
        ours_scores=np.round(r.scores, 6).tolist(), tl_indices=t["flat"].tolist(), tl_scores=t["p"].tolist(),
    )  # fmt: skip
    row["speedup"] = row["ours_rps"] / row["tl_rps"]
    row["frac_peak_ours"] = row["flop_ours_call"] / o["second_s"] / peak
    row["executed_over_useful"] = row["flop_ours_call"] / useful
    row["frac_peak_tl"] = tl_per_restoration / tl_s / peak
    return row


COLUMNS = [  # (header, key, format)
    ("kind", "kind", "{}"),
    ("grid", "grid", "{}"),
    ("window", "window", "{}"),
    ("ours 1st s", "ours_first_s", "{:.1f}"),
    ("ours 2nd s", "ours_second_s", "{:.1f}"),
    ("ours restor./s", "ours_rps", "{:.2f}"),
    ("TL pairs", "tl_pairs_timed", "{:d}"),
    ("TL ms/restor.", "tl_ms_per_pair", "{:.0f}"),
    ("TL restor./s", "tl_rps", "{:.2f}"),
    ("TL grid s (est.)", "tl_full_grid_s_est", "{:.0f}"),
    ("ours/TL", "speedup", "{:.2f}x"),
    ("max abs diff p", "max_abs_diff", "{:.1e}"),
    ("ours %mm", "frac_peak_ours", "{:.0%}"),
    ("ours exec./useful FLOP", "executed_over_useful", "{:.2f}"),
    ("TL %mm", "frac_peak_tl", "{:.0%}"),
    ("other CPU", "other_cpu", "{:.0%}"),
]


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS), help="kinds to trace (default: all)")
    p.add_argument("--samples", type=int, default=5, help="noise draws = the batch of every restoration (default 5)")
    p.add_argument("--window", type=int, default=10, help="layers restored per mlp/attn score (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=None, help="noise std (default cj.default_noise(model))")
    p.add_argument("--chunk", type=int, default=None, help="restorations per compiled call (default causal_trace's)")
    p.add_argument("--tl-max-pairs", type=int, default=60,
                   help="TransformerLens runs at most this many (layer, token) pairs per kind, a fixed random subset (default 60)")  # fmt: skip
    p.add_argument("--matmul", type=int, default=2048, help="n of the n x n float32 reference matmul")
    p.add_argument("--quiet-wait", type=float, default=5.0,
                   help="before each steady-state timing wait up to this many s for other processes to go idle")  # fmt: skip
    p.add_argument("--json", type=Path, help="write everything to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    env = dict(cpu=cpu_model(), jax=jax.__version__, jax_devices=[str(d) for d in jax.devices()],
               torch=torch.__version__, torch_threads=torch.get_num_threads(),
               transformer_lens=dist_version("transformer-lens"), transformers=transformers.__version__,
               other_cpu_before=idle_check(2.0), argv=sys.argv, git=git_state())  # fmt: skip
    print(f"CPU: {env['cpu']}; jax {env['jax']} on {', '.join(env['jax_devices'])}; torch {env['torch']} "
          f"({env['torch_threads']} threads); transformer-lens {env['transformer_lens']}; circuits_jax at {env['git']}")  # fmt: skip
    print(f"CPU used by other processes before the start: {env['other_cpu_before']:.0%}")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model, tok = cj.load("smollm2")
        bridge = boot_bridge(model, tok, tmp)
        setup_s = time.perf_counter() - t0
    ids = tok.encode(PROMPT)
    span = cj.subject_positions(tok, ids, SUBJECT)
    answer_id = tok.to_single_token(ANSWER)
    cfg, T = model.cfg, len(ids)
    args.noise = cj.default_noise(model) if args.noise is None else args.noise
    delta = np.asarray(noise_delta(jax.random.key(args.seed), args.samples, T, cfg.d_model, span, args.noise))
    print(f"prompt {PROMPT!r} -> {ANSWER!r}: {tok.to_str_tokens(ids)}; subject {SUBJECT!r} at {span}; "
          f"noise {args.noise:.4f}, {args.samples} samples, seed {args.seed}; L={cfg.n_layers} (setup {setup_s:.0f} s)")  # fmt: skip

    mm = matmul_flops(args.matmul, 10, args.quiet_wait)
    print(f"matmul {mm['n']}^3 float32 in JAX: best {mm['flops'] / 1e9:.1f} GFLOP/s of 10 (the %mm reference), "
          f"median {mm['median_flops'] / 1e9:.1f}; other processes' CPU {mm['other_cpu']:.0%}")

    rows = []
    for i, kind in enumerate(args.kinds):
        row = bench_kind(kind, model, bridge, ids, span, answer_id, delta, mm["flops"], args, seed=i)
        rows.append(row)
        print(f"  {kind}: ours 1st {row['ours_first_s']:.1f} s, 2nd {row['ours_second_s']:.1f} s ({row['n_pairs']} pairs, "
              f"chunk {row['chunk']}); TL {row['tl_ms_per_pair']:.0f} ms/restoration over {row['tl_pairs_timed']}; "
              f"clean p ours {row['ours_clean']:.5f} / TL {row['tl_clean']:.5f}, corrupt {row['ours_corrupt']:.5f} / "
              f"{row['tl_corrupt']:.5f}; max|diff| {row['max_abs_diff']:.1e}; other CPU {row['other_cpu']:.0%}", flush=True)  # fmt: skip
    print()
    print(table(rows, COLUMNS))
    print(
        "\nrestor./s: (layer, token) restorations per second, each a batch of the noise samples (ours: the second, "
        "steady-state call over the whole grid; TL: the timed subset). TL grid s: the whole grid at TL's rate. "
        "ours/TL: ours restor./s over TL's (> 1: ours faster). max abs diff p: on the TL-compared pairs. "
        "%mm: executed FLOP/s (layer_flop / unembed_flop; ours unembeds the last position, TL all) as a fraction of "
        "the JAX matmul rate. exec./useful FLOP: ours runs each chunk from its lowest restored layer (padding included); "
        "a restoration needs only the layers from its own lowest restored one up. other CPU: the most other processes took during that row's timings."
    )

    env["total_s"] = time.perf_counter() - t_start
    env["load_average_end"] = os.getloadavg()
    print(f"\ntotal {env['total_s']:.0f} s")
    if any(r["other_cpu"] > 0.1 for r in rows):
        print("WARNING: other processes used over 10% of the CPUs during some timings; rerun on a quiet machine.")
    results = dict(env=env, prompt=dict(prompt=PROMPT, subject=SUBJECT, answer=ANSWER, answer_id=answer_id,
                                        str_tokens=tok.to_str_tokens(ids), subject_span=list(span)),
                   noise=args.noise, samples=args.samples, window=args.window, seed=args.seed,
                   matmul=mm, kinds=rows)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
