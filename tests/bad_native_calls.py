"""Call every public function of native/patches/ directly with bad input; print their return codes.

Run as a child process by test_native.py (an abort would take the test runner down with it):
`python tests/bad_native_calls.py MODEL.gguf` prints one JSON object, case -> code.
"""
import ctypes
import json
import sys

import numpy as np

from edge_mtp.backend import Model, Session, native
from edge_mtp.backend.session import tree_depths

I32P, F32P = ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_float)


def ptr(a, kind=I32P):
    return None if a is None else np.ascontiguousarray(a).ctypes.data_as(kind)


def batch(ll, tokens, pos0, seqs=None, parents=None):
    """A llama_batch of token rows at consecutive positions, or at pos0 + depth for a valid tree
    (a bad one is refused before its positions matter; the caller frees it)."""
    b = ll.llama_batch_init(max(len(tokens), 1), 0, 2)
    valid = parents is not None and all(-1 <= p < i for i, p in enumerate(parents))
    offsets = tree_depths(np.asarray(parents, dtype=np.int32)) if valid else range(len(tokens))
    for i, (t, o) in enumerate(zip(tokens, offsets)):
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos0 + o, 1, 1
        b.seq_id[i][0] = 0 if seqs is None else seqs[i]
    b.n_tokens = len(tokens)
    return b


