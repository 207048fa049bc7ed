"""The `circuits-jax` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..core import PATCH_SITES

EDGE_METHODS = ("eap", "eap-ig", "eap-ig-activations")


def _predict(args) -> int:
    import jax
    import numpy as np

    from ..models import load

    model, tok = load(args.model)
    if tok is None:
        print(f"model {args.model!r} has no tokenizer (no tokenizer.json beside it)", file=sys.stderr)
        return 2
    ids = tok.encode(args.prompt, prepend_bos=args.bos)
    if not ids:
        print("the prompt tokenizes to nothing; give some text or --bos", file=sys.stderr)
        return 2
    logits = np.asarray(jax.jit(lambda m, t: m(t))(model, np.asarray([ids], np.int32))[0, -1])
    k = max(1, min(args.top_k, logits.shape[-1]))
    top = np.argsort(-logits, kind="stable")[:k]
    rows = [[tok.decode([int(i)]), int(i), float(logits[i])] for i in top]
    if args.json:
        print(json.dumps({"tokens": [int(i) for i in ids], "top": rows}))
        return 0
    print(f"model: {args.model}   tokens ({len(ids)}):")
    print("  " + " ".join(f"{s!r}" for s in tok.to_str_tokens(ids)))
    print(f"top {k} next tokens:")
    for rank, (text, i, logit) in enumerate(rows, 1):
        print(f"  {rank:>3}. {text!r:<20} id {i:<7} logit {logit:8.3f}")
    return 0


def _prepare(args):
    """Model, tokenizer, token arrays and the logit-difference metric of a clean/corrupt pair (or an exit code)."""
    import numpy as np

    from ..core import LogitDiff
    from ..models import load

    model, tok = load(args.model)
    if tok is None:
        print(f"model {args.model!r} has no tokenizer (no tokenizer.json beside it)", file=sys.stderr)
        return 2
    clean, corrupt = tok.to_tokens(args.clean, args.bos), tok.to_tokens(args.corrupt, args.bos)
    if clean.shape != corrupt.shape:
        print(
            f"circuits-jax: error: clean prompt has {clean.shape[1]} tokens {tok.to_str_tokens(clean)} and corrupt has "
            f"{corrupt.shape[1]} {tok.to_str_tokens(corrupt)}; patching needs prompts of equal token length",
            file=sys.stderr,
        )
        return 2
    metric = LogitDiff(np.array([tok.to_single_token(args.answer)]), np.array([tok.to_single_token(args.wrong)]))
    return model, tok, clean, corrupt, metric


def _patch(args) -> int:
    import numpy as np

    from ..patching import patch_sweep
    from ..plot import heatmap

    method = getattr(args, "method", "exact")
    if method in EDGE_METHODS:
        return _edges(args)
    by = tuple(a.strip() for a in args.by.split(",") if a.strip())
    mesh = _mesh(args)  # a bad --mesh fails before the model loads
    axes = PATCH_SITES[args.site][1]
    if not by or by[0] != "layer" or len(set(by)) != len(by) or any(a not in ("layer", *axes) for a in by):
        raise ValueError(f"invalid axes {args.by!r} for --by with --site {args.site}: give 'layer' first, then any of "
                         f"{', '.join(axes)}")  # fmt: skip
    layers = _layers_arg(args.layers, "--layers") if getattr(args, "layers", None) else None
    prepared = _prepare(args)
    if isinstance(prepared, int):
        return prepared
    model, tok, clean, corrupt, metric = prepared
    if method == "atp":
        from ..patching import attribution_patch

        r = attribution_patch(model, clean, corrupt, metric, args.site, by, noising=args.noising, mesh=mesh)
    elif method == "atp-star":
        from ..patching import atp_star

        r = atp_star(model, clean, corrupt, metric, args.site, by, graddrop=args.graddrop, noising=args.noising,
                     mesh=mesh)
    else:
        r = patch_sweep(model, clean, corrupt, metric, args.site, by, noising=args.noising, chunk_size=args.chunk_size,
                        memory_budget=int(args.memory_gb * 2**30), layers=layers, progress=not args.quiet,
                        mesh=mesh)  # fmt: skip
    str_tokens = tok.to_str_tokens(clean)
    np.savez(
        args.out, result=r.result, clean_metric=r.clean_metric, corrupt_metric=r.corrupt_metric,
        str_tokens=np.array(str_tokens), corrupt_str_tokens=np.array(tok.to_str_tokens(corrupt)),
        seconds=r.seconds, axes=np.array(r.axes), site=args.site, layers=np.array(layers or range(model.cfg.n_layers)),
        noising=args.noising, chunk_size=r.chunk_size, method=method,
    )  # fmt: skip
    if args.png:
        mode = "noising" if args.noising else "denoising"
        title = f"{args.site} by {','.join(by)} ({mode}, {method}); logit diff {args.answer!r} - {args.wrong!r}"
        heatmap(r.result, r.axes, tokens=str_tokens, title=title, path=args.png, layers=layers)
    n = r.result.size
    verb = "patched" if method == "exact" else f"estimated ({method})"
    print(f"{args.site} by {','.join(by)}: result {r.result.shape}, {n} patches {verb} in {r.seconds:.1f}s")
    print(f"clean logit diff {r.clean_metric:.4f}, corrupt {r.corrupt_metric:.4f}")
    flat = np.nan_to_num(r.result).reshape(-1)
    for j in np.argsort(-np.abs(flat))[:5]:
        where = ", ".join(f"{a}={i}" for a, i in zip(by, np.unravel_index(j, r.result.shape)))
        print(f"  {where}: {flat[j]:+.3f}")
    print(f"wrote {args.out}" + (f" and {args.png}" if args.png else ""))
    return 0


def _edges(args) -> int:
    """`attribute --method eap|eap-ig|eap-ig-activations`: scores of every edge of the graph."""
    import numpy as np

    from ..graph import edge_attribution
    from ..plot import edge_heatmap

    mesh = _mesh(args)
    prepared = _prepare(args)
    if isinstance(prepared, int):
        return prepared
    model, tok, clean, corrupt, metric = prepared
    r = edge_attribution(model, clean, corrupt, metric, args.method, steps=args.steps, noising=args.noising, mesh=mesh)
    g = r.graph
    np.savez(
        args.out, scores=r.scores, sources=np.array(g.sources), destinations=np.array(g.destinations), mask=g.mask,
        clean_metric=r.clean_metric, corrupt_metric=r.corrupt_metric, method=args.method, seconds=r.seconds,
        str_tokens=np.array(tok.to_str_tokens(clean)), noising=args.noising, steps=args.steps,
    )  # fmt: skip
    if args.png:
        edge_heatmap(r, title=f"{args.method} edge scores; logit diff {args.answer!r} - {args.wrong!r}", path=args.png)
    print(f"{args.method}: {g.n_edges} edges scored in {r.seconds:.1f}s "
          f"(scores [{len(g.sources)} sources, {len(g.destinations)} destinations])")  # fmt: skip
    print(f"clean logit diff {r.clean_metric:.4f}, corrupt {r.corrupt_metric:.4f}; top edges (normalised change):")
    for name, v in r.top(8):
        print(f"  {name}: {v / (r.clean_metric - r.corrupt_metric):+.3f}")
    print(f"wrote {args.out}" + (f" and {args.png}" if args.png else ""))
    return 0


def _path_patch(args) -> int:
    import numpy as np

    from ..graph import path_patch
    from ..plot import heatmap

    prepared = _prepare(args)
    if isinstance(prepared, int):
        return prepared
    model, tok, clean, corrupt, metric = prepared
    senders = args.senders if args.senders in ("heads", "mlps") else args.senders.split(",")
    r = path_patch(model, clean, corrupt, metric, list(args.receivers), senders, noising=args.noising,
                   progress=not args.quiet)  # fmt: skip
    np.savez(
        args.out, result=r.result, raw=r.raw, axes=np.array(r.axes), receivers=np.array(args.receivers),
        senders=np.array(r.senders), clean_metric=r.clean_metric, corrupt_metric=r.corrupt_metric,
        seconds=r.seconds, noising=args.noising, str_tokens=np.array(tok.to_str_tokens(clean)),
    )  # fmt: skip
    print(f"path patching {len(r.senders)} senders into {len(args.receivers)} receiver group(s) in {r.seconds:.1f}s; "
          f"clean logit diff {r.clean_metric:.4f}, corrupt {r.corrupt_metric:.4f}")  # fmt: skip
    for spec, res in zip(args.receivers, r.result):
        flat = np.nan_to_num(res).reshape(-1)
        top = np.argsort(-np.abs(flat))[:5]
        print(f"  -> {spec}: " + ", ".join(f"{r.senders[j]} {flat[j]:+.3f}" for j in top))
    if args.png:
        from pathlib import Path

        for i, (spec, res) in enumerate(zip(args.receivers, r.result)):
            path = args.png if len(args.receivers) == 1 else str(Path(args.png).with_suffix(f".{i}.png"))
            if r.axes[1] == "sender":  # named senders have no layer axis: the npz and the printout carry them
                print("--png: named senders are not drawn; use --senders heads or mlps for a heatmap")
                break
            heatmap(res, r.axes[1:], title=f"path patching into {spec} ({'noising' if args.noising else 'denoising'}, direct paths)", path=path)
            print(f"wrote {path}")
        print(f"wrote {args.out}")
    else:
        print(f"wrote {args.out}")
    return 0


def _discover(args) -> int:
    """`discover`: a circuit for a task by ACDC, EAP or EAP-IG, with its faithfulness curve and drawings."""
    import time
    from pathlib import Path

    import numpy as np

    from ..graph import acdc, circuit_from_scores, edge_attribution, faithfulness, node_ranking, roc_auc, save_circuit
    from ..plot import circuit_graph, circuit_html, faithfulness_curves
    from ..tasks import load_task

    if args.method != "acdc" and args.level != "edge":
        raise ValueError(f"--level {args.level} is for ACDC; {args.method} scores edges")
    if args.method != "acdc" and args.ablation != "patching":
        raise ValueError(f"{args.method} scores each edge by its corrupt-minus-clean output difference, which is "
                         f"patching ablation; --ablation {args.ablation} is for ACDC")  # fmt: skip
    model, task = load_task(args.task, args.model, n=args.n, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
    save_circuit(circuit, out / "circuit")
    save_circuit(circuit, out / "circuit.json")
    (out / "faithfulness.json").write_text(json.dumps(
        {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v) for k, v in curve.items()}, indent=1))  # fmt: skip
    faithfulness_curves({args.method: curve}, out / "faithfulness.png", points={label: point},
                        title=f"{task.name}: faithfulness ({args.ablation} ablation)")  # fmt: skip
    # a node-level circuit is drawn whole: its edges share their nodes' scores (input's are untested)
    drawn = None if circuit.level == "node" else args.draw_edges
    circuit_graph(circuit, out / "circuit.png", max_edges=drawn, title=f"{task.name}: {label}")
    circuit_html(circuit, out / "circuit.html", title=f"{task.name}: {label}")
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


def _layers_arg(text: str, flag: str = "--clt-layers") -> list[int]:
    """'0-3' or '0,1,2,3' -> [0, 1, 2, 3]; errors name `flag`."""
    try:
        if "-" in text:
            a, b = text.split("-")
            layers = list(range(int(a), int(b) + 1))
        else:
            layers = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} takes a range '0-3' or a list '0,1,2,3', got {text!r}") from None
    if not layers:
        raise ValueError(f"{flag} {text!r} names no layer (a range is low-high, e.g. 0-3)")
    return layers


def _count(low: int = 1):
    """argparse `type`: an integer >= `low`; a bad value exits 2 with `argument --flag: ...`."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"need an integer >= {low}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"need an integer >= {low}, got {v}")
        return v

    return parse


