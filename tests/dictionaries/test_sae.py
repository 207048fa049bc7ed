"""Sparse dictionaries (`circuits_jax.dictionaries._sae`) against hand-computed values on tiny explicit arrays.

Expectations are written out independently in float64 numpy (selection masks are also spelled out
by hand for the designed pre-activations), never with the module's own helpers.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from circuits_jax.dictionaries._sae import (
    SAE,
    CrossLayerTranscoder,
    LossConfig,
    Stats,
    init_clt,
    init_sae,
    jumprelu,
    step,
)

F32 = jnp.float32

# ---------------------------------------------------------------- a tiny hand-designed dictionary
# D = 3, F = 4, N = 2. With in_scale = 1 the pre-activations are (hand-computed)
#   pre = [[0.85, -0.65, 1.65, 0.30],
#          [0.47,  0.75, -0.40, 0.56]]
# chosen so every selection below is unambiguous (no ties, negatives present).
X = np.array([[1.0, -0.5, 2.0], [0.3, 1.2, -0.7]])
Y = np.array([[0.9, -0.2, 0.4], [-0.3, 0.8, 0.1]])
W_ENC = np.array([[0.5, -0.2, 0.8, 0.1], [0.3, 0.9, -0.4, -0.6], [0.2, 0.1, 0.3, -0.5]])
B_ENC = np.array([0.1, -0.2, 0.05, 0.9])
W_DEC = np.array([[0.4, -0.3, 0.2], [0.1, 0.5, -0.6], [-0.7, 0.2, 0.3], [0.25, 0.35, -0.15]])
B_DEC = np.array([0.05, -0.1, 0.2])
PRE = np.array([[0.85, -0.65, 1.65, 0.30], [0.47, 0.75, -0.40, 0.56]])
# jumprelu: bandwidth 0.2 (window |pre - θ| < 0.1); (0,0) and (1,1) inside & active,
# (0,3) inside & inactive, every other entry outside the window.
THETA = np.array([0.8, 0.7, 0.5, 0.35])
EPS = 0.2


def f32(a):
    return jnp.asarray(np.asarray(a), F32)


def make_sae(arch, k=None, threshold=None, in_scale=1.0, out_scale=1.0, w_dec=W_DEC):
    thr = np.zeros(4) if threshold is None else threshold
    return SAE(
        W_enc=f32(W_ENC), b_enc=f32(B_ENC), W_dec=f32(w_dec), b_dec=f32(B_DEC), threshold=f32(thr),
        in_scale=f32(in_scale), out_scale=f32(out_scale), arch=arch, k=k,
    )  # fmt: skip


def as64(a):
    """The float32 values the module sees, in float64."""
    return np.asarray(np.asarray(a, np.float32), np.float64)


def rect(u):
    return (np.abs(u) < 0.5).astype(np.float64)


def reference(arch, mask, *, hp, in_scale=1.0, out_scale=1.0, theta=None, dead=None, w_dec=W_DEC):
    """Loss, stats and gradients of the SAE loss in numpy, given the (hand-derived) kept mask."""
    We, be, Wd, bd = as64(W_ENC), as64(B_ENC), as64(w_dec), as64(B_DEC)
    x, y = as64(X), as64(Y)
    n = x.shape[0]
    xs, yn = x * in_scale, y * out_scale
    pre = xs @ We + be
    M = mask.astype(np.float64)
    a = pre * M
    yh = a @ Wd + bd
    r = yh - yn
    mse = np.mean(np.sum(r**2, -1))
    g_yh = 2 * r / n
    gWd = a.T @ g_yh
    gbd = g_yh.sum(0)
    ga = g_yh @ Wd.T
    gpre = ga * M
    gth = None
    if arch == "relu":
        if hp.l1 == "weighted":
            norms = np.sqrt(np.sum(Wd**2, -1))
            sparsity = np.mean(np.sum(a * norms, -1))
            gpre = gpre + hp.l1_coeff / n * norms * M
            gWd = gWd + hp.l1_coeff / n * (a.sum(0) / norms)[:, None] * Wd
        else:
            sparsity = np.mean(np.sum(a, -1))
            gpre = gpre + hp.l1_coeff / n * M
        loss = mse + hp.l1_coeff * sparsity
    elif arch == "jumprelu":
        th = as64(theta)
        u = (pre - th) / hp.bandwidth
        sparsity = np.mean(np.sum(pre > th, -1))
        loss = mse + hp.l0_coeff * sparsity
        gth = np.sum(ga * (-(th / hp.bandwidth)) * rect(u), 0) + hp.l0_coeff / n * np.sum(-(1 / hp.bandwidth) * rect(u), 0)
    else:  # topk / batchtopk with AuxK
        e = yn - yh  # stop-gradient: a constant here
        sst = np.sum((e - e.mean(0)) ** 2)
        e_hat = np.zeros_like(e)
        sel = []
        for i in range(n):
            cand = [j for j in np.argsort(-pre[i]) if dead is not None and dead[j]][: hp.k_aux]
            sel.append(cand)
            for j in cand:
                e_hat[i] += max(pre[i, j], 0.0) * Wd[j]
        any_dead = dead is not None and bool(np.any(dead))
        aux = np.sum((e - e_hat) ** 2) / sst if any_dead else 0.0
        sparsity = aux
        loss = mse + hp.aux_coeff * aux
        if any_dead:
            g_eh = hp.aux_coeff * (-2) * (e - e_hat) / sst
            for i in range(n):
                for j in sel[i]:
                    v = max(pre[i, j], 0.0)
                    gWd[j] += v * g_eh[i]
                    gpre[i, j] += (g_eh[i] @ Wd[j]) * (pre[i, j] > 0)
    gWe = xs.T @ gpre
    gbe = gpre.sum(0)
    fve = 1 - np.sum(r**2) / np.sum((yn - yn.mean(0)) ** 2)
    stats = dict(
        loss=loss, mse=mse, sparsity=sparsity, l0=np.mean(np.sum(a > 0, -1)), fve=fve, fired=np.any(a > 0, 0)
    )
    grads = dict(W_enc=gWe, b_enc=gbe, W_dec=gWd, b_dec=gbd)
    if gth is not None:
        grads["threshold"] = gth
    return loss, stats, grads


@eqx.filter_jit
def _value_and_grad(sae, x, y, dead, hp):
    return eqx.filter_value_and_grad(lambda m: m.loss(x, y, dead, hp), has_aux=True)(sae)


@eqx.filter_jit
def _aux_grad(sae, x, y, dead, hp):
    return eqx.filter_grad(lambda m: m.loss(x, y, dead, hp)[1].sparsity)(sae)


def run_loss(sae, hp, dead=None):
    dead = jnp.zeros(sae.width, bool) if dead is None else jnp.asarray(dead)
    (loss, stats), grads = _value_and_grad(sae, f32(X), f32(Y), dead, hp)
    return loss, stats, grads


def check(loss, stats, grads, ref, *, min_kept=0.0, check_threshold=False):
    ref_loss, ref_stats, ref_grads = ref
    tol = dict(rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(loss, ref_loss, **tol)
    assert isinstance(stats, Stats)
    for name in ("loss", "mse", "sparsity", "l0", "fve"):
        np.testing.assert_allclose(getattr(stats, name), ref_stats[name], err_msg=name, **tol)
    np.testing.assert_array_equal(stats.fired, ref_stats["fired"])
    np.testing.assert_allclose(stats.min_kept, min_kept, **tol)
    for name, g in ref_grads.items():
        np.testing.assert_allclose(getattr(grads, name), g, err_msg=f"d loss / d {name}", **tol)
    if not check_threshold:
        np.testing.assert_array_equal(grads.threshold, 0.0)
    for leaf in jax.tree_util.tree_leaves(grads):
        assert leaf.dtype == F32 and np.all(np.isfinite(leaf))


def test_designed_pre_activations():
    sae = make_sae("relu")
    np.testing.assert_allclose(sae.pre(f32(X)), PRE, atol=1e-6)
    np.testing.assert_allclose(as64(X) @ as64(W_ENC) + as64(B_ENC), PRE, atol=1e-6)


# ---------------------------------------------------------------- 1. loss values and gradients per arch


@pytest.mark.parametrize("l1", ["weighted", "unit"])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (2.0, 0.5)])
def test_relu_loss_and_grads(l1, scales):
    hp = LossConfig(l1_coeff=0.7, l1=l1)
    in_scale, out_scale = scales
    sae = make_sae("relu", in_scale=in_scale, out_scale=out_scale)
    pre = as64(X) * in_scale @ as64(W_ENC) + as64(B_ENC)
    if scales == (1.0, 1.0):  # hand: ReLU keeps the positive entries of PRE
        np.testing.assert_array_equal(pre > 0, [[1, 0, 1, 1], [1, 1, 0, 1]])
    loss, stats, grads = run_loss(sae, hp)
    ref = reference("relu", pre > 0, hp=hp, in_scale=in_scale, out_scale=out_scale)
    check(loss, stats, grads, ref)


def test_relu_weighted_hand_value():
    """A fully hand-written number: relu, weighted L1, in/out scale 1."""
    hp = LossConfig(l1_coeff=0.7, l1="weighted")  # the same hp as above: no new compile
    a = np.array([[0.85, 0, 1.65, 0.30], [0.47, 0.75, 0, 0.56]])
    yh = a @ W_DEC + B_DEC
    mse = np.mean(np.sum((Y - yh) ** 2, -1))
    norms = np.array([np.sqrt(0.16 + 0.09 + 0.04), np.sqrt(0.01 + 0.25 + 0.36), np.sqrt(0.49 + 0.04 + 0.09),
                      np.sqrt(0.0625 + 0.1225 + 0.0225)])  # fmt: skip
    l1 = ((0.85 * norms[0] + 1.65 * norms[2] + 0.30 * norms[3]) + (0.47 * norms[0] + 0.75 * norms[1] + 0.56 * norms[3])) / 2
    loss, stats, _ = run_loss(make_sae("relu"), hp)
    np.testing.assert_allclose(stats.sparsity, l1, rtol=1e-5)
    np.testing.assert_allclose(loss, mse + 0.7 * l1, rtol=1e-5)
    np.testing.assert_allclose(stats.l0, 3.0)


@pytest.mark.parametrize("k", [1, 2])
def test_topk_loss_and_grads(k):
    hp = LossConfig()
    # hand: k=1 keeps 1.65 (row 0) and 0.75 (row 1); k=2 adds 0.85 and 0.56
    mask = {1: [[0, 0, 1, 0], [0, 1, 0, 0]], 2: [[1, 0, 1, 0], [0, 1, 0, 1]]}[k]
    loss, stats, grads = run_loss(make_sae("topk", k=k), hp)
    check(loss, stats, grads, reference("topk", np.array(mask, bool), hp=hp))
    np.testing.assert_allclose(stats.l0, k)
    np.testing.assert_allclose(stats.sparsity, 0.0)  # no dead latents: no AuxK term


def test_batchtopk_loss_and_grads():
    hp = LossConfig()
    # hand: k=1, N=2 keeps the batch's two largest, 1.65 and 0.85, both in row 0
    mask = np.array([[1, 0, 1, 0], [0, 0, 0, 0]], bool)
    loss, stats, grads = run_loss(make_sae("batchtopk", k=1), hp)
    check(loss, stats, grads, reference("batchtopk", mask, hp=hp), min_kept=0.85)


def test_jumprelu_loss_and_grads():
    hp = LossConfig(l0_coeff=0.3, bandwidth=EPS)
    # hand: active where PRE > THETA
    mask = np.array([[1, 0, 1, 0], [0, 1, 0, 1]], bool)
    np.testing.assert_array_equal(PRE > THETA, mask)
    u = (PRE - THETA) / EPS
    np.testing.assert_array_equal(np.abs(u) < 0.5, [[1, 0, 0, 1], [0, 1, 0, 0]])
    assert np.all(np.abs(np.abs(u) - 0.5) > 0.1)  # far from the window's edges
    loss, stats, grads = run_loss(make_sae("jumprelu", threshold=THETA), hp)
    ref = reference("jumprelu", mask, hp=hp, theta=THETA)
    check(loss, stats, grads, ref, check_threshold=True)
    np.testing.assert_allclose(stats.sparsity, 2.0)
    assert grads.threshold[2] == 0.0  # column 2: nothing in the window
    # column 3: only (0,3) is in the window, and inactive: its d/dθ is still -(θ/ε) g + L0's -(1/ε) c/N
    g03 = ((2 * ((np.where(mask, PRE, 0) @ W_DEC + B_DEC) - Y) / 2) @ W_DEC.T)[0, 3]
    np.testing.assert_allclose(grads.threshold[3], -(0.35 / EPS) * g03 - 0.3 / 2 / EPS, rtol=1e-5)


# ---------------------------------------------------------------- AuxK


@pytest.mark.parametrize(
    "dead, k_aux, selected",
    [
        # hand: dead {0, 3}, k_aux=1: row 0 takes latent 0 (0.85 > 0.30), row 1 latent 3 (0.56 > 0.47)
        ([1, 0, 0, 1], 1, {0, 3}),
        # k_aux=2 over dead {0, 3}: both rows use both (all positive)
        ([1, 0, 0, 1], 2, {0, 3}),
        # only latent 3 dead, k_aux=2 > #dead: the -inf padding must contribute nothing
        ([0, 0, 0, 1], 2, {3}),
        # latent 1 dead: negative in row 0 (ReLU'd to 0), kept by topk in row 1 too
        ([0, 1, 0, 0], 1, {1}),
    ],
)
def test_topk_auxk(dead, k_aux, selected):
    dead = np.array(dead, bool)
    hp1 = LossConfig(aux_coeff=0.25, k_aux=k_aux)
    hp0 = LossConfig(aux_coeff=0.0, k_aux=k_aux)
    mask = np.array([[0, 0, 1, 0], [0, 1, 0, 0]], bool)
    sae = make_sae("topk", k=1)
    loss, stats, grads = run_loss(sae, hp1, dead)
    ref = reference("topk", mask, hp=hp1, dead=dead)
    check(loss, stats, grads, ref)
    assert stats.sparsity > 0

    # the aux term's value by hand for the first case
    if k_aux == 1 and list(dead) == [1, 0, 0, 1]:
        a = np.where(mask, PRE, 0.0)
        e = Y - (a @ W_DEC + B_DEC)
        e_hat = np.stack([0.85 * W_DEC[0], 0.56 * W_DEC[3]])
        aux = np.sum((e - e_hat) ** 2) / np.sum((e - e.mean(0)) ** 2)
        np.testing.assert_allclose(stats.sparsity, aux, rtol=1e-5)
        np.testing.assert_allclose(loss, stats.mse + 0.25 * aux, rtol=1e-5)

    # the aux term's gradient: only into the selected dead latents, never into b_dec (err is stop-gradient).
    # Subtract the gradient without the aux term (hand/numpy: aux_coeff = 0).
    grads0 = reference("topk", mask, hp=hp0, dead=dead)[2]
    diff = type("Diff", (), {n: np.asarray(getattr(grads, n), np.float64) - g for n, g in grads0.items()})
    others = [f for f in range(4) if f not in selected]
    np.testing.assert_allclose(diff.W_dec[others], 0.0, atol=2e-6)
    np.testing.assert_allclose(diff.W_enc[:, others], 0.0, atol=2e-6)
    np.testing.assert_allclose(diff.b_enc[others], 0.0, atol=2e-6)
    np.testing.assert_allclose(diff.b_dec, 0.0, atol=2e-6)
    for f in selected:  # every selected dead latent is positive on some token here
        assert np.abs(diff.W_dec[f]).max() > 1e-4
        assert np.abs(diff.b_enc[f]) > 1e-6
    # and exactly, in the module itself: the gradient of the aux term alone (Stats.sparsity)
    ga = jax.tree_util.tree_map(np.asarray, _aux_grad(sae, f32(X), f32(Y), jnp.asarray(dead), hp1))
    np.testing.assert_array_equal(ga.W_dec[others], 0.0)
    np.testing.assert_array_equal(ga.W_enc[:, others], 0.0)
    np.testing.assert_array_equal(ga.b_enc[others], 0.0)
    np.testing.assert_array_equal(ga.b_dec, 0.0)
    np.testing.assert_array_equal(ga.threshold, 0.0)
    np.testing.assert_allclose(ga.W_dec, diff.W_dec / 0.25, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ga.W_enc, diff.W_enc / 0.25, rtol=1e-4, atol=1e-5)


def test_batchtopk_auxk():
    # hand: dead {1, 3}, k_aux=1: row 0 takes latent 3 (0.30 > -0.65), row 1 latent 1 (0.75 > 0.56)
    dead = np.array([0, 1, 0, 1], bool)
    hp = LossConfig(aux_coeff=0.5, k_aux=1)
    mask = np.array([[1, 0, 1, 0], [0, 0, 0, 0]], bool)
    loss, stats, grads = run_loss(make_sae("batchtopk", k=1), hp, dead)
    check(loss, stats, grads, reference("batchtopk", mask, hp=hp, dead=dead), min_kept=0.85)
    a = np.where(mask, PRE, 0.0)
    e = Y - (a @ W_DEC + B_DEC)
    e_hat = np.stack([0.30 * W_DEC[3], 0.75 * W_DEC[1]])
    np.testing.assert_allclose(stats.sparsity, np.sum((e - e_hat) ** 2) / np.sum((e - e.mean(0)) ** 2), rtol=1e-5)


def test_auxk_zero_without_dead():
    hp = LossConfig(aux_coeff=0.25, k_aux=2)  # as in test_topk_auxk: no new compile
    loss, stats, _ = run_loss(make_sae("topk", k=1), hp, np.zeros(4, bool))
    assert float(stats.sparsity) == 0.0
    np.testing.assert_allclose(loss, stats.mse)


# ---------------------------------------------------------------- 2. straight-through estimators


Z = np.array([[0.85, -0.65, 1.65, 0.30], [0.47, 0.75, -0.40, 0.56], [0.78, 0.66, 0.52, 0.36]])
G = np.array([[0.3, -1.2, 0.5, 2.0], [-0.7, 0.4, 1.1, -0.9], [1.5, 0.25, -0.6, 0.8]])


def _vjp(fn, z, theta, eps, g):
    out, pullback = jax.vjp(lambda z_, t_: fn(z_, t_, eps), f32(z), f32(theta))
    dz, dt = pullback(f32(g))
    return out, dz, dt


@pytest.mark.parametrize("eps", [0.2, 0.05])
def test_jumprelu_straight_through(eps):
    u = (Z - THETA) / eps
    inside = np.abs(u) < 0.5
    assert inside.any() and (~inside).any()
    assert np.all(np.abs(np.abs(u) - 0.5) > 0.05)
    out, dz, dt = _vjp(jumprelu, Z, THETA, eps, G)
    np.testing.assert_allclose(out, Z * (Z > THETA), rtol=1e-6)
    np.testing.assert_allclose(dz, G * (Z > THETA), rtol=1e-6)
    expected = np.zeros(4)
    for n in range(Z.shape[0]):
        for f in range(4):
            if abs((Z[n, f] - THETA[f]) / eps) < 0.5:
                expected[f] += -(THETA[f] / eps) * G[n, f]
    np.testing.assert_allclose(dt, expected, rtol=1e-5, atol=1e-6)
    assert dt.shape == (4,) and dt.dtype == F32


@pytest.mark.parametrize("eps", [0.2, 0.05])
def test_step_straight_through(eps):
    out, dz, dt = _vjp(step, Z, THETA, eps, G)
    np.testing.assert_array_equal(out, (Z > THETA).astype(np.float32))
    np.testing.assert_array_equal(dz, 0.0)
    expected = np.zeros(4)
    for n in range(Z.shape[0]):
        for f in range(4):
            if abs((Z[n, f] - THETA[f]) / eps) < 0.5:
                expected[f] += -(1.0 / eps) * G[n, f]
    np.testing.assert_allclose(dt, expected, rtol=1e-5, atol=1e-6)


def test_straight_through_hand_numbers():
    """eps = 0.2: window |z - θ| < 0.1. Column 0 (θ=0.8): rows 0 (0.85) and 2 (0.78) inside;
    column 1 (θ=0.7): rows 1 (0.75), 2 (0.66); column 2 (θ=0.5): row 2 (0.52); column 3 (θ=0.35): rows 0, 2."""
    _, _, dt = _vjp(step, Z, THETA, 0.2, G)
    np.testing.assert_allclose(dt, [-5 * (0.3 + 1.5), -5 * (0.4 + 0.25), -5 * -0.6, -5 * (2.0 + 0.8)], rtol=1e-5)
    _, _, dt = _vjp(jumprelu, Z, THETA, 0.2, G)
    np.testing.assert_allclose(dt, [-4 * 1.8, -3.5 * 0.65, -2.5 * -0.6, -1.75 * 2.8], rtol=1e-5)


def test_straight_through_under_jit():
    eps = 0.2
    f = jax.jit(jax.grad(lambda t, z: jnp.sum(jumprelu(z, t, eps) * f32(G)) + jnp.sum(step(z, t, eps)), argnums=0))
    dt = f(f32(THETA), f32(Z))
    u = (Z - THETA) / eps
    expected = np.sum(rect(u) * (-(THETA / eps) * G - 1 / eps), 0)
    np.testing.assert_allclose(dt, expected, rtol=1e-5)


# ---------------------------------------------------------------- 3. batchtopk selection and inference


def test_batchtopk_keeps_k_times_n_over_batch():
    # N = 3, F = 4, k = 2: the batch's 6 largest (hand): 9, 8, 7 in row 0; 6, 5 in row 1; 4 in row 2
    pre = np.array([[9.0, 8.0, 7.0, 0.5], [6.0, -1.0, 5.0, 0.1], [1.0, 4.0, -2.0, 3.0]])
    kept = np.array([[1, 1, 1, 0], [1, 0, 1, 0], [0, 1, 0, 0]], bool)
    sae = SAE(
        W_enc=f32(np.eye(4)), b_enc=jnp.zeros(4, F32), W_dec=f32(np.eye(4)), b_dec=jnp.zeros(4, F32),
        threshold=jnp.zeros(4, F32), in_scale=f32(1.0), out_scale=f32(1.0), arch="batchtopk", k=2,
    )  # fmt: skip
    # W_dec = I and y = 0: mse = mean_n ||acts_n||^2, which pins down the kept set
    (_, stats), g = _value_and_grad(sae, f32(pre), jnp.zeros((3, 4), F32), jnp.zeros(4, bool), LossConfig())
    acts = np.where(kept, pre, 0.0)
    assert kept.sum() == 2 * 3 and kept[0].sum() == 3 > 2
    np.testing.assert_allclose(stats.l0, 2.0)
    np.testing.assert_allclose(stats.mse, np.mean(np.sum(acts**2, -1)), rtol=1e-6)
    np.testing.assert_allclose(stats.min_kept, 4.0)
    np.testing.assert_array_equal(stats.fired, [True, True, True, False])
    # gradient of the mse flows exactly to the kept entries (no dead latents: no AuxK term)
    np.testing.assert_allclose(g.b_enc, np.sum(2 * acts / 3, 0), rtol=1e-6)


def test_batchtopk_inference_uses_threshold():
    sae = make_sae("batchtopk", k=1)
    # threshold 0 (never set): behaves like relu
    np.testing.assert_allclose(sae.encode(f32(X)), np.maximum(PRE, 0), atol=1e-6)
    sae = eqx.tree_at(lambda s: s.threshold, sae, jnp.full(4, 0.6, F32))
    expected = np.where(PRE > 0.6, PRE, 0.0)  # hand: [[0.85, 0, 1.65, 0], [0, 0.75, 0, 0]]
    np.testing.assert_allclose(expected, [[0.85, 0, 1.65, 0], [0, 0.75, 0, 0]])
    np.testing.assert_allclose(sae.encode(f32(X)), expected, atol=1e-6)
    # one token's code does not depend on the rest of the batch
    np.testing.assert_allclose(sae.encode(f32(X[1:])), expected[1:], atol=1e-6)
    np.testing.assert_allclose(sae(f32(X)), expected @ W_DEC + B_DEC, atol=1e-6)
    # leading axes
    assert jax.eval_shape(sae.encode, f32(np.stack([X, X]))).shape == (2, 2, 4)


def test_jumprelu_and_topk_inference():
    sae = make_sae("jumprelu", threshold=THETA)
    np.testing.assert_allclose(sae.encode(f32(X)), np.where(PRE > THETA, PRE, 0.0), atol=1e-6)
    sae = make_sae("topk", k=1, out_scale=2.0)
    acts = np.array([[0, 0, 1.65, 0], [0, 0.75, 0, 0]])
    np.testing.assert_allclose(sae.encode(f32(X)), acts, atol=1e-6)
    np.testing.assert_allclose(sae(f32(X)), (acts @ W_DEC + B_DEC) / 2.0, atol=1e-6)
    assert jax.eval_shape(sae.encode, f32(np.stack([X, X, X]))).shape == (3, 2, 4)


# ---------------------------------------------------------------- 4. project


def _stats(min_kept=0.0):
    z = jnp.zeros((), F32)
    return Stats(z, z, z, z, z, jnp.zeros(4, bool), jnp.asarray(min_kept, F32))


def test_project_relu_unit_normalises_decoder_rows():
    sae = make_sae("relu")
    out = sae.project(LossConfig(l1="unit"), _stats())
    norms = np.sqrt(np.sum(W_DEC**2, -1))
    np.testing.assert_allclose(out.W_dec, W_DEC / norms[:, None], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out.W_dec), axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(out.W_enc, sae.W_enc)
    # weighted L1: decoder untouched
    out = sae.project(LossConfig(l1="weighted"), _stats())
    np.testing.assert_array_equal(out.W_dec, sae.W_dec)


def test_project_jumprelu_clips_thresholds():
    sae = make_sae("jumprelu", threshold=np.array([-0.5, 0.0, 1e-7, 0.3]))
    out = sae.project(LossConfig(), _stats())
    np.testing.assert_allclose(out.threshold, [1e-6, 1e-6, 1e-6, 0.3], rtol=1e-6)
    assert out.threshold.dtype == F32


def test_project_batchtopk_threshold_ema():
    hp = LossConfig(threshold_decay=0.9)
    sae = make_sae("batchtopk", k=1)  # threshold 0: first step takes min_kept as is
    out = sae.project(hp, _stats(0.85))
    np.testing.assert_allclose(out.threshold, np.full(4, 0.85), rtol=1e-6)
    out = out.project(hp, _stats(0.5))
    np.testing.assert_allclose(out.threshold, np.full(4, 0.9 * 0.85 + 0.1 * 0.5), rtol=1e-6)
    out = out.project(hp, _stats(2.0))
    np.testing.assert_allclose(out.threshold, np.full(4, 0.9 * (0.9 * 0.85 + 0.1 * 0.5) + 0.1 * 2.0), rtol=1e-6)
    # the EMA's value is what encode then uses
    t = 0.9 * (0.9 * 0.85 + 0.1 * 0.5) + 0.1 * 2.0  # 0.9335: only 1.65 passes
    np.testing.assert_allclose(out.encode(f32(X)), [[0, 0, 1.65, 0], [0, 0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(out.encode(f32(X)), np.where(PRE > t, PRE, 0.0), atol=1e-6)


def test_project_other_archs_leave_thresholds():
    sae = make_sae("topk", k=1)
    out = sae.project(LossConfig(), _stats(0.7))
    np.testing.assert_array_equal(out.threshold, 0.0)
    np.testing.assert_array_equal(out.W_dec, sae.W_dec)


# ---------------------------------------------------------------- 5. cross-layer transcoder

L, DM, FC, NC = 3, 2, 4, 2


def _clt(arch="topk", k=1, in_scale=(1.0, 2.0, 0.5), out_scale=(1.0, 0.5, 3.0), seed=0):
    rng = np.random.default_rng(seed)
    clt = CrossLayerTranscoder(
        W_enc=jnp.zeros((L, DM, FC), F32), b_enc=jnp.zeros((L, FC), F32), W_dec=jnp.zeros((L, L, FC, DM), F32),
        b_dec=jnp.zeros((L, DM), F32), threshold=jnp.zeros((L, FC), F32), in_scale=f32(in_scale),
        out_scale=f32(out_scale), arch=arch, k=k, layers=(4, 5, 6),
    )  # fmt: skip
    params = dict(
        W_enc=rng.normal(size=(L, DM, FC)), b_enc=rng.normal(size=(L, FC)) * 0.3,
        W_dec=rng.normal(size=(L, L, FC, DM)),  # entries t < s are nonzero on purpose: the mask must ignore them
        b_dec=rng.normal(size=(L, DM)) * 0.3,
    )  # fmt: skip
    for name, v in params.items():
        clt = eqx.tree_at(lambda c, n=name: getattr(c, n), clt, f32(v))
    return clt, {n: as64(v) for n, v in params.items()}


_decode = eqx.filter_jit(lambda c, a: c.decode(a))


def _np_decode(acts, W_dec, b_dec):
    n = acts.shape[0]
    y = np.zeros((n, L, DM))
    for t in range(L):
        y[:, t] = b_dec[t]
        for s in range(t + 1):
            y[:, t] += acts[:, s] @ W_dec[s, t]
    return y


def test_clt_decode_ignores_lower_triangle():
    clt, p = _clt()
    assert clt.layers == (4, 5, 6)
    assert clt.in_sites == ["blocks.4.ln2.hook_normalized", "blocks.5.ln2.hook_normalized", "blocks.6.ln2.hook_normalized"]
    assert clt.out_sites[-1] == "blocks.6.hook_mlp_out"
    acts = np.abs(np.random.default_rng(1).normal(size=(NC, L, FC)))
    out_scale = np.array([1.0, 0.5, 3.0])
    expected = _np_decode(acts, p["W_dec"], p["b_dec"]) / out_scale[:, None]
    np.testing.assert_allclose(_decode(clt, f32(acts)), expected, rtol=1e-5, atol=1e-6)
    # leading axes
    out = _decode(clt, f32(np.stack([acts, 2 * acts])))
    assert out.shape == (2, NC, L, DM)
    np.testing.assert_allclose(out[1], _np_decode(2 * acts, p["W_dec"], p["b_dec"]) / out_scale[:, None], rtol=1e-5, atol=1e-6)
    # the lower triangle really is ignored: zeroing it changes nothing
    W0 = p["W_dec"] * np.triu(np.ones((L, L)))[:, :, None, None]
    clt0 = eqx.tree_at(lambda c: c.W_dec, clt, f32(W0))
    np.testing.assert_allclose(_decode(clt0, f32(acts)), _decode(clt, f32(acts)), rtol=1e-6)


def _np_clt_topk(p, x, y, k, in_scale, out_scale):
    pre = np.einsum("nld,ldf->nlf", x * in_scale[:, None], p["W_enc"]) + p["b_enc"]
    acts = np.zeros_like(pre)
    for n in range(pre.shape[0]):
        for l in range(L):
            top = np.argsort(-pre[n, l])[:k]
            acts[n, l, top] = np.maximum(pre[n, l, top], 0)
    yn = y * out_scale[:, None]
    return pre, acts, yn, _np_decode(acts, p["W_dec"], p["b_dec"])


def test_clt_topk_loss():
    in_scale, out_scale = np.array([1.0, 2.0, 0.5]), np.array([1.0, 0.5, 3.0])
    clt, p = _clt(k=2)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(NC, L, DM)), rng.normal(size=(NC, L, DM))
    x, y = as64(x), as64(y)
    pre, acts, yn, yh = _np_clt_topk(p, x, y, 2, in_scale, out_scale)
    mse = np.mean(np.sum((yn - yh) ** 2, (1, 2)))
    Wm = p["W_dec"] * np.triu(np.ones((L, L)))[:, :, None, None]

    # no dead latents: loss = mse
    hp = LossConfig(aux_coeff=0.5, k_aux=1)
    (loss, stats), _ = _value_and_grad(clt, f32(x), f32(y), jnp.zeros((L, FC), bool), hp)
    np.testing.assert_allclose(loss, mse, rtol=1e-5)
    np.testing.assert_allclose(stats.mse, mse, rtol=1e-5)
    np.testing.assert_allclose(stats.l0, np.mean(np.sum(acts > 0, (-1, -2))), rtol=1e-6)
    assert stats.fired.shape == (L, FC)
    np.testing.assert_array_equal(stats.fired, np.any(acts > 0, 0))
    fve = 1 - np.sum((yn - yh) ** 2) / np.sum((yn - yn.mean(0)) ** 2)
    np.testing.assert_allclose(stats.fve, fve, rtol=1e-5)

    # with dead latents: AuxK per source layer on the flattened [N, L*D] error, averaged over layers
    dead = np.zeros((L, FC), bool)
    dead[0, [1, 3]] = True
    dead[2, 0] = True
    e = (yn - yh).reshape(NC, -1)
    sst = np.sum((e - e.mean(0)) ** 2)
    aux = []
    for s in range(L):
        e_hat = np.zeros_like(e)
        for n in range(NC):
            cand = [f for f in np.argsort(-pre[n, s]) if dead[s, f]][:1]
            for f in cand:
                e_hat[n] += max(pre[n, s, f], 0.0) * Wm[s, :, f, :].reshape(-1)
        aux.append(np.sum((e - e_hat) ** 2) / sst if dead[s].any() else 0.0)
    (loss, stats), g = _value_and_grad(clt, f32(x), f32(y), jnp.asarray(dead), hp)
    np.testing.assert_allclose(stats.sparsity, np.mean(aux), rtol=1e-5)
    np.testing.assert_allclose(loss, mse + 0.5 * np.mean(aux), rtol=1e-5)

    # gradients never reach the masked (t < s) decoder blocks
    for s in range(L):
        for t in range(s):
            np.testing.assert_array_equal(g.W_dec[s, t], 0.0)
    assert np.abs(np.asarray(g.W_dec[0, 2])).max() > 0


def test_clt_layer_errors_and_encode():
    in_scale, out_scale = np.array([1.0, 2.0, 0.5]), np.array([1.0, 0.5, 3.0])
    clt, p = _clt(k=1)
    rng = np.random.default_rng(3)
    x, y = as64(rng.normal(size=(NC + 3, L, DM))), as64(rng.normal(size=(NC + 3, L, DM)))
    _, acts, yn, yh = _np_clt_topk(p, x, y, 1, in_scale, out_scale)
    errs, codes, recon = eqx.filter_jit(lambda c, x_, y_: (c.layer_errors(x_, y_), c.encode(x_), c(x_)))(clt, f32(x), f32(y))
    assert errs.shape == (L,)
    expected = np.sum((yn - yh) ** 2, (0, 2)) / np.sum((yn - yn.mean(0)) ** 2, (0, 2))
    np.testing.assert_allclose(errs, expected, rtol=1e-5)
    np.testing.assert_allclose(codes, acts, rtol=1e-5, atol=1e-6)
    assert eqx.filter_eval_shape(lambda c, x_: c.encode(x_), clt, f32(np.stack([x, x]))).shape == (2, NC + 3, L, FC)
    np.testing.assert_allclose(recon, yh / out_scale[:, None], rtol=1e-5, atol=1e-5)


def test_clt_project_zeroes_lower_triangle():
    clt, p = _clt()
    out = clt.project(LossConfig(), Stats(*([jnp.zeros(())] * 5), jnp.zeros((L, FC), bool), jnp.zeros(())))
    np.testing.assert_allclose(out.W_dec, p["W_dec"] * np.triu(np.ones((L, L)))[:, :, None, None], rtol=1e-6)


def test_init_clt_shapes():
    clt = init_clt(DM, FC, [2, 3], key=jax.random.key(1), arch="jumprelu", threshold=0.01)
    assert clt.W_enc.shape == (2, DM, FC) and clt.W_dec.shape == (2, 2, FC, DM)
    assert clt.b_dec.shape == (2, DM) and clt.threshold.shape == (2, FC)
    np.testing.assert_allclose(clt.threshold, 0.01)
    np.testing.assert_array_equal(clt.W_dec[1, 0], 0.0)
    assert all(leaf.dtype == F32 for leaf in jax.tree_util.tree_leaves(clt))


def test_init_sae_shapes():
    sae = init_sae(3, 5, key=jax.random.key(0), arch="topk", k=2, d_out=2, in_site="a", out_site="b")
    assert sae.W_enc.shape == (3, 5) and sae.W_dec.shape == (5, 2) and sae.b_dec.shape == (2,)
    assert sae.is_transcoder and sae.width == 5
    np.testing.assert_allclose(np.linalg.norm(np.asarray(sae.W_dec), axis=-1), 1.0, rtol=1e-5)
    sae = init_sae(3, 4, key=jax.random.key(0), arch="jumprelu", threshold=0.02, b_dec=np.array([1.0, 2.0, 3.0]), out_scale=0.5)
    assert not sae.is_transcoder
    np.testing.assert_allclose(sae.W_enc, np.asarray(sae.W_dec).T)
    np.testing.assert_allclose(sae.threshold, 0.02)
    np.testing.assert_allclose(sae.b_dec, [0.5, 1.0, 1.5])
    assert all(leaf.dtype == F32 for leaf in jax.tree_util.tree_leaves(sae))


# ---------------------------------------------------------------- 6. errors


def test_init_sae_unknown_arch():
    with pytest.raises(ValueError, match=r"unknown architecture 'nope'.*relu, topk, batchtopk, jumprelu"):
        init_sae(3, 4, key=jax.random.key(0), arch="nope")


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("k", [None, 0])
def test_topk_needs_k(arch, k):
    with pytest.raises(ValueError, match=rf"arch='{arch}' needs k >= 1"):
        init_sae(3, 4, key=jax.random.key(0), arch=arch, k=k)
    with pytest.raises(ValueError, match="needs k"):
        init_clt(3, 4, (0, 1), key=jax.random.key(0), arch=arch, k=k)


def test_k_exceeds_width():
    with pytest.raises(ValueError, match="k=5 exceeds the width 4"):
        init_sae(3, 4, key=jax.random.key(0), arch="topk", k=5)


@pytest.mark.parametrize("layers", [(0, 2), (3, 2), (1, 2, 4)])
def test_init_clt_non_contiguous(layers):
    with pytest.raises(ValueError, match="contiguous layers"):
        init_clt(3, 4, layers, key=jax.random.key(0), k=1)


def test_loss_config_bad_l1():
    with pytest.raises(ValueError, match="l1 must be 'weighted' or 'unit'"):
        LossConfig(l1="l2")
