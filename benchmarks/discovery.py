"""Circuit discovery: ground-truth recovery, SmolLM2 IOI faithfulness, and ACDC's speed.

    .venv/bin/python benchmarks/discovery.py [--parts known,smollm2,speed] [--n 8] [--json out.json] [--png-dir docs/img]

In one process run:
known.   Models with known circuits (`circuits_jax/tasks/known.py`: the trained induction model and the
         hand-built ones): edge and node ROC AUC against the truth of EAP, EAP-IG (inputs and
         activations) and ACDC (a threshold sweep, Conmy et al.'s ROC), each under the ablation the
         truth was defined with.
smollm2. SmolLM2 IOI (`ioi_task`, n pairs): MIB faithfulness f(k) at k = 0.1 .. 100% of edges with
         CPR and CMD, for EAP and EAP-IG edge circuits (top-n and greedy) and for ACDC at node
         level (its circuit at each threshold, and the curve of its node ranking), each with the
         wall-clock seconds of finding and of evaluating.
speed.   ACDC node level on SmolLM2 IOI with one candidate per compiled call (the
         one-forward-per-candidate loop) and with speculative windows, plus a TransformerLens 4.x
         loop of one hooked forward per candidate (ACDC's own implementation style) over the first
         candidates, with the losses of both compared.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import circuits_jax as cj
import circuits_jax.plot  # noqa: F401  (cj.plot)
from circuits_jax.tasks import ioi_task

ROOT = Path(__file__).resolve().parents[1]


def _fmt_curve(f) -> str:
    return " | ".join(f"{v:.3f}" for v in f)


# ---------------------------------------------------------------------------
# known: ground-truth circuits
# ---------------------------------------------------------------------------


def known(thresholds, steps, seeds=(0,), ablations=("resample",)) -> list[dict]:
    from circuits_jax.tasks import known as K

    rows = []
    print("\n## Ground truth: ROC AUC against the known circuit")
    print("| model | edges (truth) | ablation | method | edge AUC | node AUC | seconds |")
    print("|---|---:|---|---|---:|---:|---:|")
    tasks = dict(K.benchmark_tasks(seeds[0]))
    for seed in seeds[1:]:  # more trained models: the hand-built ones do not depend on the seed's weights
        m, info = K.induction_model(seed)
        tasks[f"induction seed {seed}"] = (m, K.induction_task(m, info, seed=seed))
    for name, (model, task) in tasks.items():
        g = cj.Graph.of(model.cfg)
        for abl in ablations:  # every method ablates the same way: resample from the corrupt prompt, or zero
            head = f"| {name} | {g.n_edges} ({int(task.truth.sum())}) | {abl} "
            for method in cj.EDGE_METHODS:  # noising: the estimate of removing each edge from the clean run
                t = time.perf_counter()
                s = cj.edge_attribution(model, task, method, steps=steps, ablation=abl, noising=True)
                secs = time.perf_counter() - t
                auc = cj.roc_auc(s, task.truth)
                rows.append(dict(model=name, ablation=abl, method=method, seconds=secs, edge=auc.edge, node=auc.node))
                print(head + f"| {method} | {auc.edge:.3f} | {auc.node:.3f} | {secs:.1f} |", flush=True)
            t = time.perf_counter()
            circuits = [cj.acdc(model, task, threshold=tau, ablation=abl, progress=False) for tau in thresholds]
            secs = time.perf_counter() - t
            auc = cj.roc_sweep(circuits, task.truth)
            exact = [c for c in circuits if (c.edges == task.truth).all()]
            rows.append(dict(model=name, ablation=abl, method="acdc", seconds=secs, edge=auc.edge, node=auc.node,
                             points=auc.edge_points, exact_at=[c.meta["threshold"] for c in exact]))  # fmt: skip
            exact_at = ", ".join(f"{c.meta['threshold']:g}" for c in exact)
            print(head + f"| ACDC ({len(thresholds)} thresholds) | {auc.edge:.3f} | {auc.node:.3f} | {secs:.1f} |"
                  + (f" exact at τ = {exact_at}" if exact else ""), flush=True)  # fmt: skip
    return rows


# ---------------------------------------------------------------------------
# smollm2: faithfulness on IOI
# ---------------------------------------------------------------------------


def smollm2(model, task, thresholds, steps, png_dir) -> dict:
    kw = dict(attention_mask=task.attention_mask, answer_pos=task.answer_pos)
    g = cj.Graph.of(model.cfg)
    ks = np.asarray(cj.FAITHFULNESS_KS) * 100
    out, curves, points = {}, {}, {}
    print(f"\n## SmolLM2 IOI: {task.clean.shape[0]} pairs of {task.clean.shape[1]} tokens, {g.n_edges} edges")
    print("| circuit | find s | evaluate s | " + " | ".join(f"f({k:g}%)" for k in ks) + " | CPR | CMD |")
    print("|---|---:|---:|" + "---:|" * (len(ks) + 2))
    for method in ("eap", "eap-ig"):
        t = time.perf_counter()
        s = cj.edge_attribution(model, task.clean, task.corrupt, task.metric, method, steps=steps, noising=True, **kw)
        find = time.perf_counter() - t
        for construct in ("topn", "greedy"):
            t = time.perf_counter()
            r = cj.faithfulness(model, task.clean, task.corrupt, task.metric, s, method=construct, **kw)
            ev = time.perf_counter() - t
            label = f"{method} {construct}"
            curves[label] = r
            out[label] = dict(find_s=find, eval_s=ev, f=r["f"].tolist(), cpr=r["cpr"], cmd=r["cmd"], full=r["full"], empty=r["empty"])
            print(f"| {label} (edge) | {find:.1f} | {ev:.1f} | {_fmt_curve(r['f'])} | {r['cpr']:.3f} | {r['cmd']:.3f} |", flush=True)
    for tau in thresholds:
        t = time.perf_counter()
        c = cj.acdc(model, task.clean, task.corrupt, task.metric, threshold=tau, level="node", progress=False, **kw)
        find = time.perf_counter() - t
        t = time.perf_counter()
        ranking = cj.node_ranking(g, c.meta["node_scores"])
        r = cj.faithfulness(model, task.clean, task.corrupt, task.metric, ranking, **kw)
        ev = time.perf_counter() - t
        label = f"ACDC node τ={tau:g}"
        curves[label + " ranking"] = r
        frac = c.n_edges / g.n_edges
        points[label] = (frac, c.meta["faithfulness"])
        heads = [n for n in c.nodes if n.startswith("a")]
        mlps = [n for n in c.nodes if n.startswith("m")]
        out[label] = dict(find_s=find, eval_s=ev, f=r["f"].tolist(), cpr=r["cpr"], cmd=r["cmd"], circuit_f=c.meta["faithfulness"],
                          circuit_edges=c.n_edges, circuit_fraction=frac, heads=heads, mlps=mlps,
                          calls=c.meta["compiled_calls"], rows=c.meta["rows_run"], window=c.meta["window"])  # fmt: skip
        print(f"| {label}: ranking by loss change | {find:.1f} | {ev:.1f} | {_fmt_curve(r['f'])} | {r['cpr']:.3f} | {r['cmd']:.3f} |")
        print(f"|   its circuit: {len(heads)} heads, {len(mlps)} MLPs, {c.n_edges} edges ({100 * frac:.2f}%) | | | "
              f"f = {c.meta['faithfulness']:.3f} |" + " |" * (len(ks) + 1), flush=True)  # fmt: skip
    print(f"m(model) {r['full']:.3f}, m(empty) {r['empty']:.3f} (logit difference)")
    if png_dir:
        path = Path(png_dir) / "discovery_ioi_faithfulness.png"
        cj.plot.faithfulness_curves(curves, path, points=points, title="SmolLM2 IOI: faithfulness (patching ablation)")
        print(f"wrote {path}")
    return out


# ---------------------------------------------------------------------------
# speed: ACDC's compiled steps against a one-forward-per-candidate loop
# ---------------------------------------------------------------------------


def speed(model, tok, task, tau, windows, tl_candidates) -> dict:
    kw = dict(attention_mask=task.attention_mask, answer_pos=task.answer_pos)
    out = {}
    print(f"\n## ACDC node level on SmolLM2 IOI, τ = {tau:g}: compiled steps against one forward per candidate")
    print("| run | window | compiled calls | rows run | candidates decided | seconds | candidates / s | same circuit |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    ref = None
    for w in windows:
        t = time.perf_counter()
        c = cj.acdc(model, task.clean, task.corrupt, task.metric, threshold=tau, level="node", window=w, progress=False, **kw)
        secs = time.perf_counter() - t
        same = "-" if ref is None else str(bool((c.edges == ref.edges).all()))
        ref = ref or c
        m = c.meta
        out[f"window_{w}"] = dict(seconds=secs, calls=m["compiled_calls"], rows=m["rows_run"], decided=m["edges_tested"],
                                  per_s=m["edges_tested"] / secs, nodes=c.nodes)  # fmt: skip
        label = "ours, one candidate per call" if w == 1 else "ours, speculative window"
        print(f"| {label} | {w} | {m['compiled_calls']} | {m['rows_run']} | {m['edges_tested']} | {secs:.1f} | "
              f"{m['edges_tested'] / secs:.2f} | {same} |", flush=True)  # fmt: skip
    if tl_candidates:
        out["transformer_lens"] = _tl_loop(model, tok, task, ref, tl_candidates)
    return out


def _tl_loop(model, tok, task, circuit, n) -> dict:
    """ACDC's node step as ACDC's own code runs it: one hooked TransformerLens forward per candidate.
    Candidates are removed cumulatively in ACDC's order (every one accepted, the speculative chain),
    so the losses can be compared with ours row for row."""
    import torch

    sys_path = str(ROOT / "benchmarks")
    import sys

    sys.path.insert(0, sys_path)
    from patching import boot_bridge

    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    with tempfile.TemporaryDirectory() as tmp:
        bridge = boot_bridge(model, tok, tmp)
    clean, corrupt = torch.tensor(task.clean, dtype=torch.long), torch.tensor(task.corrupt, dtype=torch.long)
    names = [f"blocks.{l}.attn.hook_z" for l in range(L)] + [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    with torch.no_grad():
        ref_logits, _ = bridge.run_with_cache(clean, names_filter=lambda nm: False)
        _, cache = bridge.run_with_cache(corrupt, names_filter=lambda nm: nm in names)
    ref = torch.log_softmax(ref_logits[:, -1], -1)
    order = list(range(L * (H + 1), 0, -1))[:n]  # graph source indices, latest first (as ours)
    per = H + 1
    removed: list[int] = []
    losses, t0 = [], time.perf_counter()
    for i in order:
        removed.append(i)
        heads = {}
        mlps = set()
        for r in removed:
            l, k = divmod(r - 1, per)
            if k < H:
                heads.setdefault(l, []).append(k)
            else:
                mlps.add(l)

        def z_hook(z, hook, idx=None):
            z[:, :, idx] = cache[hook.name][:, :, idx]
            return z

        def mlp_hook(x, hook):
            return cache[hook.name]

        hooks = [(f"blocks.{l}.attn.hook_z", lambda z, hook, idx=tuple(hs): z_hook(z, hook, list(idx))) for l, hs in heads.items()]
        hooks += [(f"blocks.{l}.hook_mlp_out", mlp_hook) for l in mlps]
        with torch.no_grad():
            logits = bridge.run_with_hooks(clean, fwd_hooks=hooks)[:, -1]
        kl = (ref.exp() * (ref - torch.log_softmax(logits, -1))).sum(-1).mean()
        losses.append(float(kl))
    secs = time.perf_counter() - t0
    # ours: the same chain in one compiled call
    ours = cj.node_chain_losses(model, task.clean, task.corrupt, order, attention_mask=task.attention_mask,
                                answer_pos=task.answer_pos)
    diff = float(np.max(np.abs(np.asarray(losses) - ours)))
    print(f"| TransformerLens 4.x, one hooked forward per candidate (first {n}) | 1 | {n} | {n} | {n} | {secs:.1f} | "
          f"{n / secs:.2f} | losses agree to {diff:.1e} |")  # fmt: skip
    return dict(candidates=n, seconds=secs, per_s=n / secs, max_abs_loss_diff=diff)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--parts", default="known,smollm2,speed")
    ap.add_argument("--n", type=int, default=8, help="IOI prompt pairs")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--thresholds", default="0.005,0.02,0.05", help="ACDC thresholds on SmolLM2 (KL)")
    ap.add_argument("--known-thresholds", default="0,1e-4,1e-3,3e-3,0.01,0.03,0.1,0.3,1,3")
    ap.add_argument("--windows", default="1,8,16")
    ap.add_argument("--seeds", default="0", help="known: seeds of the trained induction model (the first also seeds the rest)")
    ap.add_argument("--ablations", default="resample,zero", help="known: the ablations every method is run with")
    ap.add_argument("--tl-candidates", type=int, default=30)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png-dir", default=None)
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    report = {}
    if "known" in parts:
        report["known"] = known([float(t) for t in args.known_thresholds.split(",")], args.steps,
                                [int(x) for x in args.seeds.split(",")], args.ablations.split(","))  # fmt: skip
    if "smollm2" in parts or "speed" in parts:
        model, tok = cj.load("smollm2")
        task = ioi_task(tok, n=args.n)
        if "smollm2" in parts:
            report["smollm2"] = smollm2(model, task, [float(t) for t in args.thresholds.split(",")], args.steps, args.png_dir)
        if "speed" in parts:
            report["speed"] = speed(model, tok, task, 0.02, [int(w) for w in args.windows.split(",")], args.tl_candidates)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))
    return report


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
