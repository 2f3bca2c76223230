"""Verification of a decoded token tree: which drafts the model itself would have produced.

Greedy: walk from the root along the model's own argmax; a child whose token equals it is accepted,
and the first argmax that no child matches is the bonus token. The accepted tokens are exactly what
plain greedy decoding produces (the rows' logits are bit-identical to single-token decoding).

Sampling (lossless): at each accepted node the sampler draws the token plain sampling would emit
at that position (`Sampler.draw`: one uniform per emitted token, inverted through the target
distribution p after temperature/top-k/top-p/min-p); the child carrying that token, if any, is
accepted, else the drawn token is the bonus. Every emitted token is therefore distributed exactly
as plain sampling from p, whatever the drafts were, and with a seed and exact rows it is the very
token plain sampling emits. A child c is accepted with probability p(c), and a node's children
together with the sum of their p: the acceptance of SpecInfer's multi-candidate rejection scheme
with one-hot drafts (ours are chosen deterministically), coupled to plain's draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sampling import Sampler
from .tree import TokenTree


@dataclass
class Verdict:
    path: list[int]        # inserted-node indices of the accepted token rows, root first
    tokens: list[int]      # accepted draft tokens, then the bonus token
    deepest: int           # inserted index of the deepest accepted node


def verify(tree: TokenTree, logits: np.ndarray, row_of: np.ndarray, sampler: Sampler) -> Verdict:
    """Walk the tree from its root (inserted node 0) with the model's logits (rows in BFS order)."""
    node, path, out = 0, [0], []
    while True:
        row_logits = logits[row_of[node]]
        kids = tree.children.get(node, [])
        if sampler.params.greedy:
            choice = int(np.argmax(row_logits))
            nxt = next((c for c in kids if tree.tokens[c] == choice), None)
        else:
            choice, nxt = _sample_against(sampler, row_logits, [(c, tree.tokens[c]) for c in kids])
        sampler.note(row_logits, choice)  # the accepted child's token or the bonus: emitted next
        if nxt is None:
            out.append(choice)
            return Verdict(path, out, node)
        path.append(nxt)
        out.append(tree.tokens[nxt])
        node = nxt


def _sample_against(sampler: Sampler, logits: np.ndarray, kids: list[tuple[int, int]]):
    """The token plain sampling draws from this row, and the child carrying it (or None)."""
    token = sampler.draw(*sampler.distribution(logits))
    return token, next((child for child, t in kids if t == token), None)
