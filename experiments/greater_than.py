"""Greater-than in SmolLM2 (Hanna et al. 2023): which components make the model complete a later year?

Prompt: "The war lasted from the year 17YY to the year 17". SmolLM2 writes every digit as its own
token, so the next token is the end year's tens digit (`cj.greater_than_task`). Metric
(`ProbMassDiff`): p(tens digit > YY's) - p(tens digit < YY's), per row; the corrupt prompt starts
at "C01", the earliest year, and is read with the clean row's masks. Normalised results: clean 1,
corrupt 0.

Stages:
1. baselines: the metric on clean and corrupt prompts, and p(later) / p(earlier) per row;
2. the signature plot: for the fixed prompt and start years 1702..1798 (every `--year-step`), the
   probability of each two-digit end year YY' = p(tens digit) * p(units digit | tens digit),
   `[YY, YY']` (one batched pass over the prompt + tens-digit sequences, 10 per start year);
3. residual-stream patching, `[layer, position]` (positions before the first differing token are
   identical in both runs and skipped);
4. attention and MLP outputs patched by layer, `[2, layer]`; every head's `z`, `[layer, head]`;
5. path patching of every head, and every MLP, into the logits (direct effects).

    circuits-jax experiment greater-than [--n 16] [--seed 0] [--out runs/greater-than]

Writes OUT/report.html, summary.json, the raw arrays (.npz) and the plots.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import circuits_jax as cj
from circuits_jax import plot
from circuits_jax.app.options import count
from circuits_jax.app import Report, Stages, top_heads
from circuits_jax.tasks import YEAR_NOUNS

EPILOG = """example:
  circuits-jax experiment greater-than                      # SmolLM2, 16 prompts -> runs/greater-than
  circuits-jax experiment greater-than --n 8 --seed 1 --out runs/greater_than_small
