"""A user-defined intervention, swept over every attention head in one compiled program.

The intervention, `AlongDirection`, is not built into circuits_jax: it rescales one head's output
(`attn.hook_result`, `[B, T, H, D]`: each head's write into the residual stream) along a per-prompt
direction `u [B, D]`, at the scored position only, and leaves the orthogonal part alone. With `u`
the (final-norm-weighted) logit-difference direction `W_U[:, IO] - W_U[:, S]` and factor 0, it
removes exactly the part of a head's output that the unembedding reads as "IO over S", a
directional ablation that zero- or mean-ablation cannot express.

It is an `equinox.Module` subclass of `cj.Intervention` whose fields are arrays (`direction`, the
`head` index, the `factor`, a `[B, T]` position mask), so it is a pytree: `jax.vmap` over a batch
of (layer, head) pairs gives every head's run in ONE compiled program (`Hook`'s layer is traced),
with `jax.lax.map(..., batch_size=chunk)` to bound memory. The script checks the sweep against a
plain Python loop of hooked forward passes over a few heads (equal numbers) and times both.

    python experiments/custom_intervention.py                      # SmolLM2, 8 IOI prompts
    python experiments/custom_intervention.py --model tiny --out /tmp/ci   # a random 3-layer model (tests)

Writes OUT/report.html (heatmap embedded), OUT/summary.json and OUT/sweep.npz.
"""

import argparse
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

import circuits_jax as cj


class AlongDirection(cj.Intervention):
    """Multiply the component of head `head`'s output along `direction` by `factor`, where `positions`.

    Site: `attn.hook_result` `[B, T, H, D]`. direction: `[B, D]`, unit norm per row. head: int scalar
    (may be traced). factor: float scalar. positions: bool `[B, T]` (True where the edit applies).
    """

    direction: Array
    head: Array
    factor: Array
    positions: Array

    def __call__(self, x):
        coef = jnp.einsum("bthd,bd->bth", x, self.direction.astype(x.dtype))  # the component along u
        new = x + ((self.factor - 1) * coef)[..., None] * self.direction[:, None, None, :].astype(x.dtype)
        heads = jnp.arange(x.shape[2]) == self.head
        where = self.positions[:, :, None, None] & heads[None, None, :, None]
        return jnp.where(where, new, x)

    def check(self, x, site):
        if x.ndim != 4:
            raise ValueError(f"AlongDirection acts on per-head outputs [B, T, H, D] (attn.hook_result); {site!r} has shape {x.shape}")
        B, T, H, D = x.shape
        if self.direction.shape != (B, D):
            raise ValueError(f"direction has shape {self.direction.shape}; at {site!r} it must be [B, D] = {(B, D)}")
        if self.positions.shape != (B, T):
            raise ValueError(f"positions has shape {self.positions.shape}; at {site!r} it must be [B, T] = {(B, T)}")


def logit_diff_direction(model, io, s) -> Array:
    """`[B, D]` unit vectors along `w_lnf * (W_U[:, io] - W_U[:, s])`: what the unembedding reads as IO over S."""
    W_U = model.W_U
    w = jnp.ones(W_U.shape[0], W_U.dtype) if model.lnf_w is None else model.lnf_w
    u = (w[:, None] * (W_U[:, jnp.asarray(io)] - W_U[:, jnp.asarray(s)])).T
    return u / jnp.linalg.norm(u, axis=-1, keepdims=True)


def _logit_diff(model, tokens, io, s, pos, hooks=()) -> Array:
    """Mean over prompts of logit(IO) - logit(S) at position `pos [B]`; unembeds only that position."""
    resid = cj.run(model, tokens, hooks=hooks, return_logits=False).resid
    logits = cj.unembed(model, resid[jnp.arange(tokens.shape[0]), pos])  # [B, V]
    rows = jnp.arange(tokens.shape[0])
    return jnp.mean(logits[rows, io] - logits[rows, s])


def _edit(model, tokens, io, s, pos, factor, head) -> AlongDirection:
    positions = jnp.arange(tokens.shape[1])[None, :] == pos[:, None]
    return AlongDirection(logit_diff_direction(model, io, s), jnp.asarray(head, jnp.int32),
                          jnp.asarray(factor, jnp.float32), positions)  # fmt: skip


