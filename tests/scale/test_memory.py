"""Memory planning: the compiled footprint is what the real programs get, the line predicts it,
plans fit their budget and are verified by a compile, and what cannot fit is refused up front."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_configs

import circuits_jax as cj
from circuits_jax import scale as M
from circuits_jax.core import auto_chunk
from circuits_jax.core import score_chunk as _score_chunk
from circuits_jax.dictionaries._sae import init_sae
from circuits_jax.dictionaries._train import TrainConfig, init_state, make_step

B, T = 2, 7


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_configs()["llamalike"]
    return cj.init_model(cfg, key=jax.random.key(0))


def _chunk_args(model, n):
    cfg = model.cfg
    act = (T, cfg.n_heads, cfg.d_head)
    metric = cj.LogitDiff(answer=jnp.zeros(B, jnp.int32), wrong=jnp.zeros(B, jnp.int32))
    L = cfg.n_layers
    arrays = (model, jnp.zeros((B, T), jnp.int32), None, jnp.zeros(B, jnp.int32), jnp.zeros((L, B, T, cfg.d_model)),
              jnp.zeros((L, B, *act)), metric, jnp.int32(0), jnp.zeros((n, 3), jnp.int32))  # fmt: skip
    return arrays, ("attn.hook_z", (0, 1), act)


def test_abstract_compile_is_the_real_programs_footprint(tiny):
    arrays, static = _chunk_args(tiny, 5)
    real = _score_chunk.lower(*arrays, *static).compile().compiled.memory_analysis()
    got = M.compiled_footprint(lambda *a: _score_chunk(*a, *static), *arrays)
    assert got.temp == real.temp_size_in_bytes  # the same program as the sweep's own jit compiles
    # every array passed counts, also those the program never reads (the real compile drops them
    # from its arguments, but they stay on the device: here the unused embedding)
    assert got.argument == M.nbytes(arrays) > real.argument_size_in_bytes
    assert got.total > got.argument > M.nbytes(tiny)


@pytest.mark.slow
def test_sweep_plan_line_predicts_an_unfitted_size_and_fits_its_budget(tiny):
    toks = np.zeros((B, T), np.int32)
    roomy = cj.plan_sweep(tiny, toks, "z", ("layer", "pos", "head"), budget=2**30, max_chunk=10**6)
    n_patches = 3 * T * 4
    assert roomy.size == n_patches and "every patch" in roomy.note  # a generous budget: the whole sweep
    line = M.fit_line(*roomy.measured[:2])  # the line through the first two compiles (chunks 2 and 8)
    arrays, static = _chunk_args(tiny, 40)
    truth = M.compiled_footprint(lambda *a: _score_chunk(*a, *static), *arrays).total
    assert abs(line[0] + 40 * line[1] - truth) < 0.15 * truth  # measured within 9 % on the 5 tiny configs, chunks 1 to 100
    assert dict(roomy.measured)[roomy.size] == roomy.size_bytes

    # a budget between chunk 8 and the line's chunk 20: the plan is compiled and under it
    budget = int(roomy.predicted(20) / 0.8)
    p = cj.plan_sweep(tiny, toks, "z", ("layer", "pos", "head"), budget=budget, max_chunk=10**6)
    assert 8 <= p.size < n_patches and p.size_bytes <= 0.8 * budget
    assert dict(p.measured)[p.size] == p.size_bytes and "chunk of" in str(p)
    capped = cj.plan_sweep(tiny, toks, "z", ("layer", "pos", "head"), budget=2**30)  # 84 patches, CPU cap 64
    assert capped.size == auto_chunk(tiny.cfg, B, T, 2**62) < n_patches and "auto_chunk" in capped.note
    metric = cj.LogitDiff(answer=jnp.zeros(B, jnp.int32), wrong=jnp.ones(B, jnp.int32))
    r = cj.patch_sweep(tiny, toks, toks + 1, metric, "z", ("layer", "pos", "head"), chunk_size=capped.size, progress=False)
    assert r.chunk_size == capped.size and np.isfinite(r.raw).all()


def test_sweep_that_cannot_fit_is_refused_with_its_numbers(tiny):
    toks = np.zeros((B, T), np.int32)
    with pytest.raises(M.DoesNotFit) as e:
        cj.plan_sweep(tiny, toks, "z", ("layer", "pos", "head"), budget=20_000)
    msg = str(e.value)
    one = M.compiled_footprint(lambda *a: _score_chunk(*a, *_chunk_args(tiny, 1)[1]), *_chunk_args(tiny, 1)[0]).total
    assert f"needs {M.fmt_bytes(one)} ({one} bytes" in msg  # the compiled need of one patch
    for s in ("B=2", "T=7", "[3, 2, 7, 16]", "per patch", f"{M.fmt_bytes(16_000)} (80% of {M.fmt_bytes(20_000)})", "'model' axis"):
        assert s in msg, s
    assert isinstance(e.value, MemoryError)


def test_bad_sweep_requests_are_named(tiny):
    toks = np.zeros((B, T), np.int32)
    with pytest.raises(KeyError, match="valid sites"):
        cj.plan_sweep(tiny, toks, "zz", budget=2**30)
    with pytest.raises(KeyError, match="'layer' first"):
        cj.plan_sweep(tiny, toks, "z", ("pos", "layer"), budget=2**30)
    with pytest.raises(ValueError, match=r"\[B, T\] or \[T\].*\(1, 2, 7\)"):
        cj.plan_sweep(tiny, toks[None], budget=2**30)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(7,\), the tokens \(2, 7\)"):
        cj.plan_sweep(tiny, toks, attention_mask=np.ones(7, bool), budget=2**30)
    with pytest.raises(ValueError, match="safety must be in"):
        cj.plan_sweep(tiny, toks, budget=2**30, safety=0)
    with pytest.raises(ValueError, match="budget must be a positive"):
        cj.plan_sweep(tiny, toks, budget=-1)
    with pytest.raises(ValueError, match="two increasing sizes"):
        cj.plan_sweep(tiny, toks, budget=2**30, sizes=(8, 2))


def test_training_plan_keeps_the_configured_batch_or_halves_to_a_power_of_two():
    sae = init_sae(16, 64, key=jax.random.key(0), arch="relu")  # relu: its step compiles 2x faster than topk's
    tc = TrainConfig(n_tokens=100_000, batch_size=1024)
    roomy = cj.plan_training(sae, tc, budget=2**30)
    assert roomy.size == 1024 and roomy.measured[0][0] == 256 and "configured batch size fits" in roomy.note
    state = eqx.filter_eval_shape(init_state, sae, tc)
    x = jax.ShapeDtypeStruct((3000, 16), jnp.float32)
    truth = M.compiled_footprint(make_step(tc), state, x, x).total
    assert abs(roomy.predicted(3000) - truth) < 0.1 * truth  # measured within 0.5 % from 256 to 3000 tokens

    tight = cj.plan_training(sae, tc, budget=int(roomy.predicted(700) / 0.8))
    assert tight.size == 512 and tight.size_bytes <= 0.8 * tight.budget_bytes and "does not fit" in tight.note

    with pytest.raises(M.DoesNotFit) as e:
        cj.plan_training(sae, tc, budget=40_000, sizes=(1, 2))
    msg = str(e.value)
    for s in ("width 64", "per token", "Adam", f"{M.fmt_bytes(32_000)} (80% of {M.fmt_bytes(40_000)})", "smaller width"):
        assert s in msg, s
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        cj.plan_training(sae, tc, budget=2**30, max_batch=0)


def test_device_memory_reads_the_backends_limit_else_the_hosts():
    class Accelerator:
        def memory_stats(self):
            return {"bytes_limit": 80 * 2**30, "bytes_in_use": 5}

    class NoStats:
        def memory_stats(self):
            return None

    assert M.device_memory(Accelerator()) == 80 * 2**30
    host = M.device_memory(NoStats())
    assert host is None or host > 0
    assert M.device_memory() == (M.device_memory(jax.devices()[0]))


@pytest.mark.slow
def test_patch_sweep_chunk_size_plan_runs_the_planned_chunk_and_refuses_what_cannot_fit(tiny):
    model = tiny
    cfg = model.cfg
    rng = np.random.default_rng(0)
    clean = rng.integers(0, cfg.d_vocab, (2, 6)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 1] = (corrupt[:, 1] + 1) % cfg.d_vocab
    metric = cj.LogitDiff(answer=jnp.array([1, 2]), wrong=jnp.array([3, 4]))
    ref = cj.patch_sweep(model, clean, corrupt, metric, "z", ("layer", "pos", "head"), progress=False, chunk_size=4)
    got = cj.patch_sweep(model, clean, corrupt, metric, "z", ("layer", "pos", "head"), progress=False, chunk_size="plan",
                         memory_budget=2**30)  # fmt: skip
    plan = cj.plan_sweep(model, clean, "z", ("layer", "pos", "head"), metric=metric, budget=2**30)
    assert 1 <= got.chunk_size <= plan.size  # the plan's chunk, cut to the patches that change anything
    np.testing.assert_allclose(got.raw, ref.raw, rtol=1e-5, atol=1e-6)
    with pytest.raises(cj.DoesNotFit, match="budget"):
        cj.patch_sweep(model, clean, corrupt, metric, "z", ("layer", "pos", "head"), progress=False, chunk_size="plan",
                       memory_budget=1024)  # fmt: skip
