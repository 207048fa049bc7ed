"""The main job: an IOI circuit study of a model, from a generated dataset to a report.

`ioi_job` composes the library's pieces, in the order a researcher would run them: logit-
difference baselines; residual-stream and per-head activation patching; attribution patching
beside the exact head sweep; path patching of every head into the logits (the final position's
read-out); EAP-IG circuit discovery with its faithfulness curve; attention patterns of the heads
found. It writes `report.html` (plots embedded), the raw arrays (`.npz`), `summary.json`, and
the circuit (JSON, interactive HTML), and returns the summary. `circuits-jax ioi` runs it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from .. import plot
from ..core import parse_site, run
from ..graph import circuit_from_scores, circuit_metrics, edge_attribution, faithfulness, path_patch, save_circuit
from ..models import atomic_path
from ..patching import attribution_patch, patch_sweep
from ..tasks import IOI_TEMPLATES, ioi_task
from ._report import Report, Stages, top_heads


def _per_row_logit_diff(model, task, tokens) -> np.ndarray:
    logits = np.asarray(run(model, tokens, attention_mask=task.attention_mask).logits[:, -1])
    rows = np.arange(len(tokens))
    return logits[rows, task.answers.ravel()] - logits[rows, task.wrong.ravel()]


def _whole(draw: Callable, path: Path, *args, **kwargs) -> Path:
    """`draw(*args, path=..., **kwargs)` (one of `plot`'s functions) into `path`, written whole: a temporary
    name, then renamed, so an interrupted job leaves no half figure."""
    with atomic_path(path) as tmp:
        draw(*args, path=tmp, **kwargs)
    return path


# Fractions of edges at which the faithfulness curve is measured (a subset of MIB's: each costs a circuit run).
JOB_KS = (0.002, 0.01, 0.05, 0.2, 1.0)


def ioi_job(model, tok, out: str | Path = "runs/ioi", *, n: int = 8, seed: int = 0, template: int = 0,
            eap_steps: int = 5, circuit_fraction: float = 0.01, top_k: int = 8, ks=JOB_KS, progress: bool = True,
            log: Callable[[str], None] = print, model_name: str = "smollm2") -> dict:  # fmt: skip
    """Run the IOI study on `model` and write its report under `out`; returns the summary dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Stages(log)
    cfg = model.cfg
    rep = Report(f"Indirect object identification in {model_name}", out,
                 subtitle=f"{cfg.n_layers} layers, {cfg.n_heads} heads; {n} prompts, seed {seed}; circuits_jax")  # fmt: skip

    with stage("dataset"):
        task = ioi_task(tok, n=n, seed=seed, templates=(template,))
        str_tokens = tok.to_str_tokens(task.clean[0])
    rep.heading("Question and dataset")
    rep.text("Which components of the model move the indirect object's name (IO) to the final position, so that it is "
             "predicted over the subject's (S)? Clean prompts are generated from one template, with IO first (ABBA) or "
             "second (BABA) at random; corrupt prompts replace the second mention of S with a third name, which removes "
             "the cue saying which name repeats. Metric: logit(IO) - logit(S) at the last token, normalised so the clean "
             "run scores 1 and the corrupt run 0.")  # fmt: skip
    rep.table([[p, c] for p, c in zip(task.prompts[:4], task.corrupt_prompts[:4])], ["clean prompt", "corrupt prompt"],
              caption=f"the first 4 of {n} pairs; template: {IOI_TEMPLATES[template]!r}")  # fmt: skip

    with stage("baselines"):
        clean_ld, corrupt_ld = _per_row_logit_diff(model, task, task.clean), _per_row_logit_diff(model, task, task.corrupt)
    base = dict(clean_logit_diff=float(clean_ld.mean()), corrupt_logit_diff=float(corrupt_ld.mean()),
                clean_accuracy=float((clean_ld > 0).mean()), corrupt_accuracy=float((corrupt_ld > 0).mean()))  # fmt: skip
    rep.heading("Baselines")
    rep.numbers({"clean logit diff": base["clean_logit_diff"], "corrupt logit diff": base["corrupt_logit_diff"],
                 "clean accuracy (IO > S)": base["clean_accuracy"], "corrupt accuracy": base["corrupt_accuracy"]})  # fmt: skip
    rep.save_arrays("baselines", clean_logit_diff=clean_ld, corrupt_logit_diff=corrupt_ld)

    kw = dict(attention_mask=task.attention_mask, answer_pos=task.answer_pos)
    with stage("residual-stream patching (layer x position)"):
        resid = patch_sweep(model, task.clean, task.corrupt, task.metric, "resid_pre", ("layer", "pos"), progress=progress, **kw)
        _whole(plot.heatmap, out / "resid_patching.png", resid.result, resid.axes, tokens=str_tokens,
               title="denoising the residual stream: resid_pre by layer and position")  # fmt: skip
    rep.heading("Where the information sits: residual-stream patching")
    rep.text("Each cell patches the clean residual stream entering one layer at one position into the corrupt run. "
             "The answer is carried at the second subject token (S2) in early layers and at the final token late: the "
             "layers where the two change places are where heads move the information.")  # fmt: skip
    rep.figure(out / "resid_patching.png", "resid_pre patching, [layer, position]; x labels are the first prompt's tokens")
    rep.save_arrays("resid_patching", result=resid.result, raw=resid.raw)

    with stage("head patching (every head, all positions)"):
        heads = patch_sweep(model, task.clean, task.corrupt, task.metric, "z", ("layer", "head"), progress=progress, **kw)
        _whole(plot.heatmap, out / "head_patching.png", heads.result, heads.axes, title="denoising each head's output (z), all positions")
    with stage("attribution patching beside the exact sweep"):
        atp = attribution_patch(model, task.clean, task.corrupt, task.metric, "z", ("layer", "head"), **kw)
        _whole(plot.heatmap, out / "head_atp.png", atp.result, atp.axes, title="attribution patching (AtP) of each head's z")
        labels = np.array([[f"L{l}H{h}" for h in range(cfg.n_heads)] for l in range(cfg.n_layers)])
        _whole(plot.agreement, out / "atp_vs_exact.png", heads.result, atp.result, labels=labels,
               xlabel="activation patching (exact)", ylabel="attribution patching (AtP)", title="per-head z: AtP vs exact")  # fmt: skip
    r_atp = float(np.corrcoef(heads.result.ravel(), atp.result.ravel())[0, 1])
    rep.heading("Which heads matter: activation patching and its gradient estimate")
    rep.figure(out / "head_patching.png", "exact: one patched forward pass per head (all in one compiled program)")
    rep.figure(out / "head_atp.png", "AtP: every head from one forward and one backward pass")
    rep.figure(out / "atp_vs_exact.png", f"agreement of AtP with the exact sweep (Pearson r = {r_atp:.3f})")
    rep.table([[h, v] for h, v in top_heads(heads.result, top_k)], ["head", "normalised metric"],
              caption=f"the {top_k} heads whose patch moves the metric most (exact)")  # fmt: skip
    rep.save_arrays("head_patching", exact=heads.result, atp=atp.result)

    try:  # path patching and edges split attention into per-head writes that must add up (not so with post-norms)
        model.cfg.check_additive("path patching and EAP-IG")
        skipped = None
    except ValueError as e:
        skipped = str(e)
    if skipped is None:
        with stage("path patching: each head -> logits"):
            pp = path_patch(model, task.clean, task.corrupt, task.metric, receivers="logits", senders="heads", progress=progress, **kw)
            _whole(plot.heatmap, out / "path_patching.png", pp.result, ("layer", "head"),
                   title="path patching: each head's direct path to the logits")  # fmt: skip
        movers = top_heads(pp.result, top_k, sign=1)
        negative = top_heads(pp.result, 3, sign=-1)
        rep.heading("Heads that write the answer: path patching into the logits")
        rep.text("Each head's output difference (clean minus corrupt) is added to the final residual stream only, and every "
                 "other path keeps its corrupt value. Positive heads push the indirect object directly (name movers); negative "
                 "ones push against it (negative name movers).")  # fmt: skip
        rep.figure(out / "path_patching.png", "direct effect through the logits, normalised (clean 1, corrupt 0)")
        rep.table([[h, v] for h, v in movers] + [[h, v] for h, v in negative], ["head", "direct effect (normalised)"],
                  caption=f"top {top_k} positive and top 3 negative heads")  # fmt: skip
        rep.save_arrays("path_patching", result=pp.result, raw=pp.raw)

    else:
        movers, negative = top_heads(heads.result, top_k, sign=1), top_heads(heads.result, 3, sign=-1)
        rep.heading("Heads that write the answer")
        rep.text(f"Path patching and the EAP-IG circuit are left out for this model: {skipped}. The attention patterns "
                 "below are those of the heads the exact head patching ranks highest and lowest.")  # fmt: skip

    with stage("attention patterns of the heads found"):
        chosen = [h for h, _ in movers[:3]] + [h for h, _ in negative[:1]]
        layers = sorted({int(h[1:].split("H")[0]) for h in chosen})
        names = {l: parse_site(("pattern", l), model.cfg).name for l in layers}  # blocks.{l}.attn.hook_pattern
        cache = run(model, task.clean, cache=list(names.values()), attention_mask=task.attention_mask).cache
        pats = np.stack([np.asarray(cache[names[int(h[1:].split("H")[0])]])[:, int(h.split("H")[1])].mean(0)
                         for h in chosen])  # fmt: skip
        _whole(plot.attention_patterns, out / "attention_patterns.png", pats, chosen, tokens=str_tokens,
               query=len(str_tokens) - 1, title="where the final token attends (mean over prompts)")  # fmt: skip
    rep.heading("What the name movers look at")
    rep.figure(out / "attention_patterns.png", "attention from the final position, for the top 3 positive heads and the "
               "most negative head of path patching; the x labels are the first prompt's tokens")  # fmt: skip

    if skipped is None:
        with stage("circuit discovery: EAP-IG and faithfulness"):
            scores = edge_attribution(model, task.clean, task.corrupt, task.metric, "eap-ig", steps=eap_steps, noising=True, **kw)
            g = scores.graph
            n_edges = max(1, int(round(circuit_fraction * g.n_edges)))
            circuit = circuit_from_scores(scores, n_edges, method="topn")
            curve = faithfulness(model, task.clean, task.corrupt, task.metric, scores.scores, ks=tuple(ks), **kw)
            m = float(circuit_metrics(model, task.clean, task.corrupt, task.metric, circuit.edges, **kw)[0])
            f = (m - curve["empty"]) / (curve["full"] - curve["empty"])
            circuit.meta.update(task="ioi", faithfulness=f, cpr=curve["cpr"], cmd=curve["cmd"])
            save_circuit(circuit, out / "circuit.json")
            _whole(plot.faithfulness_curves, out / "faithfulness.png", {"EAP-IG": curve}, title="IOI circuits by EAP-IG score",
                   points={f"{n_edges} edges": (n_edges / g.n_edges, f)})  # fmt: skip
            _whole(plot.circuit_graph, out / "circuit.png", circuit, max_edges=60)
            _whole(plot.circuit_html, out / "circuit.html", circuit, title=f"IOI circuit in {model_name} (EAP-IG, {n_edges} edges)")
        rep.heading("A circuit: EAP-IG edges and their faithfulness")
        rep.text(f"EAP-IG ({eap_steps} steps) scores all {g.n_edges} edges of the model's graph in one compiled program. "
                 f"The circuit keeps the top {n_edges} ({circuit_fraction:.1%}); every other edge is patched with its corrupt "
                 f"value. Faithfulness f = (m(C) - m(empty)) / (m(model) - m(empty)) is {f:.3f} for it; CPR (area under f over "
                 f"the kept fraction, higher is better) {curve['cpr']:.3f}, CMD {curve['cmd']:.3f}. The interactive page "
                 "circuit.html explores the circuit edge by edge.")  # fmt: skip
        rep.figure(out / "faithfulness.png", "f(k) for circuits of the top k% edges")
        rep.figure(out / "circuit.png", "the circuit's strongest 60 edges, by layer")
        rep.save_arrays("edges", scores=scores.scores, mask=g.mask, faithfulness_ks=np.asarray(curve["ks"]),
                        faithfulness_f=np.asarray(curve["f"]))  # fmt: skip

    summary = dict(model=model_name, n_prompts=n, seed=seed, template=IOI_TEMPLATES[template], **base,
                   top_heads_exact=top_heads(heads.result, top_k), atp_vs_exact_pearson=r_atp,
                   name_movers_path_patching=movers, negative_heads_path_patching=negative,
                   stage_seconds=stage.seconds, total_seconds=round(time.perf_counter() - stage.t0, 1))  # fmt: skip
    if skipped is None:
        summary.update(circuit_edges=n_edges, circuit_faithfulness=f, cpr=float(curve["cpr"]), cmd=float(curve["cmd"]))
    else:  # the heads above come from exact head patching, not path patching
        summary["name_movers_exact"] = summary.pop("name_movers_path_patching")
        summary["negative_heads_exact"] = summary.pop("negative_heads_path_patching")
        summary["left_out"] = skipped
    summary.update(stage_seconds=summary.pop("stage_seconds"), total_seconds=summary.pop("total_seconds"))
    path = rep.finish(summary, stage.seconds)
    summary["report"] = str(path)
    return summary
