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
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import circuits_jax as cj
from circuits_jax import _activations as A

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transcoders", default="runs/transcoders")
    p.add_argument("--out", default="runs/graphs")
    p.add_argument("--examples", type=int, default=48, help="corpus contexts for each kept feature's top examples")
    p.add_argument("--corpus", default="python-docs")
    p.add_argument("--max-feature-nodes", type=int, default=None)
    p.add_argument("--reuse", action="store_true", help="load OUT/<slug>/graph.npz where it exists instead of recomputing")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = cj.load("smollm2")
    ts = cj.load_transcoders(args.transcoders, model=model, model_name="smollm2")
    decode = lambda i: tok.decode([int(i)])  # noqa: E731
    ctx = A.pack_contexts(tok, A.read_corpus(args.corpus), 64, max_contexts=4000)[-args.examples :]  # the corpus's tail
    graphs, pruned, summary = {}, {}, {"graphs": {}, "swaps": []}
    for slug, prompt in {**GRAPHS, **EXTRA}.items():
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
        feats = cj.feature_examples(model, ts, keep, ctx, decode=decode, progress=not args.quiet) if slug in GRAPHS else None
        s = cj.write_graph(out / slug, g, slug=slug, pruned=pr, features=feats, title=prompt)
        s["examples_seconds"] = time.perf_counter() - t0
        graphs[slug], pruned[slug] = g, pr
        summary["graphs"][slug] = s
        print(f"[{slug}] {prompt!r}: {len(ids)} tokens, top {g.logit_strs[0]!r} p={g.logit_probs[0]:.3f}; {s['active_features']} active "
              f"features in {s['backward_passes']} backward passes, {s['seconds']:.1f} s; pruned {s['nodes']} nodes / "
              f"{s['links']} links; replacement {s['replacement']:.3f}, completeness {s['completeness']:.3f}", flush=True)  # fmt: skip

    for target, source, (tc, sc), answers in SWAPS:
        rows = swap_experiment(model, tok, ts, graphs[target], graphs[source], pruned[target], pruned[source], tc, sc, answers)
        summary["swaps"].append(dict(target=target, source=source, concept=[tc, sc], answers=list(answers), rows=rows))
        print(f"\n{graphs[target].prompt!r}: swap{tc!r} -> {sc!r}; P({answers[0]!r}) / P({answers[1]!r}) / top token")
        for r in rows:
            print(f"  {r['condition']:<58} {r['p_target']:.4f} / {r['p_source']:.4f} / {r['top']!r}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))


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
    main()
