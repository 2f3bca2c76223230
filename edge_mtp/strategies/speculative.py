"""The one speculative decoder: a drafter proposes a token tree, the decoder verifies and commits it.

As in llama.cpp's common/speculative (drafters behind begin/draft/accept, verification in the
caller) and gpt-fast's loop: a `Drafter` only proposes and learns; `Speculative` owns everything
else, once: the room check, the plain fallback, the tree pass, verification (verify.py: greedy or
lossless sampling), the commit of the accepted path and the counts. `plain` is this decoder with
no drafter, so every strategy shares one plain step and one prompt pass.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..backend import Session
from ..profile import row_noise
from ..sampling import Sampler
from ..tree import TokenTree
from ..verify import Verdict, verify
from .base import Strategy


@dataclass
class Step:
    """What one decoder step did, for the drafter to learn from."""

    pending: int
    tokens: list[int]                # emitted: accepted drafts, then the bonus (plain: one token)
    tree: TokenTree | None = None    # None: a plain step
    verdict: Verdict | None = None
    logits: np.ndarray | None = None  # the tree pass's rows (BFS), valid until the next decode
    row_of: np.ndarray | None = None  # row of every inserted tree node
    model_ms: float = 0.0            # time inside llama.cpp
    step_ms: float = 0.0             # the whole step, proposal and verification included


class Drafter:
    """Proposes what the model may say next; never decodes. Subclasses override what they use."""

    name = ""

    def begin(self, session: Session, prompt: list[int]) -> None:
        """A new request whose prompt is `prompt`."""

    def riders(self) -> np.ndarray | None:
        """Embedding rows to ride in the prompt's last pass (Session.prefill), or None."""
        return None

    def rode(self, logits: np.ndarray) -> None:
        """The riders' logits from the prompt pass (not called when they found no room)."""

    def propose(self, pending: int, rows: int) -> TokenTree | None:
        """A tree rooted at `pending` of at most `rows` rows, or None for a plain step."""
        return None

    def accept(self, step: Step) -> None:
        """Learn from a step: what was verified, or the one token a plain step chose."""

    def finish(self) -> None:
        """The request ended (done, stopped or failed)."""

    def stats(self) -> dict:
        return {}


class Speculative(Strategy):
    """Decode with a drafter's trees where it proposes one that fits, plain steps elsewhere.

    With exact rows off, `noise` is the measured batch-row noise and the near-tie count says how
    many greedy choices made from tree rows had a top-2 gap below it (where such a row may pick
    another token than plain decoding would)."""

    def __init__(self, drafter: Drafter | None = None):
        self.drafter = drafter
        self.name = drafter.name if drafter else "plain"
        super().__init__()

    def begin_request(self) -> None:
        super().begin_request()
        self.noise: float | None = None
        self.near_ties = self.decisions = 0

    def prefill(self, session, prompt):
        self.begin_request()
        if self.drafter is None:
            return session.prefill(prompt)
        if not session.exact_rows:
            self.noise = row_noise(session)
        self.drafter.begin(session, prompt)
        riders = self.drafter.riders()
        logits = session.prefill(prompt, riders)
        if riders is None:
            return logits
        if len(logits) > 1:
            self.drafter.rode(logits[1:])
        return logits[0]

    def step(self, session: Session, sampler: Sampler, pending: int) -> list[int]:
        t0, m0 = time.perf_counter(), session.model_s
        tree = self.drafter.propose(pending, session.room) if self.drafter else None
        if tree is None or len(tree) < 2 or len(tree) > session.room:
            step = Step(pending, [sampler(session.decode([pending])[-1])])
        else:
            step = self.verify_tree(session, sampler, tree)
        if self.drafter is not None:
            step.model_ms, step.step_ms = (session.model_s - m0) * 1e3, (time.perf_counter() - t0) * 1e3
            self.drafter.accept(step)
        return step.tokens

    def verify_tree(self, session: Session, sampler: Sampler, tree: TokenTree) -> Step:
        """Decode a tree (root = the pending token), verify it, commit the accepted path."""
        tokens, parents, embd, row_of = tree.layout()
        logits = session.decode(tokens, parents, embd=embd)
        verdict = verify(tree, logits, row_of, sampler)
        session.commit(row_of[verdict.path])
        if self.noise is not None and sampler.params.greedy:
            top2 = np.partition(logits[row_of[verdict.path]], -2, axis=1)[:, -2:]
            self.near_ties += int(((top2[:, 1] - top2[:, 0]) < self.noise).sum())
            self.decisions += len(verdict.path)
        self.drafted += sum(len(kids) for kids in tree.children.values())  # token rows to verify
        n_acc = len(verdict.path) - 1
        self.accepted += n_acc
        self.accepted_by_depth.extend([0] * (n_acc - len(self.accepted_by_depth)))
        for d in range(n_acc):
            self.accepted_by_depth[d] += 1
        return Step(tree.tokens[0], verdict.tokens, tree, verdict, logits, row_of)

    def finish(self) -> None:
        if self.drafter is not None:
            self.drafter.finish()

    def stats(self) -> dict:
        out = self.drafter.stats() if self.drafter else {}
        if self.noise is not None:
            out.update({"exact_rows": False, "row_noise": round(self.noise, 6),
                        "near_ties": self.near_ties, "verified_choices": self.decisions})
        return out
