"""Concept vectors on SmolLM2: probes and diff-of-means by layer, PCA, TCAV, PURE (docs/concepts.md).

    PYTHONUNBUFFERED=1 .venv/bin/python experiments/concepts.py [--out benchmarks/results/concepts_smollm2.json]

(a) positive vs negative sentiment sentences, held-out split by sentence: per-layer logistic probe and
diff-of-means accuracy (embed + 30 layers); (b) PCA of the activations at the best layer; (c) TCAV of
"positive sentiment" for the logit of " good" minus " bad" on neutral prompts, against CAVs of random
pydoc-topics snippets, at three layers; (d) PURE on a middle-layer MLP neuron whose top contexts over
pydoc-topics look like two different things.
"""

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

import circuits_jax as cj
from circuits_jax import toolshed as C
from circuits_jax import plot

POSITIVE = [
    "I loved this movie, it was wonderful.",
    "The food was delicious and the staff were friendly.",
    "What a beautiful day, I feel great.",
    "She gave a brilliant performance tonight.",
    "This is the best book I have read all year.",
    "The hotel room was clean, bright and comfortable.",
    "I am so happy with my new phone.",
    "Our holiday was fantastic from start to finish.",
    "The concert was amazing and the crowd was joyful.",
    "He is a kind and generous friend.",
    "The service here is excellent.",
    "I really enjoyed the lecture, it was inspiring.",
    "The garden looks lovely in the spring.",
    "This recipe turned out perfect.",
    "The team played superbly and won the match.",
    "What a delightful surprise, thank you so much.",
    "The new update makes the app fast and pleasant to use.",
    "I am grateful for such wonderful neighbours.",
    "The view from the top was breathtaking.",
    "Their customer support was helpful and quick.",
    "The kids had a great time at the park.",
    "This coffee tastes wonderful.",
    "The film was funny, moving and beautifully shot.",
    "I feel calm and content this morning.",
    "The teacher was patient and encouraging.",
    "Everything about the wedding was perfect.",
    "The puppy is adorable and very sweet.",
    "My exam went really well.",
    "The new park is a fantastic place to relax.",
    "The soup was warm, tasty and comforting.",
    "I admire how honest and brave she is.",
    "The museum was fascinating and well organised.",
    "We received a warm welcome from everyone.",
    "The music made me smile all day.",
    "This is an excellent and reliable car.",
    "The sunset over the lake was gorgeous.",
    "I am thrilled with the results.",
    "The bakery sells the most wonderful bread.",
    "Our new manager is fair and supportive.",
    "The trip was relaxing and fun.",
]

NEGATIVE = [
    "I hated this movie, it was awful.",
    "The food was cold and the staff were rude.",
    "What a miserable day, I feel terrible.",
    "She gave a dreadful performance tonight.",
    "This is the worst book I have read all year.",
    "The hotel room was dirty, dark and uncomfortable.",
    "I am so disappointed with my new phone.",
    "Our holiday was a disaster from start to finish.",
    "The concert was boring and the crowd was angry.",
    "He is a cruel and selfish person.",
    "The service here is horrible.",
    "I really disliked the lecture, it was tedious.",
    "The garden looks ugly and neglected.",
    "This recipe turned out inedible.",
    "The team played poorly and lost the match.",
    "What an unpleasant shock, this is upsetting.",
    "The new update makes the app slow and annoying to use.",
    "I am fed up with such noisy neighbours.",
    "The view from the top was bleak and depressing.",
    "Their customer support was useless and slow.",
    "The kids had a horrible time at the park.",
    "This coffee tastes disgusting.",
    "The film was dull, confusing and badly shot.",
    "I feel anxious and unhappy this morning.",
    "The teacher was impatient and harsh.",
    "Everything about the wedding went wrong.",
    "The dog is aggressive and very loud.",
    "My exam went really badly.",
    "The new car park is an ugly waste of space.",
    "The soup was bland, greasy and cold.",
    "I despise how dishonest and cowardly he is.",
    "The museum was boring and badly organised.",
    "We received a hostile welcome from everyone.",
    "The noise made me miserable all day.",
    "This is a terrible and unreliable car.",
    "The weather over the lake was grim.",
    "I am furious about the results.",
    "The bakery sells stale and awful bread.",
    "Our new manager is unfair and bullying.",
    "The trip was stressful and exhausting.",
]

