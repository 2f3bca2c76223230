"""`hybrid`: prompt-lookup drafts and probing-mask drafts verified in one tree under one row budget.

Every row of the budget goes to whichever candidate is worth most, each valued by its estimated
chance of acceptance (each costs one row, and comes only after its parent):
- lookup chain draft i (lookup.py's n-gram continuation after an L-token match): accepted with
  prod_{j<=i} a(L + j - 1), a(l) the running acceptance rate of a lookup draft token after an
  l-token match (lookup.py's MatchAcceptance, as auto uses it);
- mask candidate of rank r for depth 1 (proposed by the previous tree's deepest accepted node's
  mask, k = 1): right with h(r), the running rate at which rank r was the true next token
  (observed every step, whether or not the candidate was in the tree);
- the mask row of a node: it proposes the next step's mask candidates if this node ends up the
  deepest accepted one, valued h(0) * P(node is the deepest accepted) (h(0): what the best mask
  candidate would add next step).
A best-first fill therefore maximises this step's expected accepted tokens plus the expected
value of having mask candidates next step: lookup takes the rows when its match is long, the
masks when it is short or absent. A mask candidate equal to the chain's first draft is the same
node. The shared verifier decides, so hybrid is lossless; masks never influence token rows.
"""
from __future__ import annotations

import heapq
import itertools

import numpy as np

from ..errors import RequestError
from ..tree import TokenTree
from .lookup import LONGEST, Lookup, MatchAcceptance
from .probe import MaskDrafter, Masks

DEFAULT_BUDGET = 10
MAX_CHAIN = 10  # the longest lookup chain, as in the prompt-lookup baseline
# h(r) priors: the teacher-forced chance that a mean-initialised mask's rank-r candidate is the
# true next-but-one token (the probing issue: top-1 0.077, top-4 0.184, top-14 0.300, top-29 0.380)
RANK_PRIOR = np.concatenate([[0.077], np.full(3, 0.107 / 3), np.full(10, 0.116 / 10),
                             np.full(15, 0.080 / 15), np.full(MAX_CHAIN + 100, 0.002)])
RANK_WEIGHT = 8.0  # pseudo-observations behind the rank priors


class Hybrid(MaskDrafter):
    name = "hybrid"

    def __init__(self, budget: int = DEFAULT_BUDGET, lam: float = 0.1, init: str = "mean"):
        if not isinstance(budget, int) or not 2 <= budget <= len(RANK_PRIOR):
            raise RequestError(f"hybrid needs a budget of 2..{len(RANK_PRIOR)} rows (root and a draft), "
                               f"got {budget!r}")
        self.budget = budget
        self.masks = Masks(1, lam, init)
        self.keep = [budget]  # mask candidates kept: more than any step can use

    def begin(self, session, prompt):
        self.lookup = Lookup(budget=MAX_CHAIN + 1)
        self.lookup.start(prompt)
        self.chain = MatchAcceptance()
        self.rank_hits, self.rank_trials = RANK_PRIOR[:self.budget] * RANK_WEIGHT, RANK_WEIGHT
        self.accepted_from = {"lookup": 0, "masks": 0}
        self.masks.start(session.model, prompt)

    def propose(self, pending, rows):
        self.masks.absorb([pending])
        self.lookup.see([pending])
        rows = min(self.budget, rows)
        self.match = self.lookup.find(min(MAX_CHAIN, rows - 1), longest=LONGEST)
        tree, self.masks_of, self.source = self._plan(pending, self.match.length, self.match.drafts, rows)
        return tree

    def accept(self, step):
        self._learn(self.match.length, self.match.drafts, step.tokens)
        if step.tree is not None:
            for node in step.verdict.path[1:]:
                for s in self.source[node]:
                    self.accepted_from[s] += 1
        if step.tree is not None and step.verdict.deepest in self.masks_of:
            self.masks.propose(step.logits, step.row_of, self.masks_of[step.verdict.deepest], self.keep)
        else:
            self.masks.proposal = []
        self.masks.absorb(step.tokens[:-1])  # the bonus is absorbed when it is the next root
        self.lookup.see(step.tokens[:-1])

    def _plan(self, pending: int, match: int, chain: list[int], rows: int):
        """Fill `rows` rows best first; returns the tree, the mask rows of each masked node and
        the sources of each draft node."""
        h = self.rank_hits / self.rank_trials
        tree = TokenTree()
        root = tree.add(pending, -1)
        p_of, kids_p, masks_of, source = {root: 1.0}, {root: 0.0}, {}, {root: ()}
        heap: list = []
        order = itertools.count()

        def offer(value: float, *item) -> None:
            heapq.heappush(heap, (-value, next(order), item))

        p_first, first_source = (self.chain.at(match), ("lookup",)) if chain else (0.0, ())
        if self.masks.proposal:
            for r, c in enumerate(self.masks.proposal[0][0]):
                if c == pending:
                    continue  # pruned: a repeat of its parent
                if chain and c == chain[0]:  # both sources propose it: one node
                    p_first, first_source = max(p_first, h[r]), ("lookup", "masks")
                else:
                    offer(h[r], "draft", root, int(c), None, ("masks",))
        if chain:
            offer(p_first, "draft", root, chain[0], 0, first_source)
        offer(h[0], "mask", root)
        while heap and len(tree) < rows:
            neg_value, _, item = heapq.heappop(heap)
            if item[0] == "mask":
                node = item[1]
                value = h[0] * (p_of[node] - kids_p[node])
                if value < -neg_value * (1 - 1e-9):  # children were added since: re-rank
                    offer(value, *item)
                    continue
                masks_of[node] = self.masks.add(tree, node)
                continue
            _, parent, token, at, src = item
            node = tree.add(token, parent)
            p_of[node], kids_p[node], source[node] = -neg_value, 0.0, src
            kids_p[parent] += -neg_value
            offer(h[0] * -neg_value, "mask", node)
            if at is not None and at + 1 < len(chain):
                offer(-neg_value * self.chain.at(match + at + 1), "draft", node, chain[at + 1], at + 1,
                      ("lookup",))
        return tree, masks_of, source

    def _learn(self, match: int, chain: list[int], truth: list[int]) -> None:
        """Update h(r) with the true next token and a(l) along the chain as far as truth reaches."""
        if self.masks.proposal:
            self.rank_trials += 1
            hit = np.flatnonzero(self.masks.proposal[0][0] == truth[0])
            if hit.size:
                self.rank_hits[hit[0]] += 1
        self.chain.learn(match, chain, truth)

    def stats(self) -> dict:
        m = self.masks
        return {"budget": self.budget, "init": m.init, "lambda": m.lam,
                "accepted_from_lookup": self.accepted_from["lookup"],
                "accepted_from_masks": self.accepted_from["masks"]}
