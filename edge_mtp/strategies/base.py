"""The protocol the generation loop drives: a strategy turns the pending token into the next ones."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..backend import Session
from ..sampling import Sampler


class Strategy(ABC):
    """Turns the last chosen token into the next ones.

    The loop calls `step` with `pending`, a token that was chosen but is not in the KV cache yet.
    The strategy commits it (and whatever it accepts) to the cache and returns the following
    tokens: at least one, the last of which is again pending. `drafted`/`accepted` count proposed
    and verified draft tokens, `accepted_by_depth[d]` the accepted drafts at tree depth d + 1.
    """

    name: str = ""

    def __init__(self):
        self.begin_request()

    def begin_request(self) -> None:
        """Zero the per-request counts (every prefill starts here)."""
        self.drafted = self.accepted = 0
        self.accepted_by_depth: list[int] = []

    @abstractmethod
    def prefill(self, session: Session, prompt: list[int]) -> np.ndarray:
        """A new request: evaluate the prompt, return the last prompt token's logits."""

    @abstractmethod
    def step(self, session: Session, sampler: Sampler, pending: int) -> list[int]:
        ...

    def finish(self) -> None:
        """The request ended (done, stopped or failed): a strategy that learns keeps what it
        learned here."""

    def stats(self) -> dict:
        """Strategy-specific fields for the result's speculation block."""
        return {}
