"""`circuits-jax steer`: ActAdd steering of one prompt, generations per coefficient and a sweep plot."""

from __future__ import annotations

import argparse
import json

from .options import model_arguments, count, load_with_tokenizer, nonempty, number_list, out_dir


def add_steer(sub) -> None:
    st = sub.add_parser(
        "steer", help="ActAdd steering: generations per coefficient and a next-token / perplexity sweep plot", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  circuits-jax steer --positive 'I love' --negative 'I hate' --layer 6 --coeffs=-10,0,10 \\\n"
               "      --prompt 'I think you are' --out runs/steer    # writes runs/steer/steer.png, steer.json\n"
               "  circuits-jax steer --positive Love --negative Hate --align pad --layer 6 --coeffs=-10,0,10 \\\n"
               "      --prompt 'I think you are' --out runs/steer_love_hate\n"
               "ActAdd subtracts the two prompts' activations position by position, so they must tokenize to the same\n"
               "length. SmolLM2 reads 'Love' as one token but 'Hate' as two ('H', 'ate'): under the default --align error\n"
               "that pair is refused with both token splits shown; --align pad right-pads the shorter prompt with the\n"
               "space token, so 'Love' ' ' is set against 'H' 'ate'.",
    )  # fmt: skip
    model_arguments(st)
    st.add_argument("--positive", required=True, help="positive ActAdd prompt, e.g. 'I love'")
    st.add_argument("--negative", required=True, help="negative ActAdd prompt, e.g. 'I hate' (same token length, or --align pad)")
    st.add_argument("--layer", type=count(0), required=True, help="steer blocks.LAYER.hook_resid_pre")
    st.add_argument("--coeffs", required=True, help="comma-separated coefficients; write --coeffs=-5,0,5 when the first is negative")
    st.add_argument("--prompt", required=True, help="the prompt to steer (at least as many tokens as the ActAdd prompts)")
    st.add_argument("--max-new-tokens", type=count(1), default=20)
    st.add_argument("--align", choices=("error", "pad"), default="error",
                    help="prompts of different token lengths: error (default: refused, both token splits shown) or pad "
                         "(right-pad the shorter with ' '); see the examples below")  # fmt: skip
    st.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None, help="prepend BOS (default: the model's)")
    st.add_argument("--out", default="steer_out", help="directory for steer.png and steer.json")
    st.set_defaults(func=run_steer)


def run_steer(args) -> int:
    """ActAdd steering of one prompt: the greedy generation per coefficient, next-token sweep and plot."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ..core import generate
    from ..models import atomic_path, write_text
    from ..plot import steering_curves
    from ..toolshed import actadd, perplexity_sweep, steering_hook, steering_sweep

    coeffs = number_list(args.coeffs, "--coeffs")  # finite numbers: nan or inf would steer into garbage
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    nonempty(positive=args.positive, negative=args.negative, prompt=args.prompt)
    out = out_dir(args.out)  # a folder we can write, before the model loads
    model, tok = load_with_tokenizer(args.model, args.dtype)
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
    out.mkdir(parents=True, exist_ok=True)  # each file written whole: a temporary name, then renamed
    with atomic_path(out / "steer.png") as tmp:
        steering_curves(coeffs, curves, ppl, tmp, title=f"ActAdd {args.positive!r} - {args.negative!r}, layer {args.layer}",
                        ylabel="next-token probability", ppl_label="perplexity of the unsteered continuation")  # fmt: skip
    write_text(out / "steer.json", json.dumps(dict(
        positive=args.positive, negative=args.negative, layer=args.layer, prompt=args.prompt, coeffs=coeffs,
        generations={str(c): t for c, t in gens.items()}, next_token_probs=curves, perplexity=ppl), indent=1))  # fmt: skip
    print(f"wrote {out}/steer.png, steer.json")
    return 0
