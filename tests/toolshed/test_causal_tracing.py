"""Causal tracing: the vmapped sweep against single hooked runs, its exact identities, spans, errors, CLI."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_configs

import circuits_jax as cj
from circuits_jax.toolshed._causal_tracing import (
    KINDS,
    noise_delta,
    causal_trace,
    default_noise,
    subject_positions,
    window_layers,
)

TOKENS = np.array([3, 7, 1, 12, 5, 9, 2], np.int32)
SPAN = (2, 4)
ANSWER = 4
S, CHUNK = 3, 8  # the same shapes in every test: the compiled sweeps are shared


@pytest.fixture(scope="module")
def model():
    return cj.init_model(tiny_configs()["llamalike"], key=jax.random.key(0), std=0.4)


def _prob(model, tokens, hooks):
    logits = cj.run(model, tokens, hooks=hooks).logits[:, -1]
    return float(jnp.mean(jax.nn.softmax(logits, -1)[:, ANSWER]))


@pytest.mark.slow
@pytest.mark.parametrize("kind,window", [("resid", 1), ("mlp", 2), ("attn", 3)])
def test_vmapped_trace_equals_a_loop_of_single_restorations(model, kind, window):
    L, T, samples, noise = model.cfg.n_layers, len(TOKENS), S, 0.5
    r = causal_trace(model, TOKENS, SPAN, ANSWER, kind=kind, window=window, samples=samples, noise=noise, seed=1, chunk=CHUNK)
    site = KINDS[kind]
    clean = cj.run(model, TOKENS[None], cache=[f"blocks.{l}.{site}" for l in range(L)]).cache
    batch = np.broadcast_to(TOKENS, (samples, T))
    embed = {"hook_embed": cj.Add(noise_delta(jax.random.key(1), samples, T, model.cfg.d_model, SPAN, noise))}
    # the windows written out by hand (Meng et al.: [l - w//2, l + ceil(w/2)) clipped to [0, 3))
    expected_windows = {1: [[0], [1], [2]], 2: [[0], [0, 1], [1, 2]], 3: [[0, 1], [0, 1, 2], [1, 2]]}[window]
    loop = np.zeros((L, T))
    for l in range(L):
        for t in range(T):
            at = (np.arange(T) == t)[None, :, None]
            hooks = {**embed, **{f"blocks.{j}.{site}": cj.Replace(clean[f"blocks.{j}.{site}"], at) for j in expected_windows[l]}}
            loop[l, t] = _prob(model, batch, hooks)
    np.testing.assert_allclose(r.scores, loop, atol=2e-6)
    np.testing.assert_allclose(r.corrupt, _prob(model, batch, embed), atol=2e-6)
    assert np.ptp(r.scores) > 1e-3  # the restorations do something in this model
    assert r.kind == kind and r.window == window and r.scores.shape == (L, T)


def test_no_noise_scores_equal_clean_everywhere(model):
    for kind in KINDS:
        r = causal_trace(model, TOKENS, SPAN, ANSWER, kind=kind, noise=0.0, samples=S, chunk=CHUNK)
        np.testing.assert_allclose(r.scores, r.clean, atol=1e-6)
        np.testing.assert_allclose(r.corrupt, r.clean, atol=1e-6)


@pytest.mark.slow
def test_identities_last_layer_last_token_and_positions_before_the_subject(model):
    r = causal_trace(model, TOKENS, SPAN, ANSWER, kind="resid", samples=S, chunk=CHUNK)
    assert abs(r.corrupt - r.clean) > 1e-3  # the noise matters
    np.testing.assert_allclose(r.scores[-1, -1], r.clean, atol=1e-6)  # the final hidden state restored = the clean run
    for kind in KINDS:  # before the subject the clean and corrupt runs agree (causal): restoring there changes nothing
        rk = causal_trace(model, TOKENS, SPAN, ANSWER, kind=kind, samples=S, chunk=CHUNK)
        np.testing.assert_allclose(rk.scores[:, : SPAN[0]], rk.corrupt, atol=1e-6)
        np.testing.assert_allclose(rk.corrupt, r.corrupt, atol=1e-7)  # same seed, same draws for every kind
    np.testing.assert_allclose(r.indirect_effect, r.scores - r.corrupt)
    assert r.peak()[2] == r.scores.max()


def test_default_noise_is_three_standard_deviations_of_the_embeddings(model):
    assert default_noise(model) == pytest.approx(3 * float(np.std(np.asarray(model.W_E))), rel=1e-5)
    r = causal_trace(model, TOKENS, SPAN, ANSWER, samples=S, chunk=CHUNK)
    assert r.noise == pytest.approx(default_noise(model))


def test_window_clipping_at_the_edges(model):
    assert window_layers(0, 10, 30) == (0, 5)
    assert window_layers(29, 10, 30) == (24, 30)
    assert window_layers(15, 10, 30) == (10, 20)
    assert window_layers(4, 1, 30) == (4, 5)
    assert window_layers(2, 5, 30) == (0, 5)
    # a window wider than the model restores every layer from any centre: all rows agree
    r = causal_trace(model, TOKENS, SPAN, ANSWER, kind="mlp", window=8, samples=S, chunk=CHUNK)
    np.testing.assert_allclose(r.scores, np.broadcast_to(r.scores[:1], r.scores.shape), atol=1e-7)


def test_bad_input(model):
    with pytest.raises(ValueError, match="kind must be one of"):
        causal_trace(model, TOKENS, SPAN, ANSWER, kind="mlp_out")
    with pytest.raises(ValueError, match=r"subject_span \(5, 9\)"):
        causal_trace(model, TOKENS, (5, 9), ANSWER)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        causal_trace(model, TOKENS, SPAN, 99)


class WordTok:
    """A word-level stand-in tokenizer: ' word' and 'word' are different ids, as in BPE."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def _id(self, piece):
        return self.vocab.setdefault(piece, len(self.vocab))

    def encode(self, text, prepend_bos=None):
        return [self._id(w) for w in re.findall(r" ?[^ ]+", text)]

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv[int(i)] for i in ids)


