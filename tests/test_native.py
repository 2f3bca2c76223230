"""Native patches P1-P3 on real models: embedding rows, token trees with commit, layer ranges.

Every check compares against plain sequential decoding of the same tokens on the same model, on
the default SmolLM2 (llama), on Gemma 3 270M (gemma3: scaled token inputs, sliding-window layers
in a second KV cache) and on tiny random-weight qwen3 and qwen2 models written by
tools/tiny_model.py.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from edge_mtp.backend import Model, Session, native
from edge_mtp.errors import RequestError
from edge_mtp.models import resolve_model

# 15 nodes, branching at every level: root, 2 children, 4 grandchildren, 4, 4
PARENTS = np.array([-1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9], dtype=np.int32)
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


@pytest.fixture(scope="module", params=["smollm2", "gemma3-270m", "tiny-qwen3", "tiny-qwen2"])
def model(request, model_path, tiny_model_path):
    if request.param == "smollm2":
        path = model_path
    elif request.param == "gemma3-270m":
        path = resolve_model("gemma3-270m")
    else:
        path = tiny_model_path(request.param[5:])
    m = Model(path)
    yield m
    m.close()


def session(model, n_ctx=512):
    return Session(model, n_ctx=n_ctx, n_threads=2)


def path_to(parents, i):
    path = []
    while i >= 0:
        path.append(int(i))
        i = parents[i]
    return path[::-1]


def sequential_logits(model, prompt, tokens):
    """Logits after each of `tokens`, decoded one at a time after the prompt (the reference)."""
    s = session(model)
    s.prefill(prompt)
    return np.stack([s.decode([t])[-1].copy() for t in tokens])


def greedy(s, first, n):
    out, tok = [], first
    for _ in range(n):
        tok = int(s.decode([tok])[-1].argmax())
        out.append(tok)
    return out


def test_token_rows_embedding_rows_and_mixed_rows_agree(model):
    prompt = model.tokenize(PROMPT)
    toks = np.array(model.tokenize(" there lived a wise old king", add_bos=False), dtype=np.int32)
    chain = np.arange(len(toks), dtype=np.int32) - 1
    s = session(model)
    s.prefill(prompt)
    as_tokens = s.decode(toks, chain).copy()
    as_embd = s.decode(np.full(len(toks), -1, np.int32), chain, embd=model.input_rows(toks)).copy()
    mixed = toks.copy()
    mixed[1::2] = -1
    as_mixed = s.decode(mixed, chain, embd=model.input_rows(toks[1::2])).copy()
    np.testing.assert_array_equal(as_embd, as_tokens)
    np.testing.assert_array_equal(as_mixed, as_tokens)
    np.testing.assert_array_equal(as_tokens, sequential_logits(model, prompt, toks))


def test_tree_rows_equal_decoding_each_path_token_by_token(model):
    prompt = model.tokenize(PROMPT)
    toks = np.random.default_rng(0).integers(100, model.n_vocab - 1, size=len(PARENTS)).astype(np.int32)
    s = session(model)
    s.prefill(prompt)
    tree = s.decode(toks, PARENTS).copy()
    for i in range(len(PARENTS)):
        ref = sequential_logits(model, prompt, toks[path_to(PARENTS, i)])[-1]
        assert np.abs(tree[i] - ref).max() <= 1e-3, f"node {i}"
        assert tree[i].argmax() == ref.argmax()


@pytest.mark.parametrize("accepted", [[0, 1, 3, 7], [0, 2, 6, 11], [0], []])
def test_commit_then_greedy_equals_plain_decoding(model, accepted):
    prompt = model.tokenize(PROMPT)
    toks = np.random.default_rng(1).integers(100, model.n_vocab - 1, size=len(PARENTS)).astype(np.int32)
    s = session(model)
    s.prefill(prompt)
    logits = s.decode(toks, PARENTS)
    nxt = int(logits[accepted[-1]].argmax()) if accepted else 42
    s.commit(accepted)
    kept = [int(t) for t in toks[accepted]]
    assert s.tokens == prompt + kept
    ref = session(model)
    ref.prefill(prompt + kept) if kept else ref.prefill(prompt)
    assert greedy(s, nxt, 32) == greedy(ref, nxt, 32)


def test_commit_rejects_a_non_path(model):
    s = session(model)
    s.prefill(model.tokenize(PROMPT))
    s.decode(np.arange(100, 115, dtype=np.int32), PARENTS)
    with pytest.raises(RequestError, match="path"):
        s.commit([0, 3])  # 3's parent is 1
    s.commit([0, 1])
    assert s.n_past == len(model.tokenize(PROMPT)) + 2


def test_tree_that_does_not_fit_is_refused_and_cache_intact(model):
    s = session(model, n_ctx=64)
    prompt = list(range(200, 200 + s.n_ctx - 9))  # llama.cpp may round n_ctx up
    s.prefill(prompt)
    with pytest.raises(RequestError, match="context full"):
        s.decode(np.arange(100, 115, dtype=np.int32), PARENTS)
    assert s.tokens == prompt
    ref = session(model, n_ctx=64)
    ref.prefill(prompt)
    assert greedy(s, 7, 8) == greedy(ref, 7, 8)


def test_bad_trees_are_refused(model):
    s = session(model)
    s.prefill(model.tokenize(PROMPT))
    with pytest.raises(RequestError):
        s.decode([1, 2, 3], [-1, 1, 0])  # a row cannot be its own parent
    with pytest.raises(RequestError):
        s.decode([1, 2, 3], [-1, 0, -1])  # depth 0 after depth 1: not breadth-first
    with pytest.raises(RequestError):
        s.decode([1, -1], [-1, 0])  # embedding row without an embedding


@pytest.mark.parametrize("k", [1, 2, 3])
def test_layer_split_equals_full_forward(model, k):
    """Layers [0, k) then [k, L) into the same cells: same logits, and the cache is complete."""
    k = k if model.n_layer <= 4 else {1: 1, 2: 12, 3: model.n_layer - 1}[k]
    prompt = model.tokenize(PROMPT)
    toks = model.tokenize(" there lived a king", add_bos=False)
    ref = session(model)
    ref.prefill(prompt)
    full = ref.decode(toks, logits="all").copy()
    s = session(model)
    s.prefill(prompt)
    with s.layer_range(0, k):
        s.decode(toks, hidden=k)
        h = s.hidden_rows(k)
    s.truncate(len(prompt))  # frees the cells (their K/V stay) so the upper half reuses them
    with s.layer_range(k):
        upper = s.decode(embd=h, logits="all")
    np.testing.assert_array_equal(upper, full)
    assert s.tokens[len(prompt):] == [-1] * len(toks)  # cells of a partial range: never prompt cache
    s.tokens[len(prompt):] = toks
    assert greedy(s, 7, 16) == greedy(ref, 7, 16)


def test_a_skipped_span_equals_its_two_ranges(model):
    """Layers [0, a), then [b, L) on their output, as one decode (patch P19): the logits of the two
    ranges run one after the other through the hidden rows, one cell per row, and every layer
    again after the block."""
    a, b = (1, 2) if model.n_layer <= 4 else (4, model.n_layer - 6)
    prompt = model.tokenize(PROMPT)
    toks = model.tokenize(" there lived a king", add_bos=False)
    two = session(model)
    two.prefill(prompt)
    with two.layer_range(0, a):
        two.decode(toks, hidden=a)
        h = two.hidden_rows(a)
    two.truncate(len(prompt))
    with two.layer_range(b):
        want = two.decode(embd=h, logits="all").copy()
    one = session(model)
    one.prefill(prompt)
    with one.layer_range(0, skip=(a, b)):
        with pytest.raises(RequestError, match=f"skipping \\[{a}, {b}\\)"):
            one.decode(toks, hidden=a)
        got = one.decode(toks, logits="all")
    np.testing.assert_array_equal(got, want)
    assert one.tokens[len(prompt):] == [-1] * len(toks)  # cells of a partial pass: never prompt cache
    assert one.all_layers and one.skip == (0, 0)
    with pytest.raises(RequestError, match="bad skipped layers"), one.layer_range(0, skip=(0, b)):
        pass
    assert one.all_layers
    with pytest.raises(RequestError, match="bad skipped layers"), one.layer_range(1, skip=(1, b)):
        pass  # the range [1, L) was set before its skip was refused
    assert one.all_layers


def test_gate_matches_numpy_reference(model):
    il_gate = model.n_layer - 2
    prompt = model.tokenize(PROMPT)
    toks = model.tokenize(" there lived a wise old king", add_bos=False)
    s = session(model)
    s.prefill(prompt)
    s.decode(toks, hidden=il_gate)
    h_think = s.hidden_rows(il_gate)
    s.truncate(len(prompt))
    s.decode(toks, hidden=0)
    h_enc = s.hidden_rows(0)
    s.truncate(len(prompt))
    m = (np.arange(len(toks)) % 2 == 0).astype(np.float32)
    s.decode(toks, gate=(m, il_gate, 0), hidden=il_gate)
    gated = s.hidden_rows(il_gate)
    np.testing.assert_array_equal(gated, h_enc + m[:, None] * h_think)
    np.testing.assert_array_equal(h_enc, model.input_rows(toks))


def test_a_gated_graph_is_reused_for_the_next_gated_decode(model):
    """The gate input says when its graph fits the next decode (same rows, same gate source), so
    back-to-back gated decodes of one size build their graph once."""
    ll = native.llama()
    s = session(model)
    s.prefill(model.tokenize(PROMPT))
    toks = model.tokenize(" there lived a king", add_bos=False)
    gate = (np.ones(len(toks), dtype=np.float32), model.n_layer - 2, 0)
    s.decode(toks, gate=gate)
    reused = ll.llama_perf_context(s.ctx).n_reused
    s.truncate(len(s.tokens) - len(toks))
    s.decode(toks, gate=gate)
    assert ll.llama_perf_context(s.ctx).n_reused == reused + 1


def test_hidden_state_outside_the_range_is_refused(model):
    s = session(model)
    s.prefill(model.tokenize(PROMPT))
    with s.layer_range(0, 2), pytest.raises(RequestError, match="not computed"):
        s.decode([5], hidden=3)
    assert s.layers == (0, model.n_layer)  # left by an error: all layers again
    with pytest.raises(RequestError, match="bad layer range"), s.layer_range(3, 2):
        pass


def test_unsupported_architecture_refuses_a_layer_range(tiny_model_path):
    """mistral3's graph builder has no range support: a clear error, never wrong output."""
    s = Session(Model(tiny_model_path("mistral3")), n_ctx=128, n_threads=2)
    with pytest.raises(RequestError, match="does not support layer ranges"), s.layer_range(0, 2):
        pass
    with s.layer_range(0):  # the full range is every builder's own graph
        s.decode([5])


