"""MIB faithfulness of edge-attribution circuits on SmolLM2 IOI: f(k), CPR and CMD, with wall-clock seconds.

    .venv/bin/python benchmarks/faithfulness.py [--steps 8] [--json out.json]

For EAP, EAP-IG (inputs) and EAP-IG (activations), scored in the noising direction (the circuit
runs on the clean prompt with every other edge carrying its corrupt value, so an edge's score
should estimate what cutting it costs): the circuits of the top k% edges by |score| for MIB's
k in {0.1, ..., 100}%, scored with `cj.faithfulness` (one compiled program per method), and
the seconds taken by the scoring and by the evaluation. The 8 ABBA prompts of
experiments/ioi_path_patching.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import circuits_jax as cj

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from ioi_path_patching import ioi_batch  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    model, tok = cj.load("smollm2")
    clean, corrupt, metric, _ = ioi_batch(tok)
    report = {}
    ks = np.asarray(cj.FAITHFULNESS_KS) * 100
    print(f"SmolLM2 IOI, {clean.shape[0]} prompt pairs of {clean.shape[1]} tokens; edges {cj.Graph.of(model.cfg).n_edges}")
    print("| method | score s | evaluate s | " + " | ".join(f"f({k:g}%)" for k in ks) + " | CPR | CMD |")
    print("|---|---:|---:|" + "---:|" * (len(ks) + 2))
    for method in cj.EDGE_METHODS:
        t = time.perf_counter()
        scores = cj.edge_attribution(model, clean, corrupt, metric, method, steps=args.steps, noising=True)
        score_s = time.perf_counter() - t
        t = time.perf_counter()
        r = cj.faithfulness(model, clean, corrupt, metric, scores)
        eval_s = time.perf_counter() - t
        report[method] = dict(score_s=score_s, eval_s=eval_s, f=r["f"].tolist(), cpr=r["cpr"], cmd=r["cmd"],
                              full=r["full"], empty=r["empty"], edges=r["edges"])  # fmt: skip
        print(f"| {method} | {score_s:.1f} | {eval_s:.1f} | " + " | ".join(f"{v:.3f}" for v in r["f"])
              + f" | {r['cpr']:.3f} | {r['cmd']:.3f} |", flush=True)  # fmt: skip
    print(f"m(model) {r['full']:.3f}, m(empty circuit) {r['empty']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
