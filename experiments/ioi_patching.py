"""IOI on SmolLM2: where does the model move the indirect object's name? (docs/patching.md)

    .venv/bin/python experiments/ioi_patching.py [--out-dir out/ioi]
"""

import argparse
from pathlib import Path

import numpy as np

import circuits_jax as cj
from circuits_jax.plot import heatmap

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out-dir", default="out/ioi")
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    model, tok = cj.load("smollm2")
    clean, corrupt = tok.to_tokens(CLEAN), tok.to_tokens(CORRUPT)
    metric = cj.LogitDiff(answer=np.array([tok.to_single_token(" Mary")]), wrong=np.array([tok.to_single_token(" John")]))
    str_tokens = tok.to_str_tokens(clean)

    blocks = cj.patch_every_block(model, clean, corrupt, metric)
    print(f"clean logit diff {blocks.clean_metric:.3f}, corrupt {blocks.corrupt_metric:.3f}")
    for name, res in zip(["resid_pre", "attn_out", "mlp_out"], blocks.result):
        heatmap(res, ("layer", "pos"), tokens=str_tokens, title=f"{name} by layer,pos", path=out / f"{name}.png")
        l, p = np.unravel_index(np.argmax(np.abs(res)), res.shape)
        print(f"{name:>9}: strongest at layer {l}, position {p} ({str_tokens[p]!r}): {res[l, p]:+.3f}")

    heads = cj.patch_sweep(model, clean, corrupt, metric, "z", ("layer", "head"))
    heatmap(heads.result, heads.axes, title="z by layer,head (all positions)", path=out / "z_heads.png")
    flat = heads.result.reshape(-1)
    top = np.argsort(-np.abs(flat))[:6]
    print("heads (all positions):", ", ".join(f"L{i // 9}H{i % 9} {flat[i]:+.3f}" for i in top))
    print(f"{heads.result.size} head patches in {heads.seconds:.1f}s; plots in {out}/")


if __name__ == "__main__":
    main()
