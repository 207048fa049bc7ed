"""SAE training-step benchmark: circuits_jax's jitted step against the same step in PyTorch.

Everything runs in one process on the same CPU, from the same weights and batches:

  * ours: `circuits_jax.dictionaries.make_step(cfg)`, the jitted step the trainer runs (loss
    `SAE.loss`, gradients, optax `clip_by_global_norm(1.0)` + Adam, the architecture's
    projection, the dead-latent counter, the per-batch statistics);
  * torch: plain tensors and `torch.autograd` implementing the same math for that architecture
    (topk with `torch.topk` + `scatter`, AuxK on the dead latents with the same normalisation,
    batchtopk's two-stage top-k, jumprelu's straight-through threshold gradients as custom
    `torch.autograd.Function`s, relu's decoder-norm-weighted L1), then
    `torch.nn.utils.clip_grad_norm_(params, 1.0)` and `torch.optim.Adam` with the same betas and
    eps (1e-8), the learning rate of `schedule(cfg)` at each step, the same projection and counter.

It reports, per architecture: tokens/s (batch / median step time, after `--warmup` untimed steps;
JAX blocked with `jax.block_until_ready`, torch is synchronous on CPU), JAX's first call
(trace + compile + one step), achieved FLOP/s as a share of a float32 matmul of the encoder's shape
measured in the same run in the same framework, and how far the two trajectories are apart
(loss of the first step, parameters after the first and after all steps).

    .venv/bin/python benchmarks/sae_training.py                             # topk, d=576 F=4608 k=32 N=1024
    .venv/bin/python benchmarks/sae_training.py --archs topk,relu,jumprelu,batchtopk --json sae.json
    .venv/bin/python benchmarks/sae_training.py --width 256 --batch 128 --steps 3 --warmup 1   # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch

from circuits_jax.dictionaries import ARCHS, LossConfig, TrainConfig, init_sae, init_state, make_step, schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import OtherLoad, cpu_model, idle_check, table  # noqa: E402  (the sibling benchmark)

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
POOL = 8  # distinct batches, cycled through the steps (the same ones on both sides)


# ---------------------------------------------------------------------------
# The PyTorch implementation
# ---------------------------------------------------------------------------


def _rect(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """`z * [z > t]`; d/dz = [z > t], d/dt = -(t/eps) rect((z-t)/eps) summed over tokens."""

    @staticmethod
    def forward(ctx, z, t, eps):
        ctx.save_for_backward(z, t)
        ctx.eps = eps
        return z * (z > t).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, t = ctx.saved_tensors
        eps = ctx.eps
        dz = g * (z > t).to(z.dtype)
        dt = (g * (-(t / eps) * _rect((z - t) / eps))).sum(0)
        return dz, dt, None


class Step(torch.autograd.Function):
    """Heaviside `[z > t]`; d/dz = 0 (None), d/dt = -(1/eps) rect((z-t)/eps) summed over tokens."""

    @staticmethod
    def forward(ctx, z, t, eps):
        ctx.save_for_backward(z, t)
        ctx.eps = eps
        return (z > t).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, t = ctx.saved_tensors
        eps = ctx.eps
        return None, (g * (-(1.0 / eps) * _rect((z - t) / eps))).sum(0), None


def _topk_dense(pre: torch.Tensor, k: int) -> torch.Tensor:
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))


class TorchSAE:
    """The same dictionary, loss, optimiser, projection and dead-latent counter as `make_step`,
    in PyTorch; only the default `LossConfig` variants (relu: weighted L1)."""

    def __init__(self, sae, cfg: TrainConfig, adam: str):
        hp = cfg.loss
        if hp.l1 != "weighted":
            raise NotImplementedError("the torch side implements the weighted L1 only")
        self.arch, self.k, self.hp, self.cfg = sae.arch, sae.k, hp, cfg
        self.p = {n: torch.from_numpy(np.array(getattr(sae, n))).clone() for n in PARAMS}
        self.in_scale = float(sae.in_scale)
        self.out_scale = float(sae.out_scale)
        names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if self.arch == "jumprelu" else [])
        self.trainable = [self.p[n].requires_grad_(True) for n in names]
        kw = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[adam]
        self.opt = torch.optim.Adam(self.trainable, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=1e-8, **kw)
        self.since = torch.zeros(sae.threshold.shape, dtype=torch.int32)
        self.aux_ran: list[bool] = []

    def loss(self, x, y, dead):
        p, hp = self.p, self.hp
        pre = (x * self.in_scale) @ p["W_enc"] + p["b_enc"]
        y_n = y * self.out_scale
        min_kept = torch.zeros(())
        if self.arch == "relu":
            acts = torch.relu(pre)
        elif self.arch == "topk":
            acts = _topk_dense(pre, self.k)
        elif self.arch == "batchtopk":
            n, f = pre.shape
            vals, idx = pre.topk(min(f, 4 * self.k), dim=-1, sorted=False)  # each row's 4k candidates
            cut = vals.detach().flatten().topk(self.k * n, sorted=False).values.min()
            acts = torch.zeros_like(pre).scatter(-1, idx, torch.where(vals >= cut, torch.relu(vals), 0.0))
            min_kept = cut.clamp_min(0.0)
        else:
            acts = JumpReLU.apply(pre, p["threshold"], hp.bandwidth)
        y_hat = acts @ p["W_dec"] + p["b_dec"]
        mse = ((y_n - y_hat) ** 2).sum(-1).mean()
        if self.arch == "relu":
            w = torch.sqrt((p["W_dec"] * p["W_dec"]).sum(-1) + 1e-12)
            sparsity = (acts * w).sum(-1).mean()
            loss = mse + hp.l1_coeff * sparsity
        elif self.arch == "jumprelu":
            sparsity = Step.apply(pre, p["threshold"], hp.bandwidth).sum(-1).mean()
            loss = mse + hp.l0_coeff * sparsity
        else:  # AuxK, skipped (like lax.cond) while no latent is dead
            ran = bool(dead.any())
            self.aux_ran.append(ran)
            if ran:
                err = (y_n - y_hat).detach()
                k_aux = min(hp.k_aux, pre.shape[-1])
                if int(dead.sum()) <= k_aux:  # the same exact shortcut as `_aux_k`: all dead latents
                    acts_aux = torch.relu(pre) * dead
                else:
                    acts_aux = _topk_dense(torch.where(dead, pre, -torch.inf), k_aux)
                sst = ((err - err.mean(0)) ** 2).sum()
                sparsity = ((err - acts_aux @ p["W_dec"]) ** 2).sum() / sst.clamp_min(1e-12)
            else:
                sparsity = torch.zeros(())
            loss = mse + hp.aux_coeff * sparsity
        with torch.no_grad():  # the same per-batch statistics as `Stats`
            active = acts > 0
            sst = ((y_n - y_n.mean(0)) ** 2).sum()
            stats = dict(
                loss=loss.detach(),
                mse=mse.detach(),
                l0=active.sum(-1).float().mean(),
                fve=1.0 - ((y_n - y_hat) ** 2).sum() / sst.clamp_min(1e-12),
                fired=active.any(0),
                min_kept=min_kept,
            )
        return loss, stats

    def step(self, x, y, lr: float, since=None) -> dict:
        if since is not None:
            self.since = torch.from_numpy(since)
        dead = self.since >= self.cfg.dead_after
        loss, stats = self.loss(x, y, dead)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        with torch.no_grad():  # the projection, then the dead-latent counter
            if self.arch == "jumprelu":
                self.p["threshold"].clamp_(min=1e-6)
            if self.arch == "batchtopk":
                d, t, m = self.hp.threshold_decay, self.p["threshold"], stats["min_kept"]
                t.copy_(torch.where(t > 0, d * t + (1 - d) * m, m))
            n = x.shape[0]
            self.since = torch.where(stats["fired"], 0, (self.since + n).clamp(max=2**30)).to(torch.int32)
        return stats

    def params(self) -> dict[str, np.ndarray]:
        return {n: t.detach().numpy().copy() for n, t in self.p.items()}


# ---------------------------------------------------------------------------
# FLOP count and matmul reference
# ---------------------------------------------------------------------------


def step_flop(n: int, d: int, f: int, aux_share: float) -> int:
    """Matmul FLOP of one dense training step (elementwise work, top-k, scatter, Adam ignored).

    Base, every architecture: 5 matmuls of N x D x F, 2*N*D*F FLOP each = 10*N*D*F:
      encoder forward        (x*s) @ W_enc                  [N,D]@[D,F]
      decoder forward        acts @ W_dec                   [N,F]@[F,D]
      decoder backward       dW_dec = acts^T @ dy_hat       [F,N]@[N,D]
                             dacts  = dy_hat @ W_dec^T      [N,D]@[D,F]
      encoder backward       dW_enc = (x*s)^T @ dpre        [D,N]@[N,F]
    (no dx: the input is not differentiated, in either implementation).
    AuxK (topk, batchtopk, in the steps where some latent is dead): 3 more, +6*N*D*F:
      acts_aux @ W_dec, and its backward to W_dec and to acts_aux.
    Both implementations run these as dense matmuls (the top-k codes are scattered into [N, F]).
    `aux_share` is the fraction of the timed steps in which AuxK ran.
    """
    return round(2 * n * d * f * (5 + 3 * aux_share))


def timings(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def matmul_reference(n: int, d: int, f: int, repeats: int) -> dict:
    """FLOP/s of the encoder's matmul `[N, D] @ [D, F]` in float32: jitted jnp.matmul and torch.mm."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, d), np.float32)
    b = rng.standard_normal((d, f), np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    mm(ja, jb).block_until_ready()
    with OtherLoad() as jl:
        jt = timings(lambda: mm(ja, jb).block_until_ready(), repeats)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch.mm(ta, tb)
    with OtherLoad() as tl:
        tt = timings(lambda: torch.mm(ta, tb), repeats)
    flop = 2 * n * d * f
    js, ts = statistics.median(jt), statistics.median(tt)
    return dict(
        shape=[n, d, f], flop=flop, jax_s=js, torch_s=ts, jax_flops=flop / js, torch_flops=flop / ts,
        other_cpu=max(jl.fraction or 0.0, tl.fraction or 0.0),
    )  # fmt: skip


# ---------------------------------------------------------------------------
# One architecture
# ---------------------------------------------------------------------------


def train_config(args) -> TrainConfig:
    """Flat learning rate from the second step on (optax schedules start at lr/100 at step 0 even
    without warm-up; the torch side copies `schedule(cfg)` step by step, so both see the same lrs)."""
    kw = dict(
        n_tokens=args.batch * 10**7, batch_size=args.batch, lr=args.lr, warmup_steps=0,
        dead_after=args.dead_after, loss=LossConfig(),
    )  # fmt: skip
    if "lr_schedule" in {f.name for f in dataclasses.fields(TrainConfig)}:
        kw["lr_schedule"] = "constant"
    return TrainConfig(**kw)


def _diffs(a: dict, b: dict, a0: dict) -> dict:
    """max |a - b| over all parameters, and per parameter ||a - b|| / ||a - a0|| (the gap between
    the two against the distance travelled; the largest over the parameters that moved)."""
    per = {n: float(np.max(np.abs(a[n] - b[n]))) for n in a}
    rel = {}
    for n in a:
        den = float(np.linalg.norm(a[n] - a0[n]))
        if den > 0:
            rel[n] = float(np.linalg.norm(a[n] - b[n])) / den
    rel_norm = max(rel.values(), default=float("nan"))
    return dict(max_abs=max(per.values()), rel_norm=rel_norm, per_param=per, rel_per_param=rel)


def topk_variants(args, batches_np) -> dict:
    """TopK only: our step with the dense decoder (`LossConfig(sparse=False)`) and with the sparse one (the
    default), and EleutherAI sparsify's own training step (`SparseCoder` forward, its FVU + AuxK loss, backward,
    torch Adam, unit-norm decoder rows), timed on the same batches from the same weights."""
    out = {}
    sae = init_sae(args.d, args.width, key=jax.random.key(args.seed), arch="topk", k=args.k)
    xs_j = [jnp.asarray(b) for b in batches_np]
    for sparse in (False, True):
        cfg = dataclasses.replace(train_config(args), loss=LossConfig(sparse=sparse))
        step_fn, state = make_step(cfg), init_state(sae, cfg)
        times = []
        for i in range(args.warmup + args.steps):
            x = xs_j[i % len(xs_j)]
            t0 = time.perf_counter()
            state, stats = step_fn(state, x, x)
            jax.block_until_ready((state, stats))
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        out["ours_sparse" if sparse else "ours_dense"] = statistics.median(times)
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return out
    sc = SparseCoder(args.d, SparseCoderConfig(num_latents=args.width, k=args.k))
    with torch.no_grad():
        sc.encoder.weight.copy_(torch.from_numpy(np.array(sae.W_enc.T)))
        sc.encoder.bias.copy_(torch.from_numpy(np.array(sae.b_enc)))
        sc.W_dec.copy_(torch.from_numpy(np.array(sae.W_dec)))
        sc.b_dec.copy_(torch.from_numpy(np.array(sae.b_dec)))
    opt = torch.optim.Adam(sc.parameters(), lr=args.lr, eps=1e-8)
    dead = torch.zeros(args.width, dtype=torch.bool)
    times = []
    for i in range(args.warmup + args.steps):
        x = torch.from_numpy(batches_np[i % len(batches_np)])
        t0 = time.perf_counter()
        o = sc(x, dead_mask=dead)
        (o.fvu + o.auxk_loss / 32).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sc.set_decoder_norm_to_unit_norm()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    out["sparsify"] = statistics.median(times)
    return out


def bench_arch(arch: str, args, batches_np) -> dict:
    cfg = train_config(args)
    k = args.k if arch in ("topk", "batchtopk") else None
    sae = init_sae(args.d, args.width, key=jax.random.key(args.seed), arch=arch, k=k)
    p0 = {n: np.array(getattr(sae, n)) for n in PARAMS}
    total = args.warmup + args.steps
    sched = schedule(cfg)
    lrs = [float(sched(i)) for i in range(total)]
    xs_j = [jnp.asarray(b) for b in batches_np]
    xs_t = [torch.from_numpy(b) for b in batches_np]

    # ---- ours
    step_fn = make_step(cfg)
    state = init_state(sae, cfg)
    planted = None
    if args.dead_frac is not None:  # a fixed random set of dead latents, re-planted before each step
        dead = np.random.default_rng(args.seed).random(args.width) < args.dead_frac
        planted = np.where(dead, cfg.dead_after, 0).astype(np.int32)
    if planted is not None:
        state = eqx.tree_at(lambda s: s.since_fired, state, jnp.asarray(planted))
    t0 = time.perf_counter()
    state, stats = step_fn(state, xs_j[0], xs_j[0])  # trace + compile + one step
    jax.block_until_ready((state, stats))
    first_call = time.perf_counter() - t0
    jax_p1 = {n: np.array(getattr(state.dictionary, n)) for n in PARAMS}
    jax_loss, jax_times = [float(stats.loss)], []
    with OtherLoad() as jload:
        for i in range(1, total):
            x = xs_j[i % len(xs_j)]
            if planted is not None:  # outside the timing: the same dead latents before every step
                state = eqx.tree_at(lambda s: s.since_fired, state, jnp.asarray(planted))
            t0 = time.perf_counter()
            state, stats = step_fn(state, x, x)
            jax.block_until_ready((state, stats))
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                jax_times.append(dt)
            jax_loss.append(float(stats.loss))
    jax_pN = {n: np.array(getattr(state.dictionary, n)) for n in PARAMS}

    # ---- torch
    tsae = TorchSAE(sae, cfg, args.torch_adam)
    torch_loss, torch_times = [], []
    with OtherLoad() as tload:
        for i in range(total):
            x = xs_t[i % len(xs_t)]
            t0 = time.perf_counter()
            stats = tsae.step(x, x, lrs[i], planted)
            dt = time.perf_counter() - t0
            if i == 0:
                torch_p1 = tsae.params()
            if i >= args.warmup:
                torch_times.append(dt)
            torch_loss.append(float(stats["loss"]))
    torch_pN = tsae.params()

    aux = tsae.aux_ran[args.warmup :] if arch in ("topk", "batchtopk") else []
    aux_share = sum(aux) / len(aux) if aux else 0.0
    flop = step_flop(args.batch, args.d, args.width, aux_share)
    jm, tm = statistics.median(jax_times), statistics.median(torch_times)
    dl = np.abs(np.array(jax_loss) - np.array(torch_loss))
    d1, dN = _diffs(jax_p1, torch_p1, p0), _diffs(jax_pN, torch_pN, p0)
    return dict(
        arch=arch, batch=args.batch, d=args.d, width=args.width, k=k, steps=args.steps, warmup=args.warmup,
        flop=flop, aux_share=aux_share,
        jax_first_call_s=first_call,
        jax_median_ms=1e3 * jm, jax_min_ms=1e3 * min(jax_times),
        torch_median_ms=1e3 * tm, torch_min_ms=1e3 * min(torch_times),
        jax_tok_s=args.batch / jm, torch_tok_s=args.batch / tm, jax_over_torch=tm / jm,
        jax_flops=flop / jm, torch_flops=flop / tm,
        loss_diff_1=float(dl[0]), loss_diff_max=float(dl.max()), loss_1=jax_loss[0],
        loss_jax=jax_loss, loss_torch=torch_loss, lrs=lrs,
        param_diff_1=d1, param_diff_N=dN,
        jax_times=jax_times, torch_times=torch_times,
        other_cpu_jax=jload.fraction, other_cpu_torch=tload.fraction,
        other_cpu=max(jload.fraction or 0.0, tload.fraction or 0.0),
    )  # fmt: skip


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

COLUMNS = [  # (header, key, format)
    ("arch", "arch", "{}"),
    ("batch", "batch", "{:d}"),
    ("width", "width", "{:d}"),
    ("jax tok/s", "jax_tok_s", "{:.0f}"),
    ("torch tok/s", "torch_tok_s", "{:.0f}"),
    ("jax/torch", "jax_over_torch", "{:.2f}"),
    ("jax %mm", "jax_frac_mm", "{:.0%}"),
    ("torch %mm", "torch_frac_mm", "{:.0%}"),
    ("max|Δloss| 1 step", "loss_diff_1", "{:.1e}"),
    ("max|Δparam| N steps", "param_max_N", "{:.1e}"),
    ("‖Δp‖/‖p−p0‖ N", "param_rel_N", "{:.1e}"),
    ("jax 1st call s", "jax_first_call_s", "{:.2f}"),
    ("other CPU", "other_cpu", "{:.0%}"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="topk", help=f"comma-separated, of {','.join(ARCHS)} (default: topk)")
    p.add_argument("--d", type=int, default=576, help="model width D (default 576, SmolLM2-135M)")
    p.add_argument("--width", type=int, default=4608, help="latents F (default 4608 = 8 D)")
    p.add_argument("--k", type=int, default=32, help="active latents per token for topk / batchtopk")
    p.add_argument("--batch", type=int, default=1024, help="tokens per step N")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (JAX's first includes compilation)")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument(
        "--dead-frac", type=float, default=None,
        help="plant this fraction of latents as dead before every step (with --dead-after > 0): AuxK as in "
        "a real run, where few latents are dead; default: none planted",
    )
    p.add_argument(
        "--dead-after", type=int, default=0,
        help="TrainConfig.dead_after; 0 (default): every latent counts as dead, so AuxK runs in every step "
        "(its cost does not depend on how many are dead). The trainer's 200000 from fresh counters: no "
        "latent is dead in a short run and both sides skip AuxK.",
    )  # fmt: skip
    p.add_argument("--torch-adam", choices=("default", "foreach", "fused"), default="default",
                   help="torch.optim.Adam implementation (default: torch's choice, the per-tensor loop on CPU)")  # fmt: skip
    p.add_argument("--torch-threads", type=int, default=None, help="default: the cores this process may use")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = p.parse_args(argv)
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    bad = [a for a in args.archs if a not in ARCHS]
    if bad:
        p.error(f"unknown architectures {bad}; choose from {', '.join(ARCHS)}")
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be at least 1 (the first step compiles)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(args.torch_threads or cores)
    env = dict(
        cpu=cpu_model(), jax=jax.__version__, jax_devices=[str(d) for d in jax.devices()], torch=torch.__version__,
        torch_threads=torch.get_num_threads(), torch_adam=args.torch_adam, load_average_start=os.getloadavg(),
        other_cpu_before=idle_check(),
    )  # fmt: skip
    print(f"CPU: {env['cpu']}")
    print(f"jax {env['jax']} on {', '.join(env['jax_devices'])} (XLA's default thread pool)")
    how = "--torch-threads" if args.torch_threads else f"the {cores} cores this process may use"
    print(f"torch {env['torch']}: torch.set_num_threads({env['torch_threads']}) ({how}), Adam {args.torch_adam}")
    print("load average (1, 5, 15 min) at the start: " + ", ".join(f"{v:.2f}" for v in env["load_average_start"]))
    if env["other_cpu_before"] is not None:
        print(f"CPU used by other processes before the start: {env['other_cpu_before']:.0%}")
    print(
        f"SAE d={args.d} F={args.width} k={args.k} batch={args.batch}: {args.warmup} warm-up + {args.steps} timed steps, "
        f"lr {args.lr:g} (lr/100 at step 0, as schedule() gives), dead_after={args.dead_after}, dead_frac={args.dead_frac}, {POOL} random batches cycled"
    )

    mm = matmul_reference(args.batch, args.d, args.width, max(args.steps, 5))
    print(
        f"matmul [{args.batch},{args.d}]@[{args.d},{args.width}] float32: jax {mm['jax_flops'] / 1e9:.1f} GFLOP/s "
        f"({1e3 * mm['jax_s']:.2f} ms), torch.mm {mm['torch_flops'] / 1e9:.1f} GFLOP/s ({1e3 * mm['torch_s']:.2f} ms)"
    )

    rng = np.random.default_rng(args.seed)
    batches = [rng.standard_normal((args.batch, args.d), np.float32) for _ in range(min(POOL, args.warmup + args.steps))]
    rows = []
    for arch in args.archs:
        r = bench_arch(arch, args, batches)
        r["jax_frac_mm"] = r["jax_flops"] / mm["jax_flops"]
        r["torch_frac_mm"] = r["torch_flops"] / mm["torch_flops"]
        r["param_max_N"] = r["param_diff_N"]["max_abs"]
        r["param_rel_N"] = r["param_diff_N"]["rel_norm"]
        rows.append(r)
        d1, dN = r["param_diff_1"], r["param_diff_N"]
        print(
            f"\n{arch}: jax first call {r['jax_first_call_s']:.2f} s; step median/min jax {r['jax_median_ms']:.1f}/"
            f"{r['jax_min_ms']:.1f} ms, torch {r['torch_median_ms']:.1f}/{r['torch_min_ms']:.1f} ms; "
            f"{r['flop'] / 1e9:.2f} GFLOP/step" + (f" (AuxK in {r['aux_share']:.0%} of the timed steps)" if r["k"] else "")
        )
        print(
            f"  after 1 step: |Δloss| {r['loss_diff_1']:.2e} (loss {r['loss_1']:.4g}), max|Δparam| {d1['max_abs']:.2e}, "
            f"‖Δp‖/‖p−p0‖ {d1['rel_norm']:.1e}"
        )
        print(
            f"  after {args.warmup + args.steps} steps: max|Δloss| over the steps {r['loss_diff_max']:.2e}, "
            f"max|Δparam| {dN['max_abs']:.2e} ("
            + ", ".join(f"{n} {v:.1e}" for n, v in dN["per_param"].items())
            + f"), ‖Δp‖/‖p−p0‖ {dN['rel_norm']:.1e}",
            flush=True,
        )

    if "topk" in args.archs:
        v = topk_variants(args, batches)
        torch_ms = next(r["torch_median_ms"] for r in rows if r["arch"] == "topk")
        print(f"\ntopk step, median ms: ours dense {1e3 * v['ours_dense']:.1f}, ours sparse {1e3 * v['ours_sparse']:.1f}"
              + (f", eai-sparsify {1e3 * v['sparsify']:.1f}" if "sparsify" in v else " (eai-sparsify not installed)")
              + f", torch dense {torch_ms:.1f}; ours sparse is {torch_ms / (1e3 * v['ours_sparse']):.2f}x torch dense"
              + (f" and {v['sparsify'] / v['ours_sparse']:.2f}x eai-sparsify" if "sparsify" in v else ""))
        env["topk_variants_s"] = v

    print()
    print(table(rows, COLUMNS, left=("arch",)))
    print(
        "\ntok/s = batch / median step time; jax/torch > 1: ours is faster. %mm: the step's matmul FLOP/s "
        "(10·N·D·F, +6·N·D·F while AuxK runs; see step_flop) as a share of the same framework's "
        "[N,D]@[D,F] float32 matmul rate. Δloss: the first step's loss (identical weights); Δparam: all "
        "parameters after warm-up + timed steps; ‖Δp‖/‖p−p0‖: the gap between the two against the distance "
        "travelled (a top-k selection flipped by rounding moves a latent's Adam update by ~lr). "
        "other CPU: the share of the machine other processes took while timing."
    )
    env["load_average_end"] = os.getloadavg()
    print("load average (1, 5, 15 min) at the end: " + ", ".join(f"{v:.2f}" for v in env["load_average_end"]))
    if any(r["other_cpu"] > 0.1 for r in rows) or mm["other_cpu"] > 0.1:
        print("WARNING: other processes used over 10% of the CPUs during some measurements; rerun on a quiet machine.")
    env["total_s"] = time.perf_counter() - t_start
    print(f"total {env['total_s']:.0f} s")
    args_d = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = dict(env=env, args=args_d, matmul=mm, rows=rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