# neutral-ish class inputs for TCAV: the next word is an evaluation
CLASS_PROMPTS = [
    "The movie I watched yesterday was",
    "In my opinion, the restaurant on the corner is",
    "The weather this weekend will be",
    "My first day at the new job was",
    "The book she lent me was",
    "The meeting this afternoon was",
    "I think the new design looks",
    "The train journey to the city was",
    "Honestly, the hotel we stayed in was",
    "The food at the party was",
    "His new song is",
    "The game last night was",
    "The service at the bank was",
    "Our neighbour's garden is",
    "The lecture on history was",
    "The results of the test were",
    "The app I downloaded is",
    "My experience with the airline was",
    "The play at the theatre was",
    "Overall, the week has been",
    "The coffee in this place is",
    "The new teacher seems",
    "The price of the tickets was",
    "The view from my window is",
]


SKIP = 4  # PURE: positions 0..3 of a context are never a neuron's peak


def snippets(corpus: list[str], n: int, rng: np.random.Generator, words=(6, 14)) -> list[str]:
    """`n` random sentences of the corpus cut to 6-14 words (prose only: no code-like lines)."""
    sents = []
    for doc in corpus:
        for s in re.split(r"(?<=[.!?])\s+", doc.replace("\n", " ")):
            w = s.split()
            if len(w) >= words[0] and re.fullmatch(r"[A-Za-z ,.'()-]+", s.strip()) and not s.strip().startswith("*"):
                sents.append(" ".join(w[: words[1]]))
    idx = rng.choice(len(sents), n, replace=False)
    return [sents[i] for i in idx]


def context_str(tok, row, pos, width=12) -> str:
    lo = max(1, pos - width)  # the context before the peak token, without BOS
    before = tok.decode(row[lo:pos]).replace("\n", "\\n")
    at = tok.decode(row[pos : pos + 1]).replace("\n", "\\n")
    after = tok.decode(row[pos + 1 : pos + 4]).replace("\n", "\\n")
    return f"{before}[[{at}]]{after}"


