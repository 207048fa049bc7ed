"""An experiment is a value: every technique takes `(model, task, ...)` and the same `ablation=` choices.

Resample (from the task's corrupt inputs), zero and mean (over a reference set) mean the same thing in
exact patching, AtP / AtP*, integrated gradients, EAP and EAP-IG (both forms), path and edge patching,
circuit evaluation, ACDC and causal scrubbing; zero and mean need no corrupt inputs.
"""

import warnings

import jax
import numpy as np
import pytest
from conftest import tiny_configs

import circuits_jax as cj

CFG = tiny_configs()["llamalike"]


@pytest.fixture(scope="module")
def setup():
    model = cj.init_model(CFG, key=jax.random.key(1), std=0.3)
    rng = np.random.default_rng(0)
    clean = rng.integers(0, CFG.d_vocab, (2, 6)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 5) % CFG.d_vocab
    metric = cj.LogitDiff(np.array([1, 2]), np.array([3, 4]))
    return model, clean, corrupt, metric


@pytest.mark.slow
def test_task_form_equals_explicit_form(setup):
    model, clean, corrupt, metric = setup
    task = cj.Task("t", clean, corrupt, metric)
    a = cj.patch_sweep(model, task, "z", ("layer", "head"), progress=False)
    b = cj.patch_sweep(model, clean, corrupt, metric, "z", ("layer", "head"), progress=False)
    c = cj.patch_sweep(model, clean_tokens=clean, corrupt_tokens=corrupt, metric=metric, site="z", by=("layer", "head"),
                       progress=False)  # fmt: skip
    np.testing.assert_array_equal(a.result, b.result)  # the same program on the same inputs
    np.testing.assert_array_equal(a.result, c.result)
    e1 = cj.edge_attribution(model, task, "eap")
    e2 = cj.edge_attribution(model, clean, corrupt, metric, "eap")
    np.testing.assert_array_equal(e1.scores, e2.scores)
    with pytest.raises(TypeError, match="not both"):
        cj.patch_sweep(model, task, attention_mask=np.ones((2, 6), bool), progress=False)
    with pytest.raises(TypeError, match="missing metric"):
        cj.patch_sweep(model, clean, corrupt)


def test_resample_needs_corrupt_inputs_and_zero_is_noising(setup):
    model, clean, _, metric = setup
    task = cj.Task("no corrupt", clean, None, metric)
    with pytest.raises(ValueError, match="takes values from corrupt inputs.*ablation='zero' or 'mean'"):
        cj.patch_sweep(model, task, progress=False)
    with pytest.raises(ValueError, match="which is noising"):
        cj.edge_attribution(model, task, "eap", ablation="zero", noising=False)
    with pytest.raises(KeyError, match="unknown ablation 'zeros'.*did you mean 'zero'"):
        cj.circuit_metrics(model, task, np.ones(cj.Graph.of(CFG).mask.shape, bool), ablation="zeros")


def test_zero_ablation_sweep_equals_zeroing_each_component(setup):
    model, clean, _, metric = setup
    task = cj.Task("t", clean, None, metric)
    r = cj.patch_sweep(model, task, "z", ("layer", "head"), ablation="zero", progress=False)
    assert r.ablation == "zero" and r.noising
    base = float(metric(cj.run(model, clean).logits[:, -1]))
    assert r.clean_metric == pytest.approx(base, abs=1e-5)
    for layer, head in [(0, 1), (2, 3)]:
        mask = np.zeros((1, 1, CFG.n_heads, 1), bool)
        mask[..., head, :] = True
        hook = cj.Hook("attn.hook_z", layer, cj.Zero(mask=mask))
        want = float(metric(cj.run(model, clean, hooks=[hook]).logits[:, -1]))
        assert r.raw[layer, head] == pytest.approx(want, abs=1e-5)
    # 0 is the site ablated at every layer at once
    every = float(metric(cj.run(model, clean, hooks=[cj.Hook("attn.hook_z", cj.ALL_LAYERS, cj.Zero())]).logits[:, -1]))
    assert r.corrupt_metric == pytest.approx(every, abs=1e-5)


