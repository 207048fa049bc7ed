"""Attribution graphs on SmolLM2 and a feature-swap experiment (docs/attribution_graphs.md).

Needs the per-layer transcoders of experiments/train_transcoders.py. For each prompt it writes
OUT/<slug>/{graph.json, graph.html, scores.json, graph.npz}; then, for each (target, source)
pair of prompts that differ in one concept token, it switches off the target's features that
the target's pruned graph keeps at that token, switches on the source's kept features there
(at 1x, 2x and 4x their activation), and reads the answer probabilities of the replacement
model with attention frozen and free. Also the whole-position swap (every feature at that token,
every layer; then features and error nodes, i.e. every MLP output there) and, for scale, the real
model with the token itself swapped.

    .venv/bin/python experiments/attribution_graphs.py --transcoders runs/transcoders --out runs/graphs
    circuits-jax experiment attribution-graph --quick        # France, Texas, California; one swap; a few minutes

OUT/report.html (default runs/attribution-graph) shows the pruned graph of "The capital of France
is" -> " Paris" (plot.attribution_graph), its replacement and completeness scores, a link to the
interactive OUT/france_capital/graph.html, every graph's scores and the swap tables. Shapes: a
graph's adjacency is `[N, N]` over N = features + L*T errors + T tokens + K logits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import circuits_jax as cj
from circuits_jax import dictionaries as A
from circuits_jax import plot
from circuits_jax.app import Report

GRAPHS = {
    "dallas_capital": "The capital of the state containing Dallas is",  # the seed's two-hop prompt
    "france_capital": "The capital of France is",
    "texas_capital": "The state capital of Texas is the city of",
    "california_capital": "The state capital of California is the city of",
    "dallas_state": "The city of Dallas is located in the state of",
    "oakland_state": "The city of Oakland is located in the state of",
}
# (target, source, concept token in each, answers to read: the target's, the source's)
SWAPS = [
    ("texas_capital", "california_capital", (" Texas", " California"), (" Austin", " Sacramento")),
    ("dallas_state", "oakland_state", (" Dallas", " Oakland"), (" Texas", " California")),
    ("dallas_capital", "oakland_capital", (" Dallas", " Oakland"), (" Austin", " Sacramento")),
]
EXTRA = {"oakland_capital": "The capital of the state containing Oakland is"}


REPORT_GRAPH = "france_capital"  # the capital-city prompt the report draws
REPORT_CONCEPT = " France"  # its concept token, described in the report
QUICK_GRAPHS = ("france_capital", "texas_capital", "california_capital")  # and the first swap


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="circuits-jax experiment attribution-graph", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  circuits-jax experiment attribution-graph --quick --out runs/attribution-graph\n"
                                       "  .venv/bin/python experiments/attribution_graphs.py --transcoders runs/transcoders --out runs/graphs")  # fmt: skip
    p.add_argument("--transcoders", default="runs/transcoders", help="directory of layer_XX/dictionary transcoders (experiments/train_transcoders.py)")
    p.add_argument("--out", default="runs/attribution-graph", help="output directory: report.html, summary.json, OUT/<slug>/graph.html ...")
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_GRAPHS)} and the first swap; 16 example contexts")
    p.add_argument("--examples", type=int, default=None, help="corpus contexts for each kept feature's top examples (default 48; --quick 16)")
    p.add_argument("--corpus", default="python-docs")
    p.add_argument("--max-feature-nodes", type=int, default=None)
    p.add_argument("--reuse", action="store_true", help="load OUT/<slug>/graph.npz where it exists instead of recomputing")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.examples is None:
        args.examples = 16 if args.quick else 48
    if args.examples < 1:
        p.error(f"--examples must be at least 1, got {args.examples}")
    return args


def _transcoders_missing(path: Path) -> str | None:
    if not path.is_dir():
        return f"{path} is not a directory"
    if not any(path.glob("layer_*/dictionary")):
        return f"{path} holds no layer_XX/dictionary folders"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    why = _transcoders_missing(Path(args.transcoders))
    if why:
        print(f"error: no transcoders: {why}. This experiment needs one transcoder per layer of SmolLM2; train them once with\n"
              f"  PYTHONUNBUFFERED=1 .venv/bin/python experiments/train_transcoders.py --out {args.transcoders}\n"
              "(hours on CPU, resumable), or pass --transcoders DIR.", file=sys.stderr)  # fmt: skip
        return 2
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = cj.load("smollm2")
    ts = cj.load_transcoders(args.transcoders, model=model, model_name="smollm2")
    decode = lambda i: tok.decode([int(i)])  # noqa: E731
    ctx = A.pack_contexts(tok, A.read_corpus(args.corpus), 64, max_contexts=4000)[-args.examples :]  # the corpus's tail
    prompts = {k: v for k, v in {**GRAPHS, **EXTRA}.items() if not args.quick or k in QUICK_GRAPHS}
    swaps = SWAPS[:1] if args.quick else SWAPS
    with_examples = {REPORT_GRAPH} if args.quick else set(GRAPHS)
    graphs, pruned, summary = {}, {}, {"graphs": {}, "swaps": []}
    for slug, prompt in prompts.items():
        ids = tok.encode(prompt, prepend_bos=True)
        if args.reuse and (out / slug / "graph.npz").exists():
            g = cj.AttributionGraph.load(out / slug / "graph.npz")
            graphs[slug], pruned[slug] = g, cj.prune_graph(g)
            summary["graphs"][slug] = json.loads((out / slug / "scores.json").read_text())
            continue
        g = cj.attribution_graph(model, ts, ids, prompt=prompt, token_strs=tok.to_str_tokens(ids), decode=decode,
                                 max_feature_nodes=args.max_feature_nodes, progress=not args.quiet)  # fmt: skip
        pr = cj.prune_graph(g)
        keep = [(l, f) for i, (l, _, f) in enumerate(g.features.tolist()) if pr.node_mask[i]]
        t0 = time.perf_counter()
        feats = cj.feature_examples(model, ts, keep, ctx, decode=decode, progress=not args.quiet) if slug in with_examples else None
        s = cj.write_graph(out / slug, g, slug=slug, pruned=pr, features=feats, title=prompt)
        s["examples_seconds"] = time.perf_counter() - t0
        graphs[slug], pruned[slug] = g, pr
        summary["graphs"][slug] = s
        print(f"[{slug}] {prompt!r}: {len(ids)} tokens, top {g.logit_strs[0]!r} p={g.logit_probs[0]:.3f}; {s['active_features']} active "
              f"features in {s['backward_passes']} backward passes, {s['seconds']:.1f} s; pruned {s['nodes']} nodes / "
              f"{s['links']} links; replacement {s['replacement']:.3f}, completeness {s['completeness']:.3f}", flush=True)  # fmt: skip

    for target, source, (tc, sc), answers in swaps:
        rows = swap_experiment(model, tok, ts, graphs[target], graphs[source], pruned[target], pruned[source], tc, sc, answers)
        summary["swaps"].append(dict(target=target, source=source, concept=[tc, sc], answers=list(answers), rows=rows))
        print(f"\n{graphs[target].prompt!r}: swap{tc!r} -> {sc!r}; P({answers[0]!r}) / P({answers[1]!r}) / top token")
        for r in rows:
            print(f"  {r['condition']:<58} {r['p_target']:.4f} / {r['p_source']:.4f} / {r['top']!r}")
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    path = write_report(out, graphs[REPORT_GRAPH], pruned[REPORT_GRAPH], summary, args)
    print(f"report: {path}")
    return 0


def write_report(out: Path, g, pr, summary: dict, args) -> Path:
    """OUT/report.html: the France graph (figure, scores, link to graph.html), all graphs' scores, the swaps."""
    s = summary["graphs"][REPORT_GRAPH]
    cmd = "circuits-jax experiment attribution-graph" + (" --quick" if args.quick else "") + f" --out {args.out}"
    rep = Report("Attribution graph of a capital-city prompt in SmolLM2-135M", out,
                 subtitle=f"transcoders {args.transcoders}; {len(summary['graphs'])} graphs; "
                          f"{'quick run' if args.quick else 'full run'}; circuits_jax")  # fmt: skip
    rep.heading("Question")
    rep.text(f"How does the model get from {g.prompt!r} to {g.logit_strs[0]!r}? An attribution graph replaces every MLP with a "
             "transcoder (a sparse dictionary trained to map the MLP's input to its output), freezes attention patterns and "
             "normalisation scales at their values on this prompt, and then every edge between features, input tokens, error "
             "nodes and output logits is an exact linear direct effect.")  # fmt: skip
    rep.heading("Method")
    rep.text("Each row of the adjacency matrix is one vector-Jacobian product of the frozen, linear replacement model; rows "
             "are batched into one compiled `vmap(vjp)` call (`cj.attribution_graph`). Pruning (`cj.prune_graph`) keeps the "
             f"nodes holding {s['node_threshold']:.0%} of the influence on the logits (influence = logit-probability-weighted "
             f"sum of all path products of the row-normalised |A|) and the edges holding {s['edge_threshold']:.0%}. The "
             "replacement score is the share of token-to-logit influence that does not pass through error nodes; the "
             "completeness score the influence-weighted share of node inputs that come from features and tokens rather "
             "than errors (circuit-tracer's definitions).")  # fmt: skip
    rep.code(cmd)
    rep.heading(f"The graph of {g.prompt!r}")
    rep.numbers({f"p({g.logit_strs[0]})": float(g.logit_probs[0]), "active features": s["active_features"],
                 "kept nodes": s["nodes"], "kept links": s["links"], "replacement score": s["replacement"],
                 "completeness score": s["completeness"], "graph seconds": round(s["seconds"], 1)})  # fmt: skip
    png = out / f"{REPORT_GRAPH}.png"
    plot.attribution_graph(g, pr, png)
    rep.figure(png, "the pruned graph's most influential nodes (at most 3 per layer x position cell, 80 in all) and its 150 "
               "strongest edges among them; x = token, y = layer; blue edges excite, red inhibit")  # fmt: skip
    rep.parts.append(f'<p>Explore every kept node and edge, with each feature\'s top-activating corpus contexts: '
                     f'<a href="{REPORT_GRAPH}/graph.html">{REPORT_GRAPH}/graph.html</a> (interactive; '
                     f'<a href="{REPORT_GRAPH}/graph.json">graph.json</a> in the circuit-tracer / Neuronpedia schema).</p>')  # fmt: skip
    S, T = g.n_features, g.n_pos
    kept = np.asarray(pr.node_mask, bool)
    rows = []
    for p in range(T):
        nf = int(sum(kept[i] and int(g.features[i][1]) == p for i in range(S)))
        ne = int(sum(kept[S + l * T + p] for l in range(g.n_layers)))
        rows.append([repr(g.token_strs[p]), nf, ne])
    rep.table(rows, ["token", "kept features", "kept error nodes"], caption="where the pruned graph's nodes sit")
    rep.table([[repr(t), float(q)] for t, q in zip(g.logit_strs, g.logit_probs)], ["logit node", "probability"],
              caption="the output logits the graph explains (95% of the probability, at most 10)")  # fmt: skip
    rep.save_arrays(f"{REPORT_GRAPH}_nodes", features=g.features, activations=g.activations, node_mask=pr.node_mask,
                    influence=cj.node_influence(g))  # fmt: skip
    rep.heading("Every graph of this run")
    rep.table([[slug, v["prompt"], max(v["logits"], key=v["logits"].get), v["active_features"], v["nodes"], v["links"],
                v["replacement"], v["completeness"], v["seconds"]] for slug, v in summary["graphs"].items()],
              ["graph", "prompt", "top token", "active features", "kept nodes", "kept links", "replacement", "completeness",
               "seconds"])  # fmt: skip
    if summary["swaps"]:
        rep.heading("Swapping a concept's features")
        rep.text("For a pair of prompts that differ in one concept token, switch off the target's features that its pruned "
                 "graph keeps at that token and switch on the source's kept features there (x1, x2, x4 their activation); "
                 "read the answer probabilities of the replacement model with attention frozen and free. For scale: every "
                 "feature (and error) at that token swapped, and the real model with the token itself replaced.")  # fmt: skip
        for sw in summary["swaps"]:
            rep.table([[r["condition"], r["p_target"], r["p_source"], repr(r["top"])] for r in sw["rows"]],
                      ["condition", f"P({sw['answers'][0]!r})", f"P({sw['answers'][1]!r})", "top token"],
                      caption=f"{sw['target']} <- {sw['source']}: {sw['concept'][0]!r} -> {sw['concept'][1]!r}")  # fmt: skip
    rep.heading("What it means")
    concept = ""
    if REPORT_CONCEPT in g.token_strs:
        p = g.token_strs.index(REPORT_CONCEPT)
        inf = cj.node_influence(g)
        inner = np.flatnonzero(kept[: g.token_slice.start])
        inner = inner[np.argsort(-inf[inner], kind="stable")]
        ranks = [r for r, i in enumerate(inner.tolist()) if i < S and int(g.features[i][1]) == p]
        concept = (f" At {REPORT_CONCEPT!r}, the token that names the country, the pruned graph keeps {rows[p][1]} features and "
                   f"{rows[p][2]} error nodes" + (f"; its most influential feature ranks {ranks[0] + 1} of the {len(inner)} kept "
                   "feature and error nodes, so what the graph carries from the country to ' Paris' is mostly error "
                   "(unexplained MLP output)." if ranks else "."))  # fmt: skip
    rep.text(f"The replacement score {s['replacement']:.3f} says that about {1 - s['replacement']:.0%} of the influence from "
             f"the input tokens to the logits passes through error nodes, i.e. through what the transcoders fail to "
             f"reconstruct; completeness {s['completeness']:.3f} is the share of node inputs the features and tokens "
             "explain. The figure shows where the explained part sits." + concept + " Feature-level stories drawn from this graph hold "
             "only as far as these scores go; docs/attribution_graphs.md discusses the transcoders' quality and the full "
             "run's seven graphs and three swaps.")  # fmt: skip
    rep.summary.update(summary)
    rep.summary.update(command=cmd, report_graph=REPORT_GRAPH)
    return rep.write()


