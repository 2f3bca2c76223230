"""Token selection from logits: greedy, or sampling with temperature, top-k, top-p and min-p.

The filters run in llama.cpp's default order (top-k, top-p, min-p on the untempered distribution,
then temperature), and `distribution` exposes the exact probabilities that `sample` draws from, so
speculative verifiers can reason about the same distribution that plain sampling uses.
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


class Sampler:
    """Draws tokens for one request; greedy when temperature is 0."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.params.greedy:
            return int(np.argmax(logits))
        ids, probs = self.distribution(logits)
        return int(ids[self.rng.choice(len(ids), p=probs)])

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
