"""ROME on SmolLM2-135M-Instruct: layer choice, lam choice, then 12 counterfactual edits.

    PYTHONUNBUFFERED=1 .venv/bin/python experiments/rome.py [--contexts 256] [--out benchmarks/results/rome_smollm2.json]

1. key covariance E[k k^T] of blocks.{l}.mlp.hook_post for the candidate layers from one pass over
   `pydoc-topics` (packed 128-token contexts, BOS positions not counted; cached in runs/rome_cov_*.npy);
2. layer sweep: 3 facts (one per relation) edited at each candidate layer; the layer with the best
   mean of efficacy, paraphrase and neighbourhood scores (ties: lower essence KL) is kept;
3. lam sweep at that layer: the same k*, v*, only the rank-one update's regulariser changes;
4. every fact edited independently from the original model; CounterFact-style scores, per-fact table,
   seconds per edit; greedy generations before/after for 2 facts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import circuits_jax as cj
from circuits_jax import toolshed as R
from circuits_jax.tasks import FACTS

ROOT = Path(__file__).resolve().parents[1]
CITY, CAPITAL, LANG = "{} is in the city of", "The capital of {} is", "The official language of {} is"
PARAPHRASES = {
    CITY: ["{} is located in the city of", "You can visit {} in the city of", "{}, a famous landmark, stands in the city of"],
    CAPITAL: ["The capital city of {} is", "{}'s capital is the city of", "The seat of government of {} is in"],
    LANG: ["In {}, the official language is", "The main language spoken in {} is", "People in {} speak"],
}
# (template, subject, true answer, counterfactual answer)
EDITS = [
    (CITY, "The Eiffel Tower", "Paris", "Rome"),
    (CITY, "The Colosseum", "Rome", "Paris"),
    (CITY, "The Acropolis", "Athens", "London"),
    (CITY, "The Sydney Opera House", "Sydney", "Berlin"),
    (CITY, "The Uffizi Gallery", "Florence", "Moscow"),
    (CAPITAL, "France", "Paris", "Berlin"),
    (CAPITAL, "Japan", "Tokyo", "Madrid"),
    (CAPITAL, "Germany", "Berlin", "Tokyo"),
    (CAPITAL, "Greece", "Athens", "Vienna"),
    (LANG, "Russia", "Russian", "French"),
    (LANG, "Turkey", "Turkish", "German"),
    (LANG, "Israel", "Hebrew", "Spanish"),
]
SWEEP_FACTS = [0, 5, 9]
LAYERS = [3, 5, 8, 11]
LAMS = [1e-4, 1e-3, 1e-2, 1e-1]


def case_for(template, subject, true, new, n_neighbours=5):
    """Request + CounterFact-style case: neighbours are other subjects of the template, those sharing
    the true answer first (CounterFact's choice), then others; never one whose answer is target_new."""
    others = [(s, a) for s, a in FACTS[template] if s != subject and a != new]
    others.sort(key=lambda sa: sa[1] != true)
    neigh = [(template.format(s), " " + a) for s, a in others[:n_neighbours]]
    return dict(prompt=template, subject=subject, target_new=" " + new, target_true=" " + true,
                paraphrase_prompts=PARAPHRASES[template], neighborhood_prompts=neigh)  # fmt: skip


def top1(model, tok, text):
    return tok.decode([int(jnp.argmax(model(jnp.asarray(tok.to_tokens(text)))[0, -1]))])


def summary(rows):
    keys = ["efficacy", "paraphrase", "neighborhood"]
    out = {k: float(np.mean([r["eval"][k] for r in rows])) for k in keys}
    out.update({f"pre_{k}": float(np.mean([r["eval"]["pre"][k] for r in rows])) for k in keys})
    out["essence_kl"] = float(np.mean([r["eval"]["essence_kl"] for r in rows]))
    out["neighborhood_dp_true"] = float(np.mean([r["eval"]["neighborhood_dp_true"] for r in rows]))
    out["p_new_post"] = float(np.mean([r["eval"]["post"]["p_new"] for r in rows]))
    out["p_true_post"] = float(np.mean([r["eval"]["post"]["p_true"] for r in rows]))
    return out


def generations(model, tok, new_model, tmpl, subject, new, n=20):
    """Greedy continuations (n new tokens) of the prompt, a paraphrase and the essence prompt, before/after."""
    g = {"fact": tmpl.format(subject), "new": new}
    for tag, m in (("before", model), ("after", new_model)):
        for j, text in enumerate([tmpl.format(subject), PARAPHRASES[tmpl][0].format(subject), R.ESSENCE_PROMPT.format(subject)]):
            out = cj.generate(m, jnp.asarray(tok.to_tokens(text)), n)  # .tokens: the n new tokens only
            g[f"{tag}_{j}"] = text + tok.decode(np.asarray(out.tokens)[0])
    return g


def redo_generations(path, n_facts=2):
    """Recompute only the "generations" entry of an existing result file (same edits, same layer)."""
    model, tok = cj.load("smollm2")
    result = json.loads(Path(path).read_text())
    layer = result["layer"]
    toks, count = R.corpus_tokens(tok, "pydoc-topics", ctx_len=128, max_contexts=result["covariance"]["contexts"])
    cov_path = ROOT / f"runs/rome_cov_{result['covariance']['contexts']}_{'-'.join(map(str, LAYERS))}.npy"
    cov = np.load(cov_path)[LAYERS.index(layer)] if cov_path.exists() else R.key_covariance(model, toks, layer, count_mask=count)
    gens = []
    for tmpl, s, true, new in EDITS[:n_facts]:
        new_model, _ = R.rome_edit(model, tok, case_for(tmpl, s, true, new), layer, cov, lam=result["edits"][0]["lam"])
        gens.append(generations(model, tok, new_model, tmpl, s, new))
        print(json.dumps(gens[-1], indent=1), flush=True)
    result["generations"] = gens
    Path(path).write_text(json.dumps(result, indent=1, default=float))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, default=256, help="128-token pydoc-topics contexts for the covariance")
    ap.add_argument("--lam", type=float, default=1e-2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/rome_smollm2.json"))
    ap.add_argument("--redo-generations", action="store_true", help="only recompute the generations of --out")
    args = ap.parse_args()
    if args.redo_generations:
        return redo_generations(args.out)
    model, tok = cj.load("smollm2")
    result: dict = {"model": "smollm2 (SmolLM2-135M-Instruct)", "command": "experiments/rome.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k != "out"), "prefixes": list(R.DEFAULT_PREFIXES)}  # fmt: skip

    # 1. covariance for every candidate layer, one pass
    cov_path = ROOT / f"runs/rome_cov_{args.contexts}_{'-'.join(map(str, LAYERS))}.npy"
    toks, count = R.corpus_tokens(tok, "pydoc-topics", ctx_len=128, max_contexts=args.contexts)
    t0 = time.perf_counter()
    cached = cov_path.exists()
    if cached:
        covs = jnp.asarray(np.load(cov_path))
    else:
        covs = R.key_covariance(model, toks, LAYERS, count_mask=count)
        cov_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(cov_path, np.asarray(covs))
    cov = dict(zip(LAYERS, covs))
    eig = {l: np.linalg.eigvalsh(np.asarray(c, np.float64)) for l, c in cov.items()}
    result["covariance"] = {"corpus": "pydoc-topics", "contexts": int(toks.shape[0]), "ctx_len": 128,
                            "tokens_counted": int(count.sum()), "seconds": time.perf_counter() - t0,
                            "cached": cached,
                            "condition_number": {l: float(e[-1] / max(e[0], 1e-30)) for l, e in eig.items()}}  # fmt: skip
    print(result["covariance"])

    # the model must know each fact
    known = []
    for i, (tmpl, s, true, new) in enumerate(EDITS):
        got = top1(model, tok, tmpl.format(s))
        para = [top1(model, tok, p.format(s)) for p in PARAPHRASES[tmpl]]
        known.append({"fact": tmpl.format(s), "true": true, "top1": got, "known": got.strip() == true,
                      "paraphrase_top1": para})  # fmt: skip
        print(known[-1])
    result["facts_known"] = known

    done = {}  # (fact, layer) -> (info, case, row): the sweep's edits are reused at the chosen layer

    def edit(i_fact, layer, lam=args.lam):
        if (i_fact, layer) in done:
            return done[i_fact, layer]
        tmpl, s, true, new = EDITS[i_fact]
        case = case_for(tmpl, s, true, new)
        new_model, info = R.rome_edit(model, tok, case, layer, cov[layer], lam=lam)
        ev = R.evaluate_edit(model, new_model, tok, case)
        row = {"fact": tmpl.format(s), "true": true, "new": new, "layer": layer, "lam": lam, "seconds": info.seconds,
               "steps": len(info.nll), "final_nll": float(info.nll[-1]), "eval": dict(ev)}  # fmt: skip
        print(f"L{layer} {row['fact']!r} -> {new}: ES {ev['efficacy']:.0f} PS {ev['paraphrase']:.2f} "
              f"NS {ev['neighborhood']:.2f} p_new {ev['post']['p_new']:.3f} KL {ev['essence_kl']:.3f} "
              f"edit {info.seconds:.1f}s", flush=True)  # fmt: skip
        done[i_fact, layer] = info, case, row
        return done[i_fact, layer]

    def edited(layer, info, lam=args.lam):
        W = model.blocks.W_out[layer]
        b = None if model.blocks.b_out is None else model.blocks.b_out[layer]
        u, Lam = R.rank_one_update(cov[layer], info.k_star, info.v_star, W, b, lam=lam)
        return R.apply_rank_one(model, layer, u, Lam)

    # 2. layer sweep
    sweep = {}
    for layer in LAYERS:
        rows = [edit(i, layer)[2] for i in SWEEP_FACTS if known[i]["known"]]
        sweep[layer] = {"summary": summary(rows), "rows": rows}
        print("layer", layer, sweep[layer]["summary"], flush=True)
    result["layer_sweep"] = sweep

    def score(layer):
        s = sweep[layer]["summary"]
        return (s["efficacy"] + s["paraphrase"] + s["neighborhood"]) / 3, -s["essence_kl"]

    best = max(LAYERS, key=score)
    result["layer"] = best
    print("chosen layer", best, flush=True)

    # 3. lam sweep at the chosen layer (the sweep's k*, v*; only the update's regulariser changes)
    lam_rows = {lam: [] for lam in LAMS}
    for i in SWEEP_FACTS:
        if known[i]["known"]:
            info, case, _ = edit(i, best)
            for lam in LAMS:
                ev = R.evaluate_edit(model, edited(best, info, lam), tok, case)
                lam_rows[lam].append({"fact": case["prompt"].format(case["subject"]), "eval": dict(ev)})
    result["lam_sweep"] = {str(lam): summary(r) for lam, r in lam_rows.items()}
    print("lam sweep", result["lam_sweep"], flush=True)

    # 4. every known fact at the chosen layer
    rows, gens = [], []
    for i, (tmpl, s, true, new) in enumerate(EDITS):
        if not known[i]["known"]:
            continue
        info, case, row = edit(i, best)
        rows.append(row)
        if len(gens) < 2:
            gens.append(generations(model, tok, edited(best, info), tmpl, s, new))
            print(json.dumps(gens[-1], indent=1), flush=True)
    result["edits"] = rows
    result["summary"] = summary(rows)
    result["summary"]["n_facts"] = len(rows)
    result["summary"]["seconds_per_edit_mean"] = float(np.mean([r["seconds"] for r in rows]))
    result["summary"]["seconds_per_edit_median"] = float(np.median([r["seconds"] for r in rows]))
    result["generations"] = gens
    print("summary", result["summary"])
    Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