def _chunk_arg(text: str):
    """argparse `type` of --chunk-size: an integer >= 1 or 'plan'."""
    return "plan" if text == "plan" else _count(1)(text)


def _positive(text: str) -> float:
    """argparse `type`: a number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"need a number > 0, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"need a number > 0, got {text}")
    return v


def _share(text: str) -> float:
    """argparse `type`: a share in (0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"need a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"need a number in (0, 1], got {text}")
    return v


def _kind_arg(text: str) -> str:
    """argparse `type`: a per-layer site kind such as hook_resid_pre (checked against every architecture's kinds)."""
    import difflib

    from ..core import LAYER_KINDS as kinds

    if text not in kinds:
        close = difflib.get_close_matches(text, kinds, n=3, cutoff=0.5)
        raise argparse.ArgumentTypeError(f"unknown site kind {text!r}" + (f"; closest: {', '.join(close)}" if close else
                                         f"; valid kinds: {', '.join(kinds)}"))  # fmt: skip
    return text


def _check_site_name(name: str, flag: str) -> None:
    """Refuse a site name no architecture has (before any model loads), naming the closest valid ones."""
    import difflib

    from ..core import GLOBAL_KINDS as glob
    from ..core import LAYER_KINDS as kinds

    parts = name.split(".", 2)
    if name in glob or (len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in kinds):
        return
    layer = parts[1] if len(parts) > 1 and parts[1].isdigit() else "0"
    close = difflib.get_close_matches(name, [*glob, *(f"blocks.{layer}.{k}" for k in kinds)], n=3, cutoff=0.5)
    hint = f"closest valid names: {', '.join(close)}" if close else "site names look like blocks.6.hook_resid_post"
    raise ValueError(f"{flag}: unknown activation site {name!r}; {hint}")


def _train_sae(args) -> int:
    from ..dictionaries import train_dictionary
    from ..models import load

    site, target, layers = args.site, args.target, None
    if args.transcoder is not None:
        site, target = f"blocks.{args.transcoder}.ln2.hook_normalized", f"blocks.{args.transcoder}.hook_mlp_out"
    if args.clt_layers is not None:
        layers = _layers_arg(args.clt_layers)
    if site is None and layers is None:
        raise ValueError("give --site (an SAE), --site with --target or --transcoder L (a transcoder), or --clt-layers")
    if args.arch in ("topk", "batchtopk") and not (args.k or 0) >= 1:
        raise ValueError(f"--arch {args.arch} needs --k >= 1, got {args.k}")
    for flag, name in (("--site", args.site), ("--target", args.target)):
        if name is not None:
            _check_site_name(name, flag)  # the layer is checked once the model has loaded
    mesh = _mesh(args)
    model, tok = load(args.model)
    train_cfg = dict(batch_size=args.batch_size, lr=args.lr, lr_schedule=args.lr_schedule, dead_after=args.dead_after)
    from ..dictionaries import LossConfig

    train_cfg["loss"] = LossConfig(l1_coeff=args.l1_coeff, l0_coeff=args.l0_coeff)
    summary = train_dictionary(
        model, tok, args.out, site=site, target=target, clt_layers=layers, arch=args.arch, k=args.k, width=args.width,
        n_tokens=args.tokens, epochs=args.epochs, corpus=args.corpus, ctx_len=args.ctx_len, n_eval_contexts=args.eval_contexts,
        store_dir=args.store, train_cfg=train_cfg, seed=args.seed, progress=not args.quiet, model_name=str(args.model),
        mesh=mesh,
    )  # fmt: skip
    keys = ("l0", "fve", "ce_clean", "ce_splice", "ce_zero", "ce_recovered", "kl_recovered", "dead", "dense")
    print(" ".join(f"{k}={summary[k]:.4g}" for k in keys))
    if summary.get("layer_fvu"):
        print("per-layer FVU:", " ".join(f"{v:.3f}" for v in summary["layer_fvu"]))
    print(f"tokens/s (train step) {summary['tokens_per_second']:.0f}; seconds {summary['seconds']}")
    try:
        import numpy as np

        from ..plot import feature_density

        out = Path(args.out)
        title = f"{args.arch} {(summary.get('sites') or [''])[-1]} ({args.width} latents)"
        feature_density(np.load(out / "density.npy"), path=out / "density.png", title=title)
    except Exception as e:  # a plot must never lose a finished run
        print(f"(density plot skipped: {e})")
    print(f"saved to {args.out}/dictionary (eval.json, history.json, density.png beside it)")
    return 0


def _features(args) -> int:
    from pathlib import Path

    from ..dictionaries import (
        dashboard_data,
        dictionary_info,
        feature_stats,
        load_dictionary,
        pack_contexts,
        read_corpus,
        select_features,
        write_dashboards,
    )
    from ..models import load

    root = Path(args.dir)
    ddir = root / "dictionary" if (root / "dictionary" / "dictionary.json").exists() else root
    info = dictionary_info(ddir)
    if info["kind"] == "clt":
        raise ValueError("dashboards are per SAE or transcoder; a cross-layer transcoder has none yet")
    if not args.html:
        raise ValueError("nothing to do: pass --html to write the dashboards page")
    d = load_dictionary(ddir)
    meta = info.get("info", {})
    model_name = args.model or meta.get("model") or "smollm2"
    model, tok = load(model_name)
    corpus = args.corpus or meta.get("corpus") or "python-docs"
    ctx = pack_contexts(tok, read_corpus(corpus), args.ctx_len, max_contexts=args.contexts)
    stats = feature_stats(model, d, ctx)
    feats = select_features(stats, args.how, n=args.n, seed=args.seed, width=d.width)
    data = dashboard_data(model, tok, d, ctx, feats)
    out = Path(args.out) if args.out else root / "features.html"
    write_dashboards(out, data, title=f"{info['arch']} {d.out_site} ({d.width} latents) on {corpus}")
    dead = float((stats["density"] == 0).mean())
    print(f"{len(feats)} features ({args.how}) over {stats['n_tokens']} tokens; {dead:.1%} of latents never fired there")
    print(f"wrote {out}")
    return 0


def _graph(args) -> int:
    import time
    from pathlib import Path

    from ..attribution_graphs import attribute, feature_examples, load_transcoders, prune, write_graph
    from ..dictionaries import pack_contexts, read_corpus
    from ..models import load

    for name in ("node_threshold", "edge_threshold"):
        v = getattr(args, name)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be between 0 and 1, got {v}")
    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    if not Path(args.transcoders).is_dir():
        raise FileNotFoundError(f"--transcoders {args.transcoders} is not a directory (train them with experiments/train_transcoders.py)")
    t0 = time.perf_counter()
    model, tok = load(args.model)
    ts = load_transcoders(args.transcoders, model=model, model_name=str(args.model))
    ids = tok.encode(args.prompt, prepend_bos=True)
    g = attribute(model, ts, ids, prompt=args.prompt, token_strs=tok.to_str_tokens(ids), decode=lambda i: tok.decode([i]),
                    max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size, progress=not args.quiet)  # fmt: skip
    features = None
    pruned = prune(g, args.node_threshold, args.edge_threshold)
    if args.examples > 0:
        keep = [(l, f) for i, (l, _, f) in enumerate(g.features.tolist()) if pruned.node_mask[i]]
        n_ctx = 64 if model.cfg.positional != "learned" else min(64, model.cfg.n_ctx)
        ctx = pack_contexts(tok, read_corpus(args.corpus), n_ctx, max_contexts=args.examples)
        features = feature_examples(model, ts, keep, ctx, decode=lambda i: tok.decode([i]), progress=not args.quiet)
    s = write_graph(args.out, g, slug=args.slug or "graph", pruned=pruned, features=features, title=args.prompt)
    print(f"prompt ({len(ids)} tokens): {args.prompt!r}")
    print("top logits: " + ", ".join(f"{k!r} {v:.3f}" for k, v in s["logits"].items()))
    print(f"{s['active_features']} active features, {s['visited_features']} attributed in {s['backward_passes']} compiled backward "
          f"passes of {s['batch_size']} rows; {s['seconds']:.1f} s")  # fmt: skip
    print(f"pruned graph: {s['nodes']} nodes, {s['links']} links; replacement score {s['replacement']:.3f}, "
          f"completeness {s['completeness']:.3f}")  # fmt: skip
    print(f"wrote {args.out}/graph.json, graph.html, scores.json, graph.npz ({time.perf_counter() - t0:.0f} s in all)")
    return 0


def _steer(args) -> int:
    """ActAdd steering of one prompt: the greedy generation per coefficient, next-token sweep and plot."""
    from pathlib import Path

    import jax
    import jax.numpy as jnp
    import numpy as np

    from ..core import generate
    from ..models import load
    from ..plot import steering_curves
    from ..toolshed import actadd, perplexity_sweep, steering_hook, steering_sweep

    try:
        coeffs = [float(c) for c in args.coeffs.split(",") if c.strip()]
    except ValueError:
        coeffs = []
    if not coeffs:
        raise ValueError(f"--coeffs needs comma-separated numbers, got {args.coeffs!r}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, tok = load(args.model)
    if tok is None:
        print(f"model {args.model!r} has no tokenizer (no tokenizer.json beside it)", file=sys.stderr)
        return 2
    v = actadd(model, tok, args.positive, args.negative, args.layer, align=args.align, prepend_bos=args.bos)
    ids = tok.encode(args.prompt, prepend_bos=args.bos)
    if len(ids) < v.shape[0]:
        raise ValueError(f"the prompt has {len(ids)} tokens, fewer than the {v.shape[0]} of the steering vector "
                         f"({tok.to_str_tokens(ids)}); give a longer prompt")  # fmt: skip
    prompt = np.asarray([ids], np.int32)
    print(f"ActAdd {args.positive!r} - {args.negative!r} at blocks.{args.layer}.hook_resid_pre, {v.shape[0]} positions, "
          f"|v| per position {[round(float(x), 2) for x in jnp.linalg.norm(v, axis=-1)]}")  # fmt: skip
    gens = {}
    for c in coeffs:
        g = generate(model, prompt, args.max_new_tokens, hooks=steering_hook(v, args.layer, c, model=model), hooks_on="prompt")
        gens[c] = tok.decode(np.asarray(g.tokens[0]))
        print(f"coeff {c:+g}: {args.prompt}{gens[c]!s}")
    # next-token probabilities of the tokens the unsteered and the most steered runs rank first
    sweep = jnp.asarray([0.0, *coeffs], jnp.float32)
    probs = np.asarray(steering_sweep(model, prompt, v, args.layer, sweep, lambda lg: jax.nn.softmax(lg[0, -1].astype(jnp.float32))))
    top = list(dict.fromkeys([*np.argsort(-probs[0])[:3].tolist(), *np.argsort(-probs[int(np.argmax(np.abs(sweep)))])[:3].tolist()]))
    curves = {repr(tok.decode([t])): probs[1:, t].tolist() for t in top}
    base = generate(model, prompt, args.max_new_tokens).tokens
    text = np.concatenate([prompt, np.asarray(base)], 1)
    ppl = np.asarray(perplexity_sweep(model, text, v, args.layer, jnp.asarray(coeffs, jnp.float32))).tolist()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steering_curves(coeffs, curves, ppl, out / "steer.png", title=f"ActAdd {args.positive!r} - {args.negative!r}, layer {args.layer}",
                    ylabel="next-token probability", ppl_label="perplexity of the unsteered continuation")  # fmt: skip
    (out / "steer.json").write_text(json.dumps(dict(
        positive=args.positive, negative=args.negative, layer=args.layer, prompt=args.prompt, coeffs=coeffs,
        generations={str(c): t for c, t in gens.items()}, next_token_probs=curves, perplexity=ppl), indent=1))  # fmt: skip
    print(f"wrote {out}/steer.png, steer.json")
    return 0


def _trace_fact(args) -> int:
    """Causal tracing of one fact: clean/corrupt p(answer), the peak per kind, heatmaps and arrays in OUT."""
    from pathlib import Path

    import numpy as np

    from ..models import load
    from ..plot import causal_traces
    from ..toolshed import KINDS, trace_fact

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"--kinds {args.kinds!r}: each must be one of {', '.join(KINDS)}")
    model, tok = load(args.model)
    if tok is None:
        raise ValueError(f"model {args.model!r} has no tokenizer (no tokenizer.json beside it)")
    res = trace_fact(model, tok, args.prompt, args.subject, args.answer, kinds=kinds, prepend_bos=args.bos, noise=args.noise,
                     samples=args.samples, window=args.window, seed=args.seed, progress=not args.quiet)  # fmt: skip
    r0 = next(iter(res.values()))
    strs = tok.to_str_tokens(r0.tokens)
    a, b = r0.subject_span
    answer = tok.decode([r0.answer_id])
    print(f"prompt ({len(strs)} tokens): {' '.join(repr(s) + ('*' if a <= i < b else '') for i, s in enumerate(strs))}")
    print(f"answer {answer!r}: clean p={r0.clean:.4f}, subject noised p={r0.corrupt:.4f} "
          f"({r0.samples} draws, noise std {r0.noise:.4g})")  # fmt: skip
    summary = {}
    for k, r in res.items():
        l, t, s = r.peak()
        print(f"  {k:5s} peak p={s:.4f} at layer {l}, token {t} {strs[t]!r} (window {r.window}; {r.seconds:.1f} s)")
        summary[k] = dict(peak_layer=l, peak_token=t, peak_prob=s, window=r.window, seconds=r.seconds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "trace.npz", tokens=r0.tokens, str_tokens=np.array(strs), subject_span=np.array(r0.subject_span),
             answer_id=r0.answer_id, clean=r0.clean, corrupt=r0.corrupt, noise=r0.noise, samples=r0.samples,
             **{f"scores_{k}": r.scores for k, r in res.items()})  # fmt: skip
    meta = dict(prompt=args.prompt, subject=args.subject, answer=answer, answer_id=r0.answer_id, str_tokens=strs,
                subject_span=list(r0.subject_span), clean=r0.clean, corrupt=r0.corrupt, noise=r0.noise, samples=r0.samples,
                kinds=summary, scores={k: r.scores.tolist() for k, r in res.items()})  # fmt: skip
    (out / "trace.json").write_text(json.dumps(meta, indent=1))
    causal_traces(res, out / "trace.png", tokens=strs, title=f"{args.prompt!r} -> {answer!r}")
    print(f"wrote {out}/trace.png, trace.json, trace.npz")
    return 0


def _scrub(args) -> int:
    """Causal scrubbing of the induction hypothesis (and a variant with another previous-token head) on the
    trained induction model: loss recovered with a 95 % interval per hypothesis."""
    import numpy as np

    from ..graph import NextTokenLoss, induction_hypothesis, repeated_dataset, scrub
    from ..tasks.known import INDUCTION_CONFIG, induction_model

    H = INDUCTION_CONFIG.n_heads
    given = {}
    for what, text in (("--prev-heads", args.prev_heads), ("--induction-heads", args.induction_heads),
                       ("--wrong-prev", "auto" if args.wrong_prev is None else str(args.wrong_prev))):  # fmt: skip
        if text != "auto":
            try:
                hs = [int(h) for h in text.split(",") if h.strip()]
            except ValueError:
                hs = []
            if not hs or any(not 0 <= h < H for h in hs):
                raise ValueError(f"{what} {text!r}: need comma-separated head indices in [0, {H})")
            given[what] = hs
    model, info = induction_model(args.seed, progress=not args.quiet)
    P = given.get("--prev-heads", info["prev_token_heads"])
    I = given.get("--induction-heads", info["induction_heads"])
    hyps = {f"induction (a0.h{P}, a1.h{I})": induction_hypothesis(P, I)}
    if args.wrong_prev is not None:
        hyps[f"induction (a0.h[{args.wrong_prev}], a1.h{I})"] = induction_hypothesis([args.wrong_prev], I)
    tokens = repeated_dataset(args.rows, args.n, model.cfg.d_vocab, args.seed + 1)
    res = scrub(model, tokens, hyps, NextTokenLoss((-2,)), n=args.trees, seed=args.seed, progress=not args.quiet)
    print(f"previous-token scores {np.round(info['prev_token_scores'], 3)}, induction scores "
          f"{np.round(info['induction_scores'], 3)}")  # fmt: skip
    print(res.table())
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(model_loss=res.model_loss, empty_loss=res.empty_loss, trees=res.n,
            hypotheses={k: dict(recovered=res.recovered[k], ci95=list(res.ci[k]), loss=res.loss[k]) for k in hyps}),
            indent=1))  # fmt: skip
    return 0


