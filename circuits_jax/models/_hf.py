"""Hugging Face format: `config.json` + `*.safetensors` (one file, or shards with
`model.safetensors.index.json`), both directions, for every family `Config` expresses:

    gpt2, llama (Llama 1-3.x, RoPE scaling linear / dynamic / yarn / llama3), mistral (sliding window),
    qwen2 (q/k/v biases), qwen3 (q/k norms), gemma, gemma2, gemma3_text, gpt_neox (Pythia), phi3, olmo2

Import converts HF's layouts (GPT-2's fused Conv1D `c_attn`, `[out, in]` Linear weights, NeoX's
per-head fused `query_key_value`, Phi-3's fused `qkv_proj` / `gate_up_proj`) into TransformerLens's
per-head layout; export is the exact inverse, so peers (transformers, TransformerLens) load the very
same weights. Gemma's RMSNorm multiplies by `1 + w`: we store `1 + w` (the loader adds 1, export
subtracts 1), so the forward pass has one RMSNorm; this round-trips exactly for every weight `w`
whose last bit is at or above 2^-23 (every bf16 weight of magnitude above 2^-16).

`cfg.family` is Hugging Face's `model_type` and decides the export layout.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from ..core import Blocks, Config, Transformer, model_dtype, weight_dtype
from ..scale import field_sharding
from ._files import atomic_path, write_text
from ._finite import NonFiniteWeights, check_finite

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt_neox", "phi3", "olmo2")
GEMMA = ("gemma", "gemma2", "gemma3_text")  # RMSNorm weights stored as 1 + w
INDEX = "model.safetensors.index.json"


class Weights(Mapping):
    """Weights by name, each read from its file when asked for (float32 numpy, checked finite): a model is
    built one tensor at a time, so loading never holds the checkpoint twice (nor the files' copy at all)."""

    def __init__(self, read: dict[str, Callable[[], np.ndarray]]):
        self._read = read

    def __getitem__(self, name: str) -> np.ndarray:
        return self._read[name]()

    def __contains__(self, name) -> bool:  # without reading the tensor (Mapping's default would read it)
        return name in self._read

    def __iter__(self):
        return iter(self._read)

    def __len__(self) -> int:
        return len(self._read)

    def reader(self, name: str) -> Callable[[], np.ndarray]:
        return self._read[name]


def _split(read: Callable[[], np.ndarray], parts: list[Callable]) -> list[Callable[[], np.ndarray]]:
    """Readers of the `parts` (functions of the array) of one fused tensor, which is read once: the first part
    asked for reads it, and it is dropped once every part has been taken."""
    held: dict = {}

    def reader(fn):
        def get() -> np.ndarray:
            if not held:
                held.update(array=read(), left=len(parts))
            a = held["array"]
            held["left"] -= 1
            if held["left"] == 0:
                held.clear()
            return fn(a)

        return get

    return [reader(fn) for fn in parts]


class _Unreadable(ValueError):
    """A tensor whose bytes cannot be read (raised while the model is built, already naming the file)."""


def _tensor_reader(f: Path, handle, name: str) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        try:
            a = handle.get_tensor(name)
        except Exception as e:  # a damaged data section: safetensors names no file
            raise _Unreadable(f"{f} is not a readable safetensors file (tensor {name}: {e}); it may be truncated or "
                             "damaged: fetch or export it again") from None  # fmt: skip
        a = np.asarray(a, np.float32)
        check_finite({name: a}, str(f))
        return a

    return read


def _read_weights(path: Path) -> Weights:
    if (path / INDEX).exists():  # sharded: the index names every weight's file
        index = read_json(path / INDEX)
        shards = sorted(set((index.get("weight_map") or {}).values()))
        if not shards:
            raise ValueError(f"{path / INDEX} has no weight_map; the index is damaged")
        missing = [f for f in shards if not (path / f).exists()]
        if missing:
            raise FileNotFoundError(f"{path}: shard {missing[0]} named by {INDEX} is missing "
                                    f"({len(missing)} of {len(shards)} shards missing)")  # fmt: skip
        files = [path / f for f in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path}; expected a Hugging Face model directory")
    from safetensors import SafetensorError, safe_open

    read: dict[str, Callable[[], np.ndarray]] = {}
    for f in files:
        try:  # framework "flax" reads bfloat16 tensors too (numpy has no bfloat16)
            handle = safe_open(str(f), framework="flax")
            read.update({name: _tensor_reader(f, handle, name) for name in handle.keys()})
        except (SafetensorError, OSError) as e:  # truncated, header damaged, unreadable
            raise ValueError(f"{f} is not a readable safetensors file ({e}); it may be truncated or damaged: "
                             "fetch or export it again") from None  # fmt: skip
    # Some checkpoints prefix the base model ("transformer." / "model.") and some don't.
    return Weights(read)


def config_from_hf(hf: dict, source: str | Path = "config.json") -> Config:
    """Our `Config` from a Hugging Face `config.json` dict (any of `FAMILIES`); a missing or ill-typed setting
    raises ValueError naming `source` and the setting, an unsupported `model_type` or RoPE type says what is
    supported."""
    try:
        return _config_from_hf(hf)
    except KeyError as e:
        raise ValueError(f"{source}: setting {e} is missing (a truncated or foreign config.json?)") from None
    except NotImplementedError as e:
        raise NotImplementedError(f"{source}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def _rope_items(d: dict | None) -> tuple[tuple[str, object], ...] | None:
    """HF's rope_scaling / rope_parameters dict as `Config.rope_scaling` (sorted, hashable; None when unscaled)."""
    if not d:
        return None
    items = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()
             if k not in ("rope_theta", "partial_rotary_factor", "type")}  # fmt: skip
    items["rope_type"] = d.get("rope_type", d.get("type", "default"))
    return None if items["rope_type"] == "default" else tuple(sorted(items.items()))


_ACT = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_new", "gelu_new": "gelu_new", "gelu": "gelu",
        "relu": "relu"}  # fmt: skip


