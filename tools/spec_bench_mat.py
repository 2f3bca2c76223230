#!/usr/bin/env python3
"""MAT and speed of decoding strategies on a Spec-Bench JSONL, per subtask, interleaved per turn.

Spec-Bench protocol (batch 1, greedy, every turn of a question in order with the chat template,
the model's own answers kept in the conversation); every strategy decodes the same turn right
after plain, so machine noise hits all alike. Reports MAT (generated tokens / forward passes),
tokens/s, speed vs plain, and whether each strategy's tokens were identical to plain's. A small
precursor of `edge-mtp bench` (the bench issue): no chart, no results.json.

    python tools/spec_bench_mat.py --data ../shared/data/spec_bench/dev.jsonl \
        --strategies plain,lookup,probe:4,probe:10,probe:30,probe:60 -n 128 --limit 5
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

from edge_mtp import Engine


def subtask(q: dict) -> str:
    return "mt_bench" if q["question_id"] <= 160 else q["category"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--data", required=True)
    ap.add_argument("--strategies", default="plain,lookup,probe:10")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--limit", type=int, default=0, help="questions per subtask (0 = all)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    strategies = args.strategies.split(",")
    if strategies[0] != "plain":
        strategies.insert(0, "plain")
    questions = [json.loads(line) for line in open(args.data)]
    if args.limit:
        count: dict[str, int] = defaultdict(int)
        kept = []
        for q in questions:
            count[subtask(q)] += 1
            if count[subtask(q)] <= args.limit:
                kept.append(q)
        questions = kept
    engine = Engine(args.model, n_ctx=4096, n_threads=args.threads)
    # per subtask, per strategy: tokens, steps, seconds, mismatching turns, turns
    acc = defaultdict(lambda: defaultdict(lambda: [0, 0, 0.0, 0, 0]))
    for qi, q in enumerate(questions):
        history: list[dict] = []
        for turn in q["turns"]:
            history.append({"role": "user", "content": turn})
            ref = None
            for st in strategies:
                engine.session.clear()  # every strategy evaluates the same prompt from scratch
                r = engine.chat(history, max_tokens=args.n, temperature=0, strategy=st)
                ref = ref or r
                a = acc[subtask(q)][st]
                a[0] += len(r["tokens"])
                a[1] += r["speculation"]["steps"]
                a[2] += r["timings"]["decode_ms"] / 1e3
                a[3] += r["tokens"] != ref["tokens"]
                a[4] += 1
            history.append({"role": "assistant", "content": ref["text"]})
        print(f"[{qi + 1}/{len(questions)}] {subtask(q)} {q['question_id']}", flush=True)
    print(f"\nmodel {args.model}, {args.n} greedy tokens, {args.threads} threads; MAT = tokens / "
          "forward passes (the prompt pass included); speed = decode tok/s vs plain, same run")
    print("| subtask | " + " | ".join(strategies) + " |")
    print("|---|" + "---|" * len(strategies))
    totals = defaultdict(lambda: [0, 0, 0.0, 0, 0])
    for task, per in acc.items():
        cells = []
        for st in strategies:
            tok, steps, secs, bad, turns = per[st]
            for i, v in enumerate(per[st]):
                totals[st][i] += v
            ptok, _, psecs, _, _ = per["plain"]
            cells.append(f"MAT {tok / steps:.2f}, {tok / secs:.0f} tok/s, x{(tok / secs) / (ptok / psecs):.2f}"
                         + ("" if not bad else f", {bad}/{turns} differ"))
        print(f"| {task} | " + " | ".join(cells) + " |")
    ptok, _, psecs, _, _ = totals["plain"]
    print("| overall | " + " | ".join(
        f"MAT {t[0] / t[1]:.2f}, {t[0] / t[2]:.0f} tok/s, x{(t[0] / t[2]) / (ptok / psecs):.2f}"
        + ("" if not t[3] else f", {t[3]}/{t[4]} differ") for t in (totals[s] for s in strategies)) + " |")


if __name__ == "__main__":
    main()
