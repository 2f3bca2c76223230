#!/usr/bin/env python3
"""Self-distillation data for DMTD: a base model's own chat answers to many prompts.

DMTD learns to write the base model's next tokens from the late layers alone, so its training text
should be what the base model itself writes when chatting (docs/dmtd.md). The prompts come from
sources whose licences allow it and that stay out of the evaluation: every other question of the
Spec-Bench dev split (the rest are held out), Python's standard library (functions to explain,
rewrite or document: PSF licence) and templated writing tasks. Half the answers are greedy, half
sampled at temperature 0.8 (the chat default), up to --max-new tokens, generated --seqs sequences
per llama.cpp batch (one row per sequence per step). Give the F32 twin of a quantized model
(`edge-mtp quantize M twin.gguf F32`: the same weights, dequantized): its batches run on matrix
kernels, about twice the tokens/s of Q4_1's row-by-row dots at 64 sequences.

    python tools/dmtd_data.py -m smollm2-f32.gguf -o dmtd-train.jsonl --limit 1400 --seqs 64

Each output line: {"tokens": prompt + answer ids, "prompt_len": n, "source": "...", "temp": t}.
`held_out_questions()` gives the Spec-Bench questions no line was made from.
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mtp.backend import Model, native  # noqa: E402
from edge_mtp.models import resolve_model  # noqa: E402

MAX_PROMPT = 512  # longer prompts are skipped
SPEC_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "dev.jsonl"

TOPICS = """the water cycle; photosynthesis; black holes; the French revolution; volcanoes; honeybees;
the stock market; machine learning; the immune system; coffee; the Roman empire; electric cars;
climate change; the moon landing; chess; recycling; sleep; the internet; vaccines; plate tectonics;
the printing press; jazz; the Amazon rainforest; compound interest; gravity; the human heart;
renewable energy; ancient Egypt; friendship; time management; public speaking; learning a language;
the ocean tides; rainbows; the solar system; bread baking; gardening; running a marathon; budgeting;
volunteering; photography; the Olympic games; earthquakes; the periodic table; democracy; dinosaurs;
antibiotics; social media; remote work; cats; dogs; the Great Wall of China; the Renaissance;
electricity; bicycles; meditation; museums; rivers; deserts; the seasons""".replace("\n", " ")

TEMPLATES = ["Explain {t} in simple terms.", "Write a short poem about {t}.",
             "Give me three interesting facts about {t}.", "Write a short story that involves {t}.",
             "What are the pros and cons of {t}?", "Explain {t} to a ten-year-old.",
             "Write a paragraph for a school essay about {t}.", "Summarize the history of {t}.",
             "What questions should I ask to learn more about {t}?",
             "Describe {t} in exactly five sentences."]

CODE_TASKS = ["Explain what this Python function does:\n\n```python\n{src}\n```",
              "Add comments to this Python function:\n\n```python\n{src}\n```",
              "Rewrite this Python function with clearer variable names:\n\n```python\n{src}\n```",
              "Write a Python function `{name}` that does the following: {doc}",
              "Write a unit test for this Python function:\n\n```python\n{src}\n```"]


def spec_bench_questions() -> list[dict]:
    return [json.loads(line) for line in SPEC_BENCH.read_text().splitlines() if line.strip()]


def held_out_questions() -> list[dict]:
    """The odd-numbered lines of the Spec-Bench dev split: never trained on, used by the evaluation."""
    return spec_bench_questions()[1::2]


def stdlib_functions(limit: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """(name, first docstring line, source) of short documented functions of the standard library."""
    found = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            doc = isinstance(node, ast.FunctionDef) and ast.get_docstring(node)
            if doc and 4 <= node.end_lineno - node.lineno <= 30 and not node.name.startswith("_"):
                src = ast.get_source_segment(text, node)
                if src and len(src) < 1500:
                    found.append((node.name, doc.strip().splitlines()[0], src))
    rng.shuffle(found)
    return found[:limit]


def prompts(n_code: int, seed: int) -> list[tuple[str, str]]:
    """(source, user message) pairs: the trained half of Spec-Bench, topic tasks, stdlib code."""
    rng = random.Random(seed)
    out = [("spec_bench:" + q["category"], q["turns"][0]) for q in spec_bench_questions()[0::2]]
    out += [("topics", t.format(t=topic.strip())) for topic in TOPICS.split(";") for t in TEMPLATES]
    for i, (name, doc, src) in enumerate(stdlib_functions(n_code, rng)):
        out.append(("stdlib", CODE_TASKS[i % len(CODE_TASKS)].format(name=name, doc=doc, src=src)))
    rng.shuffle(out)
    return out


class BatchWriter:
    """Greedy or sampled answers for many prompts, one llama.cpp batch row per live sequence."""

    def __init__(self, model: Model, n_seq: int, n_ctx_seq: int, threads: int):
        self.ll, self.model, self.n_seq = native.llama(), model, n_seq
        p = self.ll.llama_context_default_params()
        p.n_ctx, p.n_seq_max = n_seq * n_ctx_seq, n_seq
        p.n_batch = p.n_ubatch = max(512, n_seq)
        p.n_threads = p.n_threads_batch = threads
        self.n_ctx_seq = n_ctx_seq
        self.ctx = self.ll.llama_init_from_model(model.ptr, p)
        if not self.ctx:
            raise SystemExit(f"could not create a context ({native.last_log_error()})")
        self.mem = self.ll.llama_get_memory(self.ctx)
        self.batch = self.ll.llama_batch_init(p.n_batch, 0, 1)

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """rows: (token, position, sequence, wants logits)."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = tok, pos, 1, seq, logits
        b.n_tokens = len(rows)
        if self.ll.llama_decode(self.ctx, b) != 0:
            raise SystemExit("llama_decode failed")

    def _logits(self, i: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, i), (self.model.n_vocab,))

    def answers(self, jobs: list[tuple[list[int], float]], max_new: int, rng: np.random.Generator):
        """jobs: (prompt ids, temperature); yields (job index, answer ids) as sequences finish."""
        todo, live = list(enumerate(jobs)), {}  # live: seq -> [job, ids, next token, temp, prompt length]
        while todo or live:
            for seq in range(self.n_seq):  # fill free sequence slots: prompt passes one at a time
                if seq in live or not todo:
                    continue
                j, (ids, temp) = todo.pop(0)
                self.ll.llama_memory_seq_rm(self.mem, seq, -1, -1)
                for start in range(0, len(ids), 512):
                    chunk = ids[start:start + 512]
                    self._decode([(t, start + k, seq, start + k == len(ids) - 1)
                                  for k, t in enumerate(chunk)])
                live[seq] = [j, list(ids), self._pick(self._logits(len(chunk) - 1), temp, rng), temp, len(ids)]
            order = sorted(live)
            rows = [(live[s][2], len(live[s][1]), s, True) for s in order]
            for s in order:
                live[s][1].append(live[s][2])
            self._decode(rows)
            for i, s in enumerate(order):
                j, ids, tok, temp, plen = live[s]
                if self.model.is_eog(tok) or len(ids) - plen >= max_new:
                    del live[s]
                    yield j, ids[plen:] if not self.model.is_eog(tok) else ids[plen:-1]
                    continue
                live[s][2] = self._pick(self._logits(i), temp, rng)

    @staticmethod
    def _pick(logits: np.ndarray, temp: float, rng: np.random.Generator) -> int:
        if temp <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temp
        p = np.exp(z - z.max())
        return int(rng.choice(len(p), p=p / p.sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=2000, help="number of prompts (the code share grows with it)")
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--seqs", type=int, default=16, help="sequences decoded together")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="append, skipping prompts already answered")
    args = ap.parse_args()
    model = Model(resolve_model(args.model))
    todo = prompts(args.limit // 2, args.seed)[:args.limit]
    jobs = [(model.chat_tokens([{"role": "user", "content": text}]), 0.0 if i % 2 == 0 else 0.8)
            for i, (_, text) in enumerate(todo)]
    done = set()
    if args.resume and args.out.exists():
        done = {tuple(d["tokens"][:d["prompt_len"]]) for d in map(json.loads, args.out.read_text().splitlines())}
    keep = [i for i, (ids, _) in enumerate(jobs) if len(ids) <= MAX_PROMPT and tuple(ids) not in done]
    todo, jobs = [todo[i] for i in keep], [jobs[i] for i in keep]
    writer = BatchWriter(model, args.seqs, MAX_PROMPT + args.max_new + 1, args.threads)
    t0, n_tok = time.perf_counter(), 0
    with args.out.open("a" if args.resume else "w") as f:
        for k, (j, answer) in enumerate(writer.answers(jobs, args.max_new, np.random.default_rng(args.seed))):
            prompt, temp = jobs[j]
            f.write(json.dumps({"tokens": prompt + answer, "prompt_len": len(prompt),
                                "source": todo[j][0], "temp": temp}) + "\n")
            n_tok += len(answer)
            if k % 50 == 0:
                print(f"{k + 1}/{len(jobs)} answers, {n_tok} tokens, "
                      f"{n_tok / (time.perf_counter() - t0):.0f} tokens/s", file=sys.stderr, flush=True)
    print(f"{len(jobs)} answers, {n_tok} answer tokens -> {args.out}")


if __name__ == "__main__":
    main()
