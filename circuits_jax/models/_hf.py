"""Hugging Face format: `config.json` + `*.safetensors`, GPT-2 and Llama families, both directions.

Import converts HF's layouts (GPT-2's fused Conv1D `c_attn`, Llama's `[out, in]`
Linear weights) into TransformerLens's per-head layout; export is the exact
inverse, so peers (transformers, TransformerLens) load the very same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from ..core import Blocks, Config, Transformer
from ._files import atomic_path, write_text
from ._finite import check_finite


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path}; expected a Hugging Face model directory")
    from safetensors import SafetensorError

    weights: dict[str, np.ndarray] = {}
    for f in files:
        try:
            part = {k: np.asarray(v, np.float32) for k, v in load_file(str(f)).items()}
        except (SafetensorError, OSError) as e:  # truncated, header damaged, unreadable
            raise ValueError(f"{f} is not a readable safetensors file ({e}); it may be truncated or damaged: "
                             "fetch or export it again") from None  # fmt: skip
        check_finite(part, str(f))
        weights.update(part)
    # Some checkpoints prefix the base model ("transformer." / "model.") and some don't.
    return weights


def config_from_hf(hf: dict, source: str | Path = "config.json") -> Config:
    """Our `Config` from a Hugging Face `config.json` dict (GPT-2 or Llama); a missing or ill-typed setting
    raises ValueError naming `source` and the setting."""
    try:
        return _config_from_hf(hf)
    except KeyError as e:
        raise ValueError(f"{source}: setting {e} is missing (a truncated or foreign config.json?)") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def _config_from_hf(hf: dict) -> Config:
    kind = hf.get("model_type")
    if kind == "gpt2":
        D, H = hf["n_embd"], hf["n_head"]
        return Config(
            d_model=D, n_layers=hf["n_layer"], n_heads=H, d_head=D // H, d_vocab=hf["vocab_size"],
            n_ctx=hf.get("n_positions", 1024), d_mlp=hf.get("n_inner") or 4 * D,
            normalization="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            act=hf.get("activation_function", "gelu_new"), positional="learned",
            attn_bias=True, mlp_bias=True, tied_embeddings=True, family="gpt2",
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"), default_prepend_bos=True,
        )  # fmt: skip
    if kind == "llama":
        D, H = hf["hidden_size"], hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
            raise NotImplementedError(f"rope scaling {rope or hf.get('rope_scaling')} is not supported yet")
        act = hf.get("hidden_act", "silu")
        return Config(
            d_model=D, n_layers=hf["num_hidden_layers"], n_heads=H, n_kv_heads=hf.get("num_key_value_heads", H),
            d_head=hf.get("head_dim") or D // H, d_vocab=hf["vocab_size"],
            n_ctx=hf.get("max_position_embeddings", 2048), d_mlp=hf["intermediate_size"],
            normalization="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), act=act, gated_mlp=True,
            positional="rotary", rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            attn_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
            tied_embeddings=bool(hf.get("tie_word_embeddings", False)), family="llama",
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )  # fmt: skip
    raise NotImplementedError(f"model_type {kind!r} is not supported; supported: gpt2, llama")


def _stack(ws: dict, fmt: str, L: int, fn=lambda a: a):
    return jnp.asarray(np.stack([fn(ws[fmt.format(l)]) for l in range(L)]))


def _gpt2(cfg: Config, w: dict) -> Transformer:
    w = {k.removeprefix("transformer."): v for k, v in w.items()}
    L, D, H, E = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head

    def qkv(i, bias=False):
        def f(a):
            part = a[..., i * D : (i + 1) * D]
            return part.reshape(H, E) if bias else part.reshape(D, H, E).transpose(1, 0, 2)

        return f

    b = Blocks(
        W_Q=_stack(w, "h.{}.attn.c_attn.weight", L, qkv(0)),
        W_K=_stack(w, "h.{}.attn.c_attn.weight", L, qkv(1)),
        W_V=_stack(w, "h.{}.attn.c_attn.weight", L, qkv(2)),
        b_Q=_stack(w, "h.{}.attn.c_attn.bias", L, qkv(0, True)),
        b_K=_stack(w, "h.{}.attn.c_attn.bias", L, qkv(1, True)),
        b_V=_stack(w, "h.{}.attn.c_attn.bias", L, qkv(2, True)),
        W_O=_stack(w, "h.{}.attn.c_proj.weight", L, lambda a: a.reshape(H, E, D)),
        b_O=_stack(w, "h.{}.attn.c_proj.bias", L),
        ln1_w=_stack(w, "h.{}.ln_1.weight", L), ln1_b=_stack(w, "h.{}.ln_1.bias", L),
        ln2_w=_stack(w, "h.{}.ln_2.weight", L), ln2_b=_stack(w, "h.{}.ln_2.bias", L),
        W_in=_stack(w, "h.{}.mlp.c_fc.weight", L), b_in=_stack(w, "h.{}.mlp.c_fc.bias", L),
        W_out=_stack(w, "h.{}.mlp.c_proj.weight", L), b_out=_stack(w, "h.{}.mlp.c_proj.bias", L),
    )  # fmt: skip
    W_E = jnp.asarray(w["wte.weight"])
    W_U = jnp.asarray(w["lm_head.weight"].T) if "lm_head.weight" in w else W_E.T
    return Transformer(
        cfg=cfg, W_E=W_E, blocks=b, W_U=W_U, W_pos=jnp.asarray(w["wpe.weight"]),
        lnf_w=jnp.asarray(w["ln_f.weight"]), lnf_b=jnp.asarray(w["ln_f.bias"]),
    )  # fmt: skip


def llama_blocks(cfg: Config, get) -> Blocks:
    """Llama-layout blocks from `get(layer, name)` returning HF `[out, in]` matrices."""
    L, D, H, K, E = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head

    def stack(name, fn):
        return jnp.asarray(np.stack([fn(get(l, name)) for l in range(L)]))

    def heads(n):
        return lambda a: a.reshape(n, E, D).transpose(0, 2, 1)

    parts = dict(
        W_Q=stack("self_attn.q_proj.weight", heads(H)),
        W_K=stack("self_attn.k_proj.weight", heads(K)),
        W_V=stack("self_attn.v_proj.weight", heads(K)),
        W_O=stack("self_attn.o_proj.weight", lambda a: a.T.reshape(H, E, D)),
        ln1_w=stack("input_layernorm.weight", lambda a: a),
        ln2_w=stack("post_attention_layernorm.weight", lambda a: a),
        W_gate=stack("mlp.gate_proj.weight", lambda a: a.T),
        W_in=stack("mlp.up_proj.weight", lambda a: a.T),
        W_out=stack("mlp.down_proj.weight", lambda a: a.T),
    )
    if cfg.attn_bias:
        parts.update(
            b_Q=stack("self_attn.q_proj.bias", lambda a: a.reshape(H, E)),
            b_K=stack("self_attn.k_proj.bias", lambda a: a.reshape(K, E)),
            b_V=stack("self_attn.v_proj.bias", lambda a: a.reshape(K, E)),
            b_O=stack("self_attn.o_proj.bias", lambda a: a),
        )
    if cfg.mlp_bias:
        parts.update(
            b_gate=stack("mlp.gate_proj.bias", lambda a: a),
            b_in=stack("mlp.up_proj.bias", lambda a: a),
            b_out=stack("mlp.down_proj.bias", lambda a: a),
        )
    return Blocks(**parts)


def _llama(cfg: Config, w: dict) -> Transformer:
    w = {k.removeprefix("model."): v for k, v in w.items()}
    blocks = llama_blocks(cfg, lambda l, name: w[f"layers.{l}.{name}"])
    W_E = jnp.asarray(w["embed_tokens.weight"])
    W_U = W_E.T if cfg.tied_embeddings or "lm_head.weight" not in w else jnp.asarray(w["lm_head.weight"].T)
    return Transformer(cfg=cfg, W_E=W_E, blocks=blocks, W_U=W_U, lnf_w=jnp.asarray(w["norm.weight"]))


def load_hf(path: str | Path) -> Transformer:
    """Load a Hugging Face directory (`config.json` + `*.safetensors`) of the GPT-2 or Llama family."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face model directory")
    cfg = config_from_hf(read_json(path / "config.json"), path / "config.json")
    weights = _read_weights(path)
    try:
        return _gpt2(cfg, weights) if cfg.family == "gpt2" else _llama(cfg, weights)
    except KeyError as e:
        raise ValueError(f"{path}: weight {e} missing from the safetensors files (a truncated or foreign checkpoint?)") from None
    except ValueError as e:  # a weight of the wrong size for config.json (numpy's reshape, or the model's shape check)
        raise ValueError(f"{path}: the safetensors weights do not fit config.json: {e}") from None


