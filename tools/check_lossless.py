#!/usr/bin/env python3
"""Every lossless strategy against plain greedy decoding on a real model (the big models' check,
too slow for the default test suite).

For each prompt (chat-templated; raw text for a model without a template) it decodes greedily with
plain and with each strategy, each from a cleared cache, and compares the tokens; prints one line
per strategy and prompt and exits with 1 if any strategy's tokens differ from plain's.

    python tools/check_lossless.py -m qwen2.5-coder-1.5b -n 96 -t 2
    python tools/check_lossless.py -m qwen2.5-coder-0.5b --data ../shared/data/code_edit/dev.jsonl --limit 3

Prompts: the built-in ones (a code edit from this project's own source, a rewrite, a question), or
the first turns of a Spec-Bench-schema JSONL with --data.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_mtp import Engine  # noqa: E402
from edge_mtp.bench import render  # noqa: E402

LOSSLESS = ("probe", "probe:10", "lookup", "lookahead", "hybrid", "auto")


def builtin_prompts() -> list[str]:
    from edge_mtp import bench

    src = inspect.getsource(bench.subtask_of)
    return [
        "Add a docstring and type hints to this function and return the complete function in one "
        f"Python code block.\n\n```python\n{src}```",
        "Rewrite this sentence in the passive voice, then repeat it in the active voice: "
        "The committee approved the new budget after a long debate.",
        "List the first ten prime numbers, one per line, then give their sum.",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("-n", type=int, default=96, help="greedy tokens per prompt")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--strategies", default=",".join(LOSSLESS))
    ap.add_argument("--data", help="Spec-Bench-schema JSONL: its questions' first turns as prompts")
    ap.add_argument("--limit", type=int, default=3, help="with --data: first K questions")
    args = ap.parse_args()

    if args.data:
        lines = Path(args.data).read_text(encoding="utf-8").splitlines()
        prompts = [json.loads(x)["turns"][0] for x in lines if x.strip()][: args.limit]
    else:
        prompts = builtin_prompts()
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    engine = Engine(args.model, n_ctx=4096, n_threads=args.threads, strategy="plain")
    print(f"model {args.model} ({engine.model.architecture}, {engine.model.n_layer} layers), "
          f"{args.n} greedy tokens, {args.threads} threads, {len(prompts)} prompts")
    bad = 0
    for i, text in enumerate(prompts):
        prompt, _ = render(engine, [{"role": "user", "content": text}])

        def run(spec: str) -> dict:
            engine.session.clear()
            kw = dict(max_tokens=args.n, temperature=0.0, strategy=spec)
            return engine.generate(prompt, **kw) if isinstance(prompt, str) else engine.chat(prompt, **kw)

        ref = run("plain")
        print(f"prompt {i}: plain {len(ref['tokens'])} tokens, {ref['timings']['tokens_per_second']:.1f} tok/s")
        for spec in strategies:
            t0 = time.perf_counter()
            r = run(spec)
            same = r["tokens"] == ref["tokens"]
            bad += not same
            first = next((k for k, (a, b) in enumerate(zip(r["tokens"], ref["tokens"])) if a != b),
                         min(len(r["tokens"]), len(ref["tokens"])))
            print(f"  {spec:<10} {'identical' if same else f'DIFFERS at token {first}'}  "
                  f"MAT {r['speculation']['mean_accepted_tokens_per_step']:.2f}  "
                  f"{r['timings']['tokens_per_second']:.1f} tok/s  ({time.perf_counter() - t0:.1f} s)")
    print("all lossless strategies identical to plain" if not bad else f"{bad} runs differ from plain")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
