#!/usr/bin/env python3
"""Record greedy answers once, then measure lookup acceptance and replay auto's policy on them.

auto's decisions depend only on the text so far, the device's cost curve and what earlier drafts
taught it, so once the model's greedy answers are recorded (plain decoding, the bench protocol)
the tokens each policy would accept per pass, and the passes' cost in plain steps, follow without
the model: a policy change is judged in seconds on all of Spec-Bench dev. The replay drives the
real `DraftPolicy` and `Lookup`; it leaves out what only a live run shows (Python time beyond the
policy's own estimate, attention making rows dearer at long contexts, the machine's drift), so
confirm a change with `edge-mtp bench`.

    python tools/auto_replay.py record -m smollm2-135m --data ../shared/data/spec_bench/dev.jsonl \\
        -n 128 --out q41.json
    python tools/auto_replay.py priors q41.json     # a(l) per match-length bucket, the shifts
    python tools/auto_replay.py replay q41.json --profile PROFILE.json [--oracle]

priors prints what lookup.py's PRIOR, FIRST_SHIFT and LATER_SHIFT hold (measured teacher-forced:
every position's draft against the model's own next tokens). PROFILE.json is a calibrated curve
(`edge-mtp calibrate --json`); replay prints the predicted speedup vs plain per subtask.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Callable

import numpy as np

from edge_mtp import Engine
from edge_mtp.backend import Model
from edge_mtp.bench import load_questions, subtask_of
from edge_mtp.models import resolve_model
from edge_mtp.profile import Profile
from edge_mtp.strategies.auto import MAX_DRAFT, DraftPolicy, cost_table
from edge_mtp.strategies.lookup import BUCKET_START, LONGEST, Lookup, MatchAcceptance, bucket, continues_word


def greedy(engine: Engine, prompt: list[int], n: int) -> tuple[list[int], bool]:
    """Plain greedy decoding: (tokens, ended by EOS)."""
    session = engine.session
    session.clear()
    logits = session.prefill(prompt)
    tokens: list[int] = []
    while len(tokens) < n and len(prompt) + len(tokens) < session.n_ctx:
        tok = int(np.argmax(logits))
        if engine.model.is_eog(tok):
            return tokens, True
        tokens.append(tok)
        if len(tokens) < n:
            logits = session.decode([tok])[-1]
    return tokens, False


def record(args) -> None:
    engine = Engine(args.model, n_ctx=args.ctx, n_threads=args.threads, strategy="plain")
    turns = []
    questions = load_questions(args.data, args.limit)
    for i, q in enumerate(questions):
        history: list[dict] = []
        for turn in q["turns"]:
            history.append({"role": "user", "content": turn})
            prompt = engine.model.chat_tokens(history)
            answer, eos = greedy(engine, prompt, args.n)
            turns.append({"subtask": subtask_of(q), "question_id": q["question_id"],
                          "prompt": prompt, "answer": answer, "eos": eos})
            history.append({"role": "assistant", "content": engine.detokenize(answer)})
        print(f"\r{i + 1}/{len(questions)} questions", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "max_new_tokens": args.n, "turns": turns}, f)


def load(args) -> tuple[dict, Callable[[int], bool]]:
    """The recording and continues(token) from the recorded model's vocabulary."""
    rec = json.load(open(args.recording))
    model = Model(resolve_model(args.model or rec["model"]))
    return rec, lambda token: continues_word(model.piece(token))


def drafts_along(turn: dict):
    """(lookup after the pending token, match, draft, the model's true next tokens) at every
    position of a recorded answer (teacher forcing)."""
    answer = turn["answer"]
    lookup = Lookup(budget=MAX_DRAFT + 1)
    lookup.start(turn["prompt"])
    for t in range(len(answer) - 1):
        lookup.history.append(answer[t])
        match, draft = lookup.find(MAX_DRAFT, longest=LONGEST)
        yield lookup, match, draft, answer[t + 1:]


def fit_shift(prior: np.ndarray, hit: np.ndarray) -> float:
    """The logit shift s making mean(sigmoid(logit(prior) + s)) equal the observed hit rate."""
    logit = np.log(prior / (1 - prior))
    lo, hi = -6.0, 6.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(1 / (1 + np.exp(-(logit + mid)))) < hit.mean() else (lo, mid)
    return (lo + hi) / 2


