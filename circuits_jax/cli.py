"""The `circuits-jax` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _predict(args) -> int:
    import jax
    import numpy as np

    from .loaders._registry import load

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="circuits-jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", help="tokens of a prompt and the top-K next tokens with logits")
    pr.add_argument("--model", default="smollm2", help="'smollm2' (default), a .gguf path, or an HF-format directory")
    pr.add_argument("--prompt", required=True)
    pr.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                    help="prepend BOS (default: the model's own setting; SmolLM2 uses none)")  # fmt: skip
    pr.add_argument("--top-k", type=int, default=10)
    pr.add_argument("--json", action="store_true", help='print {"tokens": [...], "top": [[text, id, logit], ...]}')
    pr.set_defaults(func=_predict)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError, NotImplementedError) as e:
        print(f"circuits-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
