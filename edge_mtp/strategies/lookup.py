"""Prompt-lookup decoding: draft the tokens that followed the latest earlier occurrence of the
current n-gram (n = 3, then 2, then 1) in the prompt and the text generated so far, and verify
them as a chain in one pass. Strong wherever the answer copies its context (code edits, RAG,
summaries). Rows per step: 1 + draft length (budget - 1, at most 10).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import RequestError
from ..tree import TokenTree
from .speculative import Drafter

DEFAULT_BUDGET = 11  # the root and a draft of up to 10, as in the prompt-lookup baseline
MAX_NGRAM = 3
LONGEST = 64  # match lengths are counted up to this; longer ones share its estimate
LEARNING_RATE = 0.05  # step of the per-request logit offset per tested draft token
# Acceptance is estimated per match-length bucket (lengths 1..12 each, then wider ranges: a long
# match is rarer and its acceptance changes slowly), shifted by whether a draft token continues a
# word (the rest of a word already begun is rarely changed) and, for the first one, by what
# followed the matched n-gram before: other tokens too (split), once (single), or always this
# token (agreed). The fitted values are data: priors.json, written by tools/auto_replay.py.
PRIORS = json.loads((Path(__file__).parent / "priors.json").read_text())
BUCKET_START = np.array(PRIORS["bucket_start"])
LOGIT_PRIOR = [math.log(a / (1.0 - a)) for a in PRIORS["acceptance"]]
FIRST_SHIFT = PRIORS["first_shift"]  # [agreement: split, single, agreed][continues]
LATER_SHIFT = PRIORS["later_shift"]  # [continues]


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


class Match(NamedTuple):
    """A lookup find: how many tokens the text's suffix shares with the earlier occurrence, the
    tokens that followed it, and its support: of the n-gram's occurrences, how many were followed
    by the draft's first token, of how many."""

    length: int
    drafts: list[int]
    support: tuple[int, int]


NO_MATCH = Match(0, [], (0, 0))


class Lookup(Drafter):
    name = "lookup"

    def __init__(self, budget: int = DEFAULT_BUDGET, max_ngram: int = MAX_NGRAM, min_ngram: int = 1):
        if budget < 2:
            raise RequestError(f"lookup needs a budget of at least 2 rows (root and a draft), got {budget}")
        self.budget, self.max_ngram, self.min_ngram = budget, max_ngram, min_ngram
        self.max_draft = min(10, budget - 1)

    def begin(self, session, prompt):
        self.start(prompt)

    def start(self, prompt) -> None:
        """A new text to match against: the prompt; `see` appends every token that follows."""
        self.history: list[int] = list(prompt)
        self.index: list[dict[tuple, int]] = [{} for _ in range(self.max_ngram + 1)]
        # per n-gram: how often each token followed it, and (under None) how often anything did
        self.follow: list[dict[tuple, dict]] = [{} for _ in range(self.max_ngram + 1)]
        self.indexed = 0  # n-grams ending before this history position are in the index

    def see(self, tokens) -> None:
        """Tokens that now follow the text."""
        self.history.extend(tokens)

    def find(self, limit: int, longest: int = 16) -> Match:
        """The continuation (up to `limit` tokens) of the latest earlier occurrence of the longest
        matching suffix n-gram (n = max_ngram .. min_ngram), with the match length counted up to
        `longest` and the n-gram's support. A longer match predicts a likelier continuation, and
        so does support (a 1-gram seen 9 times with 5 different followers predicts little)."""
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
                    return Match(k, h[at:at + limit], (followers[h[at]], followers[None]))
        return NO_MATCH

    def propose(self, pending, rows):
        self.see([pending])  # the text now ends with the pending token
        drafts = self.find(min(self.max_draft, rows - 1)).drafts
        return TokenTree.chain(pending, drafts) if drafts else None

    def accept(self, step):
        self.see(step.tokens[:-1])  # the last one is the next pending token

    def stats(self) -> dict:
        return {"budget": self.budget}