def _act(name: str) -> str:
    if name not in _ACT:
        raise ValueError(f"activation {name!r} is not supported; supported: {', '.join(_ACT)}")
    return _ACT[name]


def _rope(hf: dict, kind: str) -> dict:
    """RoPE settings of either config.json format (transformers 5's rope_parameters, or the older rope_theta /
    rope_scaling / rope_local_base_freq / rotary_pct keys)."""
    rp = dict(hf.get("rope_parameters") or {})
    local = None
    if isinstance(rp.get("full_attention"), dict):  # per layer type (Gemma 3 in transformers 5)
        lp = rp.get("sliding_attention") or {}
        if lp.get("rope_type", "default") != "default":
            raise NotImplementedError(f"RoPE scaling {lp.get('rope_type')!r} on sliding layers is not supported")
        local = float(lp.get("rope_theta", 10000.0))
        rp = dict(rp["full_attention"])
    theta = float(rp.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0))))
    scaling = _rope_items(rp) or _rope_items(hf.get("rope_scaling"))
    if scaling is not None:
        d = dict(scaling)
        if d["rope_type"] in ("yarn", "llama3") and "original_max_position_embeddings" not in d:
            d["original_max_position_embeddings"] = hf.get("original_max_position_embeddings",
                                                           hf.get("max_position_embeddings"))  # fmt: skip
        scaling = tuple(sorted(d.items()))
    prf = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    if kind == "gemma3_text" and local is None:
        local = float(hf.get("rope_local_base_freq", 10000.0))
    return dict(theta=theta, scaling=scaling, partial=float(prf or 1.0), local=local)


