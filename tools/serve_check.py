#!/usr/bin/env python3
"""Checks of `edge-mtp serve` that are too long for the test suite.

soak: many requests against one server (chat and completions, streamed or not, per-request
speculation varied, every 25th stream dropped by the client midway); every answer must equal the
first answer to the same request (greedy, so plain decoding's), nothing may be lost, and the
server's resident memory is printed before and after. Exit code 1 on any mismatch or failure.

overhead: the HTTP path against the Engine itself. The same greedy request, streamed in-process
through Engine.stream and over HTTP from a server on the same model, alternated for --rounds;
tokens/s is what the reader sees: the tokens after the first (the completion's count, from usage)
over the time from its first to its last piece of text (the server sends several tokens per chunk
when they come faster than its flush interval, so pieces are not tokens).

    python tools/serve_check.py soak --requests 1000
    python tools/serve_check.py overhead -n 128 --rounds 10
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["Name three planets and one fact about each.", "Write a haiku about the sea.",
           "What is the capital of France?", "Explain what a compiler does in two sentences.",
           "List five fruits.", "Give me a short recipe for pancakes.",
           "Why is the sky blue?", "Translate 'good morning' into French and Spanish."]
STRATEGIES = [False, "lookup", "probe:4", "hybrid:6", "lookahead:8"]


class Server:
    def __init__(self, model: str, threads: int, ctx: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "edge_mtp.cli", "serve", "-m", model, "--strategy", "plain",
               "-t", str(threads), "-c", str(ctx), "--port", str(self.port), "--max-queue", "4"]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                if self.post("/health", None, method="GET")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise SystemExit("the server did not start")

    def post(self, path, body, method="POST"):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, json.loads(data)

    def stream(self, path, body, drop_after: int | None = None):
        """Streamed text and the time of each piece; stops reading (and closes) after drop_after."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        conn.request("POST", path, body=json.dumps({**body, "stream": True}),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        pieces, times = [], []
        while True:
            line = r.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                self.last_usage = chunk["usage"]
            if not chunk["choices"]:
                continue
            choice = chunk["choices"][0]
            text = choice["delta"].get("content") if "delta" in choice else choice.get("text")
            if text:
                pieces.append(text)
                times.append(time.perf_counter())
            if drop_after is not None and len(pieces) >= drop_after:
                conn.sock.shutdown(socket.SHUT_RDWR)
                break
        conn.close()
        return "".join(pieces), times

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def soak(args) -> int:
    server = Server(args.model, args.threads, args.ctx_size)
    reference: dict = {}
    mismatches = failures = dropped = 0
    t0 = time.time()
    try:
        for i in range(args.requests):
            if i == 20:
                rss0 = server.rss_mb()  # after the first requests have sized every buffer
            prompt = PROMPTS[i % len(PROMPTS)]
            chat = (i // len(PROMPTS)) % 2 == 0
            path = "/v1/chat/completions" if chat else "/v1/completions"
            body = {"max_tokens": args.max_tokens, "temperature": 0, "speculation": STRATEGIES[i % len(STRATEGIES)]}
            body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
            key = (path, prompt)
            if i % 25 == 24:
                server.stream(path, body, drop_after=3)
                dropped += 1
                continue
            if i % 3 == 0:
                text, _ = server.stream(path, body)
            else:
                status, r = server.post(path, body)
                if status != 200:
                    failures += 1
                    continue
                c = r["choices"][0]
                text = c["message"]["content"] if chat else c["text"]
            if reference.setdefault(key, text) != text:
                mismatches += 1
        rss1 = server.rss_mb()
    finally:
        server.close()
    print(json.dumps({"requests": args.requests, "dropped_by_client": dropped, "failures": failures,
                      "mismatches": mismatches, "distinct_requests": len(reference),
                      "rss_mb_after_20": round(rss0, 1), "rss_mb_end": round(rss1, 1),
                      "minutes": round((time.time() - t0) / 60, 1)}))
    return 1 if mismatches or failures else 0


def overhead(args) -> int:
    from edge_mtp import Engine

    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    server = Server(args.model, args.threads, args.ctx_size)
    engine = Engine(args.model, n_ctx=args.ctx_size, n_threads=args.threads, strategy="plain")
    rates: dict = {"engine": [], "http": []}

    def rate(tokens, times):
        return (tokens - 1) / (times[-1] - times[0])

    try:
        for _ in range(args.rounds):
            times = []
            stream = engine.stream(messages, args.n_predict, temperature=0)
            for _piece in stream:
                times.append(time.perf_counter())
            rates["engine"].append(rate(stream.result["usage"]["completion_tokens"], times))
            _, times = server.stream("/v1/chat/completions", {"messages": messages, "max_tokens": args.n_predict,
                                                               "temperature": 0,
                                                               "stream_options": {"include_usage": True}})
            rates["http"].append(rate(server.last_usage["completion_tokens"], times))
    finally:
        server.close()
        engine.close()
    ratios = [h / e for h, e in zip(rates["http"], rates["engine"])]
    print(json.dumps({"tokens_per_second": {k: [round(x, 1) for x in v] for k, v in rates.items()},
                      "http_over_engine_median": round(statistics.median(ratios), 4),
                      "http_over_engine_each": [round(r, 3) for r in ratios]}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    for name in ("soak", "overhead"):
        p = sub.add_parser(name)
        p.add_argument("-m", "--model", default="smollm2-135m")
        p.add_argument("-t", "--threads", type=int, default=2)
        p.add_argument("-c", "--ctx-size", type=int, default=2048)
    sub.choices["soak"].add_argument("--requests", type=int, default=1000)
    sub.choices["soak"].add_argument("--max-tokens", type=int, default=24)
    sub.choices["overhead"].add_argument("-n", "--n-predict", type=int, default=128)
    sub.choices["overhead"].add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    return soak(args) if args.what == "soak" else overhead(args)


if __name__ == "__main__":
    sys.exit(main())
