"""Causal tracing (Meng et al. 2022) of facts in SmolLM2-135M-Instruct, written as a report.

The must-show: "The Eiffel Tower is located in the city of" -> " Paris", traced for hidden
states, MLP outputs and attention outputs (figure docs/img/causal_trace_eiffel.png). Then a few
landmark facts from `circuits_jax.tasks.FACTS` ("{subject} is in the city of"), averaged: the indirect effect
(p restored - p corrupted) by layer at the last subject token, at the subject token where it is
largest, and at the last token (docs/img/causal_trace_average.png). Shapes: each trace is
`scores [L, T]` (30 layers x the prompt's tokens) per kind.

    PYTHONUNBUFFERED=1 .venv/bin/python experiments/causal_tracing.py [--samples 10] [--extra 3] [--extra-samples 5]
    circuits-jax experiment factual-recall --quick            # a few minutes: 3 noise draws, 1 extra fact

Writes OUT/report.html (default runs/factual-recall) with the figures and numbers, and (full runs)
benchmarks/results/causal_tracing_smollm2.json and the docs/img figures; a --quick run writes its
JSON and figures under OUT instead, so the docs' full-run results stay as they are.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

import circuits_jax as cj
from circuits_jax import plot
from circuits_jax.toolshed import causal_trace, subject_positions
from circuits_jax.app import Report
from circuits_jax.tasks import FACTS

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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="circuits-jax experiment factual-recall", description="Causal tracing of facts in SmolLM2-135M-Instruct; writes OUT/report.html.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax experiment factual-recall --quick --out runs/factual-recall\n"
               "  PYTHONUNBUFFERED=1 .venv/bin/python experiments/causal_tracing.py        # the docs' full run (~30 min, 2 CPU cores)",
    )  # fmt: skip
    ap.add_argument("--samples", type=int, default=None, help="noise draws for the Eiffel Tower trace (default 10; --quick 3)")
    ap.add_argument("--window", type=int, default=10, help="layers restored together for mlp/attn (default 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra-samples", type=int, default=None, help="noise draws for the extra facts (default 5; --quick 3)")
    ap.add_argument("--extra", type=int, default=None, help="landmark facts from tasks.FACTS traced for the average (default 3; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="fewer draws and facts (a few minutes); JSON and figures go under OUT")
    ap.add_argument("--out", default="runs/factual-recall", help="report directory (report.html, summary.json, arrays)")
    ap.add_argument("--json", default=None, help="results JSON (default benchmarks/results/causal_tracing_smollm2.json; --quick: OUT/causal_tracing.json)")
    ap.add_argument("--img", default=None, help="figure directory (default docs/img; --quick: OUT)")
    ap.add_argument("--from-json", default=None, metavar="JSON",
                    help="write the report from a results JSON of an earlier run (its figures are read from --img), computing nothing")
    args = ap.parse_args(argv)
    for name, full, quick in (("samples", 10, 3), ("extra_samples", 5, 3), ("extra", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("samples", "extra_samples", "window"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.extra < 0:
        ap.error(f"--extra must be 0 or more, got {args.extra}")
    out = Path(args.out)
    args.json = Path(args.json) if args.json else (out / "causal_tracing.json" if args.quick else ROOT / "benchmarks/results/causal_tracing_smollm2.json")
    args.img = Path(args.img) if args.img else (out if args.quick else ROOT / "docs/img")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        src = Path(args.from_json)
        if not src.is_file():
            print(f"error: --from-json {src} is not a file (a run writes benchmarks/results/causal_tracing_smollm2.json)", file=sys.stderr)
            return 2
        result = json.loads(src.read_text())
        for k in ("samples", "extra_samples", "window", "seed"):
            setattr(args, k, result[k])
        args.quick = "--quick" in result["command"]
        args.json = src
        path = write_report(result, args, args.img / "causal_trace_eiffel.png", result["command"])
        print(f"report: {path}")
        return 0
    args.img.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok = cj.load("smollm2")
    print(f"loaded in {time.perf_counter() - t0:.1f} s; device {jax.devices()[0]}")

    prompt, subject, answer = "The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris"
    print(f"{prompt!r} -> {answer!r}")
    ids, span, answer_id, top, p, res = trace_all(model, tok, prompt, subject, answer, args)
    eiffel = summary(tok, prompt, subject, answer, ids, span, answer_id, top, p, res)
    print(f"  clean p={eiffel['clean']:.4f} (top prediction {eiffel['top_prediction']!r}), corrupt p={eiffel['corrupt']:.4f}")
    eiffel_png = args.img / "causal_trace_eiffel.png"
    plot.causal_traces(res, eiffel_png, tokens=tok.to_str_tokens(ids), title=f"SmolLM2-135M: {prompt!r} -> {answer!r}")
    command = ("PYTHONUNBUFFERED=1 .venv/bin/python experiments/causal_tracing.py "
               f"--samples {args.samples} --extra-samples {args.extra_samples} --window {args.window} --seed {args.seed} "
               f"--extra {args.extra}" + (" --quick" if args.quick else ""))  # fmt: skip

    facts = []
    t_start = time.perf_counter()

    def save():
        """Write the JSON (and the average figure) with what is done so far: a cut run still leaves results."""
        average = averages(eiffel, facts)
        if facts:
            plot_average(average, 1 + len(facts), args.window, args.img / "causal_trace_average.png")
        result = dict(
            model="smollm2 (SmolLM2-135M-Instruct)", samples=args.samples, extra_samples=args.extra_samples, window=args.window,
            seed=args.seed, noise_rule="3 x std of all entries of W_E", device=str(jax.devices()[0]), platform=platform.platform(),
            eiffel=eiffel, facts=facts, average_indirect_effect=average, total_seconds=time.perf_counter() - t0, command=command,
        )  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json} ({len(facts)} extra facts; {time.perf_counter() - t0:.0f} s in all)")
        return result

    result = save()
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
        result = save()
    print(f"extra facts: {time.perf_counter() - t_start:.0f} s")
    path = write_report(result, args, eiffel_png, command)
    print(f"report: {path}")
    return 0


def write_report(result, args, eiffel_png, command) -> Path:
    """OUT/report.html: question, method, the Eiffel Tower traces, the per-fact peaks and the averages."""
    e = result["eiffel"]
    facts = [e, *result["facts"]]
    rep = Report("Factual recall in SmolLM2-135M: causal tracing", args.out,
                 subtitle=f"{args.samples} noise draws (extra facts {args.extra_samples}), window {args.window}, seed {args.seed}; "
                          f"{'quick run' if args.quick else 'full run'}; circuits_jax")  # fmt: skip
    rep.heading("Question")
    rep.text("Where does the model recall a fact? For \"The Eiffel Tower is located in the city of\" -> \" Paris\": which "
             "hidden states, MLP outputs and attention outputs, at which layers and tokens, carry what the model needs to "
             "predict the answer (Meng et al. 2022, ROME)?")  # fmt: skip
    rep.heading("Method")
    rep.text(f"Three runs of each prompt. Clean: p(answer) at the last token. Corrupted: Gaussian noise (std {e['noise']:.4g} "
             f"= 3 x the std of W_E's entries) added to the subject tokens' embeddings, {args.samples} draws, p(answer) averaged. "
             "Corrupted with restoration: the same draws, with one activation set back to its clean value: the hidden state "
             f"`hook_resid_post` of one layer at one token (resid), or `hook_mlp_out` / `hook_attn_out` at one token over a "
             f"{args.window}-layer window centred on the layer (mlp, attn). Every (layer, token) restoration of one kind runs "
             "in one compiled program (`jax.vmap` over the restored site). The indirect effect of a site is p(restored) - "
             "p(corrupted).")  # fmt: skip
    rep.code(command)
    rep.heading("The Eiffel Tower")
    nums = {"p(Paris), clean": e["clean"], "p(Paris), subject noised": e["corrupt"], "top prediction (clean)": e["top_prediction"]}
    for k in KINDS:
        kk = e["kinds"][k]
        nums[f"{k}: best restored p"] = kk["peak_prob"]
    rep.numbers(nums)
    _figure(rep, eiffel_png, "p(' Paris') after restoring each (layer, token): hidden states, MLP outputs (10-layer window), "
               "attention outputs (10-layer window); the subject's tokens are noised")  # fmt: skip
    rows = [[k, e["kinds"][k]["peak_layer"], repr(e["kinds"][k]["peak_token_str"]), e["kinds"][k]["peak_prob"],
             e["kinds"][k]["peak_prob"] - e["corrupt"], e["kinds"][k]["seconds"]] for k in KINDS]  # fmt: skip
    rep.table(rows, ["kind", "peak layer", "peak token", "p restored", "indirect effect", "sweep seconds"],
              caption="where restoring one site brings the answer back most")  # fmt: skip
    rep.save_arrays("eiffel_traces", **{k: np.asarray(e["kinds"][k]["scores"]) for k in KINDS}, tokens=np.asarray(e["str_tokens"]))
    rep.heading(f"Across {len(facts)} facts")
    rows = []
    for f in facts:
        a, b = f["subject_span"]
        ie_last_subj = {k: max(np.asarray(f["kinds"][k]["scores"])[:, b - 1]) - f["corrupt"] for k in KINDS}
        ie_last = {k: max(np.asarray(f["kinds"][k]["scores"])[:, -1]) - f["corrupt"] for k in KINDS}
        rows.append([f["prompt"] + f["answer"], f["clean"], f["corrupt"], ie_last_subj["mlp"], ie_last_subj["attn"],
                     ie_last["mlp"], ie_last["attn"]])  # fmt: skip
    rep.table(rows, ["fact", "p clean", "p noised", "max IE mlp @ last subj.", "max IE attn @ last subj.",
                     "max IE mlp @ last tok.", "max IE attn @ last tok."],
              caption="max over layers of the indirect effect (p restored - p noised) at the last subject token and the last token")  # fmt: skip
    avg = result["average_indirect_effect"]
    peaks = []
    for k in KINDS:
        for where in ("last_subject_token", "best_subject_token", "last_token"):
            v = np.asarray(avg[k][where])
            peaks.append([k, where.replace("_", " "), int(v.argmax()), float(v.max())])
    rep.table(peaks, ["kind", "token", "layer (window centre) of max mean IE", "max mean IE"],
              caption=f"mean indirect effect over {len(facts)} facts; 'best subject token' is, per fact, the subject token "
                      "where restoring the hidden state helps most")  # fmt: skip
    avg_png = args.img / "causal_trace_average.png"
    if result["facts"] and avg_png.exists():
        _figure(rep, avg_png, f"mean indirect effect by layer over {len(facts)} facts, at the last subject token, the best "
                "subject token and the last token")  # fmt: skip
    last = np.asarray(avg["resid"]["last_token"])
    handover = int(np.argmax(last >= last.max() / 2))
    best_resid = np.asarray(avg["resid"]["best_subject_token"])
    last_subj = np.asarray(avg["resid"]["last_subject_token"])
    mlp_best = np.asarray(avg["mlp"]["best_subject_token"])
    attn_last = np.asarray(avg["attn"]["last_token"])
    attn_best = np.asarray(avg["attn"]["best_subject_token"])
    best_tokens = []
    for f in facts:
        a, b = f["subject_span"]
        best_tokens.append(repr(f["str_tokens"][int(np.argmax(np.asarray(f["kinds"]["resid"]["scores"])[:, a:b].max(0))) + a]))
    rep.heading("What it means")
    rep.text(f"Two phases, as in Meng et al.: restoring the hidden state at a subject token brings the answer back in the "
             f"early and middle layers (mean indirect effect up to {best_resid.max():.3f} at the best subject token, layer "
             f"{int(best_resid.argmax())}; {last_subj.max():.3f} at the last subject token), and at the last token only from "
             f"layer {handover} on (the first layer reaching half its maximum {last.max():.3f}): that is where the fact "
             f"has been moved to the position that predicts. MLP windows act at the subject (up to {mlp_best.max():.3f}, "
             f"window centred at layer {int(mlp_best.argmax())}), attention windows at the last token (up to "
             f"{attn_last.max():.3f}, centred at layer {int(attn_last.argmax())}; at most {attn_best.max():.3f} at the "
             f"subject). The best subject token per fact: {', '.join(best_tokens)}; where it is not the subject's last "
             "token, the model holds the subject's identity earlier in the word than GPT-2 XL does in Meng et al. "
             f"This run used {args.samples} noise draws for the Eiffel Tower and {args.extra_samples} for "
             f"{len(result['facts'])} more fact{'' if len(result['facts']) == 1 else 's'}; docs/causal_tracing.md discusses the full run (10 and 5 draws, 3 more facts).")  # fmt: skip
    rep.summary.update(dict(command=command, eiffel_clean=e["clean"], eiffel_corrupt=e["corrupt"],
                            eiffel_peaks={k: [e["kinds"][k]["peak_layer"], e["kinds"][k]["peak_token_str"], e["kinds"][k]["peak_prob"]] for k in KINDS},
                            facts=[f["prompt"] for f in facts], average_peaks=peaks, json=str(args.json),
                            total_seconds=round(result["total_seconds"], 1)))  # fmt: skip
    return rep.write()


def _figure(rep, png, caption):
    if Path(png).exists():
        rep.figure(png, caption)
    else:
        rep.text(f"(figure {png} not found: run the experiment to draw it)")


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


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_average(average, n_facts, window, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    for ax, k in zip(axes, KINDS):
        for name, v in average[k].items():
            ax.plot(v, label=name.replace("_", " "))
        ax.set_title(f"{k}: mean indirect effect over {n_facts} facts", fontsize=9)
        ax.set_xlabel("layer" if k == "resid" else f"layer (centre of a {window}-layer window)")
        ax.set_ylabel("p(restored) - p(corrupt)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