def _position(tok, g, token: str) -> int:
    hits = [i for i, s in enumerate(g.token_strs) if s == token]
    if len(hits) != 1:
        raise ValueError(f"{token!r} occurs {len(hits)} times in {g.token_strs}")
    return hits[0]


def _kept_at(g, pr, pos: int) -> list[tuple[int, int, float]]:
    """(layer, feature, activation) of the pruned graph's features at position `pos`."""
    return [(int(l), int(f), float(a)) for i, ((l, p, f), a) in enumerate(zip(g.features, g.activations)) if pr.node_mask[i] and p == pos]


def swap_experiment(model, tok, ts, gt, gs, prt, prs, tc, sc, answers) -> list[dict]:
    ids_t = np.asarray(gt.tokens, np.int32)[None]
    ids_s = np.asarray(gs.tokens, np.int32)[None]
    tr_t, tr_s = cj.trace_replacement(model, ts, ids_t), cj.trace_replacement(model, ts, ids_s)
    pt, ps = _position(tok, gt, tc), _position(tok, gs, sc)
    a_ids = [tok.to_single_token(a) for a in answers]
    off = _kept_at(gt, prt, pt)
    on = _kept_at(gs, prs, ps)

    def read(logits, condition):
        pr = np.asarray(jax.nn.softmax(logits[0, -1]))
        return dict(condition=condition, p_target=float(pr[a_ids[0]]), p_source=float(pr[a_ids[1]]), top=tok.decode([int(pr.argmax())]))

    rows = []
    shape = tr_t.acts.shape
    for frozen in (True, False):
        att = "attention frozen" if frozen else "attention free"
        base, _ = cj.intervene(model, ts, tr_t, cj.edit_features(shape), freeze_attention=frozen)
        rows.append(read(base, f"no intervention ({att})"))
        sup = cj.edit_features(shape, set=[(l, pt, f, 0.0) for l, f, _ in off])
        rows.append(read(cj.intervene(model, ts, tr_t, sup, freeze_attention=frozen)[0], f"suppress {len(off)} kept {tc!r} features ({att})"))
        for mult in (1, 2, 4):
            e = cj.edit_features(shape, set=[(l, pt, f, 0.0) for l, f, _ in off] + [(l, pt, f, mult * a) for l, f, a in on])
            rows.append(read(cj.intervene(model, ts, tr_t, e, freeze_attention=frozen)[0],
                             f"suppress + inject {len(on)} {sc!r} features x{mult} ({att})"))  # fmt: skip
        whole = cj.inject_features(tr_t, tr_s, positions=[(pt, ps)])
        rows.append(read(cj.intervene(model, ts, tr_t, whole, freeze_attention=frozen)[0], f"every feature at {tc!r}, all layers ({att})"))
        # the same with the source's error nodes there too: the whole MLP output of every layer at that token
        errs = tr_t.errors.at[:, :, pt].set(tr_s.errors[:, :, ps])
        full, _ = cj.replacement_forward(model, ts, tr_t.tokens, frozen=tr_t.frozen, errors=errs, edit=whole, freeze_attention=frozen)
        rows.append(read(full, f"every feature and error at {tc!r}, all layers ({att})"))
    swapped = ids_t.copy()
    swapped[0, pt] = gs.tokens[ps]
    rows.append(read(model(jnp.asarray(swapped)), f"reference: real model, token {tc!r} replaced by {sc!r}"))
    return rows


if __name__ == "__main__":
    sys.exit(main())
