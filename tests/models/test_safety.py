"""Damaged model files and non-finite weights are refused at load, naming what is wrong; files are written whole.

Every loader (Hugging Face safetensors + config.json, GGUF, our orbax checkpoints through `load`, penzai)
refuses a truncated or garbled file with a ValueError that names it, and weights holding NaN or Inf with
`NonFiniteWeights` (a ValueError) that names the tensor. `atomic_path` leaves the old file or the new one,
never half a file. The tiny models here are written by the helpers below, which tests/app/test_failures.py
uses too (`from test_safety import ...`).
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

import circuits_jax as cj
from circuits_jax.models import NonFiniteWeights, Tokenizer, atomic_path, load, write_npz, write_text

from conftest import tiny_configs

CHARS = ["<bos>", "<eos>"] + list(" abcdefghijklmnopqrstuvwxyz.,")


def char_tokenizer() -> Tokenizer:
    """One token per character (no BOS by default)."""
    t = tokenizers.Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="<eos>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    t.decoder = decoders.Fuse()
    return Tokenizer(t, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_model():
    """A random 3-layer llama-like model over `CHARS`."""
    cfg = dataclasses.replace(tiny_configs()["llamalike"], d_vocab=len(CHARS), bos_token_id=0, eos_token_id=1,
                              pad_token_id=1, family="llama", tied_embeddings=False)  # fmt: skip
    return cj.init_model(cfg, key=jax.random.key(0), std=0.3)


def tiny_hf(path, model=None):
    """`model` (default `tiny_model()`) as a Hugging Face directory with the character tokenizer."""
    return cj.export_hf(tiny_model() if model is None else model, path, tokenizer=char_tokenizer())


def cut(path, keep: float = 0.5) -> None:
    """Truncate the file at `path` to `keep` of its bytes (an interrupted download)."""
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


def poison(hf_dir, name: str = "model.layers.1.mlp.up_proj.weight", value=np.nan) -> None:
    """Put `value` into one entry of weight `name` of an HF directory's model.safetensors."""
    from safetensors.numpy import load_file, save_file

    f = os.path.join(hf_dir, "model.safetensors")
    w = load_file(f)
    w[name] = w[name].copy()
    w[name][2, 3] = value
    save_file(w, f)


def write_gguf(path, model, nan_in: str | None = None) -> None:
    """A float32 llama GGUF of `model` (vocabulary: `CHARS` and 'ab', one merge); `nan_in` names a tensor to
    hold a NaN. Q/K rows are not permuted as llama.cpp's converter does: these files test loading, not logits."""
    import gguf
    from safetensors.numpy import load_file

    cfg = model.cfg
    w = gguf.GGUFWriter(str(path), "llama")
    for key, v in (("embedding_length", cfg.d_model), ("attention.head_count", cfg.n_heads),
                   ("attention.head_count_kv", cfg.kv_heads), ("block_count", cfg.n_layers),
                   ("context_length", cfg.n_ctx), ("feed_forward_length", cfg.d_mlp)):  # fmt: skip
        w.add_uint32(f"llama.{key}", v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(CHARS[: cfg.d_vocab - 1] + ["ab"])
    w.add_token_merges(["a b"])
    hf = load_file(str(cj.export_hf(model, os.path.join(os.path.dirname(path), ".gguf-src")) / "model.safetensors"))
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    tensors = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"],
               "output.weight": hf["lm_head.weight"]}  # fmt: skip
    for k, v in hf.items():
        if k.startswith("model.layers."):
            layer, rest = k.removeprefix("model.layers.").split(".", 1)
            tensors[f"blk.{layer}.{names[rest.removesuffix('.weight')]}.weight"] = v
    for k, v in tensors.items():
        v = np.array(v, np.float32)
        if k == nan_in:
            v.flat[1] = np.nan
        w.add_tensor(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


# ------------------------------------------------------------------ Hugging Face directories


def test_a_good_export_loads_back(model, tmp_path):
    again, tok = load(tiny_hf(tmp_path / "m", model))
    assert cj.tree_allclose(again, model, rtol=0, atol=0) and tok.encode("ab") == [3, 4]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                                  "tokenizer_config.json"]  # no temporary files left  # fmt: skip


