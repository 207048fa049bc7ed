"""Frozen model configuration.

One dataclass describes every architecture the project runs: the GPT-2 family
(LayerNorm, learned positions, GELU, biases), the Llama family (RMSNorm, RoPE,
grouped-query attention, SwiGLU) and small attention-only or bidirectional toys.
Derived values are properties, never stored twice.
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
    family: str = "custom"  # "gpt2" | "llama" | "custom": decides the HF export layout
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    default_prepend_bos: bool = False

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
