"""Induction heads in the trained 2-layer attention-only model: which heads implement induction?

`circuits_jax.known.induction_model(seed)` trains a 2-layer, 4-head attention-only transformer on
repeated random sequences `[BOS, r_1..r_n, r_1..r_n]` (deterministic per seed). Its task
(`known.induction_task`) asks for r_n after `[BOS, r_1..r_n, r_1..r_{n-1}]`; the corrupt prompt
shuffles the first copy so that r_{n-1} is followed by another token w. Metric: logit(r_n) - logit(w)
at the last position, normalised so clean = 1 and corrupt = 0. The task's `truth` (which heads and
edges the mechanism uses) comes from attention patterns alone, so it is a check for the causal
methods here, not an input to them.

Stages, each one compiled program over its sweep:
1. attention scores of every head on `[BOS, r, r]`: previous-token score (mean attention from t
   to t - 1 over the first copy) and induction score (from each second-copy position to the token
   after that token's first occurrence), `[layer, head]`; mean patterns of the heads found;
2. head patching: each head's `z` patched clean -> corrupt, `[layer, head]`;
3. path patching: each head's direct path to the logits `[layer, head]`, and each layer-0 head's
   path into each layer-1 head's key input (K-composition) `[receiver, sender]`;
4. the heads found: layer-1 heads whose direct path to the logits recovers at least `--threshold`
   of the clean-corrupt difference, and layer-0 heads whose path into those heads' keys does;
   compared with `task.truth`;
5. ablation: next-token loss on the second copy of `[BOS, r, r]` with the found heads
   mean-ablated, against every other set of as many heads (one `vmap` over head masks).

    circuits-jax experiment induction [--seed 0] [--steps 2000] [--out runs/induction]

Writes OUT/report.html, summary.json, the raw arrays (.npz) and the plots.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import circuits_jax as cj
from circuits_jax import plot
from circuits_jax.core import Graph
from circuits_jax.tasks.known import BOS, repeated_tokens
from circuits_jax.app.options import count
from circuits_jax.app import Report, Stages

EPILOG = """example:
  circuits-jax experiment induction                          # seed 0, 2000 training steps -> runs/induction
  circuits-jax experiment induction --seed 1 --out runs/induction_seed1
  python experiments/induction.py --steps 600 --batch 16 --out /tmp/induction   # a quick look
"""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="circuits-jax experiment induction", description=__doc__.split("\n")[0],
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="training and data seed (default 0)")
    ap.add_argument("--steps", type=count(1), default=2000, help="training steps (default 2000, as known.induction_model)")
    ap.add_argument("--n", type=int, default=10, choices=range(3, 13), metavar="{3..12}",
                    help="length of the repeated segment (default 10; the model was trained on 4..12)")  # fmt: skip
    ap.add_argument("--batch", type=count(1), default=32, help="prompt pairs and repeated sequences (default 32)")
    ap.add_argument("--threshold", type=float, default=0.1,
                    help="share of the clean-corrupt difference a path must carry for its head to count as found (default 0.1)")  # fmt: skip
    ap.add_argument("--out", default="runs/induction", help="output directory (default runs/induction)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def repeated_prompts(cfg, n: int, batch: int, seed: int) -> np.ndarray:
    """`[batch, 2n + 1]` int32 rows `[BOS, r_1..r_n, r_1..r_n]` of distinct random tokens."""
    r = repeated_tokens(np.random.default_rng(seed + 1), batch, n, cfg.d_vocab)
    return np.concatenate([np.full((batch, 1), BOS, np.int32), r, r], axis=1)


def attention_scores(model, tokens: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Previous-token and induction scores of every head, `[layer, head]` each, and the mean
    patterns `[layer, head, T, T]` over the rows of `tokens` (`[BOS, r, r]`, segment length n).

    Same definitions as `known.head_scores` (which scores one layer each): previous-token = mean
    attention from t to t - 1 for t = 2..n; induction = mean attention from t = n+1..2n to t - n + 1.
    """
    L = model.cfg.n_layers
    out = cj.run(model, tokens, cache=[f"blocks.{l}.attn.hook_pattern" for l in range(L)])
    pats = np.stack([np.asarray(out.cache[f"blocks.{l}.attn.hook_pattern"]) for l in range(L)])  # [L, B, H, T, T]
    first, second = np.arange(2, n + 1), np.arange(n + 1, 2 * n + 1)
    return dict(prev_token=pats[..., first, first - 1].mean(axis=(1, 3)),
                induction=pats[..., second, second - n + 1].mean(axis=(1, 3)), patterns=pats.mean(axis=1))  # fmt: skip