@pytest.mark.parametrize("damage, needle", [
    (lambda d: cut(d / "model.safetensors"), "is not a readable safetensors file"),
    (lambda d: cut(d / "model.safetensors", 0.001), "is not a readable safetensors file"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{garbage" + b" " * 64),
     "is not a readable safetensors file"),
    (lambda d: cut(d / "config.json"), "config.json is not valid JSON"),
    (lambda d: (d / "config.json").write_text('["a list"]'), "config.json holds a JSON list"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llama"})), "setting 'hidden_size' is missing"),
    (lambda d: (d / "config.json").write_text((d / "config.json").read_text().replace('"intermediate_size": 24',
                                                                                      '"intermediate_size": 25')),
     "do not fit config.json"),
    (lambda d: cut(d / "tokenizer.json"), "tokenizer.json is not a readable tokenizer"),
], ids=["half", "header-only", "garbled-header", "config-cut", "config-list", "config-key", "config-size", "tokenizer-cut"])  # fmt: skip
def test_damaged_hf_files_are_refused_naming_the_file(model, tmp_path, damage, needle):
    d = tiny_hf(tmp_path / "m", model)
    damage(d)
    with pytest.raises(ValueError, match=needle) as e:
        load(d)
    assert str(d) in str(e.value)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_safetensors_weights_are_refused_naming_the_tensor(model, tmp_path, value):
    d = tiny_hf(tmp_path / "m", model)
    poison(d, value=value)
    with pytest.raises(NonFiniteWeights, match=r"model\.safetensors: weight model\.layers\.1\.mlp\.up_proj\.weight holds "
                                               r".*first at index \[2, 3\]"):  # fmt: skip
        load(d)


# ------------------------------------------------------------------ GGUF


def test_gguf_loads_and_refuses_nan_and_truncation(model, tmp_path):
    write_gguf(tmp_path / "m.gguf", model)
    again, tok = load(tmp_path / "m.gguf")
    assert again.cfg.d_model == model.cfg.d_model and tok.encode("ab") == [len(CHARS) - 1]
    np.testing.assert_array_equal(again.blocks.W_in, model.blocks.W_in)
    write_gguf(tmp_path / "n.gguf", model, nan_in="blk.1.ffn_up.weight")
    with pytest.raises(NonFiniteWeights, match=r"n\.gguf: weight blk\.1\.ffn_up\.weight holds 1 NaN"):
        load(tmp_path / "n.gguf")
    for keep in (0.6, 0.05):
        write_gguf(tmp_path / "t.gguf", model)
        cut(tmp_path / "t.gguf", keep)
        with pytest.raises(ValueError, match=r"t\.gguf.*(damaged|incomplete) GGUF"):
            load(tmp_path / "t.gguf")
    (tmp_path / "x.gguf").write_bytes(b"GGUX" + b"\0" * 64)
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load(tmp_path / "x.gguf")


# ------------------------------------------------------------------ our checkpoints


def test_checkpoints_with_nan_or_damage_are_refused(model, tmp_path):
    bad = dataclasses.replace(model, blocks=dataclasses.replace(model.blocks, W_in=model.blocks.W_in.at[2, 0, 5].set(np.inf)))
    cj.save_model(tmp_path / "inf", bad)
    with pytest.raises(NonFiniteWeights, match=r"inf: weight blocks\.W_in holds 0 NaN and 1 Inf values \(first at layer 2, "
                                               r"index \[0, 5\]\)"):  # fmt: skip
        load(tmp_path / "inf")
    cj.save_model(tmp_path / "cfg", model)
    cut(tmp_path / "cfg" / "config.json")
    with pytest.raises(ValueError, match=r"cfg/config\.json is not valid JSON"):
        load(tmp_path / "cfg")
    cj.save_model(tmp_path / "key", model)
    (tmp_path / "key" / "config.json").write_text(json.dumps({"d_model": 16}))
    with pytest.raises(ValueError, match=r"key is not a readable circuits_jax checkpoint \(TypeError"):
        load(tmp_path / "key")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # tensorstore's leftover futures
def test_a_truncated_checkpoint_array_is_refused_naming_the_folder(model, tmp_path):
    """orbax / tensorstore report it with a page of spec; `load` names the folder and cuts the cause to one line.
    (A failed orbax restore may also print 'Event loop is closed' tracebacks from tensorstore's threads: the
    message is checked here, not stderr.)"""
    cj.save_model(tmp_path / "c", model)
    for f in (tmp_path / "c" / "params" / "ocdbt.process_0" / "d").iterdir():
        cut(f)
    with pytest.raises(ValueError, match=r"/c is not a readable circuits_jax checkpoint .*; it may be truncated") as e:
        load(tmp_path / "c")
    assert "\n" not in str(e.value) and len(str(e.value)) < 500


# ------------------------------------------------------------------ penzai


def test_penzai_nan_is_refused_naming_our_field():
    pytest.importorskip("penzai.pz")
    from test_penzai import _build, pz

    from circuits_jax.models import from_penzai

    pz_model = _build()
    _, params = pz.unbind_params(pz_model)  # the model's own (mutable) parameters
    (p,) = [p for p in params if p.label == "transformer/block_1/mlp/out_linear.weights"]
    names = tuple(p.value.named_shape)
    p.value = pz.nx.wrap(p.value.unwrap(*names).at[(0,) * len(names)].set(np.nan)).tag(*names)
    with pytest.raises(NonFiniteWeights, match=r"penzai model: weight blocks\.W_out holds 1 NaN and 0 Inf values "
                                               r"\(first at layer 1, index \[0, 0\]\)"):  # fmt: skip
        from_penzai(pz_model)


# ------------------------------------------------------------------ writing whole files


def test_atomic_path_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "a.json"
    write_text(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".json" and tmp != target
            tmp.write_text("half of the ne")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    write_npz(tmp_path / "b", x=np.arange(3))  # exactly the name given: no .npz appended
    np.testing.assert_array_equal(np.load(tmp_path / "b")["x"], np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b"]
