"""Causal scrubbing of the induction hypothesis on the trained 2-layer attention-only model.

Trains (or retrains: deterministic per seed) `cj.known.induction_model(seed)`, finds its
previous-token and induction heads from attention patterns (`head_scores`), and scrubs, over
`--trees` sampled input trees from a dataset of repeated random sequences `[BOS, r_1..r_n, r_1..r_n]`
(loss: cross-entropy of r_n predicted at the second-to-last position):

- `identity`: every path claimed with exact inputs (sanity: recovers 1);
- `induction`: the induction hypothesis (`cj.induction_hypothesis`);
- `wrong prev-token head`: the same with the layer-0 head of lowest previous-token score as the
  previous-token head;
- `wrong value rule`: the induction heads' values claimed to carry the *current* token;
- `no K-composition`: the keys' previous-token input left out (resampled);
- `one induction head`: only the head with the highest induction score claimed.

    PYTHONUNBUFFERED=1 .venv/bin/python experiments/scrub_induction.py [--seed 0] [--trees 4000]

Writes benchmarks/results/scrubbing_induction.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np

import circuits_jax as cj
from circuits_jax import (NextTokenLoss, current_token, identity_hypothesis, induction_hypothesis, repeated_dataset,
                          scrub)  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trees", type=int, default=4000)
    ap.add_argument("--rows", type=int, default=4096, help="dataset size the trees' inputs are drawn from")
    ap.add_argument("--n", type=int, default=10, help="length of the repeated segment")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/scrubbing_induction.json"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    model, info = cj.known.induction_model(args.seed, progress=True)
    P, I = info["prev_token_heads"], info["induction_heads"]
    prev_scores, ind_scores = np.asarray(info["prev_token_scores"]), np.asarray(info["induction_scores"])
    wrong_prev = [int(np.argmin(prev_scores))]
    best_ind = [int(np.argmax(ind_scores))]
    print(f"trained in {info['train_seconds']:.1f}s; previous-token heads a0.h{P} (scores {np.round(prev_scores, 3)}), "
          f"induction heads a1.h{I} (scores {np.round(ind_scores, 3)}); wrong prev-token head a0.h{wrong_prev}")  # fmt: skip
    tokens = repeated_dataset(args.rows, args.n, model.cfg.d_vocab, args.seed + 1)

    hyps = {
        "identity": identity_hypothesis(model.cfg),
        "induction": induction_hypothesis(P, I),
        "wrong prev-token head": induction_hypothesis(wrong_prev, I),
        "wrong value rule": induction_hypothesis(P, I, value_feature=current_token),
        "no K-composition": induction_hypothesis(P, I, k_composition=False),
        "one induction head": induction_hypothesis(P, best_ind),
    }
    res = scrub(model, tokens, hyps, NextTokenLoss((-2,)), n=args.trees, seed=args.seed)
    print(res.table())
    print(f"scrubbing took {res.seconds:.1f}s ({jax.devices()[0].platform})")

    out = dict(
        command=f"PYTHONUNBUFFERED=1 .venv/bin/python experiments/scrub_induction.py --seed {args.seed} --trees {args.trees}"
        f" --rows {args.rows} --n {args.n}",
        seed=args.seed, trees=args.trees, dataset_rows=args.rows, n=args.n, seq_len=int(tokens.shape[1]),
        loss="cross-entropy of r_n predicted at position 2n-1 (NextTokenLoss((-2,)))",
        prev_token_heads=P, induction_heads=I, wrong_prev_token_head=wrong_prev, best_induction_head=best_ind,
        prev_token_scores=prev_scores.tolist(), induction_scores=ind_scores.tolist(),
        model_loss=res.model_loss, empty_loss=res.empty_loss,
        hypotheses={k: dict(recovered=res.recovered[k], ci95=list(res.ci[k]), loss=res.loss[k],
                            nodes=[dict(name=nd.name, parent=nd.parent, edges=list(nd.edges) if not isinstance(nd.edges, str)
                                        else nd.edges, feature=getattr(nd.feature, "__name__", "exact tokens"))
                                   for nd in hyps[k].nodes] if k != "identity" else f"{len(hyps[k].nodes)} nodes, exact tokens")
                    for k in hyps},
        train_seconds=info["train_seconds"], scrub_seconds=res.seconds, total_seconds=time.perf_counter() - t0,
        device=jax.devices()[0].platform, machine=platform.machine(),
    )  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
