"""Prompt-lookup decoding: draft the tokens that followed the latest earlier occurrence of the
current n-gram (n = 3, then 2, then 1) in the prompt and the text generated so far, and verify
them as a chain in one pass. Strong wherever the answer copies its context (code edits, RAG,
summaries). Rows per step: 1 + draft length (budget - 1, at most 10).
"""
from __future__ import annotations

import numpy as np

from ..errors import RequestError
from ..tree import TokenTree
from .base import Strategy

DEFAULT_BUDGET = 11  # the root and a draft of up to 10, as in the prompt-lookup baseline
MAX_NGRAM = 3
LONGEST = 12  # match lengths >= this share one acceptance estimate
# a(l) priors: acceptance of the next lookup draft token after an l-token match (l >= 12 pooled),
# made monotone, from tools/lookup_acceptance.py on Spec-Bench dev (SmolLM2-135M, greedy, 128
# tokens, 8 questions per subtask: 0.25 0.53 0.62 0.74 0.75 0.79 0.81 0.72 0.78 0.80 0.86 0.94);
# index 0 unused
PRIOR = np.array([0.0, 0.25, 0.53, 0.62, 0.72, 0.75, 0.78, 0.79, 0.79, 0.80, 0.82, 0.86, 0.94])
PRIOR_WEIGHT = 4.0  # pseudo-observations behind each prior


class MatchAcceptance:
    """a(l): the chance that the next lookup draft token is accepted after an l-token match
    (accepting a token lengthens the match by one). A Beta posterior per match length, started
    from PRIOR and updated with every verified draft token; auto sizes its drafts by it, hybrid
    values its chain rows by it, tools/lookup_acceptance.py measures the priors with it."""

    def __init__(self, prior_weight: float = PRIOR_WEIGHT):
        self.hits = PRIOR * prior_weight
        self.trials = np.full(len(PRIOR), prior_weight)

    def rates(self) -> np.ndarray:
        """a(l) for l = 0..LONGEST (0 unused)."""
        return self.hits / np.maximum(self.trials, 1e-12)

    def along(self, match: int, n: int) -> np.ndarray:
        """a for draft tokens 1..n of a chain found after a `match`-token match."""
        return self.rates()[np.minimum(np.arange(match, match + n), LONGEST)]

    def learn(self, match: int, drafts, truth) -> None:
        """Score a verified chain: draft i counts as tested when drafts 0..i-1 were right and the
        true token at i is known (truth: the accepted tokens and the bonus, or the reference)."""
        for i, (d, t) in enumerate(zip(drafts, truth)):
            length = min(match + i, LONGEST)
            self.trials[length] += 1
            if d != t:
                break
            self.hits[length] += 1


class Lookup(Strategy):
    name = "lookup"

    def __init__(self, budget: int = DEFAULT_BUDGET, max_ngram: int = MAX_NGRAM, min_ngram: int = 1):
        super().__init__()
        if budget < 2:
            raise RequestError(f"lookup needs a budget of at least 2 rows (root and a draft), got {budget}")
        self.budget, self.max_ngram, self.min_ngram = budget, max_ngram, min_ngram
        self.max_draft = min(10, budget - 1)

    def prefill(self, session, prompt):
        self.start(prompt)
        return super().prefill(session, prompt)

    def start(self, prompt) -> None:
        """A new text to match against: the prompt; append every token that follows to `history`."""
        self.history: list[int] = list(prompt)
        self.index: list[dict[tuple, int]] = [{} for _ in range(self.max_ngram + 1)]
        self.indexed = 0  # n-grams ending before this history position are in the index

    def draft(self, limit: int) -> list[int]:
        """Continuation of the latest earlier occurrence of the longest matching suffix n-gram."""
        return self.find(limit)[1]

    def find(self, limit: int, longest: int = 16) -> tuple[int, list[int]]:
        """(match length, draft): the draft of `draft`, and how many tokens (up to `longest`) the
        history's suffix and the text before that earlier occurrence share; 0 and [] if none.
        A longer match predicts a likelier continuation (auto sizes drafts by it)."""
        h = self.history
        for end in range(self.indexed + 1, len(h)):  # index all but the suffix itself
            for n in range(1, self.max_ngram + 1):
                if end >= n:
                    self.index[n][tuple(h[end - n:end])] = end
        self.indexed = max(self.indexed, len(h) - 1)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(h) >= n:
                at = self.index[n].get(tuple(h[-n:]))
                if at is not None:
                    k = n
                    while k < longest and k < at and h[at - 1 - k] == h[-1 - k]:
                        k += 1
                    return k, h[at:at + limit]
        return 0, []

    def step(self, session, sampler, pending):
        self.history.append(pending)
        room = session.room - 1
        drafts = self.draft(min(self.max_draft, room))
        if not drafts:
            out = [sampler(session.decode([pending])[-1])]
        else:
            tree = TokenTree()
            parent = tree.add(pending, -1)
            for t in drafts:
                parent = tree.add(t, parent)
            out = self.verify_tree(session, sampler, tree)[0].tokens
        self.history.extend(out[:-1])  # the last one is the next pending token
        return out

    def stats(self) -> dict:
        return {"budget": self.budget}
