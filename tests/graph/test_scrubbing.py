"""Causal scrubbing: identity recovers everything, empty nothing, the treeified runs mean what they say,
sampling respects the equivalence rules, and bad hypotheses are refused by name."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_configs

import circuits_jax as cj
from circuits_jax.graph._scrubbing import (Hypothesis, NextTokenLoss, Node, build_tree, identity_hypothesis, sample_trees,
                                     scrub, scrub_losses)  # fmt: skip

CFGS = tiny_configs()


def _setup(name, n_layers=1, n_heads=2, seed=1):
    cfg = dataclasses.replace(CFGS[name], n_layers=n_layers, n_heads=n_heads,
                              **({"n_kv_heads": 1} if CFGS[name].n_kv_heads else {}))  # fmt: skip
    model = cj.init_model(cfg, key=jax.random.key(seed), std=0.3)
    tokens = np.random.default_rng(0).integers(0, cfg.d_vocab, (40, 7)).astype(np.int32)
    return model, tokens


@pytest.mark.slow
@pytest.mark.parametrize("name,layers", [("gpt2like", 1), ("llamalike", 1), ("attn_only", 2)])
def test_identity_recovers_all_and_empty_none(name, layers):
    model, tokens = _setup(name, layers)
    res = scrub(model, tokens, identity_hypothesis(model.cfg), n=24, seed=3, progress=False)
    np.testing.assert_allclose(res.per_tree["identity"], res.per_tree["model"], rtol=1e-4, atol=1e-4)
    assert abs(res.recovered["identity"] - 1.0) < 1e-3
    assert res.empty_loss > res.model_loss  # the random inputs do not predict the reference's tokens
    empty = scrub(model, tokens, Hypothesis((), "nothing"), n=24, seed=3, progress=False)
    assert empty.recovered["nothing"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_empty_is_the_model_on_random_inputs_scored_on_the_reference():
    model, tokens = _setup("gpt2like")
    tree = build_tree(model.cfg, Hypothesis())
    rows = sample_trees(tree, tokens, 16, seed=5)  # [ref, root input (= ref), root random]
    np.testing.assert_array_equal(rows[:, 0], rows[:, 1])
    ref, rand = tokens[rows[:, 0]], tokens[rows[:, 2]]
    want = NextTokenLoss()(cj.run(model, rand).logits, jnp.asarray(ref))
    got = scrub_losses(model, tokens, Hypothesis(), n=16, seed=5, progress=False)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)


def test_direct_path_claim_reads_the_reference_embedding_and_random_heads():
    """Claiming only input->logits (exact tokens): logits = unembed(resid on the random input with its
    embedding swapped for the reference's): the unclaimed heads keep their random-input outputs."""
    model, tokens = _setup("attn_only", 2)
    hyp = Hypothesis((Node("direct", "input->logits"),), "direct")
    tree = build_tree(model.cfg, hyp)
    assert tree.names == ("direct", "output")
    rows = sample_trees(tree, tokens, 12, seed=2)  # ref, in(direct), in(root), rand(direct), rand(root)
    np.testing.assert_array_equal(tokens[rows[:, 1]], tokens[rows[:, 0]])  # exact-token equivalence
    ref, rand = tokens[rows[:, 0]], tokens[rows[:, 4]]
    L = model.cfg.n_layers
    out_r = cj.run(model, rand, cache=["hook_embed", f"blocks.{L - 1}.hook_resid_post"])
    emb_x = cj.run(model, ref, cache=["hook_embed"]).cache["hook_embed"]
    resid = out_r.cache[f"blocks.{L - 1}.hook_resid_post"] - out_r.cache["hook_embed"] + emb_x
    want = NextTokenLoss((-2, -3))(cj.unembed(model, resid), jnp.asarray(ref))
    got = scrub_losses(model, tokens, hyp, NextTokenLoss((-2, -3)), n=12, seed=2, progress=False)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_sampled_inputs_agree_with_their_parents_on_the_feature():
    model, tokens = _setup("attn_only", 2)
    first = lambda t: t[:, :1]  # noqa: E731
    last = lambda t: t[:, -1]  # noqa: E731
    hyp = Hypothesis((
        Node("heads", "a1.h*->logits", feature=first),
        Node("q", "input->a1.h0<q>", parent="heads", feature=last),
        Node("k", "a0.h1->a1.h0<k>, a0.h1->a1.h1<k>", parent="heads", feature=first),
    ))  # fmt: skip
    tree = build_tree(model.cfg, hyp)
    rows = sample_trees(tree, tokens, 200, seed=0)
    I = len(tree.names)
    inputs = rows[:, 1 : 1 + I]
    feats = {"heads": first, "q": last, "k": first}
    for i, name in enumerate(tree.names[:-1]):
        p = tree.parents[i]
        f = feats[name]
        np.testing.assert_array_equal(f(tokens[inputs[:, i]]), f(tokens[inputs[:, p]]))
    assert (inputs[:, tree.names.index("q")] != inputs[:, -1]).any()  # it resamples, not just copies
    assert np.isfinite(scrub_losses(model, tokens, hyp, n=8, progress=False)).all()


def test_bad_hypotheses_are_refused_by_name():
    model, _ = _setup("attn_only", 2)
    cfg = model.cfg
    overlap = Hypothesis((Node("ind", "a1.h0->logits"), Node("ind2", "a1.h*->logits")))
    with pytest.raises(ValueError, match=r"'ind' and 'ind2'.*overlapping sites: a1\.h0->logits"):
        build_tree(cfg, overlap)
    unreachable = Hypothesis((Node("ind", "a1.h0->logits"), Node("prev", "a0.h1->a1.h1<k>", parent="ind")))
    with pytest.raises(ValueError, match=r"'prev' is unreachable from the output.*a1\.h1<k>.*a1\.h0"):
        build_tree(cfg, unreachable)
    with pytest.raises(KeyError, match=r"node 'ind'.*a1\.h1"):
        build_tree(cfg, Hypothesis((Node("ind", "a1.h11->logits"),)))
    with pytest.raises(KeyError, match="unknown parent 'indd'.*ind"):
        build_tree(cfg, Hypothesis((Node("ind", "a1.h0->logits"), Node("q", "input->a1.h0<q>", parent="indd"))))
    with pytest.raises(KeyError, match="no edge"):
        build_tree(cfg, Hypothesis((Node("back", "a1.h0->a0.h1<q>"),)))
    with pytest.raises(ValueError, match="cycle"):
        build_tree(cfg, Hypothesis((Node("a", "a1.h0->logits", parent="b"), Node("b", "a1.h1->logits", parent="a"))))


def test_cli_scrub_refuses_bad_heads_before_training(capsys):
    from circuits_jax.app.cli import main

    assert main(["scrub", "--prev-heads", "7", "--quiet"]) == 2
    assert "--prev-heads '7'" in capsys.readouterr().err
    assert main(["scrub", "--wrong-prev", "-1", "--quiet"]) == 2


def test_induction_features_on_repeated_rows():
    from circuits_jax.graph._scrubbing import (current_token, induction_hypothesis, repeated_dataset, token_at_match,
                                         token_before_match)  # fmt: skip

    t = repeated_dataset(30, n=6, vocab=20, seed=0)
    assert t.shape == (30, 13) and (t[:, 0] == 0).all()
    np.testing.assert_array_equal(token_at_match(t), np.stack([np.full(30, 6), t[:, -1]], 1))  # the answer r_n
    np.testing.assert_array_equal(token_before_match(t), np.stack([np.full(30, 6), current_token(t)], 1))
    with pytest.raises(ValueError, match="row 0: its current token"):
        token_at_match(np.arange(13)[None])
    model, _ = _setup("attn_only", 2)
    tree = build_tree(model.cfg, induction_hypothesis([1], [0, 1]))
    assert set(tree.names) == {"induction", "q", "v", "k", "prev_v", "output"}
    assert tree.claims[tree.names.index("k")].sum() == 2  # a0.h1 -> a1.h0<k>, a1.h1<k>
