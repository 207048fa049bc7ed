"""Scaling benchmark (issue 10): sweeps and SAE training against device count, compile time against depth.

The process gives itself 8 CPU devices (`jax_num_cpu_devices`, set before JAX starts) and builds
every mesh from them with `circuits_jax.make_mesh`, so 1-, 2-, 4- and 8-device runs come from one
process and one set of weights. On a CPU those devices are simulated: they share the machine's
cores (2 on the development box), so no speed-up is expected; the numbers show what partitioning
costs and that the sharded results agree with the unsharded ones. On a real multi-GPU host the
same script measures real scaling (`--devices` the host's count).

Three parts, each optional (`--parts`):

1. **sweep** — `patch_sweep` of SmolLM2-135M-Instruct on an IOI batch (`ioi_task`, 8 pairs),
   `resid_pre` by (layer, pos) over layers 24-29 (90 patches, every one run: `skip_unchanged=False`,
   a fixed `--chunk` that every mesh divides, so each mesh does the same work). For each mesh
   (`sweep x data x model`, e.g. 1, 2, 4, 8, 4x2): first call (compile + run) and the median of
   `--repeats` steady-state calls, patches/s, the max |difference| of the raw metric against the
   unsharded run, executed FLOP/s as a share of a float32 matmul measured in the same run, and XLA's
   own FLOP count per device of the chunk program as partitioned for that mesh (`cost_analysis`: it
   shows the work is split, whatever the wall clock of simulated devices does).
   The peer: TransformerLens's `get_act_patch_resid_pre` (one hooked forward of the whole batch per
   patch) on a `TransformerBridge` over the same weights (`patching.boot_bridge`), on a
   deterministic subset of the same patches, with its ratio and agreement.
2. **sae** — `train_sae` of a TopK SAE (d_in 576, width 4608, k 32, batch 4096) on a small real
   activation store (SmolLM2 `blocks.6.hook_resid_post` over the `pydoc-topics` corpus) for meshes
   `data x model` (1, 2, 4, 8, 4x2): tokens/s from the per-step times (`log_every=1`, so every step
   is waited for; the first step, which compiles, is reported apart), the matmul FLOP/s share, and
   the max |difference| of the final parameters against the 1-device run. The peer: the PyTorch
   implementation of the same step from `sae_training.py` (`TorchSAE`) on the same batches and
   learning rates, with its ratio and parameter agreement.
3. **compile** — compile seconds against depth for a fixed-width Llama-style config (d_model 256,
   4 heads, d_mlp 1024, vocab 4096) at 2 ... 64 layers: the forward
   (`jax.jit(lambda m, t: run(m, t).logits)`) and one patching chunk program (`core.score_chunk`, the
   program `patch_sweep` compiles), on `jax.eval_shape` models (nothing is materialised), with the
   size of the lowered StableHLO. `run` scans over the stacked layers, so both stay flat. The
   contrast: the same forward written as a Python loop of one-layer `run(start_layer=l,
   stop_layer=l+1)` calls, which puts one copy of the layer into the program per layer.
   `--depth-shape gemma3` runs the same on a Gemma-3-shaped config of that width (1 kv head, q/k norms,
   post-norms, GeGLU, sqrt(d_model) embedding scale, five sliding-window layers to one global, each with
   its own RoPE base): the per-layer differences are rows scanned beside the weights, so it stays flat too.

    .venv/bin/python benchmarks/scaling.py --json benchmarks/results/scaling_cpu.json
    .venv/bin/python benchmarks/scaling.py --smoke                     # a minute: small everything
    .venv/bin/python benchmarks/scaling.py --parts compile --depths 2 8 32
    .venv/bin/python benchmarks/scaling.py --parts compile --depth-shape gemma3 --depths 2 8 32 --unrolled-max-depth 8
"""

from __future__ import annotations

import argparse
import os
import sys


def _devices_arg(argv) -> int:
    """`--devices N` read before JAX starts (the CPU device count cannot change afterwards)."""
    argv = sys.argv[1:] if argv is None else argv
    for i, a in enumerate(argv):
        if a == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--devices="):
            return int(a.split("=", 1)[1])
    return 8


import jax  # noqa: E402

if __name__ == "__main__":  # before anything touches the devices
    jax.config.update("jax_num_cpu_devices", _devices_arg(None))

import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import circuits_jax as cj  # noqa: E402
from circuits_jax.core import score_chunk  # noqa: E402  (the chunk program patch_sweep compiles)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import OtherLoad, cpu_model, idle_check, table  # noqa: E402  (the sibling benchmarks)
from patching import git_state, quiet_tqdm, dist_version, layer_flop, wait_quiet, matmul_flops, ours_flop, tl_flop, tl_subset  # noqa: E402

SWEEP_LAYERS = range(24, 30)
SAE_SITE = "blocks.6.hook_resid_post"


# ---------------------------------------------------------------------------
# Meshes
# ---------------------------------------------------------------------------


