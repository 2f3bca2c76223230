"""Prompt-lookup decoding: draft the tokens that followed the latest earlier occurrence of the
current n-gram (n = 3, then 2, then 1) in the prompt and the text generated so far, and verify
them as a chain in one pass. Strong wherever the answer copies its context (code edits, RAG,
summaries). Rows per step: 1 + draft length (budget - 1, at most 10).
"""
from __future__ import annotations

from ..errors import RequestError
from ..tree import TokenTree
from .base import Strategy

DEFAULT_BUDGET = 11  # the root and a draft of up to 10, as in the prompt-lookup baseline
MAX_NGRAM = 3


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
        room = session.n_ctx - session.n_past - 1
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
