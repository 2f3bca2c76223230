"""Speculative strategies are lossless: the greedy-equivalence matrix (the project's core invariant),
lossless sampling, and the edges of multi-token steps (EOS, stop strings, max_tokens, full context).
"""
import json
from pathlib import Path

import numpy as np
import pytest

from edge_mtp import Engine
from edge_mtp import verify as verify_mod
from edge_mtp.profile import GRID, Profile
from edge_mtp.sampling import Sampler, SamplingParams
from edge_mtp.strategies import make_strategy
from edge_mtp.tree import TokenTree

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "dev.jsonl"
# used only where the Spec-Bench dev split is not beside the checkout
FALLBACK_PROMPTS = [
    "Explain how a refrigerator keeps food cold.",
    "Translate to French: The weather is nice today and we are going to the beach.",
    "Summarize: The city council met on Monday to discuss the new park. Residents asked for more "
    "trees, a playground and longer opening hours. The council agreed to all three requests.",
    "What is 17 times 23? Show your steps.",
    "Write a Python function that reverses a string.",
    "Who wrote Romeo and Juliet, and when?",
    "Give three tips for staying focused while studying.",
    "Based on this text, when was the bridge opened? The Golden Gate Bridge opened in 1937 "
    "after four years of construction.",
]
REPEATING = ("one two three four five six seven eight nine ten, one two three four five six seven "
             "eight nine ten, one two three")  # the continuation copies the prompt: long accepted paths
# auto as measured on this machine, and forced to draft wherever lookup has a draft
CHEAP_ROWS = Profile("cheap-rows", list(GRID), [1.0 + 0.01 * (n - 1) for n in GRID], 10.0)
HYBRID_TEXT = ("Rewrite this list with one short comment per item: apples, bananas, cherries, dates, "
               "elderberries, figs, grapes.")  # copies the prompt in places, not in others
MATRIX = [  # every lossless strategy at three budgets (rows per forward pass)
    ("probe:4", {}), ("probe:10", {}), ("probe:30", {}), ("probe:30", {"masks": 2}),
    ("lookup:2", {}), ("lookup:4", {}), ("lookup:11", {}),
    ("lookahead:4", {}), ("lookahead:8", {}), ("lookahead:12", {"n": 5, "w": 2, "g": 1}),
    ("auto", {}), ("auto", {"profile": CHEAP_ROWS}), ("auto:4", {"profile": CHEAP_ROWS}),
    ("probe:9", {"masks": 2, "tree": "dynamic"}), ("probe:15", {"masks": 2, "tree": "dynamic"}),
    ("hybrid:3", {}), ("hybrid:6", {}), ("hybrid:10", {}),
]


def matrix_prompts() -> list[list[dict]]:
    if DEV.exists():
        rows = [json.loads(line) for line in DEV.read_text().splitlines()]
        by_task: dict[str, list] = {}
        for r in rows:
            by_task.setdefault(r["category"] if r["question_id"] > 160 else "mt_bench", []).append(r)
        picked = [qs[i] for i in (0, 7) for qs in by_task.values()][:8]
        texts = [q["turns"][0] for q in picked]
    else:
        texts = FALLBACK_PROMPTS
    return [[{"role": "user", "content": t}] for t in texts]


@pytest.fixture(scope="module")
def plain_outputs(engine):
    return [engine.chat(p, max_tokens=128, temperature=0)["tokens"] for p in matrix_prompts()]


@pytest.mark.parametrize("strategy,options", MATRIX, ids=[f"{s}{o or ''}" for s, o in MATRIX])
def test_greedy_equivalence_matrix(engine, plain_outputs, strategy, options):
    for prompt, expected in zip(matrix_prompts(), plain_outputs):
        r = engine.chat(prompt, max_tokens=128, temperature=0, strategy=strategy, strategy_options=options)
        assert r["tokens"] == expected, f"{strategy} {options} diverged on {prompt[0]['content'][:40]!r}"
        spec = r["speculation"]
        assert spec["steps"] <= len(expected) + 1 and spec["accepted"] <= spec["drafted"]


