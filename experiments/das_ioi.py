"""DAS on SmolLM2-135M-Instruct: where does the END residual stream carry IOI's "which of the two
names is the indirect object" variable?

High-level model: the answer is the name that appears once. Variable P = the position of the IO
among the two first-mentioned names (P = 0: "A and B ... B gave to" -> A, ABBA; P = 1: BABA).
Pair: a base prompt and a source prompt (other names, place, object, template); the interchange
at the END position (the last token, " to") of layer l's `hook_resid_pre`; the counterfactual
answer is the base's name at the source's P: label = P_source over candidates [first name,
second name] of the base. Half the pairs have P_source != P_base (the answer must change), half
P_source == P_base (it must not). Only prompts the model itself answers (IO logit > S logit) are
used. IIA is argmax over the two candidates; we report it over all held-out pairs and over the
"changed" ones, for trained low-rank DAS (k = 1 by default), a random k-dim rotation, and the
full vector (k = D, ordinary activation patching of the END position).

    PYTHONUNBUFFERED=1 .venv/bin/python experiments/das_ioi.py --layer-step 3 --steps 50 --batch 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import circuits_jax as cj
from circuits_jax import toolshed as das
ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=192)
    ap.add_argument("--n-train", type=int, default=128)
    ap.add_argument("--layer-step", type=int, default=3)
    ap.add_argument("--layers", default=None, help="comma list of layers (overrides --layer-step)")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--method", default="low_rank", choices=das.METHODS)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/das_smollm2.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs/img/das_ioi_layers.png"))
    args = ap.parse_args()

    model, tok = cj.load("smollm2")
    pairs = das.ioi_position_pairs(model, tok, args.pairs, args.seed)
    N = len(pairs["base"])
    layers = ([int(x) for x in args.layers.split(",")] if args.layers
              else list(range(0, model.cfg.n_layers, args.layer_step)))
    print(f"{N} pairs ({pairs['changed'].sum()} changed), model IOI accuracy {pairs['model_accuracy']:.3f}; "
          f"layers {layers}", flush=True)  # fmt: skip
    t0 = time.time()
    res = das.das_search(model, pairs["base"], pairs["source"], pairs["labels"], pairs["candidates"],
                         kind="hook_resid_pre", layers=layers, k=args.k, method=args.method, n_train=args.n_train,
                         steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed)  # fmt: skip
    seconds = time.time() - t0
    ch = pairs["changed"][args.n_train :]
    sub = lambda c: c[:, ch].mean(-1).tolist()  # noqa: E731
    out = dict(
        command="PYTHONUNBUFFERED=1 .venv/bin/python experiments/das_ioi.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k not in ("out", "plot")),
        model="smollm2 (SmolLM2-135M-Instruct)", variable="IOI: position of the IO among the first two names",
        site="blocks.{l}.hook_resid_pre at END (last token)", seconds=seconds, n_changed_test=int(ch.sum()),
        model_ioi_accuracy=pairs["model_accuracy"], **res.to_json(),
        iia_changed=sub(res.correct), iia_random_changed=sub(res.correct_random), iia_full_changed=sub(res.correct_full),
        iia_unchanged=res.correct[:, ~ch].mean(-1).tolist(),
    )  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k.startswith("iia") or k == "layers"}), flush=True)
    from circuits_jax.plot import das_layers

    das_layers(out, args.plot, title=f"DAS on SmolLM2 IOI (END, resid_pre, {args.method} k={args.k})")
    print(f"{seconds:.0f} s; wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
