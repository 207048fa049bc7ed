"""Activation-patching benchmark: `circuits_jax.patch_sweep` against TransformerLens's patching functions.

Everything runs in one process on the same float32 weights. SmolLM2-135M-Instruct (or `--model gemma3-270m`,
Gemma 3 270M) is loaded with `circuits_jax.load`, exported with `circuits_jax.export_hf` to a temporary directory and
booted from there as a TransformerLens 4.x `TransformerBridge` in compatibility mode (TransformerLens's
default weight processing: fold_ln, centred writing weights and unembedding; it changes no result).
TransformerLens runs under `torch.inference_mode()` — its fastest setting — and loops one hooked
forward per patch (`transformer_lens.patching.get_act_patch_*`).

The task is indirect-object identification on one prompt pair (15 tokens in SmolLM2, which uses no BOS;
16 in Gemma 3, whose tokenizer prepends one)
that differs only in the second mention of the subject; the metric is the logit difference
answer - wrong at the last position; sweeps are denoising (clean activation into the corrupt run);
results are normalised (clean = 1, corrupt = 0).

For every sweep it reports
  * circuits_jax wall time of the first call (compile + run) and of the second call (steady state),
    with `skip_unchanged` on (patches whose clean value equals the corrupt one, i.e. positions before
    the first differing token, are answered without running; exact, but how much it saves depends on
    the prompt pair) and off (every patch runs);
  * TransformerLens on a deterministic random subset of the patches (`--tl-max-patches`, the same
    indices are compared), after one untimed warm-up patch;
  * patches/s = grid entries answered per second, the speed ratios, and the max |difference| of the
    normalised results on the compared entries;
  * achieved FLOP/s (see `layer_flop`) as a fraction of a large float32 JAX matmul measured here.

`--memory` adds the large sweeps of issue 3 (circuits_jax only): `mlp_post` by (layer, neuron) over all
layers, and by (layer, pos, neuron) for one layer, within `memory_budget=4 GiB`, with time, chunk size
and peak RSS.

    .venv/bin/python benchmarks/patching.py
    .venv/bin/python benchmarks/patching.py --tl-max-patches 100 --sweeps resid_pre z_head --json out.json
    .venv/bin/python benchmarks/patching.py --memory --json out.json
    .venv/bin/python benchmarks/patching.py --model gemma3-270m --sweeps resid_pre z_head attn_out --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import torch
import transformers

import circuits_jax as cj

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import OtherLoad, cpu_model, idle_check  # noqa: E402  (the sibling benchmark)

CLEAN = "Then, Mary and John went to the park. John gave a ball to"
CORRUPT = "Then, Mary and John went to the park. Mary gave a ball to"
ANSWER, WRONG = " Mary", " John"  # the indirect object; the subject

# name -> (circuits_jax site, by, TransformerLens function in transformer_lens.patching)
SWEEPS = {
    "resid_pre": ("resid_pre", ("layer", "pos"), "get_act_patch_resid_pre"),
    "z_pos": ("z", ("layer", "pos", "head"), "get_act_patch_attn_head_out_by_pos"),
    "z_head": ("z", ("layer", "head"), "get_act_patch_attn_head_out_all_pos"),
    "attn_out": ("attn_out", ("layer", "pos"), "get_act_patch_attn_out"),
    "mlp_out": ("mlp_out", ("layer", "pos"), "get_act_patch_mlp_out"),
}


# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------


class Task:
    """The prompt pair as tokens for both libraries, the answer ids and both metrics."""

    def __init__(self, tok):
        self.clean, self.corrupt = tok.to_tokens(CLEAN), tok.to_tokens(CORRUPT)  # int32 [1, T]
        if self.clean.shape != self.corrupt.shape or self.clean.shape[0] != 1:
            raise SystemExit(f"prompts are {self.clean.shape[1]} and {self.corrupt.shape[1]} tokens; they must be equal")
        self.T = self.clean.shape[1]
        self.answer, self.wrong = tok.to_single_token(ANSWER), tok.to_single_token(WRONG)
        differ = np.flatnonzero(self.clean[0] != self.corrupt[0])
        # exactly one differing token: the second mention of the subject (clean) / of the IO (corrupt)
        if not (len(differ) == 1 and self.clean[0, differ[0]] == self.wrong and self.corrupt[0, differ[0]] == self.answer):
            raise SystemExit(f"clean and corrupt must differ only in the second subject mention; they differ at {differ}")
        self.first_diff = int(differ[0])
        self.str_tokens = tok.to_str_tokens(CLEAN)
        self.metric = cj.LogitDiff(np.array([self.answer]), np.array([self.wrong]))
        self.clean_t, self.corrupt_t = (torch.from_numpy(t.astype(np.int64)) for t in (self.clean, self.corrupt))

    def torch_metric(self, logits: torch.Tensor) -> torch.Tensor:
        """The same logit difference on TransformerLens's full logits [B, T, V], at the last position."""
        return (logits[:, -1, self.answer] - logits[:, -1, self.wrong]).mean()

    def jax_logit_diff(self, model, tokens) -> float:
        logits = np.asarray(model(tokens))[:, -1]
        return float(np.mean(logits[:, self.answer] - logits[:, self.wrong]))


