"""Feature dashboards: activations, statistics, selection, direct logit effects and the HTML page."""

import re
from html.parser import HTMLParser

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.dictionaries._dashboard import (
    dashboard_data,
    direct_logit_effects,
    feature_activations,
    feature_stats,
    select_features,
    write_dashboards,
)
from circuits_jax.dictionaries._sae import init_sae

from conftest import tiny_configs

WORDS = ["<bos>", "<unk>", "<b>", "cat", "dog", "a b", "x\ny", *[f"w{i}" for i in range(16)]]  # 23 = d_vocab
BOS, TAG, TARGET, HALF = 0, 2, 3, 4  # the planted feature fires on "cat" (2.0) and "dog" (0.8)
F, PLANTED, TAGGED = 6, 2, 0  # feature TAGGED fires on "<b>"
SHOWN = [PLANTED, TAGGED, 5]
N, T = 11, 16  # 11 rows in batches of 4: the last batch is padded


def _key(seed):
    return jax.random.key(seed, impl="rbg")  # compiles much faster on CPU than threefry


@pytest.fixture(scope="module")
def tok():
    import tokenizers

    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    return cj.Tokenizer(hf, bos_token_id=BOS)


@pytest.fixture(scope="module")
def setup():
    """A llama-like model (RMSNorm, RoPE: no position embedding, so blocks.0.hook_resid_pre is
    W_E[token]) whose embedding dimension 0 is 2.0 for "cat", 0.8 for "dog" and 0 otherwise, and
    a JumpReLU SAE there whose feature PLANTED reads dimension 0 with threshold 0.5 and whose
    feature TAGGED reads the "<b>" embedding (activation 1 on it, threshold 0.9)."""
    cfg = tiny_configs()["llamalike"]
    model = cj.init_model(cfg, key=_key(0), std=0.3)
    W_E = np.array(model.W_E)
    W_E[:, 0] = 0.0
    W_E[TARGET, 0], W_E[HALF, 0] = 2.0, 0.8
    lnf_w = np.random.default_rng(1).uniform(0.5, 1.5, cfg.d_model).astype(np.float32)
    model = eqx.tree_at(lambda m: (m.W_E, m.lnf_w), model, (jnp.asarray(W_E), jnp.asarray(lnf_w)))
    sae = init_sae(cfg.d_model, F, key=_key(2), arch="jumprelu", threshold=0.5, in_site="blocks.0.hook_resid_pre",
                   out_scale=2.0)  # fmt: skip
    W_enc, thr = np.array(sae.W_enc), np.array(sae.threshold)
    W_enc[:, PLANTED] = np.eye(cfg.d_model, dtype=np.float32)[0]
    W_enc[:, TAGGED] = W_E[TAG] / np.sum(W_E[TAG] ** 2)
    thr[TAGGED] = 0.9
    sae = eqx.tree_at(lambda s: (s.W_enc, s.threshold), sae, (jnp.asarray(W_enc), jnp.asarray(thr)))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, len(WORDS), size=(N, T)).astype(np.int32)
    tokens[:, 0] = BOS
    tokens[0, 0] = TARGET  # a first token is never scored, even when the feature fires on it
    tokens[3, 5:8] = [TAG, 5, 6]  # "<b>", "a b", "x\ny"
    return model, sae, tokens


@pytest.fixture(scope="module")
def data(setup, tok):
    model, sae, tokens = setup
    return dashboard_data(model, tok, sae, tokens, SHOWN, n_top=4, window=(3, 2), n_logits=5, batch_size=4)


def _encode(sae, x):
    pre = x * float(sae.in_scale) @ np.asarray(sae.W_enc, np.float64) + np.asarray(sae.b_enc, np.float64)
    return pre * (pre > np.asarray(sae.threshold, np.float64))