@eqx.filter_jit
def ablation_losses(model, tokens, n: int, masks):
    """Next-token loss on the second copy (predicting r_2..r_n) with the heads of each mask mean-ablated.

    masks: bool `[S, layer, head]`; returns `[S]`. Mean ablation replaces a head's `z` by its mean
    over the batch at each position; one hook at every layer (`PerLayer`), one `vmap` over masks.
    """
    target = tokens[:, n + 2 :]

    def one(mask):
        hook = cj.Hook("attn.hook_z", cj.ALL_LAYERS, cj.PerLayer(cj.Mean(mask=mask[:, None, None, :, None])))
        logits = cj.run(model, tokens, hooks=[hook]).logits[:, n + 1 : 2 * n]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, target[..., None], axis=-1))

    return jax.vmap(one)(masks)


def head_sets(L: int, H: int, k: int, limit: int, seed: int) -> np.ndarray:
    """Every set of k heads as bool masks `[S, L, H]` (a random `limit` of them when there are more)."""
    combos = list(itertools.combinations(range(L * H), k))
    if len(combos) > limit:
        rng = np.random.default_rng(seed)
        combos = [combos[i] for i in rng.choice(len(combos), limit, replace=False)]
    masks = np.zeros((len(combos), L * H), bool)
    for i, c in enumerate(combos):
        masks[i, list(c)] = True
    return masks.reshape(-1, L, H)