def probes_pca_tcav(model, tok, args, rng, img, result, t0):
    """(a) probes and diff-of-means by layer, (b) PCA, (c) TCAV; fills `result`."""
    L = model.cfg.n_layers
    # (a) probes and diff-of-means by layer ---------------------------------------------------
    texts = POSITIVE + NEGATIVE
    y = np.array([1] * len(POSITIVE) + [0] * len(NEGATIVE), np.int32)
    toks, mask = tok.to_padded(texts)
    perm = rng.permutation(len(texts))
    # stratified split by sentence: 60% train, 40% held out
    test = np.sort(np.concatenate([perm[y[perm] == c][: int(0.4 * (y == c).sum())] for c in (0, 1)]))
    train = np.setdiff1d(np.arange(len(texts)), test)
    layers = ["embed", *range(L)]
    labels = ["embed"] + [str(l) for l in range(L)]
    result["probes"] = {"n_train": int(len(train)), "n_test": int(len(test)), "layers": labels, "site": "hook_resid_post"}
    acts_by_pos = {}
    for position in ("mean", "last"):
        acts = C.layer_activations(model, toks, layers, attention_mask=mask, position=position, progress=True)
        acts_by_pos[position] = acts
        pr = C.probe_layers(acts, y, train, test, l2=1e-2, steps=300, lr=0.05, seed=args.seed)
        dom, _ = C.diff_of_means_layers(acts, y, train, test)
        result["probes"][position] = {"probe_test_acc": pr.accuracy.tolist(), "probe_train_acc": pr.train_accuracy.tolist(),
                                      "dom_test_acc": dom.tolist()}  # fmt: skip
        print(f"[{position}] probe held-out acc by layer: {np.round(pr.accuracy, 3).tolist()}")
        print(f"[{position}] diff-of-means held-out acc : {np.round(dom, 3).tolist()}")
    plot.concept_probe_layers(
        labels, {f"probe ({p})": result["probes"][p]["probe_test_acc"] for p in ("mean", "last")}
        | {f"diff-of-means ({p})": result["probes"][p]["dom_test_acc"] for p in ("mean", "last")},
        path=img / "concepts_probe_layers.png",
        title=f"SmolLM2 sentiment: held-out accuracy by layer ({len(train)} train / {len(test)} test sentences)",
    )  # fmt: skip
    # best (pooling, layer): highest held-out probe + diff-of-means accuracy, earliest layer on ties
    score = {p: np.asarray(result["probes"][p]["probe_test_acc"]) + np.asarray(result["probes"][p]["dom_test_acc"])
             for p in ("mean", "last")}  # fmt: skip
    bpos = max(("last", "mean"), key=lambda p: (score[p].max(), -int(np.argmax(score[p]))))
    best = int(np.argmax(score[bpos]))
    pm = result["probes"][bpos]
    result["probes"]["best"] = {"position": bpos, "layer": labels[best]}
    print(f"best: position {bpos}, layer {labels[best]}: probe {pm['probe_test_acc'][best]:.3f}  dom {pm['dom_test_acc'][best]:.3f}"
          f"  ({time.time() - t0:.0f}s)")  # fmt: skip

    # (b) PCA at the best layer --------------------------------------------------------------
    result["pca"] = {}
    for position in ("last", "mean"):
        x = acts_by_pos[position][best]
        comps, ratio, proj = C.pca(x, 5)
        pc1_dom_cos = float(abs(comps[0] @ C.diff_of_means(x, y)))
        # how well PC1 alone separates the classes (best threshold, either sign): an unsupervised check
        p1 = proj[:, 0]
        sep = max(max(a, 1 - a) for a in (np.mean((p1 > t) == (y == 1)) for t in np.r_[p1, -np.inf]))
        result["pca"][position] = {"layer": labels[best], "explained_variance_ratio": ratio.tolist(),
                                   "abs_cos_pc1_diff_of_means": pc1_dom_cos,
                                   "pc1_best_threshold_acc": float(sep)}  # fmt: skip
        print(f"PCA ({position}) at layer {labels[best]}: explained {np.round(ratio, 3).tolist()}, "
              f"|cos(PC1, dom)| = {pc1_dom_cos:.3f}, PC1 threshold acc {sep:.3f}")  # fmt: skip
        if position == bpos:
            plot.concept_pca(proj[:, :2], y, ratio[:2], path=img / "concepts_pca.png", class_names=("negative", "positive"),
                             title=f"SmolLM2 sentiment, layer {labels[best]} resid_post ({position} token): PCA")  # fmt: skip

    # (c) TCAV ----------------------------------------------------------------------------------
    corpus = cj.read_corpus("pydoc-topics")
    R = args.random_sets
    rand_texts = snippets(corpus, R * len(POSITIVE), rng)
    rtoks, rmask = tok.to_padded(rand_texts)
    ctoks, cmask = tok.to_padded(CLASS_PROMPTS)
    good, bad = tok.to_single_token(" good"), tok.to_single_token(" bad")
    target = C.logit_diff_target(good, bad)
    tl = [int(v) for v in args.tcav_layers.split(",")]
    pos_toks, pos_mask = tok.to_padded(POSITIVE)
    concept_acts = C.layer_activations(model, pos_toks, tl, attention_mask=pos_mask, position="last")
    random_acts = C.layer_activations(model, rtoks, tl, attention_mask=rmask, position="last")
    result["tcav"] = {"target": "logit(' good') - logit(' bad') at the last prompt token", "position": "last",
                      "n_class_inputs": len(CLASS_PROMPTS), "n_random_sets": R, "random_set_size": len(POSITIVE),
                      "random_examples": rand_texts[:5], "layers": {}}  # fmt: skip
    base = np.asarray(target(model(ctoks, attention_mask=cmask)[np.arange(len(ctoks)), cmask.sum(1) - 1]))
    result["tcav"]["mean_target_on_class_inputs"] = float(base.mean())
    for j, l in enumerate(tl):
        rsets = [random_acts[j, r * len(POSITIVE) : (r + 1) * len(POSITIVE)] for r in range(R)]
        res = C.tcav(model, ctoks, concept_acts[j], rsets, l, target, attention_mask=cmask, seed=args.seed)
        # a negative-sentiment control concept: should push the other way
        neg_toks, neg_mask = tok.to_padded(NEGATIVE)
        neg_acts = C.layer_activations(model, neg_toks, [l], attention_mask=neg_mask, position="last")[0]
        neg = C.tcav(model, ctoks, neg_acts, rsets, l, target, attention_mask=cmask, seed=args.seed)
        # a relative CAV (positive vs negative sentences), scored on the same gradients (no random baseline)
        rel_cav, rel_acc = C.cav_pairs([(concept_acts[j], neg_acts)], seed=args.seed)
        grads = C.activation_gradients(model, ctoks, l, target, attention_mask=cmask)
        rel_score, _ = C.tcav_scores(grads, rel_cav)
        result["tcav"]["layers"][str(l)] = {
            "relative_positive_vs_negative": {"score": float(rel_score[0]), "cav_train_acc": float(rel_acc[0])},
            "positive": {"score": res.score, "concept_scores": res.concept_scores.tolist(),
                         "random_scores": res.random_scores.tolist(), "t": res.t, "p_value": res.p_value,
                         "cav_train_acc": res.cav_accuracy.tolist(),
                         "mean_directional_derivative": float(res.derivatives.mean())},
            "negative": {"score": neg.score, "concept_scores": neg.concept_scores.tolist(), "t": neg.t,
                         "p_value": neg.p_value},
        }  # fmt: skip
        print(f"TCAV layer {l}: positive score {res.score:.3f} (random {res.random_scores.mean():.3f} ± "
              f"{res.random_scores.std():.3f}) p = {res.p_value:.2g}; negative score {neg.score:.3f} p = {neg.p_value:.2g}; "
              f"relative pos-vs-neg CAV score {rel_score[0]:.3f}  ({time.time() - t0:.0f}s)")  # fmt: skip



