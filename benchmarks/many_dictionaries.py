"""N dictionaries trained together (`Stacked`: one compiled step, vmapped over the members) against the same N
trained one after another, side by side in one process, on the same batches.

Two measurements:

  * the training step: the stacked step against the N single steps (each member's own k), median of `--steps`
    timed steps after `--warmup`; and the agreement of the trajectories (every member's parameters after all
    steps against its own run's);
  * end to end, as `circuits-jax train-sae` runs it: one activation store (the model's forward over the corpus)
    shared by the N members, against N runs that each build their own; the store's cost per token is measured
    here on the real model (`--store-tokens` of SmolLM2 on the default corpus), the training from the steps above.

Throughput is dictionary-tokens per second: N x tokens / seconds for the stacked run, tokens / seconds for one
dictionary alone; the ratio is reported against N (the issue asks for at least 0.8 x N).

    .venv/bin/python benchmarks/many_dictionaries.py                          # topk, k=16,32,64, d=576 F=4608 B=1024
    .venv/bin/python benchmarks/many_dictionaries.py --width 512 --batch 128 --steps 3 --store-tokens 2048   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from circuits_jax.dictionaries import LossConfig, Stacked, TrainConfig, init_sae, init_state, make_step


def _time_steps(step, state, batches, warmup):
    times = []
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        state, stats = step(state, x, y)
        jax.block_until_ready(state)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return state, statistics.median(times)


def _store_seconds_per_token(n_tokens: int, ctx_len: int) -> float:
    """The model's forward into an activation store, per token, on SmolLM2 and the default corpus."""
    import tempfile

    import circuits_jax as cj
    from circuits_jax.dictionaries import build_store, pack_contexts, read_corpus

    model, tok = cj.load("smollm2")
    ctx = pack_contexts(tok, read_corpus("english"), ctx_len, max_contexts=n_tokens // (ctx_len - 1) + 1)
    site = ["blocks.6.hook_resid_post"]
    with tempfile.TemporaryDirectory() as d:
        chunk = 8 * (ctx_len - 1)  # one forward batch of 8 contexts a chunk
        build_store(model, ctx[:8], site, Path(d) / "warm", n_tokens=chunk, chunk_tokens=chunk, progress=False)  # compile
        t0 = time.perf_counter()
        store = build_store(model, ctx, site, Path(d) / "s", n_tokens=n_tokens, chunk_tokens=chunk, progress=False)
        return (time.perf_counter() - t0) / store.n_tokens


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="16,32,64")
    ap.add_argument("--arch", default="topk", choices=["topk", "batchtopk"])
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--store-tokens", type=int, default=32768, help="tokens of SmolLM2 forward timed for the store")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    ks = [int(k) for k in a.ks.split(",")]
    n = len(ks)
    rng = np.random.default_rng(0)
    batches = [(jnp.asarray(x), jnp.asarray(x)) for x in
               (rng.normal(size=(a.batch, a.d)).astype(np.float32) for _ in range(a.steps + a.warmup))]  # fmt: skip
    cfg = TrainConfig(n_tokens=a.batch * 10**6, batch_size=a.batch, loss=LossConfig(k_aux=256))
    dicts = [init_sae(a.d, a.width, key=jax.random.key(i), arch=a.arch, k=k, in_site="s") for i, k in enumerate(ks)]
    step = make_step(cfg)

    singles, alone_states = [], []
    for d in dicts:
        t0 = time.perf_counter()
        jax.block_until_ready(step(init_state(d, cfg), *batches[0]))
        compile_single = time.perf_counter() - t0
        state, t = _time_steps(step, init_state(d, cfg), batches, a.warmup)
        singles.append(t)
        alone_states.append(state)
    stacked = Stacked.of(dicts)
    t0 = time.perf_counter()
    jax.block_until_ready(step(init_state(stacked, cfg), *batches[0]))
    compile_stacked = time.perf_counter() - t0
    state, t_stacked = _time_steps(step, init_state(stacked, cfg), batches, a.warmup)
    diffs = []
    for alone, member in zip(alone_states, state.dictionary.unstack()):
        la, lm = jax.tree.leaves(eqx.filter(alone.dictionary, eqx.is_array)), jax.tree.leaves(eqx.filter(member, eqx.is_array))
        diffs.append(max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(la, lm)))

    t_single = statistics.mean(singles)  # one dictionary's step, the members' mean
    step_ratio = (n * a.batch / t_stacked) / (a.batch / t_single)  # dictionary-tokens/s, together vs one alone
    seq_ratio = sum(singles) / t_stacked  # together vs the N one after another
    store = _store_seconds_per_token(a.store_tokens, 128) if a.store_tokens else None
    print(f"{n} {a.arch} dictionaries (k={a.ks}), d={a.d} F={a.width} batch={a.batch}; {jax.devices()[0].device_kind}")
    print(f"  single steps (s): {', '.join(f'{t:.4f}' for t in singles)}   stacked step: {t_stacked:.4f} s")
    print(f"  compile: single {compile_single:.2f} s, stacked {compile_stacked:.2f} s")
    print(f"  training throughput together / one alone: {step_ratio:.2f} (N = {n}; 0.8 N = {0.8 * n:.1f}); "
          f"together vs the {n} one after another: {seq_ratio:.2f}x")
    print(f"  agreement: max |member - its own run| after {a.steps + a.warmup} steps: {max(diffs):.2e}")
    out = dict(ks=ks, arch=a.arch, d=a.d, width=a.width, batch=a.batch, single_step_s=singles, stacked_step_s=t_stacked,
               compile_single_s=compile_single, compile_stacked_s=compile_stacked, step_throughput_ratio=step_ratio,
               speedup_vs_sequential=seq_ratio, max_param_diff=max(diffs), device=jax.devices()[0].device_kind)  # fmt: skip
    if store is not None:
        # train-sae end to end, per training token: N runs each build a store and train one; the stacked run builds
        # one store and trains N
        alone_s = store + t_single / a.batch
        together_s = store + t_stacked / a.batch
        e2e = (n / together_s) / (1 / alone_s)
        print(f"  store (SmolLM2 forward into the store): {store * 1e6:.0f} us/token; end to end, throughput together / "
              f"one alone: {e2e:.2f} (0.8 N = {0.8 * n:.1f})")
        out.update(store_s_per_token=store, end_to_end_ratio=e2e)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
