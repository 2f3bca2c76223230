"""Token selection from logits: greedy, or sampling with temperature, top-k, top-p and min-p.

The filters run in llama.cpp's default order (top-k, top-p, min-p on the untempered distribution,
then temperature), and `distribution` exposes the exact probabilities that `sample` draws from, so
speculative verifiers can reason about the same distribution that plain sampling uses.

A sampled token is the inverse CDF of one uniform draw per emitted token (`draw`), so with a seed
the token at a position depends only on its logits row and that position's draw, not on how the
position was reached: a verifier that emits `draw`'s token and accepts the draft equal to it
emits exactly what plain sampling would (token for token where rows are exact).

Every emitted token is chosen here or by the verifier from one logits row; both report it to
`Sampler.note`, so log-probabilities (OpenAI's `logprobs`) come from the very row each token was
chosen from, whatever the strategy: with exact rows they are the same numbers for every strategy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int | None = None

    def __post_init__(self):
        t, p, m, k = self.temperature, self.top_p, self.min_p, self.top_k
        if not (isinstance(t, (int, float)) and math.isfinite(t) and 0 <= t <= 100):
            raise RequestError(f"temperature must be a number in [0, 100], got {t!r}")
        if not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise RequestError(f"top_p must be in (0, 1], got {p!r}")
        if not (isinstance(m, (int, float)) and 0 <= m < 1):
            raise RequestError(f"min_p must be in [0, 1), got {m!r}")
        if not (isinstance(k, int) and k >= 0):
            raise RequestError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability under the model (log-softmax of its raw logits row, as
    llama-server and llama-cpp-python report it) and the `top` best alternatives, best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


class Sampler:
    """Draws tokens for one request; greedy when temperature is 0. With top_logprobs (0..20) it
    records a TokenLogprob per chosen token in `chosen`, in the order the tokens are emitted."""

    def __init__(self, params: SamplingParams, top_logprobs: int | None = None):
        if top_logprobs is not None and not (isinstance(top_logprobs, int) and not isinstance(top_logprobs, bool)
                                             and 0 <= top_logprobs <= MAX_TOP_LOGPROBS):
            raise RequestError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs!r}")
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.top_logprobs = top_logprobs
        self.chosen: list[TokenLogprob] = []

    def __call__(self, logits: np.ndarray) -> int:
        if self.params.greedy:
            token = int(np.argmax(logits))
        else:
            token = self.draw(*self.distribution(logits))
        self.note(logits, token)
        return token

    def draw(self, ids: np.ndarray, probs: np.ndarray) -> int:
        """The next position's token: one uniform, inverted through the cumulative probabilities
        (candidates in `distribution`'s order)."""
        i = int(np.searchsorted(np.cumsum(probs), self.rng.random(), side="right"))
        return int(ids[min(i, len(ids) - 1)])

    def note(self, logits: np.ndarray, token: int) -> None:
        """`token` was chosen from this logits row (by __call__ or the verifier): record its
        log-probability when they are asked for."""
        if self.top_logprobs is None:
            return
        top = float(logits.max())
        log_z = top + float(np.log(np.exp(logits - top, dtype=np.float64).sum()))
        alts: tuple = ()
        if self.top_logprobs:
            k = self.top_logprobs
            ids = np.argpartition(logits, -k)[-k:]
            ids = ids[np.argsort(-logits[ids], kind="stable")]
            alts = tuple((int(i), float(logits[i]) - log_z) for i in ids)
        self.chosen.append(TokenLogprob(token, float(logits[token]) - log_z, alts))

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate ids and their probabilities (summing to 1) after all filters."""
        p = self.params
        if p.top_k and p.top_k < len(logits):
            ids = np.argpartition(logits, -p.top_k)[-p.top_k:]
        else:
            ids = np.arange(len(logits))
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        z = logits[ids].astype(np.float64)
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        keep = len(ids)
        if p.top_p < 1:
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1)
        if p.min_p > 0:
            keep = min(keep, max(1, int(np.count_nonzero(probs >= p.min_p * probs[0]))))
        ids, z = ids[:keep], z[:keep]
        probs = np.exp((z - z[0]) / p.temperature) if p.temperature > 0 else np.eye(1, keep)[0]
        return ids, probs / probs.sum()
