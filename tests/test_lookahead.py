"""Lookahead decoding: the tree it decodes is the paper's attention mask, it drafts and accepts,
its lookahead rows never reach the KV cache, budgets are enforced, and sampling stays lossless.
(Greedy equivalence is in test_strategies.py's matrix.)
"""
import numpy as np
import pytest

from edge_mtp.backend import native
from edge_mtp.errors import RequestError
from edge_mtp.strategies import make_strategy
from edge_mtp.strategies.lookahead import Lookahead, rows_for

COUNTING = "Continue the list: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"


def reachable(tree) -> set[int]:
    """Nodes the verifier can walk to from the root."""
    seen, todo = set(), [0]
    while todo:
        node = todo.pop()
        seen.add(node)
        todo.extend(tree.children.get(node, []))
    return seen


def path_to(tree, node: int) -> list[int]:
    """Inserted-node indices from the root to `node`."""
    path = []
    while node >= 0:
        path.append(node)
        node = tree.parents[node]
    return path[::-1]


def test_tree_gives_each_lookahead_row_the_papers_attention():
    """Level j of column i sits at depth i + j and sees the root, level 0 up to column i and the
    lower levels of column i; pooled n-grams share prefixes; the verifier sees only them."""
    n, w, g = 4, 3, 2
    s = Lookahead(n=n, w=w, g=g)
    s.window = [[0, 11, 12], [20, 21, 22], [30, 31, 32]]
    s.pool = {7: [(1, 2, 3), (1, 5, 6)]}
    tree, top, n_verify = s.build_tree(7)
    assert n_verify == 6 and tree.tokens[:n_verify] == [7, 1, 2, 3, 5, 6]  # the trie 7-1-{2-3, 5-6}
    assert reachable(tree) == set(range(n_verify))
    rows = [[0, n_verify, n_verify + 1]] + [[n_verify + w - 1 + w * (j - 1) + i for i in range(w)]
                                             for j in range(1, n - 1)]
    assert top == rows[-1] and len(tree) == n_verify + (w - 1) + w * (n - 2) <= rows_for(n, w, g)
    for j in range(n - 1):
        for i in range(w):
            row = rows[j][i]
            assert tree.tokens[row] == (7 if (i, j) == (0, 0) else s.window[j][i])
            assert tree.depths[row] == i + j
            assert path_to(tree, row) == rows[0][:i + 1] + [rows[k][i] for k in range(1, j + 1)]


def test_pool_keeps_the_latest_g_ngrams_per_first_token():
    s = Lookahead(n=3, w=1, g=2)
    s.pool = {}
    for gram in [(1, 2), (3, 4), (1, 2), (5, 6)]:
        s._pool_add(9, gram)
    assert s.pool[9] == [(1, 2), (5, 6)]  # (3, 4) was the least recently seen


@pytest.mark.parametrize("text_pool", [True, False])
def test_lookahead_accepts_drafts(engine, text_pool):
    """The matrix would pass for a strategy that never drafts. Without the text pool every
    accepted draft comes from the Jacobi window's n-grams."""
    msgs = [{"role": "user", "content": COUNTING}]
    r = engine.chat(msgs, max_tokens=48, temperature=0, strategy="lookahead:16",
                    strategy_options={"text_pool": text_pool})
    spec = r["speculation"]
    assert r["tokens"] == engine.chat(msgs, max_tokens=48, temperature=0)["tokens"]
    assert spec["accepted"] > 0 and spec["mean_accepted_tokens_per_step"] > 1.2, spec


def test_lookahead_rows_never_reach_the_cache(engine):
    """After a run the cache holds the prompt and plain decoding's tokens, nothing else."""
    msgs = [{"role": "user", "content": COUNTING}]
    plain = engine.chat(msgs, max_tokens=48, temperature=0)["tokens"]
    r = engine.chat(msgs, max_tokens=32, temperature=0, strategy="lookahead:16")
    s = engine.session
    cached = s.tokens[r["usage"]["prompt_tokens"]:]
    assert r["speculation"]["accepted"] > 0
    assert len(cached) >= len(r["tokens"]) - 1 and cached == plain[:len(cached)]
    assert native.llama().llama_memory_seq_pos_max(s.mem, 0) == s.n_past - 1  # no cell past them


@pytest.mark.parametrize("spec,options", [("lookahead:3", {}), ("lookahead:0", {}), ("lookahead:8", {"n": 5}),
                                          ("lookahead", {"n": 2}), ("lookahead", {"w": 0}),
                                          ("lookahead", {"g": 0})])
def test_bad_lookahead_configurations_are_refused(engine, spec, options):
    with pytest.raises(RequestError):
        make_strategy(spec, **options)
    with pytest.raises(RequestError):
        engine.generate("Hi", max_tokens=2, strategy=spec, strategy_options=options)
    assert engine.generate("Hi", max_tokens=2, temperature=0)["tokens"]  # the engine still works


def test_lookahead_sampling_matches_plain_sampling(engine):
    """Joint distribution of two sampled tokens, lookahead vs plain. The prompt repeats, so the
    text pool drafts the second token: it goes through the tree verifier. (A verifier that accepts
    drafts with probability min(1, 2p) instead of p gives a distance of 0.24 here.)"""
    prompt = "one two three four five, one two three four five, one two three four five, one two"
    kw = dict(max_tokens=2, temperature=2.0, top_k=3, top_p=1.0, min_p=0.0)
    counts, drafted = {"plain": {}, "lookahead:4": {}}, 0
    for strategy, c in counts.items():
        for seed in range(400):
            r = engine.generate(prompt, seed=seed, strategy=strategy, **kw)
            c[tuple(r["tokens"])] = c.get(tuple(r["tokens"]), 0) + 1
            drafted += r["speculation"]["drafted"]
    assert drafted > 200  # most lookahead runs verified drafts
    keys = sorted(set(counts["plain"]) | set(counts["lookahead:4"]))
    a = np.array([counts["plain"].get(k, 0) for k in keys], float)
    b = np.array([counts["lookahead:4"].get(k, 0) for k in keys], float)
    # 9 outcomes, 400 draws each: noise about 0.06 (0.008 measured)
    assert 0.5 * np.abs(a / a.sum() - b / b.sum()).sum() < 0.12