def _layer_types(hf: dict, kind: str, L: int) -> tuple[int | None, tuple[str, ...] | None]:
    """`(sliding_window, layer_types)` as `Config` wants them."""
    window = hf.get("sliding_window")
    if kind in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None
    if window is None:
        return None, None
    types = hf.get("layer_types")
    if types is None and kind == "gemma2":
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]
    elif types is None and kind == "gemma3_text":
        pattern = hf.get("sliding_window_pattern", 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L)]
    elif types is None and kind in ("qwen2", "qwen3"):
        types = ["sliding_attention" if i >= hf.get("max_window_layers", L) else "full_attention" for i in range(L)]
    if types is not None and all(t == "sliding_attention" for t in types):
        types = None  # every layer sliding: the default with a window
    if types is not None and not any(t == "sliding_attention" for t in types):
        return None, None
    return int(window), None if types is None else tuple(types)


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
    if kind not in FAMILIES:
        raise NotImplementedError(f"model_type {kind!r} is not supported; supported: {', '.join(FAMILIES)}")
    D, H, L = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    E = hf.get("head_dim") or D // H
    rope = _rope(hf, kind)
    window, types = _layer_types(hf, kind, L)
    gemma = kind in GEMMA
    common = dict(
        d_model=D, n_layers=L, n_heads=H, n_kv_heads=hf.get("num_key_value_heads") or H, d_head=E,
        d_vocab=hf["vocab_size"], n_ctx=hf.get("max_position_embeddings", 2048), d_mlp=hf["intermediate_size"],
        positional="rotary", rope_theta=rope["theta"], rope_scaling=rope["scaling"], rope_local_theta=rope["local"],
        rotary_dim=None if rope["partial"] == 1.0 else int(E * rope["partial"]),
        sliding_window=window, layer_types=types, family=kind,
        tied_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
    )  # fmt: skip
    if kind == "gpt_neox":
        return Config(
            **common, normalization="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-5),
            act=_act(hf.get("hidden_act", "gelu")), attn_bias=bool(hf.get("attention_bias", True)), mlp_bias=True,
            parallel_residual=bool(hf.get("use_parallel_residual", True)),
        )  # fmt: skip
    act = hf.get("hidden_activation") if kind in ("gemma2", "gemma3_text") else hf.get("hidden_act")
    if kind == "gemma" and act in (None, "gelu"):  # Gemma 1 files say "gelu" and mean tanh, as transformers reads them
        act = "gelu_pytorch_tanh"
    extra: dict = {}
    if gemma:
        extra.update(embedding_multiplier=D**0.5)
    if kind in ("gemma2", "gemma3_text"):
        caps = (50.0, 30.0) if kind == "gemma2" else (None, None)  # transformers' defaults when config.json is silent
        extra.update(attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5, post_attn_norm=True,
                     post_mlp_norm=True, attn_softcap=hf.get("attn_logit_softcapping", caps[0]),
                     final_softcap=hf.get("final_logit_softcapping", caps[1]))  # fmt: skip
    if kind in ("qwen3", "gemma3_text"):
        extra.update(qk_norm=True)
    if kind == "olmo2":
        extra.update(qk_norm=True, qk_norm_scope="all", pre_norm=False, post_attn_norm=True, post_mlp_norm=True)
    return Config(
        **common, normalization="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-5 if kind in ("phi3", "olmo2") else 1e-6),
        act=_act(act or ("gelu_pytorch_tanh" if gemma else "silu")), gated_mlp=True,
        attn_bias=kind == "qwen2" or bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)), **extra,
    )  # fmt: skip


def placer(dtype=None, mesh=None) -> Callable[[str, np.ndarray], jax.Array]:
    """`place(field, array)`: one model weight as a jax array in its dtype (`weight_dtype`), on `mesh`
    straight into its shards (`field_sharding`: each device receives its part only) when a mesh is given."""

    def place(field: str, a) -> jax.Array:
        d = weight_dtype(field, dtype)
        if mesh is None:
            return jnp.asarray(a, d)
        a = a if isinstance(a, jax.Array) else np.asarray(a, d)
        return jax.device_put(a if d is None else a.astype(d), field_sharding(field, a.shape, mesh))

    return place


def _gpt2(cfg: Config, w: Weights, place) -> Transformer:
    L, D, H, E = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head
    read = {}
    for key in w:  # the fused c_attn [D, 3D] (its bias [3D]) splits into q, k and v, read once
        k = key.removeprefix("transformer.")
        if k.endswith((".attn.c_attn.weight", ".attn.c_attn.bias")):
            split = [lambda a, i=i: a[..., i * D : (i + 1) * D] for i in range(3)]
            read.update(zip((k.replace("c_attn", n) for n in "qkv"), _split(w.reader(key), split)))
        else:
            read[k] = w.reader(key)
    w = Weights(read)
    per_head = lambda a: a.reshape(D, H, E).transpose(1, 0, 2)  # noqa: E731
    head_bias = lambda a: a.reshape(H, E)  # noqa: E731
    fields = {  # our field -> (its name in `h.{l}.`, the map to our layout)
        "W_Q": ("attn.q.weight", per_head), "W_K": ("attn.k.weight", per_head), "W_V": ("attn.v.weight", per_head),
        "b_Q": ("attn.q.bias", head_bias), "b_K": ("attn.k.bias", head_bias), "b_V": ("attn.v.bias", head_bias),
        "W_O": ("attn.c_proj.weight", lambda a: a.reshape(H, E, D)), "b_O": ("attn.c_proj.bias", None),
        "ln1_w": ("ln_1.weight", None), "ln1_b": ("ln_1.bias", None), "ln2_w": ("ln_2.weight", None),
        "ln2_b": ("ln_2.bias", None), "W_in": ("mlp.c_fc.weight", None), "b_in": ("mlp.c_fc.bias", None),
        "W_out": ("mlp.c_proj.weight", None), "b_out": ("mlp.c_proj.bias", None),
    }  # fmt: skip
    b = Blocks(**{field: place(field, np.stack([(fn or (lambda a: a))(w[f"h.{l}.{name}"]) for l in range(L)]))
                  for field, (name, fn) in fields.items()})  # fmt: skip
    W_E = place("W_E", w["wte.weight"])
    W_U = place("W_U", w["lm_head.weight"].T if "lm_head.weight" in w else W_E.T)
    return Transformer(
        cfg=cfg, W_E=W_E, blocks=b, W_U=W_U, W_pos=place("W_pos", w["wpe.weight"]),
        lnf_w=place("lnf_w", w["ln_f.weight"]), lnf_b=place("lnf_b", w["ln_f.bias"]),
    )  # fmt: skip


