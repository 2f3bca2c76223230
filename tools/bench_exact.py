#!/usr/bin/env python3
"""Cost of exact rows (patches P4, P5: every batch row takes the one-row kernels) vs the fast
kernels: prompt prefill and one-token decode speed at a given context, and with --curve the device
curve (one decode of n rows, all returning logits, n = 1..64) in both modes; interleaved runs,
medians and ratios.

    python tools/bench_exact.py -m smollm2-135m --context 1024 --runs 5
    python tools/bench_exact.py -m smollm2-135m --context 256 --runs 5 --curve
    python tools/bench_exact.py -m smollm2-135m --curve -t 1 --cpu-clock   # on a busy machine
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from edge_mtp.backend import Model, Session
from edge_mtp.models import resolve_model

CURVE = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--curve", action="store_true", help="also the cost of n-row decodes, n = 1..64")
    ap.add_argument("--cpu-clock", action="store_true",
                    help="time with the process's CPU clock: with -t 1 it ignores other load on a shared machine")
    args = ap.parse_args()
    clock = time.process_time if args.cpu_clock else time.perf_counter
    model = Model(resolve_model(args.model))
    n_ctx = args.context + max(args.decode, CURVE[-1]) + 8
    sessions = {mode: Session(model, n_ctx=n_ctx, n_threads=args.threads, exact_rows=(mode == "exact"))
                for mode in ("fast", "exact")}
    prompt = np.random.default_rng(0).integers(100, model.n_vocab - 1, size=args.context).tolist()
    res = {m: {"prefill": [], "decode": []} for m in sessions}
    for _ in range(args.runs):
        for mode, s in sessions.items():
            s.clear()
            t0 = clock()
            s.prefill(prompt)
            t1 = clock()
            tok = 42
            for _ in range(args.decode):
                tok = int(s.decode([tok])[-1].argmax())
            t2 = clock()
            res[mode]["prefill"].append(t1 - t0)
            res[mode]["decode"].append(args.decode / (t2 - t1))
    med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in res.items()}
    print(f"model {args.model}, context {args.context}, {args.threads} threads, median of {args.runs}"
          f"{', CPU clock' if args.cpu_clock else ''}")
    for m in med:
        print(f"  {m:5s} prefill {med[m]['prefill'] * 1e3:8.1f} ms   decode {med[m]['decode']:7.1f} tok/s")
    print(f"  exact/fast: prefill time x{med['exact']['prefill'] / med['fast']['prefill']:.3f}, "
          f"decode speed x{med['exact']['decode'] / med['fast']['decode']:.3f}")
    if args.curve:
        print_curve(sessions, prompt, args.runs, clock)


def print_curve(sessions: dict, prompt: list[int], runs: int, clock) -> None:
    """Time of one decode of n rows after the prompt, per mode, as a table of medians."""
    rng = np.random.default_rng(1)
    for s in sessions.values():
        s.clear()
        s.prefill(prompt)
    base = len(prompt)

    def one(s: Session, n: int) -> float:
        toks = rng.integers(100, s.model.n_vocab - 1, size=n)
        t0 = clock()
        s.decode(toks, logits="all")
        dt = clock() - t0
        s.truncate(base)
        return dt

    times = {m: {n: [] for n in CURVE} for m in sessions}
    for run in range(runs + 1):  # the first round only warms up every graph shape
        for n in CURVE:
            for mode, s in sessions.items():
                dt = one(s, n)
                if run:
                    times[mode][n].append(dt)
    med = {m: {n: statistics.median(v) for n, v in d.items()} for m, d in times.items()}
    print("\n| rows n | fast ms | exact ms | exact / fast | fast cost(n)/cost(1) | exact cost(n)/cost(1) |")
    print("|---|---|---|---|---|---|")
    for n in CURVE:
        f, e = med["fast"][n], med["exact"][n]
        print(f"| {n} | {f * 1e3:.2f} | {e * 1e3:.2f} | {e / f:.2f} | {f / med['fast'][1]:.2f} | "
              f"{e / med['exact'][1]:.2f} |")


if __name__ == "__main__":
    main()
