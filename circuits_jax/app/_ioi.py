"""`circuits-jax ioi`: the main job, an IOI circuit study written as a report."""

from __future__ import annotations

import argparse
import time

from .options import model_arguments, count, finite, load_with_tokenizer, out_dir


def add_ioi(sub) -> None:
    io = sub.add_parser(
        "ioi", help="the main job: an IOI circuit study (patching, AtP, path patching, EAP-IG) written as a report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  circuits-jax ioi                      # SmolLM2, 8 prompts -> runs/ioi/report.html\n"
               "  circuits-jax ioi --n 32 --seed 1 --out runs/ioi32",
    )  # fmt: skip
    model_arguments(io)
    io.add_argument("--n", type=int, default=8, help="prompt pairs (default 8)")
    io.add_argument("--seed", type=int, default=0)
    io.add_argument("--template", type=int, default=0, choices=range(5), help="which IOI template (all rows share it)")
    io.add_argument("--steps", type=count(1), default=5, help="EAP-IG integration steps")
    io.add_argument("--fraction", type=finite, default=0.01, help="share of edges in the reported circuit")
    io.add_argument("--out", default="runs/ioi", help="output directory (report.html, arrays, plots)")
    io.add_argument("--quiet", action="store_true", help="no progress bars")
    io.set_defaults(func=run_ioi)


def run_ioi(args) -> int:
    """`ioi`: the main job, an IOI circuit study with a report."""
    from ._ioi_job import ioi_job

    if args.n < 2:
        raise ValueError(f"--n must be at least 2 prompt pairs, got {args.n}")
    if not 0 < args.fraction < 1:
        raise ValueError(f"--fraction is the share of edges kept, between 0 and 1; got {args.fraction}")
    out = out_dir(args.out)  # a folder we can write, before the model loads
    t = time.perf_counter()
    print(f"loading {args.model} ...", flush=True)
    model, tok = load_with_tokenizer(args.model, args.dtype)
    print(f"    loaded in {time.perf_counter() - t:.1f} s", flush=True)
    s = ioi_job(model, tok, out, n=args.n, seed=args.seed, template=args.template, eap_steps=args.steps,
                circuit_fraction=args.fraction, progress=not args.quiet, model_name=str(args.model),
                log=lambda m: print(m, flush=True))  # fmt: skip
    print()
    print(f"IOI on {s['model']}: {s['n_prompts']} prompts; logit diff clean {s['clean_logit_diff']:.2f} "
          f"(IO > S in {s['clean_accuracy']:.0%}), corrupt {s['corrupt_logit_diff']:.2f}")
    heads = lambda pairs: ", ".join(f"{h} {v:+.3f}" for h, v in pairs)  # noqa: E731
    if "name_movers_path_patching" in s:
        print("name movers (path patching into the logits, normalised): " + heads(s["name_movers_path_patching"][:5]))
        print("negative heads: " + heads(s["negative_heads_path_patching"]))
    print("heads whose patch matters most (exact z patching): " + heads(s["top_heads_exact"][:5]))
    print(f"AtP vs exact per-head z: Pearson r = {s['atp_vs_exact_pearson']:.3f}")
    if "circuit_edges" in s:
        print(f"EAP-IG circuit of {s['circuit_edges']} edges: faithfulness {s['circuit_faithfulness']:.3f}, CPR {s['cpr']:.3f}")
    if s.get("left_out"):
        print(f"left out: {s['left_out']}")
    print("seconds per stage: " + ", ".join(f"{k} {v}" for k, v in s["stage_seconds"].items())
          + f"; total {time.perf_counter() - t:.0f} s with loading")
    print(f"report: {s['report']}")
    return 0
