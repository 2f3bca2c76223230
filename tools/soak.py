#!/usr/bin/env python3
"""Soak: generate with every strategy until the context is full, again and again, on one Engine,
checking each answer against plain decoding's and watching memory.

Context policy (edge-mtp's, for every strategy): when prompt + answer fill n_ctx the answer ends
with finish_reason "length"; there is no context shift, so no strategy ever sees a cache that plain
decoding would not. Each round takes the next question of a Spec-Bench-style JSONL as a raw prompt
(no chat template, so the model keeps writing instead of ending its turn), runs plain, then every
other strategy on the same Engine, and compares tokens. Exit code 1 on any mismatch.

    python tools/soak.py --data ../shared/data/spec_bench/dev.jsonl --minutes 30 -c 1024
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_mtp import Engine  # noqa: E402

LOSSLESS = "plain,probe:4,probe:10,lookup,lookahead:8,hybrid:6,auto"


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--data", required=True, help="JSONL with a 'turns' list per line")
    ap.add_argument("--strategies", default=LOSSLESS, help="plain first: the reference")
    ap.add_argument("-c", "--ctx-size", type=int, default=1024)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=0, help="stop after this many rounds (0: --minutes)")
    args = ap.parse_args()
    strategies = args.strategies.split(",")
    if strategies[0] != "plain":
        strategies.insert(0, "plain")
    prompts = [json.loads(line)["turns"][0] for line in open(args.data) if line.strip()]
    totals = {s: {"rounds": 0, "tokens": 0, "length": 0, "mismatches": 0, "seconds": 0.0} for s in strategies}
    with Engine(args.model, n_ctx=args.ctx_size, n_threads=args.threads, strategy="plain") as engine:
        rss0, t_end, rnd = rss_mb(), time.time() + args.minutes * 60, 0
        while (rnd < args.rounds) if args.rounds else (time.time() < t_end):
            prompt = prompts[rnd % len(prompts)]
            if len(engine.tokenize(prompt)) >= args.ctx_size - 8:
                rnd += 1
                continue
            ref = None
            for s in strategies:
                t0 = time.perf_counter()
                r = engine.generate(prompt, max_tokens=-1, temperature=0, strategy=s)
                t = totals[s]
                t["seconds"] += time.perf_counter() - t0
                t["rounds"] += 1
                t["tokens"] += len(r["tokens"])
                t["length"] += r["choices"][0]["finish_reason"] == "length"
                if ref is None:
                    ref = r["tokens"]
                elif r["tokens"] != ref:
                    t["mismatches"] += 1
                    print(f"MISMATCH round {rnd} {s}: first difference at token "
                          f"{next(i for i, (a, b) in enumerate(zip(ref + [-1], r['tokens'] + [-2])) if a != b)}")
            rnd += 1
            print(f"round {rnd}: {len(ref)} tokens, RSS {rss_mb():.0f} MB", flush=True)
        print(f"\n{rnd} rounds, n_ctx {args.ctx_size}; RSS {rss0:.0f} -> {rss_mb():.0f} MB")
    print("| strategy | rounds | tokens | ended by length | mismatches | tok/s |\n|---|---:|---:|---:|---:|---:|")
    for s, t in totals.items():
        print(f"| {s} | {t['rounds']} | {t['tokens']} | {t['length']} | {t['mismatches']} | "
              f"{t['tokens'] / t['seconds'] if t['seconds'] else 0:.1f} |")
    return 1 if any(t["mismatches"] for t in totals.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
