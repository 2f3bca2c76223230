"""Plain decoding: one forward pass per token. The reference every other strategy must match."""
from __future__ import annotations

from .base import Strategy


class Plain(Strategy):
    name = "plain"
    verifies = False

    def step(self, session, sampler, pending):
        return [sampler(session.decode([pending])[-1])]