def boot_bridge(model, tok, tmp: str):
    """TransformerLens 4.x bridge over the exported weights, in compatibility mode (eval, float32, CPU)."""
    from transformer_lens.model_bridge import TransformerBridge

    cj.export_hf(model, tmp)  # config + weights only: hand the tokenizer over directly
    eos = tok.tok.id_to_token(model.cfg.eos_token_id) if model.cfg.eos_token_id is not None else None
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tok, eos_token=eos)
    bridge = TransformerBridge.boot_transformers(tmp, device="cpu", dtype=torch.float32, tokenizer=hf_tok)
    bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    return bridge


def wait_quiet(max_wait: float, threshold: float = 0.1) -> float | None:
    """Wait (up to max_wait s) until other processes use under `threshold` of the CPUs; return the last reading."""
    deadline, load = time.perf_counter() + max_wait, None
    while max_wait > 0:
        load = idle_check(1.0)
        if load is None or load < threshold or time.perf_counter() > deadline:
            break
    return load


# ---------------------------------------------------------------------------
# FLOP count
# ---------------------------------------------------------------------------


def layer_flop(cfg, T: int) -> int:
    """Multiply-add FLOP of one layer on T tokens of one sequence (elementwise work ignored).

    2*T*(D*H*E + 2*D*K*E + H*E*D + 3*D*M)  W_Q, W_K + W_V, W_O, gate + up + down of the gated MLP
    + 4*H*E*T^2                             Q K^T and pattern @ V over the full T x T square
    """
    D, H, K, E, M = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_mlp
    return 2 * T * (D * H * E + 2 * D * K * E + H * E * D + 3 * D * M) + 4 * H * E * T * T


def unembed_flop(cfg, positions: int) -> int:
    """2*D*V per unembedded position (the final norm is ignored)."""
    return 2 * cfg.d_model * cfg.d_vocab * positions


def ours_flop(cfg, T: int, run_layers: np.ndarray, chunk: int) -> dict:
    """FLOP patch_sweep executes for the patches it runs (their layers in run order, layer-major), and the useful part.

    Executed: each chunk of `chunk` patches (the last one padded by repeating its final patch) runs
    layers start..L-1 from the chunk's lowest layer `start`, and unembeds the scored position:
        sum over chunks of chunk * ((L - start) * layer_flop(T) + unembed_flop(1)).
    Useful: each patch needs only layers l..L-1 of its own layer l: sum of (L - l) * layer_flop + unembed.
    """
    L, per_layer, head = cfg.n_layers, layer_flop(cfg, T), unembed_flop(cfg, 1)
    chunk = max(1, min(chunk, len(run_layers)))  # patch_sweep never pads beyond the patches it runs
    starts = run_layers[::chunk] if len(run_layers) else np.zeros(0, int)
    executed = sum(chunk * ((L - int(s)) * per_layer + head) for s in starts)
    useful = sum((L - int(l)) * per_layer + head for l in run_layers)
    return dict(executed=int(executed), useful=int(useful), layer_passes=int(sum(chunk * (L - int(s)) for s in starts)))


