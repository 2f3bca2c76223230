"""Verification of a decoded token tree: which drafts the model itself would have produced.

Greedy: walk from the root along the model's own argmax; a child whose token equals it is accepted,
and the first argmax that no child matches is the bonus token. The accepted tokens are exactly what
plain greedy decoding produces (the rows' logits are bit-identical to single-token decoding).

Sampling (lossless): at each accepted node, with target distribution p (the sampler's own, after
temperature/top-k/top-p/min-p), the children c_1..c_m are tried in order, each accepted with
probability min(1, p(c_i) / q_i(c_i)); on rejection p becomes the residual norm(max(p - q_i, 0)).
Our drafts are chosen deterministically (top candidates of the masks or n-gram matches), so q_i is
the point mass on c_i: c_i is accepted with probability p(c_i) and the residual is p with c_i
removed, renormalized (the multi-candidate rejection scheme of SpecInfer with one-hot drafts). If
no child is accepted, the bonus token is drawn from the final residual. By induction every emitted
token is distributed exactly as plain sampling from p, whatever the drafts were.
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
    """One step of the rejection scheme above; returns (token, accepted child or None)."""
    ids, probs = sampler.distribution(logits)
    probs = probs.copy()
    for child, token in kids:
        hit = np.flatnonzero(ids == token)
        p = float(probs[hit[0]]) if len(hit) else 0.0
        if p > 0 and sampler.rng.random() < p:
            return token, child
        if p > 0:
            probs[hit[0]] = 0.0
            probs /= probs.sum()
    return int(ids[sampler.rng.choice(len(ids), p=probs)]), None
