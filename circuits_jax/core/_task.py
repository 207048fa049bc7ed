"""An experiment as a value: `Task` holds what every technique reads.

clean inputs, optional corrupt inputs, the metric, the scored positions and the attention mask
(plus, where known, the true circuit). Techniques take `(model, task, ...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: `clean` (and optionally `corrupt`) int32 `[B, T]`, and `metric`, a function of the
    logits at the scored positions (`[B, V]`, or `[B, n, V]` with several positions per row) to a scalar.

    corrupt: the inputs that resample ablation takes values from; None when the task is only
        ablated by zero or mean (`ablation="zero" | "mean"` of every technique).
    answers / wrong: int `[B]` (or `[B, n]` for several) token ids the metric reads.
    answer_pos: int `[B]` scored position of each row, or `[B, n]` several per row (a task whose
        output is a sequence), or None (the last real token).
    reference: int `[N, T']` inputs whose mean activations `ablation="mean"` uses (None: the clean
        batch), with `reference_mask` for padding.
    prompts / corrupt_prompts: the texts, when the task came from text.
    truth: `[sources, destinations]` bool over `Graph.of(cfg)` where the circuit is known, with
    `truth_ablation`, the ablation it was defined under.
    """

    name: str
    clean: np.ndarray
    corrupt: np.ndarray | None = None
    metric: Callable | None = None
    answers: np.ndarray | None = None
    wrong: np.ndarray | None = None
    attention_mask: np.ndarray | None = None
    answer_pos: np.ndarray | None = None
    prompts: list[str] | None = None
    corrupt_prompts: list[str] | None = None
    truth: np.ndarray | None = None
    truth_ablation: str | None = None
    reference: np.ndarray | None = None
    reference_mask: np.ndarray | None = None
    notes: str = ""

    def __repr__(self) -> str:  # shapes and names, not array contents (see _repr.py)
        from ._repr import summary

        return summary(self, drop_none=True)

    def __post_init__(self):
        _set = object.__setattr__  # frozen: the checked arrays are set once, here
        _set(self, "clean", np.atleast_2d(np.asarray(self.clean, np.int32)))
        if self.corrupt is not None:
            _set(self, "corrupt", np.atleast_2d(np.asarray(self.corrupt, np.int32)))
            if self.clean.shape != self.corrupt.shape:
                raise ValueError(
                    f"task {self.name!r}: clean tokens have shape {self.clean.shape} and corrupt tokens {self.corrupt.shape}; "
                    "patching needs aligned prompts of equal length (pad them with Tokenizer.to_padded and pass "
                    "attention_mask)"
                )
        if self.reference is not None:
            _set(self, "reference", np.atleast_2d(np.asarray(self.reference, np.int32)))

    @property
    def kwargs(self) -> dict:
        """The keyword arguments every circuit function takes: `attention_mask`, `answer_pos`."""
        return dict(attention_mask=self.attention_mask, answer_pos=self.answer_pos)
