"""GGUF files of the Qwen 2, Qwen 3, Gemma 2 and Phi-3 architectures (llama.cpp's "qwen2", "qwen3", "gemma2",
"phi3") against
transformers' own load of the same file (`from_pretrained(dir, gguf_file=...)`, which maps and dequantizes it
independently). Gemma 3's is in test_gemma3.py.

The files are written here as llama.cpp's converter writes them (Q and K not permuted, q/k/v biases for
Qwen 2, q/k norms for Qwen 3, Gemma's norms as 1 + w, its soft-caps and window, Phi-3's fused qkv and gate-up
tensors), from a tiny random
transformers model; the vocabulary is test_gemma3's SentencePiece one, which only our loader reads
(transformers' model load ignores it).
"""

import numpy as np
import pytest

import circuits_jax as cj
from test_gemma3 import GEMMA3_NAMES, tiny_vocab, write_hf_as_gguf

NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip


GEMMA2_NAMES = {k: v for k, v in GEMMA3_NAMES.items() if not k.endswith(("q_norm", "k_norm"))}
PHI3_NAMES = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


@pytest.mark.peers
@pytest.mark.slow_after_first
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma2", "phi3", "gemma"])
def test_gguf_equals_transformers_load_of_it(arch, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokens, types = tiny_vocab()
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokens), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                  tie_word_embeddings=arch == "qwen3")  # fmt: skip
    if arch == "qwen2":
        hf_cfg = transformers.Qwen2Config(**common)
    elif arch == "qwen3":  # transformers reads no head size from a Qwen 3 GGUF: its default, 128, is the one written
        hf_cfg = transformers.Qwen3Config(**common, head_dim=128)
    elif arch == "gemma":  # Gemma 1: tied, GeGLU, sqrt(d_model) scale, 1 + w norms; head size != hidden / heads
        common.update(tie_word_embeddings=True)
        hf_cfg = transformers.GemmaConfig(**common, head_dim=16, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    elif arch == "phi3":  # different q and kv head counts, so a wrong split of attn_qkv shows
        hf_cfg = transformers.Phi3Config(**common, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    else:  # transformers reads neither soft-cap nor query scale from the file: its defaults (50, 30, 256) are written
        common.update(tie_word_embeddings=True)
        hf_cfg = transformers.Gemma2Config(**common, head_dim=256, query_pre_attn_scalar=256, sliding_window=3,
                                           attn_logit_softcapping=50.0, final_logit_softcapping=30.0)  # fmt: skip
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg).float()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith(("norm.weight", "bias")):  # make the norms and Qwen 2's biases visible
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.5)
            elif arch == "gemma2":  # large enough weights that the soft-caps bite
                p.mul_(8.0)
    theta = hf_cfg.rope_parameters["rope_theta"] if hasattr(hf_cfg, "rope_parameters") else hf_cfg.rope_theta

    def metadata(w):
        w.add_rope_freq_base(theta)
        if arch == "phi3":  # transformers' Phi3Config pads with id 32000 unless the file names one
            w.add_pad_token_id(0)
            w.add_rope_dimension_count(hf_cfg.hidden_size // hf_cfg.num_attention_heads)
        if arch == "gemma2":
            w.add_sliding_window(hf_cfg.sliding_window)
            w.add_attn_logit_softcapping(hf_cfg.attn_logit_softcapping)
            w.add_final_logit_softcapping(hf_cfg.final_logit_softcapping)

    gemma = arch in ("gemma", "gemma2")
    names = {"gemma2": GEMMA2_NAMES, "phi3": PHI3_NAMES}.get(arch, NAMES)  # gemma 1: Llama's names
    write_hf_as_gguf(tmp_path / "m.gguf", arch, hf_model, tokens, types, names,
                     norm_offset=1.0 if gemma else 0.0, add_bos=gemma, metadata=metadata)  # fmt: skip

    model, tok = cj.load(tmp_path / "m.gguf")
    assert model.cfg.family == arch and model.cfg.attn_bias == (arch == "qwen2") and model.cfg.qk_norm == (arch == "qwen3")
    if arch == "gemma2":
        assert model.cfg.layer_types == ("sliding_attention", "full_attention") and model.cfg.attn_softcap == 50.0
    # transformers has no GGUF mapping for Gemma 1: there its forward on the weights the file was written from
    # is the oracle (the file's layout, norms as 1 + w and Q/K unpermuted, is the one llama.cpp's converter writes)
    ref = hf_model.eval() if arch == "gemma" else transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ids = [5, 300, 301, 290, 17, 9, 280, 281, 300]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(model(np.asarray([ids], np.int32))[0])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

    if arch == "phi3":  # a long-context Phi-3 carries RoPE factors we do not implement: refused, naming them
        def longrope(w):
            metadata(w)
            w.add_tensor("rope_factors_long.weight", np.ones(4, np.float32))

        write_hf_as_gguf(tmp_path / "long.gguf", arch, hf_model, tokens, types, names, metadata=longrope)
        with pytest.raises(ValueError, match=r"long.gguf: .*rope_factors_long.*supported RoPE types: default"):
            cj.load(tmp_path / "long.gguf")
