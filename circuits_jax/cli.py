"""The `circuits-jax` command line."""

from __future__ import annotations

import argparse
import json
import sys

from ._patching import SITES as PATCH_SITES

EDGE_METHODS = ("eap", "eap-ig", "eap-ig-activations")


def _predict(args) -> int:
    import jax
    import numpy as np

    from .loaders._registry import load

    model, tok = load(args.model)
    if tok is None:
        print(f"model {args.model!r} has no tokenizer (no tokenizer.json beside it)", file=sys.stderr)
        return 2
    ids = tok.encode(args.prompt, prepend_bos=args.bos)
    if not ids:
        print("the prompt tokenizes to nothing; give some text or --bos", file=sys.stderr)
        return 2
    logits = np.asarray(jax.jit(lambda m, t: m(t))(model, np.asarray([ids], np.int32))[0, -1])
    k = max(1, min(args.top_k, logits.shape[-1]))
    top = np.argsort(-logits, kind="stable")[:k]
    rows = [[tok.decode([int(i)]), int(i), float(logits[i])] for i in top]
    if args.json:
        print(json.dumps({"tokens": [int(i) for i in ids], "top": rows}))
        return 0
    print(f"model: {args.model}   tokens ({len(ids)}):")
    print("  " + " ".join(f"{s!r}" for s in tok.to_str_tokens(ids)))
    print(f"top {k} next tokens:")
    for rank, (text, i, logit) in enumerate(rows, 1):
        print(f"  {rank:>3}. {text!r:<20} id {i:<7} logit {logit:8.3f}")
    return 0


def _prepare(args):
    """Model, tokenizer, token arrays and the logit-difference metric of a clean/corrupt pair (or an exit code)."""
    import numpy as np

    from ._metrics import LogitDiff
    from .loaders._registry import load

    model, tok = load(args.model)
    if tok is None:
        print(f"model {args.model!r} has no tokenizer (no tokenizer.json beside it)", file=sys.stderr)
        return 2
    clean, corrupt = tok.to_tokens(args.clean, args.bos), tok.to_tokens(args.corrupt, args.bos)
    if clean.shape != corrupt.shape:
        print(
            f"circuits-jax: error: clean prompt has {clean.shape[1]} tokens {tok.to_str_tokens(clean)} and corrupt has "
            f"{corrupt.shape[1]} {tok.to_str_tokens(corrupt)}; patching needs prompts of equal token length",
            file=sys.stderr,
        )
        return 2
    metric = LogitDiff(np.array([tok.to_single_token(args.answer)]), np.array([tok.to_single_token(args.wrong)]))
    return model, tok, clean, corrupt, metric


def _patch(args) -> int:
    import numpy as np

    from ._patching import patch_sweep
    from .plot import heatmap

    method = getattr(args, "method", "exact")
    if method in EDGE_METHODS:
        return _edges(args)
    by = tuple(a.strip() for a in args.by.split(",") if a.strip())
    prepared = _prepare(args)
    if isinstance(prepared, int):
        return prepared
    model, tok, clean, corrupt, metric = prepared
    layers = None
    if method == "atp":
        from ._attribution import attribution_patch

        r = attribution_patch(model, clean, corrupt, metric, args.site, by, noising=args.noising)
    elif method == "atp-star":
        from ._attribution import atp_star

        r = atp_star(model, clean, corrupt, metric, args.site, by, graddrop=args.graddrop, noising=args.noising)
    else:
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
        r = patch_sweep(model, clean, corrupt, metric, args.site, by, noising=args.noising, chunk_size=args.chunk_size,
                        memory_budget=int(args.memory_gb * 2**30), layers=layers, progress=not args.quiet)  # fmt: skip
    str_tokens = tok.to_str_tokens(clean)
    np.savez(
        args.out, result=r.result, clean_metric=r.clean_metric, corrupt_metric=r.corrupt_metric,
        str_tokens=np.array(str_tokens), corrupt_str_tokens=np.array(tok.to_str_tokens(corrupt)),
        seconds=r.seconds, axes=np.array(r.axes), site=args.site, layers=np.array(layers or range(model.cfg.n_layers)),
        noising=args.noising, chunk_size=r.chunk_size, method=method,
    )  # fmt: skip
    if args.png:
        mode = "noising" if args.noising else "denoising"
        title = f"{args.site} by {','.join(by)} ({mode}, {method}); logit diff {args.answer!r} - {args.wrong!r}"
        heatmap(r.result, r.axes, tokens=str_tokens, title=title, path=args.png, layers=layers)
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