def _das(args) -> int:
    """DAS on IOI's "position of the indirect object" variable: IIA per layer, JSON and a plot."""
    from pathlib import Path

    from ..models import load
    from ..plot import das_layers
    from ..toolshed import das_search, ioi_position_pairs

    layers = _layers_arg(args.layers, "--layers") if args.layers else None
    if not args.n_train < args.pairs:
        raise ValueError(f"--n-train {args.n_train} must be below --pairs {args.pairs}: the rest are held out for IIA")
    model, tok = load(args.model)
    if tok is None:
        raise ValueError(f"model {args.model!r} has no tokenizer (no tokenizer.json beside it)")
    pairs = ioi_position_pairs(model, tok, args.pairs, args.seed)
    layers = layers or list(range(0, model.cfg.n_layers, args.layer_step))
    res = das_search(model, pairs["base"], pairs["source"], pairs["labels"], pairs["candidates"], kind=args.kind,
                     layers=layers, k=args.k, method=args.method, n_train=args.n_train, steps=args.steps,
                     batch_size=args.batch, lr=args.lr, seed=args.seed, progress=not args.quiet)  # fmt: skip
    changed = pairs["changed"][res.n_train :]
    out = dict(res.to_json(), model_ioi_accuracy=pairs["model_accuracy"],
               iia_changed=res.correct[:, changed].mean(-1).tolist(),
               iia_random_changed=res.correct_random[:, changed].mean(-1).tolist(),
               iia_full_changed=res.correct_full[:, changed].mean(-1).tolist())  # fmt: skip
    for i, l in enumerate(res.layers):
        print(f"layer {l:3d}: IIA {res.iia[i]:.3f} (changed {out['iia_changed'][i]:.3f}), random {res.iia_random[i]:.3f}, "
              f"full vector {res.iia_full[i]:.3f}")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
        das_layers(out, Path(args.out).with_suffix(".png"), title=f"DAS {args.method} k={args.k} on IOI ({args.kind})")
        print(f"wrote {args.out} and its .png")
    return 0


