"""Decoding strategies: each one decides how the next tokens are produced from one forward pass.

One generation loop (edge_mtp.generation) drives any of them; a strategy never handles stopping,
streaming or timing.
"""
from __future__ import annotations

from ..errors import RequestError
from .base import Strategy
from .plain import Plain

STRATEGIES: dict[str, type[Strategy]] = {"plain": Plain}


def make_strategy(name: str) -> Strategy:
    cls = STRATEGIES.get(name)
    if cls is None:
        raise RequestError(f"unknown strategy {name!r} (available: {', '.join(STRATEGIES)})")
    return cls()


__all__ = ["Strategy", "STRATEGIES", "make_strategy"]