@eqx.filter_jit
def _sweep(model, tokens, io, s, pos, factor, chunk: int | None):
    L, H = model.cfg.n_layers, model.cfg.n_heads
    layers, heads = (a.ravel() for a in jnp.meshgrid(jnp.arange(L), jnp.arange(H), indexing="ij"))

    def one(row):  # one (layer, head): a Hook whose layer is a traced integer
        layer, head = row
        hook = cj.Hook("attn.hook_result", layer, _edit(model, tokens, io, s, pos, factor, head))
        return _logit_diff(model, tokens, io, s, pos, [hook])

    if chunk is None:
        out = jax.vmap(one)((layers, heads))
    else:  # vmap over `chunk` rows at a time, inside the same compiled program
        out = jax.lax.map(one, (layers, heads), batch_size=chunk)
    return out.reshape(L, H)


def sweep_every_head(model, tokens, io, s, pos=None, *, factor: float = 0.0, chunk: int | None = None) -> np.ndarray:
    """`[n_layers, n_heads]` mean logit difference with `AlongDirection(factor)` at each head in turn.

    tokens: int `[B, T]`; io, s: int `[B]` answer and wrong token ids; pos: int `[B]` scored position
    (default: the last). chunk: heads per vmapped batch (default: all at once); one program either way.
    """
    tokens, io, s, pos = _inputs(model, tokens, io, s, pos)
    if chunk is not None and not 1 <= chunk <= model.cfg.n_layers * model.cfg.n_heads:
        raise ValueError(f"chunk must be between 1 and {model.cfg.n_layers * model.cfg.n_heads} (layers x heads), got {chunk}")
    return np.asarray(_sweep(model, tokens, io, s, pos, jnp.float32(factor), chunk))


def loop_heads(model, tokens, io, s, heads, pos=None, *, factor: float = 0.0) -> np.ndarray:
    """The same numbers from a Python loop of hooked forward passes, one `(layer, head)` at a time."""
    from tqdm import tqdm

    tokens, io, s, pos = _inputs(model, tokens, io, s, pos)
    out = []
    for layer, head in tqdm(list(heads), desc="loop over heads", leave=False):
        hook = cj.Hook("attn.hook_result", int(layer), _edit(model, tokens, io, s, pos, factor, int(head)))
        out.append(float(_logit_diff(model, tokens, io, s, pos, [hook])))
    return np.asarray(out, np.float32)


def _inputs(model, tokens, io, s, pos):
    tokens = jnp.atleast_2d(jnp.asarray(tokens, jnp.int32))
    B, T = tokens.shape
    io, s = jnp.asarray(io, jnp.int32).reshape(-1), jnp.asarray(s, jnp.int32).reshape(-1)
    if io.shape != (B,) or s.shape != (B,):
        raise ValueError(f"io and s need one token id per prompt: tokens have shape {(B, T)}, io {io.shape}, s {s.shape}")
    pos = jnp.full((B,), T - 1, jnp.int32) if pos is None else jnp.asarray(pos, jnp.int32).reshape(-1)
    if pos.shape != (B,) or int(pos.min()) < 0 or int(pos.max()) >= T:
        raise ValueError(f"pos must be [B] = {(B,)} positions in 0..{T - 1}, got {np.asarray(pos)}")
    return tokens, io, s, pos


def tiny_problem(n: int, seed: int):
    """A random 3-layer Llama-like model and random prompts / answers: the test's fast stand-in for SmolLM2."""
    cfg = cj.Config(d_model=16, n_layers=3, n_heads=4, d_head=4, d_vocab=23, n_ctx=32, d_mlp=24, n_kv_heads=2,
                    normalization="rmsnorm", act="silu", gated_mlp=True, positional="rotary", tied_embeddings=True)  # fmt: skip
    model = cj.init_model(cfg, key=jax.random.key(seed))
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.d_vocab, size=(n, 8)).astype(np.int32)
    io = rng.integers(0, cfg.d_vocab, size=n).astype(np.int32)
    s = (io + 1 + rng.integers(0, cfg.d_vocab - 1, size=n)) % cfg.d_vocab  # never equal to io
    return model, None, tokens, io, s.astype(np.int32), None


def _problem(name: str, n: int, seed: int):
    if name == "tiny":
        return tiny_problem(n, seed)
    model, tok = cj.load(name)
    task = cj.ioi_task(tok, n=n, seed=seed, templates=(0,))  # one template: every row has the same length
    return model, tok, task.clean, task.answers.ravel(), task.wrong.ravel(), task


