"""From a model and a corpus to a trained, evaluated, saved dictionary (what `train-sae` runs).

    corpus -> contexts (train | held out) -> activation store -> init from the store's mean
    and scale -> train (checkpointed) -> evaluate on held-out contexts -> save

Every check that can fail (site names, corpus, memory for the width, the run folder) runs before
any forward pass. The output directory is a run folder (`_run.py`): `run.json` records the run's
settings and the identities of its model, tokenizer and corpus before the first output;
`run.lock` keeps a second process out. Beside them: `store/` (unless another store is given),
`checkpoints/`, `dictionary/`, `eval.json`, `history.json` and `density.npy` (`train-sae` draws it
as `density.png`), each written whole (temporary name, then rename).

Running the same call again resumes whatever was interrupted, and says where it resumes; a call
with other settings on the same folder raises `RunMismatch` naming the differing keys, before
anything is computed or written, unless `overwrite=True` (delete that run, start afresh).
`resume=True` insists on continuing (it refuses a folder with no run to continue).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import jax
import numpy as np

from ..scale import gather
from ._run import corpus_identity, model_identity, open_run, plain, save_array, tokenizer_identity, write_json
from ._activations import (
    site_dim,
    DEFAULT_CORPUS,
    build_store,
    check_sites,
    memory_check,
    open_store,
    pack_contexts,
    parse_site,
    read_corpus,
)
from ._eval import evaluate
from ._io import save_dictionary
from ._sae import LossConfig, Stacked, check_arch, init_clt, init_sae
from ._train import TrainConfig, train


def dictionary_spec(model, *, site: str | None = None, target: str | None = None, clt_layers=None) -> tuple[list[str], list[str]]:
    """Input and target sites: an SAE (`site`), a transcoder (`site` -> `target`) or a CLT
    (`clt_layers`: MLP inputs -> MLP outputs). Unknown names raise with the closest valid ones."""
    if clt_layers is not None:
        layers = [int(l) for l in clt_layers]
        bad = [l for l in layers if not 0 <= l < model.cfg.n_layers]
        if bad:
            raise ValueError(f"CLT layers {bad} are outside the model's {model.cfg.n_layers} layers")
        if not layers or layers != list(range(layers[0], layers[0] + len(layers))):
            raise ValueError(f"a cross-layer transcoder needs contiguous increasing layers such as 0-3, got {layers}")
        ins = [f"blocks.{l}.ln2.hook_normalized" for l in layers]
        outs = [f"blocks.{l}.hook_mlp_out" for l in layers]
    else:
        if site is None:
            raise ValueError("give a site (and a target for a transcoder), or CLT layers")
        ins, outs = [site], [target or site]
    check_sites(model, ins + outs)
    return ins, outs


def n_parameters(d_model_in: int, d_model_out: int, width: int, n_layers: int | None = None) -> int:
    if n_layers is None:
        return 2 * d_model_in * width + width * d_model_out + width + d_model_out
    return n_layers * (d_model_in * width + width) + n_layers * n_layers * width * d_model_out + 2 * n_layers * width


def train_dictionary(
    model,
    tok,
    out: str | os.PathLike,
    *,
    site: str | None = None,
    target: str | None = None,
    clt_layers=None,
    arch: str = "topk",
    k: int | None = 32,
    width: int = 4608,
    n_tokens: int = 1_000_000,
    epochs: int = 1,
    corpus: str = DEFAULT_CORPUS,
    ctx_len: int = 128,
    n_eval_contexts: int = 64,
    store_dir: str | os.PathLike | None = None,
    train_cfg: dict | None = None,
    seed: int = 0,
    progress: bool = True,
    model_name: str = "",
    log=print,
    mesh=None,
    resume: bool = False,
    overwrite: bool = False,
    variants: list[dict] | None = None,
) -> dict:
    """Train one dictionary end to end and return its summary (also written to `out/eval.json`).

    `variants`: train several SAEs / transcoders together, in one compiled step from one pass of the model
    (`Stacked`): each a dict overriding any of `k`, `seed`, `l1_coeff`, `site` and `target` (an SAE at `site`
    when only `site` is given) of the call's own; each member is evaluated and saved in `out/<label>/` (its
    label names what varies, e.g. `k16`, `tc3`), and
    `out/eval.json` lists them with the shared training throughput.

    `n_tokens` activations are stored; training sees them `epochs` times (reshuffled each time).
    `mesh`: train on a device mesh (`_sae_train.train`'s `mesh`); not part of the run's settings
    (a run may resume on another mesh).

    `out` is a run folder (see the module docstring): if it holds a run with the same settings, that
    run resumes (announced through `log`); with other settings, `RunMismatch` is raised naming them.
    `overwrite=True` deletes the old run's outputs first (an outside `store_dir` is never deleted);
    `resume=True` requires a run to continue. Another process using `out` raises `RunLocked`."""
    out = Path(out)
    ins, outs = dictionary_spec(model, site=site, target=target, clt_layers=clt_layers)
    specs = None
    if variants is not None and len(variants) > 1:
        if clt_layers is not None:
            raise ValueError("several dictionaries at once are SAEs or per-layer transcoders, not cross-layer transcoders")
        if mesh is not None:
            raise ValueError("several dictionaries at once train on one device for now; drop --mesh, or train them "
                             "one by one on the mesh")  # fmt: skip
        l1 = (train_cfg or {}).get("loss", LossConfig()).l1_coeff
        specs = _member_specs(model, variants, site=ins[0], target=outs[0], k=k, seed=seed, l1_coeff=l1)
        ins = list(dict.fromkeys(m["site"] for m in specs))
        outs = list(dict.fromkeys(m["target"] for m in specs))
    for kk in [k] if specs is None else [m["k"] for m in specs]:
        check_arch(arch, kk)
        if kk is not None and arch in ("topk", "batchtopk", "matryoshka") and kk > width:
            raise ValueError(f"k={kk} exceeds the width {width}")

    D = [int(np.prod(site_dim(model, parse_site(s, model.cfg)))) for s in ins + outs]
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    tc = TrainConfig(n_tokens=n_tokens * epochs, seed=seed, **(train_cfg or {}))
    L = None if clt_layers is None else len(ins)
    n_dicts = 1 if specs is None else len(specs)
    memory_check(n_dicts * n_parameters(D[0], D[-1], width, L), tc.batch_size * (L or 1) * n_dicts, width * n_dicts,
                   what="cross-layer transcoder" if L else "dictionary" if specs is None else f"{n_dicts} dictionaries")  # fmt: skip
    docs = read_corpus(corpus)
    if model.cfg.positional == "learned" and ctx_len > model.cfg.n_ctx:
        raise ValueError(f"ctx_len={ctx_len} exceeds the model's context of {model.cfg.n_ctx}")
    sites = list(dict.fromkeys(ins + outs))
    store_path = Path(store_dir) if store_dir is not None else out / "store"
    identity = dict(model_fingerprint=model_identity(model), tokenizer_sha256=tokenizer_identity(tok), corpus_sha256=corpus_identity(docs))
    settings = dict(model_config=_config(model), **identity, in_sites=ins, out_sites=outs, arch=arch, k=k, width=width,
                    n_tokens=n_tokens, epochs=epochs, ctx_len=ctx_len, n_eval_contexts=n_eval_contexts, seed=seed, train=_train_settings(tc))  # fmt: skip
    if specs is not None:
        settings["variants"] = specs
    labels = dict(model=model_name, corpus=str(corpus), store=None if store_dir is None else str(store_path.absolute()))
    outputs = ("checkpoints", "dictionary", "eval.json", "history.json", "density.npy", "density.png") + (("store",) * (store_dir is None))
    outputs += tuple(m["label"] for m in specs or ())
    with open_run(out, "train_dictionary", settings, labels=labels, outputs=outputs, resume=resume, overwrite=overwrite, log=log) as run:
        train_ctx, held_out = split_contexts(tok, docs, n_tokens=n_tokens, ctx_len=ctx_len, n_eval_contexts=n_eval_contexts)
        store_info = dict(model=model_name, corpus=str(corpus), ctx_len=ctx_len, **identity)
        if store_dir is not None:
            _check_store_identity(store_path, store_info)
        run.commit()
        t0 = time.perf_counter()
        store = _reuse_store(store_path, sites, n_tokens)
        if store is None:
            # chunks of at most 65,536 rows, and at least 4 of them for the shuffle buffer of a small run
            chunk = max(ctx_len - 1, min(1 << 16, n_tokens // 4))
            store = build_store(model, train_ctx, sites, store_path, n_tokens=n_tokens, progress=progress, chunk_tokens=chunk,
                                info=store_info)  # fmt: skip
        t_store = time.perf_counter() - t0
        if specs is not None:
            summary = _train_members(model, run_dir=out, store=store, specs=specs, D=D, width=width, arch=arch, tc=tc,
                                     held_out=held_out, progress=progress, log=log, t_store=t_store,
                                     info=dict(model=model_name, corpus=str(corpus), ctx_len=ctx_len, **identity))  # fmt: skip
            write_json(out / "eval.json", summary, indent=1)  # last: its presence says the run finished
            return summary
        d = _new_dictionary(store, ins, outs, D, width=width, arch=arch, k=k, seed=seed, clt_layers=clt_layers)
        log(f"training {arch} {'CLT' if L else ('transcoder' if ins != outs else 'SAE')} of width {width} on {store.n_tokens:,} "
            f"tokens of {', '.join(sites)} ({tc.steps} steps of {tc.batch_size})")  # fmt: skip
        res = train(d, store, tc, checkpoint_dir=out / "checkpoints", progress=progress, mesh=mesh)
        if mesh is not None:  # evaluation splices it into the single-device model
            res = res.replace(dictionary=gather(res.dictionary))
        t_train = res.seconds
        t0 = time.perf_counter()
        ev = evaluate(model, res.dictionary, held_out, progress=progress)
        t_eval = time.perf_counter() - t0
        info = dict(model=model_name, corpus=str(corpus), ctx_len=ctx_len, n_tokens=store.n_tokens, train=_jsonable(tc), seed=seed, **identity)
        save_dictionary(out / "dictionary", res.dictionary, info)
        summary = dict(ev.summary(), eval_tokens=ev.n_tokens, seconds=dict(store=t_store, train=t_train, eval=t_eval), resumed_from=res.resumed_from,
                       tokens_per_second=(tc.steps - res.resumed_from) * tc.batch_size / max(t_train, 1e-9), sites=sites,
                       arch=arch, k=k, width=width, n_tokens=store.n_tokens, epochs=epochs)  # fmt: skip
        write_json(out / "history.json", res.history)
        save_array(out / "density.npy", ev.density)
        write_json(out / "eval.json", summary, indent=1)  # last: its presence says the run finished
    return summary


def _member_specs(model, variants, **base) -> list[dict]:
    """Each variant completed from `base` (site, target, k, seed, l1_coeff), its sites checked, and labelled by
    the settings that vary between them (`k16`, `seed1`, `l1-0.5`, a site name)."""
    known = {"site", "target", "k", "seed", "l1_coeff"}
    specs = []
    for v in variants:
        bad = sorted(set(v) - known)
        if bad:
            raise ValueError(f"variant {v} sets {bad}; a variant may set {sorted(known)}")
        m = {**base, **v}
        if "site" in v and "target" not in v:
            m["target"] = v["site"]  # an SAE at that site
        check_sites(model, [m["site"], m["target"]])
        specs.append(m)
    for m in specs:  # where it reads and writes, briefly: the site of an SAE, tc<l> for layer l's MLP transcoder
        tc = re.fullmatch(r"blocks\.(\d+)\.ln2\.hook_normalized", m["site"])
        m["where"] = (m["site"] if m["site"] == m["target"] else f"tc{tc.group(1)}"
                      if tc and m["target"] == f"blocks.{tc.group(1)}.hook_mlp_out" else f"{m['site']}_to-{m['target']}")
    varying = [key for key in ("where", "k", "l1_coeff", "seed") if len({str(m[key]) for m in specs}) > 1]
    short = {"where": "", "k": "k", "l1_coeff": "l1-", "seed": "seed"}
    for m in specs:
        m["label"] = "_".join(f"{short[key]}{m[key]}" for key in varying) or "member"
        del m["where"]
    labels = [m["label"] for m in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"variants repeat one another: {labels}")
    return specs


def _train_members(model, *, run_dir: Path, store, specs, D, width, arch, tc, held_out, progress, log, t_store,
                   info) -> dict:  # fmt: skip
    """Train `specs`' dictionaries together (`Stacked`), then evaluate and save each in `run_dir/<label>/`."""
    dicts = [_new_dictionary(store, [m["site"]], [m["target"]], D, width=width, arch=arch, k=m["k"], seed=m["seed"])
             for m in specs]  # fmt: skip
    log(f"training {len(specs)} {arch} dictionaries of width {width} together ({', '.join(m['label'] for m in specs)}) on "
        f"{store.n_tokens:,} tokens ({tc.steps} steps of {tc.batch_size})")  # fmt: skip
    res = train(Stacked.of(dicts, [m["l1_coeff"] for m in specs]), store, tc, checkpoint_dir=run_dir / "checkpoints",
                progress=progress)  # fmt: skip
    members = res.dictionary.unstack()
    rows = []
    for i, (m, d) in enumerate(zip(specs, members)):
        t0 = time.perf_counter()
        ev = evaluate(model, d, held_out, progress=progress)
        folder = run_dir / m["label"]
        save_dictionary(folder / "dictionary", d, dict(info, n_tokens=store.n_tokens, train=_jsonable(tc), variant=m))
        history = [{key: (v[i] if isinstance(v, list) else v) for key, v in row.items()} for row in res.history]
        write_json(folder / "history.json", history)
        save_array(folder / "density.npy", ev.density)
        row = dict(ev.summary(), **m, eval_tokens=ev.n_tokens, eval_seconds=time.perf_counter() - t0)
        write_json(folder / "eval.json", row, indent=1)
        rows.append(row)
    return dict(members=rows, arch=arch, width=width, n_tokens=store.n_tokens, resumed_from=res.resumed_from,
                seconds=dict(store=t_store, train=res.seconds),
                tokens_per_second=(tc.steps - res.resumed_from) * tc.batch_size / max(res.seconds, 1e-9))  # fmt: skip


def _new_dictionary(store, ins, outs, D, *, width, arch, k, seed, clt_layers=None):
    """A fresh dictionary initialised from the store: decoder bias at the target mean, the
    store's normalisation scales inside."""
    key = jax.random.key(seed)
    scale = {s: store.scales[store.sites.index(s)] for s in ins + outs}
    mean = {s: np.asarray(store.means[store.sites.index(s)], np.float32) for s in ins + outs}
    if clt_layers is not None:
        return init_clt(D[0], width, tuple(clt_layers), key=key, arch=arch, k=k, b_dec=np.stack([mean[s] for s in outs]),
                        in_scale=[scale[s] for s in ins], out_scale=[scale[s] for s in outs])  # fmt: skip
    return init_sae(D[0], width, key=key, arch=arch, k=k, d_out=D[-1], in_site=ins[0], out_site=outs[0], b_dec=mean[outs[0]],
                    in_scale=scale[ins[0]], out_scale=scale[outs[0]])  # fmt: skip


def transcoder_sites(layer: int) -> tuple[str, str]:
    """A per-layer transcoder's (input, target): the MLP's normalised input and its output."""
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"


def train_transcoders(
    model,
    tok,
    out: str | os.PathLike,
    *,
    layers=None,
    arch: str = "topk",
    k: int | None = 16,
    width: int = 2304,
    n_tokens: int = 400_000,
    corpus: str = DEFAULT_CORPUS,
    ctx_len: int = 128,
    n_eval_contexts: int = 64,
    train_cfg: dict | None = None,
    store_dtype=np.float16,
    chunk_tokens: int = 1 << 14,
    seed: int = 0,
    progress: bool = True,
    model_name: str = "",
    log=print,
    mesh=None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Per-layer transcoders (MLP input -> MLP output) for `layers` (default: every layer), all
    trained from one activation store of every layer's two sites, built once. `mesh`: each
    transcoder trains on a device mesh (`_sae_train.train`'s `mesh`).

    Resumable at every level: the store resumes by chunk, a finished layer is skipped, an
    interrupted layer resumes from its last checkpoint. Writes `out/layer_{l:02d}/dictionary`
    per layer and `out/transcoders.json` (the manifest `load_transcoders` reads). The store is
    `store_dtype` (float16 halves the disk: 30 layers x 2 sites x 576 floats per token).

    `out` is a run folder, as for `train_dictionary`: the same settings resume (announced), other
    settings (other layers too) raise `RunMismatch` unless `overwrite=True`; `resume=True` requires
    a run to continue; a second process raises `RunLocked`."""
    out = Path(out)
    L = model.cfg.n_layers
    layers = list(range(L)) if layers is None else [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < L]
    if bad:
        raise ValueError(f"layers {bad} are outside the model's {L} layers")
    if model.cfg.attn_only:
        raise ValueError("the model has no MLPs to transcode")
    check_arch(arch, k)
    pairs = {l: transcoder_sites(l) for l in layers}
    sites = [s for l in layers for s in pairs[l]]
    check_sites(model, sites)
    D = [int(np.prod(site_dim(model, parse_site(s, model.cfg)))) for s in pairs[layers[0]]]
    tc = TrainConfig(n_tokens=n_tokens, seed=seed, **(train_cfg or {}))
    memory_check(n_parameters(D[0], D[1], width), tc.batch_size, width, what="transcoder")
    docs = read_corpus(corpus)
    identity = dict(model_fingerprint=model_identity(model), tokenizer_sha256=tokenizer_identity(tok), corpus_sha256=corpus_identity(docs))
    settings = dict(model_config=_config(model), **identity, layers=layers, arch=arch, k=k, width=width, n_tokens=n_tokens,
                    ctx_len=ctx_len, n_eval_contexts=n_eval_contexts, store_dtype=np.dtype(store_dtype).name, chunk_tokens=chunk_tokens,
                    seed=seed, train=_train_settings(tc))  # fmt: skip
    labels = dict(model=model_name, corpus=str(corpus))
    outputs = ("store", "transcoders.json", "layer_[0-9][0-9]")
    with open_run(out, "train_transcoders", settings, labels=labels, outputs=outputs, resume=resume, overwrite=overwrite, log=log) as run:
        train_ctx, _ = split_contexts(tok, docs, n_tokens=n_tokens, ctx_len=ctx_len, n_eval_contexts=n_eval_contexts)
        run.commit()
        t0 = time.perf_counter()
        store = _reuse_store(out / "store", sites, n_tokens)
        if store is None:
            store = build_store(model, train_ctx, sites, out / "store", n_tokens=n_tokens, progress=progress, chunk_tokens=chunk_tokens,
                                dtype=store_dtype, info=dict(model=model_name, corpus=str(corpus), ctx_len=ctx_len, **identity))  # fmt: skip
        t_store = time.perf_counter() - t0
        manifest_file = out / "transcoders.json"
        manifest = json.loads(manifest_file.read_text()) if manifest_file.exists() else dict(layers={})
        manifest.update(model=model_name, n_layers=L, arch=arch, k=k, width=width, n_tokens=store.n_tokens, corpus=str(corpus),
                        ctx_len=ctx_len, n_eval_contexts=n_eval_contexts, train=_jsonable(tc), seed=seed)  # fmt: skip
        manifest.setdefault("seconds", {})["store"] = manifest.get("seconds", {}).get("store", 0.0) + t_store
        for l in layers:
            sub = out / f"layer_{l:02d}"
            if str(l) in manifest["layers"] and (sub / "dictionary" / "dictionary.json").exists():
                continue
            ins, outs = [pairs[l][0]], [pairs[l][1]]
            view = store.select(ins + outs)
            d = _new_dictionary(view, ins, outs, D, width=width, arch=arch, k=k, seed=seed + l)
            log(f"layer {l}: training a {arch} transcoder of width {width} on {view.n_tokens:,} tokens ({tc.steps} steps)")
            res = train(d, view, tc, checkpoint_dir=sub / "checkpoints", progress=progress, mesh=mesh)
            if mesh is not None:
                res = res.replace(dictionary=gather(res.dictionary))
            save_dictionary(sub / "dictionary", res.dictionary, dict(model=model_name, corpus=str(corpus), ctx_len=ctx_len,
                                                                     n_tokens=view.n_tokens, train=_jsonable(tc), seed=seed + l))  # fmt: skip
            write_json(sub / "history.json", res.history)
            last = res.history[-1] if res.history else {}
            manifest["layers"][str(l)] = dict(path=f"layer_{l:02d}/dictionary", in_site=ins[0], out_site=outs[0], seconds=res.seconds,
                                              train_fve=last.get("fve"), train_l0=last.get("l0"), dead=last.get("dead"))  # fmt: skip
            write_json(manifest_file, manifest, indent=1)
        write_json(manifest_file, manifest, indent=1)
    return manifest


def split_contexts(tok, corpus, *, n_tokens: int, ctx_len: int = 128, n_eval_contexts: int = 64):
    """`(train, held_out)` contexts of `corpus` (a corpus `read_corpus` reads, or its list of
    documents): enough for `n_tokens` stored tokens (plus two chunks' slack), and the last
    `n_eval_contexts` held out for evaluation. A store built from `train` never sees the held-out
    contexts, whoever builds it."""
    per_ctx = ctx_len - 1
    n_ctx = -(-n_tokens // per_ctx) + 2 * (1 << 16) // per_ctx + n_eval_contexts
    docs = corpus if isinstance(corpus, (list, tuple)) else read_corpus(corpus)
    contexts = pack_contexts(tok, docs, ctx_len, max_contexts=n_ctx)
    if len(contexts) <= n_eval_contexts:
        raise ValueError(f"the corpus gives {len(contexts)} contexts of {ctx_len} tokens, too few to hold out {n_eval_contexts}")
    return contexts[:-n_eval_contexts], contexts[-n_eval_contexts:]


def _reuse_store(path: Path, sites: list[str], n_tokens: int):
    """An existing complete store at `path` holding all `sites` and enough tokens, else None."""
    if not (path / "store.json").exists():
        return None
    meta = json.loads((path / "store.json").read_text())
    if set(sites) <= set(meta["sites"]) and meta["n_chunks"] >= max(1, n_tokens // meta["chunk_tokens"]):
        return open_store(path)
    return None


def _check_store_identity(path: Path, info: dict) -> None:
    """An outside store must come from this run's model, tokenizer, corpus and context length: its
    `store.json` records them (`info`); a key recorded in both that differs refuses it."""
    try:
        got = json.loads((path / "store.json").read_text()).get("info", {})
    except FileNotFoundError:
        return
    keys = ("model_fingerprint", "tokenizer_sha256", "corpus_sha256", "ctx_len")
    diffs = [f"{k} was {got[k]!r}, now {info[k]!r}" for k in keys if k in got and got[k] != info[k]]
    if diffs:
        raise ValueError(f"the activation store at {path} was built from other data ({'; '.join(diffs)}): use another store directory")


def _config(model) -> dict:
    import dataclasses

    return plain(dataclasses.asdict(model.cfg))


def _train_settings(tc) -> dict:
    """The train config as recorded in a run's settings: all of it but `checkpoint_every`, which
    changes when checkpoints are written, not the result."""
    d = _jsonable(tc)
    d.pop("checkpoint_every", None)
    return d


def _jsonable(cfg) -> dict:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
