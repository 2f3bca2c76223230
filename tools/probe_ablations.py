#!/usr/bin/env python3
"""MAT of strategy variants per Spec-Bench subtask: probing ablations (mask init, lambda, k, static
vs dynamic trees), the hybrid tree, and baselines such as lookup.

Greedy, the first turn of each question with the chat template, -n new tokens. Every variant
decodes the same prompts and must return plain decoding's tokens (a mismatch is flagged in its
cell). MAT = generated tokens / forward passes, the prompt pass included; it is deterministic for a
given machine, so this tool reports MAT only and makes no timing claims.

--replay measures the same MAT for a fraction of the compute (budget-independent): plain's greedy
text is computed once, and of each tree only the rows that decide the step are decoded, i.e. the
accepted path and the mask rows of its deepest node (the only masks a strategy reads). With exact
rows (the default) those rows compute bit-identically inside and outside the full tree, so steps
and MAT equal a full run's; every path row's argmax is checked against the greedy text.

A variant is "name[:budget][,option=value...]", e.g.

    python tools/probe_ablations.py --data ../shared/data/spec_bench/dev.jsonl --limit 3 -n 128 \\
        lookup:4 probe:4 hybrid:4 probe:30,masks=2,tree=dynamic probe:10,init=last probe:10,lam=0.5
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import numpy as np

from edge_mtp import Engine
from edge_mtp.generation import Generation
from edge_mtp.sampling import Sampler, SamplingParams
from edge_mtp.strategies import make_strategy


def subtask(q: dict) -> str:
    return "mt_bench" if q["question_id"] <= 160 else q["category"]


def parse_variant(text: str) -> tuple[str, dict]:
    """"probe:30,masks=2,tree=dynamic" -> ("probe:30", {"masks": 2, "tree": "dynamic"})."""
    spec, *pairs = text.split(",")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"bad option {pair!r} in {text!r}: write option=value")
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                pass
        options[key] = value
    return spec, options


class Replay:
    """A Session stand-in that decodes only the deciding rows of each tree (see --replay).

    `truth` is the greedy token sequence (prompt, then plain decoding's continuation)."""

    def __init__(self, session, truth: list[int]):
        self.session, self.truth = session, truth

    def __getattr__(self, name):
        return getattr(self.session, name)

    def decode(self, tokens=None, parents=None, *, embd=None, **kw):
        if parents is None:  # a causal chain (a plain step): decoded as it is
            return self.session.decode(tokens, embd=embd, **kw)
        tokens, parents, truth, at = np.asarray(tokens), np.asarray(parents), self.truth, self.session.n_past
        if tokens[0] != truth[at]:
            raise RuntimeError(f"replay left the greedy text at position {at}")
        kids = defaultdict(list)
        for row in range(1, len(tokens)):
            kids[int(parents[row])].append(row)
        path = [0]  # the rows the verifier will accept: children equal to the greedy text
        while at + len(path) < len(truth):
            hit = [c for c in kids[path[-1]] if tokens[c] == truth[at + len(path)]]
            if not hit:
                break
            path.append(hit[0])
        rows, node = list(path), path[-1]
        while masks := [c for c in kids[node] if tokens[c] < 0]:  # the deepest node's mask chain
            rows.append(node := masks[0])
        embd_of_row = np.cumsum(tokens < 0) - 1
        sub_tokens = tokens[rows]
        sub_parents = [-1] + [rows.index(int(parents[r])) for r in rows[1:]]
        sub_embd = embd[embd_of_row[rows][sub_tokens < 0]] if (sub_tokens < 0).any() else None
        logits = self.session.decode(sub_tokens, sub_parents, embd=sub_embd)
        for j in range(min(len(path), len(truth) - at - 1)):
            if int(np.argmax(logits[j])) != truth[at + j + 1]:
                raise RuntimeError(f"row {j} of a replayed tree disagrees with the greedy text")
        full = np.zeros((len(tokens), logits.shape[1]), np.float32)
        full[rows] = logits
        self.sub_row = {r: j for j, r in enumerate(rows)}
        return full

    def commit(self, path) -> None:
        self.session.commit([self.sub_row[int(r)] for r in path])


def greedy_text(session, prompt: list[int], n: int) -> list[int]:
    """Prompt plus n plain greedy tokens (past EOS too: drafts may reach beyond it)."""
    out = list(prompt) + [int(np.argmax(session.prefill(prompt)))]
    while len(out) < len(prompt) + n:
        out.append(int(np.argmax(session.decode([out[-1]])[-1])))
    return out


def replay_run(engine: Engine, prompt: list[int], truth: list[int], spec: str, options: dict, n: int):
    """(tokens, steps) of one greedy request, replayed."""
    gen = Generation(Replay(engine.session, truth), make_strategy(spec, **options),
                     Sampler(SamplingParams(temperature=0)), prompt, n)
    try:
        gen.run()
    finally:  # a refused replay stops mid-step: leave no half-written cells for the next request
        engine.session.clear()
    return gen.tokens, gen.steps


def pick_questions(path: str, limit: int) -> list[dict]:
    questions = [json.loads(line) for line in open(path)]
    seen: dict[str, int] = defaultdict(int)
    kept = []
    for q in questions:
        seen[subtask(q)] += 1
        if not limit or seen[subtask(q)] <= limit:
            kept.append(q)
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+", help='e.g. lookup:4 probe:10 "probe:30,masks=2,tree=dynamic"')
    ap.add_argument("--data", required=True, help="Spec-Bench JSONL (question_id, category, turns)")
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("-n", type=int, default=128, help="new tokens per answer")
    ap.add_argument("--limit", type=int, default=3, help="questions per subtask (0 = all)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--replay", action="store_true", help="decode only the deciding rows (same MAT, faster)")
    args = ap.parse_args()
    variants = [(v, *parse_variant(v)) for v in args.variants]
    questions = pick_questions(args.data, args.limit)
    engine = Engine(args.model, n_ctx=4096, n_threads=args.threads)
    # per variant, per subtask: [tokens, steps, turns whose tokens differ from plain]
    acc = defaultdict(lambda: defaultdict(lambda: [0, 0, 0]))
    for i, q in enumerate(questions):
        messages = [{"role": "user", "content": q["turns"][0]}]
        if args.replay:
            prompt = engine.model.chat_tokens(messages)
            truth = greedy_text(engine.session, prompt, args.n + 16)
            ref = replay_run(engine, prompt, truth, "plain", {}, args.n)
        else:
            r = engine.chat(messages, max_tokens=args.n, temperature=0)
            ref = r["tokens"], r["speculation"]["steps"]
        for label, spec, options in [("plain", "plain", {})] + variants:
            if label == "plain":
                tokens, steps = ref
            elif args.replay:
                tokens, steps = replay_run(engine, prompt, truth, spec, options, args.n)
            else:
                r = engine.chat(messages, max_tokens=args.n, temperature=0, strategy=spec,
                                strategy_options=options)
                tokens, steps = r["tokens"], r["speculation"]["steps"]
            cell = acc[label][subtask(q)]
            cell[0] += len(tokens)
            cell[1] += steps
            cell[2] += tokens != ref[0]
        print(f"[{i + 1}/{len(questions)}] {subtask(q)} {q['question_id']}", file=sys.stderr, flush=True)
    tasks = list(dict.fromkeys(subtask(q) for q in questions))
    print(f"MAT (tokens per forward pass), model {args.model}, greedy, {args.n} new tokens, first turns, "
          f"{args.limit or 'all'} question(s) per subtask" + (", replayed" if args.replay else ""))
    print("| variant | " + " | ".join(tasks) + " | overall |")
    print("|---|" + "---|" * (len(tasks) + 1))
    for label in ["plain"] + [v[0] for v in variants]:
        cells = [acc[label][t] for t in tasks]
        total = [sum(c[j] for c in cells) for j in range(3)]
        print(f"| {label} | " + " | ".join(
            f"{tok / steps:.3f}" + (f" ({bad} differ)" if bad else "") for tok, steps, bad in cells + [total]) + " |")


if __name__ == "__main__":
    main()
