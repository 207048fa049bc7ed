"""`circuits-jax patch`: an activation / attention patching sweep, written as .npz and a heatmap.

`run_patch` also runs `attribute --method atp|atp-star`: the gradient estimates of the same sweep,
with the same shapes and file layout."""

from __future__ import annotations

import argparse

from ..core import PATCH_SITES
from .options import check_pair_outputs, chunk, layer_list, mesh_of, place, positive, prepare_pair, sweep_arguments


def add_patch(sub) -> None:
    pa = sub.add_parser(
        "patch", help="activation / attention patching sweep (clean into corrupt by default)", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax patch --clean 'When Mary and John went to the store, John gave a drink to' \\\n"
               "      --corrupt 'When Mary and John went to the store, Mary gave a drink to' --answer ' Mary' --wrong ' John' \\\n"
               "      --site z --by layer,head --out runs/patch_z.npz --png runs/patch_z.png",
    )  # fmt: skip
    sweep_arguments(pa)
    pa.add_argument("--layers", default=None, help="comma list of layers to patch (default all)")
    pa.add_argument("--chunk-size", type=chunk, default=None,
                    help="patches per compiled call (default: automatic), or 'plan': measured from the compiled program "
                         "against --memory-gb, refused up front when one patch does not fit")  # fmt: skip
    pa.add_argument("--memory-gb", type=positive, default=4.0, help="memory budget that sets the chunk size")
    pa.add_argument("--quiet", action="store_true", help="no progress bar")
    pa.set_defaults(func=run_patch)


def run_patch(args) -> int:
    """The exact sweep (`patch`) or its AtP / AtP* estimate (`attribute --method atp|atp-star`)."""
    import numpy as np

    from ..models import atomic_path, write_npz
    from ..patching import patch_sweep
    from ..plot import heatmap

    method = getattr(args, "method", "exact")
    by = tuple(a.strip() for a in args.by.split(",") if a.strip())
    mesh = mesh_of(args)  # a bad --mesh fails before the model loads
    axes = PATCH_SITES[args.site][1]
    if not by or by[0] != "layer" or len(set(by)) != len(by) or any(a not in ("layer", *axes) for a in by):
        raise ValueError(f"invalid axes {args.by!r} for --by with --site {args.site}: give 'layer' first, then any of "
                         f"{', '.join(axes)}")  # fmt: skip
    layers = layer_list(args.layers, "--layers") if getattr(args, "layers", None) else None
    check_pair_outputs(args)  # the prompts, --out (.npz added when missing) and --png, before the model loads
    model, tok, clean, corrupt, metric = prepare_pair(args)
    if method == "atp":
        from ..patching import attribution_patch

        r = attribution_patch(model, clean, corrupt, metric, args.site, by, noising=args.noising, mesh=mesh)
    elif method == "atp-star":
        from ..patching import atp_star

        r = atp_star(model, clean, corrupt, metric, args.site, by, graddrop=args.graddrop, noising=args.noising,
                     mesh=mesh)
    else:
        r = patch_sweep(model, clean, corrupt, metric, args.site, by, noising=args.noising, chunk_size=args.chunk_size,
                        memory_budget=int(args.memory_gb * 2**30), layers=layers, progress=not args.quiet,
                        mesh=mesh)  # fmt: skip
    str_tokens = tok.to_str_tokens(clean)
    write_npz(
        place(args.out), result=r.result, clean_metric=r.clean_metric, corrupt_metric=r.corrupt_metric,
        str_tokens=np.array(str_tokens), corrupt_str_tokens=np.array(tok.to_str_tokens(corrupt)),
        seconds=r.seconds, axes=np.array(r.axes), site=args.site, layers=np.array(layers or range(model.cfg.n_layers)),
        noising=args.noising, chunk_size=r.chunk_size, method=method,
    )  # fmt: skip
    if args.png:
        mode = "noising" if args.noising else "denoising"
        title = f"{args.site} by {','.join(by)} ({mode}, {method}); logit diff {args.answer!r} - {args.wrong!r}"
        with atomic_path(place(args.png)) as tmp:
            heatmap(r.result, r.axes, tokens=str_tokens, title=title, path=tmp, layers=layers)
    n = r.result.size
    verb = "patched" if method == "exact" else f"estimated ({method})"
    print(f"{args.site} by {','.join(by)}: result {r.result.shape}, {n} patches {verb} in {r.seconds:.1f}s")
    print(f"clean logit diff {r.clean_metric:.4f}, corrupt {r.corrupt_metric:.4f}")
    flat = np.nan_to_num(r.result).reshape(-1)
    for j in np.argsort(-np.abs(flat))[:5]:
        where = ", ".join(f"{a}={i}" for a, i in zip(by, np.unravel_index(j, r.result.shape)))
        print(f"  {where}: {flat[j]:+.3f}")
    print(f"wrote {args.out}" + (f" and {args.png}" if args.png else ""))
    return 0

