"""An experiment as a value: `Task` holds what every technique reads.

clean inputs, optional corrupt inputs, the metric, the scored positions and the attention mask
(plus, where known, the true circuit). Techniques take `(model, task, ...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass
class Task:
    """One task: `clean`/`corrupt` int32 `[B, T]`, `metric` `[B, V] -> scalar` at the scored positions.

    answers / wrong: int `[B]` (or `[B, n]` for several) token ids the metric reads.
    answer_pos: int `[B]` scored position of each row, or None (the last real token).
    prompts / corrupt_prompts: the texts, when the task came from text.
    truth: `[sources, destinations]` bool over `Graph.of(cfg)` where the circuit is known, with
    `truth_ablation`, the ablation it was defined under.
    """

    name: str
    clean: np.ndarray
    corrupt: np.ndarray
    metric: Callable
    answers: np.ndarray | None = None
    wrong: np.ndarray | None = None
    attention_mask: np.ndarray | None = None
    answer_pos: np.ndarray | None = None
    prompts: list[str] | None = None
    corrupt_prompts: list[str] | None = None
    truth: np.ndarray | None = None
    truth_ablation: str | None = None
    notes: str = ""

    def __repr__(self) -> str:  # shapes and names, not array contents (see _repr.py)
        from ._repr import summary

        return summary(self, drop_none=True)

    def __post_init__(self):
        self.clean = np.atleast_2d(np.asarray(self.clean, np.int32))
        self.corrupt = np.atleast_2d(np.asarray(self.corrupt, np.int32))
        if self.clean.shape != self.corrupt.shape:
            raise ValueError(f"task {self.name!r}: clean tokens {self.clean.shape} and corrupt tokens {self.corrupt.shape} differ in shape")

    @property
    def kwargs(self) -> dict:
        """The keyword arguments every circuit function takes: `attention_mask`, `answer_pos`."""
        return dict(attention_mask=self.attention_mask, answer_pos=self.answer_pos)
