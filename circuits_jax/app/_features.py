"""`circuits-jax features`: per-feature dashboards of a trained dictionary as one static HTML page."""

from __future__ import annotations

import argparse

from .options import model_arguments, count, load_with_tokenizer, out_file


def add_features(sub) -> None:
    fe = sub.add_parser(
        "features", help="per-feature dashboards of a trained dictionary as one static HTML page",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax features runs/sae6 --html --n 40    # writes runs/sae6/features.html",
    )  # fmt: skip
    fe.add_argument("dir", help="a train-sae output directory (or its dictionary/ folder)")
    fe.add_argument("--html", action="store_true", help="write the dashboards page")
    fe.add_argument("--out", help="HTML file (default DIR/features.html)")
    fe.add_argument("--n", type=count(1), default=32, help="features to show")
    fe.add_argument("--how", default="random", choices=["random", "top_density", "top_max"], help="which features")
    fe.add_argument("--contexts", type=count(1), default=256, help="corpus contexts to scan")
    fe.add_argument("--ctx-len", type=count(2), default=64)
    model_arguments(fe, default=None, help="override the model recorded with the dictionary")
    fe.add_argument("--corpus", help="override the corpus recorded with the dictionary")
    fe.add_argument("--seed", type=int, default=0)
    fe.set_defaults(func=run_features)


def run_features(args) -> int:
    from pathlib import Path

    from ..dictionaries import (
        DEFAULT_CORPUS,
        dashboard_data,
        dictionary_info,
        feature_stats,
        load_dictionary,
        pack_contexts,
        read_corpus,
        select_features,
        write_dashboards,
    )
    from ..models import atomic_path

    root = Path(args.dir)
    ddir = root / "dictionary" if (root / "dictionary" / "dictionary.json").exists() else root
    info = dictionary_info(ddir)
    if info["kind"] == "clt":
        raise ValueError("dashboards are per SAE or transcoder; a cross-layer transcoder has none yet")
    if not args.html:
        raise ValueError("nothing to do: pass --html to write the dashboards page")
    # the page: --out, else DIR/features.html; checked writable before the dictionary and the model load
    out = out_file(args.out or root / "features.html", "--out" if args.out else "the page in DIR,",
                   like="features.html")
    d = load_dictionary(ddir)
    meta = info.get("info", {})
    model_name = args.model or meta.get("model") or "smollm2"
    model, tok = load_with_tokenizer(model_name, args.dtype)
    corpus = args.corpus or meta.get("corpus") or DEFAULT_CORPUS
    ctx = pack_contexts(tok, read_corpus(corpus), args.ctx_len, max_contexts=args.contexts)
    stats = feature_stats(model, d, ctx)
    feats = select_features(stats, args.how, n=args.n, seed=args.seed, width=d.width)
    data = dashboard_data(model, tok, d, ctx, feats)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # written whole: an interrupted run leaves no half page
        write_dashboards(tmp, data, title=f"{info['arch']} {d.out_site} ({d.width} latents) on {corpus}")
    dead = float((stats["density"] == 0).mean())
    print(f"{len(feats)} features ({args.how}) over {stats['n_tokens']} tokens; {dead:.1%} of latents never fired there")
    print(f"wrote {out}")
    return 0
