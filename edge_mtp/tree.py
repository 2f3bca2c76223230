"""The token tree every speculative strategy builds: rows of draft tokens and synthesized embedding
rows (probing masks) under one root, laid out breadth-first for one tree decode (`Session.decode` with parents).

Rows are added in any order that puts a parent before its children; `layout()` sorts them by depth
(llama.cpp wants non-decreasing positions) and remaps the parent indices.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

EMBD = -1  # token id of an embedding row


@dataclass
class TokenTree:
    tokens: list[int] = field(default_factory=list)   # EMBD for embedding rows
    parents: list[int] = field(default_factory=list)  # -1: child of the last committed token
    depths: list[int] = field(default_factory=list)
    embd: list[np.ndarray] = field(default_factory=list)  # one per EMBD row, in row order
    children: dict[int, list[int]] = field(default_factory=dict)  # token rows only

    def add(self, token: int, parent: int, embd: np.ndarray | None = None) -> int:
        """Add a row; returns its index (in insertion order)."""
        self.tokens.append(token if embd is None else EMBD)
        self.parents.append(parent)
        self.depths.append(0 if parent < 0 else self.depths[parent] + 1)
        if embd is not None:
            self.embd.append(embd)
        elif parent >= 0:
            self.children.setdefault(parent, []).append(len(self.tokens) - 1)
        return len(self.tokens) - 1

    @classmethod
    def chain(cls, root: int, drafts) -> "TokenTree":
        """The root and its drafts as one chain (a lookup draft)."""
        n = len(drafts)
        return cls([root, *drafts], list(range(-1, n)), list(range(n + 1)),
                   children={i: [i + 1] for i in range(n)})

    def __len__(self) -> int:
        return len(self.tokens)

    def layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """(tokens, parents, embedding rows or None, row of each inserted node) in BFS order."""
        tokens = np.asarray(self.tokens, dtype=np.int32)
        parents = np.asarray(self.parents, dtype=np.int32)
        if all(a <= b for a, b in zip(self.depths, self.depths[1:])):  # already breadth-first (chains)
            order = row_of = np.arange(len(tokens))
        else:
            order = np.argsort(np.asarray(self.depths), kind="stable")
            row_of = np.empty_like(order)
            row_of[order] = np.arange(len(order))
            tokens, parents = tokens[order], parents[order]
            parents = np.where(parents >= 0, row_of[np.maximum(parents, 0)], -1).astype(np.int32)
        embd = None
        if self.embd:
            is_embd = np.asarray(self.tokens) == EMBD
            rows = np.empty((len(self.tokens), len(self.embd[0])), dtype=np.float32)
            rows[is_embd] = self.embd
            embd = rows[order][tokens == EMBD]
        return tokens, parents, embd, row_of
