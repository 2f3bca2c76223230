"""Training-free probing MTP ("Embedding-Space Probing", ESP): synthesized mask embeddings ride
along in the verification pass and propose the next step's drafts.

Each step decodes one tree (papers.md §2.3-2.4) whose root is the pending token. Every draft node
carries k mask rows at the positions after it (mask j's parent is mask j-1, so mask j sees its
owner's path and masks 1..j-1); mask j of a node proposes the token j + 1 places after it, so the
masks of the deepest accepted node propose depth j of the next tree. Nodes never see masks, so
verification (greedy or lossless sampling, see verify.py) is unaffected. The prompt pass carries
the last prompt token's k masks, so the first step already has drafts.

Two tree shapes under a block budget BC = (k + 1)(1 + number of draft nodes):
- static (the paper's top-1 expansion): depth d holds the K_d best candidates of mask d, and only
  the best node of each depth gets children;
- dynamic (the paper's Algorithm 1): the BC / (k + 1) - 1 nodes with the highest cumulative
  probability P(node) = P(parent) * p_mask_d(token), p_mask_d being the softmax of mask d's
  logits for the node's depth d. A node at depth d < k may get children, each drawn from mask
  d + 1's candidates; as P(child) <= P(parent), a best-first pick always yields a valid tree.
  With k = 1 all nodes are children of the root and the dynamic tree equals the static one.
In both, a candidate equal to its parent token is pruned (the next best takes its place).

The mask vectors (Masks) start from an init of papers.md §2.2 and are pulled toward every
committed token: m_i <- m_i + lambda (e_new - m_i). Inits: "mean" (mean of the prompt's input
embeddings, the paper's default), "last" (the last k prompt tokens), "sample" (drawn from
N(mu, sigma^2) of the embedding table, fixed seed), "offset" (mu + 5 sigma, the paper's
out-of-distribution stress test).
"""
from __future__ import annotations

import heapq
import itertools
import weakref

import numpy as np

from ..errors import RequestError
from ..tree import EMBD, TokenTree
from .speculative import Drafter

DEFAULT_BUDGET = 10
INITS = ("mean", "last", "sample", "offset")
TREES = ("static", "dynamic")
OFFSET_SIGMAS = 5.0
_table_stats: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (mu, sigma)


def widths_for(budget: int, k: int) -> list[int]:
    """Per-depth widths K_1..K_k filling a block budget BC = (k + 1)(1 + sum K) (paper presets:
    BC 10 -> [4], 30 -> [14], 60 -> [29] with one mask; [15, 4] at 60 with two)."""
    if k not in (1, 2):
        raise RequestError(f"probe supports 1 or 2 masks, got {k!r}")
    if not isinstance(budget, int) or budget // (k + 1) < 2:
        raise RequestError(f"probe needs a budget of at least {2 * (k + 1)} rows with {k} mask(s) "
                           f"(root and one draft, each with its masks); got {budget!r}")
    nodes = budget // (k + 1) - 1
    if k == 1:
        return [nodes]
    second = round(nodes * 4 / 19)  # the paper's [15, 4] split at BC = 60
    return [nodes - second, second]


