"""The one protocol every decoding strategy implements."""
from __future__ import annotations

from abc import ABC, abstractmethod

from ..backend import Session
from ..sampling import Sampler


class Strategy(ABC):
    """Turns the last chosen token into the next ones.

    The loop calls `step` with `pending`, a token that was chosen but is not in the KV cache yet.
    The strategy commits it (and whatever it accepts) to the cache and returns the following
    tokens: at least one, the last of which is again pending. `drafted`/`accepted` count proposed
    and verified draft tokens, for the stats.
    """

    name: str = ""

    def __init__(self):
        self.drafted = 0
        self.accepted = 0

    def begin(self, session: Session, prompt: list[int]) -> None:
        """A new request starts (after prefill); reset per-request state."""
        self.drafted = self.accepted = 0

    @abstractmethod
    def step(self, session: Session, sampler: Sampler, pending: int) -> list[int]:
        ...