# Our per-layer field -> its Hugging Face name inside `layers.{l}.`, in the Llama layout every family but GPT-2
# is read in (NeoX's and Phi-3's fused and renamed weights are first split into these names, see `_canonical`).
_LAYER_NAMES = {
    "W_Q": "self_attn.q_proj.weight", "W_K": "self_attn.k_proj.weight", "W_V": "self_attn.v_proj.weight",
    "W_O": "self_attn.o_proj.weight", "b_Q": "self_attn.q_proj.bias", "b_K": "self_attn.k_proj.bias",
    "b_V": "self_attn.v_proj.bias", "b_O": "self_attn.o_proj.bias",
    "ln1_w": "input_layernorm.weight", "ln1_b": "input_layernorm.bias",
    "ln2_w": "post_attention_layernorm.weight", "ln2_b": "post_attention_layernorm.bias",
    "W_gate": "mlp.gate_proj.weight", "W_in": "mlp.up_proj.weight", "W_out": "mlp.down_proj.weight",
    "b_gate": "mlp.gate_proj.bias", "b_in": "mlp.up_proj.bias", "b_out": "mlp.down_proj.bias",
    "q_norm_w": "self_attn.q_norm.weight", "k_norm_w": "self_attn.k_norm.weight",
    "ln1_post_w": "post_attention_layernorm.weight", "ln2_post_w": "post_feedforward_layernorm.weight",
}  # fmt: skip
_RMS_FIELDS = ("ln1_w", "ln2_w", "ln1_post_w", "ln2_post_w", "q_norm_w", "k_norm_w")


def layer_names(cfg: Config) -> dict[str, str]:
    """Our per-layer fields a model of `cfg` has -> their Hugging Face names (Llama layout, `layers.{l}.` omitted)."""
    names = dict(_LAYER_NAMES)
    if cfg.family in ("gemma2", "gemma3_text"):
        names["ln2_w"] = "pre_feedforward_layernorm.weight"
    fields = ["W_Q", "W_K", "W_V", "W_O"]
    if cfg.attn_bias:
        fields += ["b_Q", "b_K", "b_V"] + ([] if cfg.family == "qwen2" else ["b_O"])  # Qwen2: no o_proj bias
    norm = cfg.normalization is not None and cfg.pre_norm
    ln = cfg.normalization == "layernorm"
    fields += ["ln1_w"] * norm + ["ln1_b"] * (norm and ln)
    if cfg.qk_norm:
        fields += ["q_norm_w", "k_norm_w"]
    if cfg.post_attn_norm:
        fields += ["ln1_post_w"]
    if not cfg.attn_only:
        fields += ["ln2_w"] * norm + ["ln2_b"] * (norm and ln) + ["W_in", "W_out"] + ["W_gate"] * cfg.gated_mlp
        if cfg.mlp_bias:
            fields += ["b_in", "b_out"] + ["b_gate"] * cfg.gated_mlp
        if cfg.post_mlp_norm:
            fields += ["ln2_post_w"]
    return {f: names[f] for f in fields}


