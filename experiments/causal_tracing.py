"""Causal tracing (Meng et al. 2022) of facts in SmolLM2-135M-Instruct.

The must-show: "The Eiffel Tower is located in the city of" -> " Paris", traced for hidden
states, MLP outputs and attention outputs (figure docs/img/causal_trace_eiffel.png). Then a few
landmark facts from `_tasks.FACTS` ("{subject} is in the city of"), averaged: the indirect effect
(p restored - p corrupted) by layer at the last subject token, at the subject token where it is
largest, and at the last token (docs/img/causal_trace_average.png).

    PYTHONUNBUFFERED=1 .venv/bin/python experiments/causal_tracing.py [--samples 10] [--extra 3] [--extra-samples 5]

Writes benchmarks/results/causal_tracing_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np

import circuits_jax as cj
from circuits_jax import plot
from circuits_jax._causal_tracing import causal_trace, subject_positions
from circuits_jax._tasks import FACTS

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("resid", "mlp", "attn")


def top_token(model, ids):
    logits = np.asarray(model(np.asarray([ids], np.int32))[0, -1], np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return int(np.argmax(p)), p


def trace_all(model, tok, prompt, subject, answer, args):
    ids = tok.encode(prompt)
    span = subject_positions(tok, ids, subject)
    answer_id = tok.to_single_token(answer)  # raises if the answer is several tokens
    top, p = top_token(model, ids)
    res = {k: causal_trace(model, ids, span, answer_id, kind=k, samples=args.samples, window=args.window, seed=args.seed,
                           progress=True) for k in KINDS}  # fmt: skip
    return ids, span, answer_id, top, p, res


def summary(tok, prompt, subject, answer, ids, span, answer_id, top, p, res):
    strs = tok.to_str_tokens(ids)
    out = dict(prompt=prompt, subject=subject, answer=answer, answer_id=answer_id, str_tokens=strs, subject_span=list(span),
               top_prediction=tok.decode([top]), answer_is_top=bool(top == answer_id), clean=res["resid"].clean,
               clean_full_softmax_check=float(p[answer_id]), corrupt=res["resid"].corrupt, noise=res["resid"].noise, kinds={})  # fmt: skip
    for k, r in res.items():
        l, t, s = r.peak()
        out["kinds"][k] = dict(
            scores=np.round(r.scores, 5).tolist(), window=r.window, peak_layer=l, peak_token=t, peak_token_str=strs[t], peak_prob=s,
            seconds=r.seconds, first_chunk_seconds=r.first_chunk_seconds, corrupt=r.corrupt, clean=r.clean,
        )  # fmt: skip
        print(f"  {k:5s}: peak p={s:.3f} at layer {l}, token {t} {strs[t]!r}; {r.seconds:.1f} s "
              f"(first compiled call {r.first_chunk_seconds:.1f} s)")  # fmt: skip
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra-samples", type=int, default=5, help="noise draws for the extra facts")
    ap.add_argument("--extra", type=int, default=3, help="landmark facts from _tasks.FACTS traced for the average")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/causal_tracing_smollm2.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, tok = cj.load("smollm2")
    print(f"loaded in {time.perf_counter() - t0:.1f} s; device {jax.devices()[0]}")

    prompt, subject, answer = "The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris"
    print(f"{prompt!r} -> {answer!r}")
    ids, span, answer_id, top, p, res = trace_all(model, tok, prompt, subject, answer, args)
    eiffel = summary(tok, prompt, subject, answer, ids, span, answer_id, top, p, res)
    print(f"  clean p={eiffel['clean']:.4f} (top prediction {eiffel['top_prediction']!r}), corrupt p={eiffel['corrupt']:.4f}")
    (ROOT / "docs/img").mkdir(parents=True, exist_ok=True)
    plot.causal_traces(res, ROOT / "docs/img/causal_trace_eiffel.png", tokens=tok.to_str_tokens(ids),
                       title=f"SmolLM2-135M: {prompt!r} -> {answer!r}")  # fmt: skip

    facts = []
    t_start = time.perf_counter()

    def save():
        """Write the JSON (and the average figure) with what is done so far: a cut run still leaves results."""
        average = averages(eiffel, facts)
        if facts:
            plot_average(average, 1 + len(facts), args.window)
        result = dict(
            model="smollm2 (SmolLM2-135M-Instruct)", samples=args.samples, extra_samples=args.extra_samples, window=args.window,
            seed=args.seed, noise_rule="3 x std of all entries of W_E", device=str(jax.devices()[0]), platform=platform.platform(),
            eiffel=eiffel, facts=facts, average_indirect_effect=average, total_seconds=time.perf_counter() - t0,
            command="PYTHONUNBUFFERED=1 .venv/bin/python experiments/causal_tracing.py "
            f"--samples {args.samples} --extra-samples {args.extra_samples} --window {args.window} --seed {args.seed} --extra {args.extra}",
        )  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out} ({len(facts)} extra facts; {time.perf_counter() - t0:.0f} s in all)")

    save()
    template = "{} is in the city of"
    extra_args = argparse.Namespace(**{**vars(args), "samples": args.extra_samples})
    for subj, ans in FACTS[template]:
        if len(facts) >= args.extra:
            break
        if subj == "The Eiffel Tower":
            continue
        pr = template.format(subj)
        if top_token(model, tok.encode(pr))[0] != tok.to_single_token(" " + ans):
            print(f"skip {pr!r}: {ans!r} is not the top prediction")
            continue
        name = subj.removeprefix("The ")
        print(f"{pr!r} -> {' ' + ans!r} (subject {name!r})")
        r = trace_all(model, tok, pr, name, " " + ans, extra_args)
        facts.append(summary(tok, pr, name, " " + ans, *r))
        save()
    print(f"extra facts: {time.perf_counter() - t_start:.0f} s")


def averages(eiffel, facts):
    """Meng et al.'s averages: mean indirect effect by layer at the last subject token and at the last
    token (and at the subject token where restoring the hidden state helps most), over all facts."""
    average = {}
    for k in KINDS:
        rows = {"last_subject_token": [], "best_subject_token": [], "last_token": []}
        for f in [eiffel, *facts]:
            ie = np.asarray(f["kinds"][k]["scores"]) - f["corrupt"]
            a, b = f["subject_span"]
            best = int(np.argmax(np.asarray(f["kinds"]["resid"]["scores"])[:, a:b].max(0))) + a
            rows["last_subject_token"].append(ie[:, b - 1])
            rows["best_subject_token"].append(ie[:, best])
            rows["last_token"].append(ie[:, -1])
        average[k] = {name: np.round(np.mean(v, 0), 5).tolist() for name, v in rows.items()}
    return average


def plot_average(average, n_facts, window):
    plt = plot._pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    for ax, k in zip(axes, KINDS):
        for name, v in average[k].items():
            ax.plot(v, label=name.replace("_", " "))
        ax.set_title(f"{k}: mean indirect effect over {n_facts} facts", fontsize=9)
        ax.set_xlabel("layer" if k == "resid" else f"layer (centre of a {window}-layer window)")
        ax.set_ylabel("p(restored) - p(corrupt)")
        ax.legend(fontsize=7)
    plot._saved(fig, ROOT / "docs/img/causal_trace_average.png")


if __name__ == "__main__":
    main()
