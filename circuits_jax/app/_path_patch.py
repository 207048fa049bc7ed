"""`circuits-jax path-patch`: each sender's direct effect through chosen receivers."""

from __future__ import annotations

import argparse

from .options import check_pair_outputs, out_file, pair_arguments, place, prepare_pair


def add_path_patch(sub) -> None:
    pp = sub.add_parser(
        "path-patch", help="path patching: each sender's direct effect through chosen receivers", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax path-patch --clean 'When Mary and John went to the store, John gave a drink to' \\\n"
               "      --corrupt 'When Mary and John went to the store, Mary gave a drink to' --answer ' Mary' --wrong ' John' \\\n"
               "      --receivers logits --senders heads --out runs/pp.npz --png runs/pp.png",
    )  # fmt: skip
    pair_arguments(pp)
    pp.add_argument("--receivers", action="append", required=True,
                    help="destinations: names or globs, comma separated ('a23.h*<q>', 'm12', 'logits'); repeat the "
                         "flag for several receiver groups")  # fmt: skip
    pp.add_argument("--senders", default="heads", help="'heads' (result [layer, head]), 'mlps', or names/globs")
    pp.add_argument("--quiet", action="store_true", help="no progress bar")
    pp.set_defaults(func=run_path_patch)


def run_path_patch(args) -> int:
    from pathlib import Path

    import numpy as np

    from ..graph import path_patch
    from ..models import atomic_path, write_npz
    from ..plot import heatmap

    check_pair_outputs(args)  # the prompts, --out (.npz added when missing) and --png, before the model loads
    pngs = []  # one heatmap per receiver group: --png itself, or PNG.0.png, PNG.1.png, ...
    if args.png:
        n = len(args.receivers)
        pngs = [args.png] if n == 1 else [str(Path(args.png).with_suffix(f".{i}.png")) for i in range(n)]
    for png in pngs:
        out_file(png, "--png")
    model, tok, clean, corrupt, metric = prepare_pair(args)
    senders = args.senders if args.senders in ("heads", "mlps") else args.senders.split(",")
    r = path_patch(model, clean, corrupt, metric, list(args.receivers), senders, noising=args.noising,
                   progress=not args.quiet)  # fmt: skip
    write_npz(
        place(args.out), result=r.result, raw=r.raw, axes=np.array(r.axes), receivers=np.array(args.receivers),
        senders=np.array(r.senders), clean_metric=r.clean_metric, corrupt_metric=r.corrupt_metric,
        seconds=r.seconds, noising=args.noising, str_tokens=np.array(tok.to_str_tokens(clean)),
    )  # fmt: skip
    print(f"path patching {len(r.senders)} senders into {len(args.receivers)} receiver group(s) in {r.seconds:.1f}s; "
          f"clean logit diff {r.clean_metric:.4f}, corrupt {r.corrupt_metric:.4f}")  # fmt: skip
    for spec, res in zip(args.receivers, r.result):
        flat = np.nan_to_num(res).reshape(-1)
        top = np.argsort(-np.abs(flat))[:5]
        print(f"  -> {spec}: " + ", ".join(f"{r.senders[j]} {flat[j]:+.3f}" for j in top))
    for path, spec, res in zip(pngs, args.receivers, r.result):
        if r.axes[1] == "sender":  # named senders have no layer axis: the npz and the printout carry them
            print("--png: named senders are not drawn; use --senders heads or mlps for a heatmap")
            break
        with atomic_path(place(path)) as tmp:
            heatmap(res, r.axes[1:], title=f"path patching into {spec} ({'noising' if args.noising else 'denoising'}, direct paths)", path=tmp)
        print(f"wrote {path}")
    print(f"wrote {args.out}")
    return 0
