"""`circuits-jax das`: distributed alignment search of IOI's IO-position variable, IIA per layer."""

from __future__ import annotations

import argparse
import json

from .options import model_arguments, count, layer_list, load_with_tokenizer, out_file, place, positive, site_kind


def add_das(sub) -> None:
    da = sub.add_parser(
        "das", help="distributed alignment search of IOI's IO-position variable, IIA per layer", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax das --layers 0,6,12,18,24 --method low_rank --k 1 --out runs/das/ioi.json\n"
               "writes the JSON and a plot of IIA per layer beside it (runs/das/ioi.png)",
    )  # fmt: skip
    model_arguments(da)
    da.add_argument("--kind", type=site_kind, default="hook_resid_pre", help="site kind at the END position, e.g. hook_resid_post")
    da.add_argument("--layers", default=None, help="'0-3' or '0,6,12' (default: every --layer-step-th layer)")
    da.add_argument("--layer-step", type=count(1), default=3)
    da.add_argument("--method", default="low_rank", choices=["das", "low_rank", "boundless"])
    da.add_argument("--k", type=count(1), default=1, help="interchanged rotated dimensions (initial boundary for boundless)")
    da.add_argument("--pairs", type=count(2), default=192)
    da.add_argument("--n-train", type=count(1), default=128)
    da.add_argument("--steps", type=count(1), default=50)
    da.add_argument("--batch", type=count(1), default=8)
    da.add_argument("--lr", type=positive, default=1e-2)
    da.add_argument("--seed", type=int, default=0)
    da.add_argument("--out", default=None, help="write the numbers to this .json (and a plot beside it)")
    da.add_argument("--quiet", action="store_true", help="no progress bar")
    da.set_defaults(func=run_das)


def run_das(args) -> int:
    """DAS on IOI's "position of the indirect object" variable: IIA per layer, JSON and a plot."""
    from ..models import atomic_path, write_text
    from ..plot import das_layers
    from ..toolshed import das_search, ioi_position_pairs

    layers = layer_list(args.layers, "--layers") if args.layers else None
    if not args.n_train < args.pairs:
        raise ValueError(f"--n-train {args.n_train} must be below --pairs {args.pairs}: the rest are held out for IIA")
    out = png = None
    if args.out:  # the JSON and the plot beside it, checked writable before the model loads
        out = out_file(args.out, like="das.json")
        png = out_file(out.with_suffix(".png"), "--out (its .png)")
        if png == out:
            raise ValueError(f"--out {args.out}: the plot goes beside the JSON as {png.name}; give a .json name")
    model, tok = load_with_tokenizer(args.model, args.dtype)
    pairs = ioi_position_pairs(model, tok, args.pairs, args.seed)
    layers = layers or list(range(0, model.cfg.n_layers, args.layer_step))
    res = das_search(model, pairs["base"], pairs["source"], pairs["labels"], pairs["candidates"], kind=args.kind,
                     layers=layers, k=args.k, method=args.method, n_train=args.n_train, steps=args.steps,
                     batch_size=args.batch, lr=args.lr, seed=args.seed, progress=not args.quiet)  # fmt: skip
    changed = pairs["changed"][res.n_train :]
    result = dict(res.to_json(), model_ioi_accuracy=pairs["model_accuracy"],
                  iia_changed=res.correct[:, changed].mean(-1).tolist(),
                  iia_random_changed=res.correct_random[:, changed].mean(-1).tolist(),
                  iia_full_changed=res.correct_full[:, changed].mean(-1).tolist())  # fmt: skip
    for i, l in enumerate(res.layers):
        print(f"layer {l:3d}: IIA {res.iia[i]:.3f} (changed {result['iia_changed'][i]:.3f}), random {res.iia_random[i]:.3f}, "
              f"full vector {res.iia_full[i]:.3f}")  # fmt: skip
    if out is not None:  # each file written whole: a temporary name, then renamed
        write_text(place(out), json.dumps(result, indent=1))
        with atomic_path(png) as tmp:
            das_layers(result, tmp, title=f"DAS {args.method} k={args.k} on IOI ({args.kind})")
        print(f"wrote {out} and {png}")
    return 0
