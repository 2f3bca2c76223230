"""Lookahead decoding (Fu et al., ICML 2024; papers.md §3.2): Jacobi iterations over a window of
future positions feed a pool of n-grams, and pooled n-grams that start with the current token are
verified, both in the same forward pass. No draft model, no training.

One step decodes one tree whose root is the pending token:

- lookahead branch: a window of W columns x (N-1) levels, the last N-1 Jacobi iterations (level 0
  the oldest). Level 0 is a chain from the root (column 0 is the root itself, column i sits i
  positions after it); level j of column i is a child of level j-1 of column i, j positions further
  on. So each lookahead row sees the cache, level 0 up to its own column and the lower levels of its
  column: exactly the paper's attention mask (and llama.cpp's lookahead example), which is a tree.
  Lookahead rows are never verification candidates (the verifier never walks into them), so they
  are never accepted or committed; their argmax is all that is used.
- verification branch: the pooled n-grams keyed by the root token (at most G), each a chain of its
  N-1 continuation tokens under the root. The verifier (greedy or lossless sampling, verify.py)
  accepts the longest path the model agrees with, so the output is exactly plain decoding's.

After the pass the argmax of every top-level row is the next Jacobi iteration: column i yields
an n-gram for the pool (at most G per first token, the least recently seen dropped first), and the
window moves up one level (its new column 0 is the next root), one position per step however many
tokens were accepted, as in the reference implementation. With `text_pool` (on by default; the
reference's POOL_FROM_PROMPT) the pool also holds the n-grams of the prompt and generated text.

Rows per step: (N-1)(W+G). Without a budget N/W/G is the paper's 5/7/7 (56 rows); a budget B >= 4
gives N = 3, W = B // 4, G = B // 2 - W (`config_for`; tuned by MAT, docs/benchmarks.md);
explicit N, W or G override it and must still fit B. Deviations from the paper: pooled n-grams
sharing a prefix share rows (a trie), and the window starts filled from random prompt tokens
(llama.cpp's variant), its n-grams pooled once levels 1..N-2 are model outputs.
"""
from __future__ import annotations

import numpy as np

from ..errors import RequestError
from ..tree import TokenTree
from .speculative import Drafter

DEFAULT_CONFIG = (5, 7, 7)  # N, W, G of the paper's reference implementation (56 rows)
MIN_BUDGET = 4  # N = 3, W = 1, G = 1


def rows_for(n: int, w: int, g: int) -> int:
    """Rows of one step: the (N-1) x W window plus G n-grams of N-1 tokens (at most)."""
    return (n - 1) * (w + g)


def config_for(budget: int) -> tuple[int, int, int]:
    """(N, W, G) for a budget of rows per step: N = 3, and the budget split evenly between the
    window and the guesses (W = B // 4, G = B // 2 - W). Tuned by MAT on Spec-Bench dev prompts:
    N = 3 beat N = 5 at 8, 16 and 32 rows; the even split was best or within 1% of the best."""
    if budget < MIN_BUDGET:
        raise RequestError(f"lookahead needs a budget of at least {MIN_BUDGET} rows "
                           f"(N=3, W=1, G=1: (N-1)(W+G)); got {budget}")
    w = budget // 4
    return 3, w, budget // 2 - w


def add_lookahead_row(tree: TokenTree, token: int, parent: int) -> int:
    """A row the model computes but the verifier never walks into (kept out of `children`)."""
    row = tree.add(token, parent)
    tree.children[parent].remove(row)
    return row


