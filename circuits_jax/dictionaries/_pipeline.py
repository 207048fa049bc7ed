"""From a model and a corpus to a trained, evaluated, saved dictionary (what `train-sae` runs).

    corpus -> contexts (train | held out) -> activation store -> init from the store's mean
    and scale -> train (checkpointed) -> evaluate on held-out contexts -> save

Every check that can fail (site names, corpus, memory for the width) runs before any
forward pass. The output directory holds `store/` (unless another store is given),
`checkpoints/`, `dictionary/`, `eval.json`, `history.json` and `density.npy` (`train-sae` draws it
as `density.png`); running the
same command again resumes whatever was interrupted.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from ..scale import gather
from ._activations import (
    site_dim,
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
from ._sae import check_arch, init_clt, init_sae
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
    corpus: str = "python-docs",
    ctx_len: int = 128,
    n_eval_contexts: int = 64,
    store_dir: str | os.PathLike | None = None,
    train_cfg: dict | None = None,
    seed: int = 0,
    progress: bool = True,
    model_name: str = "",
    log=print,
    mesh=None,
) -> dict:
    """Train one dictionary end to end and return its summary (also written to `out/eval.json`).

    `n_tokens` activations are stored; training sees them `epochs` times (reshuffled each time).
    `mesh`: train on a device mesh (`_sae_train.train`'s `mesh`)."""
    out = Path(out)
    ins, outs = dictionary_spec(model, site=site, target=target, clt_layers=clt_layers)
    check_arch(arch, k)
    if k is not None and arch in ("topk", "batchtopk") and k > width:
        raise ValueError(f"k={k} exceeds the width {width}")

    D = [int(np.prod(site_dim(model, parse_site(s, model.cfg)))) for s in ins + outs]
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    tc = TrainConfig(n_tokens=n_tokens * epochs, seed=seed, **(train_cfg or {}))
    L = None if clt_layers is None else len(ins)
    memory_check(n_parameters(D[0], D[-1], width, L), tc.batch_size * (L or 1), width,
                   what="cross-layer transcoder" if L else "dictionary")  # fmt: skip
    train_ctx, held_out = split_contexts(tok, corpus, n_tokens=n_tokens, ctx_len=ctx_len, n_eval_contexts=n_eval_contexts)
    if model.cfg.positional == "learned" and ctx_len > model.cfg.n_ctx:
        raise ValueError(f"ctx_len={ctx_len} exceeds the model's context of {model.cfg.n_ctx}")
    per_ctx = ctx_len - 1
    sites = list(dict.fromkeys(ins + outs))
    store_path = Path(store_dir) if store_dir is not None else out / "store"
    t0 = time.perf_counter()
    store = _reuse_store(store_path, sites, n_tokens)
    if store is None:
        # chunks of at most 65,536 rows, and at least 4 of them for the shuffle buffer of a small run
        chunk = max(per_ctx, min(1 << 16, n_tokens // 4))
        store = build_store(model, train_ctx, sites, store_path, n_tokens=n_tokens, progress=progress, chunk_tokens=chunk,
                              info=dict(model=model_name, corpus=str(corpus), ctx_len=ctx_len))  # fmt: skip
    t_store = time.perf_counter() - t0
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
    info = dict(model=model_name, corpus=str(corpus), ctx_len=ctx_len, n_tokens=store.n_tokens, train=_jsonable(tc), seed=seed)
    save_dictionary(out / "dictionary", res.dictionary, info)
    summary = dict(ev.summary(), eval_tokens=ev.n_tokens, seconds=dict(store=t_store, train=t_train, eval=t_eval), resumed_from=res.resumed_from,
                   tokens_per_second=(tc.steps - res.resumed_from) * tc.batch_size / max(t_train, 1e-9), sites=sites,
                   arch=arch, k=k, width=width, n_tokens=store.n_tokens, epochs=epochs)  # fmt: skip
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    (out / "history.json").write_text(json.dumps(res.history))
    np.save(out / "density.npy", ev.density)
    return summary


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
    corpus: str = "python-docs",
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
) -> dict:
    """Per-layer transcoders (MLP input -> MLP output) for `layers` (default: every layer), all
    trained from one activation store of every layer's two sites, built once. `mesh`: each
    transcoder trains on a device mesh (`_sae_train.train`'s `mesh`).

    Resumable at every level: the store resumes by chunk, a finished layer is skipped, an
    interrupted layer resumes from its last checkpoint. Writes `out/layer_{l:02d}/dictionary`
    per layer and `out/transcoders.json` (the manifest `load_transcoders` reads). The store is
    `store_dtype` (float16 halves the disk: 30 layers x 2 sites x 576 floats per token)."""
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
    train_ctx, _ = split_contexts(tok, corpus, n_tokens=n_tokens, ctx_len=ctx_len, n_eval_contexts=n_eval_contexts)
    t0 = time.perf_counter()
    store = _reuse_store(out / "store", sites, n_tokens)
    if store is None:
        store = build_store(model, train_ctx, sites, out / "store", n_tokens=n_tokens, progress=progress, chunk_tokens=chunk_tokens,
                              dtype=store_dtype, info=dict(model=model_name, corpus=str(corpus), ctx_len=ctx_len))  # fmt: skip
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
        (sub / "history.json").write_text(json.dumps(res.history))
        last = res.history[-1] if res.history else {}
        manifest["layers"][str(l)] = dict(path=f"layer_{l:02d}/dictionary", in_site=ins[0], out_site=outs[0], seconds=res.seconds,
                                          train_fve=last.get("fve"), train_l0=last.get("l0"), dead=last.get("dead"))  # fmt: skip
        manifest_file.write_text(json.dumps(manifest, indent=1))
    manifest_file.write_text(json.dumps(manifest, indent=1))
    return manifest


def split_contexts(tok, corpus, *, n_tokens: int, ctx_len: int = 128, n_eval_contexts: int = 64):
    """`(train, held_out)` contexts of `corpus`: enough for `n_tokens` stored tokens (plus two
    chunks' slack), and the last `n_eval_contexts` held out for evaluation. A store built from
    `train` never sees the held-out contexts, whoever builds it."""
    per_ctx = ctx_len - 1
    n_ctx = -(-n_tokens // per_ctx) + 2 * (1 << 16) // per_ctx + n_eval_contexts
    contexts = pack_contexts(tok, read_corpus(corpus), ctx_len, max_contexts=n_ctx)
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


def _jsonable(cfg) -> dict:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