def _to_ours(cfg: Config, field: str):
    """The map from a Hugging Face `[out, in]` weight to our layout, for one field."""
    D, H, K, E = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head
    n = H if field in ("W_Q", "b_Q") else K
    if field in ("W_Q", "W_K", "W_V"):
        return lambda a: a.reshape(n, E, D).transpose(0, 2, 1)
    if field == "W_O":
        return lambda a: a.T.reshape(H, E, D)
    if field in ("b_Q", "b_K", "b_V"):
        return lambda a: a.reshape(n, E)
    if field in ("W_gate", "W_in", "W_out"):
        return lambda a: a.T
    return lambda a: a


def _to_hf(cfg: Config, field: str):
    """The inverse of `_to_ours`."""
    D, H, E = cfg.d_model, cfg.n_heads, cfg.d_head
    if field in ("W_Q", "W_K", "W_V"):
        return lambda m: m.transpose(0, 2, 1).reshape(-1, D)
    if field == "W_O":
        return lambda m: m.reshape(H * E, D).T
    if field in ("b_Q", "b_K", "b_V"):
        return lambda m: m.reshape(-1)
    if field in ("W_gate", "W_in", "W_out"):
        return lambda m: m.T
    return lambda m: m


def llama_blocks(cfg: Config, get, norm_offset: float = 0.0, dtype=None, mesh=None) -> Blocks:
    """Blocks from `get(layer, name)` returning HF `[out, in]` matrices under their Llama-layout names
    (`layer_names(cfg)`: q/k norms, Gemma's pre/post feed-forward norms, OLMo-2's post-norms included).
    `norm_offset` is added to every RMSNorm weight (1 for Gemma's `1 + w` norms). With `dtype`, each field is
    cast as it is made (`weight_dtype`), so a float32 copy of the whole model never exists; with `mesh`, each
    field goes straight into its shards (`placer`)."""
    L, D = cfg.n_layers, cfg.d_model
    place, parts = placer(dtype, mesh), {}
    for field, name in layer_names(cfg).items():
        fn = _to_ours(cfg, field)
        arr = np.stack([fn(np.asarray(get(l, name), np.float32)) for l in range(L)])
        if norm_offset and field in _RMS_FIELDS:
            arr = arr + np.float32(norm_offset)
        parts[field] = place(field, arr)
        del arr
    if cfg.attn_bias and cfg.family == "qwen2":
        parts["b_O"] = place("b_O", np.zeros((L, D), np.float32))
    return Blocks(**parts)


def fused_rows(cfg: Config) -> dict[str, slice]:
    """The row blocks of Phi-3's fused weights (Hugging Face's `qkv_proj` / `gate_up_proj`, GGUF's `attn_qkv` /
    `ffn_up`): `q | k | v` and `gate | up` (the gate first, as transformers' Phi3MLP and llama.cpp's SwiGLU
    read it)."""
    H, K, E, M = cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_mlp
    return {"q": slice(0, H * E), "k": slice(H * E, (H + K) * E), "v": slice((H + K) * E, (H + 2 * K) * E),
            "gate": slice(0, M), "up": slice(M, 2 * M)}  # fmt: skip


def _canonical(cfg: Config, w: Weights) -> Weights:
    """HF weights renamed and split into the Llama layout `llama_blocks` reads (no `model.` prefix); still read
    lazily (a fused tensor once, `_split`)."""
    H, E, rows = cfg.n_heads, cfg.d_head, fused_rows(cfg)
    out: dict[str, Callable[[], np.ndarray]] = {}

    if cfg.family == "gpt_neox":
        rename = {"attention.dense.": "self_attn.o_proj.", "mlp.dense_h_to_4h.": "mlp.up_proj.",
                  "mlp.dense_4h_to_h.": "mlp.down_proj.", "embed_in.": "embed_tokens.", "final_layer_norm.": "norm.",
                  "embed_out.": "lm_head."}  # fmt: skip
        for key in w:
            k = key.removeprefix("gpt_neox.")
            if ".attention.query_key_value." in k:  # per head [q | k | v] rows: [H, 3, E, ...]
                split = [lambda v, i=i: v.reshape(H, 3, E, *v.shape[1:])[:, i].reshape(H * E, *v.shape[1:]) for i in range(3)]
                for name, get in zip("qkv", _split(w.reader(key), split)):
                    out[k.replace("attention.query_key_value", f"self_attn.{name}_proj")] = get
                continue
            for a, b in rename.items():
                k = k.replace(a, b)
            out[k] = w.reader(key)
        return Weights(out)
    for key in w:
        k = key.removeprefix("model.")
        if k.endswith(("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight")):  # Phi-3's fused weights
            fused, parts = ("qkv_proj", "qkv") if "qkv" in k else ("gate_up_proj", ("gate", "up"))
            split = [lambda v, n=n: v[rows[n]] for n in parts]
            for name, get in zip(parts, _split(w.reader(key), split)):
                out[k.replace(fused, f"{name}_proj")] = get
        else:
            out[k] = w.reader(key)
    return Weights(out)


