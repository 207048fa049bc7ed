"""`circuits-jax scrub`: causal scrubbing of the induction hypothesis on the trained induction model."""

from __future__ import annotations

import argparse
import json

from .options import count, out_file, place


def add_scrub(sub) -> None:
    sc = sub.add_parser(
        "scrub", help="causal scrubbing of the induction hypothesis on the trained induction model", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax scrub --trees 1000 --wrong-prev 0 --out runs/scrub.json\n"
               "trains the 2-layer attention-only induction model first (cj.known.induction_model(SEED): 20-60 s on two\n"
               "CPU cores, on every run, as it is not cached)",
    )  # fmt: skip
    sc.add_argument("--seed", type=int, default=0, help="training seed of cj.known.induction_model")
    sc.add_argument("--prev-heads", default="auto", help="layer-0 previous-token heads, e.g. '2' (auto: from attention)")
    sc.add_argument("--induction-heads", default="auto", help="layer-1 induction heads, e.g. '0,1' (auto: from attention)")
    sc.add_argument("--wrong-prev", type=int, default=None, help="also scrub with this layer-0 head as the previous-token head")
    sc.add_argument("--trees", type=count(2), default=1000, help="sampled input trees")
    sc.add_argument("--rows", type=count(2), default=4096, help="dataset rows the inputs are drawn from")
    sc.add_argument("--n", type=count(1), default=10, help="length of the repeated segment")
    sc.add_argument("--out", default=None, help="write the numbers to this .json")
    sc.add_argument("--quiet", action="store_true", help="no progress bars")
    sc.set_defaults(func=run_scrub)


def run_scrub(args) -> int:
    """Causal scrubbing of the induction hypothesis (and a variant with another previous-token head) on the
    trained induction model: loss recovered with a 95 % interval per hypothesis."""
    import numpy as np

    from ..graph import NextTokenLoss, induction_hypothesis, repeated_dataset, scrub
    from ..tasks.known import INDUCTION_CONFIG, induction_model

    H = INDUCTION_CONFIG.n_heads
    given = {}
    for what, text in (("--prev-heads", args.prev_heads), ("--induction-heads", args.induction_heads),
                       ("--wrong-prev", "auto" if args.wrong_prev is None else str(args.wrong_prev))):  # fmt: skip
        if text != "auto":
            try:
                hs = [int(h) for h in text.split(",") if h.strip()]
            except ValueError:
                hs = []
            if not hs or any(not 0 <= h < H for h in hs):
                raise ValueError(f"{what} {text!r}: need comma-separated head indices in [0, {H})")
            given[what] = hs
    out = out_file(args.out, like="scrub.json") if args.out else None  # a file we can write, before the model trains
    model, info = induction_model(args.seed, progress=not args.quiet)
    P = given.get("--prev-heads", info["prev_token_heads"])
    I = given.get("--induction-heads", info["induction_heads"])
    hyps = {f"induction (a0.h{P}, a1.h{I})": induction_hypothesis(P, I)}
    if args.wrong_prev is not None:
        hyps[f"induction (a0.h[{args.wrong_prev}], a1.h{I})"] = induction_hypothesis([args.wrong_prev], I)
    tokens = repeated_dataset(args.rows, args.n, model.cfg.d_vocab, args.seed + 1)
    res = scrub(model, tokens, hyps, NextTokenLoss((-2,)), n=args.trees, seed=args.seed, progress=not args.quiet)
    print(f"previous-token scores {np.round(info['prev_token_scores'], 3)}, induction scores "
          f"{np.round(info['induction_scores'], 3)}")  # fmt: skip
    print(res.table())
    if out is not None:
        from ..models import write_text

        write_text(place(out), json.dumps(dict(model_loss=res.model_loss, empty_loss=res.empty_loss, trees=res.n,
            hypotheses={k: dict(recovered=res.recovered[k], ci95=list(res.ci[k]), loss=res.loss[k]) for k in hyps}),
            indent=1))  # fmt: skip
        print(f"wrote {out}")
    return 0