def tl_flop(cfg, T: int) -> int:
    """TransformerLens runs all L layers and unembeds all T positions for every patch."""
    return cfg.n_layers * layer_flop(cfg, T) + unembed_flop(cfg, T)


def matmul_flops(n: int, repeats: int, quiet_wait: float) -> dict:
    """Best FLOP/s over `repeats` n x n @ n x n float32 matmuls (2 n^3 FLOP) in JAX: the practical peak here.

    The best, not the median: it is the reference for "what this CPU can do", so the least-disturbed call counts.
    """
    a, b = (jax.random.normal(k, (n, n), jnp.float32) for k in jax.random.split(jax.random.key(0)))
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    wait_quiet(quiet_wait)
    times = []
    with OtherLoad() as load:
        for _ in range(repeats):
            t0 = time.perf_counter()
            mm(a, b).block_until_ready()
            times.append(time.perf_counter() - t0)
    return dict(n=n, seconds=min(times), flops=2 * n**3 / min(times), median_flops=2 * n**3 / np.median(times),
                other_cpu=load.fraction)  # fmt: skip


# ---------------------------------------------------------------------------
# circuits_jax
# ---------------------------------------------------------------------------


def changed_layers(model, task: Task, site: str, by) -> tuple[np.ndarray, np.ndarray]:
    """(grid of 'clean differs from corrupt' [L, *sizes], the layer of each changed entry in layer-major order).

    The entries skip_unchanged=True runs; computed here independently of the library from cached activations.
    """
    kind, axes = cj.PATCH_SITES[site]
    L = model.cfg.n_layers
    names = [f"blocks.{l}.{kind}" for l in range(L)]
    src = cj.run(model, task.clean, cache=names).cache
    tgt = cj.run(model, task.corrupt, cache=names).cache
    diff = np.stack([np.asarray(src[n] != tgt[n]) for n in names])  # [L, B, *act]
    indexed = [axes[a] for a in by[1:]]  # activation axes that are swept, in activation order
    other = tuple(2 + a for a in range(diff.ndim - 2) if a not in indexed)
    grid = diff.any(axis=(1, *other))
    layers = np.nonzero(grid)[0]
    return grid, layers


def time_sweep(model, task: Task, site: str, by, skip: bool, quiet_wait: float, **kw) -> dict:
    """Two calls of patch_sweep: the first compiles, the second is the steady state."""
    out = {}
    for label in ("first", "second"):
        if label == "second":
            wait_quiet(quiet_wait)
        with OtherLoad() as load:
            t0 = time.perf_counter()
            r = cj.patch_sweep(model, task.clean, task.corrupt, task.metric, site, by, skip_unchanged=skip, **kw)
            out[f"{label}_s"] = time.perf_counter() - t0
        out[f"{label}_other_cpu"] = load.fraction
    out.update(result=r.result, chunk_size=r.chunk_size, clean_metric=r.clean_metric, corrupt_metric=r.corrupt_metric)
    return out


# ---------------------------------------------------------------------------
# TransformerLens
# ---------------------------------------------------------------------------


def tl_subset(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    """Sorted flat indices of a deterministic random subset (all of them when n >= the grid's size)."""
    size = int(np.prod(shape))
    if n >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, n, replace=False))


