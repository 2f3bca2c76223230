"""The generation loop: prefill, then strategy steps until EOS, a stop string, max_tokens or a full
context. It owns stopping, streaming text and statistics, so strategies only produce tokens.
"""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Iterator

from .backend import Session
from .sampling import Sampler
from .strategies import Strategy


class TextStream:
    """Bytes of token pieces in, text safe to show out.

    Holds back incomplete UTF-8 sequences (a character split across tokens is never shown broken;
    one still unfinished when the answer ends is dropped) and any tail that could still become a
    stop string; `stopped` is set once a stop string appears, and the text before it is all that
    is ever emitted.
    """

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""
        self.text = ""  # everything emitted so far
        self.stopped = False

    def feed(self, data: bytes, final: bool = False) -> str:
        if self.stopped:
            return ""
        self.held += self.decoder.decode(data)
        if final:  # an unfinished character at the very end is no character: drop its bytes
            self.decoder.reset()  # (as llama-cpp-python's errors="ignore"), never show U+FFFD
        cut = min((i for i in (self.held.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self.held, self.stopped = self.held[:cut], "", True
        else:
            keep = 0 if final else self._stop_prefix_len()
            out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        self.text += out
        return out

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of held text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.held)), best, -1):
                if self.held.endswith(s[:n]):
                    best = n
                    break
        return best


@dataclass
class Generation:
    """One request's run; iterate `pieces()` for streamed text, then read the results."""

    session: Session
    strategy: Strategy
    sampler: Sampler
    prompt: list[int]
    max_tokens: int
    stop: list[str] = field(default_factory=list)

    tokens: list[int] = field(default_factory=list, init=False)
    finish_reason: str | None = field(default=None, init=False)
    steps: int = field(default=0, init=False)
    prompt_s: float = field(default=0.0, init=False)
    decode_s: float = field(default=0.0, init=False)
    model_s: float = field(default=0.0, init=False)  # of decode_s, inside llama.cpp
    text: str = field(default="", init=False)

    def pieces(self) -> Iterator[str]:
        text = TextStream(self.stop)
        t0 = time.perf_counter()
        pending = self.sampler(self.strategy.prefill(self.session, self.prompt))
        self.t_decode = time.perf_counter()
        self.prompt_s = self.t_decode - t0
        self.model_s0 = self.session.model_s
        try:
            yield from self._loop(pending, text)
            tail = text.feed(b"", final=True)
            if tail:
                yield tail
        finally:
            self.decode_s = time.perf_counter() - self.t_decode
            self.model_s = self.session.model_s - self.model_s0
            self.text = text.text
            self.strategy.finish()

    def _loop(self, pending: int, text: TextStream) -> Iterator[str]:
        model, session = self.session.model, self.session
        self.steps = 1  # the prompt pass produced the first token
        new = [pending]
        while True:
            for tok in new:
                if model.is_eog(tok):
                    self.finish_reason = "stop"
                    return
                if len(self.prompt) + len(self.tokens) >= session.n_ctx:
                    self.finish_reason = "length"  # prompt + completion fill the context
                    return
                self.tokens.append(tok)
                out = text.feed(model.piece(tok))
                if out:
                    yield out
                if text.stopped:
                    self.finish_reason = "stop"
                    return
                if len(self.tokens) >= self.max_tokens:
                    self.finish_reason = "length"
                    return
            new = self.strategy.step(session, self.sampler, new[-1])
            self.steps += 1

    def run(self) -> str:
        return "".join(self.pieces())

    @property
    def timings(self) -> dict:
        n = len(self.tokens)
        return {
            "prompt_ms": round(self.prompt_s * 1e3, 3),
            "decode_ms": round(self.decode_s * 1e3, 3),
            "prompt_tokens_per_second": round(len(self.prompt) / self.prompt_s, 2) if self.prompt_s else 0.0,
            # the first token comes from the prompt pass; the decode phase produced the rest
            "tokens_per_second": round((n - 1) / self.decode_s, 2) if n > 1 and self.decode_s else 0.0,
        }

    @property
    def speculation(self) -> dict:
        n = len(self.tokens)
        return {
            "strategy": self.strategy.name,
            "steps": self.steps,
            "drafted": self.strategy.drafted,
            "accepted": self.strategy.accepted,
            "mean_accepted_tokens_per_step": round(n / self.steps, 4) if self.steps else 0.0,
            "accepted_by_depth": list(self.strategy.accepted_by_depth),
            "model_ms": round(self.model_s * 1e3, 3),
            "orchestration_ms": round((self.decode_s - self.model_s) * 1e3, 3),
            **self.strategy.stats(),
        }