def _ioi(args) -> int:
    """`ioi`: the main job, an IOI circuit study with a report."""
    from ..models import load
    from ._ioi_job import ioi_job

    if args.n < 2:
        raise ValueError(f"--n must be at least 2 prompt pairs, got {args.n}")
    if not 0 < args.fraction < 1:
        raise ValueError(f"--fraction is the share of edges kept, between 0 and 1; got {args.fraction}")
    t = time.perf_counter()
    print(f"loading {args.model} ...", flush=True)
    model, tok = load(args.model)
    print(f"    loaded in {time.perf_counter() - t:.1f} s", flush=True)
    s = ioi_job(model, tok, args.out, n=args.n, seed=args.seed, template=args.template, eap_steps=args.steps,
                circuit_fraction=args.fraction, progress=not args.quiet, model_name=str(args.model),
                log=lambda m: print(m, flush=True))  # fmt: skip
    print()
    print(f"IOI on {s['model']}: {s['n_prompts']} prompts; logit diff clean {s['clean_logit_diff']:.2f} "
          f"(IO > S in {s['clean_accuracy']:.0%}), corrupt {s['corrupt_logit_diff']:.2f}")
    print("name movers (path patching into the logits, normalised): "
          + ", ".join(f"{h} {v:+.3f}" for h, v in s["name_movers_path_patching"][:5]))
    print("negative heads: " + ", ".join(f"{h} {v:+.3f}" for h, v in s["negative_heads_path_patching"]))
    print("heads whose patch matters most (exact z patching): "
          + ", ".join(f"{h} {v:+.3f}" for h, v in s["top_heads_exact"][:5]))
    print(f"AtP vs exact per-head z: Pearson r = {s['atp_vs_exact_pearson']:.3f}")
    print(f"EAP-IG circuit of {s['circuit_edges']} edges: faithfulness {s['circuit_faithfulness']:.3f}, CPR {s['cpr']:.3f}")
    print("seconds per stage: " + ", ".join(f"{k} {v}" for k, v in s["stage_seconds"].items())
          + f"; total {time.perf_counter() - t:.0f} s with loading")
    print(f"report: {s['report']}")
    return 0


