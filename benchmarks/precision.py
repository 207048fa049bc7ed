"""bfloat16 against float32 on real models: the IOI job's head patching, its agreement and its memory.

For each model (`smollm2`, `gemma3-270m`) and dtype (float32, bfloat16), one child process loads the model
with `circuits_jax.load(name, dtype=...)`, builds the IOI job's dataset (`ioi_task(tok, n, seed, templates=(0,))`,
as `circuits-jax ioi` does), and runs the job's head patching: `patch_sweep(..., "z", ("layer", "head"))`,
denoising, normalised so clean = 1 and corrupt = 0. A child per run keeps the peak resident memory
(`ru_maxrss`) of each dtype apart. The parent prints, per model:

  * the clean and corrupt logit differences in both dtypes;
  * max |bf16 - f32| of the normalised head-patching grid, its Spearman rank correlation over every head (most
    heads' effects are within bf16's rounding of zero, so their order is noise) and its Pearson correlation;
  * whether the top heads (by |effect|) agree: the overlap of the top 5 and the top 10;
  * the weights' bytes, the process's peak RSS once the model is loaded and once the sweep has run, and the
    wall time (load + sweep, compile included) of each dtype.

XLA's CPU backend has no native bfloat16 matmul on most x86 CPUs, so bf16 is not expected to be faster
here; the point is memory and agreement (on a GPU or TPU bf16 is also the fast path).

    .venv/bin/python benchmarks/precision.py
    .venv/bin/python benchmarks/precision.py --models smollm2 --n 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def child(model_name: str, dtype: str, n: int, seed: int, out: Path) -> None:
    """One run: load, dataset, head patching; writes the grid and figures to `out` (npz + json)."""
    import jax

    import circuits_jax as cj

    t0 = time.perf_counter()
    model, tok = cj.load(model_name, dtype=dtype)
    nbytes = sum(int(a.size * a.dtype.itemsize) for a in jax.tree.leaves(model) if hasattr(a, "dtype"))
    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    task = cj.ioi_task(tok, n=n, seed=seed, templates=(0,))
    kw = dict(attention_mask=task.attention_mask, answer_pos=task.answer_pos, progress=False)
    heads = cj.patch_sweep(model, task.clean, task.corrupt, task.metric, "z", ("layer", "head"), **kw)
    seconds = time.perf_counter() - t0
    np.savez(out.with_suffix(".npz"), result=np.asarray(heads.result, np.float32))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    out.with_suffix(".json").write_text(json.dumps(dict(
        model=model_name, dtype=dtype, weight_bytes=nbytes, peak_rss_load=rss_load, peak_rss=rss, seconds=seconds,
        clean_metric=float(heads.clean_metric), corrupt_metric=float(heads.corrupt_metric))))  # fmt: skip


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties broken by order; the grids are continuous)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def compare(f32: np.ndarray, bf16: np.ndarray) -> dict:
    a, b = f32.ravel(), bf16.ravel()
    top = lambda x, k: set(np.argsort(-np.abs(x))[:k].tolist())  # noqa: E731
    return dict(max_abs_diff=float(np.abs(a - b).max()), spearman=spearman(a, b), pearson=float(np.corrcoef(a, b)[0, 1]),
                top5_overlap=len(top(a, 5) & top(b, 5)), top10_overlap=len(top(a, 10) & top(b, 10)),
                f32_range=float(np.abs(a).max()))  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "gemma3-270m"])
    p.add_argument("--n", type=int, default=8, help="IOI prompt pairs (the job's default: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write everything to this JSON file")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "DTYPE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.n, args.seed, Path(args.child[2]))
        return {}
    import tempfile

    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            runs = {}
            for dtype in ("float32", "bfloat16"):
                out = Path(tmp) / f"{name}-{dtype}"
                cmd = [sys.executable, __file__, "--n", str(args.n), "--seed", str(args.seed), "--child", name, dtype, str(out)]
                subprocess.run(cmd, check=True, env=os.environ)
                runs[dtype] = json.loads(out.with_suffix(".json").read_text())
                runs[dtype]["grid"] = np.load(out.with_suffix(".npz"))["result"]
            agree = compare(runs["float32"]["grid"], runs["bfloat16"]["grid"])
            report[name] = dict(agreement=agree, **{d: {k: v for k, v in r.items() if k != "grid"} for d, r in runs.items()})
            print(f"\n{name}: IOI head patching (z, layer x head), n={args.n}, seed={args.seed}")
            for d, r in runs.items():
                print(f"  {d:9s} clean {r['clean_metric']:+.4f} corrupt {r['corrupt_metric']:+.4f}  weights "
                      f"{r['weight_bytes'] / 2**20:6.1f} MiB  peak RSS after load {r['peak_rss_load'] / 2**20:6.1f} MiB, "
                      f"after the sweep {r['peak_rss'] / 2**20:6.1f} MiB  {r['seconds']:6.1f} s")  # fmt: skip
            print(f"  bf16 vs f32: max |diff| {agree['max_abs_diff']:.4f} (f32 grid max |x| {agree['f32_range']:.3f}), "
                  f"Spearman {agree['spearman']:.4f}, Pearson {agree['pearson']:.4f}, top-5 overlap {agree['top5_overlap']}/5, "
                  f"top-10 {agree['top10_overlap']}/10")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