def test_speculation_actually_accepts_drafts(engine):
    """The matrix would pass for a strategy that never drafts; make sure ours do accept tokens."""
    prompt = [{"role": "user", "content": "Repeat exactly: the cat sat on the mat, the cat sat on the mat."}]
    for strategy in ("probe:30", "lookup"):
        spec = engine.chat(prompt, max_tokens=64, temperature=0, strategy=strategy)["speculation"]
        assert spec["accepted"] > 0 and spec["mean_accepted_tokens_per_step"] > 1.0, strategy


# -- lossless sampling ---------------------------------------------------------------------------

def tv_distance(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(a / a.sum() - b / b.sum()).sum())


def synthetic_tree():
    """A root with three drafted children; child 1 has children of its own."""
    tree = TokenTree()
    root = tree.add(0, -1)
    kids = [tree.add(t, root) for t in (2, 4, 5)]
    for t in (1, 3):
        tree.add(t, kids[0])
    logits = np.array([
        [0.5, 1.0, 2.0, 0.0, 1.5, -1.0],   # root
        [1.0, 0.2, 0.0, 2.2, 0.1, 0.3],    # child token 2
        [0.0] * 6, [0.0] * 6, [0.0] * 6, [0.0] * 6,
    ], dtype=np.float32)
    return tree, logits, np.arange(len(tree))


def sample_first_tokens(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    tree, logits, row_of = synthetic_tree()
    sampler = Sampler(SamplingParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=seed))
    first, second = np.zeros(6), np.zeros(6)
    for _ in range(n):
        v = verify_mod.verify(tree, logits, row_of, sampler)
        first[v.tokens[0]] += 1
        if len(v.path) > 1 and v.tokens[0] == 2:  # child 2 accepted: its row decides the next token
            second[v.tokens[1]] += 1
    return first, second


def target(row: np.ndarray) -> np.ndarray:
    p = np.exp(row / 0.9)
    return p / p.sum()


def test_tree_sampling_follows_the_target_distribution():
    _, logits, _ = synthetic_tree()
    first, second = sample_first_tokens(20000)
    assert tv_distance(first, target(logits[0])) < 0.02
    assert tv_distance(second, target(logits[1])) < 0.03


def test_the_sampling_check_catches_a_wrong_verifier(monkeypatch):
    """Accepting a draft with probability min(1, 2p) instead of p is a classic bug; the same
    statistical check must fail on it."""
    def biased(sampler, logits, kids):
        ids, probs = sampler.distribution(logits)
        for child, token in kids:
            p = float(probs[np.flatnonzero(ids == token)[0]])
            if sampler.rng.random() < min(1.0, 2 * p):
                return token, child
        return int(ids[sampler.rng.choice(len(ids), p=probs)]), None

    monkeypatch.setattr(verify_mod, "_sample_against", biased)
    _, logits, _ = synthetic_tree()
    first, _ = sample_first_tokens(20000)
    assert tv_distance(first, target(logits[0])) > 0.05


def test_probe_sampling_matches_plain_sampling_on_the_model(engine):
    """First two sampled tokens, probe vs plain, on the real model (TV distance of the joint)."""
    prompt = "My favourite fruit is"
    kw = dict(max_tokens=2, temperature=1.0, top_k=3, top_p=1.0, min_p=0.0)
    counts = {"plain": {}, "probe:10": {}}
    for strategy, c in counts.items():
        for seed in range(500):
            toks = tuple(engine.generate(prompt, seed=seed, strategy=strategy, **kw)["tokens"])
            c[toks] = c.get(toks, 0) + 1
    keys = sorted(set(counts["plain"]) | set(counts["probe:10"]))
    a = np.array([counts["plain"].get(k, 0) for k in keys], float)
    b = np.array([counts["probe:10"].get(k, 0) for k in keys], float)
    assert tv_distance(a, b) < 0.12  # 9 joint outcomes, 500 draws each: noise is about 0.05