def test_activations_match_by_hand_and_skip_the_first_token(setup):
    model, sae, tokens = setup
    acts = feature_activations(model, sae, tokens, batch_size=4)
    assert acts.shape == (N, T, F) and acts.dtype == np.float32
    want = _encode(sae, np.asarray(model.W_E, np.float64)[tokens])  # resid_pre of layer 0 (no positions)
    want[:, 0] = 0.0
    np.testing.assert_allclose(acts, want, rtol=1e-4, atol=1e-5)
    planted = acts[..., PLANTED]
    body = tokens[:, 1:]
    np.testing.assert_allclose(planted[:, 1:], np.where(body == TARGET, 2.0, np.where(body == HALF, 0.8, 0.0)), atol=1e-5)
    assert planted[0, 0] == 0.0  # "cat" at position 0: not scored
    sub = feature_activations(model, sae, tokens, features=SHOWN, batch_size=4)
    np.testing.assert_allclose(sub, acts[..., SHOWN], rtol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        feature_activations(model, sae, tokens, features=[F])


def test_transcoder_reads_its_input_site(setup):
    model, _, tokens = setup
    cfg = model.cfg
    tc = init_sae(cfg.d_model, 8, key=_key(4), arch="relu", in_site="blocks.1.ln2.hook_normalized",
                  out_site="blocks.1.hook_mlp_out")  # fmt: skip
    acts = feature_activations(model, tc, tokens[:5, :7], batch_size=2)
    x = np.asarray(cj.run(model, tokens[:5, :7], cache=[tc.in_site]).cache[tc.in_site], np.float64)
    pre = x @ np.asarray(tc.W_enc, np.float64)
    want = np.maximum(pre, 0.0)
    want[:, 0] = 0.0
    np.testing.assert_allclose(acts, want, rtol=1e-4, atol=1e-5)


def test_direct_logit_effects_centre_under_layernorm():
    cfg = tiny_configs()["gpt2like"]
    model = jax.eval_shape(lambda: cj.init_model(cfg, key=_key(3)))  # shapes only: fill with numpy
    rng = np.random.default_rng(3)
    model = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), model)
    tc = init_sae(cfg.d_model, 8, key=_key(4), arch="relu", in_site="blocks.1.ln2.hook_normalized",
                  out_site="blocks.1.hook_mlp_out", out_scale=0.5)  # fmt: skip
    v = np.asarray(tc.W_dec, np.float64)[[1, 5]] / 0.5
    v = (v - v.mean(-1, keepdims=True)) * np.asarray(model.lnf_w, np.float64)
    np.testing.assert_allclose(direct_logit_effects(model, tc, [1, 5]), v @ np.asarray(model.W_U, np.float64), rtol=1e-6)
    # an SAE on the MLP's (normalised) input does not write to the stream
    sae = init_sae(cfg.d_model, 8, key=_key(4), arch="relu", in_site="blocks.1.ln2.hook_normalized")
    assert direct_logit_effects(model, sae, [0]) is None


def test_stats_and_selection(setup):
    model, sae, tokens = setup
    acts = feature_activations(model, sae, tokens, batch_size=4)
    stats = feature_stats(model, sae, tokens, batch_size=4)
    assert stats["n_tokens"] == N * (T - 1)
    np.testing.assert_array_equal(stats["n_active"], (acts[:, 1:] > 0).sum((0, 1)))
    np.testing.assert_allclose(stats["max_act"], acts.max((0, 1)), rtol=1e-6)
    body = tokens[:, 1:]
    assert stats["density"][PLANTED] == pytest.approx(np.mean((body == TARGET) | (body == HALF)))

    dens = stats["density"]
    live = np.flatnonzero(dens > 0)
    top = select_features(stats, "top_density", n=3)
    assert top == [int(f) for f in live[np.argsort(-dens[live], kind="stable")][:3]]
    assert select_features(stats, "top_max", n=1) == [int(np.argmax(stats["max_act"]))]
    fake = {"density": np.array([0.0, 0.2, 0.0, 0.9, 0.05, 0.3]), "max_act": np.ones(6)}
    assert select_features(fake, n=10) == [3, 5, 1, 4]  # dead features never chosen
    assert select_features(fake, n=10, max_density=0.5) == [5, 1, 4]
    r = select_features(fake, "random", n=2, seed=7)
    assert r == select_features(fake, "random", n=2, seed=7) and set(r) <= {1, 3, 4, 5} and r == sorted(r)
    assert select_features(fake["density"], [4, 0]) == [4, 0]
    with pytest.raises(ValueError, match="out of range"):
        select_features(fake, [6])
    with pytest.raises(ValueError, match="how must be"):
        select_features(fake, "densest")