def read_json(path: Path) -> dict:
    """A JSON object from `path`; a damaged or non-object file raises ValueError naming it."""
    try:
        doc = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is truncated or damaged") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path} holds a JSON {type(doc).__name__}, not an object of settings")
    return doc


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------


def _np(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, np.float32))


def export_hf(model: Transformer, path: str | Path, tokenizer=None) -> Path:
    """Write `config.json` + `model.safetensors` that transformers / TransformerLens load as-is;
    with a `Tokenizer`, also `tokenizer.json` (+ a minimal `tokenizer_config.json`)."""
    cfg, b = model.cfg, model.blocks
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    L, D, H, K, E = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head
    w: dict[str, np.ndarray] = {}
    if cfg.family == "gpt2":
        for l in range(L):
            p = f"transformer.h.{l}."
            qkv = [np.asarray(m[l]).transpose(1, 0, 2).reshape(D, D) for m in (b.W_Q, b.W_K, b.W_V)]
            w[p + "attn.c_attn.weight"] = _np(np.concatenate(qkv, axis=1))
            w[p + "attn.c_attn.bias"] = _np(np.concatenate([np.asarray(v[l]).reshape(D) for v in (b.b_Q, b.b_K, b.b_V)]))
            w[p + "attn.c_proj.weight"] = _np(np.asarray(b.W_O[l]).reshape(D, D))
            w[p + "attn.c_proj.bias"] = _np(b.b_O[l])
            for ours, theirs in [("ln1_w", "ln_1.weight"), ("ln1_b", "ln_1.bias"), ("ln2_w", "ln_2.weight"),
                                 ("ln2_b", "ln_2.bias"), ("W_in", "mlp.c_fc.weight"), ("b_in", "mlp.c_fc.bias"),
                                 ("W_out", "mlp.c_proj.weight"), ("b_out", "mlp.c_proj.bias")]:  # fmt: skip
                w[p + theirs] = _np(getattr(b, ours)[l])
        w["transformer.wte.weight"] = _np(model.W_E)
        w["transformer.wpe.weight"] = _np(model.W_pos)
        w["transformer.ln_f.weight"] = _np(model.lnf_w)
        w["transformer.ln_f.bias"] = _np(model.lnf_b)
        hf = {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": D, "n_head": H, "n_layer": L,
            "n_positions": cfg.n_ctx, "n_inner": cfg.d_mlp, "vocab_size": cfg.d_vocab,
            "activation_function": cfg.act, "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": True,
            "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
        }  # fmt: skip
    elif cfg.family == "llama":
        for l in range(L):
            p = f"model.layers.{l}."
            w[p + "self_attn.q_proj.weight"] = _np(np.asarray(b.W_Q[l]).transpose(0, 2, 1).reshape(H * E, D))
            w[p + "self_attn.k_proj.weight"] = _np(np.asarray(b.W_K[l]).transpose(0, 2, 1).reshape(K * E, D))
            w[p + "self_attn.v_proj.weight"] = _np(np.asarray(b.W_V[l]).transpose(0, 2, 1).reshape(K * E, D))
            w[p + "self_attn.o_proj.weight"] = _np(np.asarray(b.W_O[l]).reshape(H * E, D).T)
            w[p + "input_layernorm.weight"] = _np(b.ln1_w[l])
            w[p + "post_attention_layernorm.weight"] = _np(b.ln2_w[l])
            w[p + "mlp.gate_proj.weight"] = _np(np.asarray(b.W_gate[l]).T)
            w[p + "mlp.up_proj.weight"] = _np(np.asarray(b.W_in[l]).T)
            w[p + "mlp.down_proj.weight"] = _np(np.asarray(b.W_out[l]).T)
            if cfg.attn_bias:
                w[p + "self_attn.q_proj.bias"] = _np(np.asarray(b.b_Q[l]).reshape(-1))
                w[p + "self_attn.k_proj.bias"] = _np(np.asarray(b.b_K[l]).reshape(-1))
                w[p + "self_attn.v_proj.bias"] = _np(np.asarray(b.b_V[l]).reshape(-1))
                w[p + "self_attn.o_proj.bias"] = _np(b.b_O[l])
            if cfg.mlp_bias:
                w[p + "mlp.gate_proj.bias"] = _np(b.b_gate[l])
                w[p + "mlp.up_proj.bias"] = _np(b.b_in[l])
                w[p + "mlp.down_proj.bias"] = _np(b.b_out[l])
        w["model.embed_tokens.weight"] = _np(model.W_E)
        w["model.norm.weight"] = _np(model.lnf_w)
        if not cfg.tied_embeddings:
            w["lm_head.weight"] = _np(np.asarray(model.W_U).T)
        hf = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D,
            "num_attention_heads": H, "num_key_value_heads": K, "head_dim": E, "num_hidden_layers": L,
            "intermediate_size": cfg.d_mlp, "vocab_size": cfg.d_vocab, "max_position_embeddings": cfg.n_ctx,
            "hidden_act": cfg.act, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "tie_word_embeddings": cfg.tied_embeddings, "attention_bias": cfg.attn_bias, "mlp_bias": cfg.mlp_bias,
        }  # fmt: skip
    else:
        raise NotImplementedError(f"export needs family 'gpt2' or 'llama'; this model's config has {cfg.family!r}")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, key) is not None:
            hf[key] = getattr(cfg, key)
    hf["torch_dtype"] = "float32"
    # each file is written whole (temporary name, then rename): an interrupted export leaves no half file
    write_text(path / "config.json", json.dumps(hf, indent=2))
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(w, str(tmp), metadata={"format": "pt"})
    if tokenizer is not None:
        with atomic_path(path / "tokenizer.json") as tmp:
            tokenizer.tok.save(str(tmp))
        special = {f"{k}_token": tokenizer.tok.id_to_token(getattr(tokenizer, f"{k}_token_id"))
                   for k in ("bos", "eos", "pad") if getattr(tokenizer, f"{k}_token_id") is not None}  # fmt: skip
        write_text(path / "tokenizer_config.json", json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **special}))
    return path
