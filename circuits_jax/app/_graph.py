"""`circuits-jax graph`: the attribution graph of a prompt through per-layer transcoders (circuit tracing)."""

from __future__ import annotations

import argparse

from .options import model_arguments, count, finite, load_with_tokenizer, out_dir


def add_graph(sub) -> None:
    gr = sub.add_parser(
        "graph", help="attribution graph of a prompt through per-layer transcoders (circuit tracing)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n"
        "  circuits-jax graph --model smollm2 --transcoders runs/transcoders --prompt 'The capital of France is' --out runs/graph_france\n"
        "writes OUT/graph.json (circuit-tracer / Neuronpedia schema), graph.html (open it in a browser), scores.json, graph.npz.\n"
        "Train the transcoders with experiments/train_transcoders.py.",
    )  # fmt: skip
    model_arguments(gr)
    gr.add_argument("--transcoders", required=True, help="directory of per-layer transcoders (layer_XX/dictionary)")
    gr.add_argument("--prompt", required=True, help="the prompt (BOS is prepended)")
    gr.add_argument("--out", required=True, help="output directory")
    gr.add_argument("--target", default="top", metavar="WHAT",
                    help="what the graph explains: top (the top logits, default), 'token: Paris' (one token's logit), "
                         "'diff: Paris| Rome' (a logit difference), or direction:FILE.npy (a [d_model] read-out)")  # fmt: skip
    gr.add_argument("--max-feature-nodes", type=count(1), default=None, help="feature rows to compute (default: every active feature)")
    gr.add_argument("--batch-size", type=count(1), default=64, help="target rows per compiled backward pass")
    gr.add_argument("--node-threshold", type=finite, default=0.8, help="share of influence the kept nodes hold")
    gr.add_argument("--edge-threshold", type=finite, default=0.98, help="share of influence the kept edges hold")
    gr.add_argument("--examples", type=count(0), default=64, help="corpus contexts scanned for each kept feature's top examples (0: none)")
    gr.add_argument("--corpus", default="pydoc-topics", help="corpus for the feature examples")
    gr.add_argument("--slug", help="graph name in the JSON")
    gr.add_argument("--quiet", action="store_true", help="no progress bars")
    gr.set_defaults(func=run_graph)


def run_graph(args) -> int:
    import time
    from pathlib import Path

    from ..attribution_graphs import attribute, feature_examples, load_transcoders, prune, write_graph
    from ..dictionaries import pack_contexts, read_corpus

    for name in ("node_threshold", "edge_threshold"):
        v = getattr(args, name)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be between 0 and 1, got {v}")
    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    if not Path(args.transcoders).is_dir():
        raise FileNotFoundError(f"--transcoders {args.transcoders} is not a directory (train them with experiments/train_transcoders.py)")
    out = out_dir(args.out)  # a folder we can write, before the model loads
    t0 = time.perf_counter()
    model, tok = load_with_tokenizer(args.model, args.dtype)
    ts = load_transcoders(args.transcoders, model=model, model_name=str(args.model))
    ids = tok.encode(args.prompt, prepend_bos=True)
    target = graph_target(args.target, tok, model.cfg.d_model)
    g = attribute(model, ts, ids, target=target, prompt=args.prompt, token_strs=tok.to_str_tokens(ids), decode=lambda i: tok.decode([i]),
                    max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size, progress=not args.quiet)  # fmt: skip
    features = None
    pruned = prune(g, args.node_threshold, args.edge_threshold)
    if args.examples > 0:
        keep = [(l, f) for i, (l, _, f) in enumerate(g.features.tolist()) if pruned.node_mask[i]]
        n_ctx = 64 if model.cfg.positional != "learned" else min(64, model.cfg.n_ctx)
        ctx = pack_contexts(tok, read_corpus(args.corpus), n_ctx, max_contexts=args.examples)
        features = feature_examples(model, ts, keep, ctx, decode=lambda i: tok.decode([i]), progress=not args.quiet)
    s = write_graph(out, g, slug=args.slug or "graph", pruned=pruned, features=features, title=args.prompt)
    print(f"prompt ({len(ids)} tokens): {args.prompt!r}")
    print(("top logits: " if target is None else "target: ") + ", ".join(f"{k!r} {v:.3f}" for k, v in s["logits"].items()))
    print(f"{s['active_features']} active features, {s['visited_features']} attributed in {s['backward_passes']} compiled backward "
          f"passes of {s['batch_size']} rows; {s['seconds']:.1f} s")  # fmt: skip
    print(f"pruned graph: {s['nodes']} nodes, {s['links']} links; replacement score {s['replacement']:.3f}, "
          f"completeness {s['completeness']:.3f}")  # fmt: skip
    print(f"wrote {out}/graph.json, graph.html, scores.json, graph.npz ({time.perf_counter() - t0:.0f} s in all)")
    return 0


def graph_target(text: str, tok, d_model: int):
    """`--target`: None (top), a token id, a pair of token ids, or a `[d_model]` array; errors name the flag."""
    import numpy as np

    kind, _, rest = text.partition(":")
    kind = kind.strip()
    if kind == "top" and not rest:
        return None

    def one(s: str) -> int:
        got = tok.encode(s, prepend_bos=False)
        if len(got) != 1:
            raise ValueError(f"--target {text!r}: {s!r} is {len(got)} tokens {got}; a target names one token (mind the "
                             "leading space: 'token: Paris')")  # fmt: skip
        return got[0]

    if kind == "token" and rest:
        return one(rest)
    if kind == "diff" and rest.count("|") == 1:
        a, b = rest.split("|")
        return one(a), one(b)
    if kind == "direction" and rest:
        v = np.load(rest.strip())
        if v.shape != (d_model,):
            raise ValueError(f"--target {text!r}: the direction has shape {v.shape}; the model needs ({d_model},)")
        return v
    raise ValueError(f"--target {text!r}: give top, 'token:TEXT', 'diff:TEXT|TEXT' or direction:FILE.npy")