# what each public native call returns for bad input (the patches' headers document the codes)
BAD_INPUT_CODES = {
    "embd: id -1": -2, "embd: id n_vocab": -2, "embd: n < 0": -2, "embd: null ids": -2, "embd: null out": -2,
    "tree: null parents": -11, "tree: own parent": -11, "tree: parent < -1": -11, "tree: empty": -12,
    "tree: beyond n_ubatch": -12, "tree: two sequences": -15,
    "commit: none pending": -13, "tree: good": 0, "commit: not from the root": -14,
    "commit: row out of range": -14, "commit: n < 0": -14, "commit: null rows": -14,
    "plain decode after a tree": 0, "commit: tree ended by a decode": -13,
    "tree: before a clear": 0, "commit: tree ended by a clear": -13,
    "tree: full cache": 1, "commit: after a failed tree": -13,
    "range: start > end": -1, "range: end > n_layer": -1, "range: start < 0": -1,
    "range: [2, 8)": 0, "skip: from the range's first layer": -1, "skip: to the range's end": -1,
    "skip: from > to": -1, "skip: [4, 6)": 0, "skip: none": 0, "range: all layers": 0,
    "gate: null values": -1, "gate: layer >= n_layer": -1, "gate: source after gate": -1, "gate: empty batch": -12,
    "skip: [2, 4) of all layers": 0, "gate: source in the skipped span": -1, "gate: layer in the skipped span": -1,
    "range: a new range clears the skip": 0, "gate: after the skip is cleared": 0,
    "hidden: layer -1": -1, "hidden: layer n_layer + 1": -1, "hidden: get out of range is null": 1,
    "hidden: get of a layer not asked is null": 1, "hidden: ask layer 5": 0, "range: [0, 2)": 0,
    "decode: asked layer outside the range": 0, "hidden: get of a layer outside the range is null": 1,
}


def test_no_native_call_aborts_on_bad_input(model_path):
    """Every public call of our patches, called directly (no Session checks in front) with
    out-of-range rows, bad parents, null arrays and a full cache, returns its documented code;
    a child process, since an abort would end the test run."""
    import json

    child = os.path.join(os.path.dirname(__file__), "bad_native_calls.py")
    r = subprocess.run([sys.executable, child, str(model_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == BAD_INPUT_CODES


def test_native_checks_hold_without_graph_reuse():
    """The same tree/commit/layer checks with LLAMA_GRAPH_REUSE_DISABLE=1 (no stale graphs)."""
    env = dict(os.environ, LLAMA_GRAPH_REUSE_DISABLE="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                        "-k", "not without_graph_reuse and not unsupported and not is_reused"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
