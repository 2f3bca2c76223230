#!/usr/bin/env python3
"""Cost of exact rows (patch P4: ggml's reference attention kernels) vs the fast kernels: prompt
prefill and one-token decode speed at a given context, interleaved runs, medians and ratios.

    python tools/bench_exact.py -m smollm2-135m --context 1024 --runs 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from edge_mtp.backend import Model, Session
from edge_mtp.models import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    model = Model(resolve_model(args.model))
    sessions = {mode: Session(model, n_ctx=args.context + args.decode + 8, n_threads=args.threads,
                              exact_rows=(mode == "exact")) for mode in ("fast", "exact")}
    prompt = np.random.default_rng(0).integers(100, model.n_vocab - 1, size=args.context).tolist()
    res = {m: {"prefill": [], "decode": []} for m in sessions}
    for _ in range(args.runs):
        for mode, s in sessions.items():
            s.clear()
            t0 = time.perf_counter()
            s.prefill(prompt)
            t1 = time.perf_counter()
            tok = 42
            for _ in range(args.decode):
                tok = int(s.decode([tok])[-1].argmax())
            t2 = time.perf_counter()
            res[mode]["prefill"].append(t1 - t0)
            res[mode]["decode"].append(args.decode / (t2 - t1))
    med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in res.items()}
    print(f"model {args.model}, context {args.context}, {args.threads} threads, median of {args.runs}")
    for m in med:
        print(f"  {m:5s} prefill {med[m]['prefill'] * 1e3:8.1f} ms   decode {med[m]['decode']:7.1f} tok/s")
    print(f"  exact/fast: prefill time x{med['exact']['prefill'] / med['fast']['prefill']:.3f}, "
          f"decode speed x{med['exact']['decode'] / med['fast']['decode']:.3f}")


if __name__ == "__main__":
    main()