def _edges(args) -> int:
    """`attribute --method eap|eap-ig|eap-ig-activations`: scores of every edge of the graph."""
    import numpy as np

    from ._graph import edge_attribution
    from .plot import edge_heatmap

    prepared = _prepare(args)
    if isinstance(prepared, int):
        return prepared
    model, tok, clean, corrupt, metric = prepared
    r = edge_attribution(model, clean, corrupt, metric, args.method, steps=args.steps, noising=args.noising)
    g = r.graph
    np.savez(
        args.out, scores=r.scores, sources=np.array(g.sources), destinations=np.array(g.destinations), mask=g.mask,
        clean_metric=r.clean_metric, corrupt_metric=r.corrupt_metric, method=args.method, seconds=r.seconds,
        str_tokens=np.array(tok.to_str_tokens(clean)), noising=args.noising, steps=args.steps,
    )  # fmt: skip
    if args.png:
        edge_heatmap(r, title=f"{args.method} edge scores; logit diff {args.answer!r} - {args.wrong!r}", path=args.png)
    print(f"{args.method}: {g.n_edges} edges scored in {r.seconds:.1f}s "
          f"(scores [{len(g.sources)} sources, {len(g.destinations)} destinations])")  # fmt: skip
    print(f"clean logit diff {r.clean_metric:.4f}, corrupt {r.corrupt_metric:.4f}; top edges (normalised change):")
    for name, v in r.top(8):
        print(f"  {name}: {v / (r.clean_metric - r.corrupt_metric):+.3f}")
    print(f"wrote {args.out}" + (f" and {args.png}" if args.png else ""))
    return 0


