#!/usr/bin/env python3
"""Record greedy answers once, then measure lookup acceptance and replay auto's policy on them.

auto's decisions depend only on the text so far, the device's cost curve and what earlier drafts
taught it, so once the model's greedy answers are recorded (plain decoding, the bench protocol)
the tokens each policy would accept per pass, and the passes' cost in plain steps, follow without
the model: a policy change is judged in seconds on all of Spec-Bench dev. The replay drives
auto's own policy object (`strategies.auto.Auto`: propose and accept, as the decoder calls
them); it leaves out what only a live run shows (Python time beyond the policy's own estimate,
attention making rows dearer at long contexts, the machine's drift), so confirm a change with
`edge-mtp bench`.

    python tools/auto_replay.py record -m smollm2-135m --data ../shared/data/spec_bench/dev.jsonl \\
        -n 128 --out q41.json
    python tools/auto_replay.py priors q41.json     # a(l) per match-length bucket, the shifts
    python tools/auto_replay.py replay q41.json --profile PROFILE.json [--oracle]

priors prints what edge_mtp/strategies/priors.json holds (measured teacher-forced: every
position's draft against the model's own next tokens); --write puts them there. PROFILE.json is
a calibrated curve (`edge-mtp calibrate --json`); replay prints the predicted speedup vs plain
per subtask.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from collections import defaultdict
from typing import Callable

import numpy as np

from edge_mtp import Engine
from edge_mtp.backend import Model
from edge_mtp.bench import load_questions, subtask_of
from edge_mtp.models import resolve_model
from edge_mtp.profile import Profile
from edge_mtp.strategies.auto import MAX_DRAFT, Auto, AutoState, DraftPolicy, cost_table
from edge_mtp.strategies.lookup import BUCKET_START, LONGEST, Lookup, MatchAcceptance, bucket, continues_word
from edge_mtp.strategies.speculative import Step
from edge_mtp.tree import TokenTree

PRIORS_FILE = Path(__file__).resolve().parents[1] / "edge_mtp" / "strategies" / "priors.json"


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


def load(args) -> tuple[dict, Callable[[int], bytes]]:
    """The recording and piece(token) of the recorded model's vocabulary."""
    rec = json.load(open(args.recording))
    return rec, Model(resolve_model(args.model or rec["model"])).piece


def drafts_along(turn: dict):
    """(lookup's Match after the pending token, the model's true next tokens) at every position
    of a recorded answer (teacher forcing)."""
    answer = turn["answer"]
    lookup = Lookup(budget=MAX_DRAFT + 1)
    lookup.start(turn["prompt"])
    for t in range(len(answer) - 1):
        lookup.see([answer[t]])
        yield lookup.find(MAX_DRAFT, longest=LONGEST), answer[t + 1:]


def fit_shift(prior: np.ndarray, hit: np.ndarray) -> float:
    """The logit shift s making mean(sigmoid(logit(prior) + s)) equal the observed hit rate."""
    logit = np.log(prior / (1 - prior))
    lo, hi = -6.0, 6.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(1 / (1 + np.exp(-(logit + mid)))) < hit.mean() else (lo, mid)
    return (lo + hi) / 2


def priors(args) -> None:
    rec, piece = load(args)
    continues = lambda token: continues_word(piece(token))  # noqa: E731
    hits, trials = np.zeros(len(BUCKET_START)), np.zeros(len(BUCKET_START))
    base = MatchAcceptance(rate=0.0)  # the shipped priors: the shifts are fitted on top of them
    first, later = defaultdict(list), defaultdict(list)  # kind -> [(prior a, hit)]
    for turn in rec["turns"]:
        for (match, draft, (agreeing, seen)), truth in drafts_along(turn):
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
    fitted = {"acceptance": np.round(np.maximum.accumulate(a), 3).tolist()}
    print(f"acceptance (monotone) = {fitted['acceptance']}")
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
        fitted[name.lower()] = np.round(shifts, 2).reshape(-1, 2).tolist() if name == "FIRST_SHIFT" \
            else np.round(shifts, 2).tolist()
        print(f"{name.lower()} = {fitted[name.lower()]}")
    if args.write:  # the priors auto and hybrid start from (edge_mtp/strategies/priors.json)
        shipped = json.loads(PRIORS_FILE.read_text())
        shipped.update(fitted, recording=f"{rec['model']}, greedy, {rec['max_new_tokens']} tokens, "
                                         f"{len(rec['turns'])} turns, {int(trials.sum())} draft tokens")
        PRIORS_FILE.write_text(json.dumps(shipped, indent=1) + "\n")
        print(f"written: {PRIORS_FILE}")


def replay_turn(turn: dict, profile: Profile, piece, oracle: bool = False, device: Profile | None = None,
                auto: Auto | None = None) -> tuple[int, float, int]:
    """(decode-phase tokens, their cost in plain steps, plain's steps) for one recorded turn, with
    auto's own policy object (strategies.auto.Auto, or the one given) deciding every step;
    piece(token) -> bytes. The steps' model times are the device's prices (default: the profile's,
    so the live estimate stays on the curve; another device shows how auto corrects a wrong one)."""
    answer = turn["answer"]
    truth = answer + ([-1] if turn["eos"] else [])  # -1: the EOS step ends the turn
    auto = auto or Auto(profile=profile, state=AutoState())
    auto.start(piece, turn["prompt"])
    cost, plain_ms = cost_table(device or profile, MAX_DRAFT), profile.step_ms
    pos, spent = 0, 0.0  # truth[pos] is the pending token
    while pos + 1 < len(truth):
        pending = truth[pos]
        tree = auto.propose(pending, MAX_DRAFT + 1)
        drafts = auto.match.drafts
        right = next((i for i, (a, b) in enumerate(zip(drafts, truth[pos + 1:])) if a != b),
                     min(len(drafts), len(truth) - pos - 1))
        if oracle:  # the best ratio of tokens to cost this step could have had
            d = max(range(len(drafts) + 1), key=lambda k: (1 + min(k, right)) / cost[k + 1])
            tree = TokenTree.chain(pending, drafts[:d]) if d else None
            auto.continues = [continues_word(piece(t)) for t in drafts]  # past auto's cap too
        d = len(tree) - 1 if tree is not None else 0
        out = truth[pos + 1:pos + 2 + min(d, right)]
        model_ms = cost[d + 1] * plain_ms
        step_cost = cost[d + 1] + auto.policy.overhead["tree" if d else "plain"]
        auto.accept(Step(pending, out, tree, model_ms=model_ms, step_ms=step_cost * plain_ms))
        spent += step_cost
        pos += len(out)
    return len(answer) - 1, spent, len(truth) - 1


def replay(args) -> None:
    rec, piece = load(args)
    prof = Profile(**json.load(open(args.profile)))
    plain_overhead = DraftPolicy(cost_table(prof)).overhead["plain"]
    sums: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(3))
    for turn in rec["turns"]:
        tokens, spent, plain = replay_turn(turn, prof, piece, args.oracle)
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
        if name == "priors":
            p.add_argument("--write", action="store_true", help="write them into the shipped priors.json")
        if name == "replay":
            p.add_argument("--profile", required=True, help="a profile JSON (edge-mtp calibrate --json)")
            p.add_argument("--oracle", action="store_true", help="the best draft length per step instead")
    args = ap.parse_args()
    {"record": record, "priors": priors, "replay": replay}[args.cmd](args)


if __name__ == "__main__":
    main()