# name -> (script in experiments/, what it asks); each script's `main(argv)` writes OUT/report.html
EXPERIMENTS = {
    "ioi": ("ioi_report.py", "IOI on SmolLM2: the main job's study (same as `circuits-jax ioi`)"),
    "induction": ("induction.py", "induction heads in the trained 2-layer attention-only model"),
    "greater-than": ("greater_than.py", "greater-than: which components make SmolLM2 complete a year with a later one"),
    "factual-recall": ("causal_tracing.py", "factual recall: causal tracing of 'The Eiffel Tower is located in the city of'"),
    "steering": ("steering.py", "steering: ActAdd, CAA and SAE-feature steering of sentiment"),
    "attribution-graph": ("attribution_graphs.py", "the attribution graph of a capital-city prompt (needs trained transcoders)"),
    "custom-intervention": ("custom_intervention.py", "a user-defined intervention swept over every head with vmap, against a loop"),
}


def _experiments_dir():
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "experiments"


def _experiment(args) -> int:
    """`experiment NAME [args...]`: run experiments/<script>.py's `main(args)`."""
    import importlib.util

    script, _ = EXPERIMENTS[args.name]
    path = _experiments_dir() / script
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: experiments live in a source checkout of circuits_jax "
                                "(git clone the repository and install it with scripts/setup.sh)")  # fmt: skip
    spec = importlib.util.spec_from_file_location(f"circuits_jax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and eqx.Modules look their module up while the script runs
    spec.loader.exec_module(module)
    rc = module.main(list(args.rest))
    return 0 if rc is None else int(rc)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="circuits-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  circuits-jax ioi                       # the IOI circuit study on SmolLM2 -> runs/ioi/report.html\n"
               "  circuits-jax predict --prompt 'The capital of France is'\n"
               "  circuits-jax COMMAND --help            # each command's options and an example",
    )  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    io = sub.add_parser(
        "ioi", help="the main job: an IOI circuit study (patching, AtP, path patching, EAP-IG) written as a report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax ioi                      # SmolLM2, 8 prompts -> runs/ioi/report.html\n"
               "  circuits-jax ioi --n 32 --seed 1 --out runs/ioi32",
    )  # fmt: skip
    io.add_argument("--model", default="smollm2", help="'smollm2' (default), a .gguf path, or an HF-format directory")
    io.add_argument("--n", type=int, default=8, help="prompt pairs (default 8)")
    io.add_argument("--seed", type=int, default=0)
    io.add_argument("--template", type=int, default=0, choices=range(5), help="which IOI template (all rows share it)")
    io.add_argument("--steps", type=_count(1), default=5, help="EAP-IG integration steps")
    io.add_argument("--fraction", type=float, default=0.01, help="share of edges in the reported circuit")
    io.add_argument("--out", default="runs/ioi", help="output directory (report.html, arrays, plots)")
    io.add_argument("--quiet", action="store_true", help="no progress bars")
    io.set_defaults(func=_ioi)

    ex = sub.add_parser(
        "experiment", help="run one of the experiments (experiments/*.py); each writes a report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="experiments:\n" + "\n".join(f"  {k:18s} {v[1]}" for k, v in EXPERIMENTS.items())
        + "\n\nexample:\n  circuits-jax experiment induction --out runs/induction\n"
          "  circuits-jax experiment greater-than -- --help     # the experiment's own options",
    )  # fmt: skip
    ex.add_argument("name", choices=list(EXPERIMENTS), help="which experiment")
    ex.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the experiment (see its --help)")
    ex.set_defaults(func=_experiment)

    pr = sub.add_parser(
        "predict", help="tokens of a prompt and the top-K next tokens with logits", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax predict --prompt 'The capital of France is' --top-k 5\n"
               "  circuits-jax predict --model path/to/model.gguf --prompt 'def f(x):' --json",
    )  # fmt: skip
    pr.add_argument("--model", default="smollm2", help="'smollm2' (default), a .gguf path, or an HF-format directory")
    pr.add_argument("--prompt", required=True)
    pr.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                    help="prepend BOS (default: the model's own setting; SmolLM2 uses none)")  # fmt: skip
    pr.add_argument("--top-k", type=_count(1), default=10)
    pr.add_argument("--json", action="store_true", help='print {"tokens": [...], "top": [[text, id, logit], ...]}')
    pr.set_defaults(func=_predict)

    pa = sub.add_parser(
        "patch", help="activation / attention patching sweep (clean into corrupt by default)", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax patch --clean 'When Mary and John went to the store, John gave a drink to' \\\n"
               "      --corrupt 'When Mary and John went to the store, Mary gave a drink to' --answer ' Mary' --wrong ' John' \\\n"
               "      --site z --by layer,head --out runs/patch_z.npz --png runs/patch_z.png",
    )  # fmt: skip
    _sweep_arguments(pa)
    pa.add_argument("--layers", default=None, help="comma list of layers to patch (default all)")
    pa.add_argument("--chunk-size", type=_chunk_arg, default=None,
                    help="patches per compiled call (default: automatic), or 'plan': measured from the compiled program "
                         "against --memory-gb, refused up front when one patch does not fit")  # fmt: skip
    pa.add_argument("--memory-gb", type=_positive, default=4.0, help="memory budget that sets the chunk size")
    pa.add_argument("--quiet", action="store_true", help="no progress bar")
    pa.set_defaults(func=_patch)

    at = sub.add_parser(
        "attribute", help="gradient estimates of a patching sweep (same shapes and file layout) or of every edge", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax attribute --method atp --clean 'When Mary and John went to the store, John gave a drink to' \\\n"
               "      --corrupt 'When Mary and John went to the store, Mary gave a drink to' --answer ' Mary' --wrong ' John' \\\n"
               "      --site z --by layer,head --out runs/atp_z.npz --png runs/atp_z.png\n"
               "  (--method eap-ig scores every edge instead and writes scores [sources, destinations])",
    )  # fmt: skip
    at.add_argument("--method", choices=["atp", "atp-star", *EDGE_METHODS], default="atp",
                    help="atp: attribution patching; atp-star: with the attention-saturation fix (AtP*); eap, eap-ig, "
                         "eap-ig-activations: every edge of the graph, written as scores [sources, destinations]")  # fmt: skip
    _sweep_arguments(at)
    at.add_argument("--graddrop", action="store_true", help="atp-star: add GradDrop (unsigned magnitudes)")
    at.add_argument("--steps", type=_count(1), default=8, help="eap-ig*: interpolation steps")
    at.set_defaults(func=_patch, quiet=True)

    dc = sub.add_parser(
        "discover", help="find a circuit for a task (ACDC, EAP, EAP-IG) and score its faithfulness", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  circuits-jax discover --task ioi --method eap-ig --fraction 0.01 --out runs/ioi_circuit\n"
               "  circuits-jax discover --task constructed-induction --method acdc --threshold 0.01 --out runs/acdc_toy\n"
               "writes OUT/circuit.json, circuit/ (orbax), faithfulness.png, circuit.png, circuit.html",
    )  # fmt: skip
    dc.add_argument("--task", required=True, help="ioi, induction, greater-than, factual-recall (SmolLM2 or --model), "
                    "or a model with a known circuit: toy-induction, ...")
    dc.add_argument("--model", default="smollm2")
    dc.add_argument("--method", choices=["acdc", "eap", "eap-ig"], default="eap-ig")
    dc.add_argument("--level", choices=["edge", "node"], default="edge", help="acdc: edges, or heads and MLPs whole")
    dc.add_argument("--threshold", type=float, default=None,
                    help="acdc: τ on the loss change (default 0.01); eap*: keep edges with |score| >= T")
    dc.add_argument("--fraction", type=_share, default=0.01, help="eap*: fraction of edges kept (default 1%%)")
    dc.add_argument("--construct", choices=["topn", "greedy"], default="greedy", help="eap*: how scores become a circuit")
    dc.add_argument("--loss", choices=["kl", "metric"], default="kl", help="acdc: KL to the model, or the task metric")
    dc.add_argument("--ablation", choices=["patching", "zero", "mean"], default="patching")
    dc.add_argument("--steps", type=_count(1), default=8, help="eap-ig: interpolation steps")
    dc.add_argument("--n", type=_count(1), default=16, help="prompt pairs")
    dc.add_argument("--seed", type=int, default=0)
    dc.add_argument("--draw-edges", type=_count(1), default=300, help="largest edges drawn in circuit.png (edge level)")
    dc.add_argument("--out", required=True, help="output directory")
    dc.add_argument("--quiet", action="store_true", help="no progress bar")
    dc.set_defaults(func=_discover)

    ts = sub.add_parser(
        "train-sae", help="train a sparse dictionary (SAE, transcoder or cross-layer transcoder) and evaluate it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  circuits-jax train-sae --site blocks.6.hook_resid_post --arch topk --k 32 --width 4608 --tokens 1000000 --out runs/sae6\n"
        "  circuits-jax train-sae --transcoder 6 --arch topk --k 32 --width 4608 --tokens 1000000 --out runs/tc6\n"
        "  circuits-jax train-sae --clt-layers 0-3 --arch topk --k 16 --width 1024 --tokens 300000 --out runs/clt\n"
        "Run the same command again to resume an interrupted run.",
    )  # fmt: skip
    ts.add_argument("--model", default="smollm2", help="'smollm2' (default), a .gguf path, or an HF-format directory")
    ts.add_argument("--site", help="site the dictionary reads (an SAE also writes it), e.g. blocks.6.hook_resid_post")
    ts.add_argument("--target", help="site a transcoder writes (e.g. blocks.6.hook_mlp_out)")
    ts.add_argument("--transcoder", type=_count(0), metavar="L", help="a transcoder of layer L's MLP (ln2.hook_normalized -> hook_mlp_out)")
    ts.add_argument("--clt-layers", metavar="A-B", help="a cross-layer transcoder over layers A..B")
    ts.add_argument("--arch", default="topk", choices=["relu", "topk", "batchtopk", "jumprelu"])
    ts.add_argument("--k", type=int, default=32, help="active latents per token (topk, batchtopk)")
    ts.add_argument("--width", type=_count(1), default=4608, help="number of latents")
    ts.add_argument("--tokens", type=_count(1), default=1_000_000, help="training tokens (activations stored on disk)")
    ts.add_argument("--epochs", type=_count(1), default=1, help="passes over the stored tokens (each reshuffled)")
    ts.add_argument("--out", required=True, help="output directory (store, checkpoints, dictionary, eval)")
    ts.add_argument("--corpus", default="python-docs", help="python-docs (Debian python3.11-doc), pydoc-topics, a .txt/.jsonl file or a directory")
    ts.add_argument("--store", help="activation store directory to reuse or build (default OUT/store)")
    ts.add_argument("--ctx-len", type=_count(2), default=128)
    ts.add_argument("--batch-size", type=_count(1), default=1024)
    ts.add_argument("--lr", type=_positive, default=4e-4)
    ts.add_argument("--lr-schedule", default="linear", choices=["linear", "cosine", "constant"],
                    help="after a 100-step warm-up: constant then linear decay over the last 20%% (default), cosine, constant")  # fmt: skip
    ts.add_argument("--l1-coeff", type=float, default=5.0, help="relu: L1 coefficient")
    ts.add_argument("--l0-coeff", type=float, default=1e-3, help="jumprelu: L0 coefficient")
    ts.add_argument("--dead-after", type=_count(1), default=200_000, help="tokens without firing before a latent counts as dead")
    ts.add_argument("--eval-contexts", type=_count(1), default=64, help="held-out contexts for evaluation")
    ts.add_argument("--seed", type=int, default=0)
    _mesh_argument(ts)
    ts.add_argument("--quiet", action="store_true", help="no progress bars")
    ts.set_defaults(func=_train_sae)

    fe = sub.add_parser(
        "features", help="per-feature dashboards of a trained dictionary as one static HTML page",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax features runs/sae6 --html --n 40    # writes runs/sae6/features.html",
    )  # fmt: skip
    fe.add_argument("dir", help="a train-sae output directory (or its dictionary/ folder)")
    fe.add_argument("--html", action="store_true", help="write the dashboards page")
    fe.add_argument("--out", help="HTML file (default DIR/features.html)")
    fe.add_argument("--n", type=_count(1), default=32, help="features to show")
    fe.add_argument("--how", default="random", choices=["random", "top_density", "top_max"], help="which features")
    fe.add_argument("--contexts", type=_count(1), default=256, help="corpus contexts to scan")
    fe.add_argument("--ctx-len", type=_count(2), default=64)
    fe.add_argument("--model", help="override the model recorded with the dictionary")
    fe.add_argument("--corpus", help="override the corpus recorded with the dictionary")
    fe.add_argument("--seed", type=int, default=0)
    fe.set_defaults(func=_features)

    gr = sub.add_parser(
        "graph", help="attribution graph of a prompt through per-layer transcoders (circuit tracing)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n"
        "  circuits-jax graph --model smollm2 --transcoders runs/transcoders --prompt 'The capital of France is' --out runs/graph_france\n"
        "writes OUT/graph.json (circuit-tracer / Neuronpedia schema), graph.html (open it in a browser), scores.json, graph.npz.\n"
        "Train the transcoders with experiments/train_transcoders.py.",
    )  # fmt: skip
    gr.add_argument("--model", default="smollm2", help="'smollm2' (default), a .gguf path, or an HF-format directory")
    gr.add_argument("--transcoders", required=True, help="directory of per-layer transcoders (layer_XX/dictionary)")
    gr.add_argument("--prompt", required=True, help="the prompt (BOS is prepended)")
    gr.add_argument("--out", required=True, help="output directory")
    gr.add_argument("--max-feature-nodes", type=_count(1), default=None, help="feature rows to compute (default: every active feature)")
    gr.add_argument("--batch-size", type=_count(1), default=64, help="target rows per compiled backward pass")
    gr.add_argument("--node-threshold", type=float, default=0.8, help="share of influence the kept nodes hold")
    gr.add_argument("--edge-threshold", type=float, default=0.98, help="share of influence the kept edges hold")
    gr.add_argument("--examples", type=_count(0), default=64, help="corpus contexts scanned for each kept feature's top examples (0: none)")
    gr.add_argument("--corpus", default="pydoc-topics", help="corpus for the feature examples")
    gr.add_argument("--slug", help="graph name in the JSON")
    gr.add_argument("--quiet", action="store_true", help="no progress bars")
    gr.set_defaults(func=_graph)

    st = sub.add_parser(
        "steer", help="ActAdd steering: generations per coefficient and a next-token / perplexity sweep plot", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax steer --positive Love --negative Hate --layer 6 --coeffs=-10,0,10 \\\n"
               "      --prompt 'I think you are' --out runs/steer    # writes runs/steer/steer.png, steer.json",
    )  # fmt: skip
    st.add_argument("--model", default="smollm2")
    st.add_argument("--positive", required=True, help="positive ActAdd prompt, e.g. 'Love'")
    st.add_argument("--negative", required=True, help="negative ActAdd prompt, e.g. 'Hate'")
    st.add_argument("--layer", type=_count(0), required=True, help="steer blocks.LAYER.hook_resid_pre")
    st.add_argument("--coeffs", required=True, help="comma-separated coefficients; write --coeffs=-5,0,5 when the first is negative")
    st.add_argument("--prompt", required=True, help="the prompt to steer (at least as many tokens as the ActAdd prompts)")
    st.add_argument("--max-new-tokens", type=_count(1), default=20)
    st.add_argument("--align", choices=("error", "pad"), default="error",
                    help="prompts of different token lengths: error (default) or right-pad the shorter with ' '")  # fmt: skip
    st.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None, help="prepend BOS (default: the model's)")
    st.add_argument("--out", default="steer_out", help="directory for steer.png and steer.json")
    st.set_defaults(func=_steer)

    tf = sub.add_parser(
        "trace-fact", help="causal tracing (Meng et al.): where restoring clean states brings a fact back", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax trace-fact --prompt 'The Eiffel Tower is located in the city of' \\\n"
               "      --subject 'The Eiffel Tower' --answer ' Paris' --out runs/trace_eiffel",
    )  # fmt: skip
    tf.add_argument("--model", default="smollm2", help="'smollm2' (default), a .gguf path, or an HF-format directory")
    tf.add_argument("--prompt", required=True, help="e.g. 'The Eiffel Tower is located in the city of'")
    tf.add_argument("--subject", required=True, help="the subject as it appears in the prompt (its tokens are noised)")
    tf.add_argument("--answer", default=None, help="the answer token, e.g. ' Paris' (default: the model's top next token)")
    tf.add_argument("--kinds", default="resid,mlp,attn", help="comma list of resid, mlp, attn")
    tf.add_argument("--samples", type=_count(1), default=10, help="noise draws")
    tf.add_argument("--window", type=_count(1), default=10, help="layers restored around each layer for mlp/attn")
    tf.add_argument("--noise", type=_positive, default=None, help="noise std (default 3 x std of the token embeddings)")
    tf.add_argument("--seed", type=int, default=0)
    tf.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None)
    tf.add_argument("--out", required=True, help="output directory (trace.png, trace.json, trace.npz)")
    tf.add_argument("--quiet", action="store_true", help="no progress bar")
    tf.set_defaults(func=_trace_fact)

    sc = sub.add_parser(
        "scrub", help="causal scrubbing of the induction hypothesis on the trained induction model", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax scrub --trees 1000 --wrong-prev 0 --out runs/scrub.json\n"
               "trains (or loads from the cache) the 2-layer attention-only induction model first",
    )  # fmt: skip
    sc.add_argument("--seed", type=int, default=0, help="training seed of cj.known.induction_model")
    sc.add_argument("--prev-heads", default="auto", help="layer-0 previous-token heads, e.g. '2' (auto: from attention)")
    sc.add_argument("--induction-heads", default="auto", help="layer-1 induction heads, e.g. '0,1' (auto: from attention)")
    sc.add_argument("--wrong-prev", type=int, default=None, help="also scrub with this layer-0 head as the previous-token head")
    sc.add_argument("--trees", type=_count(2), default=1000, help="sampled input trees")
    sc.add_argument("--rows", type=_count(2), default=4096, help="dataset rows the inputs are drawn from")
    sc.add_argument("--n", type=_count(1), default=10, help="length of the repeated segment")
    sc.add_argument("--out", default=None, help="write the numbers to this .json")
    sc.add_argument("--quiet", action="store_true", help="no progress bars")
    sc.set_defaults(func=_scrub)

    da = sub.add_parser(
        "das", help="distributed alignment search of IOI's IO-position variable, IIA per layer", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax das --layers 0,6,12,18,24 --method low_rank --k 1 --out runs/das/ioi.json\n"
               "writes the JSON and a plot of IIA per layer beside it (runs/das/ioi.png)",
    )  # fmt: skip
    da.add_argument("--model", default="smollm2", help="'smollm2' (default), a .gguf path, or an HF-format directory")
    da.add_argument("--kind", type=_kind_arg, default="hook_resid_pre", help="site kind at the END position, e.g. hook_resid_post")
    da.add_argument("--layers", default=None, help="'0-3' or '0,6,12' (default: every --layer-step-th layer)")
    da.add_argument("--layer-step", type=_count(1), default=3)
    da.add_argument("--method", default="low_rank", choices=["das", "low_rank", "boundless"])
    da.add_argument("--k", type=_count(1), default=1, help="interchanged rotated dimensions (initial boundary for boundless)")
    da.add_argument("--pairs", type=_count(2), default=192)
    da.add_argument("--n-train", type=_count(1), default=128)
    da.add_argument("--steps", type=_count(1), default=50)
    da.add_argument("--batch", type=_count(1), default=8)
    da.add_argument("--lr", type=_positive, default=1e-2)
    da.add_argument("--seed", type=int, default=0)
    da.add_argument("--out", default=None, help="write the numbers to this .json (and a plot beside it)")
    da.add_argument("--quiet", action="store_true", help="no progress bar")
    da.set_defaults(func=_das)

    pp = sub.add_parser(
        "path-patch", help="path patching: each sender's direct effect through chosen receivers", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax path-patch --clean 'When Mary and John went to the store, John gave a drink to' \\\n"
               "      --corrupt 'When Mary and John went to the store, Mary gave a drink to' --answer ' Mary' --wrong ' John' \\\n"
               "      --receivers logits --senders heads --out runs/pp.npz --png runs/pp.png",
    )  # fmt: skip
    _pair_arguments(pp)
    pp.add_argument("--receivers", action="append", required=True,
                    help="destinations: names or globs, comma separated ('a23.h*<q>', 'm12', 'logits'); repeat the "
                         "flag for several receiver groups")  # fmt: skip
    pp.add_argument("--senders", default="heads", help="'heads' (result [layer, head]), 'mlps', or names/globs")
    pp.add_argument("--quiet", action="store_true", help="no progress bar")
    pp.set_defaults(func=_path_patch)
    return p


