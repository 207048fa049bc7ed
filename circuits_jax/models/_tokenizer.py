"""Tokenizer helpers with explicit BOS handling and padded batches.

Wraps a `tokenizers.Tokenizer`. Whether a BOS token is prepended is always an
explicit choice; `None` means "the model's own setting" (SmolLM2's GGUF says
no BOS, GPT-2 habitually uses one).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tokenizers


class Tokenizer:
    """A `tokenizers` tokenizer with explicit BOS handling, padded batches and single-token checks."""

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                 default_prepend_bos: bool = False):  # fmt: skip
        self.tok = tok
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
        self.default_prepend_bos = default_prepend_bos

    def __repr__(self) -> str:  # the special tokens and the BOS default, not the vocabulary
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, eos_token_id={self.eos_token_id}, "
                f"pad_token_id={self.pad_token_id}, default_prepend_bos={self.default_prepend_bos})")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def _bos(self, prepend_bos: bool | None) -> list[int]:
        use = self.default_prepend_bos if prepend_bos is None else prepend_bos
        if use and self.bos_token_id is None:
            raise ValueError("prepend_bos=True, but this tokenizer has no BOS token")
        return [self.bos_token_id] if use else []

    def encode(self, text: str, prepend_bos: bool | None = None) -> list[int]:
        return self._bos(prepend_bos) + self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in np.ravel(ids)], skip_special_tokens=False)

    def to_tokens(self, text: str | Sequence[str], prepend_bos: bool | None = None) -> np.ndarray:
        """int32 `[B, T]` for one text or several of equal token length (see `to_padded` otherwise)."""
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.encode(t, prepend_bos) for t in texts]
        if len({len(r) for r in rows}) > 1:
            lens = {t: len(r) for t, r in zip(texts, rows)}
            raise ValueError(f"texts tokenize to different lengths {lens}; use to_padded(...) for a padded batch")
        return np.asarray(rows, np.int32)

    def to_padded(self, texts: Sequence[str], prepend_bos: bool | None = None, padding_side: str = "right"):
        """`(tokens [B, T], attention_mask [B, T])` for texts of any lengths; pass the mask to `run`."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows = [self.encode(t, prepend_bos) for t in texts]
        T = max(len(r) for r in rows)
        tokens = np.full((len(rows), T), self.pad_token_id, np.int32)
        mask = np.zeros((len(rows), T), bool)
        for i, r in enumerate(rows):
            sl = slice(0, len(r)) if padding_side == "right" else slice(T - len(r), T)
            tokens[i, sl], mask[i, sl] = r, True
        return tokens, mask

    def to_str_tokens(self, text_or_ids, prepend_bos: bool | None = None) -> list[str]:
        ids = self.encode(text_or_ids, prepend_bos) if isinstance(text_or_ids, str) else np.ravel(text_or_ids)
        return [self.decode([i]) for i in ids]

    def to_single_token(self, text: str) -> int:
        ids = self.encode(text, prepend_bos=False)
        if len(ids) != 1:
            pieces = [self.decode([i]) for i in ids]
            raise ValueError(f"{text!r} is not a single token: it splits into {len(ids)} tokens {pieces} (ids {ids})")
        return ids[0]
