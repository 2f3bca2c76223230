"""Prompt-lookup decoding: draft the tokens that followed the latest earlier occurrence of the
current n-gram (n = 3, then 2, then 1) in the prompt and the text generated so far, and verify
them as a chain in one pass. Strong wherever the answer copies its context (code edits, RAG,
summaries). Rows per step: 1 + draft length (budget - 1, at most 10).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import RequestError
from ..tree import TokenTree
from .base import Strategy

DEFAULT_BUDGET = 11  # the root and a draft of up to 10, as in the prompt-lookup baseline
MAX_NGRAM = 3
LONGEST = 64  # match lengths are counted up to this; longer ones share its estimate
# Acceptance is estimated per match-length bucket: lengths 1..12 each, then wider ranges (a long
# match is rarer and its acceptance changes slowly). BUCKET_START[i] is bucket i's first length.
BUCKET_START = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 17, 21, 25, 33, 49])
# a(l) priors per bucket: acceptance of the next lookup draft token after an l-token match, made
# monotone, from `tools/auto_replay.py priors` on all 120 questions of Spec-Bench dev (SmolLM2-135M
# Q4_1, greedy, 128 tokens; 41,000 draft tokens): 0.25 after a 1-token match, 0.75 after 5,
# 0.89 after 12, 0.95 after 25-32, 0.99 after 49+ (a passage being copied)
PRIOR = np.array([0.25, 0.53, 0.63, 0.70, 0.745, 0.765, 0.83, 0.83, 0.864, 0.87, 0.87, 0.889,
                  0.89, 0.916, 0.94, 0.952, 0.97, 0.988])
LOGIT_PRIOR = [math.log(a / (1.0 - a)) for a in PRIOR]
LEARNING_RATE = 0.05  # step of the per-request logit offset per tested draft token
# A draft token is also told by whether it continues a word (a piece without a leading space or
# punctuation: the rest of a word already begun is rarely changed), and the first one by what
# followed the matched n-gram before: other tokens too (split), once (single), or always this token
# (agreed). These shift a(l) on the logit scale, fitted on the same drafts: first tokens split /
# single / agreed x word start / continuation observed 0.22 0.36 0.62 0.85 0.86 0.94 where length
# alone predicted 0.40-0.72; later tokens 0.84 / 0.93 where it predicted 0.86.
FIRST_SHIFT = ((-1.08, -0.49), (-0.08, 1.08), (1.15, 2.30))  # [agreement][continues]
LATER_SHIFT = (-0.18, 0.76)  # [continues]


def continues_word(piece: bytes) -> bool:
    """Whether a token's text continues the word before it (no leading space or punctuation)."""
    return piece[:1].isalnum()


def bucket(length):
    """The acceptance bucket of a match length (1..LONGEST; arrays too)."""
    return np.searchsorted(BUCKET_START, np.minimum(length, LONGEST), side="right") - 1


BUCKET_OF = [max(int(bucket(n)), 0) for n in range(LONGEST + 1)]  # by match length, for scalars


class MatchAcceptance:
    """a: the chance that a lookup draft token is accepted, from its match length (accepting a
    token lengthens the match by one), whether it continues a word and, for the first one, how
    consistently the matched n-gram was followed: the measured priors on the logit scale plus one
    offset per request, learned online (logistic regression's gradient step on the bias) from
    every draft token whose truth becomes known, verified or not. auto sizes its drafts by it,
    hybrid values its chain rows by it."""

    def __init__(self, rate: float = LEARNING_RATE):
        self.rate = rate
        self.offset = 0.0  # this request's logit offset from the priors

    def along(self, match: int, n: int, continues=None, support: tuple[int, int] = (0, 0)) -> list[float]:
        """a for draft tokens 1..n of a chain found after a `match`-token match; `continues` (per
        draft token: does it continue a word?) and the find's `support` (agreeing, all
        occurrences) shift it as FIRST_SHIFT and LATER_SHIFT say, when given."""
        out = []
        for i in range(n):
            z = LOGIT_PRIOR[BUCKET_OF[min(match + i, LONGEST)]] + self.offset
            if continues is not None:
                if i == 0:
                    agreeing, seen = support
                    z += FIRST_SHIFT[0 if agreeing < seen else 1 if seen == 1 else 2][continues[0]]
                else:
                    z += LATER_SHIFT[continues[i]]
            out.append(1.0 / (1.0 + math.exp(-z)))
        return out

    def at(self, length: int) -> float:
        """a after a `length`-token match, nothing else known."""
        return self.along(length, 1)[0]

    def learn(self, match: int, drafts, truth, continues=None, support: tuple[int, int] = (0, 0)) -> None:
        """Score a chain: draft i is tested when drafts 0..i-1 were right and the true token at i
        is known (truth: the accepted tokens and the bonus, the token a plain step chose, or the
        reference)."""
        n = min(len(drafts), len(truth))
        for i, a in enumerate(self.along(match, n, continues, support)):
            hit = drafts[i] == truth[i]
            self.offset += self.rate * (hit - a)
            if not hit:
                break


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
        # per n-gram: how often each token followed it, and (under None) how often anything did
        self.follow: list[dict[tuple, dict]] = [{} for _ in range(self.max_ngram + 1)]
        self.indexed = 0  # n-grams ending before this history position are in the index
        self.support = (0, 0)  # of the last find: occurrences followed by its draft, all occurrences

    def draft(self, limit: int) -> list[int]:
        """Continuation of the latest earlier occurrence of the longest matching suffix n-gram."""
        return self.find(limit)[1]

    def find(self, limit: int, longest: int = 16) -> tuple[int, list[int]]:
        """(match length, draft): the draft of `draft`, and how many tokens (up to `longest`) the
        history's suffix and the text before that earlier occurrence share; 0 and [] if none.
        A longer match predicts a likelier continuation (auto sizes drafts by it), and so does
        `support`: how many of the n-gram's occurrences were followed by the draft's first token,
        of how many (a 1-gram seen 9 times with 5 different followers predicts little)."""
        h = self.history
        for end in range(self.indexed + 1, len(h)):  # index all but the suffix itself
            for n in range(1, self.max_ngram + 1):
                if end >= n:
                    gram = tuple(h[end - n:end])
                    self.index[n][gram] = end
                    followers = self.follow[n].setdefault(gram, {None: 0})  # None: the total
                    followers[h[end]] = followers.get(h[end], 0) + 1
                    followers[None] += 1
        self.indexed = max(self.indexed, len(h) - 1)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(h) >= n:
                gram = tuple(h[-n:])
                at = self.index[n].get(gram)
                if at is not None:
                    k = n
                    while k < longest and k < at and h[at - 1 - k] == h[-1 - k]:
                        k += 1
                    followers = self.follow[n][gram]
                    self.support = (followers[h[at]], followers[None])
                    return k, h[at:at + limit]
        self.support = (0, 0)
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
