"""The dictionaries recorded in docs/benchmarks.md ("Sparse dictionaries"), on SmolLM2 and CPU.

One activation store of layer L's residual stream, MLP input and MLP output feeds a TopK SAE
(resid_post) and a TopK transcoder (MLP L); a second store feeds a small cross-layer
transcoder over layers 0-3. Each run prints L0, explained variance and CE / KL recovered and
writes OUT/<name>/eval.json; `--parts` picks which to run. Re-running resumes.

    .venv/bin/python experiments/train_dictionaries.py --out runs/dicts            # all three
    .venv/bin/python experiments/train_dictionaries.py --out runs/dicts --parts sae
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import circuits_jax as cj
from circuits_jax import dictionaries as A
from circuits_jax.dictionaries import split_contexts, train_dictionary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/dicts")
    p.add_argument("--parts", default="sae,transcoder,clt")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--width", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--clt-layers", default="0-3")
    p.add_argument("--clt-tokens", type=int, default=250_000)
    p.add_argument("--clt-width", type=int, default=1024)
    p.add_argument("--clt-k", type=int, default=16)
    p.add_argument("--corpus", default="python-docs")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    parts = args.parts.split(",")
    t0 = time.perf_counter()
    model, tok = cj.load("smollm2")
    print(f"model loaded in {time.perf_counter() - t0:.1f} s")
    L = args.layer
    results = {}
    if "sae" in parts or "transcoder" in parts:
        sites = [f"blocks.{L}.hook_resid_post", f"blocks.{L}.ln2.hook_normalized", f"blocks.{L}.hook_mlp_out"]
        t0 = time.perf_counter()
        # the contexts train_dictionary holds out for evaluation stay out of the store
        train_ctx, _ = split_contexts(tok, args.corpus, n_tokens=args.tokens)
        A.build_store(model, train_ctx, sites, out / "store_L", n_tokens=args.tokens, progress=not args.quiet,
                      info=dict(model="smollm2", corpus=args.corpus, ctx_len=128))  # fmt: skip
        store_s = time.perf_counter() - t0
        print(f"store of {sites}: {store_s:.0f} s (a resumed build counts only this call)")
        for name, kw in (("sae", dict(site=sites[0])), ("transcoder", dict(site=sites[1], target=sites[2]))):
            if name not in parts:
                continue
            t0 = time.perf_counter()
            s = train_dictionary(model, tok, out / name, arch="topk", k=args.k, width=args.width, n_tokens=args.tokens,
                                 corpus=args.corpus, store_dir=out / "store_L", progress=not args.quiet, model_name="smollm2",
                                 **kw)  # fmt: skip
            s["seconds"]["store_shared"] = store_s
            s["seconds"]["total_with_store"] = time.perf_counter() - t0 + store_s
            results[name] = s
            _report(name, s)
    if "clt" in parts:
        a, b = (int(x) for x in args.clt_layers.split("-"))
        t0 = time.perf_counter()
        s = train_dictionary(model, tok, out / "clt", clt_layers=range(a, b + 1), arch="topk", k=args.clt_k, width=args.clt_width,
                             n_tokens=args.clt_tokens, corpus=args.corpus, progress=not args.quiet, model_name="smollm2")  # fmt: skip
        s["seconds"]["total_with_store"] = time.perf_counter() - t0
        results["clt"] = s
        _report("clt", s)
    (out / "summary.json").write_text(json.dumps(results, indent=1))


def _report(name: str, s: dict) -> None:
    keys = ("l0", "fve", "ce_clean", "ce_splice", "ce_zero", "ce_recovered", "kl_recovered", "dead", "dense")
    print(f"[{name}] " + " ".join(f"{k}={s[k]:.4g}" for k in keys))
    if s.get("layer_fvu"):
        print(f"[{name}] per-layer FVU " + " ".join(f"{v:.4f}" for v in s["layer_fvu"]))
    print(f"[{name}] seconds {json.dumps({k: round(v, 1) for k, v in s['seconds'].items()})}, "
          f"train step {s['tokens_per_second']:.0f} tokens/s")  # fmt: skip


if __name__ == "__main__":
    main()
