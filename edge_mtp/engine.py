"""The embeddable API: `Engine` loads a model once and serves completion and chat requests.

`create_completion` / `create_chat_completion` take llama-cpp-python's names and return its shapes
(OpenAI dicts; with stream=True an iterator of chunk dicts), so code written for `llama_cpp.Llama`
runs on an Engine; `generate`, `chat` and `stream` (text pieces) are the short forms. Every result
also carries `text`, `tokens`, `timings` and a `speculation` block, so the same dict serves an app,
`edge-mtp serve`, `edge-mtp generate --json` and the benchmarks.
"""
from __future__ import annotations

import threading
import time
import uuid
from typing import Iterator

from .backend import Model, Session
from .errors import RequestError
from .generation import Generation
from .models import resolve
from .sampling import Sampler, SamplingParams, TokenLogprob
from .strategies import make_strategy
from .strategies.auto import AutoState


class Stream:
    """Text pieces of one request as they are produced; `result` is the full dict once done.

    `chunks()` gives the same request as OpenAI stream chunks instead. A stream closed before the
    end keeps what was generated in `result`, with finish_reason None (it did not finish)."""

    def __init__(self, engine: "Engine", gen: Generation, kind: str, logprobs: bool = False):
        self._engine, self._gen, self.kind, self.logprobs = engine, gen, kind, logprobs
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
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
                self.result = self._result()

    def chunks(self) -> Iterator[dict]:
        """OpenAI stream chunks: `chat.completion.chunk` (a first delta with the role, then content
        deltas) or `text_completion` pieces, each with the logprobs of the tokens it completes
        when they were asked for; the last chunk has finish_reason and, as edge-mtp extras,
        usage, timings and speculation. Closing this iterator stops the request."""
        gen, sent = self._gen, 0
        try:
            if self.kind == "chat":
                yield self._chunk({"delta": {"role": "assistant", "content": ""}})
            for piece in self:
                n = len(gen.tokens)
                yield self._chunk(self._piece(piece), gen.sampler.chosen[sent:n], sent)
                sent = n
            r = self.result
            last = self._chunk({"delta": {}} if self.kind == "chat" else {"text": ""},
                               gen.sampler.chosen[sent:len(gen.tokens)], sent,
                               r["choices"][0]["finish_reason"])
            yield {**last, **{k: r[k] for k in ("usage", "timings", "speculation")}}
        finally:
            self.close()

    def _piece(self, text: str) -> dict:
        return {"delta": {"content": text}} if self.kind == "chat" else {"text": text}

    def _chunk(self, body: dict, chosen=(), first: int = 0, finish_reason: str | None = None) -> dict:
        lp = self._logprobs(chosen, first) if self.logprobs and (chosen or finish_reason) else None
        return {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self._engine.model_name,
                "choices": [{"index": 0, **body, "logprobs": lp, "finish_reason": finish_reason}]}

    def _logprobs(self, chosen: list[TokenLogprob], first: int = 0) -> dict:
        """OpenAI's logprobs object for tokens[first:first + len(chosen)]: chat's `content` list, or
        the legacy completion arrays (text_offset counted from the start of the completion)."""
        piece = self._engine.model.piece
        text = lambda t: piece(t).decode("utf-8", errors="replace")  # noqa: E731
        if self.kind == "chat":
            entry = lambda t, lp: {"token": text(t), "logprob": lp, "bytes": list(piece(t))}  # noqa: E731
            return {"content": [{**entry(c.token, c.logprob), "top_logprobs": [entry(t, lp) for t, lp in c.top]}
                                for c in chosen]}
        offset = len(self._engine.model.detokenize(self._gen.tokens[:first]))
        offsets = []
        for c in chosen:
            offsets.append(offset)
            offset += len(text(c.token))
        return {"tokens": [text(c.token) for c in chosen], "text_offset": offsets,
                "token_logprobs": [c.logprob for c in chosen],
                "top_logprobs": [{text(t): lp for t, lp in c.top} for c in chosen]}

    def _result(self) -> dict:
        gen, kind = self._gen, self.kind
        n_prompt, n_gen = len(gen.prompt), len(gen.tokens)
        lp = self._logprobs(gen.sampler.chosen[:n_gen]) if self.logprobs else None
        choice = {"index": 0}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": gen.text}
        else:
            choice["text"] = gen.text
        choice.update(logprobs=lp, finish_reason=gen.finish_reason)
        return {
            "id": self.id,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": self.created,
            "model": self._engine.model_name,
            "choices": [choice],
            "text": gen.text,
            "tokens": list(gen.tokens),
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                      "total_tokens": n_prompt + n_gen},
            "timings": gen.timings,
            "speculation": gen.speculation,
        }


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
    but speculative outputs may then differ from plain decoding at near-ties.

    n_gpu_layers and n_batch are llama.cpp's (as in llama_cpp.Llama): layers offloaded to a GPU
    backend where the build has one (None: llama.cpp's default), rows per decode call.

    lora: a LoRA adapter GGUF (llama.cpp's format) applied over the model in every pass; a known
    model shipped as an adapter (e.g. "smollm2-135m-dmtd") brings its own."""

    def __init__(self, model: str = "smollm2-135m", n_ctx: int = 4096, n_threads: int | None = None,
                 strategy: str = "auto", flash_attn: bool = True, verbose: bool = False,
                 strategy_options: dict | None = None, exact_rows: bool = True,
                 n_gpu_layers: int | None = None, n_batch: int = 512, lora: str | None = None):
        from .backend import native

        native.set_verbose(verbose)
        if not isinstance(n_batch, int) or n_batch < 1:
            raise RequestError(f"n_batch must be a positive integer, got {n_batch!r}")
        self.strategy_options = dict(strategy_options or {})
        make_strategy(strategy, **self.strategy_options)  # refuse bad names before loading anything
        self.strategy = strategy
        files = resolve(model, lora)
        self.model_path = files.path
        self.model = Model(files.path, n_gpu_layers=n_gpu_layers, lora=files.lora)
        self.session = Session(self.model, n_ctx=n_ctx, n_threads=n_threads, flash_attn=flash_attn,
                               exact_rows=exact_rows, n_batch=n_batch)
        self.model_name = model if self.model_path.name != model else self.model_path.stem
        if lora is not None:  # results and the server name what answered: base plus adapter
            self.model_name += f"+{files.lora.stem}"
        self._lock = threading.Lock()
        self._streaming_thread: int | None = None
        self._auto = AutoState()  # what auto learns here carries from request to request

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

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of text, as llama_cpp.Llama.tokenize: BOS where the model uses one, special
        tokens in the text read as plain text unless special=True (prompts are read with
        special=True, as llama-cpp-python does)."""
        return self.model.tokenize(text, add_bos=self.model.add_bos and add_bos, special=special)

    def detokenize(self, tokens) -> str:
        return self.model.detokenize(tokens)

    def calibrate(self, rounds: int = 7):
        """Measure what passes of n rows cost on this device now (edge_mtp.profile), cache it and
        return it: for an app that wants auto's first request not to wait ~10 s for it. Runs on a
        scratch context; this engine's KV cache and prompt cache are kept."""
        from .profile import measure

        with self._lock:
            return measure(self.session, rounds=rounds)

    # -- requests, llama-cpp-python's shape -----------------------------------------------
    def create_completion(self, prompt: str | list[int], max_tokens: int | None = 16, *,
                          temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.05,
                          top_k: int = 40, stop: str | list[str] | None = None,
                          seed: int | None = None, logprobs: int | None = None, stream: bool = False,
                          strategy: str | None = None, strategy_options: dict | None = None):
        """Complete a raw prompt (text, or token ids); a `text_completion` dict, or an iterator of
        its chunks with stream=True. logprobs=k (0..20) adds each token's log-probability and its
        k best alternatives."""
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            raise RequestError("prompt must be a string or a list of token ids "
                               "(use create_chat_completion for messages)")
        s = self.start(prompt, max_tokens, temperature, top_k, top_p, min_p, seed, stop, strategy,
                        strategy_options, logprobs)
        return s.chunks() if stream else self._finish(s)

    def create_chat_completion(self, messages: list[dict], max_tokens: int | None = None, *,
                               temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.05,
                               top_k: int = 40, stop: str | list[str] | None = None,
                               seed: int | None = None, logprobs: bool = False,
                               top_logprobs: int | None = None, stream: bool = False,
                               strategy: str | None = None, strategy_options: dict | None = None):
        """Answer chat messages with the model's chat template; a `chat.completion` dict, or an
        iterator of `chat.completion.chunk` dicts with stream=True. max_tokens None: until the
        end of the turn or the context."""
        self._check_messages(messages)
        if not isinstance(logprobs, bool):
            raise RequestError(f"logprobs must be true or false, got {logprobs!r}")
        if top_logprobs is not None and not logprobs:
            raise RequestError("top_logprobs needs logprobs set to true")
        s = self.start(messages, max_tokens, temperature, top_k, top_p, min_p, seed, stop, strategy,
                        strategy_options, (top_logprobs or 0) if logprobs else None)
        return s.chunks() if stream else self._finish(s)

    # -- the short forms -------------------------------------------------------------------
    def stream(self, prompt: str | list[dict], max_tokens: int | None = 128, *,
               temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
               seed: int | None = None, stop: str | list[str] | None = None,
               strategy: str | None = None, strategy_options: dict | None = None) -> Stream:
        """Start a request and iterate its text pieces; a list of {"role", "content"} messages is
        rendered with the chat template.

        strategy ("plain", "probe", "probe:10", "lookup:4", ...) and strategy_options (e.g.
        {"masks": 2}) override the engine's defaults for this request.

        max_tokens None or -1 means: until EOS, a stop string or the end of the context.
        """
        if isinstance(prompt, list):
            self._check_messages(prompt)
        return self.start(prompt, max_tokens, temperature, top_k, top_p, min_p, seed, stop,
                           strategy, strategy_options)

    def generate(self, prompt: str, max_tokens: int | None = 128, **kw) -> dict:
        """Complete a raw prompt (no chat template); returns a text_completion dict."""
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string (use chat() for messages)")
        return self._finish(self.stream(prompt, max_tokens, **kw))

    def chat(self, messages: list[dict], max_tokens: int | None = 128, **kw) -> dict:
        """Answer chat messages with the model's chat template; returns a chat.completion dict."""
        return self._finish(self.stream(self._check_messages(messages), max_tokens, **kw))

    # -- one request -----------------------------------------------------------------------
    def start(self, prompt: str | list[int] | list[dict], max_tokens: int | None = 128,
              temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
              seed: int | None = None, stop: str | list[str] | None = None,
              strategy: str | None = None, strategy_options: dict | None = None,
              top_logprobs: int | None = None) -> Stream:
        """Check a request (text, token ids or chat messages) and set it up as a Stream; nothing
        runs until it is iterated (its pieces, or `chunks()`), so a server can refuse a bad
        request before it answers, and stop a running one between steps. top_logprobs None: no
        logprobs; k (0..20): each token's log-probability and its k best alternatives."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            kind = "chat"
            self._check_messages(prompt)
        elif isinstance(prompt, str) or (isinstance(prompt, list) and prompt):
            kind = "text"
        else:
            raise RequestError("prompt must be a string, a non-empty list of token ids or a list "
                               "of {'role', 'content'} messages")
        tokens = self._prompt_tokens(prompt)
        if max_tokens is None or max_tokens == -1:
            max_tokens = self.n_ctx
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer or -1, got {max_tokens!r}")
        if len(tokens) >= self.n_ctx:
            raise RequestError(f"prompt has {len(tokens)} tokens, the context holds {self.n_ctx}; "
                               "shorten it or raise n_ctx")
        stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else \
            [] if stop is None else None
        if stops is None or not all(isinstance(s, str) for s in stops):
            raise RequestError("stop must be a string or a list of strings")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise RequestError(f"seed must be an integer, got {seed!r}")
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, min_p, seed), top_logprobs)
        if strategy is None:
            strategy, options = self.strategy, {**self.strategy_options, **(strategy_options or {})}
        else:
            options = dict(strategy_options or {})
        if strategy.partition(":")[0] == "auto":
            options.setdefault("state", self._auto)
        gen = Generation(self.session, make_strategy(strategy, self.model, **options), sampler, tokens,
                         max_tokens, stops)
        return Stream(self, gen, kind, logprobs=top_logprobs is not None)

    @staticmethod
    def _finish(s: Stream) -> dict:
        for _ in s:
            pass
        return s.result

    @staticmethod
    def _check_messages(messages) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list of {'role', 'content'} dicts")
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise RequestError("each message must be a dict with string 'role' and 'content'")
        return messages

    def _prompt_tokens(self, prompt) -> list[int]:
        if isinstance(prompt, list) and isinstance(prompt[0], dict):  # checked messages
            return self.model.chat_tokens(prompt)
        if isinstance(prompt, list):  # token ids
            n = self.model.n_vocab
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n for t in prompt):
                raise RequestError(f"a prompt of token ids must hold integers in [0, {n})")
            return list(prompt)
        tokens = self.model.tokenize(prompt)
        if not tokens:
            raise RequestError("empty prompt: give at least one token of text")
        return tokens