def parse_mesh(spec: str, axes: tuple[str, ...]) -> dict[str, int]:
    """'4x2' -> {axes[0]: 4, axes[1]: 2} (missing sizes are 1); '1' -> one device."""
    try:
        sizes = [int(s) for s in spec.lower().split("x")]
    except ValueError:
        sizes = []
    if not sizes or len(sizes) > len(axes) or min(sizes) < 1:
        raise SystemExit(f"mesh {spec!r}: give up to {len(axes)} positive sizes joined by 'x' for {' x '.join(axes)}, e.g. 4x2")
    return {a: (sizes[i] if i < len(sizes) else 1) for i, a in enumerate(axes)}


def build_mesh(sizes: dict[str, int]):
    n = int(np.prod(list(sizes.values())))
    if n > len(jax.devices()):
        raise SystemExit(f"mesh {sizes} needs {n} devices; this process has {len(jax.devices())} (see --devices)")
    return cj.make_mesh(sweep=sizes.get("sweep", 1), data=sizes.get("data", 1), model=sizes.get("model", 1))


def mesh_label(sizes: dict[str, int]) -> str:
    return " x ".join(f"{a} {s}" for a, s in sizes.items() if s > 1) or "1 device"


def n_devices(sizes: dict[str, int]) -> int:
    return int(np.prod(list(sizes.values())))


# ---------------------------------------------------------------------------
# 1. Patching sweep throughput
# ---------------------------------------------------------------------------


class TorchIOI:
    """The IOI batch for TransformerLens: int64 tokens and the same mean logit difference at the scored positions."""

    def __init__(self, task):
        import torch

        self.corrupt_t = torch.from_numpy(np.asarray(task.corrupt, np.int64))
        self.clean_t = torch.from_numpy(np.asarray(task.clean, np.int64))
        B, T = task.clean.shape
        self.pos = torch.from_numpy(np.full(B, T - 1) if task.answer_pos is None else np.asarray(task.answer_pos, np.int64))
        self.answers = torch.from_numpy(np.asarray(task.answers, np.int64))
        self.wrong = torch.from_numpy(np.asarray(task.wrong, np.int64))
        self.rows = torch.arange(B)

    def torch_metric(self, logits):
        at = logits[self.rows, self.pos]
        return (at[self.rows, self.answers] - at[self.rows, self.wrong]).mean()


def sweep_once(model, task, mesh, chunk: int):
    return cj.patch_sweep(model, task.clean, task.corrupt, task.metric, "resid_pre", ("layer", "pos"),
                          attention_mask=task.attention_mask, answer_pos=task.answer_pos, chunk_size=chunk,
                          skip_unchanged=False, layers=SWEEP_LAYERS, progress=False, mesh=mesh)  # fmt: skip


def bench_sweep_mesh(model, task, sizes, chunk: int, repeats: int, quiet_wait: float) -> dict:
    mesh = None if sizes is None else build_mesh(sizes)
    with OtherLoad() as first_load:
        t0 = time.perf_counter()
        r = sweep_once(model, task, mesh, chunk)
        first = time.perf_counter() - t0
    times, loads = [], []
    wait_quiet(quiet_wait)
    for _ in range(repeats):
        with OtherLoad() as load:
            t0 = time.perf_counter()
            r2 = sweep_once(model, task, mesh, chunk)
            times.append(time.perf_counter() - t0)
        loads.append(load.fraction or 0.0)
    if not np.array_equal(r.raw, r2.raw):
        print(f"  note: {mesh_label(sizes) if sizes else 'no mesh'}: repeated calls differ by {np.max(np.abs(r.raw - r2.raw)):.1e}")
    return dict(first_s=first, steady_s=statistics.median(times), times=times, raw=r.raw, chunk=r.chunk_size,
                clean=r.clean_metric, corrupt=r.corrupt_metric, other_cpu=max(loads + [first_load.fraction or 0.0]))  # fmt: skip


def bench_tl(model, tok, task, n_patches: int, quiet_wait: float, seed: int = 0) -> dict:
    """TransformerLens's resid_pre patching on a subset of the sweep's (layer, pos) entries."""
    import pandas as pd
    import torch
    from patching import boot_bridge
    from transformer_lens import patching

    t = TorchIOI(task)
    T = task.clean.shape[1]
    L0 = SWEEP_LAYERS[0]
    local = tl_subset((len(SWEEP_LAYERS), T), n_patches, seed)  # indices into our [6, T] grid
    layer, pos = np.unravel_index(local, (len(SWEEP_LAYERS), T))
    df = pd.DataFrame(np.stack([layer + L0, pos], axis=1), columns=["layer", "pos"])
    with tempfile.TemporaryDirectory() as tmp:
        bridge = boot_bridge(model, tok, tmp)
    with torch.inference_mode(), quiet_tqdm(patching):
        clean_logits, clean_cache = bridge.run_with_cache(t.clean_t)
        corrupt_logits = bridge(t.corrupt_t)

        def call(rows):
            return patching.get_act_patch_resid_pre(bridge, t.corrupt_t, clean_cache, t.torch_metric,
                                                    index_axis_names=None, index_df=rows)  # fmt: skip

        call(df.iloc[:1])  # warm-up
        wait_quiet(quiet_wait)
        with OtherLoad() as load:
            t0 = time.perf_counter()
            raw = call(df).numpy()
            seconds = time.perf_counter() - t0
    return dict(local=local, raw=raw, seconds=seconds, n=len(local), other_cpu=load.fraction or 0.0,
                clean=float(t.torch_metric(clean_logits)), corrupt=float(t.torch_metric(corrupt_logits)))  # fmt: skip


