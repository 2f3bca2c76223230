#!/usr/bin/env python3
"""Acceptance of prompt-lookup drafts by match length, along the model's own greedy text.

For every position of each greedy answer, the lookup draft for the text so far is compared with
what the model actually produced next (teacher forcing: no timing, no noise). A draft token
counts as a trial of match length l (the tokens shared by the text's suffix and the earlier
occurrence, lengthened by one per accepted token) and as a hit if it equals the model's token.
These rates are the priors of auto and hybrid (edge_mtp/strategies/lookup.py, PRIOR).

    python tools/lookup_acceptance.py --data ../shared/data/spec_bench/dev.jsonl -n 128 --limit 10
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import numpy as np

from edge_mtp import Engine
from edge_mtp.strategies.auto import MAX_DRAFT
from edge_mtp.strategies.lookup import LONGEST, Lookup, MatchAcceptance


def subtask(q: dict) -> str:
    return "mt_bench" if q["question_id"] <= 160 else q["category"]


def count(prompt: list[int], answer: list[int], acceptance: MatchAcceptance) -> None:
    lk = Lookup()
    lk.start(prompt)
    for t, tok in enumerate(answer[:-1]):
        lk.history.append(tok)  # the pending token; drafts are for answer[t + 1:]
        match, drafts = lk.find(MAX_DRAFT, longest=LONGEST)
        acceptance.learn(match, drafts, answer[t + 1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--data", required=True)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--limit", type=int, default=0, help="questions per subtask (0 = all)")
    ap.add_argument("-t", "--threads", type=int, default=None)
    args = ap.parse_args()
    engine = Engine(args.model, n_ctx=4096, n_threads=args.threads, strategy="plain")
    seen: dict[str, int] = defaultdict(int)
    per_task: dict[str, MatchAcceptance] = {}
    for line in open(args.data):
        q = json.loads(line)
        task = subtask(q)
        seen[task] += 1
        if args.limit and seen[task] > args.limit:
            continue
        acceptance = per_task.setdefault(task, MatchAcceptance(prior_weight=0.0))
        history: list[dict] = []
        for turn in q["turns"]:
            history.append({"role": "user", "content": turn})
            prompt = engine.model.chat_tokens(history)
            r = engine.chat(history, max_tokens=args.n, temperature=0)
            count(prompt, r["tokens"], acceptance)
            history.append({"role": "assistant", "content": r["text"]})
        print(f"{task} {q['question_id']}", file=sys.stderr, flush=True)
    pooled = MatchAcceptance(prior_weight=0.0)
    pooled.trials = sum(a.trials for a in per_task.values())
    pooled.hits = sum(a.hits for a in per_task.values())
    print("| subtask | " + " | ".join(f"l={i}" for i in range(1, LONGEST + 1)) + " |")
    print("|---|" + "---|" * LONGEST)
    for task, a in [*per_task.items(), ("all", pooled)]:
        t, h = a.trials, a.hits
        cells = [f"{h[i] / t[i]:.2f} ({int(t[i])})" if t[i] else "-" for i in range(1, LONGEST + 1)]
        print(f"| {task} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
