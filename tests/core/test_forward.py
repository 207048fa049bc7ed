"""The one forward pass (circuits_jax/core/_forward.py): every consumer sees the same model, and a tap
is a value whose state is threaded functionally.

`Config.embedding_multiplier` is written once, in `core._forward.embed`. A model with multiplier m
must then look, to `run`, a circuit run, `generate` and the replacement model alike, exactly like the
same model with `W_E` scaled by m (untied embeddings, so `W_U` stays) and unlike the model with m = 1.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.core import NO_TAP, Tap, Taps, forward
from circuits_jax.graph import ablated_outputs, circuit_resid

M = 2.5
CFG = cj.Config(d_model=16, n_layers=2, n_heads=4, d_head=4, d_vocab=23, n_ctx=32, d_mlp=32, attn_bias=True,
                mlp_bias=True, unembed_bias=True)  # fmt: skip
TOKENS = jnp.array([[1, 5, 7, 3, 9, 2], [1, 4, 6, 8, 10, 12]], jnp.int32)
CORRUPT = jnp.array([[1, 5, 7, 3, 11, 2], [1, 4, 13, 8, 10, 12]], jnp.int32)
SITES_PER_LAYER = 18  # the sites a plain layer of CFG visits (no split inputs, no per-head result)


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def _differ(a, b):
    assert float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)))) > 1e-3


@pytest.fixture(scope="module")
def models():
    """(multiplier m, W_E scaled by m, m = 1): the last two share one config, hence one compiled program."""
    base = cj.init_model(CFG, key=jax.random.key(0), std=0.3)
    assert not CFG.tied_embeddings
    with_m = cj.Transformer(CFG.replace(embedding_multiplier=M), base.W_E, base.blocks, base.W_U, base.W_pos,
                            base.lnf_w, base.lnf_b, base.b_U)  # fmt: skip
    scaled = cj.Transformer(CFG, M * base.W_E, base.blocks, base.W_U, base.W_pos, base.lnf_w, base.lnf_b, base.b_U)
    return with_m, scaled, base


@pytest.mark.slow
def test_run_sees_the_multiplier(models):
    names = ["hook_embed", "blocks.1.hook_resid_mid"]
    hooks = {"blocks.0.attn.hook_z": cj.Scale(0.5)}
    outs = [cj.run(m, TOKENS, hooks=hooks, cache=names) for m in models]
    _close(outs[0].logits, outs[1].logits)
    _close(outs[0].cache["hook_embed"], M * outs[2].cache["hook_embed"])
    for n in names:
        _close(outs[0].cache[n], outs[1].cache[n])
    _differ(outs[0].logits, outs[2].logits)
    _close(models[0](TOKENS), models[1](TOKENS))  # __call__ is run too
    _close(cj.unembed(models[0], outs[0].resid), outs[0].logits)


@pytest.mark.slow
def test_circuit_runs_see_the_multiplier(models):
    graph = cj.Graph.of(CFG)
    metric = cj.LogitDiff(jnp.array([3, 4]), jnp.array([5, 6]))
    half = graph.mask & (np.random.default_rng(0).random(graph.mask.shape) < 0.5)
    circuits = np.stack([graph.mask, half])
    got = [cj.circuit_metrics(m, TOKENS, CORRUPT, metric, circuits) for m in models]
    _close(got[0], got[1])
    _differ(got[0], got[2])
    _close(got[0][0], metric(cj.run(models[0], TOKENS).logits[:, -1]))  # every edge kept: the clean run
    cut = jnp.asarray(graph.mask & ~half, jnp.float32)
    run_circuit = eqx.filter_jit(circuit_resid)
    resid = [run_circuit(m, TOKENS, None, ablated_outputs(m, TOKENS, CORRUPT), cut) for m in models]
    _close(resid[0], resid[1])
    _differ(resid[0], resid[2])


@pytest.mark.slow
def test_generation_sees_the_multiplier(models):
    gens = [cj.generate(m, TOKENS, 4) for m in models]
    np.testing.assert_array_equal(gens[0].tokens, gens[1].tokens)
    _close(gens[0].logits, gens[1].logits)
    _differ(gens[0].logits, gens[2].logits)
    first = cj.run(models[0], TOKENS).logits[:, -1]  # the prefill's last logits are run's
    _close(gens[0].logits[:, 0], first)


def _transcoders(cfg, width=24, k=4):
    ds = []
    for l in range(cfg.n_layers):
        d = cj.init_sae(cfg.d_model, width, key=jax.random.key(10 + l), arch="topk", k=k,
                        in_site=f"blocks.{l}.ln2.hook_normalized", out_site=f"blocks.{l}.hook_mlp_out")  # fmt: skip
        ds.append(d)
    return cj.stack_transcoders(ds)


@pytest.mark.slow
def test_the_replacement_model_sees_the_multiplier(models):
    ts = _transcoders(CFG)
    forward_ = eqx.filter_jit(cj.replacement_forward)  # one program per config (the last two models share one)
    bare = [forward_(m, ts, TOKENS, freeze_attention=False) for m in models]
    for i in (0, 1):  # logits and feature activations of the bare replacement model
        _close(bare[0][i], bare[1][i])
        _differ(bare[0][i], bare[2][i])
    traces = [cj.trace_replacement(m, ts, TOKENS) for m in models]
    for field in ("logits", "reads", "acts", "errors"):
        _close(getattr(traces[0], field), getattr(traces[1], field))
    _differ(traces[0].reads, traces[2].reads)
    full = [forward_(m, ts, TOKENS, frozen=t.frozen, errors=t.errors) for m, t in zip(models, traces)]
    _close(full[0][0], full[1][0])
    np.testing.assert_allclose(full[0][0], traces[0].logits, atol=1e-4)  # errors added back: the real logits


# ---------------------------------------------------------------- taps


class RecordAndScale(Tap):
    """A user's tap: counts every site it is shown (the carry), records `hook_resid_mid` per layer (the
    ys), and multiplies `hook_mlp_out` by `factor` (a traced leaf)."""

    factor: jax.Array

    def observes(self, kinds):
        return any(k in ("hook_resid_mid", "hook_mlp_out") for k in kinds)

    def rewrites(self, kinds):
        return "hook_mlp_out" in tuple(kinds)

    def enter(self, layer, count, xs):
        return dict(layer=layer, count=count, mid=None)

    def __call__(self, kind, x, st):
        st = {**st, "count": st["count"] + 1}
        if kind == "hook_resid_mid":
            st["mid"] = x
        if kind == "hook_mlp_out":
            x = x * self.factor.astype(x.dtype)
        return x, st

    def leave(self, st):
        return st["count"], st["mid"]


def _expected(model, factor):
    L = model.cfg.n_layers
    factor = jnp.float32(factor)  # an array leaf: one compiled program for every factor
    out = cj.run(model, TOKENS, hooks={f"blocks.{l}.hook_mlp_out": cj.Scale(factor) for l in range(L)},
                 cache=[f"blocks.{l}.hook_resid_mid" for l in range(L)])  # fmt: skip
    return out.logits, jnp.stack([out.cache[f"blocks.{l}.hook_resid_mid"] for l in range(L)])


def test_a_user_tap_records_and_rewrites(models):
    model = models[2]
    tap = RecordAndScale(jnp.float32(0.3))
    out = forward(model, TOKENS, tap=tap, carry=jnp.int32(0))
    logits, mids = _expected(model, 0.3)
    _close(out.logits, logits)
    _close(out.ys, mids)
    assert out.ys.shape == (CFG.n_layers, *TOKENS.shape, CFG.d_model)
    # embed + pos, every layer's sites, the final norm's two: the carry went through all of them in order
    assert int(out.carry) == 2 + SITES_PER_LAYER * CFG.n_layers + 2
    plain = forward(model, TOKENS)
    _close(plain.logits, cj.run(model, TOKENS).logits)
    assert plain.carry is None and plain.ys is None  # NO_TAP threads nothing
    part = forward(model, TOKENS, tap=tap, carry=jnp.int32(0), stop_layer=1, logits=False)
    assert part.logits is None and int(part.carry) == 2 + SITES_PER_LAYER


@pytest.mark.slow
def test_tap_state_is_functional_under_jit_and_vmap(models):
    model = models[2]

    def logits_and_count(factor, tokens):
        out = forward(model, tokens, tap=RecordAndScale(factor), carry=jnp.int32(0))
        return out.logits, out.carry, out.ys

    factors = jnp.array([0.0, 0.3, 2.0], jnp.float32)
    lg, count, ys = jax.jit(jax.vmap(logits_and_count, in_axes=(0, None)))(factors, TOKENS)
    assert lg.shape == (3, *TOKENS.shape, CFG.d_vocab) and ys.shape == (3, CFG.n_layers, *TOKENS.shape, CFG.d_model)
    np.testing.assert_array_equal(count, np.full(3, 2 + SITES_PER_LAYER * CFG.n_layers + 2))
    for i, f in enumerate(factors):
        logits, mids = _expected(model, f)
        _close(lg[i], logits)
        _close(ys[i], mids)
    # vmap over the batch of tokens (one row at a time) gives the batched pass
    rows = jax.vmap(lambda t: logits_and_count(jnp.float32(0.3), t[None])[0][0])(TOKENS)
    _close(rows, _expected(model, 0.3)[0])
    # and a gradient flows into the tap's array
    g = jax.grad(lambda f: logits_and_count(f, TOKENS)[0][:, -1, 3].sum())(jnp.float32(0.3))
    eps = 1e-2
    fd = (_expected(model, 0.3 + eps)[0][:, -1, 3].sum() - _expected(model, 0.3 - eps)[0][:, -1, 3].sum()) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-2, atol=1e-3)


class Affine(Tap):
    """`x * mul + add` at one global site; records what it was shown into its carry."""

    kind: str
    mul: float
    add: float

    def observes(self, kinds):
        return self.kind in tuple(kinds)

    rewrites = observes

    def enter(self, layer, carry, xs):
        return carry

    def __call__(self, kind, x, seen):
        if kind != self.kind:
            return x, seen
        return x * self.mul + self.add, x

    def leave(self, seen):
        return seen, None


def test_taps_compose_in_order(models):
    model = models[2]
    e = cj.run(model, TOKENS, cache=["hook_embed"]).cache["hook_embed"]
    double, plus_one = Affine("hook_embed", 2.0, 0.0), Affine("hook_embed", 1.0, 1.0)
    last = Affine("hook_embed", 1.0, 0.0)  # the identity, recording what reaches it
    a = forward(model, TOKENS, tap=Taps((double, plus_one, last)), logits=False)
    b = forward(model, TOKENS, tap=Taps((plus_one, double, last)), logits=False)
    assert isinstance(a.carry, tuple) and len(a.carry) == 3 and isinstance(a.ys, tuple) and len(a.ys) == 3
    _close(a.carry[0], e)  # each part sees what the ones before it wrote
    _close(a.carry[1], 2 * e)
    _close(a.carry[2], 2 * e + 1)
    _close(b.carry[2], 2 * (e + 1))
    hooked = cj.run(model, TOKENS, hooks=[("hook_embed", cj.Scale(2.0)), ("hook_embed", cj.Add(jnp.ones(CFG.d_model)))])
    _close(a.resid, hooked.resid)  # hooks compose in the same order
    # observes / rewrites are the union of the parts'
    taps = Taps((NO_TAP, double))
    assert taps.observes(["hook_embed"]) and taps.rewrites(["hook_embed"]) and not taps.observes(["attn.hook_result"])