def chunk_cost(model, task, sizes, chunk: int) -> dict:
    """XLA's own count for the sweep's first chunk program as partitioned for `sizes` (None: unsharded):
    FLOP and bytes per device (`cost_analysis`, a `while` body counted once, so compare across meshes, not
    with `ours_flop`) and the collectives in it. Placed like `patch_sweep` places its inputs; compile only."""
    from circuits_jax import scale as sh
    B, T = task.clean.shape
    L, D = model.cfg.n_layers, model.cfg.d_model
    rows = np.stack([np.repeat(np.asarray(SWEEP_LAYERS), T), np.tile(np.arange(T), len(SWEEP_LAYERS))], 1)[:chunk]
    rows = rows.astype(np.int32)
    pos = jnp.asarray(task.answer_pos if task.answer_pos is not None else np.full(B, T - 1), jnp.int32)
    stack = jnp.zeros((L, B, T, D), jnp.float32)
    m, tokens, metric, rows_in = model, jnp.asarray(task.corrupt), task.metric, jnp.asarray(rows)
    if sizes is not None:
        mesh = build_mesh(sizes)
        m, metric = sh.shard_model(model, mesh), sh.replicate(task.metric, mesh)
        tokens, pos, rows_in = sh.shard_batch(task.corrupt, mesh), sh.shard_batch(pos, mesh), sh.shard_rows(rows, mesh)

    def prog(m, tokens, positions, resid, source, metric, start, rows):
        return score_chunk(m, tokens, None, positions, resid, source, metric, start, rows, "hook_resid_pre", (0,), (T, D))

    compiled = jax.jit(prog).lower(m, tokens, pos, stack, stack, metric, jnp.int32(rows[0, 0]), rows_in).compile()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    text = compiled.as_text()
    return dict(xla_gflop_per_device=float(cost.get("flops", float("nan"))) / 1e9,
                xla_gbytes_per_device=float(cost.get("bytes accessed", float("nan"))) / 1e9,
                collectives={op: text.count(op + "(") + text.count(op + "-start(") for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute")})  # fmt: skip


def part_sweep(model, tok, args, peak: float) -> dict:
    task = cj.ioi_task(tok, n=args.pairs)
    B, T = task.clean.shape
    if task.attention_mask is not None and not np.asarray(task.attention_mask).all():
        raise SystemExit("the IOI batch is padded; TransformerLens's loop here assumes unpadded prompts")
    cfg = model.cfg
    n_patches = len(SWEEP_LAYERS) * T
    chunk = args.chunk
    print(f"\n== 1. patch_sweep resid_pre by (layer, pos), layers {SWEEP_LAYERS[0]}-{SWEEP_LAYERS[-1]}, IOI {B} pairs x {T} "
          f"tokens: {n_patches} patches, chunk {chunk}, every patch run (skip_unchanged=False)")  # fmt: skip
    run_layers = np.repeat(np.asarray(SWEEP_LAYERS), T)
    flop = ours_flop(cfg, T, run_layers, chunk)
    executed = B * flop["executed"]  # ours_flop counts one sequence

    ref = bench_sweep_mesh(model, task, None, chunk, args.repeats, args.quiet_wait)
    if args.xla_cost:
        ref.update(chunk_cost(model, task, None, chunk))
    rows = [dict(mesh="no mesh", devices=1, **_sweep_row(ref, ref, n_patches, executed, peak))]
    print(_sweep_line(rows[-1]), flush=True)
    for spec in args.sweep_meshes:
        sizes = parse_mesh(spec, ("sweep", "data", "model"))
        if chunk % sizes["sweep"] or B % sizes["data"] or n_devices(sizes) > len(jax.devices()):
            print(f"  skip mesh {spec}: chunk {chunk} / {B} prompts do not divide over it, or it needs more than "
                  f"the {len(jax.devices())} devices")  # fmt: skip
            continue
        got = bench_sweep_mesh(model, task, sizes, chunk, args.repeats, args.quiet_wait)
        if args.xla_cost:
            got.update(chunk_cost(model, task, sizes, chunk))
        rows.append(dict(mesh=mesh_label(sizes), devices=n_devices(sizes), **_sweep_row(got, ref, n_patches, executed, peak)))
        print(_sweep_line(rows[-1]), flush=True)

    tl = None
    if args.tl_patches > 0:
        tl = bench_tl(model, tok, task, args.tl_patches, args.quiet_wait)
        ours = ref["raw"].reshape(-1)[tl["local"]]
        tl_pps = tl["n"] / tl["seconds"]
        tl_flops = B * tl_flop(cfg, T) * tl_pps
        tl.update(pps=tl_pps, frac_mm=tl_flops / peak, max_abs_diff=float(np.max(np.abs(ours - tl["raw"]))),
                  ms_per_patch=1e3 * tl["seconds"] / tl["n"])  # fmt: skip
        for r in rows:
            r["over_tl"] = r["pps"] / tl_pps
        rows.append(dict(mesh="TransformerLens loop", devices=1, first_s=float("nan"), compile_s=float("nan"), steady_s=tl["seconds"] / tl["n"] * n_patches,
                         pps=tl_pps, frac_mm=tl["frac_mm"], max_abs_diff=tl["max_abs_diff"], over_tl=1.0,
                         xla_gflop_per_device=float("nan"),
                         other_cpu=tl["other_cpu"], est=True))  # fmt: skip
        print(f"  TransformerLens: {tl['ms_per_patch']:.0f} ms/patch over {tl['n']} patches (whole batch per patch); "
              f"max|Δraw| vs ours {tl['max_abs_diff']:.1e}; clean/corrupt metric {tl['clean']:.3f}/{tl['corrupt']:.3f}")  # fmt: skip
        tl = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in tl.items()}
    print()
    print(table(rows, SWEEP_COLUMNS if tl else SWEEP_COLUMNS[:-2] + SWEEP_COLUMNS[-1:], left=("mesh",)))
    print(f"patches/s: {n_patches} patches / median steady-state s. Δraw: max |raw metric - no-mesh run| (TL row: against "
          f"the no-mesh run on its {args.tl_patches} patches; its s is extrapolated to all {n_patches}). %mm: executed FLOP/s "
          f"({executed / 1e9:.1f} GFLOP per sweep: {flop['layer_passes']} layer passes x {B} prompts, see ours_flop) "
          "over the JAX matmul rate. XLA GFLOP/device: cost_analysis of the first chunk's program as partitioned "
          "(it should fall as 1/devices). ×TL: patches/s over TransformerLens's.")  # fmt: skip
    return dict(pairs=B, tokens=T, layers=list(SWEEP_LAYERS), n_patches=n_patches, chunk=chunk,
                flop_executed=executed, flop_useful=B * flop["useful"], flop_tl_per_patch=B * tl_flop(cfg, T),
                layer_flop=layer_flop(cfg, T), clean_metric=ref["clean"], corrupt_metric=ref["corrupt"], rows=rows,
                transformer_lens=tl, ref_raw=ref["raw"].tolist())  # fmt: skip


def _sweep_row(got, ref, n_patches, executed, peak) -> dict:
    return dict(first_s=got["first_s"], compile_s=got["first_s"] - got["steady_s"], steady_s=got["steady_s"], times=got["times"], pps=n_patches / got["steady_s"],
                frac_mm=executed / got["steady_s"] / peak, max_abs_diff=float(np.max(np.abs(got["raw"] - ref["raw"]))),
                other_cpu=got["other_cpu"], chunk=got["chunk"], xla_gflop_per_device=got.get("xla_gflop_per_device", float("nan")),
                xla_gbytes_per_device=got.get("xla_gbytes_per_device", float("nan")), collectives=got.get("collectives"))  # fmt: skip


def _sweep_line(r) -> str:
    return (f"  {r['mesh']:<28} first call {r['first_s']:5.1f} s, steady {r['steady_s']:.2f} s ({r['pps']:.0f} patches/s, "
            f"{r['frac_mm']:.0%} of matmul), max|Δraw| {r['max_abs_diff']:.1e}, other CPU {r['other_cpu']:.0%}")  # fmt: skip


SWEEP_COLUMNS = [
    ("mesh", "mesh", "{}"),
    ("devices", "devices", "{:d}"),
    ("1st call s", "first_s", "{:.1f}"),
    ("1st − steady s", "compile_s", "{:.1f}"),
    ("steady s", "steady_s", "{:.2f}"),
    ("patches/s", "pps", "{:.2f}"),
    ("%mm", "frac_mm", "{:.0%}"),
    ("max|Δraw|", "max_abs_diff", "{:.1e}"),
    ("XLA GFLOP/device", "xla_gflop_per_device", "{:.1f}"),
    ("×TL", "over_tl", "{:.1f}"),
    ("other CPU", "other_cpu", "{:.0%}"),
]


# ---------------------------------------------------------------------------
# 2. SAE training throughput
# ---------------------------------------------------------------------------


def real_store(model, tok, path: Path, n_tokens: int, ctx_len: int):
    """A small activation store of SmolLM2 `SAE_SITE` over the pydoc-topics corpus."""
    docs = cj.read_corpus("pydoc-topics")
    per_ctx = ctx_len - 1
    contexts = cj.pack_contexts(tok, docs, ctx_len, max_contexts=-(-n_tokens // per_ctx))
    chunk = max(per_ctx, (n_tokens // 2 // per_ctx) * per_ctx)  # two chunks: the shuffle buffer holds both
    return cj.build_store(model, contexts, [SAE_SITE], path, n_tokens=n_tokens, chunk_tokens=chunk, progress=False)


def sae_cfg(args) -> cj.TrainConfig:
    steps = args.sae_warmup + args.sae_steps + 1  # + the first (compiling) step
    return cj.TrainConfig(n_tokens=steps * args.sae_batch, batch_size=args.sae_batch, lr=4e-4, warmup_steps=0,
                          lr_schedule="constant", log_every=1, checkpoint_every=10**9)  # fmt: skip


def new_sae(store, args):
    return cj.init_sae(store.dims[0], args.sae_width, key=jax.random.key(0), arch="topk", k=args.sae_k, in_site=SAE_SITE,
                       in_scale=store.scales[0], out_scale=store.scales[0])  # fmt: skip


PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


def bench_sae_mesh(store, args, sizes) -> dict:
    """One `train_sae` run; step times from `on_log` (every step is logged, so every step is waited for)."""
    cfg = sae_cfg(args)
    mesh = None if sizes is None else build_mesh(sizes)
    stamps = []
    with OtherLoad() as load:
        t0 = time.perf_counter()
        res = cj.train_sae(new_sae(store, args), store, cfg, progress=False, mesh=mesh,
                           on_log=lambda row: stamps.append(time.perf_counter()))  # fmt: skip
    steps = np.diff([t0, *stamps])  # step i: from the end of step i-1 (batch read included) to its logged end
    timed = steps[1 + args.sae_warmup :]
    params = {n: np.asarray(getattr(res.dictionary, n)) for n in PARAMS}
    return dict(first_step_s=float(steps[0]), step_s=float(np.median(timed)), step_times=timed.tolist(), params=params,
                loss=res.history[-1]["loss"], fve=res.history[-1]["fve"], other_cpu=load.fraction or 0.0)  # fmt: skip


def bench_sae_torch(store, args) -> dict:
    """The PyTorch step of `sae_training.py` on the same batches and learning rates as `train_sae`."""
    import torch
    from sae_training import TorchSAE

    from circuits_jax.dictionaries import schedule

    cfg = sae_cfg(args)
    sched = schedule(cfg)
    tsae = TorchSAE(new_sae(store, args), cfg, "default")
    batches = store.batches(cfg.batch_size, seed=cfg.seed, buffer_chunks=cfg.buffer_chunks)
    times = []
    with OtherLoad() as load:
        for i in range(cfg.steps):
            x = torch.from_numpy(next(batches)[0])
            t0 = time.perf_counter()
            tsae.step(x, x, float(sched(i)))
            times.append(time.perf_counter() - t0)
    timed = times[1 + args.sae_warmup :]
    return dict(step_s=float(np.median(timed)), step_times=timed, params=tsae.params(), other_cpu=load.fraction or 0.0,
                torch_threads=torch.get_num_threads())  # fmt: skip


def _param_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[n] - b[n]))) for n in PARAMS)


def part_sae(model, tok, args, peak: float) -> dict:
    from sae_training import step_flop

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = real_store(model, tok, Path(tmp) / "store", args.sae_store_tokens, 129)
        build_s = time.perf_counter() - t0
        N, D, F = args.sae_batch, store.dims[0], args.sae_width
        flop = step_flop(N, D, F, 0.0)  # no latent is dead in a run this short (dead_after 200k tokens): no AuxK
        print(f"\n== 2. train_sae TopK d_in {D} width {F} k {args.sae_k} batch {N}, {args.sae_warmup} warm-up + "
              f"{args.sae_steps} timed steps after the first; store of {store.n_tokens} tokens of {SAE_SITE} "
              f"({store.n_chunks} chunks, built in {build_s:.0f} s); {flop / 1e9:.1f} GFLOP per step (10·N·D·F)")  # fmt: skip
        ref = bench_sae_mesh(store, args, None)
        rows = []

        def add(label, devices, got):
            rows.append(dict(mesh=label, devices=devices, first_step_s=got["first_step_s"], step_s=got["step_s"],
                             tok_s=N / got["step_s"], frac_mm=flop / got["step_s"] / peak,
                             max_abs_diff=_param_diff(got["params"], ref["params"]), loss=got["loss"], fve=got["fve"],
                             other_cpu=got["other_cpu"], step_times=got["step_times"]))  # fmt: skip
            r = rows[-1]
            print(f"  {label:<28} first step {r['first_step_s']:5.1f} s, step {r['step_s']:.2f} s ({r['tok_s']:.0f} tok/s, "
                  f"{r['frac_mm']:.0%} of matmul), max|Δparam| {r['max_abs_diff']:.1e}, other CPU {r['other_cpu']:.0%}",
                  flush=True)  # fmt: skip

        add("no mesh", 1, ref)
        for spec in args.sae_meshes:
            sizes = parse_mesh(spec, ("data", "model"))
            if N % sizes["data"] or F % sizes["model"] or n_devices(sizes) > len(jax.devices()):
                print(f"  skip mesh {spec}: batch {N} / width {F} do not divide over it, or it needs more than "
                      f"the {len(jax.devices())} devices")  # fmt: skip
                continue
            add(mesh_label(sizes), n_devices(sizes), bench_sae_mesh(store, args, dict(sweep=1, **sizes)))
        tl = None
        if args.sae_torch:
            t = bench_sae_torch(store, args)
            tl = dict(step_s=t["step_s"], tok_s=N / t["step_s"], frac_mm=flop / t["step_s"] / peak,
                      max_abs_diff=_param_diff(t["params"], ref["params"]), other_cpu=t["other_cpu"],
                      torch_threads=t["torch_threads"], step_times=t["step_times"])  # fmt: skip
            for r in rows:
                r["over_torch"] = r["tok_s"] / tl["tok_s"]
            rows.append(dict(mesh=f"PyTorch ({t['torch_threads']} threads)", devices=1, first_step_s=float("nan"),
                             step_s=tl["step_s"], tok_s=tl["tok_s"], frac_mm=tl["frac_mm"], max_abs_diff=tl["max_abs_diff"],
                             over_torch=1.0, other_cpu=tl["other_cpu"]))  # fmt: skip
            print(f"  PyTorch step {tl['step_s']:.2f} s ({tl['tok_s']:.0f} tok/s), max|Δparam| vs ours {tl['max_abs_diff']:.1e}")
    cols = SAE_COLUMNS if tl else [c for c in SAE_COLUMNS if c[1] != "over_torch"]
    print()
    print(table(rows, cols, left=("mesh",)))
    print("tok/s: batch / median step s (steps timed from one logged step to the next, the store read included). "
          "%mm: 10·N·D·F FLOP per step over the JAX matmul rate. Δparam: max |parameter - no-mesh run| after all steps. "
          "×torch: tok/s over the PyTorch step's.")  # fmt: skip
    return dict(d_in=D, width=F, k=args.sae_k, batch=N, warmup=args.sae_warmup, steps=args.sae_steps, site=SAE_SITE,
                store_tokens=store.n_tokens, store_build_s=build_s, flop_per_step=flop, rows=rows, torch=tl)  # fmt: skip


SAE_COLUMNS = [
    ("mesh", "mesh", "{}"),
    ("devices", "devices", "{:d}"),
    ("1st step s", "first_step_s", "{:.1f}"),
    ("step s", "step_s", "{:.2f}"),
    ("tok/s", "tok_s", "{:.0f}"),
    ("%mm", "frac_mm", "{:.0%}"),
    ("max|Δparam|", "max_abs_diff", "{:.1e}"),
    ("×torch", "over_torch", "{:.2f}"),
    ("other CPU", "other_cpu", "{:.0%}"),
]


# ---------------------------------------------------------------------------
# 3. Compile time against depth
# ---------------------------------------------------------------------------


def depth_config(n_layers: int, shape: str = "llama") -> cj.Config:
    if shape == "gemma3":  # local (sliding-window) and global layers, 5:1, as Gemma 3 alternates them
        kinds = tuple("full_attention" if (l + 1) % 6 == 0 else "sliding_attention" for l in range(n_layers))
        return cj.Config(d_model=256, n_layers=n_layers, n_heads=4, d_head=64, d_vocab=4096, d_mlp=1024, n_kv_heads=1,
                         normalization="rmsnorm", act="gelu_new", gated_mlp=True, positional="rotary", qk_norm=True,
                         post_attn_norm=True, post_mlp_norm=True, embedding_multiplier=16.0, attn_scale=64**-0.5,
                         sliding_window=16, layer_types=kinds, rope_theta=1e6, rope_local_theta=1e4,
                         family="gemma3_text")  # fmt: skip
    return cj.Config(d_model=256, n_layers=n_layers, n_heads=4, d_head=64, d_vocab=4096, d_mlp=1024, n_kv_heads=2,
                     normalization="rmsnorm", act="silu", gated_mlp=True, positional="rotary")  # fmt: skip


def _forward(m, t):
    return cj.run(m, t).logits


def _unrolled_forward(m, t):
    """The same forward as one `run` per layer (Python ints: the layer is written into the program each time)."""
    L = m.cfg.n_layers
    x = cj.run(m, t, stop_layer=1, return_logits=False).resid
    for layer in range(1, L):
        x = cj.run(m, t, start_layer=layer, stop_layer=layer + 1, resid=x, return_logits=False).resid
    return cj.unembed(m, x)


def _chunk_program(metric, act_shape):
    def chunk(m, tokens, positions, resid, source, start, rows):
        return score_chunk(m, tokens, None, positions, resid, source, metric, start, rows, "hook_resid_pre", (0,), act_shape)

    return chunk


def time_compile(fn, *shapes) -> dict:
    """Seconds to trace + lower and to compile `fn` at `shapes` (fresh `jax.jit`: nothing cached), and the HLO size."""
    f = jax.jit(fn)
    t0 = time.perf_counter()
    lowered = f.trace(*shapes).lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    text = lowered.as_text()
    return dict(lower_s=t1 - t0, compile_s=t2 - t1, hlo_chars=len(text), hlo_lines=text.count("\n"),
                ok=compiled is not None)  # fmt: skip


def part_compile(args) -> dict:
    B, T, C = 8, 64, 64
    print(f"\n== 3. compile time against depth ({args.depth_shape}-shaped): d_model 256, 4 heads, d_mlp 1024, vocab 4096; forward of "
          f"[{B}, {T}] tokens, patching chunk of {C} resid_pre patches; unrolled loop up to {args.unrolled_max_depth} layers")  # fmt: skip
    metric = cj.LogitDiff(jnp.arange(B, dtype=jnp.int32), jnp.arange(B, dtype=jnp.int32) + 1)
    i32, f32 = jnp.int32, jnp.float32
    rows = []
    for L in args.depths:
        cfg = depth_config(L, args.depth_shape)
        m = jax.eval_shape(lambda cfg=cfg: cj.init_model(cfg, key=jax.random.key(0)))
        tokens = jax.ShapeDtypeStruct((B, T), i32)
        with OtherLoad() as load:
            fwd = time_compile(_forward, m, tokens)
            stack = jax.ShapeDtypeStruct((L, B, T, cfg.d_model), f32)
            chunk = time_compile(_chunk_program(metric, (T, cfg.d_model)), m, tokens, jax.ShapeDtypeStruct((B,), i32), stack,
                                 stack, jax.ShapeDtypeStruct((), i32), jax.ShapeDtypeStruct((C, 2), i32))  # fmt: skip
            unrolled = time_compile(_unrolled_forward, m, tokens) if L <= args.unrolled_max_depth else None
        row = dict(layers=L, fwd_lower_s=fwd["lower_s"], fwd_compile_s=fwd["compile_s"], fwd_hlo_kchars=fwd["hlo_chars"] / 1e3,
                   chunk_lower_s=chunk["lower_s"], chunk_compile_s=chunk["compile_s"], chunk_hlo_kchars=chunk["hlo_chars"] / 1e3,
                   unrolled_compile_s=unrolled["compile_s"] if unrolled else float("nan"),
                   unrolled_lower_s=unrolled["lower_s"] if unrolled else float("nan"),
                   unrolled_hlo_kchars=unrolled["hlo_chars"] / 1e3 if unrolled else float("nan"),
                   other_cpu=load.fraction or 0.0)  # fmt: skip
        rows.append(row)
        print(f"  L={L:3d}: forward compile {row['fwd_compile_s']:.2f} s (lower {row['fwd_lower_s']:.2f} s, HLO "
              f"{row['fwd_hlo_kchars']:.0f} k chars); chunk compile {row['chunk_compile_s']:.2f} s (HLO {row['chunk_hlo_kchars']:.0f} k); "
              + (f"unrolled compile {row['unrolled_compile_s']:.2f} s (lower {row['unrolled_lower_s']:.2f} s, HLO "
                 f"{row['unrolled_hlo_kchars']:.0f} k)" if unrolled else "unrolled: not run")
              + f"; other CPU {row['other_cpu']:.0%}", flush=True)  # fmt: skip
    print()
    print(table(rows, COMPILE_COLUMNS))
    print("compile s: XLA compile of the lowered program (lower s: tracing + lowering to StableHLO); HLO: characters of the "
          "lowered StableHLO text. unrolled: the forward as a Python loop of one-layer run() calls.")  # fmt: skip
    return dict(batch=B, tokens=T, chunk=C, config=dict(d_model=256, n_heads=4, n_kv_heads=2, d_mlp=1024, d_vocab=4096),
                rows=rows)  # fmt: skip


COMPILE_COLUMNS = [
    ("layers", "layers", "{:d}"),
    ("forward compile s", "fwd_compile_s", "{:.2f}"),
    ("forward lower s", "fwd_lower_s", "{:.2f}"),
    ("forward HLO k chars", "fwd_hlo_kchars", "{:.0f}"),
    ("chunk compile s", "chunk_compile_s", "{:.2f}"),
    ("chunk HLO k chars", "chunk_hlo_kchars", "{:.0f}"),
    ("unrolled compile s", "unrolled_compile_s", "{:.2f}"),
    ("unrolled lower s", "unrolled_lower_s", "{:.2f}"),
    ("unrolled HLO k chars", "unrolled_hlo_kchars", "{:.0f}"),
    ("other CPU", "other_cpu", "{:.0%}"),
]


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


PARTS = ("sweep", "sae", "compile")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run (default: all)")
    p.add_argument("--devices", type=int, default=8, help="CPU devices to simulate (read before JAX starts; default 8)")
    p.add_argument("--sweep-meshes", nargs="+", default=["1", "2", "4", "8", "4x2"],
                   help="sweep x data x model sizes of each patching mesh (default: 1 2 4 8 4x2; e.g. 2x2x2 adds tensor parallelism)")
    p.add_argument("--sae-meshes", nargs="+", default=["1", "2", "4", "8", "4x2"],
                   help="data x model sizes of each SAE-training mesh (default: 1 2 4 8 4x2)")
    p.add_argument("--pairs", type=int, default=8, help="IOI prompt pairs in the sweep's batch")
    p.add_argument("--chunk", type=int, default=48, help="patches per compiled call (a multiple of every sweep size)")
    p.add_argument("--repeats", type=int, default=2, help="steady-state sweep calls per mesh (median reported)")
    p.add_argument("--no-xla-cost", dest="xla_cost", action="store_false",
                   help="skip compiling each mesh's chunk program once more for XLA's per-device FLOP count")
    p.add_argument("--tl-patches", type=int, default=12, help="patches TransformerLens runs (0: skip it)")
    p.add_argument("--sae-width", type=int, default=4608)
    p.add_argument("--sae-k", type=int, default=32)
    p.add_argument("--sae-batch", type=int, default=4096)
    p.add_argument("--sae-warmup", type=int, default=1, help="untimed steps after the first (compiling) one")
    p.add_argument("--sae-steps", type=int, default=4, help="timed SAE steps per mesh (median reported)")
    p.add_argument("--sae-store-tokens", type=int, default=32768, help="tokens in the activation store (two chunks)")
    p.add_argument("--no-sae-torch", dest="sae_torch", action="store_false", help="skip the PyTorch SAE step")
    p.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    p.add_argument("--unrolled-max-depth", type=int, default=32, help="deepest model the unrolled contrast compiles")
    p.add_argument("--depth-shape", choices=["llama", "gemma3"], default="llama", help="the config of the compile part")
    p.add_argument("--matmul", type=int, default=2048, help="n of the n x n float32 reference matmul")
    p.add_argument("--quiet-wait", type=float, default=5.0, help="before steady-state timings wait up to this many s for quiet")
    p.add_argument("--smoke", action="store_true", help="small everything: a check that the script runs")
    p.add_argument("--json", type=Path, help="write everything to this JSON file")
    args = p.parse_args(argv)
    if args.smoke:
        args.sweep_meshes, args.sae_meshes, args.repeats, args.tl_patches = ["2", "2x2"], ["2", "2x2"], 1, 2
        args.sae_width, args.sae_batch, args.sae_warmup, args.sae_steps = 512, 512, 0, 1
        args.sae_store_tokens, args.depths, args.unrolled_max_depth, args.matmul, args.quiet_wait = 4096, [2, 4], 4, 512, 0.0
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    env = dict(cpu=cpu_model(), jax=jax.__version__, backend=jax.default_backend(), n_devices=len(jax.devices()),
               devices=[str(d) for d in jax.devices()], cores=len(os.sched_getaffinity(0)), git=git_state(), argv=sys.argv,
               load_average_start=os.getloadavg(), other_cpu_before=idle_check(2.0))  # fmt: skip
    print(f"CPU: {env['cpu']}, {env['cores']} usable cores; jax {env['jax']} ({env['backend']}) with {env['n_devices']} devices; "
          f"circuits_jax at {env['git']}")  # fmt: skip
    print(f"CPU used by other processes before the start: {env['other_cpu_before']:.0%}; load average "
          + ", ".join(f"{v:.2f}" for v in env["load_average_start"]))  # fmt: skip
    if env["backend"] == "cpu":
        print(f"note: the {env['n_devices']} CPU devices are simulated and share {env['cores']} cores: no speed-up is expected")

    mm = matmul_flops(args.matmul, 10, args.quiet_wait)
    print(f"matmul {mm['n']}^3 float32 in JAX (device 0): best {mm['flops'] / 1e9:.1f} GFLOP/s of 10 (the %mm reference), "
          f"median {mm['median_flops'] / 1e9:.1f}; other processes' CPU {mm['other_cpu']:.0%}")  # fmt: skip
    results = dict(env=env, args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, matmul=mm)
    model = tok = None
    if "sweep" in args.parts or "sae" in args.parts:
        t0 = time.perf_counter()
        model, tok = cj.load("smollm2")
        print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - t0:.0f} s")
        try:
            import torch

            env["torch"], env["torch_threads"] = torch.__version__, torch.get_num_threads()
            env["transformer_lens"] = dist_version("transformer-lens")
        except Exception as e:  # noqa: BLE001
            env["torch"] = f"unavailable: {e}"
    if "sweep" in args.parts:
        results["sweep"] = part_sweep(model, tok, args, mm["flops"])
    if "sae" in args.parts:
        results["sae"] = part_sae(model, tok, args, mm["flops"])
    if "compile" in args.parts:
        results["compile"] = part_compile(args)

    env["load_average_end"] = os.getloadavg()
    env["total_s"] = time.perf_counter() - t_start
    print(f"\ntotal {env['total_s']:.0f} s; load average at the end " + ", ".join(f"{v:.2f}" for v in env["load_average_end"]))
    loads = [r.get("other_cpu", 0) or 0 for part in ("sweep", "sae", "compile") for r in results.get(part, {}).get("rows", [])]
    if max(loads, default=0) > 0.1 or (mm["other_cpu"] or 0) > 0.1:
        print("WARNING: other processes used over 10% of the CPUs during some timings; rerun on a quiet machine.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=_json_default))
        print(f"wrote {args.json}")
    return results


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


if __name__ == "__main__":
    main()
