"""`circuits-jax discover`: a circuit for a task by ACDC, EAP or EAP-IG, with its faithfulness curve and drawings."""

from __future__ import annotations

import argparse
import json

from .options import model_arguments, count, finite, out_dir, share


def add_discover(sub) -> None:
    dc = sub.add_parser(
        "discover", help="find a circuit for a task (ACDC, EAP, EAP-IG) and score its faithfulness", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  circuits-jax discover --task ioi --method eap-ig --fraction 0.01 --out runs/ioi_circuit\n"
               "  circuits-jax discover --task constructed-induction --method acdc --threshold 0.01 --out runs/acdc_toy\n"
               "writes OUT/circuit.json, circuit/ (orbax), faithfulness.png, circuit.png, circuit.html",
    )  # fmt: skip
    dc.add_argument("--task", required=True, help="ioi, induction, greater-than, factual-recall (SmolLM2 or --model), "
                    "or a model with a known circuit: toy-induction, ...")
    model_arguments(dc)
    dc.add_argument("--method", choices=["acdc", "eap", "eap-ig"], default="eap-ig")
    dc.add_argument("--level", choices=["edge", "node"], default="edge", help="acdc: edges, or heads and MLPs whole")
    dc.add_argument("--threshold", type=finite, default=None,
                    help="acdc: τ on the loss change (default 0.01); eap*: keep edges with |score| >= T")
    dc.add_argument("--fraction", type=share, default=0.01, help="eap*: fraction of edges kept (default 1%%)")
    dc.add_argument("--construct", choices=["topn", "greedy"], default="greedy", help="eap*: how scores become a circuit")
    dc.add_argument("--loss", choices=["kl", "metric"], default="kl", help="acdc: KL to the model, or the task metric")
    dc.add_argument("--ablation", choices=["patching", "zero", "mean"], default="patching")
    dc.add_argument("--steps", type=count(1), default=8, help="eap-ig: interpolation steps")
    dc.add_argument("--n", type=count(1), default=16, help="prompt pairs")
    dc.add_argument("--seed", type=int, default=0)
    dc.add_argument("--draw-edges", type=count(1), default=300, help="largest edges drawn in circuit.png (edge level)")
    dc.add_argument("--out", required=True, help="output directory")
    dc.add_argument("--quiet", action="store_true", help="no progress bar")
    dc.set_defaults(func=run_discover)


