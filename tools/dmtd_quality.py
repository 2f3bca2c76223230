#!/usr/bin/env python3
"""How close a DMTD model's output is to its base model's, on prompts it was not trained on.

Both measures run through edge-mtp's own runtime (the adapter applied by llama.cpp, the DMTD
decoder with cyclical refilling), greedy, on the held-out half of the Spec-Bench dev split
(tools/dmtd_data.py trains on the other half):
- teacher-forced top-1 agreement: the DMTD decoder is fed the base model's own greedy answer
  token by token; at every step its argmax is compared with the base model's next token, counted
  by the predicting row's place in the cycle (0: a head, the full model; 1..tau-1: late-only);
- free-running: the DMTD model's own greedy answer vs the base model's: tokens until the first
  divergence, and the share of answers identical over all --tokens tokens.

    python tools/dmtd_quality.py -m smollm2-135m --lora models/smollm2-135m-dmtd.lora.gguf \\
        --taus 1,2,3,4 --tokens 128 --limit 30 [--show 3]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dmtd_data import held_out_questions  # noqa: E402
from edge_mtp import Engine  # noqa: E402
from edge_mtp.strategies.dmtd import Dmtd  # noqa: E402


class Argmax:
    """A greedy sampler that keeps the row it chose from."""

    def __call__(self, row: np.ndarray) -> int:
        self.row = row.copy()
        return int(np.argmax(row))


def teacher_forced(session, prompt: list[int], answer: list[int], tau: int):
    """(hits, counts) per cycle position of the DMTD decoder fed the base model's answer."""
    strategy, pick = Dmtd(tau), Argmax()
    hits, counts = np.zeros(tau), np.zeros(tau)
    logits = strategy.prefill(session, prompt)
    for i, token in enumerate(answer):
        place = (i - 1) % tau if i else 0  # the row of answer[i - 1] predicted it (the prompt's last: a head)
        hits[place] += int(np.argmax(logits)) == token
        counts[place] += 1
        if i + 1 < len(answer):
            strategy.step(session, pick, token)
            logits = pick.row
    return hits, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m", help="the base model")
    ap.add_argument("--lora", required=True, help="the DMTD adapter")
    ap.add_argument("--taus", default="1,2,3,4")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--limit", type=int, default=30, help="held-out questions")
    ap.add_argument("--show", type=int, default=0, help="print this many answers side by side")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    taus = [int(t) for t in args.taus.split(",")]
    questions = held_out_questions()[:args.limit]
    messages = [[{"role": "user", "content": q["turns"][0]}] for q in questions]
    with Engine(args.model, n_ctx=2048, n_threads=args.threads, strategy="plain") as base:
        prompts = [base.model.chat_tokens(m) for m in messages]
        answers = [base.create_chat_completion(m, max_tokens=args.tokens, temperature=0)["tokens"]
                   for m in messages]
    report = {"questions": len(questions), "tokens": args.tokens, "taus": {}}
    with Engine(args.model, lora=args.lora, n_ctx=2048, n_threads=args.threads,
                strategy="dmtd") as dmtd:
        for tau in taus:
            hits, counts = np.zeros(tau), np.zeros(tau)
            same_prefix, identical, texts = [], 0, []
            for prompt, answer, m in zip(prompts, answers, messages):
                h, c = teacher_forced(dmtd.session, prompt, answer, tau)
                hits, counts = hits + h, counts + c
                own = dmtd.create_chat_completion(m, max_tokens=args.tokens, temperature=0,
                                                  strategy=f"dmtd:{tau}")["tokens"]
                k = next((i for i, (a, b) in enumerate(zip(own, answer)) if a != b), min(len(own), len(answer)))
                same_prefix.append(k)
                identical += own == answer
                texts.append(dmtd.detokenize(own))
            row = {"teacher_forced_by_position": [round(x, 4) for x in hits / np.maximum(counts, 1)],
                   "teacher_forced_non_head": round(float(hits[1:].sum() / max(counts[1:].sum(), 1)), 4)
                   if tau > 1 else None,
                   "teacher_forced_all": round(float(hits.sum() / counts.sum()), 4),
                   "tokens_to_first_divergence_median": float(np.median(same_prefix)),
                   "tokens_to_first_divergence_mean": round(float(np.mean(same_prefix)), 1),
                   "identical_answers": f"{identical}/{len(prompts)}"}
            report["taus"][tau] = row
            print(f"tau {tau}: {json.dumps(row)}", flush=True)
            for q, text, answer in list(zip(questions, texts, answers))[:args.show]:
                print(f"--- {q['turns'][0][:100]}\n[base] {dmtd.detokenize(answer)}\n[dmtd:{tau}] {text}\n")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