def top_candidates(logits: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n highest-logit token ids, best first, and their softmax probabilities."""
    idx = np.argpartition(logits, -n)[-n:]
    idx = idx[np.argsort(-logits[idx], kind="stable")]
    top = float(logits[idx[0]])
    log_z = top + np.log(np.exp(logits - top, dtype=np.float64).sum())
    return idx, np.exp(logits[idx] - log_z)


def embedding_table_stats(model) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation of the input-embedding table (cached per model)."""
    if model not in _table_stats:
        total = np.zeros(model.n_embd)
        squares = np.zeros(model.n_embd)
        for start in range(0, model.n_vocab, 4096):
            rows = model.input_rows(np.arange(start, min(start + 4096, model.n_vocab))).astype(np.float64)
            total += rows.sum(axis=0)
            squares += (rows * rows).sum(axis=0)
        mu = total / model.n_vocab
        sigma = np.sqrt(np.maximum(squares / model.n_vocab - mu * mu, 0.0))
        _table_stats[model] = (mu, sigma)
    return _table_stats[model]


class Masks:
    """The k probing masks of one request: their vectors, the rows they add to a tree, and the
    candidates they proposed for the next tree (`proposal[d]`: ids and probabilities, best first,
    for depth d + 1)."""

    def __init__(self, k: int = 1, lam: float = 0.1, init: str = "mean"):
        if k not in (1, 2):
            raise RequestError(f"probe supports 1 or 2 masks, got {k!r}")
        if not isinstance(lam, (int, float)) or not 0 <= lam <= 1:
            raise RequestError(f"probe lambda must be in [0, 1] (0 freezes the masks), got {lam!r}")
        if init not in INITS:
            raise RequestError(f"unknown mask init {init!r} (available: {', '.join(INITS)})")
        self.k, self.lam, self.init = k, float(lam), init
        self.proposal: list[tuple[np.ndarray, np.ndarray]] = []

    def start(self, model, prompt: list[int]) -> None:
        self.model = model
        self.proposal = []
        if self.init == "mean":
            rows = model.input_rows(np.asarray(prompt)).mean(axis=0, dtype=np.float64)
            self.vectors = np.repeat(rows[None].astype(np.float32), self.k, axis=0)
        elif self.init == "last":  # m_i = e_{t-k+i}; a shorter prompt repeats its tokens
            self.vectors = model.input_rows(np.asarray(prompt)[np.arange(-self.k, 0) % len(prompt)])
        else:
            mu, sigma = embedding_table_stats(model)
            if self.init == "sample":
                noise = np.random.default_rng(0).standard_normal((self.k, model.n_embd))
            else:
                noise = np.full((self.k, model.n_embd), OFFSET_SIGMAS)
            self.vectors = (mu + noise * sigma).astype(np.float32)

    def add(self, tree: TokenTree, owner: int) -> list[int]:
        """Append the k mask rows of `owner` (a chain: mask j's parent is mask j-1)."""
        rows, prev = [], owner
        for vector in self.vectors:
            prev = tree.add(EMBD, prev, embd=vector.copy())
            rows.append(prev)
        return rows

    def propose(self, logits: np.ndarray, row_of: np.ndarray, rows: list[int], keep: list[int]) -> None:
        """Keep the best keep[d] candidates of each of one owner's mask rows."""
        self.proposal = [top_candidates(logits[row_of[r]], n) for r, n in zip(rows, keep)]

    def absorb(self, tokens: list[int]) -> None:
        """m <- m + lambda (e - m) for every committed token, in order."""
        if tokens and self.lam:
            for e in self.model.input_rows(np.asarray(tokens)):
                self.vectors += np.float32(self.lam) * (e - self.vectors)


class MaskDrafter(Drafter):
    """A drafter with probing masks (`masks`, and `keep` candidates per mask): the masks ride in
    the prompt's last pass, so the first step already has their candidates."""

    def riders(self):
        return self.masks.vectors.copy()

    def rode(self, logits):
        self.masks.proposal = [top_candidates(row, n) for row, n in zip(logits, self.keep)]


class Probe(MaskDrafter):
    name = "probe"

    def __init__(self, budget: int = DEFAULT_BUDGET, masks: int = 1, lam: float = 0.1,
                 tree: str = "static", init: str = "mean"):
        if tree not in TREES:
            raise RequestError(f"unknown probe tree {tree!r} (available: {', '.join(TREES)})")
        self.masks = Masks(masks, lam, init)
        self.budget, self.k, self.tree = budget, masks, tree
        self.widths = widths_for(budget, masks)
        self.nodes = sum(self.widths)
        # candidates kept per mask: one spare for pruning (per parent in a dynamic tree)
        self.keep = [w + 1 for w in self.widths] if tree == "static" else [self.nodes + 1] * masks

    def begin(self, session, prompt):
        self.masks.start(session.model, prompt)

    def propose(self, pending, rows):
        self.masks.absorb([pending])
        tree = TokenTree()
        root = tree.add(pending, -1)
        grow = self._static_nodes if self.tree == "static" else self._dynamic_nodes
        owners = [root] + grow(tree, root)
        self.masks_of = {node: self.masks.add(tree, node) for node in owners}
        return tree

    def accept(self, step):
        if step.tree is None:  # the tree did not fit: a plain step, no masks decoded
            self.masks.proposal = []
        else:
            self.masks.propose(step.logits, step.row_of, self.masks_of[step.verdict.deepest], self.keep)
        self.masks.absorb(step.tokens[:-1])  # the bonus is absorbed when it is the next root

    def _static_nodes(self, tree: TokenTree, root: int) -> list[int]:
        """Top-1 expansion: K_d candidates of mask d at depth d, children only under the best."""
        nodes, parent = [], root
        for (ids, _), width in zip(self.masks.proposal, self.widths):
            kids = [tree.add(int(c), parent) for c in ids[ids != tree.tokens[parent]][:width]]
            if not kids:
                break
            nodes += kids
            parent = kids[0]
        return nodes

    def _dynamic_nodes(self, tree: TokenTree, root: int) -> list[int]:
        """The highest cumulative-probability nodes, picked best first."""
        heap: list = []
        order = itertools.count()  # ties: earlier offers (better ranks) first

        def offer(parent: int, p_parent: float) -> None:
            depth = tree.depths[parent]
            if depth < len(self.masks.proposal):
                ids, probs = self.masks.proposal[depth]
                for c, p in zip(ids, probs):
                    if c != tree.tokens[parent]:
                        heapq.heappush(heap, (-p_parent * float(p), next(order), parent, int(c)))

        offer(root, 1.0)
        nodes: list[int] = []
        while heap and len(nodes) < self.nodes:
            neg_p, _, parent, token = heapq.heappop(heap)
            nodes.append(tree.add(token, parent))
            offer(nodes[-1], -neg_p)
        return nodes

    def stats(self) -> dict:
        m = self.masks
        return {"budget": self.budget, "masks": self.k, "tree": self.tree, "widths": list(self.widths),
                "init": m.init, "lambda": m.lam}