def test_subject_positions_with_and_without_a_leading_space():
    tok = WordTok()
    ids = tok.encode("The Eiffel Tower is in the city of")
    assert subject_positions(tok, ids, "Eiffel Tower") == (1, 3)
    assert subject_positions(tok, ids, " Eiffel Tower ") == (1, 3)
    assert subject_positions(tok, ids, "The Eiffel Tower") == (0, 3)  # at the start: no leading space
    with pytest.raises(ValueError) as e:
        subject_positions(tok, ids, "Big Ben")
    msg = str(e.value)
    assert "'Big Ben' not found" in msg and "' Eiffel', ' Tower'" in msg and "[' Big', ' Ben']" in msg


@pytest.mark.smollm2
def test_trace_fact_cli_on_smollm2(smollm2, tmp_path, capsys):
    from circuits_jax.app.cli import main

    prompt = "The Eiffel Tower is in the city of"
    out = tmp_path / "t"
    assert main(["trace-fact", "--prompt", prompt, "--subject", "Eiffel Tower", "--kinds", "resid", "--samples", "1",
                 "--out", str(out), "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "answer ' Paris'" in printed and "resid peak" in printed
    d = np.load(out / "trace.npz")
    s = d["scores_resid"]
    assert s.shape == (30, 9) and list(d["subject_span"]) == [1, 4]
    assert float(d["clean"]) > 0.5 > float(d["corrupt"])  # SmolLM2 knows it; noising the subject breaks it
    np.testing.assert_allclose(s[-1, -1], float(d["clean"]), atol=1e-5)
    np.testing.assert_allclose(s[:, 0], float(d["corrupt"]), atol=1e-5)  # 'The' comes before the subject
    assert (out / "trace.png").stat().st_size > 10_000 and (out / "trace.json").exists()
    assert main(["trace-fact", "--prompt", prompt, "--subject", "Big Ben", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuits-jax: error: subject 'Big Ben' not found") and "' Tower'" in err