def pure(model, tok, args, result, t0, key="pure"):
    """(d) PURE on a middle-layer neuron; fills `result[key]`."""
    corpus = cj.read_corpus("pydoc-topics")
    # (d) PURE ----------------------------------------------------------------------------------
    pl = args.pure_layer
    upstream = args.pure_upstream.split(",")
    ctx = cj.pack_contexts(tok, corpus, 24, max_contexts=args.pure_contexts)
    acts = C.neuron_activations(model, ctx, pl)  # [N, T, M]
    acts[:, :SKIP] = -np.inf  # BOS and the first tokens of a context cut mid-stream (they fire "first token" neurons)
    peak = acts.max(1)  # [N, M]
    peak_pos = acts.argmax(1)
    K = args.pure_top
    # candidates: neurons that fire strongly on their top contexts, on many different tokens
    top_ctx = np.argsort(-peak, axis=0)[:K]  # [K, M]
    strength = np.take_along_axis(peak, top_ctx, 0).mean(0)
    distinct = np.array([len({int(ctx[c, peak_pos[c, m]]) for c in top_ctx[:, m]}) for m in range(peak.shape[1])])
    cand = [int(m) for m in np.argsort(-(strength * np.minimum(distinct, K // 2)))[: args.pure_candidates]]
    print(f"PURE: layer {pl}, candidates {cand} ({time.time() - t0:.0f}s)")
    splits = []
    for m in cand:
        rows = top_ctx[:, m]
        att = C.neuron_attributions(model, ctx[rows], pl, m, chunk=K // 2, skip=SKIP, heads="heads" in upstream,
                                    neurons="neurons" in upstream)  # fmt: skip
        sp = C.pure_split(att.attributions, att.activation, att.components, k=2, top=8, seed=args.seed)
        sizes = np.bincount(sp.labels, minlength=2)
        print(f"  neuron {m}: silhouette {sp.silhouette:.3f}, cluster sizes {sizes.tolist()}, "
              f"circuit fraction diag {np.round(np.diag(sp.circuit_fraction), 3).tolist()} "
              f"off {np.round(sp.circuit_fraction[[0, 1], [1, 0]], 3).tolist()}")  # fmt: skip
        splits.append((m, rows, att, sp, sizes))
    # choose: the best silhouette among splits whose smaller cluster holds >= 20% of the inputs
    ok = [s for s in splits if s[4].min() >= 0.2 * K] or splits
    m, rows, att, sp, sizes = max(ok, key=lambda s: s[3].silhouette)
    clusters = []
    for c in range(2):
        idx = np.flatnonzero(sp.labels == c)
        idx = idx[np.argsort(-att.activation[idx])]
        clusters.append({
            "size": int(len(idx)),
            "mean_activation": float(att.activation[idx].mean()),
            "top_contexts": [f"{att.activation[i]:.2f}: " + context_str(tok, ctx[rows[i]], int(att.position[i]))
                             for i in idx[:8]],
            "peak_tokens": sorted({tok.decode(ctx[rows[i], att.position[i] : att.position[i] + 1]) for i in idx}),
            "circuit": [[n, round(v, 4)] for n, v in sp.circuits[c]],
            # components whose mean attribution most exceeds the other cluster's (what is specific to this circuit)
            "distinctive": [[att.components[j], round(float(sp.centroids[c, j] - sp.centroids[1 - c, j]), 4)]
                            for j in np.argsort(-(sp.centroids[c] - sp.centroids[1 - c]))[:8]],
        })  # fmt: skip
    result[key] = {
        "layer": pl, "neuron": m, "site": f"blocks.{pl}.mlp.hook_post", "n_contexts_scanned": int(len(ctx)),
        "context_len": 24, "n_top_contexts": K,
        "peak_positions_considered": f">= {SKIP}",
        "upstream": (f"heads (hook_z) of layers 0..{pl - 1}; " if "heads" in upstream else "")
        + (f"neurons of blocks.{pl - 1}.mlp.hook_post; " if "neurons" in upstream else "") + "grad x act",
        "candidates": [{"neuron": s[0], "silhouette": s[3].silhouette, "sizes": s[4].tolist(),
                        "circuit_fraction": s[3].circuit_fraction.tolist()} for s in splits],
        "silhouette": sp.silhouette, "circuit_fraction": sp.circuit_fraction.tolist(), "clusters": clusters,
        "circuit_overlap": len({n for n, _ in sp.circuits[0]} & {n for n, _ in sp.circuits[1]}),
    }  # fmt: skip
    print(f"PURE chosen neuron {m}: silhouette {sp.silhouette:.3f}, circuit fraction {np.round(sp.circuit_fraction, 3).tolist()}")
    for c, cl in enumerate(clusters):
        print(f"  virtual neuron {c} ({cl['size']} contexts, mean act {cl['mean_activation']:.2f}); circuit {cl['circuit'][:5]}; "
              f"distinctive {cl['distinctive'][:5]}")
        for s in cl["top_contexts"][:6]:
            print("     ", s)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/concepts_smollm2.json")
    ap.add_argument("--img-dir", default="docs/img")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tcav-layers", default="6,15,24")
    ap.add_argument("--random-sets", type=int, default=10)
    ap.add_argument("--pure-layer", type=int, default=15)
    ap.add_argument("--pure-contexts", type=int, default=400)
    ap.add_argument("--pure-candidates", type=int, default=8)
    ap.add_argument("--pure-top", type=int, default=48)
    ap.add_argument("--pure-upstream", default="heads,neurons", help="heads, neurons or heads,neurons")
    ap.add_argument("--pure-only", action="store_true", help="only (d), stored as pure_<upstream>[_L<layer>] in --out")
    args = ap.parse_args()
    img = Path(args.img_dir)
    img.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    model, tok = cj.load("smollm2")
    result: dict = {"model": "smollm2", "seed": args.seed}

    if args.pure_only:  # add a PURE variant to an existing result file
        result = json.loads(Path(args.out).read_text())
        key = f"pure_{args.pure_upstream.replace(',', '_')}" + (f"_L{args.pure_layer}" if args.pure_layer != 15 else "")
        pure(model, tok, args, result, t0, key=key)
        result[key]["seconds"] = round(time.time() - t0, 1)
    else:
        probes_pca_tcav(model, tok, args, rng, img, result, t0)
        pure(model, tok, args, result, t0)
        result["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
