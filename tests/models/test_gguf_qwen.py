"""GGUF files of the Qwen 2 and Qwen 3 architectures (llama.cpp's "qwen2" / "qwen3") against transformers' own
load of the same file (`from_pretrained(dir, gguf_file=...)`, which maps and dequantizes it independently).

The files are written here as llama.cpp's converter writes them (Q and K not permuted, q/k/v biases for
Qwen 2, q/k norms for Qwen 3), from a tiny random transformers model; the vocabulary is test_gemma3's
SentencePiece one, which only our loader reads (transformers' model load ignores it).
"""

import numpy as np
import pytest

import circuits_jax as cj
from test_gemma3 import tiny_vocab

NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip


def write_gguf(path, arch: str, hf_model, tokens, types) -> None:
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
    w.add_rope_freq_base(c.rope_theta if hasattr(c, "rope_theta") else c.rope_parameters["rope_theta"])
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-1000.0 if t != 1 else -float(i) for i, t in enumerate(types)])
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_add_bos_token(False)
    for k, v in hf_model.state_dict().items():
        k = k.removeprefix("model.")
        v = v.detach().numpy().astype(np.float32)
        if k.startswith("layers."):
            layer, rest = k.removeprefix("layers.").split(".", 1)
            stem, kind = rest.rsplit(".", 1)
            k = f"blk.{layer}.{NAMES[stem]}.{kind}"
        else:
            k = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}[k]  # fmt: skip
        w.add_tensor(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.peers
@pytest.mark.slow_after_first
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_gguf_equals_transformers_load_of_it(arch, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokens, types = tiny_vocab()
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokens), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                  tie_word_embeddings=arch == "qwen3")  # fmt: skip
    if arch == "qwen2":
        hf_cfg = transformers.Qwen2Config(**common)
    else:  # transformers reads no head size from a Qwen 3 GGUF: its default, 128, is the one written
        hf_cfg = transformers.Qwen3Config(**common, head_dim=128)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg).float()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith(("norm.weight", "bias")):  # make the norms and Qwen 2's biases visible
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.5)
    write_gguf(tmp_path / "m.gguf", arch, hf_model, tokens, types)

    model, tok = cj.load(tmp_path / "m.gguf")
    assert model.cfg.family == arch and model.cfg.attn_bias == (arch == "qwen2") and model.cfg.qk_norm == (arch == "qwen3")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ids = [5, 300, 301, 290, 17, 9, 280, 281, 300]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(model(np.asarray([ids], np.int32))[0])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