def _pair_arguments(pa) -> None:
    """A model, a clean/corrupt prompt pair and the answers of the logit-difference metric."""
    pa.add_argument("--model", default="smollm2")
    pa.add_argument("--clean", required=True, help="clean prompt")
    pa.add_argument("--corrupt", required=True, help="corrupt prompt (same token length)")
    pa.add_argument("--answer", required=True, help="the clean answer (one token, e.g. ' Mary')")
    pa.add_argument("--wrong", required=True, help="the corrupt answer (one token)")
    pa.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None)
    pa.add_argument("--noising", action="store_true", help="patch corrupt into clean instead")
    pa.add_argument("--out", required=True, help="output .npz")
    pa.add_argument("--png", default=None, help="also draw a labelled heatmap")


def _mesh_argument(p) -> None:
    p.add_argument("--mesh", default=None, metavar="SPEC",
                   help="run on a device mesh: 'sweep=4,data=2,model=1' (sizes of the axes; unnamed ones are 1), or a "
                        "number N for N devices on the sweep axis; default: one device")  # fmt: skip


def _mesh(args):
    """The `--mesh` argument as a `make_mesh` mesh (None without it)."""
    spec = getattr(args, "mesh", None)
    if not spec:
        return None
    from ..scale import AXES, make_mesh

    if spec.strip().isdigit():
        return make_mesh(int(spec), 1, 1)
    sizes = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in AXES or not value.strip().isdigit():
            raise ValueError(f"--mesh {spec!r}: give axis=size pairs with axes {', '.join(AXES)}, e.g. sweep=4,data=2")
        sizes[name] = int(value)
    return make_mesh(sizes.get("sweep", 1), sizes.get("data", 1), sizes.get("model", 1))


def _sweep_arguments(pa) -> None:
    """Arguments shared by `patch` and `attribute`."""
    _pair_arguments(pa)
    _mesh_argument(pa)
    pa.add_argument("--site", default="resid_pre", choices=list(PATCH_SITES))
    pa.add_argument("--by", default="layer,pos", help="comma list of axes, 'layer' first, e.g. layer,pos,head")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, NotImplementedError, MemoryError) as e:
        print(f"circuits-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
