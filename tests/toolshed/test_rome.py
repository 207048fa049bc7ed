"""ROME (circuits_jax.toolshed._rome) on a tiny llama-like model: covariance, the rank-one update, an edit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.toolshed import _rome as R
from conftest import tiny_configs

WORDS = ["<bos>", "<eos>", "<unk>", "the", "tower", "is", "in", "city", "of", "paris", "rome", "a", "big",
         "old", "river", "red", "blue", "green", "cat", "dog", "here", "fact", "x"]  # fmt: skip
BOS, EOS = 0, 1
LAYER = 1


def make_tok():
    import tokenizers

    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return cj.Tokenizer(hf, bos_token_id=BOS, eos_token_id=EOS, default_prepend_bos=True)


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_configs()["llamalike"]
    assert cfg.d_vocab == len(WORDS)
    model = cj.init_model(cfg, key=jax.random.key(0, impl="rbg"), std=0.3)
    tok = make_tok()
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, len(WORDS), size=(12, 10)).astype(np.int32)
    tokens[:, 0] = BOS
    mask = np.ones(tokens.shape, bool)
    mask[3, 6:] = False  # right padding on one row
    count = mask.copy()
    count[:, 0] = False
    cov = R.key_covariance(model, tokens, LAYER, attention_mask=mask, count_mask=count, chunk=5, progress=False)
    return model, tok, tokens, mask, count, cov


def _keys(model, tokens, mask=None):
    site = f"blocks.{LAYER}.mlp.hook_post"
    return np.asarray(cj.run(model, tokens, cache=[site], attention_mask=mask).cache[site], np.float64)


def test_covariance_equals_numpy(setup):
    model, _, tokens, mask, count, cov = setup
    k = _keys(model, tokens, mask)[count]  # [n, M]
    np.testing.assert_allclose(np.asarray(cov), k.T @ k / len(k), rtol=1e-4, atol=1e-7)
    both = R.key_covariance(model, tokens, [0, LAYER], attention_mask=mask, count_mask=count, chunk=5, progress=False)
    assert both.shape == (2, model.cfg.d_mlp, model.cfg.d_mlp)
    np.testing.assert_allclose(np.asarray(both[1]), np.asarray(cov), rtol=1e-4, atol=1e-6)


def test_rank_one_update_exact_and_local(setup):
    model, _, tokens, mask, _, cov = setup
    keys = _keys(model, tokens, mask)[mask]
    k_star = keys[7]
    v_star = np.random.default_rng(1).normal(size=model.cfg.d_model).astype(np.float32)
    W = model.blocks.W_out[LAYER]
    u, Lam = R.rank_one_update(cov, k_star, v_star, W, lam=1e-2)
    new = R.apply_rank_one(model, LAYER, u, Lam)
    W2 = np.asarray(new.blocks.W_out[LAYER], np.float64)
    # k* maps to v* exactly
    np.testing.assert_allclose(k_star @ W2, v_star, rtol=1e-4, atol=1e-4)
    # the update has rank one and only layer LAYER changed
    s = np.linalg.svd(W2 - np.asarray(W, np.float64), compute_uv=False)
    assert s[1] < 1e-5 * s[0]
    for l in range(model.cfg.n_layers):
        if l != LAYER:
            np.testing.assert_array_equal(np.asarray(new.blocks.W_out[l]), np.asarray(model.blocks.W_out[l]))
    # a key orthogonal to C_r^{-1} k* keeps its output (an unrelated corpus key with u projected out)
    u64 = np.asarray(u, np.float64)
    k = keys[30] - (keys[30] @ u64) / (u64 @ u64) * u64
    np.testing.assert_allclose(k @ W2, k @ np.asarray(W, np.float64), rtol=1e-4, atol=1e-5)
    # the change at any key is (k . u) Lambda: small for keys that are far from k* in the C^{-1} metric
    k_other = keys[30]
    np.testing.assert_allclose(k_other @ W2 - k_other @ np.asarray(W, np.float64), (k_other @ u64) * Lam, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_rome_edit_changes_the_association(setup):
    model, tok, _, _, _, cov = setup
    prompt = "{} is in the city of"
    ids = tok.to_tokens(prompt.format("the old tower"))
    old = " " + WORDS[int(jnp.argmax(model(ids)[0, -1]))]  # the tiny model's own answer
    new_answer = " rome" if old != " rome" else " paris"
    req = dict(prompt=prompt, subject="the old tower", target_new=new_answer)
    case = dict(req, target_true=old, paraphrase_prompts=["{} is here in the city of"],
                neighborhood_prompts=[("the red dog is in the city of", old)])  # fmt: skip
    new, info = R.rome_edit(model, tok, req, LAYER, cov, prefixes=("",), steps=20, lr=1.0,
                            clamp=1e3, weight_decay=0.0, kl_weight=0.0)  # fmt: skip
    # the edited MLP maps k* to v* exactly
    v = np.asarray(info.k_star, np.float64) @ np.asarray(new.blocks.W_out[LAYER], np.float64)
    np.testing.assert_allclose(v, info.v_star, rtol=1e-4, atol=1e-4)
    assert info.nll[-1] < info.nll[0] - 1.0
    ev = R.evaluate_edit(model, new, tok, case)
    assert ev["pre"]["p_new"] < ev["pre"]["p_true"]  # before: the old answer wins
    assert ev["post"]["p_new"] > ev["post"]["p_true"] and ev["efficacy"] == 1.0  # after: the new one


def test_errors(setup):
    model, tok = setup[:2]
    with pytest.raises(ValueError, match="not found in the prompt"):
        R.subject_key(model, tok, ["the tower is in the city of"], "the red dog", LAYER)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\]"):
        R.subject_key(model, tok, ["the tower is in"], "the tower", 7)
    with pytest.raises(ValueError, match="must contain"):
        R.compute_value(model, tok, dict(prompt="no slot", subject="x", target_new=" rome"), LAYER, np.zeros(24))
    with pytest.raises(ValueError, match="cov has shape"):
        R.rome_edit(model, tok, dict(prompt="{} is in", subject="the tower", target_new=" rome"), LAYER, np.eye(3))


def test_smollm2_subject_positions(smollm2):
    model, tok = smollm2
    ids, i = R.locate_subject(tok, "Here is a fact. The Eiffel Tower is in the city of", "The Eiffel Tower")
    assert tok.decode([ids[i]]) == " Tower" and tok.decode([ids[i + 1]]) == " is"
    with pytest.raises(ValueError, match=r"not found in the prompt.*'iffel'"):
        R.locate_subject(tok, "The Eiffel Tower is in", "The Louvre")
    with pytest.raises(ValueError, match=r"not found in the prompt.*' Tow'"):  # " Tower" is one token: no subject ends inside it
        R.locate_subject(tok, "The Eiffel Tower is in", "The Eiffel Tow")
