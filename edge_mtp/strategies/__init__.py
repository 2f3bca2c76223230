"""Decoding strategies: each one decides how the next tokens are produced from one forward pass.

One generation loop (edge_mtp.generation) drives any of them; a strategy never handles stopping,
streaming or timing. A strategy is named "name" or "name:budget" (rows per forward pass).
"""
from __future__ import annotations

from ..errors import RequestError
from .auto import Auto
from .base import Strategy
from .dmtd import Dmtd
from .hybrid import Hybrid
from .lookahead import Lookahead
from .lookup import Lookup
from .plain import Plain
from .probe import Probe

STRATEGIES: dict[str, type[Strategy]] = {"plain": Plain, "probe": Probe, "lookup": Lookup, "auto": Auto,
                                      "dmtd": Dmtd, "hybrid": Hybrid,
                                      "lookahead": Lookahead}


def make_strategy(spec: str, **options) -> Strategy:
    """A fresh strategy from "name" or "name:budget" plus keyword options (e.g. masks=2)."""
    name, _, budget = spec.partition(":")
    cls = STRATEGIES.get(name)
    if cls is None:
        raise RequestError(f"unknown strategy {name!r} (available: {', '.join(STRATEGIES)})")
    if budget:
        if not budget.isdigit() or name == "plain":
            raise RequestError(f"bad strategy {spec!r}: the budget after ':' is a row count (e.g. probe:10)")
        options["budget"] = int(budget)
    try:
        return cls(**options)
    except TypeError as e:
        raise RequestError(f"bad option for strategy {name}: {e}") from None


__all__ = ["Strategy", "STRATEGIES", "make_strategy"]
