#!/usr/bin/env python3
"""Put a deliberately wrong device profile into the cache, to check that auto recovers from it.

The stale-profile failure (measured-facts.md) was a calibration taken on a busy machine, cached
and believed forever. auto's acceptance benchmarks start from such profiles on purpose:

    python tools/what_if_profile.py -m smollm2-135m -t 2 poisoned --factor 3  # every n priced 3x
    python tools/what_if_profile.py -m smollm2-135m -t 2 optimistic         # every n priced at 1.0
    python tools/what_if_profile.py -m smollm2-135m -t 2 clean              # a fresh calibration
    edge-mtp bench -m smollm2-135m -t 2 --strategies plain,auto ...          # then measure

Each writes the profile of the model, thread count and mode with no recorded runs (so auto's
write-back from an earlier benchmark does not mend it before the next one starts); poisoned and
optimistic start from the cached calibration (or a new one).
"""
from __future__ import annotations

import argparse

from edge_mtp.backend import Model, Session
from edge_mtp.models import resolve_model
from edge_mtp.profile import CONTEXT, GRID, load_profile, measure, save_profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--no-exact-rows", dest="exact_rows", action="store_false")
    ap.add_argument("--no-flash-attn", dest="flash_attn", action="store_false")
    ap.add_argument("kind", choices=("poisoned", "optimistic", "clean"))
    ap.add_argument("--factor", type=float, default=3.0, help="poisoned: the cost of n >= 2 rows times this")
    args = ap.parse_args()
    session = Session(Model(resolve_model(args.model)), n_ctx=CONTEXT + GRID[-1] + 1,
                      n_threads=args.threads, flash_attn=args.flash_attn, exact_rows=args.exact_rows)
    prof = load_profile(session) if args.kind != "clean" else None
    if prof is None or not prof.trusted:
        prof = measure(session)
    if args.kind == "poisoned":
        prof.cost = [1.0] + [round(args.factor * c, 4) for c in prof.cost[1:]]
    elif args.kind == "optimistic":
        prof.cost = [1.0] * len(prof.cost)
    prof.runs = []
    save_profile(prof)
    print(f"{args.kind} profile {prof.key}:\n{prof.table()}")


if __name__ == "__main__":
    main()