def test_dashboard_data(setup, data):
    model, sae, tokens = setup
    assert [d["feature"] for d in data] == SHOWN
    d = data[0]
    body = tokens[:, 1:]
    active = (body == TARGET) | (body == HALF)
    assert d["n_tokens"] == N * (T - 1) and d["n_active"] == active.sum()
    assert d["density"] == pytest.approx(active.mean())
    assert d["max_act"] == pytest.approx(2.0, abs=1e-5)
    # top contexts: one per row, best first, each around the row's max ("cat" where there is one)
    ctx = d["contexts"]
    assert len(ctx) == min(4, int(np.any(active, 1).sum()))
    assert len({c["row"] for c in ctx}) == len(ctx)
    assert [c["max_act"] for c in ctx] == sorted((c["max_act"] for c in ctx), reverse=True)
    assert ctx[0]["tokens"][ctx[0]["max_index"]] == "cat" and tokens[ctx[0]["row"], ctx[0]["pos"]] == TARGET
    for c in ctx:
        row = tokens[c["row"]]
        best = TARGET if np.any(row[1:] == TARGET) else HALF
        assert row[c["pos"]] == best and c["pos"] > 0
        assert c["ids"][c["max_index"]] == best and c["tokens"][c["max_index"]] == WORDS[best]
        assert c["acts"][c["max_index"]] == pytest.approx(c["max_act"]) == pytest.approx(2.0 if best == TARGET else 0.8)
        assert c["ids"] == row[max(0, c["pos"] - 3) : c["pos"] + 3].tolist()
        assert len(c["tokens"]) == len(c["acts"]) == len(c["ids"])
    # histogram of the nonzero activations
    assert d["hist_counts"].sum() == d["n_active"]
    assert len(d["hist_edges"]) == len(d["hist_counts"]) + 1
    assert d["hist_edges"][0] == pytest.approx(0.8, abs=1e-5) and d["hist_edges"][-1] == pytest.approx(2.0, abs=1e-5)
    # direct logit effects: (W_dec[f] / out_scale * lnf_w) @ W_U, sorted, the extremes
    for dd in data:
        v = np.asarray(sae.W_dec[dd["feature"]], np.float64) / 2.0 * np.asarray(model.lnf_w, np.float64)
        eff = v @ np.asarray(model.W_U, np.float64)
        up, down = [r["value"] for r in dd["top_logits"]], [r["value"] for r in dd["bottom_logits"]]
        assert len(up) == len(down) == 5
        assert up == sorted(up, reverse=True) and down == sorted(down)
        np.testing.assert_allclose(up, np.sort(eff)[::-1][:5], rtol=1e-6)
        np.testing.assert_allclose(down, np.sort(eff)[:5], rtol=1e-6)
        assert [r["id"] for r in dd["top_logits"]] == np.argsort(-eff)[:5].tolist()
        assert all(r["token"] == WORDS[r["id"]] for r in dd["top_logits"] + dd["bottom_logits"])


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.links, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "a" and "href" in a:
            self.links.append(a["href"])

    def handle_data(self, data):
        self.text.append(data)


def test_write_dashboards(data, tmp_path):
    assert any("<b>" in c["tokens"] for c in data[1]["contexts"])
    path = write_dashboards(tmp_path / "sub" / "dash.html", data, title="tiny <SAE> & co")
    assert path.exists()
    page = path.read_text(encoding="utf-8")
    p = _Collect()
    p.feed(page)
    p.close()
    assert p.sections == [f"f{f}" for f in SHOWN]
    assert [h for h in p.links if h != "#index"] == [f"#f{f}" for f in SHOWN]
    assert "<b>" not in page  # the token is escaped, never a tag
    assert "&lt;b&gt;" in page and "&lt;SAE&gt; &amp; co" in page
    assert "·" in page and "↵" in page  # "a b" and "x\ny" shown with visible whitespace
    assert page.count('class="t mx"') == sum(len(d["contexts"]) for d in data)
    assert page.count("<svg") == len(SHOWN)
    assert not re.search(r"https?://", page) and "<script" not in page and "<link" not in page
    text = "".join(p.text)
    assert "cat" in text and "Boosted tokens" in text and "Suppressed tokens" in text
