#!/usr/bin/env python3
"""Cost of a token-tree decode (patch P2) vs an ordinary batch of the same size, and the device's
batch-cost curve (cost of n rows / cost of 1 row), after a fixed context; then the commit's cost
per kept token, flash attention on and off.

Every measurement is interleaved (ordinary, tree, ordinary, ...) and the median of --runs is shown,
so machine noise hits both alike. Not a test: timings belong in benchmarks.

    python tools/bench_native.py -m smollm2-135m --context 256 --runs 9
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from edge_mtp.backend import Model, Session
from edge_mtp.models import resolve_model

SIZES = (1, 2, 4, 8, 16, 32, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()

    model = Model(resolve_model(args.model))
    s = Session(model, n_ctx=args.context + 128, n_threads=args.threads)
    rng = np.random.default_rng(0)
    s.prefill(rng.integers(100, model.n_vocab - 1, size=args.context).tolist())
    base = s.n_past

    def ordinary(n: int) -> float:
        toks = rng.integers(100, model.n_vocab - 1, size=n)
        t0 = time.perf_counter()
        s.decode(toks, logits="all")
        dt = time.perf_counter() - t0
        s.truncate(base)
        return dt

    def tree(n: int) -> float:
        toks = rng.integers(100, model.n_vocab - 1, size=n).astype(np.int32)
        parents = ((np.arange(n) - 1) // 2).astype(np.int32)  # a binary tree, breadth-first
        t0 = time.perf_counter()
        s.decode(toks, parents)
        dt = time.perf_counter() - t0
        s.commit([])
        return dt

    for n in SIZES:  # warm up every graph shape once
        ordinary(n), tree(n)
    times = {n: {"ordinary": [], "tree": []} for n in SIZES}
    for _ in range(args.runs):
        for n in SIZES:
            times[n]["ordinary"].append(ordinary(n))
            times[n]["tree"].append(tree(n))
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in times.items()}
    one = med[1]["ordinary"]
    print(f"model {args.model}, context {args.context}, {args.threads} threads, median of {args.runs} "
          "interleaved runs; all rows return logits")
    print("| rows n | ordinary ms | tree ms | tree / ordinary | cost(n) / cost(1) | n / cost(n) |")
    print("|---|---|---|---|---|---|")
    for n in SIZES:
        o, t = med[n]["ordinary"], med[n]["tree"]
        print(f"| {n} | {o * 1e3:.2f} | {t * 1e3:.2f} | {t / o:.3f} | {o / one:.2f} | {n * one / o:.2f} |")

    # the commit: a 15-row binary tree keeping the path 0-2-6-14 (3 of its 4 rows change cell)
    parents, path = ((np.arange(15) - 1) // 2).astype(np.int32), [0, 2, 6, 14]
    print(f"\ncommit of a 15-row tree keeping {len(path)} rows, median of {100 * args.runs}")
    for flash in (True, False):
        c = Session(model, n_ctx=args.context + 128, n_threads=args.threads, flash_attn=flash)
        c.prefill(rng.integers(100, model.n_vocab - 1, size=args.context).tolist())
        spent = []
        for _ in range(100 * args.runs):
            c.decode(rng.integers(100, model.n_vocab - 1, size=15).astype(np.int32), parents)
            t0 = time.perf_counter()
            c.commit(path)
            spent.append(time.perf_counter() - t0)
            c.truncate(args.context)
        c.close()
        print(f"  flash attention {'on ' if flash else 'off'}: "
              f"{statistics.median(spent) * 1e6 / len(path):.1f} us per kept token")


if __name__ == "__main__":
    main()