def _llama(cfg: Config, w: Weights, dtype=None, mesh=None) -> Transformer:
    w, place = _canonical(cfg, w), placer(dtype, mesh)
    off = np.float32(1.0 if cfg.family in GEMMA else 0.0)
    blocks = llama_blocks(cfg, lambda l, name: w[f"layers.{l}.{name}"], norm_offset=off, dtype=dtype, mesh=mesh)
    W_E = place("W_E", w["embed_tokens.weight"])
    W_U = place("W_U", W_E.T if cfg.tied_embeddings or "lm_head.weight" not in w else w["lm_head.weight"].T)
    lnf_b = place("lnf_b", w["norm.bias"]) if cfg.normalization == "layernorm" else None
    return Transformer(cfg=cfg, W_E=W_E, blocks=blocks, W_U=W_U, lnf_w=place("lnf_w", w["norm.weight"] + off), lnf_b=lnf_b)


def load_hf(path: str | Path, dtype=None, *, mesh=None) -> Transformer:
    """Load a Hugging Face directory (`config.json` + `*.safetensors`, or shards listed in
    `model.safetensors.index.json`) of any family in `FAMILIES`, weights in float32 or `dtype` (norm weights
    stay float32, see `weight_dtype`). Tensors are read one at a time, straight into the model's arrays; with
    `mesh` (`make_mesh`), each weight goes straight into its shards on the mesh's devices, laid out as
    `shard_model` lays them (tensor-parallel over `model`), so no device ever holds a whole copy."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face model directory")
    cfg = config_from_hf(read_json(path / "config.json"), path / "config.json")
    weights = _read_weights(path)
    dtype = None if dtype is None else model_dtype(dtype)
    try:
        if cfg.family == "gpt2":
            return _gpt2(cfg, weights, placer(dtype, mesh))
        return _llama(cfg, weights, dtype, mesh)
    except (NonFiniteWeights, _Unreadable):
        raise  # already names the file and the tensor
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


def export_hf(model: Transformer, path: str | Path, tokenizer=None, *, shard_size: int | None = None) -> Path:
    """Write `config.json` + `model.safetensors` that transformers / TransformerLens load as-is (the layout of
    `cfg.family`, Hugging Face's model_type); with a `Tokenizer`, also `tokenizer.json` (+ a minimal
    `tokenizer_config.json`). With `shard_size` (bytes), weights beyond it are split into
    `model-0000i-of-0000n.safetensors` shards listed in `model.safetensors.index.json`."""
    cfg, b = model.cfg, model.blocks
    path = Path(path)
    L, D, H = cfg.n_layers, cfg.d_model, cfg.n_heads
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
    elif cfg.family in FAMILIES:
        w, hf = _export_llama_layout(model)
    else:
        raise NotImplementedError(f"export needs a Hugging Face family ({', '.join(FAMILIES)}); this model's config "
                                  f"has family={cfg.family!r}")  # fmt: skip
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, key) is not None:
            hf[key] = getattr(cfg, key)
    hf["torch_dtype"] = "float32"
    path.mkdir(parents=True, exist_ok=True)  # only now: a refused model leaves no directory behind
    # each file is written whole (temporary name, then rename): an interrupted export leaves no half file
    write_text(path / "config.json", json.dumps(hf, indent=2))
    _write_weights(path, w, shard_size)
    if tokenizer is not None:
        with atomic_path(path / "tokenizer.json") as tmp:
            tokenizer.tok.save(str(tmp))
        special = {f"{k}_token": tokenizer.tok.id_to_token(getattr(tokenizer, f"{k}_token_id"))
                   for k in ("bos", "eos", "pad") if getattr(tokenizer, f"{k}_token_id") is not None}  # fmt: skip
        write_text(path / "tokenizer_config.json", json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **special}))
    return path


def _write_weights(path: Path, w: dict[str, np.ndarray], shard_size: int | None) -> None:
    total = sum(a.nbytes for a in w.values())
    for old in [*path.glob("model-*-of-*.safetensors"), path / INDEX, path / "model.safetensors"]:
        old.unlink(missing_ok=True)  # a previous export's files would shadow or mix with these
    if shard_size is None or total <= shard_size:
        with atomic_path(path / "model.safetensors") as tmp:
            save_file(w, str(tmp), metadata={"format": "pt"})
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k, a in w.items():
        if shards[-1] and size + a.nbytes > shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = a
        size += a.nbytes
    n = len(shards)
    weight_map = {}
    for i, part in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        with atomic_path(path / name) as tmp:
            save_file(part, str(tmp), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    write_text(path / INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
         "gemma3_text": "Gemma3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "phi3": "Phi3ForCausalLM",
         "olmo2": "Olmo2ForCausalLM"}  # fmt: skip
_HF_ACT = {"silu": "silu", "gelu_new": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"}


def _refuse(cfg: Config, what: str) -> NotImplementedError:
    return NotImplementedError(f"family {cfg.family!r} cannot express {what} in its config.json; export refused")


def _check_exportable(cfg: Config) -> None:
    """Refuse a config whose options the family's config.json cannot state (the export would silently differ)."""
    f = cfg.family
    gemma, post = f in GEMMA, f in ("gemma2", "gemma3_text", "olmo2")
    want = dict(
        embedding_multiplier=cfg.d_model**0.5 if gemma else 1.0,
        post_attn_norm=post, post_mlp_norm=post, pre_norm=f != "olmo2",
        qk_norm=f in ("qwen3", "gemma3_text", "olmo2"), qk_norm_scope="all" if f == "olmo2" else "head",
        normalization="layernorm" if f == "gpt_neox" else "rmsnorm", gated_mlp=f != "gpt_neox",
        positional="rotary", causal=True, unembed_bias=False, final_norm_eps=None,
    )
    if f != "gpt_neox":
        want["parallel_residual"] = False
    if f not in ("gemma2", "gemma3_text"):
        want.update(attn_softcap=None, final_softcap=None, attn_scale=None)
    if f != "gemma3_text":
        want["rope_local_theta"] = None
    for k, v in want.items():
        if getattr(cfg, k) != v:
            raise _refuse(cfg, f"{k}={getattr(cfg, k)!r} (it implies {v!r})")
    if f == "gpt_neox" and cfg.attn_bias != cfg.mlp_bias:
        raise _refuse(cfg, "attn_bias != mlp_bias")
    if f in ("qwen2",) and not cfg.attn_bias:
        raise _refuse(cfg, "attn_bias=False (Qwen2 always has q/k/v biases)")
    if f in ("phi3", "gemma", "gemma2", "gemma3_text", "olmo2", "mistral", "qwen2", "qwen3") and cfg.mlp_bias:
        raise _refuse(cfg, "mlp_bias=True")
    if cfg.layer_types is not None and f not in ("gemma2", "gemma3_text", "qwen2", "qwen3"):
        raise _refuse(cfg, "per-layer layer_types")


