"""Memory plans for SmolLM2 (docs/memory_planning.md): compiled truth vs the fit vs the analytic guess."""
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import circuits_jax as cj
from circuits_jax.core import PATCH_SITES, Site, auto_chunk, per_patch_bytes, score_chunk, site_shape
from circuits_jax.dictionaries import init_state, make_step
from circuits_jax.scale import compiled_footprint, fit_line, fmt_bytes, nbytes

GiB = 2**30
model, tok = cj.load("smollm2")
cfg = model.cfg
prompt = "When Mary and John went to the store, John gave a drink to"
clean = np.repeat(np.asarray(tok.to_tokens(prompt)), 8, axis=0)  # [8, T]
B, T = clean.shape
print(f"jax {jax.__version__} on {jax.devices()[0]}; model weights {fmt_bytes(nbytes(model))}; prompt tokens B={B} T={T}; host memory available {fmt_bytes(cj.device_memory())}")
metric = cj.LogitDiff(answer=jnp.zeros(B, jnp.int32), wrong=jnp.zeros(B, jnp.int32))


def truth(site, by, n):
    kind, axes = PATCH_SITES[site]
    act = site_shape(Site(kind, 0), cfg, B, T)[1:]
    free = tuple(by)[1:]
    s = jax.ShapeDtypeStruct
    args = (model, s((B, T), jnp.int32), None, s((B,), jnp.int32), s((cfg.n_layers, B, T, cfg.d_model), jnp.float32),
            s((cfg.n_layers, B, *act), jnp.float32), metric, s((), jnp.int32), s((n, len(by)), jnp.int32))
    return compiled_footprint(lambda *a: score_chunk(*a, kind, tuple(axes[a] for a in free), act), *args)


for site, by in [("z", ("layer", "pos", "head")), ("resid_pre", ("layer", "pos"))]:
    for budget, cap in [(None, None), (4 * GiB, None), (80 * GiB, 1024), (int(1.5 * GiB), 1024)]:
        t0 = time.perf_counter()
        p = cj.plan_sweep(model, clean, site, by, budget=budget, max_chunk=cap)
        print(f"[{time.perf_counter() - t0:.1f} s] {p}")
        print(f"    measured {p.measured}; largest that fits: {p.limit}")
    ana = per_patch_bytes(cfg, B, T)
    print(f"    analytic per_patch_bytes: {fmt_bytes(ana)} per patch (no fixed part); auto_chunk at 4 GiB: "
          f"{auto_chunk(cfg, B, T, 4 * GiB)} (CPU cap), uncapped {4 * GiB // ana}; at 80 GiB uncapped {80 * GiB // ana}")
    f0, p0_ = fit_line(*p.measured[:2])
    pr = lambda n: f0 + n * p0_
    print(f"    line through chunks 2, 8: {fmt_bytes(f0)} fixed + {fmt_bytes(p0_)} per patch")
    for n in (32, 64, 256):
        fp = truth(site, by, n)
        print(f"    compiled at chunk {n}: {fp.total} bytes ({fmt_bytes(fp.total)}; args {fmt_bytes(fp.argument)}, temp "
              f"{fmt_bytes(fp.temp)}, out {fp.output} B); line through chunks 2, 8 predicts {pr(n)} ({pr(n) / fp.total - 1:+.2%}); "
              f"its increment over chunk 1 predicted by the analytic guess: {fmt_bytes((n - 1) * ana)} vs compiled "
              f"{fmt_bytes(fp.total - p.predicted(1))}")
    try:
        cj.plan_sweep(model, clean, site, by, budget=512 * 2**20)
    except cj.DoesNotFit as e:
        print(f"    512 MiB budget: DoesNotFit: {e}")

sae = eqx.filter_eval_shape(lambda: cj.init_sae(576, 4608, key=jax.random.key(0), arch="topk", k=32))
n_params = sum(x.size for x in jax.tree.leaves(sae) if hasattr(x, "size"))
for bs, budget in [(4096, None), (4096, 1 * GiB), (4096, 256 * 2**20), (4096, 64 * 2**20)]:
    tc = cj.TrainConfig(n_tokens=50_000_000, batch_size=bs)
    t0 = time.perf_counter()
    try:
        p = cj.plan_training(sae, tc, budget=budget)
        if budget is None:
            p0 = p
        print(f"[{time.perf_counter() - t0:.1f} s] {p}")
        print(f"    measured {p.measured}; largest that fits: {p.limit}")
    except cj.DoesNotFit as e:
        print(f"    budget {fmt_bytes(budget)}: DoesNotFit: {e}")
tc = cj.TrainConfig(n_tokens=50_000_000, batch_size=4096)
step = make_step(tc)
state = eqx.filter_eval_shape(lambda: init_state(cj.init_sae(576, 4608, key=jax.random.key(0), arch="topk", k=32), tc))
for n in (2048, 3072, 8192):
    fp = compiled_footprint(step, state, jax.ShapeDtypeStruct((n, 576), jnp.float32), jax.ShapeDtypeStruct((n, 576), jnp.float32))
    pred = p0.predicted(n)
    ana = 4 * (4 * n_params + 6 * n * 4608)  # dictionaries.memory_check's formula
    print(f"    train step compiled at batch {n}: {fmt_bytes(fp.total)} ({fp.total} B; args {fmt_bytes(fp.argument)}, out "
          f"{fmt_bytes(fp.output)}, temp {fmt_bytes(fp.temp)}); fit predicts {pred} ({pred / fp.total - 1:+.2%}); "
          f"memory_check's analytic need {fmt_bytes(ana)} ({ana / fp.total - 1:+.2%})")