# -- edges ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["probe:10", "lookup:4", "lookahead:8"])
def test_one_token_prompt_and_one_token_answer(engine, strategy):
    for prompt, n in (("Hello", 16), ("The capital of France is", 1)):
        ref = engine.generate(prompt, max_tokens=n, temperature=0)["tokens"]
        assert engine.generate(prompt, max_tokens=n, temperature=0, strategy=strategy)["tokens"] == ref


def test_max_tokens_cuts_inside_an_accepted_path(engine):
    prompt = REPEATING
    full = engine.generate(prompt, max_tokens=40, temperature=0, strategy="lookup")
    assert full["speculation"]["mean_accepted_tokens_per_step"] > 1.5
    for n in (3, 7, 11):
        r = engine.generate(prompt, max_tokens=n, temperature=0, strategy="lookup")
        assert r["tokens"] == full["tokens"][:n] and r["choices"][0]["finish_reason"] == "length"


def test_stop_string_inside_an_accepted_path_emits_nothing_after_it(engine):
    prompt = REPEATING
    plain = engine.generate(prompt, max_tokens=40, temperature=0)
    stop = " eight"
    assert stop in plain["text"]
    for strategy in ("plain", "lookup", "probe:10"):
        r = engine.generate(prompt, max_tokens=40, temperature=0, stop=stop, strategy=strategy)
        assert r["text"] == plain["text"][: plain["text"].index(stop)], strategy
        assert r["choices"][0]["finish_reason"] == "stop"


