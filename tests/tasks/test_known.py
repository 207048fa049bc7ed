"""Models with known circuits: the trained induction model and the hand-built ones.

The truth of a hand-built model must be exact: every edge outside it changes nothing, every edge in
it changes the metric a lot. The trained model's truth comes from attention patterns alone and must
be faithful and made of edges that matter.
"""

import jax
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.tasks import known
BUILDERS = [known.constructed_induction, known.marker_lookup, known.modular_sum]


def _last_logits(model, tokens):
    return np.asarray(cj.run(model, tokens).logits[:, -1])


def _metrics(model, task, circuits):
    return cj.circuit_metrics(model, task.clean, task.corrupt, task.metric, np.stack(circuits),
                              ablation=task.truth_ablation, **task.kwargs)  # fmt: skip


def _without_each(mask, edges):
    """One circuit per edge: `mask` with that edge removed."""
    out = np.repeat(mask[None], len(edges), axis=0)
    out[np.arange(len(edges)), edges[:, 0], edges[:, 1]] = False
    return out


# ---------------------------------------------------------------------------
# Hand-built models
# ---------------------------------------------------------------------------


@pytest.mark.slow_after_first
@pytest.mark.parametrize("build", BUILDERS, ids=lambda f: f.__name__)
def test_constructed_truth_is_exact(build):
    model, task = build()
    g = cj.Graph.of(model.cfg)
    truth = task.truth
    assert truth.shape == g.mask.shape and not (truth & ~g.mask).any() and truth.sum() == 5
    assert task.truth_ablation == "patching" and task.notes
    np.testing.assert_array_equal(_last_logits(model, task.clean).argmax(-1), task.answers)
    np.testing.assert_array_equal(_last_logits(model, task.corrupt).argmax(-1), task.wrong)

    rng = np.random.default_rng(0)
    supersets = [truth | (g.mask & (rng.random(g.mask.shape) < q)) for q in (0.2, 0.5, 0.8)]
    full, kept, empty, *sup = _metrics(model, task, [g.mask, truth, np.zeros_like(truth), *supersets])
    gap = full - empty
    assert gap > 10  # clean +10, corrupt -10 in logit difference
    np.testing.assert_allclose([kept, *sup], full, atol=1e-5 * gap)

    s, d = np.nonzero(g.mask)
    edges = np.stack([s, d], 1)
    removed = (_metrics(model, task, list(_without_each(g.mask, edges))) - full) / gap
    in_truth = truth[s, d]
    np.testing.assert_allclose(removed[~in_truth], 0.0, atol=1e-5)  # every other edge: nothing at all
    assert (removed[in_truth] < -0.4).all(), dict(zip(np.asarray(g.edges())[in_truth], removed[in_truth]))


def test_constructed_models_list_and_bad_edge_names():
    pairs = known.constructed_models()
    assert [t.name for _, t in pairs] == ["constructed_induction", "marker_lookup", "modular_sum"]
    assert any(not m.cfg.attn_only for m, _ in pairs)
    with pytest.raises(KeyError, match="does not come before"):
        known.truth_mask(pairs[0][0].cfg, ["a1.h0->a0.h0<v>"])


# ---------------------------------------------------------------------------
# The trained induction model
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    model, info = known.induction_model(0)
    return model, info, known.induction_task(model, info)


@pytest.mark.slow
def test_benchmark_tasks_name_every_model(trained):
    model, info, task = trained
    tasks = known.benchmark_tasks(trained=(model, info))
    assert list(tasks) == ["induction", "constructed_induction", "marker_lookup", "modular_sum"]
    m, t = tasks["induction"]
    assert m is model and (t.truth == task.truth).all() and (t.clean == task.clean).all()


@pytest.mark.slow
def test_training_is_reproducible_from_the_seed():
    (m1, i1), (m2, i2) = known.induction_model(5, steps=100), known.induction_model(5, steps=100)
    for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(i1["prev_token_scores"], i2["prev_token_scores"])
    assert i1["induction_heads"] == i2["induction_heads"] and i1["loss"] == i2["loss"]
    m3, _ = known.induction_model(6, steps=100)
    assert not np.array_equal(np.asarray(m1.W_E), np.asarray(m3.W_E))


@pytest.mark.slow
def test_trained_model_has_previous_token_and_induction_heads(trained):
    model, info, task = trained
    assert info["accuracy"] > 0.99 and info["loss"] < 0.01
    P, I = info["prev_token_heads"], info["induction_heads"]
    assert len(P) >= 1 and len(I) >= 1
    assert (info["prev_token_scores"][P] > 0.85).all() and (info["induction_scores"][I] > 0.5).all()
    # the identification is the attention pattern itself: recomputing it gives the same scores
    again = known.head_scores(model, seed=0)
    np.testing.assert_allclose(again["induction_scores"], info["induction_scores"])
    # the task: induction answers the clean prompts, the shuffled first copy flips the logit difference
    assert (_last_logits(model, task.clean).argmax(-1) == task.answers).mean() > 0.9
    assert (_last_logits(model, task.corrupt).argmax(-1) == task.wrong).mean() > 0.9


@pytest.mark.slow
def test_trained_truth_is_faithful_and_each_edge_matters(trained):
    model, info, task = trained
    g = cj.Graph.of(model.cfg)
    truth = task.truth
    assert not (truth & ~g.mask).any()
    assert truth.sum() == len(known.induction_edges(info["prev_token_heads"], info["induction_heads"]))
    full, kept, empty = _metrics(model, task, [g.mask, truth, np.zeros_like(truth)])
    gap = full - empty
    assert full > 0 > empty
    faith = (kept - empty) / gap
    assert 0.9 < faith < 1.1, faith

    s, d = np.nonzero(truth)
    removed = (_metrics(model, task, list(_without_each(g.mask, np.stack([s, d], 1)))) - full) / gap
    assert (removed < -0.02).all(), removed

    # edges that provably carry nothing here: the scored position's own inputs are the same in both prompts
    idle = [g.edge_index("input->logits")] + [g.edge_index(f"input->a1.h{h}<q>") for h in range(model.cfg.n_heads)]
    removed = _metrics(model, task, list(_without_each(g.mask, np.asarray(idle))))
    np.testing.assert_allclose(removed, full, atol=1e-5 * gap)