def test_mean_ablation_uses_the_reference_set(setup):
    model, clean, _, metric = setup
    rng = np.random.default_rng(3)
    ref = rng.integers(0, CFG.d_vocab, (5, 7)).astype(np.int32)
    task = cj.Task("t", clean, None, metric, reference=ref)
    r = cj.patch_sweep(model, task, "resid_pre", ("layer",), ablation="mean", progress=False)
    mean = cj.run(model, ref, cache=["blocks.1.hook_resid_pre"]).cache["blocks.1.hook_resid_pre"].mean(axis=(0, 1))
    hook = cj.Hook("hook_resid_pre", 1, cj.Replace(np.broadcast_to(np.asarray(mean), (2, 6, CFG.d_model))))
    want = float(metric(cj.run(model, clean, hooks=[hook]).logits[:, -1]))
    assert r.raw[1] == pytest.approx(want, abs=1e-4)
    other = cj.patch_sweep(model, cj.Task("t", clean, None, metric), "resid_pre", ("layer",), ablation="mean", progress=False)
    assert not np.allclose(r.raw, other.raw)  # the clean batch is the default reference: another mean


@pytest.mark.slow
def test_atp_and_ig_estimate_the_zero_ablation_sweep(setup):
    _, clean, _, metric = setup
    model = cj.init_model(CFG, key=jax.random.key(1), std=0.1)  # small weights: zeroing an MLP is nearly linear
    task = cj.Task("t", clean, None, metric)
    exact = cj.patch_sweep(model, task, "mlp_out", ("layer", "pos"), ablation="zero", progress=False)
    atp = cj.attribution_patch(model, task, "mlp_out", ("layer", "pos"), ablation="zero")
    ig = cj.integrated_gradients(model, task, "mlp_out", ("layer", "pos"), ablation="zero", steps=4)
    star = cj.atp_star(model, task, "k", ("layer", "pos", "head"), ablation="zero")
    assert atp.result.shape == ig.result.shape == exact.result.shape and star.result.shape == (3, 6, 2)
    assert atp.corrupt_metric == pytest.approx(exact.corrupt_metric, abs=1e-5)  # the same 0
    change, est = (exact.raw - exact.clean_metric).ravel(), (atp.raw - atp.clean_metric).ravel()
    assert np.corrcoef(change, est)[0, 1] > 0.95  # AtP is the first-order estimate of the same patches (0.97)
    ig_est = (ig.raw - ig.clean_metric).ravel()
    assert np.corrcoef(change, ig_est)[0, 1] > 0.95  # (0.975)


@pytest.mark.slow
def test_eap_with_zero_ablation_is_the_derivative_of_zero_edge_patching(setup):
    model, clean, _, metric = setup
    task = cj.Task("t", clean, None, metric)
    g = cj.Graph.of(CFG)
    eap = cj.edge_attribution(model, task, "eap", ablation="zero")
    assert eap.ablation == "zero" and eap.noising
    # A central difference, both sides from one edge program: a one-sided difference against the plain run's
    # clean metric divided that program's float32 rounding (a few ulps of a metric ~1) by eps, 1e-3 of error
    # at eps = 1e-3 under another XLA CPU configuration. Here the rounding costs ~1e-5 and the truncation
    # (eps^2 times the third derivative) less than that.
    eps = 1e-2
    for name in ["input->a1.h0<q>", "a0.h2->m1", "m1->logits", "a1.h3->a2.kv1<v>"]:
        i, j = g.edge_index(name)
        w = np.zeros((2, *g.mask.shape), np.float32)
        w[0, i, j], w[1, i, j] = eps, -eps
        up, down = cj.patch_edges(model, task, w, ablation="zero", progress=False)
        fd = (up - down) / (2 * eps)
        assert eap.scores[i, j] == pytest.approx(fd, rel=0.02, abs=2e-4), name
    # 0 is the empty circuit: every edge carrying zero
    empty = cj.circuit_metrics(model, task, np.zeros(g.mask.shape, bool), ablation="zero")[0]
    assert eap.corrupt_metric == pytest.approx(float(empty), abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["eap-ig", "eap-ig-activations"])