def _path_patch(args) -> int:
    import numpy as np

    from ._graph import path_patch
    from .plot import heatmap

    prepared = _prepare(args)
    if isinstance(prepared, int):
        return prepared
    model, tok, clean, corrupt, metric = prepared
    senders = args.senders if args.senders in ("heads", "mlps") else args.senders.split(",")
    r = path_patch(model, clean, corrupt, metric, list(args.receivers), senders, noising=args.noising,
                   progress=not args.quiet)  # fmt: skip
    np.savez(
        args.out, result=r.result, raw=r.raw, axes=np.array(r.axes), receivers=np.array(args.receivers),
        senders=np.array(r.senders), clean_metric=r.clean_metric, corrupt_metric=r.corrupt_metric,
        seconds=r.seconds, noising=args.noising, str_tokens=np.array(tok.to_str_tokens(clean)),
    )  # fmt: skip
    print(f"path patching {len(r.senders)} senders into {len(args.receivers)} receiver group(s) in {r.seconds:.1f}s; "
          f"clean logit diff {r.clean_metric:.4f}, corrupt {r.corrupt_metric:.4f}")  # fmt: skip
    for spec, res in zip(args.receivers, r.result):
        flat = np.nan_to_num(res).reshape(-1)
        top = np.argsort(-np.abs(flat))[:5]
        print(f"  -> {spec}: " + ", ".join(f"{r.senders[j]} {flat[j]:+.3f}" for j in top))
    if args.png:
        from pathlib import Path

        for i, (spec, res) in enumerate(zip(args.receivers, r.result)):
            path = args.png if len(args.receivers) == 1 else str(Path(args.png).with_suffix(f".{i}.png"))
            if r.axes[1] == "sender":  # named senders have no layer axis: the npz and the printout carry them
                print("--png: named senders are not drawn; use --senders heads or mlps for a heatmap")
                break
            heatmap(res, r.axes[1:], title=f"path patching into {spec} ({'noising' if args.noising else 'denoising'}, direct paths)", path=path)
            print(f"wrote {path}")
        print(f"wrote {args.out}")
    else:
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="circuits-jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", help="tokens of a prompt and the top-K next tokens with logits")
    pr.add_argument("--model", default="smollm2", help="'smollm2' (default), a .gguf path, or an HF-format directory")
    pr.add_argument("--prompt", required=True)
    pr.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                    help="prepend BOS (default: the model's own setting; SmolLM2 uses none)")  # fmt: skip
    pr.add_argument("--top-k", type=int, default=10)
    pr.add_argument("--json", action="store_true", help='print {"tokens": [...], "top": [[text, id, logit], ...]}')
    pr.set_defaults(func=_predict)

    pa = sub.add_parser("patch", help="activation / attention patching sweep (clean into corrupt by default)")
    _sweep_arguments(pa)
    pa.add_argument("--layers", default=None, help="comma list of layers to patch (default all)")
    pa.add_argument("--chunk-size", type=int, default=None, help="patches per compiled call (default: automatic)")
    pa.add_argument("--memory-gb", type=float, default=4.0, help="memory budget that sets the chunk size")
    pa.add_argument("--quiet", action="store_true", help="no progress bar")
    pa.set_defaults(func=_patch)

    at = sub.add_parser("attribute", help="gradient estimates of a patching sweep (same shapes and file layout) or of every edge")
    at.add_argument("--method", choices=["atp", "atp-star", *EDGE_METHODS], default="atp",
                    help="atp: attribution patching; atp-star: with the attention-saturation fix (AtP*); eap, eap-ig, "
                         "eap-ig-activations: every edge of the graph, written as scores [sources, destinations]")  # fmt: skip
    _sweep_arguments(at)
    at.add_argument("--graddrop", action="store_true", help="atp-star: add GradDrop (unsigned magnitudes)")
    at.add_argument("--steps", type=int, default=8, help="eap-ig*: interpolation steps")
    at.set_defaults(func=_patch, quiet=True)

    pp = sub.add_parser("path-patch", help="path patching: each sender's direct effect through chosen receivers")
    _pair_arguments(pp)
    pp.add_argument("--receivers", action="append", required=True,
                    help="destinations: names or globs, comma separated ('a23.h*<q>', 'm12', 'logits'); repeat the "
                         "flag for several receiver groups")  # fmt: skip
    pp.add_argument("--senders", default="heads", help="'heads' (result [layer, head]), 'mlps', or names/globs")
    pp.add_argument("--quiet", action="store_true", help="no progress bar")
    pp.set_defaults(func=_path_patch)
    return p


def _pair_arguments(pa) -> None:
    """A model, a clean/corrupt prompt pair and the answers of the logit-difference metric."""
    pa.add_argument("--model", default="smollm2")
    pa.add_argument("--clean", required=True, help="clean prompt")
    pa.add_argument("--corrupt", required=True, help="corrupt prompt (same token length)")
    pa.add_argument("--answer", required=True, help="the clean answer (one token, e.g. ' Mary')")
    pa.add_argument("--wrong", required=True, help="the corrupt answer (one token)")
    pa.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None)
    pa.add_argument("--noising", action="store_true", help="patch corrupt into clean instead")
    pa.add_argument("--out", required=True, help="output .npz")
    pa.add_argument("--png", default=None, help="also draw a labelled heatmap")


def _sweep_arguments(pa) -> None:
    """Arguments shared by `patch` and `attribute`."""
    _pair_arguments(pa)
    pa.add_argument("--site", default="resid_pre", choices=list(PATCH_SITES))
    pa.add_argument("--by", default="layer,pos", help="comma list of axes, 'layer' first, e.g. layer,pos,head")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, NotImplementedError) as e:
        print(f"circuits-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
