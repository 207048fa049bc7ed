"""Steering vectors (ActAdd, CAA, SAE features), compiled coefficient sweeps, perplexity, `circuits-jax steer`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

import circuits_jax as cj
from circuits_jax.toolshed import _steering as S
from circuits_jax.models._tokenizer import Tokenizer
from circuits_jax.app.cli import main

from conftest import tiny_configs

CHARS = ["<bos>", "<eos>"] + list(" abcdefghijklmnopqrstuvwxyz.,")


def _char_tokenizer():
    t = tokenizers.Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="<eos>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    t.decoder = decoders.Fuse()
    return t


@pytest.fixture(scope="module")
def tiny():
    """A llama-like random model with a character tokenizer (BOS prepended by default)."""
    import dataclasses

    cfg = dataclasses.replace(tiny_configs()["llamalike"], d_vocab=len(CHARS), bos_token_id=0, eos_token_id=1, pad_token_id=1,
                              default_prepend_bos=True)  # fmt: skip
    model = cj.init_model(cfg, key=jax.random.key(0), std=0.3)
    return model, Tokenizer(_char_tokenizer(), bos_token_id=0, eos_token_id=1, pad_token_id=1, default_prepend_bos=True)


def _resid(model, tokens, layer, hooks=None, mask=None):
    name = f"blocks.{layer}.hook_resid_pre"
    return cj.run(model, jnp.asarray(tokens), hooks=hooks, cache=[name], attention_mask=mask).cache[name]


def test_zero_vector_changes_nothing(tiny):
    model, tok = tiny
    ids = jnp.asarray([tok.encode("the cat sat")])
    h = S.steering_hook(jnp.zeros(model.cfg.d_model), 1, 3.0, model=model)
    np.testing.assert_array_equal(cj.run(model, ids, hooks=h).logits, cj.run(model, ids).logits)
    a, b = cj.generate(model, ids, 6, hooks=h), cj.generate(model, ids, 6)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-6)
    # and a nonzero vector does change the logits
    h1 = S.steering_hook(jnp.ones(model.cfg.d_model), 1, 3.0, model=model)
    assert not np.allclose(cj.run(model, ids, hooks=h1).logits, cj.run(model, ids).logits, atol=1e-3)


def test_hook_adds_exactly_where_told(tiny):
    model, tok = tiny
    ids = jnp.asarray([tok.encode("a dog ran")])
    D, T = model.cfg.d_model, ids.shape[1]
    v = jax.random.normal(jax.random.key(1), (3, D))
    base = _resid(model, ids, 2)
    got = _resid(model, ids, 2, S.steering_hook(v, 2, 2.0))  # [n, D]: the first n positions
    np.testing.assert_allclose(got[0, :3], base[0, :3] + 2.0 * v, atol=1e-5)
    np.testing.assert_array_equal(got[0, 3:], base[0, 3:])
    u = jnp.arange(D, dtype=jnp.float32)
    got = _resid(model, ids, 2, S.steering_hook(u, 2, -1.0, positions=[1, T - 1]))  # [D] at chosen positions
    np.testing.assert_allclose(got[0, 1], base[0, 1] - u, atol=1e-5)
    np.testing.assert_allclose(got[0, T - 1], base[0, T - 1] - u, atol=1e-5)
    np.testing.assert_array_equal(got[0, 2], base[0, 2])


def test_sweep_equals_loop_of_single_runs(tiny):
    model, tok = tiny
    tokens, mask = tok.to_padded(["the cat", "a dog ran far"], padding_side="right")
    v = jax.random.normal(jax.random.key(2), (model.cfg.d_model,))
    coeffs = jnp.asarray([-4.0, -1.0, 0.0, 0.5, 3.0])

    def metric(logits):
        return jax.nn.log_softmax(logits, -1)[:, 1, 5]  # [B]

    for chunk in (None, 2):
        out = S.steering_sweep(model, tokens, v, 1, coeffs, metric, attention_mask=mask, chunk=chunk)
        assert out.shape == (5, 2)
        loop = [metric(cj.run(model, jnp.asarray(tokens), hooks=S.steering_hook(v, 1, c), attention_mask=jnp.asarray(mask)).logits)
                for c in coeffs]  # fmt: skip
        np.testing.assert_allclose(out, np.stack(loop), rtol=1e-5, atol=1e-5)
    ppl = S.perplexity_sweep(model, tokens, v, 1, coeffs, attention_mask=mask)
    ppl_loop = [S.perplexity(model, tokens, hooks=S.steering_hook(v, 1, c), attention_mask=mask) for c in coeffs]
    np.testing.assert_allclose(ppl, np.stack(ppl_loop), rtol=1e-5)
    assert len(set(np.round(np.asarray(ppl), 4))) == 5  # the coefficients really differ


def test_perplexity_is_exp_of_hand_nll(tiny):
    model, tok = tiny
    tokens, mask = tok.to_padded(["the cat sat", "no"], padding_side="right")
    logp = np.asarray(jax.nn.log_softmax(cj.run(model, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)).logits, -1))
    nll = []
    for b in range(2):
        n = int(mask[b].sum())
        nll += [-logp[b, t, tokens[b, t + 1]] for t in range(n - 1)]
    np.testing.assert_allclose(S.perplexity(model, tokens, attention_mask=mask), np.exp(np.mean(nll)), rtol=1e-5)


def test_actadd_alignment_rule_and_bos(tiny):
    model, tok = tiny
    with pytest.raises(ValueError) as e:
        S.actadd(model, tok, "love", "hate it", 1)
    msg = str(e.value)
    assert "5 tokens" in msg and "8 tokens" in msg and "'l', 'o', 'v', 'e'" in msg and "align='pad'" in msg
    v = S.actadd(model, tok, "love", "hate it", 1, align="pad")
    assert v.shape == (8, model.cfg.d_model)
    np.testing.assert_array_equal(v[0], 0.0)  # BOS row: identical prefix, causal model
    padded = [tok.encode("love") + [tok.to_single_token(" ")] * 3, tok.encode("hate it")]
    acts = _resid(model, np.asarray(padded), 1)
    np.testing.assert_allclose(v, acts[0] - acts[1], atol=1e-6)
    same = S.actadd(model, tok, "love", "hate", 1)  # equal lengths need no alignment
    assert same.shape == (5, model.cfg.d_model)
    with pytest.raises(ValueError, match="align must be"):
        S.actadd(model, tok, "love", "hate", 1, align="left")


def test_bad_layer_site_and_shape(tiny):
    model, tok = tiny
    for bad in (3, -1):
        with pytest.raises(ValueError, match=r"valid layers are 0\.\.2"):
            S.actadd(model, tok, "love", "hate", bad)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        S.steering_sweep(model, [[0, 2, 3]], jnp.ones(16), 7, [1.0], lambda lg: lg.sum())
    with pytest.raises(ValueError, match=r"0\.\.2"):
        S.steering_hook(jnp.ones(16), 3, model=model)
    with pytest.raises(ValueError, match="hook_resid_pre"):  # unknown site: closest names
        S.caa(model, tok, [("a", "b")], 1, site="hook_resid_pr")
    with pytest.raises(ValueError, match=r"blocks\.1\.hook_resid_pre.*\(5,\).*\(1, 3, 16\).*\(16,\)"):
        cj.run(model, jnp.asarray([[0, 2, 3]]), hooks=S.steering_hook(jnp.ones(5), 1))
    with pytest.raises(ValueError, match="at least n tokens"):  # ActAdd vector longer than the prompt
        cj.run(model, jnp.asarray([[0, 2]]), hooks=S.steering_hook(jnp.ones((4, 16)), 1))


def test_caa_equals_hand_computation(tiny):
    model, tok = tiny
    pairs = [("i am happy", "i am sad"), ("so so good", "too bad."), ("yes indeed", "no never")]  # lengths 10 / 8: padded
    v = S.caa(model, tok, pairs, 2)
    diffs = []
    for p, n in pairs:
        a = _resid(model, np.asarray([tok.encode(p)]), 2)[0, -1]
        b = _resid(model, np.asarray([tok.encode(n)]), 2)[0, -1]
        diffs.append(a - b)
    np.testing.assert_allclose(v, np.mean(diffs, 0), atol=1e-5)
    assert v.shape == (model.cfg.d_model,)


@pytest.mark.slow
def test_feature_steering_keeps_only_top_k(tiny):
    model, tok = tiny
    D, F = model.cfg.d_model, 40
    sae = cj.init_sae(D, F, key=jax.random.key(3), arch="topk", k=8, in_site="blocks.1.hook_resid_post")
    pos, neg = ["i love this", "so good"], ["i hate this", "so bad."]

    def mean_lat(texts):
        rows = []
        for t in texts:
            ids = np.asarray([tok.encode(t)])
            lat = sae.encode(cj.run(model, jnp.asarray(ids), cache=["blocks.1.hook_resid_post"]).cache["blocks.1.hook_resid_post"])
            rows.append(lat[0, 1:].mean(0))  # skip BOS
        return np.mean(rows, 0)

    d = mean_lat(pos) - mean_lat(neg)
    bos_lat = sae.encode(cj.run(model, jnp.asarray([[0]]), cache=["blocks.1.hook_resid_post"]).cache["blocks.1.hook_resid_post"])[0, 0]
    d = np.where((np.asarray(bos_lat) <= 0) & (d > 0), d, 0.0)
    assert (d > 0).sum() > 3  # the test is meaningful: more candidates than top_k
    for k in (1, 3):
        keep = np.argsort(-d)[:k]
        kept = np.zeros(F, np.float32)
        kept[keep] = d[keep]
        want = kept @ np.asarray(sae.W_dec)
        got = S.feature_steering(model, tok, sae, pos, neg, top_k=k)
        np.testing.assert_allclose(got, want / np.linalg.norm(want), atol=1e-5)
    one = S.feature_steering(model, tok, sae, pos, neg, top_k=1)
    row = np.asarray(sae.W_dec[int(np.argmax(d))])
    np.testing.assert_allclose(one, row / np.linalg.norm(row), atol=1e-5)
    dense = np.zeros(F, np.float32)
    dense[int(np.argmax(d))] = 0.9  # the best latent declared dense: dropped
    other = S.feature_steering(model, tok, sae, pos, neg, top_k=1, density=dense)
    assert not np.allclose(other, one)
    with pytest.raises(ValueError, match="top_k must be in 1..40"):
        S.feature_steering(model, tok, sae, pos, neg, top_k=0)


@pytest.mark.slow
def test_cli_steer_on_a_saved_tiny_model(tiny, tmp_path, capsys):
    model, tok = tiny
    cj.save_model(tmp_path / "m", model)
    tok.tok.save(str(tmp_path / "m" / "tokenizer.json"))
    out = tmp_path / "out"
    args = ["steer", "--model", str(tmp_path / "m"), "--positive", "love", "--negative", "hate", "--layer", "1",
            "--coeffs=-2,0,2", "--prompt", "the cat sat", "--max-new-tokens", "4", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "coeff +0: the cat sat" in text and "coeff -2:" in text and "coeff +2:" in text
    d = json.loads((out / "steer.json").read_text())
    assert d["coeffs"] == [-2.0, 0.0, 2.0] and len(d["perplexity"]) == 3
    assert (out / "steer.png").stat().st_size > 10_000
    # coefficient 0 generates what the unsteered model does
    plain = cj.generate(model, np.asarray([tok.encode("the cat sat")]), 4).tokens[0]
    assert d["generations"]["0.0"] == tok.decode(np.asarray(plain))
    assert main([*args[:-6], "--prompt", "the cat sat", "--out", str(out), "--positive", "love", "--negative", "hate it",
                 "--max-new-tokens", "4"]) == 2  # fmt: skip
    assert "align='pad'" in capsys.readouterr().err
    assert main([*args, "--layer", "5"]) == 2
    assert "0..2" in capsys.readouterr().err