def test_eos_inside_an_accepted_path_ends_the_answer(engine):
    msgs = [{"role": "user", "content": "Say just the word yes."}]
    ref = engine.chat(msgs, max_tokens=64, temperature=0)
    assert ref["choices"][0]["finish_reason"] == "stop"
    for strategy in ("lookup", "probe:30"):
        r = engine.chat(msgs, max_tokens=64, temperature=0, strategy=strategy)
        assert r["tokens"] == ref["tokens"] and r["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("strategy", ["probe:60", "lookup:11", "hybrid:10", "lookahead:8"])
def test_trees_near_the_end_of_the_context(model_path, strategy):
    """Steps whose tree would pass n_ctx shrink to plain steps; output still equals plain."""
    with Engine(str(model_path), n_ctx=256, n_threads=2) as e:
        prompt = "Count: one, two, three, four, five, six, seven, eight, nine, ten, eleven,"
        ref = e.generate(prompt, max_tokens=-1, temperature=0)
        r = e.generate(prompt, max_tokens=-1, temperature=0, strategy=strategy)
        assert r["tokens"] == ref["tokens"] and r["choices"][0]["finish_reason"] == ref["choices"][0]["finish_reason"]


def test_two_masks_chain_attention():
    """With k = 2, mask 2's parent is mask 1 (it sees its owner's path and mask 1)."""
    s = make_strategy("probe:6", masks=2).drafter
    s.masks.vectors = np.zeros((2, 4), np.float32)
    tree = TokenTree()
    root = tree.add(7, -1)
    m1, m2 = s.masks.add(tree, root)
    assert tree.parents[m1] == root and tree.parents[m2] == m1
    tokens, parents, embd, row_of = tree.layout()
    assert list(parents) == [-1, 0, 1] and embd.shape == (2, 4)


def test_dynamic_tree_picks_the_highest_cumulative_probabilities():
    """k = 2, BC = 12 (3 nodes): P(node) = P(parent) * p_mask(token), best first, repeats of the
    parent pruned; here the third node hangs under the second-best depth-1 node."""
    s = make_strategy("probe:12", masks=2, tree="dynamic").drafter
    s.masks.proposal = [(np.array([5, 6, 7, 8]), np.array([0.5, 0.32, 0.1, 0.05])),  # depth 1
                        (np.array([5, 8, 9, 1]), np.array([0.6, 0.35, 0.04, 0.01]))]  # depth 2
    tree = TokenTree()
    root = tree.add(7, -1)  # 7 repeats the root: pruned at depth 1
    nodes = s._dynamic_nodes(tree, root)
    picked = [(tree.tokens[n], tree.tokens[tree.parents[n]]) for n in nodes]
    # 5 (0.5), 6 (0.32), 5 under 6 (0.192) beat 8 under 5 (0.175); 5 under 5 (0.3) is pruned
    assert picked == [(5, 7), (6, 7), (5, 6)]
    static = make_strategy("probe:12", masks=2).drafter  # top-1 expansion [2, 1] for comparison
    static.masks.proposal = s.masks.proposal
    tree = TokenTree()
    nodes = static._static_nodes(tree, tree.add(7, -1))
    assert [(tree.tokens[n], tree.tokens[tree.parents[n]]) for n in nodes] == [(5, 7), (6, 7), (8, 5)]


def test_hybrid_uses_lookup_and_masks_and_beats_lookup(engine):
    """On a text that copies its prompt in places and not in others, the hybrid tree accepts
    drafts from both sources and more tokens per step than lookup at the same rows."""
    prompt = [{"role": "user", "content": HYBRID_TEXT}]
    ref = engine.chat(prompt, max_tokens=64, temperature=0)["tokens"]
    hybrid = engine.chat(prompt, max_tokens=64, temperature=0, strategy="hybrid:6")
    lookup = engine.chat(prompt, max_tokens=64, temperature=0, strategy="lookup:6")
    assert hybrid["tokens"] == ref == lookup["tokens"]
    spec = hybrid["speculation"]
    assert spec["accepted_from_lookup"] > 0 and spec["accepted_from_masks"] > 0, spec
    assert spec["steps"] < lookup["speculation"]["steps"]


@pytest.mark.parametrize("options", [{"init": "last"}, {"init": "sample"}, {"init": "offset"}, {"lam": 0.0}])
def test_mask_variants_stay_lossless(engine, options):
    prompt = [{"role": "user", "content": "Give three tips for staying focused while studying."}]
    ref = engine.chat(prompt, max_tokens=32, temperature=0)["tokens"]
    r = engine.chat(prompt, max_tokens=32, temperature=0, strategy="probe:6", strategy_options=options)
    assert r["tokens"] == ref and r["speculation"]["init"] == options.get("init", "mean")


@pytest.mark.parametrize("spec,options", [
    ("probe:10", {"tree": "bushy"}), ("probe:10", {"init": "zeros"}), ("probe:10", {"lam": 1.5}),
    ("probe:10", {"lam": "high"}), ("probe:10", {"masks": 3}), ("probe:5", {"masks": 2}),
    ("hybrid:1", {}), ("hybrid:10", {"masks": 2}), ("hybrid:10", {"init": "zeros"}),
])
def test_bad_probe_and_hybrid_options_are_refused(engine, spec, options):
    from edge_mtp.errors import RequestError

    with pytest.raises(RequestError):
        engine.generate("Hi", max_tokens=2, strategy=spec, strategy_options=options)
    assert engine.generate("Hi", max_tokens=2, temperature=0)["tokens"]  # still usable


@pytest.mark.parametrize("spec", ["probe:2", "probe:3", "lookup:1", "nope:4", "plain:4", "probe:x"])
def test_bad_budgets_are_refused(engine, spec):
    from edge_mtp.errors import RequestError

    with pytest.raises(RequestError):
        engine.generate("Hi", max_tokens=2, strategy=spec)


@pytest.mark.parametrize("strategy,options", [("plain", {}), ("lookup", {}), ("probe", {}),
                                              ("probe:12", {"masks": 2}), ("hybrid", {}),
                                              ("lookahead:8", {}), ("auto", {})])
def test_every_strategy_evaluates_the_prompt_in_one_pass(engine, strategy, options):
    """The prompt is one forward pass for every strategy: probing masks ride in it (they used to
    cost a second pass over the prompt's end); calibration and row noise use scratch contexts."""
    session = engine.session
    session.clear()
    prompt = engine.tokenize("The three primary colors are red, yellow and blue. They are")
    strategy = make_strategy(strategy, engine.model, **options)
    before = session.passes
    logits = strategy.prefill(session, prompt)
    assert session.passes - before == 1 and session.tokens == prompt
    assert logits.shape == (engine.model.n_vocab,)