def _heatmap(effect: np.ndarray, path: Path, title: str):
    """`[layer, head]` change of the logit difference, diverging colours around 0, labelled axes."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed
    import matplotlib.pyplot as plt

    L, H = effect.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + 0.45 * H), max(3.5, 1.5 + 0.22 * L)))
    lim = float(np.abs(effect).max()) or 1.0
    im = ax.imshow(effect, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(H), [str(h) for h in range(H)])
    ax.set_yticks(range(0, L, max(1, L // 15)))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="(edited - clean) / clean logit diff")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def study(model, tokens, io, s, out: Path, *, factor: float, chunk: int | None, loop_n: int, seed: int,
          model_name: str, str_tokens=None, prompts=None) -> dict:  # fmt: skip
    """Sweep every head, check a few against the loop, time both, write the report; returns the summary."""
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    clean = float(_logit_diff(model, *_inputs(model, tokens, io, s, None)))

    args = _inputs(model, tokens, io, s, None) + (jnp.float32(factor), chunk)
    t = time.perf_counter()
    compiled = _sweep.lower(model, *args).compile()  # the one program for every head
    t_compile = time.perf_counter() - t
    t = time.perf_counter()
    sweep = np.asarray(jax.block_until_ready(compiled(model, *args)))
    t_sweep = time.perf_counter() - t  # run only
    sweep2 = sweep_every_head(model, tokens, io, s, factor=factor, chunk=chunk)  # the public entry point (cached program)
    effect = (sweep - clean) / clean

    order = np.argsort(np.abs(effect).ravel())[::-1]
    rng = np.random.default_rng(seed)
    picked = list(order[: max(1, loop_n // 2)])
    rest = [i for i in rng.permutation(L * H) if i not in picked]
    picked += rest[: max(0, loop_n - len(picked))]
    heads = [(int(i // H), int(i % H)) for i in picked]
    t = time.perf_counter()
    looped = loop_heads(model, tokens, io, s, heads, factor=factor)
    t_loop = time.perf_counter() - t  # one program per distinct layer (Python-int layers are static) + runs
    t = time.perf_counter()
    loop_heads(model, tokens, io, s, heads, factor=factor)
    t_loop2 = time.perf_counter() - t  # the same loop again: programs cached, runs only
    vm = np.asarray([sweep[l, h] for l, h in heads], np.float32)
    max_diff = float(np.max(np.abs(vm - looped)))

    out.mkdir(parents=True, exist_ok=True)
    png = out / "heatmap.png"
    _heatmap(effect, png, f"each head's output along the IO - S unembedding\ndirection scaled by {factor:g}: change of logit diff")
    top = [(f"L{i // H}H{i % H}", float(effect.ravel()[i]), float(sweep.ravel()[i])) for i in order[:8]]
    summary = dict(model=model_name, n_prompts=int(np.shape(tokens)[0]), factor=factor, n_heads_swept=L * H,
                   clean_logit_diff=clean, top_heads=top, loop_heads=[f"L{l}H{h}" for l, h in heads],
                   loop_vs_vmap_max_abs_diff=max_diff, public_vs_compiled_max_abs_diff=float(np.max(np.abs(sweep - sweep2))),
                   sweep_compile_seconds=round(t_compile, 3), sweep_seconds=round(t_sweep, 3),
                   sweep_seconds_per_head=round(t_sweep / (L * H), 5), loop_seconds=round(t_loop, 3),
                   loop_seconds_per_head=round(t_loop / len(heads), 4),
                   loop_seconds_per_head_compiled=round(t_loop2 / len(heads), 4), chunk=chunk)  # fmt: skip

    rep = cj_report(model_name, cfg, out, summary)
    rep.heading("Question and method")
    rep.text("How much of each head's effect on the IOI logit difference is its direct write along the unembedding's "
             "`IO - S` direction? A user-defined intervention, `AlongDirection`, multiplies the component of one head's "
             f"output (`attn.hook_result`) along `u = w_lnf * (W_U[:, IO] - W_U[:, S])` (unit norm) by {factor:g} at the "
             "final position, and the metric is the mean logit difference logit(IO) - logit(S) there. The intervention "
             "is an `eqx.Module` holding arrays, so `jax.vmap` over (layer, head) pairs runs every head in one compiled "
             "program; a Python loop of hooked forward passes over a few heads checks the numbers.")  # fmt: skip
    if prompts:
        rep.table([[p] for p in prompts[:4]], ["prompt"], caption=f"the first 4 of {len(prompts)} IOI prompts")
    rep.numbers({"clean logit diff": clean, "heads swept": L * H, "loop vs vmap max |diff|": max_diff,
                 "sweep seconds (compiled)": round(t_sweep, 3), "sweep seconds per head (compiled)": round(t_sweep / (L * H), 4),
                 "loop seconds per head (compiled)": round(t_loop2 / len(heads), 4)})  # fmt: skip
    rep.heading("Every head")
    rep.figure(png, "(logit diff with the edit - clean logit diff) / clean logit diff, per [layer, head]; blue: the head "
               "pushes IO over S along u, red: against")  # fmt: skip
    rep.table([[h, e, v] for h, e, v in top], ["head", "relative change", "logit diff with the edit"],
              caption="the 8 heads whose edit changes the metric most")  # fmt: skip
    rep.heading("vmap vs a Python loop")
    rep.table([[f"L{l}H{h}", float(a), float(b)] for (l, h), a, b in zip(heads, vm, looped)],
              ["head", "vmapped sweep", "loop"], caption=f"max |difference| = {max_diff:.2e}")  # fmt: skip
    rep.text(f"Sweep of all {L * H} heads: {t_compile:.2f} s to compile its one program, {t_sweep:.2f} s to run it "
             f"({t_sweep / (L * H) * 1e3:.1f} ms per head). Loop over {len(heads)} heads: {t_loop:.2f} s "
             f"({t_loop / len(heads):.2f} s per head, one compilation per distinct layer because a Python-int layer is "
             f"static); the same loop again, compiled: {t_loop2:.2f} s ({t_loop2 / len(heads) * 1e3:.1f} ms per head).")  # fmt: skip
    rep.save_arrays("sweep", logit_diff=sweep, relative_change=effect)
    rep.summary.update(summary)
    summary["report"] = str(rep.write())
    return summary


def cj_report(model_name, cfg, out, summary):
    from circuits_jax.app import Report

    return Report(f"A user-defined intervention swept over every head ({model_name})", out,
                  subtitle=f"{cfg.n_layers} layers x {cfg.n_heads} heads; {summary['n_prompts']} prompts; factor {summary['factor']:g}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="custom_intervention", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python experiments/custom_intervention.py --n 8 --factor 0 --out runs/custom_intervention",
    )  # fmt: skip
    p.add_argument("--model", default="smollm2", help="'smollm2' (default), a .gguf / HF path, or 'tiny' (random, for tests)")
    p.add_argument("--n", type=int, default=8, help="IOI prompts (default 8)")
    p.add_argument("--factor", type=float, default=0.0, help="multiplier of the component along u (0 removes it)")
    p.add_argument("--chunk", type=int, default=None, help="heads per vmapped batch (default: all at once)")
    p.add_argument("--loop-heads", type=int, default=4, help="heads checked with a Python loop (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/custom_intervention", help="output directory")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be at least 1 prompt, got {args.n}")
    if args.loop_heads < 1:
        p.error(f"--loop-heads must be at least 1, got {args.loop_heads}")
    model, tok, tokens, io, s, task = _problem(args.model, args.n, args.seed)
    if args.chunk is not None and not 1 <= args.chunk <= model.cfg.n_layers * model.cfg.n_heads:
        p.error(f"--chunk must be between 1 and {model.cfg.n_layers * model.cfg.n_heads} (layers x heads), got {args.chunk}")
    s_ = study(model, tokens, io, s, Path(args.out), factor=args.factor, chunk=args.chunk, loop_n=args.loop_heads,
               seed=args.seed, model_name=args.model, prompts=None if task is None else task.prompts)  # fmt: skip
    print(f"clean logit diff {s_['clean_logit_diff']:.3f} over {s_['n_prompts']} prompts")
    print("heads whose edit matters most: " + ", ".join(f"{h} {e:+.3f}" for h, e, _ in s_["top_heads"][:5]))
    print(f"vmap vs loop over {', '.join(s_['loop_heads'])}: max |diff| {s_['loop_vs_vmap_max_abs_diff']:.2e}")
    print(f"sweep of {s_['n_heads_swept']} heads: {s_['sweep_compile_seconds']:.2f} s to compile, "
          f"{s_['sweep_seconds']:.2f} s to run ({s_['sweep_seconds_per_head'] * 1e3:.1f} ms per head); loop: "
          f"{s_['loop_seconds_per_head']:.2f} s per head first time, {s_['loop_seconds_per_head_compiled'] * 1e3:.1f} ms compiled")
    print(f"report: {s_['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
