"""Frozen model configuration.

One dataclass describes every architecture the project runs: the GPT-2 family
(LayerNorm, learned positions, GELU, biases), the Llama family (RMSNorm, RoPE,
grouped-query attention, SwiGLU) and its relatives (RoPE scaling, sliding-window
and local/global layers, q/k norms, post-norms, soft-capping, parallel residual,
partial rotary: Mistral, Qwen 2/3, Gemma 1-3, GPT-NeoX / Pythia, Phi-3, OLMo-2),
and small attention-only or bidirectional toys. Every family option has a default
that leaves the models before it unchanged. Derived values are properties, never
stored twice.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Normalization = Literal["layernorm", "rmsnorm"] | None
Activation = Literal["gelu", "gelu_new", "relu", "silu"]
Positional = Literal["learned", "rotary", "none"]

ACTIVATIONS = ("gelu", "gelu_new", "relu", "silu")
NORMALIZATIONS = ("layernorm", "rmsnorm", None)
POSITIONALS = ("learned", "rotary", "none")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")  # Hugging Face's `rope_type` names we implement
LAYER_TYPES = ("full_attention", "sliding_attention")  # Hugging Face's per-layer vocabulary
QK_NORM_SCOPES = ("head", "all")
# the settings each RoPE type needs (beyond `rope_type` / `factor`)
_ROPE_NEEDS = {"llama3": ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
               "yarn": ("original_max_position_embeddings",)}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Config:
    """Architecture of a transformer; hashable, so it can be a static jit argument.

    `d_mlp=None` makes an attention-only model. `n_kv_heads` below `n_heads`
    gives grouped-query attention (each kv head serves `n_heads // n_kv_heads`
    consecutive query heads, as in Hugging Face's `repeat_kv`).
    """

    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    d_vocab: int
    n_ctx: int = 2048
    d_mlp: int | None = None
    n_kv_heads: int | None = None
    normalization: Normalization = "layernorm"
    norm_eps: float = 1e-5
    act: Activation = "gelu_new"
    gated_mlp: bool = False
    positional: Positional = "learned"
    rope_theta: float = 10000.0
    attn_scale: float | None = None  # attention scores are q·k times this; None: 1/sqrt(d_head)
    embedding_multiplier: float = 1.0  # token embeddings are scaled by this as they enter the stream (Gemma: sqrt(d_model))
    attn_bias: bool = False
    mlp_bias: bool = False
    unembed_bias: bool = False
    causal: bool = True
    tied_embeddings: bool = False
    family: str = "custom"  # Hugging Face's model_type ("gpt2", "llama", "gemma3_text", ...) or "custom": the export layout
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    default_prepend_bos: bool = False
    # --- family options (each default keeps the models above unchanged) ---
    rope_scaling: tuple[tuple[str, object], ...] | None = None  # HF's rope_scaling / rope_parameters as sorted items
    rope_local_theta: float | None = None  # RoPE base on sliding ("local") layers, unscaled (Gemma 3: 10000)
    rotary_dim: int | None = None  # rotate the first rotary_dim dims of each head only (NeoX, Phi); None: d_head
    sliding_window: int | None = None  # a query attends to the last `sliding_window` keys (itself included)
    layer_types: tuple[str, ...] | None = None  # per layer "full_attention" / "sliding_attention"; None: all
    # sliding if sliding_window is set, else all full
    qk_norm: bool = False  # RMSNorm on q and k before RoPE (Qwen3, Gemma 3, OLMo-2): weights q_norm_w, k_norm_w
    qk_norm_scope: str = "head"  # "head": over d_head per head (q_norm_w [L, E]); "all": over all heads (OLMo-2, [L, H*E])
    post_attn_norm: bool = False  # a norm on the attention output before the residual (ln1_post_w; Gemma 2/3, OLMo-2)
    post_mlp_norm: bool = False  # a norm on the MLP output before the residual (ln2_post_w)
    pre_norm: bool = True  # ln1 / ln2 before attention and MLP (OLMo-2 has none)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the mask (Gemma 2)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    parallel_residual: bool = False  # x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX / Pythia)
    final_norm_eps: float | None = None  # the final norm's epsilon where it differs (penzai's GPT-NeoX); None: norm_eps

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act={self.act!r}; expected one of {ACTIVATIONS}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={self.normalization!r}; expected one of {NORMALIZATIONS}")
        if self.positional not in POSITIONALS:
            raise ValueError(f"positional={self.positional!r}; expected one of {POSITIONALS}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
        if self.attn_scale is not None and not self.attn_scale > 0:
            raise ValueError(f"attn_scale={self.attn_scale!r}; give a positive number, or None for 1/sqrt(d_head)")
        if self.positional == "rotary" and self.d_head % 2:
            raise ValueError(f"rotary embeddings need an even d_head, got {self.d_head}")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.d_head and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim={self.rotary_dim}; give an even number in 2..d_head={self.d_head}, or None")
        self._check_rope_scaling()
        if self.sliding_window is not None and not self.sliding_window >= 1:
            raise ValueError(f"sliding_window={self.sliding_window!r}; give a positive number of keys, or None")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, tuple):
                raise ValueError("layer_types must be a tuple (the config is hashable)")
            if len(self.layer_types) != self.n_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for n_layers={self.n_layers}")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"layer_types holds {bad}; expected each of {LAYER_TYPES}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is None")
        if self.qk_norm_scope not in QK_NORM_SCOPES:
            raise ValueError(f"qk_norm_scope={self.qk_norm_scope!r}; expected one of {QK_NORM_SCOPES}")
        if self.qk_norm and self.positional != "rotary":
            raise ValueError("qk_norm needs rotary positions (the KV cache keeps the rotated keys)")
        if (self.post_attn_norm or self.post_mlp_norm or self.qk_norm) and self.normalization != "rmsnorm":
            raise ValueError("post_attn_norm / post_mlp_norm / qk_norm are RMSNorms: they need normalization='rmsnorm'")
        if not self.pre_norm and self.normalization is None:
            raise ValueError("pre_norm=False is for models with a normalization (set normalization=None for none)")
        if self.post_mlp_norm and self.attn_only:
            raise ValueError("post_mlp_norm needs an MLP (d_mlp is None)")
        for name in ("attn_softcap", "final_softcap"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name}={v!r}; give a positive cap, or None")
        if self.final_norm_eps is not None and not self.final_norm_eps > 0:
            raise ValueError(f"final_norm_eps={self.final_norm_eps!r}; give a positive number, or None for norm_eps")
        if self.parallel_residual and self.attn_only:
            raise ValueError("parallel_residual needs an MLP (d_mlp is None)")

    def _check_rope_scaling(self):
        if self.rope_scaling is None:
            return
        if not isinstance(self.rope_scaling, tuple):
            raise ValueError("rope_scaling must be a tuple of sorted (key, value) items (the config is hashable); "
                             "use rope_scaling_items(dict)")  # fmt: skip
        d = dict(self.rope_scaling)
        kind = d.get("rope_type", d.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise ValueError(f"RoPE scaling type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        if kind != "default" and "factor" not in d and kind != "yarn":
            raise ValueError(f"RoPE scaling type {kind!r} needs a 'factor'")
        missing = [k for k in _ROPE_NEEDS.get(kind, ()) if k not in d]
        if missing:
            raise ValueError(f"RoPE scaling type {kind!r} needs {', '.join(missing)}")

    @property
    def rope_type(self) -> str:
        """Hugging Face's name of the RoPE variant on full-attention layers ("default" when unscaled)."""
        if self.rope_scaling is None:
            return "default"
        d = dict(self.rope_scaling)
        return d.get("rope_type", d.get("type", "default"))

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer, whether it attends through the sliding window."""
        if self.sliding_window is None:
            return (False,) * self.n_layers
        if self.layer_types is None:
            return (True,) * self.n_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    def check_additive(self, what: str, needs: tuple[str, ...] = ("heads", "order")) -> None:
        """Refuse, naming `what`, a method that splits the model into writes that add up where this config's
        do not. `needs`: "heads" (per-head writes sum to what attention adds to the stream: not with a norm on
        the attention output, Gemma 2 / 3, OLMo-2), "order" (a layer's MLP reads its attention's output: not
        with GPT-NeoX's parallel residual), "neurons" (per-neuron writes sum to the MLP's: not with a norm on
        the MLP output), "logits" (logits are linear in the final stream: not with final soft-capping)."""
        problems = {
            "heads": (self.post_attn_norm, "normalises the heads' sum after attention (post_attn_norm)"),
            "order": (self.parallel_residual, "runs attention and MLP in parallel (parallel_residual)"),
            "neurons": (self.post_mlp_norm, "normalises the MLP output (post_mlp_norm)"),
            "logits": (self.final_softcap is not None, "soft-caps the logits (final_softcap)"),
        }
        for need in needs:
            bad, why = problems[need]
            if bad:
                verb = "need" if " and " in what else "needs"
                raise ValueError(f"{what} {verb} writes to the residual stream that add up; this model (family "
                                 f"{self.family!r}) {why}. Node-level methods (patch_sweep, attribution_patch) "
                                 "work on it")  # fmt: skip

    @property
    def rot_dim(self) -> int:
        """How many dims of each head RoPE rotates."""
        return self.rotary_dim or self.d_head

    @property
    def q_norm_size(self) -> int:
        return self.d_head if self.qk_norm_scope == "head" else self.n_heads * self.d_head

    @property
    def k_norm_size(self) -> int:
        return self.d_head if self.qk_norm_scope == "head" else self.kv_heads * self.d_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per kv head."""
        return self.n_heads // self.kv_heads

    @property
    def attn_only(self) -> bool:
        return self.d_mlp is None

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

