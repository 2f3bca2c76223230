#!/usr/bin/env python3
"""Plain decoding speed of edge-mtp vs llama-cpp-python's stock `Llama`, same model, same prompt.

Runs are interleaved (ours, stock, ours, ...) so machine noise hits both alike; prints the median
decode tokens/s of each and their ratio, and checks that both produced the same greedy tokens.

    python tools/compare_stock.py -m smollm2-135m -n 128 --runs 5
"""
from __future__ import annotations

import argparse
import statistics
import time

from edge_mtp import Engine
from edge_mtp.models import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("-p", "--prompt", default="The capital of France is")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    from llama_cpp import Llama

    path = str(resolve_model(args.model))
    ours = Engine(path, n_ctx=2048, n_threads=args.threads, strategy="plain")
    stock = Llama(path, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                  flash_attn=True, verbose=False)  # edge-mtp's default too
    ids = stock.tokenize(args.prompt.encode(), special=True)

    def run_stock() -> tuple[float, list[int]]:
        stock.reset()
        out, t0 = [], None
        for tok in stock.generate(ids, temp=0.0, reset=True):
            if t0 is None:  # first token comes from the prompt pass, as in our timings
                t0 = time.perf_counter()
            if ours.model.is_eog(tok):
                break
            out.append(tok)
            if len(out) == args.n:
                break
        return (len(out) - 1) / (time.perf_counter() - t0), out

    def run_ours() -> tuple[float, list[int]]:
        ours.session.clear()  # no prompt cache: both sides evaluate the prompt every run
        r = ours.generate(args.prompt, max_tokens=args.n, temperature=0.0)
        return r["timings"]["tokens_per_second"], r["tokens"]

    speeds = {"edge-mtp": [], "stock": []}
    outputs = {}
    for _ in range(args.runs):
        for name, fn in (("edge-mtp", run_ours), ("stock", run_stock)):
            tps, toks = fn()
            speeds[name].append(tps)
            outputs[name] = toks
    med = {k: statistics.median(v) for k, v in speeds.items()}
    print(f"model {args.model}, {args.n} greedy tokens, {args.threads} threads, {args.runs} interleaved runs")
    for k, v in speeds.items():
        print(f"  {k:9s} median {med[k]:7.1f} tok/s   runs: {', '.join(f'{x:.1f}' for x in v)}")
    print(f"  ratio edge-mtp / stock: {med['edge-mtp'] / med['stock']:.3f}")
    print(f"  identical tokens: {outputs['edge-mtp'] == outputs['stock']}")


if __name__ == "__main__":
    main()