def tl_sweep(bridge, task: Task, fn_name: str, by, shape, flat: np.ndarray, clean_cache, quiet_wait: float) -> dict:
    """TransformerLens's own patching function on the rows `flat` of the grid (passed as its `index_df`)."""
    from transformer_lens import patching

    fn = getattr(patching, fn_name)
    index = np.stack(np.unravel_index(flat, shape), axis=1)
    df = pd.DataFrame(index, columns=list(by))

    def call(rows):
        return fn(bridge, task.corrupt_t, clean_cache, task.torch_metric, index_axis_names=None, index_df=rows)

    with torch.inference_mode(), quiet_tqdm(patching):
        call(df.iloc[:1])  # warm-up: hook registration, first-call allocations
        wait_quiet(quiet_wait)
        with OtherLoad() as load:
            t0 = time.perf_counter()
            raw = call(df).numpy()
            seconds = time.perf_counter() - t0
    return dict(raw=raw, seconds=seconds, n=len(flat), other_cpu=load.fraction)


class quiet_tqdm:
    """Turn off the per-patch progress bar TransformerLens's patching loop draws (it only clutters the output)."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.orig = self.module.tqdm
        self.module.tqdm = lambda it, *a, **k: it

    def __exit__(self, *exc):
        self.module.tqdm = self.orig


# ---------------------------------------------------------------------------
# One sweep, both libraries
# ---------------------------------------------------------------------------


def bench_sweep(name, model, bridge, task, tl_ref, clean_cache, peak, args, seed) -> dict:
    site, by, tl_fn = SWEEPS[name]
    cfg, T = model.cfg, task.T
    on = time_sweep(model, task, site, by, True, args.quiet_wait, progress=False)
    off = time_sweep(model, task, site, by, False, args.quiet_wait, progress=False)
    shape = on["result"].shape
    n_total = int(np.prod(shape))

    flat = tl_subset(shape, args.tl_max_patches, seed)
    tl = tl_sweep(bridge, task, tl_fn, by, shape, flat, clean_cache, args.quiet_wait)
    tl_norm = (tl["raw"] - tl_ref["corrupt"]) / (tl_ref["clean"] - tl_ref["corrupt"])

    grid, run_layers = changed_layers(model, task, site, by)
    all_layers = np.repeat(np.arange(cfg.n_layers), n_total // cfg.n_layers)
    flop_on = ours_flop(cfg, T, run_layers, on["chunk_size"])
    flop_off = ours_flop(cfg, T, all_layers, off["chunk_size"])
    tl_s_per_patch = tl["seconds"] / tl["n"]

    row = dict(
        sweep=name, site=site, by=list(by), shape=list(shape), n_patches=n_total, n_run_skip_on=int(grid.sum()),
        chunk_skip_on=on["chunk_size"], chunk_skip_off=off["chunk_size"],
        ours_first_s_on=on["first_s"], ours_second_s_on=on["second_s"],
        ours_first_s_off=off["first_s"], ours_second_s_off=off["second_s"],
        tl_patches_timed=tl["n"], tl_s=tl["seconds"], tl_ms_per_patch=1e3 * tl_s_per_patch,
        tl_full_sweep_s_est=tl_s_per_patch * n_total,
        ours_pps_on=n_total / on["second_s"], ours_pps_off=n_total / off["second_s"], tl_pps=1 / tl_s_per_patch,
        max_abs_diff=float(np.max(np.abs(on["result"].reshape(-1)[flat] - tl_norm))),
        max_abs_diff_off=float(np.max(np.abs(off["result"].reshape(-1)[flat] - tl_norm))),
        max_abs_on_vs_off=float(np.max(np.abs(on["result"] - off["result"]))),
        flop_executed_on=flop_on["executed"], flop_useful_on=flop_on["useful"],
        flop_executed_off=flop_off["executed"], flop_useful_off=flop_off["useful"], flop_tl_per_patch=tl_flop(cfg, T),
        other_cpu_on=on["second_other_cpu"], other_cpu_off=off["second_other_cpu"], other_cpu_tl=tl["other_cpu"],
        other_cpu=max(v or 0.0 for v in (on["second_other_cpu"], off["second_other_cpu"], tl["other_cpu"])),
        ours_result=on["result"].tolist(), tl_indices=flat.tolist(), tl_result=tl_norm.tolist(),
    )  # fmt: skip
    row["speedup_on"] = row["ours_pps_on"] / row["tl_pps"]
    row["speedup_off"] = row["ours_pps_off"] / row["tl_pps"]
    row["frac_peak_on"] = flop_on["executed"] / on["second_s"] / peak
    row["frac_peak_off"] = flop_off["executed"] / off["second_s"] / peak
    row["frac_peak_tl"] = tl_flop(cfg, T) / tl_s_per_patch / peak
    return row


COLUMNS = [  # (header, key, format)
    ("sweep", "sweep", "{}"),
    ("shape", "shape", "{}"),
    ("patches", "n_patches", "{:d}"),
    ("run w/ skip", "n_run_skip_on", "{:d}"),
    ("ours 1st s (skip on)", "ours_first_s_on", "{:.1f}"),
    ("ours 2nd s (skip on)", "ours_second_s_on", "{:.1f}"),
    ("ours 2nd s (skip off)", "ours_second_s_off", "{:.1f}"),
    ("TL ms/patch", "tl_ms_per_patch", "{:.0f}"),
    ("TL full sweep s (est.)", "tl_full_sweep_s_est", "{:.0f}"),
    ("ours patches/s skip on", "ours_pps_on", "{:.1f}"),
    ("ours patches/s skip off", "ours_pps_off", "{:.1f}"),
    ("TL patches/s", "tl_pps", "{:.2f}"),
    ("speed-up skip on", "speedup_on", "{:.1f}x"),
    ("speed-up skip off", "speedup_off", "{:.1f}x"),
    ("max abs diff", "max_abs_diff", "{:.1e}"),
    ("ours %mm on", "frac_peak_on", "{:.0%}"),
    ("ours %mm off", "frac_peak_off", "{:.0%}"),
    ("TL %mm", "frac_peak_tl", "{:.0%}"),
    ("other CPU", "other_cpu", "{:.0%}"),
]


def table(rows: list[dict], columns=COLUMNS) -> str:
    """A Markdown table."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    rule = "|" + "|".join("---:" for _ in columns) + "|"
    body = ["| " + " | ".join(f.format(r[k]) for _, k, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


# ---------------------------------------------------------------------------
# Memory section
# ---------------------------------------------------------------------------


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager: the highest current RSS sampled every 20 ms while the block ran.

    ru_maxrss only grows over the process's life (the TransformerLens model loaded earlier is in it),
    so the sweep's own peak is sampled; both are reported.
    """

    def __enter__(self):
        self.start, self.peak, self._stop = rss_bytes(), rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def memory_sweep(model, task, by, layers, budget: int, tl_s_per_patch: float | None) -> dict:
    """A large mlp_post sweep with a progress bar: a warm-up sweep of the last layer compiles, then the timed one."""
    L = model.cfg.n_layers
    kw = dict(site="mlp_post", by=by, memory_budget=budget)
    t0 = time.perf_counter()
    cj.patch_sweep(model, task.clean, task.corrupt, task.metric, layers=[L - 1], progress=False, **kw)
    warm = time.perf_counter() - t0  # compiles the same chunk program (its shape does not depend on the layers)
    with PeakRSS() as rss, OtherLoad() as load:
        t0 = time.perf_counter()
        r = cj.patch_sweep(model, task.clean, task.corrupt, task.metric, layers=layers, progress=True, **kw)
        seconds = time.perf_counter() - t0
    n = int(r.result.size)
    grid, _ = changed_layers(model, task, "mlp_post", by)
    n_run = int(grid[np.arange(L) if layers is None else np.asarray(layers)].sum())
    top = np.unravel_index(np.argsort(-np.abs(r.result), axis=None)[:5], r.result.shape)
    return dict(
        by=list(by), layers=layers, shape=list(r.result.shape), n_patches=n, n_run=n_run, chunk_size=r.chunk_size,
        memory_budget=budget, warm_up_s=warm, seconds=seconds, patches_per_s=n / seconds,
        rss_before_gib=rss.start / 2**30, rss_peak_gib=rss.peak / 2**30,
        ru_maxrss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        tl_est_s=None if tl_s_per_patch is None else tl_s_per_patch * n, other_cpu=load.fraction,
        top5=[dict(index=[int(i[k]) for i in top], value=float(r.result[tuple(i[k] for i in top)])) for k in range(5)],
    )  # fmt: skip


MEMORY_COLUMNS = [
    ("sweep", "name", "{}"),
    ("shape", "shape", "{}"),
    ("patches", "n_patches", "{:d}"),
    ("run", "n_run", "{:d}"),
    ("chunk", "chunk_size", "{:d}"),
    ("compile+warm-up s", "warm_up_s", "{:.1f}"),
    ("sweep s", "seconds", "{:.1f}"),
    ("patches/s", "patches_per_s", "{:.0f}"),
    ("RSS before GiB", "rss_before_gib", "{:.2f}"),
    ("RSS peak GiB", "rss_peak_gib", "{:.2f}"),
    ("ru_maxrss GiB", "ru_maxrss_gib", "{:.2f}"),
    ("TL est. s", "tl_est_s", "{:.0f}"),
    ("other CPU", "other_cpu", "{:.0%}"),
]


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3-270m"], help="the real model (default smollm2)")
    p.add_argument("--sweeps", nargs="+", choices=list(SWEEPS), default=list(SWEEPS), help="sweeps to run (default: all)")
    p.add_argument("--tl-max-patches", type=int, default=300,
                   help="TransformerLens runs at most this many patches per sweep, a fixed random subset (default 300)")  # fmt: skip
    p.add_argument("--memory", action="store_true", help="also run the large mlp_post sweeps (minutes)")
    p.add_argument("--neuron-layer", type=int, default=15, help="layer of the [pos, neuron] sweep (default 15)")
    p.add_argument("--matmul", type=int, default=2048, help="n of the n x n float32 reference matmul")
    p.add_argument("--quiet-wait", type=float, default=20.0,
                   help="before each steady-state timing wait up to this many s for other processes to go idle")  # fmt: skip
    p.add_argument("--json", type=Path, help="write everything to this JSON file")
    return p.parse_args(argv)


def setup(tmp: str, name: str = "smollm2"):
    """Model, task, TL bridge, and both libraries' clean/corrupt metrics; checks the task is a good one."""
    model, tok = cj.load(name)
    task = Task(tok)
    ours = dict(clean=task.jax_logit_diff(model, task.clean), corrupt=task.jax_logit_diff(model, task.corrupt))
    if not (ours["clean"] > 0 > ours["corrupt"]):
        raise SystemExit(f"the model does not prefer the indirect object in the clean prompt only: {ours}")
    bridge = boot_bridge(model, tok, tmp)
    with torch.inference_mode():
        clean_logits, clean_cache = bridge.run_with_cache(task.clean_t)
        corrupt_logits = bridge(task.corrupt_t)
    tl = dict(clean=float(task.torch_metric(clean_logits)), corrupt=float(task.torch_metric(corrupt_logits)))
    return model, tok, task, bridge, clean_cache, ours, tl


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
        model, tok, task, bridge, clean_cache, ours_ref, tl_ref = setup(tmp, args.model)
        setup_s = time.perf_counter() - t0
    print(f"prompt ({task.T} tokens, differ at position {task.first_diff}): {task.str_tokens}")
    print(f"  clean {CLEAN!r} / corrupt {CORRUPT!r}; metric logit[{ANSWER!r}] - logit[{WRONG!r}] at the last position")
    print(f"  circuits_jax: clean {ours_ref['clean']:.4f}, corrupt {ours_ref['corrupt']:.4f}; "
          f"TransformerLens bridge: clean {tl_ref['clean']:.4f}, corrupt {tl_ref['corrupt']:.4f}  (setup {setup_s:.0f} s)")  # fmt: skip

    mm = matmul_flops(args.matmul, 10, args.quiet_wait)
    print(f"matmul {mm['n']}^3 float32 in JAX: best {mm['flops'] / 1e9:.1f} GFLOP/s of 10 (the %mm reference), "
          f"median {mm['median_flops'] / 1e9:.1f}; other processes' CPU {mm['other_cpu']:.0%}")

    rows = []
    for i, name in enumerate(args.sweeps):
        row = bench_sweep(name, model, bridge, task, tl_ref, clean_cache, mm["flops"], args, seed=i)
        rows.append(row)
        print(f"  {name} {row['shape']}: ours 1st {row['ours_first_s_on']:.1f} s, 2nd {row['ours_second_s_on']:.1f} s "
              f"(skip on; {row['n_run_skip_on']} of {row['n_patches']} run), {row['ours_second_s_off']:.1f} s (skip off, "
              f"1st {row['ours_first_s_off']:.1f} s); TL {row['tl_ms_per_patch']:.0f} ms/patch over {row['tl_patches_timed']}; "
              f"max|diff| {row['max_abs_diff']:.1e}; other CPU {row['other_cpu']:.0%}", flush=True)  # fmt: skip
    print()
    print(table(rows))
    print(
        "\npatches/s: grid entries answered per second in the steady state (ours: the second call; with skip on the "
        "skipped entries count as answered). speed-up: ours / TL. %mm: executed FLOP/s (ours_flop / tl_flop) as a "
        "fraction of the JAX matmul rate. max abs diff: normalised results on the TL-compared entries (skip on). "
        "other CPU: the most other processes took during that row's steady-state timings."
    )
    for r in rows:
        print(f"  {r['sweep']}: executed FLOP / useful FLOP = {r['flop_executed_on'] / r['flop_useful_on']:.2f} (skip on), "
              f"{r['flop_executed_off'] / r['flop_useful_off']:.2f} (skip off); max|on - off| {r['max_abs_on_vs_off']:.1e}; "
              f"max|diff| vs TL with skip off {r['max_abs_diff_off']:.1e}")  # fmt: skip

    memory = []
    if args.memory:
        print("\nMemory: mlp_post sweeps, memory_budget = 4 GiB (circuits_jax only)")
        tl_s = min((r["tl_ms_per_patch"] / 1e3 for r in rows), default=None)
        for name, by, layers in [("mlp_post [layer, neuron]", ("layer", "neuron"), None),
                                 (f"mlp_post [pos, neuron] layer {args.neuron_layer}", ("layer", "pos", "neuron"), [args.neuron_layer])]:  # fmt: skip
            m = dict(name=name, **memory_sweep(model, task, by, layers, 4 * 2**30, tl_s))
            memory.append(m)
            print(f"  {name}: {m['seconds']:.0f} s, chunk {m['chunk_size']}, peak RSS {m['rss_peak_gib']:.2f} GiB "
                  f"(from {m['rss_before_gib']:.2f}), top entries {m['top5'][:3]}", flush=True)  # fmt: skip
        print()
        print(table(memory, MEMORY_COLUMNS))
        print("TL est. s: the number of patches times the fastest TransformerLens s/patch measured above (not run).")

    env["total_s"] = time.perf_counter() - t_start
    env["load_average_end"] = os.getloadavg()
    print(f"\ntotal {env['total_s']:.0f} s")
    if any(r["other_cpu"] > 0.1 for r in rows + memory if r["other_cpu"] is not None):
        print("WARNING: other processes used over 10% of the CPUs during some timings; rerun on a quiet machine.")
    results = dict(env=env, prompt=dict(clean=CLEAN, corrupt=CORRUPT, answer=ANSWER, wrong=WRONG,
                                        str_tokens=task.str_tokens, first_diff=task.first_diff),
                   metrics=dict(circuits_jax=ours_ref, transformer_lens=tl_ref), matmul=mm, sweeps=rows, memory=memory)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return results


def git_state() -> str | None:
    """`<commit>` of the checkout, with `+dirty` when circuits_jax/ has uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "circuits_jax"], cwd=root, capture_output=True, text=True).stdout
    except OSError:
        return None
    return head + ("+dirty" if dirty.strip() else "") if head else None


def dist_version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main()
