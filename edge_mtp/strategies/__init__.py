"""Decoding strategies: each one decides how the next tokens are produced from one forward pass.

One generation loop (edge_mtp.generation) drives any of them; a strategy never handles stopping,
streaming or timing. Every lossless strategy is the one speculative decoder (speculative.py) with
its drafter; plain is that decoder without one; dmtd is its own decoder. A strategy is named
"name" or "name:budget" (rows per forward pass).
"""
from __future__ import annotations

from typing import Callable

from ..errors import RequestError
from .auto import Auto
from .base import Strategy
from .dmtd import Dmtd
from .hybrid import Hybrid
from .lookahead import Lookahead
from .lookup import Lookup
from .probe import Probe
from .speculative import Drafter, Speculative


def speculative(drafter: type[Drafter]):
    """The factory of the speculative decoder with this drafter."""
    return lambda **options: Speculative(drafter(**options))


# name -> factory(**options); tests and tools may register their own
STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "plain": lambda: Speculative(), "probe": speculative(Probe), "lookup": speculative(Lookup),
    "auto": speculative(Auto), "dmtd": Dmtd, "hybrid": speculative(Hybrid),
    "lookahead": speculative(Lookahead)}


def make_strategy(spec: str, model=None, **options) -> Strategy:
    """A fresh strategy from "name" or "name:budget" plus keyword options (e.g. masks=2). With the
    model it will run on, auto on a DMTD model (dmtd.* keys) is DMTD's own decoder, its cycle
    picked from this device's pass costs."""
    name, _, budget = spec.partition(":")
    if name not in STRATEGIES:
        raise RequestError(f"unknown strategy {name!r} (available: {', '.join(STRATEGIES)})")
    if budget:
        if not budget.isdigit() or name == "plain":
            raise RequestError(f"bad strategy {spec!r}: the budget after ':' is a row count (e.g. probe:10)")
        options["budget"] = int(budget)
    if name == "auto" and getattr(model, "dmtd", None) is not None:
        name, options = "dmtd", {"pick_tau": True}
    try:
        return STRATEGIES[name](**options)
    except TypeError as e:
        raise RequestError(f"bad option for strategy {name}: {e}") from None


__all__ = ["Drafter", "Speculative", "Strategy", "STRATEGIES", "make_strategy"]