"""
TEMPLATE = "The {noun} lasted from the year 17{yy:02d} to the year 17"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="circuits-jax experiment greater-than", description=__doc__.split("\n")[0],
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--model", default="smollm2", help="'smollm2' (default), a .gguf path or an HF-format directory")
    ap.add_argument("--n", type=count(1), default=16, help="prompt pairs for the patching stages (default 16)")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    ap.add_argument("--noun", default="war", help="the noun of the signature plot's prompt (default 'war')")
    ap.add_argument("--year-step", type=count(1), default=4,
                    help="signature plot: start years 02, 02+k, ... up to 98 (default 4: 25 years; 1 for all 97)")
    ap.add_argument("--top", type=count(1), default=8, help="heads listed in the tables (default 8)")
    ap.add_argument("--out", default="runs/greater-than", help="output directory (default runs/greater-than)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


@eqx.filter_jit
def _last_two_logprobs(model, tokens):
    """log-softmax of the logits at the last two positions, `[B, 2, V]` (unembedding those only)."""
    resid = cj.run(model, tokens, return_logits=False).resid[:, -2:]
    return jax.nn.log_softmax(cj.unembed(model, resid).astype(jnp.float32), axis=-1)


def year_probabilities(model, tok, starts, noun: str = "war", *, chunk: int = 50, progress: bool = True) -> np.ndarray:
    """`[len(starts), 100]`: p(end year 17YY' | "The {noun} lasted from the year 17YY to the year 17"),
    one row per start year YY in `starts` (0..99).

    p(YY') = p(tens digit d | prompt) * p(units digit e | prompt + d): each prompt is extended by
    each tens digit (10 rows per start year, all of one length), and both factors come from one
    pass over them (chunks of `chunk` rows, one compiled program).
    """
    from tqdm.auto import tqdm

    digits = cj.single_token_ids(tok, [str(d) for d in range(10)], "digits")
    starts = [int(y) for y in starts]
    if not starts or min(starts) < 0 or max(starts) > 99:
        raise ValueError(f"start years must lie in 0..99, got {starts}")
    prompts = [tok.encode(TEMPLATE.format(noun=noun, yy=yy)) for yy in starts]
    if len({len(p) for p in prompts}) != 1:
        raise ValueError(f"the prompts for these start years tokenize to different lengths {sorted({len(p) for p in prompts})}: "
                         "years must split into one token per digit")  # fmt: skip
    rows = np.asarray([p + [int(d)] for p in prompts for d in digits], np.int32)  # [10 S, T + 1], (yy, d) row-major
    out = np.zeros((len(rows), 2, 10), np.float64)
    for i in tqdm(range(0, len(rows), chunk), desc="p(end year | start year)", disable=not progress, leave=False):
        part = rows[i : i + chunk]
        pad = chunk - len(part)
        lp = np.asarray(_last_two_logprobs(model, np.concatenate([part, np.repeat(part[-1:], pad, 0)])))[: len(part)]
        out[i : i + len(part)] = lp[:, :, digits]
    S = len(starts)
    tens = np.exp(out[::10, 0])  # [S, 10 d]: row (yy, 0) has the prompt's tens distribution at position -2
    units = np.exp(out[:, 1]).reshape(S, 10, 10)  # [yy, d, e]
    return (tens[:, :, None] * units).reshape(S, 100)


def _masses(logits: np.ndarray, up: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
    return (p * up).sum(-1), (p * down).sum(-1)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Stages(print)
    log, seconds, t0 = stage.log, stage.seconds, stage.t0
    progress = not args.quiet

    with stage(f"loading {args.model}"):
        model, tok = cj.load(args.model)
        if tok is None:
            raise SystemExit(f"model {args.model!r} has no tokenizer; greater-than needs one")
    cfg = model.cfg
    with stage("dataset"):
        task = cj.greater_than_task(tok, n=args.n, seed=args.seed)
        if len(tok.encode(" " + args.noun, prepend_bos=False)) != 1:
            raise SystemExit(f"--noun {args.noun!r} is not one token after a space; try one of {', '.join(YEAR_NOUNS[:8])}")
        str_tokens = tok.to_str_tokens(task.clean[0])
    rep = Report("Greater-than in SmolLM2: which components make a later year?", out,
                 subtitle=f"{args.model}: {cfg.n_layers} layers, {cfg.n_heads} heads; {args.n} prompt pairs, seed {args.seed}; circuits_jax")  # fmt: skip
    rep.heading("Question and dataset")
    rep.text("Which components make the model complete \"The war lasted from the year 17YY to the year 17\" with a year "
             "after 17YY? (Hanna et al. 2023 asked this of GPT-2 small.) SmolLM2 writes each digit as a token, so the "
             "next token is the end year's tens digit. Metric: p(tens digit > YY's) - p(tens digit < YY's) (the equal "
             "digit counts for neither), per row. Corrupt prompts start at C01, the earliest year, read with the clean "
             "row's masks. Patching results are normalised: clean 1, corrupt 0.")  # fmt: skip
    rep.table([[p, c] for p, c in zip(task.prompts[:4], task.corrupt_prompts[:4])], ["clean prompt", "corrupt prompt"],
              caption=f"the first 4 of {args.n} pairs (nouns from Hanna et al.'s list, centuries 11..17)")  # fmt: skip

    with stage("baselines"):
        up, down = np.asarray(task.metric.up), np.asarray(task.metric.down)
        last = lambda t: np.asarray(model(t)[:, -1], np.float32)  # noqa: E731
        c_up, c_down = _masses(last(task.clean), up, down)
        k_up, k_down = _masses(last(task.corrupt), up, down)
    base = {"clean metric p(later) - p(earlier)": float((c_up - c_down).mean()), "clean p(later)": float(c_up.mean()),
            "clean p(earlier)": float(c_down.mean()), "corrupt metric (start C01)": float((k_up - k_down).mean()),
            "clean rows with metric > 0": float(((c_up - c_down) > 0).mean())}  # fmt: skip
    rep.heading("Baselines")
    rep.numbers(base)
    rep.save_arrays("baselines", clean_up=c_up, clean_down=c_down, corrupt_up=k_up, corrupt_down=k_down)

    yy = np.arange(2, 99, args.year_step)  # Hanna et al.'s start years 02..98
    with stage(f"p(end year | start year) for {len(yy)} start years 17{yy[0]:02d}..17{yy[-1]:02d}"):
        P = year_probabilities(model, tok, yy, args.noun, progress=progress)
        later = np.array([P[i, y + 1 :].sum() for i, y in enumerate(yy)])
        earlier = np.array([P[i, :y].sum() for i, y in enumerate(yy)])
        same = P[np.arange(len(yy)), yy]
        plot.matrix(P, [f"{y:02d}" for y in yy], [f"{y:02d}" for y in range(100)], out / "year_probabilities.png",
                    xlabel="predicted end year 17YY'", ylabel="start year 17YY", colorbar="probability", centred=False,
                    diagonal=yy, tick_every=1 if len(yy) <= 30 else 5,
                    title=f'p(17YY\' | "The {args.noun} lasted from the year 17YY to the year 17"); dotted: YY\' = YY')  # fmt: skip
    sig = {f"mean p(later year), {len(yy)} start years": float(later.mean()), "mean p(earlier year)": float(earlier.mean()),
           "mean p(same year)": float(same.mean()), "mean p(any two-digit year)": float(P.sum(1).mean()),
           "start years with p(later) > p(earlier)": f"{int((later > earlier).sum())} of {len(yy)}"}  # fmt: skip
    rep.heading("The signature: probability of every end year")
    rep.text(f"For the prompt with noun '{args.noun}' and start years 17{yy[0]:02d}..17{yy[-1]:02d} (every {args.year_step}), the probability of each two-digit "
             "end year 17YY' (tens digit, then units digit given the tens). A model that does greater-than puts its mass "
             "right of the diagonal, starting sharply at it (Hanna et al.'s figure for GPT-2).")  # fmt: skip
    rep.figure(out / "year_probabilities.png", "rows: start year YY; columns: predicted end year YY'; dotted line YY' = YY")
    rep.numbers(sig)
    rep.save_arrays("year_probabilities", start_years=yy, p=P, later=later, earlier=earlier, same=same)

    kw = dict(attention_mask=task.attention_mask, answer_pos=task.answer_pos)
    with stage("residual-stream patching (layer x position)"):
        resid = cj.patch_sweep(model, task.clean, task.corrupt, task.metric, "resid_pre", ("layer", "pos"), progress=progress, **kw)
        plot.heatmap(resid.result, resid.axes, tokens=str_tokens, path=out / "resid_patching.png",
                     title="denoising resid_pre by layer and position")  # fmt: skip
    first = int(np.flatnonzero((task.clean != task.corrupt).any(0))[0])
    rep.heading("Where the start year is read: residual-stream patching")
    rep.text(f"Each cell patches the clean residual stream entering one layer at one position into the corrupt run. Only "
             f"the start year's digits differ (from position {first}); earlier positions are identical in both runs and "
             "score 0 without being run.")  # fmt: skip
    rep.figure(out / "resid_patching.png", "resid_pre patching [layer, position]; x labels: the first prompt's tokens")
    rep.save_arrays("resid_patching", result=resid.result, raw=resid.raw)

    with stage("attention and MLP outputs by layer"):
        attn = cj.patch_sweep(model, task.clean, task.corrupt, task.metric, "attn_out", ("layer",), progress=progress, **kw)
        mlp = cj.patch_sweep(model, task.clean, task.corrupt, task.metric, "mlp_out", ("layer",), progress=progress, **kw)
        blocks = np.stack([attn.result, mlp.result])
        plot.matrix(blocks, ["attention (attn_out)", "MLP (mlp_out)"], [f"L{l}" for l in range(cfg.n_layers)],
                    out / "block_patching.png", xlabel="layer", ylabel="output patched",
                    colorbar="metric (clean 1, corrupt 0)", title="denoising each layer's attention and MLP output")  # fmt: skip
    top_mlps = [(f"MLP {l}", float(mlp.result[l])) for l in np.argsort(-mlp.result)[:5]]
    rep.heading("Attention and MLP layers")
    rep.text("Each layer's whole attention output, or MLP output, at all positions, patched clean -> corrupt.")
    rep.figure(out / "block_patching.png", "rows: attention / MLP output; columns: layer")
    rep.table([[n, v] for n, v in top_mlps], ["MLP", "normalised metric"], caption="the 5 MLPs whose patch matters most")

    with stage("head patching (z of every head)"):
        heads = cj.patch_sweep(model, task.clean, task.corrupt, task.metric, "z", ("layer", "head"), progress=progress, **kw)
        plot.heatmap(heads.result, heads.axes, path=out / "head_patching.png", title="denoising each head's output z (all positions)")
    rep.heading("Heads: activation patching")
    rep.figure(out / "head_patching.png", "each head's z patched clean -> corrupt at all positions")
    rep.table([[h, v] for h, v in top_heads(heads.result, args.top)], ["head", "normalised metric"],
              caption=f"the {args.top} heads whose patch moves the metric most")  # fmt: skip
    rep.save_arrays("block_and_head_patching", attn_out=attn.result, mlp_out=mlp.result, heads=heads.result)

    with stage("path patching: heads and MLPs -> logits"):
        pp = cj.path_patch(model, task.clean, task.corrupt, task.metric, receivers="logits", senders="heads", progress=progress, **kw)
        pm = cj.path_patch(model, task.clean, task.corrupt, task.metric, receivers="logits", senders="mlps", progress=progress, **kw)
        plot.heatmap(pp.result, ("layer", "head"), path=out / "path_heads.png", title="path patching: each head's direct path to the logits")
        plot.matrix(pm.result[None], ["MLP -> logits"], [f"L{l}" for l in range(cfg.n_layers)], out / "path_mlps.png",
                    xlabel="layer", ylabel="sender", colorbar="metric (clean 1, corrupt 0)",
                    title="path patching: each MLP's direct path to the logits")  # fmt: skip
    direct_heads = top_heads(pp.result, args.top, sign=1)
    direct_mlps = [(f"MLP {l}", float(pm.result[l])) for l in np.argsort(-pm.result)[:5]]
    rep.heading("Direct effects: path patching into the logits")
    rep.text("Each head's (or MLP's) output difference (clean minus corrupt) is added to the final residual stream only; "
             "every other path keeps its corrupt value. This separates the components that write the answer from those "
             "that feed them.")  # fmt: skip
    rep.figure(out / "path_heads.png", "direct effect of each head, normalised")
    rep.figure(out / "path_mlps.png", "direct effect of each MLP, normalised")
    rep.table([[h, v] for h, v in direct_heads] + [[m, v] for m, v in direct_mlps], ["component", "direct effect (normalised)"],
              caption=f"the top {args.top} heads and top 5 MLPs by direct effect")  # fmt: skip
    rep.save_arrays("path_patching", heads=pp.result, mlps=pm.result)

    summary = dict(model=args.model, n_prompts=args.n, seed=args.seed, noun=args.noun,
                   clean_metric=base["clean metric p(later) - p(earlier)"], corrupt_metric=base["corrupt metric (start C01)"],
                   clean_p_later=base["clean p(later)"], clean_p_earlier=base["clean p(earlier)"],
                   clean_rows_positive=base["clean rows with metric > 0"],
                   signature_start_years=yy, signature_p_later=float(later.mean()), signature_p_earlier=float(earlier.mean()),
                   signature_p_same=float(same.mean()), signature_mass=float(P.sum(1).mean()),
                   signature_years_later_wins=int((later > earlier).sum()),
                   resid_patching_max=float(np.nanmax(resid.result)),
                   attn_out_by_layer=attn.result, mlp_out_by_layer=mlp.result, top_mlps=top_mlps,
                   top_heads_patching=top_heads(heads.result, args.top), top_heads_direct=direct_heads, top_mlps_direct=direct_mlps,
                   stage_seconds=seconds, total_seconds=round(time.perf_counter() - t0, 1))  # fmt: skip
    path = rep.finish(summary, seconds)
    log(f"clean metric {summary['clean_metric']:.3f}, corrupt {summary['corrupt_metric']:.3f}; signature: p(later) "
        f"{summary['signature_p_later']:.3f}, p(earlier) {summary['signature_p_earlier']:.3f}")  # fmt: skip
    log(f"top MLPs (patching): {top_mlps[:3]}; top heads (direct): {direct_heads[:3]}")
    log(f"report: {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
