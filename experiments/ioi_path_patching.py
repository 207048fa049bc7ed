"""IOI on SmolLM2 by path patching: which heads carry the name to the final position, and through what.

    .venv/bin/python experiments/ioi_path_patching.py [--out-dir out/ioi_paths]

Wang et al. (2022) found GPT-2's IOI circuit by path patching backwards from the logits:
first the heads whose *direct* path to the logits moves the name (name movers), then the heads
whose path into the name movers' queries steers them (S-inhibition heads). This script runs the
same two steps on SmolLM2 over a batch of ABBA prompts (denoising: clean runs patched into the
corrupt run where the subject names are swapped), draws a `[layer, head]` heatmap per receiver
group, and prints the strongest senders. Step 2 is repeated for the name movers' keys and values.
"""

import argparse
from pathlib import Path

import numpy as np

import circuits_jax as cj
from circuits_jax.plot import heatmap

TEMPLATE = "When{a} and{b} went to the store,{s} gave a drink to"
NAMES = [(" Mary", " John"), (" Tom", " Anna"), (" James", " Sarah"), (" David", " Lisa"),
         (" John", " Mary"), (" Anna", " Tom"), (" Sarah", " James"), (" Lisa", " David")]  # fmt: skip


def ioi_batch(tok):
    """Clean: 'When A and B ..., B gave a drink to' (answer A); corrupt: the subject is A (answer B)."""
    clean = [TEMPLATE.format(a=a, b=b, s=b) for a, b in NAMES]
    corrupt = [TEMPLATE.format(a=a, b=b, s=a) for a, b in NAMES]
    ct = np.concatenate([tok.to_tokens(p) for p in clean])
    xt = np.concatenate([tok.to_tokens(p) for p in corrupt])
    answer = np.array([tok.to_single_token(a) for a, _ in NAMES])
    wrong = np.array([tok.to_single_token(b) for _, b in NAMES])
    return ct, xt, cj.LogitDiff(answer, wrong), tok.to_str_tokens(ct[:1])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out-dir", default="out/ioi_paths")
    ap.add_argument("--top", type=int, default=3, help="name movers to trace back from")
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = cj.load("smollm2")
    clean, corrupt, metric, _ = ioi_batch(tok)
    H = model.cfg.n_heads

    direct = cj.path_patch(model, clean, corrupt, metric, receivers="logits", progress=False)
    print(f"{len(NAMES)} ABBA prompts; clean logit diff {direct.clean_metric:.3f}, corrupt {direct.corrupt_metric:.3f}")
    heatmap(direct.result, direct.axes, title="path patching: heads -> logits (direct path)", path=out / "to_logits.png")
    flat = direct.result.ravel()
    order = np.argsort(-np.abs(flat))
    print("heads -> logits:", ", ".join(f"L{i // H}H{i % H} {flat[i]:+.3f}" for i in order[:8]))
    movers = [f"a{i // H}.h{i % H}" for i in order[: args.top] if flat[i] > 0]
    print(f"name movers (largest positive direct effect): {', '.join(movers)}")

    kv = "kv" if model.cfg.kv_heads != H else "h"
    groups = {
        "q": ",".join(f"{m}<q>" for m in movers),
        # keys and values belong to kv heads: the kv head each mover reads
        "k": ",".join(sorted({f"{m.split('.')[0]}.{kv}{int(m.split('.h')[1]) // model.cfg.group_size}<k>" for m in movers})),
        "v": ",".join(sorted({f"{m.split('.')[0]}.{kv}{int(m.split('.h')[1]) // model.cfg.group_size}<v>" for m in movers})),
    }
    res = cj.path_patch(model, clean, corrupt, metric, receivers=list(groups.values()), progress=False)
    for (which, spec), r in zip(groups.items(), res.result):
        heatmap(r, res.axes[1:], title=f"path patching: heads -> name movers' {which} ({spec})", path=out / f"to_movers_{which}.png")
        f = r.ravel()
        top = np.argsort(-np.abs(f))[:6]
        print(f"heads -> movers' {which} [{spec}]: " + ", ".join(f"L{i // H}H{i % H} {f[i]:+.3f}" for i in top))
    # how much of each receiver group's effect all heads (or all MLPs, or everything upstream) carry together
    g = cj.Graph.of(model.cfg)
    senders = {"all heads": "a*", "all MLPs": "m*", "every source": "*"}
    for which, spec in {"logits": "logits", **groups}.items():
        sets = np.zeros((len(senders), *g.mask.shape), np.float32)
        for r, pat in enumerate(senders.values()):
            sets[r][np.ix_(g.select(pat, of="sources"), g.select(spec))] = 1
        raw = cj.patch_edges(model, clean, corrupt, metric, sets, progress=False)
        norm = (raw - direct.corrupt_metric) / (direct.clean_metric - direct.corrupt_metric)
        print(f"together -> {which}: " + ", ".join(f"{k} {v:+.3f}" for k, v in zip(senders, norm)))
    print(f"{direct.result.size * (1 + len(groups))} path patches in {direct.seconds + res.seconds:.1f}s; plots in {out}/")


if __name__ == "__main__":
    main()
