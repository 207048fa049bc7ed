"""Sentiment steering of SmolLM2-135M-Instruct: ActAdd, CAA and SAE-feature (FGAA-style) vectors.

For each method: a small layer sweep (next-token sentiment at one coefficient), then a sweep of
coefficients compiled into one program each, measuring on held-out neutral prompts (never used to
build a vector):
  sentiment   log P(positive word set) - log P(negative word set) at the next token (mean over prompts)
  off-target  KL(unsteered || steered) of the next-token distribution, and P(unsteered top-1 token)
  perplexity  on 32 contexts x 64 tokens of the `pydoc-topics` corpus (steered the same way)
  generations greedy, 16 new tokens per prompt, scored (a) by counting lexicon words and (b) by the
              *unsteered* model's mean next-token sentiment over the continuation's positions.
Coefficients: CAA and feature vectors are unit-normalised and scaled by c x (mean residual norm at
the layer, non-BOS corpus tokens); ActAdd keeps its own size (coeff multiplies the raw difference).

    PYTHONUNBUFFERED=1 .venv/bin/python experiments/steering.py            # ~35 min on 2 shared CPU cores
    circuits-jax experiment steering --quick                                 # a few minutes
writes OUT/report.html (default runs/steering) and, in a full run, benchmarks/results/steering_smollm2.json
and docs/img/steering_sentiment.png (+ steering_best.png); a --quick run (layers 6,9; 5 coefficients;
8 perplexity contexts; 8 new tokens) writes its JSON and figures under OUT instead.
Shapes: a steering vector is `[D]` (CAA, FGAA) or `[T, D]` (ActAdd, added from position 0); a sweep
over C coefficients returns `[C, B, 5]` next-token statistics from one compiled program.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import circuits_jax as cj
from circuits_jax import dictionaries as A
from circuits_jax import toolshed as S
from circuits_jax.app import Report
from circuits_jax.plot import steering_curves

POS_WORDS = [" good", " great", " happy", " wonderful", " excellent", " amazing", " love", " best", " nice", " beautiful",
             " perfect", " fantastic", " glad", " delightful", " enjoyed", " fun"]  # fmt: skip
NEG_WORDS = [" bad", " terrible", " sad", " awful", " horrible", " worst", " hate", " poor", " ugly", " boring",
             " disappointing", " angry", " miserable", " painful", " annoying", " dull"]  # fmt: skip
# lexicons for counting words in generations (whole words, case-insensitive)
POS_LEX = set("good great happy wonderful excellent amazing love loved lovely best nice beautiful perfect fantastic glad delightful "
              "enjoyed enjoy fun joy joyful pleasant awesome brilliant exciting excited cheerful grateful thankful kind".split())  # fmt: skip
NEG_LEX = set("bad terrible sad awful horrible worst hate hated poor ugly boring disappointing disappointed angry miserable "
              "painful annoying dull unhappy upset worse fear afraid pain sick tired cry hurt lonely depressed".split())  # fmt: skip

HELD_OUT = ["I went to the store and the", "The movie was", "My day at work was", "The weather today is",
            "When I opened the letter, I felt", "The new restaurant on the corner is", "Our trip to the mountains was",
            "The meeting this morning was", "I think the book is", "Yesterday my neighbor", "The concert last night was",
            "After the exam, the students felt", "The food at the party was", "My brother said the game was",
            "The hotel room looked", "This morning I woke up and"]  # fmt: skip

# CAA contrast pairs (positive, negative); written for this experiment, disjoint from HELD_OUT
CAA_PAIRS = [("I feel happy", "I feel sad"), ("Today was a wonderful day", "Today was a terrible day"),
             ("I love this", "I hate this"), ("What a great idea", "What an awful idea"),
             ("She smiled with joy", "She cried with grief"), ("The results were excellent", "The results were dreadful"),
             ("He is so kind", "He is so cruel"), ("I am grateful for everything", "I am angry about everything"),
             ("This is the best", "This is the worst"), ("We had a lovely time", "We had a miserable time"),
             ("The service was fantastic", "The service was horrible"), ("I am delighted", "I am disgusted"),
             ("Life is beautiful", "Life is painful"), ("That sounds fun", "That sounds boring"),
             ("They were very pleased", "They were very upset"), ("It was a pleasant surprise", "It was a nasty surprise"),
             ("I enjoyed every minute", "I regretted every minute"), ("Everything went perfectly", "Everything went wrong"),
             ("My friends are amazing", "My friends are annoying"), ("The view is gorgeous", "The view is ugly"),
             ("I feel hopeful", "I feel hopeless"), ("This makes me glad", "This makes me furious"),
             ("What a nice gift", "What a cheap gift"), ("The team played brilliantly", "The team played miserably"),
             ("I am proud of you", "I am ashamed of you"), ("The trip was relaxing", "The trip was exhausting"),
             ("Such good news", "Such bad news"), ("I like it a lot", "I dislike it a lot"),
             ("The kids were cheerful", "The kids were gloomy"), ("It tastes delicious", "It tastes disgusting"),
             ("I am excited about tomorrow", "I am worried about tomorrow"), ("A truly awesome experience", "A truly dreadful experience")]  # fmt: skip


def single_ids(tok, words):
    return np.asarray([tok.to_single_token(w) for w in words], np.int32)


def _metric(pos_ids, neg_ids, last, base_logp, logits):
    """Next-token stats at each prompt's last real position `[B, 5]`: sentiment (log P(pos set) - log P(neg set)),
    P(pos set), P(neg set), KL(unsteered || steered), P(unsteered top-1 token)."""
    B = last.shape[0]
    lp = jax.nn.log_softmax(logits[jnp.arange(B), last].astype(jnp.float32), -1)  # [B, V]
    lpos, lneg = jax.nn.logsumexp(lp[:, pos_ids], -1), jax.nn.logsumexp(lp[:, neg_ids], -1)
    p0 = jnp.exp(base_logp)
    kl = jnp.sum(p0 * (base_logp - lp), -1)
    top1 = jnp.exp(jnp.take_along_axis(lp, jnp.argmax(base_logp, -1)[:, None], -1)[:, 0])
    return jnp.stack([lpos - lneg, jnp.exp(lpos), jnp.exp(lneg), kl, top1], -1)


def make_metric(pos_ids, neg_ids, last, base_logp):
    # a Partial: its arrays are inputs of the compiled sweep, not constants folded into it
    return jax.tree_util.Partial(_metric, jnp.asarray(pos_ids), jnp.asarray(neg_ids), jnp.asarray(last), base_logp)


def lexicon_score(text):
    words = re.findall(r"[a-z']+", text.lower())
    return sum(w in POS_LEX for w in words) - sum(w in NEG_LEX for w in words)


QUICK_COEFFS = {"ActAdd": [-10.0, -3.0, 0.0, 3.0, 10.0], "other": [-1.0, -0.25, 0.0, 0.25, 1.0]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="circuits-jax experiment steering", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  circuits-jax experiment steering --quick --out runs/steering")  # fmt: skip
    p.add_argument("--out", default="runs/steering", help="report directory (report.html, summary.json, arrays)")
    p.add_argument("--quick", action="store_true", help="layers 6,9, 5 coefficients, 8 perplexity contexts, 8 new tokens; JSON/figures under OUT")
    p.add_argument("--json", default=None, help="results JSON (default benchmarks/results/steering_smollm2.json; --quick: OUT/steering.json)")
    p.add_argument("--png", default=None, help="figure (default docs/img/steering_sentiment.png; --quick: OUT/steering_sentiment.png)")
    p.add_argument("--sae", default="runs/dicts/sae/dictionary", help="SAE for feature steering (skipped if absent)")
    p.add_argument("--layers", default=None, help="comma-separated layers for the layer sweep (default 3,6,9,12,15; --quick 6,9)")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy tokens generated per prompt (default 16; --quick 8)")
    p.add_argument("--ppl-contexts", type=int, default=None, help="64-token corpus contexts for perplexity (default 32; --quick 8)")
    p.add_argument("--from-json", default=None, metavar="JSON",
                   help="write the report from a results JSON of an earlier run (figures from --png's folder), computing nothing")
    args = p.parse_args(argv)
    for name, full, quick in (("layers", "3,6,9,12,15", "6,9"), ("new_tokens", 16, 8), ("ppl_contexts", 32, 8)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    try:
        args.layer_list = [int(x) for x in args.layers.split(",")]
    except ValueError:
        p.error(f"--layers must be comma-separated integers, got {args.layers!r}")
    bad = [l for l in args.layer_list if not 0 <= l < 30]
    if bad:
        p.error(f"--layers {bad} out of range: SmolLM2 has layers 0..29")
    for name in ("new_tokens", "ppl_contexts"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    out = Path(args.out)
    args.json = args.json or str(out / "steering.json" if args.quick else "benchmarks/results/steering_smollm2.json")
    args.png = args.png or str(out / "steering_sentiment.png" if args.quick else "docs/img/steering_sentiment.png")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        return report_from_json(args)
    t0 = time.perf_counter()
    model, tok = cj.load("smollm2")
    pos_ids, neg_ids = single_ids(tok, POS_WORDS), single_ids(tok, NEG_WORDS)
    layers = args.layer_list

    # held-out prompts, right-padded (positions 0.. are real tokens in every row, as ActAdd needs)
    toks, mask = tok.to_padded(HELD_OUT, padding_side="right")
    last = jnp.asarray(mask.sum(-1) - 1)
    base_logits = cj.run(model, toks, attention_mask=mask).logits
    base_logp = jax.nn.log_softmax(base_logits[jnp.arange(len(HELD_OUT)), last].astype(jnp.float32), -1)
    metric = make_metric(pos_ids, neg_ids, last, base_logp)
    ctx = A.pack_contexts(tok, A.read_corpus("pydoc-topics"), 64, max_contexts=args.ppl_contexts)
    ppl0 = float(S.perplexity(model, ctx))
    print(f"unsteered: sentiment {float(metric(base_logits)[:, 0].mean()):+.3f}, perplexity {ppl0:.3f} ({time.perf_counter() - t0:.0f} s)")

    def resid_norm(layer, site="hook_resid_pre"):
        name = f"blocks.{layer}.{site}"
        a = cj.run(model, ctx[:8], cache=[name], stop_layer=jnp.int32(layer + 1), return_logits=False).cache[name]
        return float(jnp.linalg.norm(a[:, 1:], axis=-1).mean())  # skip BOS

    # ---- the vectors, per layer
    def caa_vec(layer):
        v = S.caa(model, tok, CAA_PAIRS, layer)
        return v / jnp.linalg.norm(v) * resid_norm(layer)

    def actadd_vec(layer):
        return S.actadd(model, tok, "I love", "I hate", layer)

    methods = {"ActAdd (I love - I hate)": (actadd_vec, 3.0, [-10.0, -5.0, -3.0, -1.0, 0.0, 1.0, 3.0, 5.0, 10.0]),
               "CAA (32 pairs)": (caa_vec, 0.5, [-1.0, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 1.0])}  # fmt: skip
    if args.quick:
        methods = {k: (b, c, QUICK_COEFFS["ActAdd" if k.startswith("ActAdd") else "other"]) for k, (b, c, _) in methods.items()}
    results = dict(model="smollm2", held_out_prompts=HELD_OUT, pos_words=POS_WORDS, neg_words=NEG_WORDS, caa_pairs=CAA_PAIRS,
                   unsteered=dict(sentiment=float(metric(base_logits)[:, 0].mean()), perplexity=ppl0), methods={})  # fmt: skip

    chosen = {}
    for name, (build, c_probe, _) in methods.items():
        scores = {}
        for l in tqdm(layers, desc=f"layer sweep {name}"):
            v = build(l)
            m = S.steering_sweep(model, toks, v, l, jnp.asarray([c_probe]), metric, attention_mask=mask)
            scores[l] = float(m[0, :, 0].mean())
        best = max(scores, key=scores.get)
        chosen[name] = (best, build(best))
        print(f"{name}: sentiment at coeff {c_probe} by layer {scores} -> layer {best}")
        results["methods"][name] = dict(layer_sweep=dict(coeff=c_probe, sentiment={str(k): v for k, v in scores.items()}))
    sae_path = Path(args.sae)
    if sae_path.is_dir():
        sae = cj.load_dictionary(sae_path)
        dens = sae_path.parent / "density.npy"
        density = np.load(dens) if dens.exists() else None
        pos_t, neg_t = [a for a, _ in CAA_PAIRS], [b for _, b in CAA_PAIRS]
        u = S.feature_steering(model, tok, sae, pos_t, neg_t, top_k=20, density=density, max_density=0.1)
        # the SAE reads blocks.6.hook_resid_post = blocks.7.hook_resid_pre
        chosen["FGAA (SAE top-20 features)"] = (7, u * resid_norm(7))
        methods["FGAA (SAE top-20 features)"] = (None, None, QUICK_COEFFS["other"] if args.quick else [-1.0, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 1.0])
        results["methods"]["FGAA (SAE top-20 features)"] = dict(sae=str(sae_path), site=sae.in_site, top_k=20, max_density=0.1)
    else:
        print(f"no SAE at {sae_path}: feature steering skipped")

    # ---- coefficient sweeps (one compiled program per measure) and generations
    by_len: dict[int, list[int]] = {}
    for i, t in enumerate(HELD_OUT):
        by_len.setdefault(len(tok.encode(t)), []).append(i)
    for name, (layer, v) in chosen.items():
        coeffs = methods[name][2]
        c = jnp.asarray(coeffs, jnp.float32)
        t1 = time.perf_counter()
        m = np.asarray(S.steering_sweep(model, toks, v, layer, c, metric, attention_mask=mask))  # [C, B, 5]
        ppl = np.asarray(S.perplexity_sweep(model, ctx, v, layer, c, chunk=1))
        t_sweep = time.perf_counter() - t1
        gens: dict[str, list[str]] = {}
        for coeff in tqdm(coeffs, desc=f"generate {name}"):
            out = [""] * len(HELD_OUT)
            for n, rows in by_len.items():
                pt = np.asarray([tok.encode(HELD_OUT[i]) for i in rows], np.int32)
                g = cj.generate(model, pt, args.new_tokens, hooks=S.steering_hook(v, layer, coeff),
                                hooks_on="prompt" if v.ndim == 2 else "all")  # fmt: skip
                for i, row in zip(rows, np.asarray(g.tokens)):
                    out[i] = tok.decode(row)
            gens[str(coeff)] = out
        # score generations: lexicon counts, and the unsteered model's mean next-token sentiment over the continuation
        judge = {}
        for coeff, outs in gens.items():
            full, fm = tok.to_padded([h + o for h, o in zip(HELD_OUT, outs)], padding_side="right")
            lg = cj.run(model, full, attention_mask=fm).logits
            lp = jax.nn.log_softmax(lg.astype(jnp.float32), -1)
            s = jax.nn.logsumexp(lp[..., pos_ids], -1) - jax.nn.logsumexp(lp[..., neg_ids], -1)  # [B, T]
            start = np.asarray([len(tok.encode(h)) - 1 for h in HELD_OUT])
            cont = (np.arange(full.shape[1])[None] >= start[:, None]) & fm
            judge[coeff] = float((np.asarray(s) * cont).sum() / cont.sum())
        r = results["methods"].setdefault(name, {})
        r.update(layer=layer, site=f"blocks.{layer}.hook_resid_pre", vector_shape=list(v.shape),
                 vector_norm=float(jnp.linalg.norm(v)), coeffs=coeffs, sweep_seconds=t_sweep,
                 sentiment=m[:, :, 0].mean(1).tolist(), p_pos=m[:, :, 1].mean(1).tolist(), p_neg=m[:, :, 2].mean(1).tolist(),
                 kl=m[:, :, 3].mean(1).tolist(), p_base_top1=m[:, :, 4].mean(1).tolist(), perplexity=ppl.tolist(),
                 gen_lexicon=[float(np.mean([lexicon_score(o) for o in gens[str(k)]])) for k in coeffs],
                 gen_judge=[judge[str(k)] for k in coeffs],
                 examples={str(k): gens[str(k)][:3] for k in coeffs}, generations=gens)  # fmt: skip
        print(f"\n{name} at layer {layer} ({t_sweep:.0f} s for both sweeps)")
        print("  coeff  sentiment  P(pos)  P(neg)   KL   P(top1)  ppl   lexicon  judge")
        for i, k in enumerate(coeffs):
            print(f"  {k:+6.2f}  {r['sentiment'][i]:+7.3f}  {r['p_pos'][i]:.4f}  {r['p_neg'][i]:.4f}  {r['kl'][i]:.3f}  "
                  f"{r['p_base_top1'][i]:.3f}  {ppl[i]:6.2f}  {r['gen_lexicon'][i]:+.2f}  {r['gen_judge'][i]:+.3f}")  # fmt: skip
        for k in coeffs:
            print(f"  [{k:+g}] {HELD_OUT[1]}{gens[str(k)][1]!r}")
    results["seconds"] = time.perf_counter() - t0
    results["command"] = "PYTHONUNBUFFERED=1 .venv/bin/python experiments/steering.py" + (" --quick" if args.quick else "")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))

    # plot: one panel per method
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(chosen)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2))
    for ax, name in zip(np.atleast_1d(axes), names):
        r = results["methods"][name]
        ax.plot(r["coeffs"], r["p_pos"], "o-", color="tab:green", label="P(positive words)")
        ax.plot(r["coeffs"], r["p_neg"], "o-", color="tab:red", label="P(negative words)")
        ax.plot(r["coeffs"], r["p_base_top1"], "o-", color="tab:grey", label="P(unsteered top-1) (off-target)")
        ax.set_xlabel("coefficient" + (" (x raw ActAdd difference)" if len(r["vector_shape"]) == 2 else " (x mean resid norm)"))
        ax.set_ylabel("next-token probability (mean, held-out prompts)")
        ax2 = ax.twinx()
        ax2.plot(r["coeffs"], r["perplexity"], "s--", color="black", ms=3, label="perplexity (pydoc-topics)")
        ax2.set_yscale("log")
        ax2.set_ylabel("perplexity")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
        ax.set_title(f"{name}, layer {r['layer']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    # the library's plot for the best method too
    best = _best(results)
    r = results["methods"][best]
    steering_curves(r["coeffs"], {"P(positive)": r["p_pos"], "P(negative)": r["p_neg"], "P(unsteered top-1)": r["p_base_top1"]},
                    r["perplexity"], str(Path(args.png).with_name("steering_best.png")), title=f"{best}, layer {r['layer']}")  # fmt: skip
    print(f"wrote {args.json}, {args.png} ({results['seconds']:.0f} s)")
    path = write_report(results, args, best)
    print(f"report: {path}")
    return 0


def _best(results) -> str:
    """The method whose sentiment moves most between its smallest and largest coefficient."""
    names = [n for n, r in results["methods"].items() if "sentiment" in r]
    return max(names, key=lambda n: results["methods"][n]["sentiment"][-1] - results["methods"][n]["sentiment"][0])


def _figure(rep, png, caption):
    if Path(png).exists():
        rep.figure(png, caption)
    else:
        rep.text(f"(figure {png} not found: run the experiment to draw it)")


def report_from_json(args) -> int:
    src = Path(args.from_json)
    if not src.is_file():
        print(f"error: --from-json {src} is not a file (a run writes benchmarks/results/steering_smollm2.json)", file=sys.stderr)
        return 2
    results = json.loads(src.read_text())
    results.setdefault("command", "PYTHONUNBUFFERED=1 .venv/bin/python experiments/steering.py")
    args.json = str(src)
    path = write_report(results, args, _best(results))
    print(f"report: {path}")
    return 0


def write_report(results, args, best) -> Path:
    """OUT/report.html: question, method, per-method sweeps (table + figures), example generations."""
    u = results["unsteered"]
    rep = Report("Steering SmolLM2-135M towards positive or negative sentiment", args.out,
                 subtitle=f"{len(HELD_OUT)} held-out prompts; layers swept {args.layers}; {args.ppl_contexts} perplexity contexts; "
                          f"{args.new_tokens} generated tokens; {'quick run' if args.quick else 'full run'}; circuits_jax")  # fmt: skip
    rep.heading("Question")
    rep.text("Can one vector added to the residual stream move the model's sentiment, and what does it cost in fluency and "
             "in off-target changes? Three ways to build the vector are compared: ActAdd (the activation difference of "
             "\"I love\" and \"I hate\", added position by position), CAA (the mean difference over 32 contrast pairs at "
             "the last token) and FGAA-style SAE-feature steering (the decoder directions of the 20 SAE features whose "
             "activation differs most between the pairs).")  # fmt: skip
    rep.heading("Method")
    rep.text("For each method a layer sweep picks the layer (next-token sentiment at one probe coefficient), then one "
             "compiled program per measure sweeps the coefficients (`jax.vmap` over the coefficient of a `cj.Add` hook). "
             "Measured on held-out neutral prompts never used to build a vector: sentiment = log P(16 positive words) - "
             "log P(16 negative words) at the next token; off-target: KL(unsteered || steered) and P(unsteered top-1 "
             "token); perplexity on `pydoc-topics` corpus contexts, steered the same way; greedy generations scored by "
             "lexicon word counts and by the unsteered model's mean next-token sentiment over the continuation (judge). "
             "CAA and feature vectors are unit vectors times c x the mean residual norm at the layer; ActAdd keeps its "
             "own size.")  # fmt: skip
    rep.code(results["command"])
    rep.numbers({"unsteered sentiment": u["sentiment"], "unsteered perplexity": u["perplexity"], "methods": len(results["methods"]),
                 "run seconds": round(results["seconds"], 1)})  # fmt: skip
    _figure(rep, Path(args.png), "per method: P(positive words), P(negative words), P(unsteered top-1 token) (left axis) and "
               "perplexity (right axis, log) against the coefficient")  # fmt: skip
    best_png = Path(args.png).with_name("steering_best.png")
    _figure(rep, best_png, f"the method with the largest sentiment range ({best}) drawn by `plot.steering_curves`")
    rep.heading("Numbers per method")
    arrays = {}
    for name, r in results["methods"].items():
        if "coeffs" not in r:
            continue
        ls = r.get("layer_sweep")
        if ls:
            rep.text(f"{name}: layer sweep at coefficient {ls['coeff']}: "
                     + ", ".join(f"layer {k} {v:+.3f}" for k, v in ls["sentiment"].items()) + f" -> layer {r['layer']}.")  # fmt: skip
        rows = [[k, r["sentiment"][i], r["p_pos"][i], r["p_neg"][i], r["kl"][i], r["p_base_top1"][i], r["perplexity"][i],
                 r["gen_lexicon"][i], r["gen_judge"][i]] for i, k in enumerate(r["coeffs"])]  # fmt: skip
        rep.table(rows, ["coeff", "sentiment", "P(pos)", "P(neg)", "KL", "P(top-1)", "perplexity", "lexicon", "judge"],
                  caption=f"{name} at blocks.{r['layer']}.hook_resid_pre (vector norm {r['vector_norm']:.3g})")  # fmt: skip
        i0, i1 = 0, len(r["coeffs"]) - 1
        rep.summary[f"{name}: sentiment at {r['coeffs'][i0]:+g} / {r['coeffs'][i1]:+g}"] = [r["sentiment"][i0], r["sentiment"][i1]]
        rep.summary[f"{name}: perplexity at {r['coeffs'][i0]:+g} / {r['coeffs'][i1]:+g}"] = [r["perplexity"][i0], r["perplexity"][i1]]
        key = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        arrays[key] = np.asarray([r["sentiment"], r["kl"], r["perplexity"], r["gen_judge"]])
        arrays[key + "_coeffs"] = np.asarray(r["coeffs"])
    rep.save_arrays("sweeps", **arrays)
    rep.heading("Example generations")
    i = 1
    rows = [[name, k, HELD_OUT[i] + r["generations"][str(k)][i]] for name, r in results["methods"].items() if "coeffs" in r for k in r["coeffs"]]
    rep.table(rows, ["method", "coeff", "greedy continuation"], caption=f"prompt {HELD_OUT[i]!r}; {args.new_tokens} new tokens")
    rep.heading("What it means")
    budget = 1.5 * u["perplexity"]
    rows, lines, over = [], [], []
    for name, r in results["methods"].items():
        if "coeffs" not in r:
            continue
        ok = [i for i, q in enumerate(r["perplexity"]) if q <= budget]
        up = max(ok, key=lambda i: r["sentiment"][i])
        down = min(ok, key=lambda i: r["sentiment"][i])
        rows.append([name, r["coeffs"][down], r["sentiment"][down] - u["sentiment"], r["kl"][down],
                     r["coeffs"][up], r["sentiment"][up] - u["sentiment"], r["kl"][up]])  # fmt: skip
        rep.summary[f"{name}: sentiment shift within 1.5x perplexity (down, up)"] = [rows[-1][2], rows[-1][5]]
        lines.append(f"{name} {rows[-1][2]:+.2f} / {rows[-1][5]:+.2f}")
        if max(r["perplexity"]) > budget:
            j = int(np.argmax(r["perplexity"]))
            over.append(f"{name}: perplexity up to {r['perplexity'][j]:.0f} and KL {r['kl'][j]:.2f} at coefficient {r['coeffs'][j]:+g}")
    rep.table(rows, ["method", "coeff (most negative)", "sentiment shift", "KL", "coeff (most positive)", "sentiment shift", "KL"],
              caption=f"the largest sentiment shifts (steered - unsteered) among coefficients whose perplexity stays within 1.5x "
                      f"the unsteered {u['perplexity']:.1f}")  # fmt: skip
    rep.text("Compared at equal cost (perplexity at most 1.5x the unsteered model's; the methods' coefficient scales "
             "differ, so equal coefficients mean nothing), the shifts of next-token sentiment (towards negative / towards "
             f"positive) are: {'; '.join(lines)}. " + (f"Past that budget ({'; '.join(over)}) the vector breaks the text "
             "rather than steering it (compare the generations above). " if over else "") + "The sentiment "
             "measure is a next-token log-odds of two 16-word lists, so a shift of 1 is a factor e in their odds. "
             "docs/steering.md discusses the full run.")  # fmt: skip
    rep.summary.update(unsteered=u, best_method=best, json=args.json, seconds=round(results["seconds"], 1))
    return rep.write()


if __name__ == "__main__":
    sys.exit(main())
