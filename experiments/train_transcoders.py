"""Per-layer transcoders for every SmolLM2 layer: the dictionaries attribution graphs read.

One activation store holds every layer's MLP input (`ln2.hook_normalized`) and output
(`hook_mlp_out`) for `--tokens` tokens of the corpus (float16 on disk); a TopK transcoder is
then trained per layer from it with the dictionary-learning loop. Everything resumes: the
store by chunk, finished layers are skipped, an interrupted layer restarts from its last
checkpoint. The evaluation prints each layer's held-out fraction of variance explained and the
model's next-token loss with every MLP replaced (transcoder output, no error terms), beside the
clean loss and the loss with every MLP zero-ablated; it writes OUT/eval.json.

    .venv/bin/python experiments/train_transcoders.py --out runs/transcoders            # train + evaluate
    .venv/bin/python experiments/train_transcoders.py --out runs/transcoders --no-eval  # train only
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import circuits_jax as cj
from circuits_jax.dictionaries import split_contexts, train_transcoders


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/transcoders")
    p.add_argument("--tokens", type=int, default=400_000)
    p.add_argument("--width", type=int, default=2304)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--dead-after", type=int, default=50_000)
    p.add_argument("--corpus", default="python-docs")
    p.add_argument("--eval-contexts", type=int, default=32, help="held-out contexts of 128 tokens for the evaluation")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    model, tok = cj.load("smollm2")
    print(f"model loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    manifest = train_transcoders(model, tok, out, arch="topk", k=args.k, width=args.width, n_tokens=args.tokens, corpus=args.corpus,
                                 train_cfg=dict(lr=args.lr, dead_after=args.dead_after), progress=not args.quiet,
                                 model_name="smollm2")  # fmt: skip
    print(f"transcoders ready in {time.perf_counter() - t0:.0f} s this run; store {manifest['seconds']['store']:.0f} s, "
          f"training {sum(v['seconds'] for v in manifest['layers'].values()):.0f} s in all", flush=True)  # fmt: skip
    if args.no_eval:
        return
    _, held_out = split_contexts(tok, args.corpus, n_tokens=args.tokens)  # the split train_transcoders made
    held_out = held_out[: args.eval_contexts]
    ts = cj.load_transcoders(out, model=model, model_name="smollm2")
    t0 = time.perf_counter()
    ev = dict(cj.evaluate_transcoders(model, ts, held_out, progress=not args.quiet))  # a dict: seconds and tokens are added
    ev["seconds"] = time.perf_counter() - t0
    ev["eval_tokens"] = int(held_out.shape[0] * (held_out.shape[1] - 1))
    (out / "eval.json").write_text(json.dumps(ev, indent=1))
    print("layer  FVE(held out)  L0")
    for l, (f, l0) in enumerate(zip(ev["fve"], ev["l0"])):
        print(f"{l:5d}  {f:13.3f}  {l0:5.1f}")
    print(f"next-token CE: clean {ev['ce_clean']:.3f}, every MLP replaced {ev['ce_replaced']:.3f}, every MLP zeroed "
          f"{ev['ce_zero']:.3f} (CE recovered {ev['ce_recovered']:.3f}); {ev['eval_tokens']} held-out tokens")  # fmt: skip


if __name__ == "__main__":
    main()
