"""Make the tiny per-family Hugging Face fixtures `tests/models/test_families.py` reads.

    .venv/bin/python tests/models/families/make_fixtures.py        # rewrites tests/models/families/<name>/

Each fixture is a random `transformers` model built locally from a config (`AutoConfig.for_model`, no hub):
`config.json` + safetensors as `save_pretrained` writes them (the `mistral` one sharded, with
`model.safetensors.index.json`), and `reference.npz`: the model's own float32 logits, every hidden state and
every attention pattern (eager attention) on two prompts run alone. Weights are drawn at a scale where every
feature matters (soft-caps bite, windows cut, RoPE scaling changes the result), and Gemma's norm weights lie on
a 2^-10 grid so that `1 + w` round-trips exactly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

HERE = Path(__file__).parent
V, D, H, K, E, M, L = 48, 32, 4, 2, 8, 48, 2
COMMON = dict(vocab_size=V, hidden_size=D, num_attention_heads=H, num_key_value_heads=K, head_dim=E,
              intermediate_size=M, num_hidden_layers=L, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, tie_word_embeddings=False)  # fmt: skip
GEMMA2 = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16)

# name -> (model_type, config settings beyond COMMON)
FAMILIES = {
    "llama3": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0, original_max_position_embeddings=64))),
    "llama_linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "llama_dynamic": ("llama", dict(max_position_embeddings=8,
                                    rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "llama_yarn": ("llama", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                      original_max_position_embeddings=16))),
    "mistral": ("mistral", dict(sliding_window=4)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict()),
    "gemma": ("gemma", dict(tie_word_embeddings=True)),
    "gemma2": ("gemma2", dict(GEMMA2, tie_word_embeddings=True, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": ("gemma3_text", dict(GEMMA2, tie_word_embeddings=True, rope_parameters={
        "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
        "full_attention": dict(rope_type="linear", rope_theta=1000000.0, factor=2.0)})),
    "pythia": ("gpt_neox", dict(num_key_value_heads=None, head_dim=None, use_parallel_residual=True, hidden_act="gelu",
                                rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))),
    "phi3": ("phi3", dict(sliding_window=6, original_max_position_embeddings=64,
                          rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))),
    "olmo2": ("olmo2", dict()),
}  # fmt: skip
PROMPTS = {"a": [1, 5, 9, 14, 3, 27, 40, 8, 33, 11], "b": [1, 21, 6, 47, 30, 12]}


def build(model_type: str, settings: dict):
    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in {**COMMON, **settings}.items() if v is not None})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    gemma = model_type.startswith("gemma")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):  # RMSNorm / LayerNorm weights around 1 (Gemma: w in 1 + w)
                p.copy_(torch.round(((0.0 if gemma else 1.0) + 0.1 * noise) * 1024) / 1024)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


def reference(model) -> dict[str, np.ndarray]:
    out = {}
    for key, ids in PROMPTS.items():
        with torch.no_grad():
            o = model(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
        out[f"tokens_{key}"] = np.array(ids, np.int32)
        out[f"logits_{key}"] = o.logits[0].numpy()
        out[f"hidden_{key}"] = torch.stack(o.hidden_states)[:, 0].numpy()
        out[f"attn_{key}"] = torch.stack(o.attentions)[:, 0].numpy()
    return out


def main() -> None:
    for name, (model_type, settings) in FAMILIES.items():
        path = HERE / name
        shutil.rmtree(path, ignore_errors=True)
        model = build(model_type, settings)
        model.save_pretrained(path, max_shard_size="40KB" if name == "mistral" else "10GB")
        (path / "generation_config.json").unlink(missing_ok=True)
        np.savez_compressed(path / "reference.npz", **reference(model))
        print(name, sum(f.stat().st_size for f in path.iterdir()) // 1024, "KiB")


if __name__ == "__main__":
    main()
