"""The one protocol every decoding strategy implements, and the tree step speculative ones share."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..backend import Session
from ..profile import row_noise
from ..sampling import Sampler
from ..tree import TokenTree
from ..verify import Verdict, verify


class Strategy(ABC):
    """Turns the last chosen token into the next ones.

    The loop calls `step` with `pending`, a token that was chosen but is not in the KV cache yet.
    The strategy commits it (and whatever it accepts) to the cache and returns the following
    tokens: at least one, the last of which is again pending. `drafted`/`accepted` count proposed
    and verified draft tokens, `accepted_by_depth[d]` the accepted drafts at tree depth d + 1.
    """

    name: str = ""
    verifies = True  # decodes token trees (plain and dmtd do not)

    def __init__(self):
        self.drafted = 0
        self.accepted = 0
        self.accepted_by_depth: list[int] = []
        self.noise: float | None = None  # batch-row noise, when exact rows are off
        self.near_ties = self.decisions = 0

    def prefill(self, session: Session, prompt: list[int]) -> np.ndarray:
        """A new request: evaluate the prompt, return the last prompt token's logits."""
        self.drafted = self.accepted = 0
        self.accepted_by_depth = []
        self.near_ties = self.decisions = 0
        self.noise = None if session.exact_rows or not self.verifies else row_noise(session)
        return session.prefill(prompt)

    @abstractmethod
    def step(self, session: Session, sampler: Sampler, pending: int) -> list[int]:
        ...

    def finish(self) -> None:
        """The request ended (done, stopped or failed): a strategy that learns keeps what it
        learned here."""

    def stats(self) -> dict:
        """Strategy-specific fields for the result's speculation block."""
        return {}

    def exactness_stats(self) -> dict:
        """With exact rows off: how many greedy choices made from batch rows had a top-2 logit gap
        below the measured batch-row noise (where such a row may pick another token than plain
        decoding would)."""
        if self.noise is None:
            return {}
        return {"exact_rows": False, "row_noise": round(self.noise, 6), "near_ties": self.near_ties,
                "verified_choices": self.decisions}

    def _count_near_ties(self, rows: np.ndarray) -> None:
        top2 = np.partition(rows, -2, axis=1)[:, -2:]
        self.near_ties += int(((top2[:, 1] - top2[:, 0]) < self.noise).sum())
        self.decisions += len(rows)

    def verify_tree(self, session: Session, sampler: Sampler, tree: TokenTree) -> tuple[Verdict, np.ndarray, np.ndarray]:
        """Decode a tree (root = the pending token), verify it, commit the accepted path.

        Returns the verdict, the logits (BFS rows; valid until the next decode) and the row of
        every inserted node.
        """
        tokens, parents, embd, row_of = tree.layout()
        logits = session.decode_tree(tokens, parents, embd)
        verdict = verify(tree, logits, row_of, sampler)
        session.commit(row_of[verdict.path])
        if self.noise is not None and sampler.params.greedy:
            self._count_near_ties(logits[row_of[verdict.path]])
        self.drafted += sum(1 for t in tree.tokens[1:] if t >= 0)
        n_acc = len(verdict.path) - 1
        self.accepted += n_acc
        if len(self.accepted_by_depth) < n_acc:
            self.accepted_by_depth.extend([0] * (n_acc - len(self.accepted_by_depth)))
        for d in range(n_acc):
            self.accepted_by_depth[d] += 1
        return verdict, logits, row_of
