"""Forward-pass benchmark: circuits_jax (JAX, jitted) against Hugging Face transformers (PyTorch).

Everything runs in one process on the same weights: SmolLM2-135M-Instruct is loaded
with `circuits_jax.load("smollm2")`, exported with `circuits_jax.export_hf` to a
temporary directory and loaded from there by `transformers.LlamaForCausalLM`
(eager attention, float32, eval mode, `torch.inference_mode`).

For every (batch, seq) shape it reports
  * JAX first call (trace + lower + compile + run) and, separately, ahead-of-time
    trace+lower and compile times (`jax.jit(f).trace(...).lower().compile()`);
  * JAX steady state (median of --repeats calls, `block_until_ready`);
  * torch steady state (median of --repeats calls after one warm-up);
  * tokens/s for both, the torch/JAX time ratio (> 1: JAX is faster);
  * the max |logit difference| between the two;
  * achieved FLOP/s of each forward as a fraction of a large float32 JAX matmul
    measured in the same run;
  * the share of the CPUs other processes used while each row was timed (from
    /proc/stat): a busy machine ruins the numbers, torch's OpenMP threads most of all.

    .venv/bin/python benchmarks/forward.py
    .venv/bin/python benchmarks/forward.py --batch 1 4 --seq 16 128 --repeats 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import circuits_jax as cj

TEXT = (
    "The quick brown fox jumps over the lazy dog. Mechanistic interpretability studies the "
    "circuits inside neural networks: attention heads that copy names, MLP neurons that store "
    "facts, and the residual stream that carries information from layer to layer."
)


# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's `model name` from /proc/cpuinfo, with the number of logical CPUs."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    names = [l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")]
    return f"{names[0] if names else 'unknown'} ({len(names)} logical CPUs)"


def system_busy_s() -> float | None:
    """CPU-seconds all processes have spent busy since boot, from /proc/stat (None where unreadable)."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = f  # guest time is already inside user
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Context manager: the share of the machine's CPU time that *other* processes took while the block ran.

    Well above 0 means something else competed for the cores and the timings are not clean; torch's
    OpenMP threads in particular slow down many-fold when one of their cores is taken. `fraction` is None
    where /proc/stat is unreadable.
    """

    def __enter__(self):
        self.busy0, self.cpu0, self.t0 = system_busy_s(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        busy1 = system_busy_s()
        if self.busy0 is None or busy1 is None:
            self.fraction = None
            return
        other = (busy1 - self.busy0) - (time.process_time() - self.cpu0)
        self.fraction = max(other, 0.0) / (wall * (os.cpu_count() or 1))


def idle_check(seconds: float = 1.0) -> float | None:
    """Share of the CPUs other processes used over `seconds` while this one slept."""
    with OtherLoad() as load:
        time.sleep(seconds)
    return load.fraction


def load_models(tmp: str):
    """(jax model, tokenizer, torch model) holding the same float32 weights."""
    model, tok = cj.load("smollm2")
    cj.export_hf(model, tmp)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    return model, tok, hf


def make_tokens(tok, batch: int, seq: int) -> np.ndarray:
    """int32 [batch, seq] of real text, tiled to length and rotated per row so the rows differ."""
    ids = np.asarray(tok.to_tokens(TEXT)[0])
    ids = np.tile(ids, -(-(seq + batch) // len(ids)))
    return np.stack([ids[b : b + seq] for b in range(batch)]).astype(np.int32)


# ---------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------


def timings(fn, repeats: int) -> list[float]:
    """Wall-clock seconds of each of `repeats` calls of `fn()` (fn must block until done)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn, repeats: int) -> float:
    """Median of `timings(fn, repeats)`."""
    return statistics.median(timings(fn, repeats))


def forward_fn():
    """A fresh jitted forward: a new function object, so nothing is reused from an earlier compile."""
    return jax.jit(lambda m, t: m(t))


def warm_up_jax(model) -> float:
    """Seconds of the process's first jitted forward (B=1, T=2): one-time JAX/equinox set-up plus a small compile.

    Done before the table so that the first shape's numbers are not inflated by it.
    """
    t0 = time.perf_counter()
    forward_fn()(model, jnp.zeros((1, 2), jnp.int32)).block_until_ready()
    return time.perf_counter() - t0


def time_jax(model, tokens: np.ndarray, repeats: int) -> dict:
    tokens = jnp.asarray(tokens)
    fwd = forward_fn()
    t0 = time.perf_counter()
    logits = fwd(model, tokens).block_until_ready()
    first_call = time.perf_counter() - t0

    aot = forward_fn()  # the same work split into phases, ahead of time
    t0 = time.perf_counter()
    lowered = aot.trace(model, tokens).lower()
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()

    times = timings(lambda: fwd(model, tokens).block_until_ready(), repeats)
    return dict(
        first_call_s=first_call, trace_lower_s=t1 - t0, compile_s=t2 - t1, times=times, logits=np.asarray(logits)
    )