class Lookahead(Drafter):
    name = "lookahead"

    def __init__(self, budget: int | None = None, n: int | None = None, w: int | None = None,
                 g: int | None = None, text_pool: bool = True):
        base = DEFAULT_CONFIG if budget is None else config_for(budget)
        self.n, self.w, self.g = (v if v is not None else d for v, d in zip((n, w, g), base))
        if self.n < 3 or self.w < 1 or self.g < 1:
            raise RequestError(f"lookahead needs N >= 3, W >= 1, G >= 1; "
                               f"got N={self.n}, W={self.w}, G={self.g}")
        rows = rows_for(self.n, self.w, self.g)
        if budget is not None and rows > budget:
            raise RequestError(f"lookahead N={self.n}, W={self.w}, G={self.g} needs {rows} rows per "
                               f"step, more than the budget {budget}")
        self.budget = rows if budget is None else budget
        self.text_pool = text_pool

    def begin(self, session, prompt):
        rng = np.random.default_rng(0)  # fixed: a request always decodes the same way
        self.window = [[int(t) for t in rng.choice(prompt, self.w)] for _ in range(self.n - 1)]
        self.iterations = 0  # Jacobi iterations so far
        self.pool: dict[int, list[tuple[int, ...]]] = {}
        self.history = list(prompt)
        self.pooled = 0  # n-grams of the text that end before this position are pooled
        if self.text_pool:
            self._pool_text()

    def propose(self, pending, rows):
        self.history.append(pending)
        tree, self.top, _ = self.build_tree(pending)
        return tree

    def accept(self, step):
        if step.tree is None:  # a plain step (no room for the tree) leaves window and pool as they are
            return
        self._advance([int(t) for t in step.logits[step.row_of[self.top]].argmax(axis=1)])
        self.history.extend(step.tokens[:-1])  # the last one is the next pending token
        if self.text_pool:
            self._pool_text()

    def build_tree(self, pending: int) -> tuple[TokenTree, list[int], int]:
        """This step's tree: the verification trie first, then the lookahead window. Returns the
        tree, the rows of the window's top level and the number of verification rows (root
        included)."""
        tree = TokenTree()
        root = tree.add(pending, -1)
        for gram in self.pool.get(pending, ()):
            node = root
            for tok in gram:
                node = self._child(tree, node, tok)
        n_verify = len(tree)
        window = self.window
        window[0][0] = pending
        rows = [[root]]  # rows[j][i]: the tree row of level j, column i
        for i in range(1, self.w):
            rows[0].append(add_lookahead_row(tree, window[0][i], rows[0][-1]))
        for j in range(1, self.n - 1):
            rows.append([add_lookahead_row(tree, window[j][i], rows[j - 1][i]) for i in range(self.w)])
        return tree, rows[-1], n_verify

    @staticmethod
    def _child(tree: TokenTree, parent: int, token: int) -> int:
        """The child of `parent` with this token, added if missing (pooled n-grams form a trie)."""
        for c in tree.children.get(parent, []):
            if tree.tokens[c] == token:
                return c
        return tree.add(token, parent)

    def _advance(self, new: list[int]) -> None:
        """One Jacobi iteration: pool the columns' n-grams, move the window up one level."""
        if self.iterations >= self.n - 2:  # levels 1..N-2 are model outputs (warm-up over)
            for i in range(self.w):
                self._pool_add(self.window[0][i], tuple(level[i] for level in self.window[1:]) + (new[i],))
        self.window = self.window[1:] + [new]
        self.iterations += 1

    def _pool_text(self) -> None:
        """Pool the n-grams of the text (prompt and generated) not pooled yet."""
        h, n = self.history, self.n
        for end in range(max(self.pooled, n - 1), len(h)):
            self._pool_add(h[end - n + 1], tuple(h[end - n + 2:end + 1]))
        self.pooled = len(h)

    def _pool_add(self, key: int, gram: tuple[int, ...]) -> None:
        """At most G n-grams per first token; a repeat moves to the back, the oldest leaves first."""
        grams = self.pool.setdefault(key, [])
        if gram in grams:
            grams.remove(gram)
        elif len(grams) == self.g:
            grams.pop(0)
        grams.append(gram)

    def stats(self) -> dict:
        return {"budget": self.budget, "n": self.n, "w": self.w, "g": self.g, "text_pool": self.text_pool}