def test_eap_ig_runs_with_zero_and_mean_ablation(setup, method):
    model, clean, _, metric = setup
    task = cj.Task("t", clean, None, metric)
    for ablation in ("zero", "mean"):
        s = cj.edge_attribution(model, task, method, ablation=ablation, steps=2)
        assert np.isfinite(s.scores).all() and np.abs(s.scores).max() > 0 and s.ablation == ablation


@pytest.mark.slow
def test_path_patching_and_exact_edges_with_zero_ablation(setup):
    model, clean, _, metric = setup
    task = cj.Task("t", clean, None, metric)
    pp = cj.path_patch(model, task, receivers="logits", ablation="zero", progress=False)
    exact = cj.edge_patch_all(model, task, ablation="zero", progress=False)
    g = cj.Graph.of(CFG)
    for l, h in [(0, 0), (2, 1)]:  # a head's direct path to the logits is the single edge head -> logits
        i, j = g.source_index(f"a{l}.h{h}"), g.destination_index("logits")
        assert pp.raw[l, h] == pytest.approx(exact.scores[i, j] + exact.clean_metric, abs=1e-5)


@pytest.mark.slow
def test_acdc_and_faithfulness_with_zero_ablation_need_no_corrupt_tokens(setup):
    model, clean, _, metric = setup
    c = cj.acdc(model, clean, None, metric, threshold=0.05, ablation="zero", progress=False)  # was a TypeError
    assert c.meta["ablation"] == "zero" and np.isfinite(c.meta["faithfulness"])
    task = cj.Task("t", clean, None, metric)
    f = cj.faithfulness(model, task, cj.edge_attribution(model, task, "eap", ablation="zero"), ablation="zero",
                        ks=(0.1, 1.0))  # fmt: skip
    assert f["f"][-1] == pytest.approx(1.0, abs=1e-5) and f.ablation == "zero"  # every edge kept: the clean run


@pytest.mark.slow
def test_scrubbing_with_zero_ablation():
    cfg = tiny_configs()["gpt2like"].replace(n_layers=1)  # the identity hypothesis grows exponentially with depth
    model = cj.init_model(cfg, key=jax.random.key(1), std=0.3)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.d_vocab, (16, 6)).astype(np.int32)
    ident = cj.identity_hypothesis(cfg)
    r = cj.scrub(model, tokens, {"identity": ident}, n=8, ablation="zero", progress=False)
    assert r.ablation == "zero" and r.recovered["identity"] == pytest.approx(1.0, abs=1e-4)
    assert r.empty_loss != pytest.approx(r.model_loss)


@pytest.mark.slow
def test_a_flat_metric_warns_instead_of_returning_silent_zeros(setup):
    model, clean, corrupt, _ = setup
    kl = cj.KLFrom(cj.run(model, clean).logits[:, -1])  # distance to the clean run: flat there
    task = cj.Task("t", clean, corrupt, kl)
    with pytest.warns(UserWarning, match="gradient is zero at the clean run.*eap-ig"):
        s = cj.edge_attribution(model, task, "eap", noising=True)
    assert np.abs(s.scores).max() < 1e-4 * abs(s.corrupt_metric - s.clean_metric)  # zero up to rounding
    with pytest.warns(UserWarning, match="gradient is zero"):
        cj.attribution_patch(model, task, "z", ("layer", "head"), noising=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cj.edge_attribution(model, task, "eap")  # denoising: taken at the corrupt run, where it is not flat


@pytest.mark.slow
def test_several_scored_positions_per_row(setup):
    model, clean, corrupt, _ = setup
    pos = np.array([[3, 5], [4, 5]])
    answers, wrong = np.array([[1, 2], [3, 4]]), np.array([[5, 6], [7, 8]])
    many = cj.Task("seq", clean, corrupt, cj.LogitDiff(answers, wrong), answer_pos=pos)
    r = cj.patch_sweep(model, many, "resid_pre", ("layer", "pos"), progress=False)
    singles = [cj.patch_sweep(model, cj.Task("one", clean, corrupt, cj.LogitDiff(answers[:, k], wrong[:, k]),
                                             answer_pos=pos[:, k]), "resid_pre", ("layer", "pos"), progress=False)
               for k in range(2)]  # fmt: skip
    np.testing.assert_allclose(r.raw, (singles[0].raw + singles[1].raw) / 2, atol=1e-5)  # LogitDiff: a mean