def run_discover(args) -> int:
    """`discover`: a circuit for a task by ACDC, EAP or EAP-IG, with its faithfulness curve and drawings."""
    import time

    import numpy as np

    from ..graph import acdc, circuit_from_scores, edge_attribution, faithfulness, node_ranking, roc_auc, save_circuit
    from ..models import atomic_path, write_text
    from ..plot import circuit_graph, circuit_html, faithfulness_curves
    from ..tasks import load_task

    if args.method != "acdc" and args.level != "edge":
        raise ValueError(f"--level {args.level} is for ACDC; {args.method} scores edges")
    if args.method != "acdc" and args.ablation != "patching":
        raise ValueError(f"{args.method} scores each edge by its corrupt-minus-clean output difference, which is "
                         f"patching ablation; --ablation {args.ablation} is for ACDC")  # fmt: skip
    out = out_dir(args.out)  # a folder we can write, before the task and its model load
    model, task = load_task(args.task, args.model, n=args.n, seed=args.seed, dtype=args.dtype)
    kw = dict(attention_mask=task.attention_mask, answer_pos=task.answer_pos)
    t = time.perf_counter()
    if args.method == "acdc":
        threshold = 0.01 if args.threshold is None else args.threshold
        circuit = acdc(model, task.clean, task.corrupt, task.metric, threshold=threshold, level=args.level,
                       ablation=args.ablation, loss=args.loss, progress=not args.quiet, **kw)  # fmt: skip
        if args.level == "node":  # the subgraphs induced by the nodes of largest loss change
            ranking = node_ranking(circuit.graph, circuit.meta["node_scores"])
        else:  # edges ranked by the loss change ACDC measured
            ranking = np.abs(np.nan_to_num(circuit.scores, nan=0.0))
        label = f"ACDC ({args.level}, τ={threshold:g})"
    else:
        scores = edge_attribution(model, task.clean, task.corrupt, task.metric, args.method, steps=args.steps,
                                  noising=True, **kw)  # fmt: skip
        g = scores.graph
        if args.threshold is not None:
            n = int((np.abs(scores.scores) >= args.threshold)[g.mask].sum())
        else:
            n = max(1, int(round(args.fraction * g.n_edges)))
        circuit = circuit_from_scores(scores, n, method=args.construct)
        circuit.meta.update(clean_metric=scores.clean_metric, corrupt_metric=scores.corrupt_metric)
        ranking = scores.scores
        label = f"{args.method} ({args.construct}, {n} edges)"
    found_s = time.perf_counter() - t
    t = time.perf_counter()
    construct = "topn" if args.method == "acdc" else args.construct
    curve = faithfulness(model, task.clean, task.corrupt, task.metric, ranking, ablation=args.ablation, method=construct, **kw)
    eval_s = time.perf_counter() - t
    g = circuit.graph
    # ACDC scored its circuit on the same full/empty scale already; an attribution circuit is scored here
    f = circuit.meta["faithfulness"] if args.method == "acdc" else _circuit_f(model, task, circuit, curve, args.ablation)
    point = (circuit.n_edges / g.n_edges, f)
    circuit.meta.update(task=task.name, seconds_found=found_s, seconds_faithfulness=eval_s, faithfulness=point[1],
                        cpr=curve["cpr"], cmd=curve["cmd"])  # fmt: skip
    if task.truth is not None:
        circuit.meta["roc_auc"] = roc_auc(ranking, task.truth, graph=g)
    out.mkdir(parents=True, exist_ok=True)  # every file below is written whole (a temporary name, then renamed)
    save_circuit(circuit, out / "circuit")
    save_circuit(circuit, out / "circuit.json")
    write_text(out / "faithfulness.json", json.dumps(
        {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v) for k, v in dict(curve).items()}, indent=1))  # fmt: skip
    with atomic_path(out / "faithfulness.png") as tmp:
        faithfulness_curves({args.method: curve}, tmp, points={label: point},
                            title=f"{task.name}: faithfulness ({args.ablation} ablation)")  # fmt: skip
    # a node-level circuit is drawn whole: its edges share their nodes' scores (input's are untested)
    drawn = None if circuit.level == "node" else args.draw_edges
    with atomic_path(out / "circuit.png") as tmp:
        circuit_graph(circuit, tmp, max_edges=drawn, title=f"{task.name}: {label}")
    with atomic_path(out / "circuit.html") as tmp:
        circuit_html(circuit, tmp, title=f"{task.name}: {label}")
    print(f"{task.name}: {label}: {circuit.n_edges} of {g.n_edges} edges, {len(circuit.nodes)} nodes, "
          f"f = {point[1]:.3f}; found in {found_s:.1f}s, curve in {eval_s:.1f}s")  # fmt: skip
    print(f"faithfulness curve (ranking by {'ACDC loss change' if args.method == 'acdc' else args.method} score): "
          f"CPR {curve['cpr']:.3f}, CMD {curve['cmd']:.3f}; m(model) {curve['full']:.4f}, m(empty) {curve['empty']:.4f}")  # fmt: skip
    if "roc_auc" in circuit.meta:
        print(f"against the known circuit: edge ROC AUC {circuit.meta['roc_auc']['edge']:.3f}, "
              f"node {circuit.meta['roc_auc']['node']:.3f}")  # fmt: skip
    if circuit.level == "node":  # every edge of a node shares its score: list the kept nodes instead
        kept = set(circuit.nodes)
        nodes = sorted(((n, v) for n, v in circuit.meta["node_scores"].items() if n in kept), key=lambda nv: -abs(nv[1]))
        print("kept nodes, by the loss change their removal would cause: "
              + ", ".join(f"{n} {v:+.3g}" for n, v in nodes))  # fmt: skip
    else:
        for src, dst, sc in circuit.edge_list()[:8]:
            print(f"  {src}->{dst}: {sc:+.4g}")
    print(f"wrote {out}/circuit.json, circuit/ (orbax), faithfulness.png, circuit.png, circuit.html")
    return 0


def _circuit_f(model, task, circuit, curve, ablation) -> float:
    """Faithfulness of the found circuit itself, on the curve's full/empty scale."""
    from ..graph import circuit_metrics

    if not circuit.edges[:, -1].any():
        return 0.0
    m = float(circuit_metrics(model, task.clean, task.corrupt, task.metric, circuit.edges, ablation=ablation,
                              attention_mask=task.attention_mask, answer_pos=task.answer_pos)[0])  # fmt: skip
    return (m - curve["empty"]) / (curve["full"] - curve["empty"])