def _export_llama_layout(model: Transformer) -> tuple[dict[str, np.ndarray], dict]:
    """`(weights, config.json dict)` of every family but GPT-2."""
    cfg, b = model.cfg, model.blocks
    _check_exportable(cfg)
    f = cfg.family
    L, D, H, K, E, M = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_mlp
    off = np.float32(1.0) if f in GEMMA else np.float32(0.0)
    names = layer_names(cfg)
    if f == "qwen2" and b.b_O is not None and np.any(np.asarray(b.b_O)):
        raise _refuse(cfg, "a nonzero attention output bias b_O")
    w: dict[str, np.ndarray] = {}
    for l in range(L):
        layer = {}
        for field, name in names.items():
            a = _to_hf(cfg, field)(np.asarray(getattr(b, field)[l], np.float32))
            layer[name] = _np(a - off if field in _RMS_FIELDS else a)
        if f == "phi3":
            layer["self_attn.qkv_proj.weight"] = np.concatenate([layer.pop(f"self_attn.{n}_proj.weight") for n in "qkv"])
            layer["mlp.gate_up_proj.weight"] = np.concatenate([layer.pop("mlp.gate_proj.weight"), layer.pop("mlp.up_proj.weight")])
        if f == "gpt_neox":
            renamed = {}
            for kind in ("weight", "bias"):
                parts = [layer.pop(f"self_attn.{n}_proj.{kind}", None) for n in "qkv"]
                if parts[0] is not None:
                    qkv = np.stack([p.reshape(H, E, *p.shape[1:]) for p in parts], axis=1)  # [H, 3, E, ...]
                    renamed[f"attention.query_key_value.{kind}"] = _np(qkv.reshape(3 * H * E, *parts[0].shape[1:]))
            for k, v in layer.items():
                for a_, b_ in (("self_attn.o_proj.", "attention.dense."), ("mlp.up_proj.", "mlp.dense_h_to_4h."),
                               ("mlp.down_proj.", "mlp.dense_4h_to_h.")):  # fmt: skip
                    k = k.replace(a_, b_)
                renamed[k] = v
            layer = renamed
        prefix = f"gpt_neox.layers.{l}." if f == "gpt_neox" else f"model.layers.{l}."
        w.update({prefix + k: v for k, v in layer.items()})
    if f == "gpt_neox":
        w["gpt_neox.embed_in.weight"] = _np(model.W_E)
        w["gpt_neox.final_layer_norm.weight"] = _np(model.lnf_w)
        w["gpt_neox.final_layer_norm.bias"] = _np(model.lnf_b)
        if not cfg.tied_embeddings:
            w["embed_out.weight"] = _np(np.asarray(model.W_U).T)
    else:
        w["model.embed_tokens.weight"] = _np(model.W_E)
        w["model.norm.weight"] = _np(np.asarray(model.lnf_w, np.float32) - off)
        if not cfg.tied_embeddings:
            w["lm_head.weight"] = _np(np.asarray(model.W_U).T)
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta, **dict(cfg.rope_scaling or ())}
    if cfg.rotary_dim is not None:
        rope["partial_rotary_factor"] = cfg.rotary_dim / E
    rope = {k: list(v) if isinstance(v, tuple) else v for k, v in rope.items()}
    hf = {
        "architectures": [_ARCH[f]], "model_type": f, "hidden_size": D, "num_attention_heads": H,
        "num_key_value_heads": K, "head_dim": E, "num_hidden_layers": L, "intermediate_size": M,
        "vocab_size": cfg.d_vocab, "max_position_embeddings": cfg.n_ctx, "tie_word_embeddings": cfg.tied_embeddings,
        "rope_theta": cfg.rope_theta, "rope_parameters": rope, "attention_dropout": 0.0,
    }  # fmt: skip
    if f == "gpt_neox":
        hf.update(layer_norm_eps=cfg.norm_eps, hidden_act=_HF_ACT[cfg.act], use_parallel_residual=cfg.parallel_residual,
                  attention_bias=cfg.attn_bias, rotary_pct=(cfg.rotary_dim or E) / E, rotary_emb_base=cfg.rope_theta,
                  hidden_dropout=0.0)  # fmt: skip
        hf.pop("num_key_value_heads")
        hf.pop("head_dim")
        if K != H or E * H != D:
            raise _refuse(cfg, "grouped-query attention or d_head * n_heads != d_model")
    else:
        act_key = "hidden_activation" if f in ("gemma2", "gemma3_text") else "hidden_act"
        hf.update({"rms_norm_eps": cfg.norm_eps, act_key: _HF_ACT[cfg.act], "attention_bias": cfg.attn_bias,
                   "mlp_bias": cfg.mlp_bias})  # fmt: skip
    if f == "phi3":
        hf["partial_rotary_factor"] = (cfg.rotary_dim or E) / E
        hf["original_max_position_embeddings"] = cfg.n_ctx
        if E * H != D:
            raise _refuse(cfg, "d_head * n_heads != d_model")
    if f in ("gemma2", "gemma3_text"):
        qpas = cfg.attn_scale**-2 if cfg.attn_scale is not None else float(E)
        hf.update(query_pre_attn_scalar=round(qpas) if abs(qpas - round(qpas)) < 1e-6 * qpas else qpas,
                  attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap)  # fmt: skip
    if f == "gemma3_text":
        local = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
        hf["rope_parameters"] = {"full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": local}}
        hf["rope_local_base_freq"] = local
    hf["sliding_window"] = cfg.sliding_window
    if f in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = cfg.sliding_window is not None
        hf["max_window_layers"] = 0
    if cfg.sliding_window is not None or f in ("gemma2", "gemma3_text", "qwen2", "qwen3"):
        hf["layer_types"] = ["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers]
    return w, hf