def priors(args) -> None:
    rec, continues = load(args)
    hits, trials = np.zeros(len(BUCKET_START)), np.zeros(len(BUCKET_START))
    base = MatchAcceptance(rate=0.0)  # the shipped priors: the shifts are fitted on top of them
    first, later = defaultdict(list), defaultdict(list)  # kind -> [(prior a, hit)]
    for turn in rec["turns"]:
        for lookup, match, draft, truth in drafts_along(turn):
            agreeing, seen = lookup.support
            agreement = "split" if agreeing < seen else "single" if seen == 1 else "agreed"
            for i, (d, t) in enumerate(zip(draft, truth)):
                b = bucket(match + i)
                trials[b] += 1
                hits[b] += d == t
                kind = continues(d)
                (later[kind] if i else first[agreement, kind]).append((base.at(match + i), d == t))
                if d != t:
                    break
    a = hits / np.maximum(trials, 1)
    print("| match length | " + " | ".join(f"{s}+" for s in BUCKET_START) + " |")
    print("|---|" + "---|" * len(BUCKET_START))
    print("| a(l) | " + " | ".join(f"{x:.3f}" for x in a) + " |")
    print("| drafts | " + " | ".join(str(int(x)) for x in trials) + " |")
    print(f"PRIOR (monotone) = {np.round(np.maximum.accumulate(a), 3).tolist()}")
    print(f"{int(trials.sum())} draft tokens tested")
    for name, groups, keys in (
            ("FIRST_SHIFT", first, [(g, c) for g in ("split", "single", "agreed") for c in (False, True)]),
            ("LATER_SHIFT", later, [False, True])):
        shifts = []
        for key in keys:
            rows = np.array(groups[key], dtype=float).reshape(-1, 2)
            shifts.append(fit_shift(rows[:, 0], rows[:, 1]) if len(rows) else 0.0)
            print(f"  {name} {key}: {len(rows)} drafts, observed {rows[:, 1].mean():.3f}, "
                  f"length alone predicts {rows[:, 0].mean():.3f}, shift {shifts[-1]:+.2f}")
        print(f"{name} = {np.round(shifts, 2).tolist()}")


def replay_turn(turn: dict, cost: np.ndarray, continues, oracle: bool = False) -> tuple[int, float, int]:
    """(decode-phase tokens, their cost in plain steps, plain's steps) for one recorded turn."""
    answer = turn["answer"]
    truth = answer + ([-1] if turn["eos"] else [])  # -1: the EOS step ends the turn
    policy = DraftPolicy(cost, MAX_DRAFT)
    lookup = Lookup(budget=MAX_DRAFT + 1)
    lookup.start(turn["prompt"])
    pos, spent = 0, 0.0  # truth[pos] is the pending token
    while pos + 1 < len(truth):
        lookup.history.append(truth[pos])
        match, drafts = lookup.find(MAX_DRAFT, longest=LONGEST)
        right = next((i for i, (a, b) in enumerate(zip(drafts, truth[pos + 1:])) if a != b),
                     min(len(drafts), len(truth) - pos - 1))
        conts = [continues(t) for t in drafts]
        if oracle:  # the best ratio of tokens to cost this step could have had
            d = max(range(len(drafts) + 1), key=lambda k: (1 + min(k, right)) / cost[k + 1])
        else:
            d = policy.choose(match, len(drafts), conts, lookup.support)
        out = truth[pos + 1:pos + 2 + min(d, right)]
        if drafts:
            policy.learn(match, drafts[:max(d, 1)], out, conts, lookup.support, verified=d > 0)
        spent += cost[d + 1] + policy.overhead["tree" if d else "plain"]
        lookup.history.extend(out[:-1])
        pos += len(out)
    return len(answer) - 1, spent, len(truth) - 1


def replay(args) -> None:
    rec, continues = load(args)
    prof = Profile(**json.load(open(args.profile)))
    cost = cost_table(prof, MAX_DRAFT)
    plain_overhead = DraftPolicy(cost).overhead["plain"]
    sums: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(3))
    for turn in rec["turns"]:
        tokens, spent, plain = replay_turn(turn, cost, continues, args.oracle)
        for key in (turn["subtask"], "overall"):
            sums[key] += (tokens, spent, plain * (1 + plain_overhead))
    print(f"{rec['model']}: predicted speedup vs plain ({'oracle' if args.oracle else 'auto'}; "
          f"2 rows cost {prof.cost_of(2):.2f}x)")
    for key, (tokens, spent, plain) in sums.items():
        print(f"  {key:15s} {plain / spent:.3f}x  ({int(tokens)} tokens)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="greedy answers of a Spec-Bench-schema JSONL")
    r.add_argument("-m", "--model", default="smollm2-135m")
    r.add_argument("--data", required=True)
    r.add_argument("-n", type=int, default=128)
    r.add_argument("--limit", type=int, default=None, help="questions per subtask")
    r.add_argument("-t", "--threads", type=int, default=None)
    r.add_argument("-c", "--ctx", type=int, default=4096)
    r.add_argument("--out", required=True)
    for name, text in (("priors", "acceptance of lookup drafts by match length, and the shifts"),
                       ("replay", "predicted speedup of auto's policy on a recording")):
        p = sub.add_parser(name, help=text)
        p.add_argument("recording")
        p.add_argument("-m", "--model", default=None, help="the recorded model (default: as recorded)")
        if name == "replay":
            p.add_argument("--profile", required=True, help="a profile JSON (edge-mtp calibrate --json)")
            p.add_argument("--oracle", action="store_true", help="the best draft length per step instead")
    args = ap.parse_args()
    {"record": record, "priors": priors, "replay": replay}[args.cmd](args)


if __name__ == "__main__":
    main()