def truth_heads(task, cfg) -> tuple[list[int], list[int]]:
    """(previous-token heads, induction heads) named by the truth's edges `a0.hP->a1.hI<k>` and `a1.hI->logits`."""
    g = Graph.of(cfg)
    s, d = np.nonzero(task.truth)
    edges = [(g.sources[i], g.destinations[j]) for i, j in zip(s, d)]
    ind = sorted({int(a.split(".h")[1]) for a, b in edges if b == "logits" and a.startswith("a1.")})
    prev = sorted({int(a.split(".h")[1]) for a, b in edges if a.startswith("a0.") and b.startswith("a1.") and b.endswith("<k>")})
    return prev, ind


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not 0 < args.threshold < 1:
        parser().error(f"--threshold must lie in (0, 1), got {args.threshold}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Stages(print)
    log, seconds, t0 = stage.log, stage.seconds, stage.t0
    progress = not args.quiet
    n = args.n

    with stage(f"training the model ({args.steps} steps, seed {args.seed})"):
        model, info = cj.known.induction_model(args.seed, steps=args.steps, progress=progress)
        task = cj.known.induction_task(model, info, n=n, batch=args.batch, seed=args.seed)
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    head_names = [f"L{l}H{h}" for l in range(L) for h in range(H)]
    true_prev, true_ind = truth_heads(task, cfg)
    rep = Report("Induction heads in a trained 2-layer attention-only transformer", out,
                    subtitle=f"{L} layers x {H} heads, d_model {cfg.d_model}, vocab {cfg.d_vocab}; trained {args.steps} "
                             f"steps (seed {args.seed}, {info['train_seconds']:.0f} s); {args.batch} prompt pairs; circuits_jax")  # fmt: skip
    rep.heading("Question")
    rep.text("Which heads implement induction, i.e. predict the token that followed the current token's previous "
             "occurrence? The model has no MLPs: induction needs a previous-token head in layer 0 whose output an "
             "induction head in layer 1 reads in its keys (K-composition), then copies the attended token to the logits.")  # fmt: skip
    rep.text(f"Task: clean `[BOS, r_1..r_{n}, r_1..r_{n - 1}]` with answer r_{n}; corrupt: the first copy shuffled so that "
             f"r_{n - 1} is followed by another token w. Metric: logit(r_{n}) - logit(w) at the last position, normalised "
             "(clean 1, corrupt 0). The task's known truth (from attention-pattern thresholds at training time): "
             f"previous-token heads L0H{true_prev}, induction heads L1H{true_ind}.")  # fmt: skip
    rep.table([[" ".join(map(str, task.clean[i])), " ".join(map(str, task.corrupt[i])), int(task.answers[i]), int(task.wrong[i])]
               for i in range(min(3, len(task.clean)))], ["clean tokens", "corrupt tokens", "answer", "wrong"],
              caption="the first 3 prompt pairs (token ids; 0 is BOS)")  # fmt: skip

    with stage("baselines"):
        def ld(tokens):
            logits = np.asarray(model(tokens)[:, -1])
            rows = np.arange(len(tokens))
            return logits[rows, task.answers] - logits[rows, task.wrong]

        clean_ld, corrupt_ld = ld(task.clean), ld(task.corrupt)
    base = {"training loss (last 50 steps)": info["train_loss"], "clean logit diff": float(clean_ld.mean()),
            "corrupt logit diff": float(corrupt_ld.mean()), "clean accuracy (answer > wrong)": float((clean_ld > 0).mean()),
            "corrupt accuracy": float((corrupt_ld > 0).mean())}  # fmt: skip
    rep.heading("Baselines")
    rep.numbers(base)

    with stage("attention scores of every head"):
        seq = repeated_prompts(cfg, n, args.batch, args.seed)
        sc = attention_scores(model, seq, n)
        plot.matrix(np.stack([sc["prev_token"].ravel(), sc["induction"].ravel()]), ["previous-token", "induction"],
                    head_names, out / "attention_scores.png", xlabel="head", ylabel="score",
                    title="attention scores on [BOS, r, r]", colorbar="mean attention probability", centred=False)  # fmt: skip
    attn_prev = [int(h) for h in np.flatnonzero(sc["prev_token"][0] > 0.85)]
    attn_ind = [int(h) for h in np.flatnonzero(sc["induction"][1] > 0.5)]
    rep.heading("Attention patterns: previous-token and induction scores")
    rep.text(f"On {args.batch} sequences `[BOS, r_1..r_{n}, r_1..r_{n}]` of distinct random tokens: previous-token score = mean "
             f"attention from position t to t - 1 over the first copy; induction score = mean attention from each position "
             f"of the second copy to the token after that token's first occurrence. With `known.induction_model`'s "
             f"thresholds (0.85 and 0.5), the patterns name previous-token heads L0H{attn_prev} and induction heads "
             f"L1H{attn_ind}.")  # fmt: skip
    rep.figure(out / "attention_scores.png", "both scores for every head (rows: score, columns: head)")
    rep.save_arrays("attention_scores", prev_token=sc["prev_token"], induction=sc["induction"], patterns=sc["patterns"])

    kw = dict(attention_mask=task.attention_mask, answer_pos=task.answer_pos)
    with stage("head patching (z of every head)"):
        heads = cj.patch_sweep(model, task.clean, task.corrupt, task.metric, "z", ("layer", "head"), progress=progress, **kw)
        plot.heatmap(heads.result, heads.axes, path=out / "head_patching.png", title="denoising each head's output z (all positions)")
    rep.heading("Head patching")
    rep.text("Each head's output `z` from the clean run replaces the corrupt run's, at all positions, one head at a time "
             "(all heads in one compiled program). This is each head's total effect: through the logits directly and "
             "through later heads.")  # fmt: skip
    rep.figure(out / "head_patching.png", "normalised metric when one head is patched (clean 1, corrupt 0)")
    rep.table([[head_names[i], float(heads.result.ravel()[i])] for i in np.argsort(-heads.result.ravel())],
              ["head", "normalised metric"], caption="every head, largest first")  # fmt: skip

    with stage("path patching: heads -> logits, layer-0 heads -> layer-1 keys"):
        direct = cj.path_patch(model, task.clean, task.corrupt, task.metric, receivers="logits", senders="heads",
                               progress=progress, **kw)  # fmt: skip
        keys = cj.path_patch(model, task.clean, task.corrupt, task.metric, receivers=[f"a1.h{i}<k>" for i in range(H)],
                             senders="a0.h*", progress=progress, **kw)  # fmt: skip
        plot.heatmap(direct.result, ("layer", "head"), path=out / "path_logits.png", title="path patching: each head -> logits")
        plot.matrix(keys.result, [f"L1H{i} key" for i in range(H)], [f"L0H{h}" for h in range(H)], out / "path_keys.png",
                    xlabel="sender (layer-0 head)", ylabel="receiver (layer-1 head's key input)", colorbar="normalised metric (clean 1, corrupt 0)",
                    title="path patching: layer-0 head -> layer-1 head's keys (K-composition)")  # fmt: skip
    found_ind = [int(h) for h in np.flatnonzero(direct.result[1] >= args.threshold)]
    into_found = cj.path_patch(model, task.clean, task.corrupt, task.metric,
                               receivers=",".join(f"a1.h{i}<k>" for i in found_ind) or "a1.h*<k>", senders="a0.h*",
                               progress=False, **kw)  # fmt: skip
    found_prev = [int(h) for h in np.flatnonzero(into_found.result >= args.threshold)] if found_ind else []
    rep.heading("Path patching: who writes the answer, and who feeds the induction heads' keys")
    rep.text("Path patching adds one sender's output difference (clean minus corrupt) to the receivers' inputs only; "
             "every other path keeps its corrupt value, and the receivers' changed outputs flow on to the logits. "
             "Receivers 'logits' give each head's direct effect; receivers 'a1.hI<k>' give how much of the behaviour "
             "a layer-0 head carries through layer-1 head I's keys: K-composition.")  # fmt: skip
    rep.figure(out / "path_logits.png", "direct effect of each head through the logits")
    rep.figure(out / "path_keys.png", "each layer-0 head's path into each layer-1 head's key input")
    rep.save_arrays("patching", head_patching=heads.result, path_logits=direct.result, path_keys=keys.result,
                    path_into_found_keys=into_found.result)  # fmt: skip

    found = np.zeros((L, H), bool)
    found[0, found_prev] = True
    found[1, found_ind] = True
    truth = np.zeros((L, H), bool)
    truth[0, true_prev] = True
    truth[1, true_ind] = True
    agree = bool((found == truth).all())
    rep.heading("The heads found, against the known truth")
    rep.text(f"Found by path patching (threshold {args.threshold} of the clean-corrupt difference): induction heads = "
             f"layer-1 heads whose direct path to the logits carries at least the threshold; previous-token heads = layer-0 "
             f"heads whose path into those heads' keys (together) carries it.")  # fmt: skip
    rep.table([["previous-token heads (layer 0)", f"L0H{found_prev}", f"L0H{true_prev}", found_prev == true_prev],
               ["induction heads (layer 1)", f"L1H{found_ind}", f"L1H{true_ind}", found_ind == true_ind]],
              ["role", "found (path patching)", "known truth (task.truth)", "same"])  # fmt: skip
    rep.table([[f"L0H{h}", float(sc["prev_token"][0, h]), float(into_found.result[h]), float(heads.result[0, h])] for h in range(H)]
              + [[f"L1H{h}", float(sc["induction"][1, h]), float(direct.result[1, h]), float(heads.result[1, h])] for h in range(H)],
              ["head", "attention score (prev-token for L0, induction for L1)", "path effect (L0: into found keys; L1: to logits)",
               "head patching"], caption="the three views of every head")  # fmt: skip

    with stage("attention patterns of the heads found"):
        shown = [(0, h) for h in found_prev] + [(1, h) for h in found_ind]
        others = [(0, int(h)) for h in np.argsort(sc["prev_token"][0]) if int(h) not in found_prev][:1]
        shown = shown + others
        labels = [f"L{l}H{h}" + (" (not found)" if (l, h) in others else "") for l, h in shown]
        toks = ["BOS"] + [f"r{i}" for i in range(1, n + 1)] + [f"r{i}'" for i in range(1, n + 1)]
        plot.attention_patterns(np.stack([sc["patterns"][l, h] for l, h in shown]), labels, out / "attention_patterns.png",
                                tokens=toks, title=f"mean attention patterns on [BOS, r, r] ({args.batch} sequences)")  # fmt: skip
    rep.figure(out / "attention_patterns.png", "mean pattern of each head found, and of the layer-0 head with the lowest "
               "previous-token score; rows: query position, columns: key position; r_i' is the second copy of r_i. A "
               "previous-token head lights the sub-diagonal; an induction head the off-diagonal stripe n - 1 to the left")  # fmt: skip

    k = int(found.sum())
    with stage(f"ablation: found heads vs every other set of {k} heads"):
        sets = head_sets(L, H, max(k, 1), 512, args.seed)
        is_found = np.array([(s == found).all() for s in sets])
        none, singles = np.zeros((1, L, H), bool), np.eye(L * H, dtype=bool).reshape(L * H, L, H)
        losses = np.asarray(ablation_losses(model, jnp.asarray(seq), n, jnp.asarray(np.concatenate([none, singles, sets]))))
        clean_loss, single_losses, set_losses = float(losses[0]), losses[1 : 1 + L * H], losses[1 + L * H :]
    others_l = set_losses[~is_found]
    found_loss = float(set_losses[is_found][0]) if is_found.any() else float("nan")
    rank = int((others_l >= found_loss).sum()) if is_found.any() else -1
    abl = {"loss, no ablation": clean_loss, f"loss, found heads ablated ({k})": found_loss,
           "loss, other sets: mean": float(others_l.mean()) if len(others_l) else float("nan"),
           "loss, other sets: max": float(others_l.max()) if len(others_l) else float("nan"),
           "other sets with loss >= found": rank, "other sets": int(len(others_l)),
           "uniform-guess loss ln(vocab)": float(np.log(cfg.d_vocab))}  # fmt: skip
    rep.heading("Ablating the found heads vs other heads")
    rep.text(f"Next-token loss on the second copy of `[BOS, r, r]` (predicting r_2..r_{n}) with heads mean-ablated: each head's "
             f"z replaced by its mean over the {args.batch} sequences at each position. The found set of {k} heads is "
             f"compared with every other set of {k} of the {L * H} heads (all scored in one vmap).")  # fmt: skip
    rep.numbers(abl)
    order = np.argsort(-set_losses)[:8]
    rep.table([[", ".join(head_names[i] for i in np.flatnonzero(sets[j].ravel())), float(set_losses[j]), bool(is_found[j])] for j in order],
              ["heads ablated", "loss", "the found set"], caption=f"the 8 most damaging sets of {k} heads")  # fmt: skip
    rep.table([[head_names[i], float(single_losses[i]), bool(found.ravel()[i])] for i in range(L * H)],
              ["head ablated alone", "loss", "found"], caption="each head mean-ablated on its own")  # fmt: skip
    rep.save_arrays("ablation", masks=sets, losses=set_losses, is_found=is_found, no_ablation=clean_loss, single_head=single_losses)

    summary = dict(seed=args.seed, steps=args.steps, n=n, batch=args.batch, threshold=args.threshold,
                   train_loss=info["train_loss"], train_seconds=info["train_seconds"],
                   clean_logit_diff=base["clean logit diff"], corrupt_logit_diff=base["corrupt logit diff"],
                   clean_accuracy=base["clean accuracy (answer > wrong)"],
                   prev_token_scores=sc["prev_token"], induction_scores=sc["induction"],
                   attention_prev_token_heads=attn_prev, attention_induction_heads=attn_ind,
                   head_patching=heads.result, path_logits=direct.result, path_keys=keys.result,
                   path_into_found_keys=into_found.result,
                   found_prev_token_heads=found_prev, found_induction_heads=found_ind,
                   truth_prev_token_heads=true_prev, truth_induction_heads=true_ind, found_equals_truth=agree,
                   loss_no_ablation=clean_loss, loss_found_ablated=found_loss,
                   loss_other_sets_mean=abl["loss, other sets: mean"], loss_other_sets_max=abl["loss, other sets: max"],
                   loss_single_head_ablated=single_losses.reshape(L, H), other_sets_at_least_as_damaging=rank, other_sets=int(len(others_l)),
                   stage_seconds=seconds, total_seconds=round(time.perf_counter() - t0, 1))  # fmt: skip
    path = rep.finish(summary, seconds)
    log(f"found previous-token heads L0H{found_prev} (truth L0H{true_prev}), induction heads L1H{found_ind} "
        f"(truth L1H{true_ind}): {'same' if agree else 'DIFFERENT'}")  # fmt: skip
    log(f"loss {clean_loss:.3f} -> {found_loss:.3f} with the found heads ablated; other sets of {k}: mean "
        f"{abl['loss, other sets: mean']:.3f}, max {abl['loss, other sets: max']:.3f}")  # fmt: skip
    log(f"report: {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
