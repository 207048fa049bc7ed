"""Reality check on CPU: the resident-memory growth of one real score_chunk call vs its compiled temp + output."""
import re
import numpy as np, jax, jax.numpy as jnp
import circuits_jax as cj
from circuits_jax.core import PATCH_SITES, Pairs, Site, score_chunk, site_shape
from circuits_jax.dictionaries import init_state, make_step
from circuits_jax.scale import compiled_footprint, fmt_bytes

def status(key):
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

model, tok = cj.load("smollm2")
clean = np.repeat(np.asarray(tok.to_tokens("When Mary and John went to the store, John gave a drink to")), 8, 0)
corrupt = np.repeat(np.asarray(tok.to_tokens("When Mary and John went to the store, Mary gave a drink to")), 8, 0)
B, T = clean.shape
metric = cj.LogitDiff(answer=jnp.full(B, tok.to_single_token(" Mary")), wrong=jnp.full(B, tok.to_single_token(" John")))
pairs = Pairs(model, cj.as_task(clean, corrupt, metric), noising=False)  # denoising: clean values into the corrupt run
kind, axes = PATCH_SITES["z"]
act = site_shape(Site(kind, 0), model.cfg, B, T)[1:]
source, resid = pairs.site_stack(kind), pairs.resid
for n in (64, 256):
    rows = jnp.asarray(np.stack([np.repeat(np.arange(30), 14 * 9)[:n], np.zeros(n, int), np.zeros(n, int)], 1), jnp.int32)
    args = (model, jnp.asarray(pairs.target_tokens), None, pairs.positions, resid, source, metric, jnp.int32(0), rows)
    call = lambda: jax.block_until_ready(score_chunk(*args, kind, (0, 1), act))
    call()  # compile and warm up
    fp = compiled_footprint(lambda *a: score_chunk(*a, kind, (0, 1), act), *args)
    grow = []
    for _ in range(3):
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = status("VmRSS")
        call()
        grow.append(status("VmHWM") - before)
    print(f"chunk {n}: compiled temp + output {fmt_bytes(fp.temp + fp.output)} ({fp.temp + fp.output} B); "
          f"peak RSS growth during a call {[fmt_bytes(g) for g in grow]} ({grow})")

tc = cj.TrainConfig(n_tokens=50_000_000, batch_size=4096)
state = init_state(cj.init_sae(576, 4608, key=jax.random.key(0), arch="topk", k=32), tc)
step = make_step(tc)
for n in (2048, 4096):
    x = jax.random.normal(jax.random.key(1), (n, 576))
    call = lambda: jax.block_until_ready(step(state, x, x))
    call()
    fp = compiled_footprint(step, state, x, x)
    grow = []
    for _ in range(3):
        open("/proc/self/clear_refs", "w").write("5")
        before = status("VmRSS")
        out = call()
        grow.append(status("VmHWM") - before)
        del out
    print(f"train step batch {n}: compiled temp + output {fmt_bytes(fp.temp + fp.output)} ({fp.temp + fp.output} B); "
          f"peak RSS growth during a call {[fmt_bytes(g) for g in grow]} ({grow})")
