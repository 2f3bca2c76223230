"""Training-free probing MTP ("Embedding-Space Probing", ESP): synthesized mask embeddings ride
along in the verification pass and propose the next step's drafts.

Each step decodes one tree (papers.md §2.3-2.4): the root is the pending token; draft nodes come
from the previous step's mask logits with top-1 expansion (depth d holds the K_d best candidates of
mask d, and only the best node of each depth gets children); a candidate equal to its parent token
is pruned (the next best takes its place). Every node carries k mask rows at the positions after
it (mask j's parent is mask j-1, so mask j sees its owner's path and masks 1..j-1). Masks are one
shared vector m, initialised as the mean of the prompt's input embeddings and pulled toward every
committed token: m <- m + lambda (e_new - m). Nodes never see masks, so verification (greedy or
lossless sampling, see verify.py) is unaffected; the masks of the deepest accepted node propose
the next tree. The prompt pass carries the last prompt token's k masks, so the first step already
has drafts. Rows per step: BC = (k + 1)(1 + sum K).
"""
from __future__ import annotations

import numpy as np

from ..errors import RequestError
from ..tree import EMBD, TokenTree
from .base import Strategy

DEFAULT_BUDGET = 10


def widths_for(budget: int, k: int) -> list[int]:
    """Per-depth widths K_1..K_k filling a block budget BC = (k + 1)(1 + sum K) (paper presets:
    BC 10 -> [4], 30 -> [14], 60 -> [29] with one mask; [15, 4] at 60 with two)."""
    if k not in (1, 2):
        raise RequestError(f"probe supports 1 or 2 masks, got {k}")
    nodes = budget // (k + 1) - 1
    if nodes < 1:
        raise RequestError(f"probe needs a budget of at least {2 * (k + 1)} rows with {k} mask(s) "
                           f"(root and one draft, each with its masks); got {budget}")
    if k == 1:
        return [nodes]
    second = round(nodes * 4 / 19)  # the paper's [15, 4] split at BC = 60
    return [nodes - second, second]


def top_candidates(logits: np.ndarray, n: int) -> np.ndarray:
    """The n highest-logit token ids, best first."""
    idx = np.argpartition(logits, -n)[-n:]
    return idx[np.argsort(-logits[idx], kind="stable")]


class Probe(Strategy):
    name = "probe"

    def __init__(self, budget: int = DEFAULT_BUDGET, masks: int = 1, lam: float = 0.1):
        super().__init__()
        if not 0 < lam <= 1:
            raise RequestError(f"probe lambda must be in (0, 1], got {lam}")
        self.budget, self.k, self.lam = budget, masks, lam
        self.widths = widths_for(budget, masks)
        self.mask: np.ndarray | None = None
        self.proposal: list[np.ndarray] = []  # per depth: candidate ids, best first

    def prefill(self, session, prompt):
        super().prefill(session, prompt)
        self.model = model = session.model
        self.mask = model.input_rows(np.asarray(prompt)).mean(axis=0, dtype=np.float64).astype(np.float32)
        if len(prompt) > 1:
            session.prefill(prompt[:-1])
        else:
            session.truncate(0)
        tree = TokenTree()
        owner = tree.add(prompt[-1], -1)
        masks = self._add_masks(tree, owner)
        tokens, parents, embd, row_of = tree.layout()
        if session.n_past + len(tokens) > session.n_ctx:  # no room for masks: plain prompt pass
            self.proposal = []
            return session.prefill(prompt)
        logits = session.decode_tree(tokens, parents, embd)
        first = logits[row_of[owner]].copy()
        self._propose(logits, row_of, masks)
        session.commit([row_of[owner]])
        return first

    def step(self, session, sampler, pending):
        self._absorb([pending])
        tree = TokenTree()
        root = tree.add(pending, -1)
        masks_of = {root: self._add_masks(tree, root)}
        parent = root
        for depth, width in enumerate(self.widths):
            if depth >= len(self.proposal) or width == 0:
                break
            cands = [int(c) for c in self.proposal[depth] if c != tree.tokens[parent]][:width]
            nodes = [tree.add(c, parent) for c in cands]
            for n in nodes:
                masks_of[n] = self._add_masks(tree, n)
            parent = nodes[0]
        if session.n_past + len(tree) > session.n_ctx:
            self.proposal = []
            return [sampler(session.decode([pending])[-1])]  # the tree does not fit: plain step
        verdict, logits, row_of = self.verify_tree(session, sampler, tree)
        self._propose(logits, row_of, masks_of[verdict.deepest])
        self._absorb(verdict.tokens[:-1])  # the bonus is absorbed when it is the next root
        return verdict.tokens

    def _add_masks(self, tree: TokenTree, owner: int) -> list[int]:
        rows, prev = [], owner
        for _ in range(self.k):
            prev = tree.add(EMBD, prev, embd=self.mask)
            rows.append(prev)
        return rows

    def _propose(self, logits: np.ndarray, row_of: np.ndarray, masks: list[int]) -> None:
        """Candidates for the next tree from one owner's masks (one spare for pruning)."""
        self.proposal = [top_candidates(logits[row_of[m]], w + 1) for m, w in zip(masks, self.widths)]

    def _absorb(self, tokens: list[int]) -> None:
        """m <- m + lambda (e - m) for every committed token, in order."""
        if tokens:
            for e in self.model.input_rows(np.asarray(tokens)):
                self.mask += self.lam * (e - self.mask)

    def stats(self) -> dict:
        return {"budget": self.budget, "masks": self.k, "widths": list(self.widths)}
