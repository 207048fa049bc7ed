"""`circuits-jax attribute`: gradient estimates of a patching sweep (AtP, AtP*) or scores of every edge
(EAP, EAP-IG)."""

from __future__ import annotations

import argparse

from ._patch import run_patch
from .options import EDGE_METHODS, check_pair_outputs, count, mesh_of, place, prepare_pair, sweep_arguments


def add_attribute(sub) -> None:
    at = sub.add_parser(
        "attribute", help="gradient estimates of a patching sweep (same shapes and file layout) or of every edge", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax attribute --method atp --clean 'When Mary and John went to the store, John gave a drink to' \\\n"
               "      --corrupt 'When Mary and John went to the store, Mary gave a drink to' --answer ' Mary' --wrong ' John' \\\n"
               "      --site z --by layer,head --out runs/atp_z.npz --png runs/atp_z.png\n"
               "  (--method eap-ig scores every edge instead and writes scores [sources, destinations])",
    )  # fmt: skip
    at.add_argument("--method", choices=["atp", "atp-star", *EDGE_METHODS], default="atp",
                    help="atp: attribution patching; atp-star: with the attention-saturation fix (AtP*); eap, eap-ig, "
                         "eap-ig-activations: every edge of the graph, written as scores [sources, destinations]")  # fmt: skip
    sweep_arguments(at)
    at.add_argument("--graddrop", action="store_true", help="atp-star: add GradDrop (unsigned magnitudes)")
    at.add_argument("--steps", type=count(1), default=8, help="eap-ig*: interpolation steps")
    at.set_defaults(func=run_attribute, quiet=True)


def run_attribute(args) -> int:
    """atp / atp-star: the sweep's estimate (`run_patch`); eap, eap-ig, eap-ig-activations: every edge."""
    if args.method not in EDGE_METHODS:
        return run_patch(args)
    import numpy as np

    from ..graph import edge_attribution
    from ..models import atomic_path, write_npz
    from ..plot import edge_heatmap

    mesh = mesh_of(args)
    check_pair_outputs(args)  # the prompts, --out (.npz added when missing) and --png, before the model loads
    model, tok, clean, corrupt, metric = prepare_pair(args)
    r = edge_attribution(model, clean, corrupt, metric, args.method, steps=args.steps, noising=args.noising, mesh=mesh)
    g = r.graph
    write_npz(
        place(args.out), scores=r.scores, sources=np.array(g.sources), destinations=np.array(g.destinations), mask=g.mask,
        clean_metric=r.clean_metric, corrupt_metric=r.corrupt_metric, method=args.method, seconds=r.seconds,
        str_tokens=np.array(tok.to_str_tokens(clean)), noising=args.noising, steps=args.steps,
    )  # fmt: skip
    if args.png:
        with atomic_path(place(args.png)) as tmp:
            edge_heatmap(r, title=f"{args.method} edge scores; logit diff {args.answer!r} - {args.wrong!r}", path=tmp)
    print(f"{args.method}: {g.n_edges} edges scored in {r.seconds:.1f}s "
          f"(scores [{len(g.sources)} sources, {len(g.destinations)} destinations])")  # fmt: skip
    print(f"clean logit diff {r.clean_metric:.4f}, corrupt {r.corrupt_metric:.4f}; top edges (normalised change):")
    for name, v in r.top(8):
        print(f"  {name}: {v / (r.clean_metric - r.corrupt_metric):+.3f}")
    print(f"wrote {args.out}" + (f" and {args.png}" if args.png else ""))
    return 0
