"""`circuits-jax trace-fact`: causal tracing (Meng et al.) of one fact."""

from __future__ import annotations

import argparse
import json

from .options import model_arguments, count, load_with_tokenizer, nonempty, out_dir, positive


def add_trace_fact(sub) -> None:
    tf = sub.add_parser(
        "trace-fact", help="causal tracing (Meng et al.): where restoring clean states brings a fact back", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax trace-fact --prompt 'The Eiffel Tower is located in the city of' \\\n"
               "      --subject 'The Eiffel Tower' --answer ' Paris' --out runs/trace_eiffel",
    )  # fmt: skip
    model_arguments(tf)
    tf.add_argument("--prompt", required=True, help="e.g. 'The Eiffel Tower is located in the city of'")
    tf.add_argument("--subject", required=True, help="the subject as it appears in the prompt (its tokens are noised)")
    tf.add_argument("--answer", default=None, help="the answer token, e.g. ' Paris' (default: the model's top next token)")
    tf.add_argument("--kinds", default="resid,mlp,attn", help="comma list of resid, mlp, attn")
    tf.add_argument("--samples", type=count(1), default=10, help="noise draws")
    tf.add_argument("--window", type=count(1), default=10, help="layers restored around each layer for mlp/attn")
    tf.add_argument("--noise", type=positive, default=None, help="noise std (default 3 x std of the token embeddings)")
    tf.add_argument("--seed", type=int, default=0)
    tf.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None)
    tf.add_argument("--out", required=True, help="output directory (trace.png, trace.json, trace.npz)")
    tf.add_argument("--quiet", action="store_true", help="no progress bar")
    tf.set_defaults(func=run_trace_fact)


def run_trace_fact(args) -> int:
    """Causal tracing of one fact: clean/corrupt p(answer), the peak per kind, heatmaps and arrays in OUT."""
    import numpy as np

    from ..models import atomic_path, write_npz, write_text
    from ..plot import causal_traces
    from ..toolshed import KINDS, trace_fact

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"--kinds {args.kinds!r}: each must be one of {', '.join(KINDS)}")
    nonempty(prompt=args.prompt, subject=args.subject, answer=args.answer)
    out = out_dir(args.out)  # a folder we can write, before the model loads
    model, tok = load_with_tokenizer(args.model, args.dtype)
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
    out.mkdir(parents=True, exist_ok=True)  # each file written whole: a temporary name, then renamed
    write_npz(out / "trace.npz", tokens=r0.tokens, str_tokens=np.array(strs), subject_span=np.array(r0.subject_span),
              answer_id=r0.answer_id, clean=r0.clean, corrupt=r0.corrupt, noise=r0.noise, samples=r0.samples,
              **{f"scores_{k}": r.scores for k, r in res.items()})  # fmt: skip
    meta = dict(prompt=args.prompt, subject=args.subject, answer=answer, answer_id=r0.answer_id, str_tokens=strs,
                subject_span=list(r0.subject_span), clean=r0.clean, corrupt=r0.corrupt, noise=r0.noise, samples=r0.samples,
                kinds=summary, scores={k: r.scores.tolist() for k, r in res.items()})  # fmt: skip
    write_text(out / "trace.json", json.dumps(meta, indent=1))
    with atomic_path(out / "trace.png") as tmp:
        causal_traces(res, tmp, tokens=strs, title=f"{args.prompt!r} -> {answer!r}")
    print(f"wrote {out}/trace.png, trace.json, trace.npz")
    return 0