def main(path):
    model = Model(path)
    ll = native.llama()
    fn = native.fn
    codes = {}

    def tree(s, tokens, parents, seqs=None):
        b = batch(ll, tokens, s.n_past, seqs, parents)
        try:
            return fn("edge_mtp_decode_tree")(s.ctx, b, ptr(np.asarray(parents, dtype=np.int32)) if parents is not None else None)
        finally:
            ll.llama_batch_free(b)

    def commit(s, rows, n=None):
        a = None if rows is None else np.asarray(rows, dtype=np.int32)
        return fn("edge_mtp_tree_commit")(s.ctx, ptr(a), len(rows) if n is None else n)

    out = np.zeros(4 * model.n_embd, dtype=np.float32)
    rows = fn("edge_mtp_model_tok_embd_rows")
    codes["embd: id -1"] = rows(model.ptr, ptr(np.array([-1], np.int32)), 1, ptr(out, F32P))
    codes["embd: id n_vocab"] = rows(model.ptr, ptr(np.array([model.n_vocab], np.int32)), 1, ptr(out, F32P))
    codes["embd: n < 0"] = rows(model.ptr, ptr(np.array([1], np.int32)), -1, ptr(out, F32P))
    codes["embd: null ids"] = rows(model.ptr, None, 2, ptr(out, F32P))
    codes["embd: null out"] = rows(model.ptr, ptr(np.array([1], np.int32)), 1, None)

    s = Session(model, n_ctx=128, n_threads=2, n_batch=32)
    s.prefill(model.tokenize("The quick brown fox"))
    codes["tree: null parents"] = tree(s, [1, 2], None)
    codes["tree: own parent"] = tree(s, [1, 2], [-1, 1])
    codes["tree: parent < -1"] = tree(s, [1, 2], [-1, -2])
    codes["tree: empty"] = tree(s, [], [])
    codes["tree: beyond n_ubatch"] = tree(s, list(range(5, 38)), np.arange(33) - 1)
    codes["tree: two sequences"] = tree(s, [1, 2], [-1, 0], seqs=[0, 1])
    codes["commit: none pending"] = commit(s, [0])
    codes["tree: good"] = tree(s, [1, 2, 3], [-1, 0, 0])
    codes["commit: not from the root"] = commit(s, [1])
    codes["commit: row out of range"] = commit(s, [0, 99])
    codes["commit: n < 0"] = commit(s, [0], n=-1)
    codes["commit: null rows"] = commit(s, None, n=2)
    b = batch(ll, [7], s.n_past + 2)  # a plain decode after the tree ends it
    codes["plain decode after a tree"] = ll.llama_decode(s.ctx, b)
    ll.llama_batch_free(b)
    codes["commit: tree ended by a decode"] = commit(s, [0])
    ll.llama_memory_seq_rm(s.mem, 0, s.n_past, -1)
    codes["tree: before a clear"] = tree(s, [1, 2], [-1, 0])
    ll.llama_memory_clear(s.mem, True)
    codes["commit: tree ended by a clear"] = commit(s, [0])

    s.tokens = []
    s.prefill(list(range(100, 100 + s.n_ctx - 4)))
    codes["tree: full cache"] = tree(s, list(range(1, 16)), [-1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9])
    codes["commit: after a failed tree"] = commit(s, [0])

    layers = fn("edge_mtp_set_layer_range")
    n_layer = model.n_layer
    codes["range: start > end"] = layers(s.ctx, 5, 2)
    codes["range: end > n_layer"] = layers(s.ctx, 0, n_layer + 1)
    codes["range: start < 0"] = layers(s.ctx, -1, 2)
    skip = fn("edge_mtp_set_layer_skip")
    codes["range: [2, 8)"] = layers(s.ctx, 2, 8)
    codes["skip: from the range's first layer"] = skip(s.ctx, 2, 4)
    codes["skip: to the range's end"] = skip(s.ctx, 4, 8)
    codes["skip: from > to"] = skip(s.ctx, 6, 4)
    codes["skip: [4, 6)"] = skip(s.ctx, 4, 6)
    codes["skip: none"] = skip(s.ctx, 5, 5)
    codes["range: all layers"] = layers(s.ctx, 0, -1)

    g = Session(model, n_ctx=128, n_threads=2, n_batch=32)
    g.prefill(model.tokenize("Once upon a time"))
    gate = np.ones(2, dtype=np.float32)

    def gated(tokens, il_gate, il_src, values):
        b = batch(ll, tokens, g.n_past)
        try:
            return fn("edge_mtp_decode_gated")(g.ctx, b, il_gate, il_src, ptr(values, F32P))
        finally:
            ll.llama_batch_free(b)

    codes["gate: null values"] = gated([1, 2], 3, 0, None)
    codes["gate: layer >= n_layer"] = gated([1, 2], n_layer, 0, gate)
    codes["gate: source after gate"] = gated([1, 2], 2, 3, gate)
    codes["gate: empty batch"] = gated([], 3, 0, gate)
    codes["skip: [2, 4) of all layers"] = skip(g.ctx, 2, 4)
    codes["gate: source in the skipped span"] = gated([1, 2], 5, 3, gate)
    codes["gate: layer in the skipped span"] = gated([1, 2], 2, 0, gate)
    codes["range: a new range clears the skip"] = layers(g.ctx, 0, -1)
    codes["gate: after the skip is cleared"] = gated([1, 2], 2, 0, gate)
    ll.llama_memory_seq_rm(g.mem, 0, g.n_past, -1)  # that decode ran: drop its two cells

    hidden, get = fn("edge_mtp_set_hidden_output"), fn("edge_mtp_get_hidden")
    codes["hidden: layer -1"] = hidden(g.ctx, -1, True)
    codes["hidden: layer n_layer + 1"] = hidden(g.ctx, n_layer + 1, True)
    codes["hidden: get out of range is null"] = int(not get(g.ctx, n_layer + 5))
    codes["hidden: get of a layer not asked is null"] = int(not get(g.ctx, 3))
    codes["hidden: ask layer 5"] = hidden(g.ctx, 5, True)
    codes["range: [0, 2)"] = layers(g.ctx, 0, 2)
    b = batch(ll, [9], g.n_past)
    codes["decode: asked layer outside the range"] = ll.llama_decode(g.ctx, b)
    ll.llama_batch_free(b)
    codes["hidden: get of a layer outside the range is null"] = int(not get(g.ctx, 5))
    print(json.dumps(codes))


if __name__ == "__main__":
    main(sys.argv[1])
