"""The embeddable API: `Engine` loads a model once and serves completion and chat requests.

Results are OpenAI-shaped dicts plus `text`, `tokens`, `timings` and a `speculation` block, so the
same dict serves an app, `edge-mtp generate --json` and the benchmarks.
"""
from __future__ import annotations

import threading
import time
import uuid
from typing import Iterator

from .backend import Model, Session
from .errors import RequestError
from .generation import Generation
from .models import resolve_model
from .sampling import Sampler, SamplingParams
from .strategies import make_strategy


class Stream:
    """Text pieces of one request as they are produced; `result` is the full dict once done."""

    def __init__(self, engine: "Engine", gen: Generation, kind: str):
        self._engine, self._gen, self._kind = engine, gen, kind
        self.result: dict | None = None
        self._it = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._it

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        """Stop early (the engine stays usable; what was generated so far is kept in `result`)."""
        self._it.close()

    def _run(self) -> Iterator[str]:
        engine, me = self._engine, threading.get_ident()
        if engine._streaming_thread == me:  # waiting on our own lock would hang this thread
            raise RequestError("this Engine is busy with an unfinished stream in this thread; "
                               "finish or close() that stream first")
        with engine._lock:
            engine._streaming_thread = me
            try:
                yield from self._gen.pieces()
            finally:
                engine._streaming_thread = None
                self._gen.session.sync()
                self.result = engine._result(self._gen, self._kind)


class Engine:
    """A model plus one llama.cpp context. Requests on one Engine run one at a time (a second
    thread waits for the first; a second request from the thread that holds an unfinished stream
    is refused); use several Engines for parallel work.

    strategy "auto" (the default) measures this device once (edge_mtp.profile, cached per model,
    threads and mode; about 10 s on the first auto request) and speculates only where the
    predicted gain beats the measured cost of the extra rows; "plain" never speculates.

    exact_rows (default on) makes every batch row compute bit-identically to single-token
    decoding on CPU, for every common weight type (docs/exactness.md); off runs llama.cpp's own
    batched kernels (stock numerics, faster prompt prefill for F32/F16/Q8_0/Q4_0/K-quant weights),
    but speculative outputs may then differ from plain decoding at near-ties."""

    def __init__(self, model: str = "smollm2-135m", n_ctx: int = 4096, n_threads: int | None = None,
                 strategy: str = "auto", flash_attn: bool = True, verbose: bool = False,
                 strategy_options: dict | None = None, exact_rows: bool = True):
        from .backend import native

        native.set_verbose(verbose)
        self.strategy_options = dict(strategy_options or {})
        make_strategy(strategy, **self.strategy_options)  # refuse bad names before loading anything
        self.strategy = strategy
        self.model_path = resolve_model(model)
        self.model = Model(self.model_path)
        self.session = Session(self.model, n_ctx=n_ctx, n_threads=n_threads, flash_attn=flash_attn,
                               exact_rows=exact_rows)
        self.model_name = model if self.model_path.name != model else self.model_path.stem
        self._lock = threading.Lock()
        self._streaming_thread: int | None = None

    def close(self) -> None:
        self.session.close()
        self.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def n_ctx(self) -> int:
        return self.session.n_ctx

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self.model.tokenize(text, special=special)

    def detokenize(self, tokens) -> str:
        return self.model.detokenize(tokens)

    # -- requests --------------------------------------------------------------------------
    def stream(self, prompt: str | list[dict], max_tokens: int | None = 128, *,
               temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
               seed: int | None = None, stop: str | list[str] | None = None,
               strategy: str | None = None, strategy_options: dict | None = None) -> Stream:
        """Start a request; a list of {"role", "content"} messages is rendered with the chat template.

        strategy ("plain", "probe", "probe:10", "lookup:4", ...) and strategy_options (e.g.
        {"masks": 2}) override the engine's defaults for this request.

        max_tokens None or -1 means: until EOS, a stop string or the end of the context.
        """
        kind = "chat" if isinstance(prompt, list) else "text"
        tokens = self._prompt_tokens(prompt)
        if max_tokens is None or max_tokens == -1:
            max_tokens = self.n_ctx
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer or -1, got {max_tokens!r}")
        if len(tokens) >= self.n_ctx:
            raise RequestError(f"prompt has {len(tokens)} tokens, the context holds {self.n_ctx}; "
                               "shorten it or raise n_ctx")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) for s in stops):
            raise RequestError("stop must be a string or a list of strings")
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, min_p, seed))
        if strategy is None:
            strategy, options = self.strategy, {**self.strategy_options, **(strategy_options or {})}
        else:
            options = dict(strategy_options or {})
        gen = Generation(self.session, make_strategy(strategy, **options), sampler, tokens,
                         max_tokens, stops)
        return Stream(self, gen, kind)

    def generate(self, prompt: str, max_tokens: int | None = 128, **kw) -> dict:
        """Complete a raw prompt (no chat template); returns a text_completion dict."""
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string (use chat() for messages)")
        return self._finish(self.stream(prompt, max_tokens, **kw))

    def chat(self, messages: list[dict], max_tokens: int | None = 128, **kw) -> dict:
        """Answer chat messages with the model's chat template; returns a chat.completion dict."""
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list of {'role', 'content'} dicts")
        return self._finish(self.stream(messages, max_tokens, **kw))

    @staticmethod
    def _finish(s: Stream) -> dict:
        for _ in s:
            pass
        return s.result

    def _prompt_tokens(self, prompt) -> list[int]:
        if isinstance(prompt, list):
            for m in prompt:
                if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                        and isinstance(m.get("content"), str)):
                    raise RequestError("each message must be a dict with string 'role' and 'content'")
            return self.model.chat_tokens(prompt)
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string or a list of messages")
        tokens = self.model.tokenize(prompt)
        if not tokens:
            raise RequestError("empty prompt: give at least one token of text")
        return tokens

    def _result(self, gen: Generation, kind: str) -> dict:
        n_prompt, n_gen = len(gen.prompt), len(gen.tokens)
        choice = {"index": 0, "finish_reason": gen.finish_reason or "cancelled"}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": gen.text}
        else:
            choice.update(text=gen.text, logprobs=None)
        return {
            "id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "text": gen.text,
            "tokens": list(gen.tokens),
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                      "total_tokens": n_prompt + n_gen},
            "timings": gen.timings,
            "speculation": gen.speculation,
        }