def time_torch(hf, tokens: np.ndarray, repeats: int) -> dict:
    ids = torch.from_numpy(tokens.astype(np.int64))

    def fwd():
        return hf(input_ids=ids, use_cache=False).logits

    with torch.inference_mode():
        logits = fwd()  # warm-up
        times = timings(fwd, repeats)
    return dict(times=times, logits=logits.numpy())


def matmul_flops(n: int, repeats: int) -> dict:
    """FLOP/s of an n x n @ n x n float32 matmul (2 n^3 FLOP) in JAX, and in torch for reference."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32)
    b = jax.random.normal(key_b, (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    jax_s = median_time(lambda: mm(a, b).block_until_ready(), repeats)
    ta, tb = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))  # writable copies
    with torch.inference_mode():
        ta @ tb
        torch_s = median_time(lambda: ta @ tb, repeats)
    flop = 2 * n**3
    return dict(n=n, jax_s=jax_s, jax_flops=flop / jax_s, torch_s=torch_s, torch_flops=flop / torch_s)


# ---------------------------------------------------------------------------
# FLOP count
# ---------------------------------------------------------------------------


def forward_flop(cfg, batch: int, seq: int) -> int:
    """Multiply-add FLOP of one forward pass (elementwise work — norms, RoPE, softmax, SiLU — is ignored).

    FLOP = B*T * (2*P + 2*D*V) + B*L * 4*H*E*T^2, where
      P       = L * (D*H*E + 2*D*K*E + H*E*D + 3*D*M)   non-embedding matmul parameters
                 (W_Q, W_K + W_V, W_O, and the gated MLP's gate, up and down projections);
      2*D*V   = the unembedding per token (the embedding is a gather, 0 FLOP);
      4*H*E*T^2 per layer and sequence = Q K^T (2*H*T*T*E) plus pattern @ V (2*H*T*T*E),
                 counted over the full T x T square because both implementations compute it
                 (the causal mask zeroes half of it; the useful work is about half this term).
    """
    L, D, H, K, E, M, V = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    params = L * (D * H * E + 2 * D * K * E + H * E * D + 3 * D * M)
    return batch * seq * (2 * params + 2 * D * V) + batch * L * 4 * H * E * seq * seq


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def bench_shape(model, tok, hf, batch: int, seq: int, repeats: int, peak: float) -> dict:
    tokens = make_tokens(tok, batch, seq)
    with OtherLoad() as jax_load:
        j = time_jax(model, tokens, repeats)
    with OtherLoad() as torch_load:
        t = time_torch(hf, tokens, repeats)
    flop = forward_flop(model.cfg, batch, seq)
    n_tok = batch * seq
    j["steady_s"], t["steady_s"] = statistics.median(j["times"]), statistics.median(t["times"])
    return dict(
        batch=batch,
        seq=seq,
        flop=flop,
        jax_first_call_s=j["first_call_s"],
        jax_trace_lower_s=j["trace_lower_s"],
        jax_compile_s=j["compile_s"],
        jax_steady_ms=1e3 * j["steady_s"],
        torch_steady_ms=1e3 * t["steady_s"],
        jax_min_ms=1e3 * min(j["times"]),
        torch_min_ms=1e3 * min(t["times"]),
        torch_over_jax=t["steady_s"] / j["steady_s"],
        jax_tok_s=n_tok / j["steady_s"],
        torch_tok_s=n_tok / t["steady_s"],
        jax_frac_peak=flop / j["steady_s"] / peak,
        torch_frac_peak=flop / t["steady_s"] / peak,
        max_abs_diff=float(np.max(np.abs(j["logits"] - t["logits"]))),
        max_abs_logit=float(np.max(np.abs(t["logits"]))),
        other_cpu_jax=jax_load.fraction,
        other_cpu_torch=torch_load.fraction,
        other_cpu=max(jax_load.fraction or 0.0, torch_load.fraction or 0.0),
    )


COLUMNS = [  # (header, key, format)
    ("B", "batch", "{:d}"),
    ("T", "seq", "{:d}"),
    ("jax 1st call s", "jax_first_call_s", "{:.2f}"),
    ("jax compile s", "jax_compile_s", "{:.2f}"),
    ("jax ms", "jax_steady_ms", "{:.1f}"),
    ("torch ms", "torch_steady_ms", "{:.1f}"),
    ("torch/jax", "torch_over_jax", "{:.2f}"),
    ("jax tok/s", "jax_tok_s", "{:.0f}"),
    ("torch tok/s", "torch_tok_s", "{:.0f}"),
    ("jax %mm", "jax_frac_peak", "{:.0%}"),
    ("torch %mm", "torch_frac_peak", "{:.0%}"),
    ("max|dlogit|", "max_abs_diff", "{:.1e}"),
    ("other CPU", "other_cpu", "{:.0%}"),
]


def table(rows: list[dict], columns=None, *, left: tuple[str, ...] = ()) -> str:
    """A Markdown table of `rows` with `(header, key, format)` columns (default: this file's);
    columns whose key is in `left` are left-aligned (the sibling benchmarks use it too)."""
    columns = COLUMNS if columns is None else columns
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    rule = "|" + "|".join(":---" if k in left else "---:" for _, k, _ in columns) + "|"
    body = ["| " + " | ".join(f.format(r[k]) for _, k, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes (default: 1 4)")
    p.add_argument("--seq", type=int, nargs="+", default=[16, 128], help="sequence lengths (default: 16 128)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement; the median is reported")
    p.add_argument("--matmul", type=int, default=2048, help="n of the n x n float32 reference matmul")
    p.add_argument("--json", type=Path, help="write the results to this JSON file")
    return p.parse_args(argv)


def environment(args) -> dict:
    env = dict(
        cpu=cpu_model(),
        jax=jax.__version__,
        jax_devices=[str(d) for d in jax.devices()],
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        transformers=transformers.__version__,
        repeats=args.repeats,
        other_cpu_before=idle_check(),
    )
    print(f"CPU: {env['cpu']}")
    print(f"jax {env['jax']} on {', '.join(env['jax_devices'])}")
    print(f"torch {env['torch']} with {env['torch_threads']} threads; transformers {env['transformers']}")
    if env["other_cpu_before"] is not None:
        print(f"CPU used by other processes before the start: {env['other_cpu_before']:.0%}")
    return env


def reference_matmul(n: int, repeats: int) -> dict:
    with OtherLoad() as load:
        mm = matmul_flops(n, repeats)
    mm["other_cpu"] = load.fraction
    print(
        f"matmul {n}x{n} @ {n}x{n} float32: jax {mm['jax_flops'] / 1e9:.1f} GFLOP/s ({1e3 * mm['jax_s']:.1f} ms), "
        f"torch {mm['torch_flops'] / 1e9:.1f} GFLOP/s ({1e3 * mm['torch_s']:.1f} ms)"
        + (f"; other processes' CPU {mm['other_cpu']:.0%}" if mm["other_cpu"] is not None else "")
    )
    return mm


def run_shapes(model, tok, hf, args, peak: float) -> list[dict]:
    rows = []
    for batch in args.batch:
        for seq in args.seq:
            row = bench_shape(model, tok, hf, batch, seq, args.repeats, peak)
            rows.append(row)
            print(
                f"  B={batch} T={seq}: jax first call {row['jax_first_call_s']:.2f} s "
                f"(trace+lower {row['jax_trace_lower_s']:.2f} s, compile {row['jax_compile_s']:.2f} s), "
                f"jax {row['jax_steady_ms']:.1f} ms, torch {row['torch_steady_ms']:.1f} ms",
                flush=True,
            )
    return rows


def report(rows: list[dict], mm: dict) -> None:
    print()
    print(table(rows))
    print(
        "\njax %mm / torch %mm: the forward's FLOP/s (see forward_flop) as a fraction of the JAX matmul rate above; "
        f"max|dlogit| is against logits up to {max(r['max_abs_logit'] for r in rows):.1f} in magnitude; "
        "other CPU is the share of the machine other processes used while that row was timed."
    )
    if any(r["other_cpu"] > 0.1 for r in rows) or (mm["other_cpu"] or 0) > 0.1:
        print("WARNING: other processes used over 10% of the CPUs during some measurements; rerun on a quiet machine.")


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    env = environment(args)
    with tempfile.TemporaryDirectory() as tmp:
        model, tok, hf = load_models(tmp)
    print(f"model: SmolLM2-135M-Instruct, L={model.cfg.n_layers} D={model.cfg.d_model}, float32 in both")
    mm = reference_matmul(args.matmul, args.repeats)
    warm = warm_up_jax(model)
    print(f"first jitted forward of the process (B=1 T=2, one-time set-up + compile): {warm:.2f} s")
    rows = run_shapes(model, tok, hf, args, mm["jax_flops"])
    report(rows, mm)

    env["load_average_end"] = os.getloadavg()
    env["total_s"] = time.perf_counter() - t_start
    print(f"total {env['total_s']:.0f} s")
    results = dict(env=env, matmul=mm, jax_process_warm_up_s=warm, shapes=rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
