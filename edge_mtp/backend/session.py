"""A llama.cpp context over one Model: decode batches, read logits as numpy views, manage the KV cache.

The session tracks which tokens its KV cache holds (sequence 0, positions 0..n-1), so a new prompt
that shares a prefix with what was evaluated before re-uses those cells instead of recomputing them.
"""
from __future__ import annotations

import ctypes
import os
import time

import numpy as np

from ..errors import BackendError, RequestError
from . import native
from .model import Model


def default_threads() -> int:
    """All cores up to 8: decode on small CPUs is compute-bound, past 8 memory bandwidth rules."""
    return max(1, min(8, os.cpu_count() or 1))


class Session:
    """One llama.cpp context.

    Lossless speculation needs every row of a verification batch to compute exactly what the same
    token computes when decoded alone. On CPU two defaults make that hold (docs/exactness.md):
    flash attention on (without it rows differ by up to ~0.7 in logits on the default model) and
    exact rows on (patches P4-P6: every row of every batch sums as the one-row kernels do; without it
    one-row decodes past 512 cached tokens split the KV across threads, batches of 64+ rows use a
    tiled attention kernel, and matmuls of 2+ rows go through llamafile's sgemm (F32, F16, BF16,
    Q8_0, Q4_0, Q5_0), repacked-weight gemm (Q4_0, Q4_K, IQ4_NL) or tiled K-quant kernels, each
    summing in another order). Prompts are evaluated the same way, so a row's value never depends
    on how the prompt and drafts were cut into batches.
    """

    def __init__(self, model: Model, n_ctx: int = 4096, n_threads: int | None = None,
                 n_batch: int = 512, flash_attn: bool = True, exact_rows: bool = True,
                 f32_cache: bool = False):
        ll = native.llama()
        if n_ctx <= 0:
            n_ctx = model.n_ctx_train
        self.model = model
        self.n_threads = n_threads or default_threads()
        self.flash_attn = flash_attn
        params = ll.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = self.n_batch = min(n_batch, n_ctx)
        params.n_threads = params.n_threads_batch = self.n_threads
        params.flash_attn_type = (ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        if f32_cache:  # K/V in float32 instead of float16: for comparisons with float references
            params.type_k = params.type_v = ll.GGML_TYPE_F32
        native.clear_log()
        self.ctx = ll.llama_init_from_model(model.ptr, params)
        if not self.ctx:
            raise BackendError(f"could not create a llama.cpp context ({native.last_log_error()})")
        self._ll = ll
        self.exact_rows = exact_rows and native.fn("llama_set_exact_rows")(self.ctx, True) == 0
        self.n_ctx = ll.llama_n_ctx(self.ctx)
        self.mem = ll.llama_get_memory(self.ctx)
        self.tokens: list[int] = []  # what the KV cache holds, position i = tokens[i]
        self.model_s = 0.0  # time spent inside llama.cpp decode calls, for the stats
        self._tree: np.ndarray | None = None  # token ids of a decoded, not yet committed tree
        self._ebatch = None  # embedding-row batch, made on first use
        self.layers = (0, model.n_layer)  # layer range the next decodes run (native patch P3)
        self._hidden_on: set[int] = set()  # layers whose input llama.cpp copies out per decode

        self.batch = ll.llama_batch_init(self.n_batch, 0, 1)
        b = self.batch
        self._tok = np.ctypeslib.as_array(b.token, shape=(self.n_batch,))
        self._pos = np.ctypeslib.as_array(b.pos, shape=(self.n_batch,))
        self._out = np.ctypeslib.as_array(b.logits, shape=(self.n_batch,))
        np.ctypeslib.as_array(b.n_seq_id, shape=(self.n_batch,))[:] = 1
        for i in range(self.n_batch):
            b.seq_id[i][0] = 0

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._ll.llama_batch_free(self.batch)
            if self._ebatch is not None:
                self._ll.llama_batch_free(self._ebatch[0])
            self._ll.llama_free(self.ctx)
            self.ctx = None

    def __del__(self):
        self.close()

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    @property
    def room(self) -> int:
        """Rows one decode can still take: the free context, and at most one batch (llama.cpp pads
        n_ctx up to a multiple of 256, so a small context can hold more than n_batch rows)."""
        return min(self.n_ctx - self.n_past, self.n_batch)

    # -- decoding --------------------------------------------------------------------------
    def decode(self, tokens, all_logits: bool = False) -> np.ndarray:
        """Append tokens (at most n_batch) after the cached ones; return their logits.

        Returns a view (n_outputs, n_vocab) into llama.cpp's buffer: valid until the next decode.
        Only the last row has logits unless all_logits.
        """
        n = len(tokens)
        if n == 0 or n > self.n_batch:
            raise RequestError(f"a decode takes 1..{self.n_batch} tokens, got {n}")
        if self._tree is not None:
            self.commit([])
        if self._hidden_on:
            self._hidden_outputs(set())
        if self.n_past + n > self.n_ctx:
            raise RequestError(f"context full: {self.n_past} + {n} tokens > n_ctx {self.n_ctx}")
        p0 = self.n_past
        self._tok[:n] = tokens
        self._pos[:n] = np.arange(p0, p0 + n, dtype=np.int32)
        self._out[:n] = 1 if all_logits else 0
        self._out[n - 1] = 1
        self.batch.n_tokens = n
        t0 = time.perf_counter()
        rc = self._ll.llama_decode(self.ctx, self.batch)
        self.model_s += time.perf_counter() - t0
        if rc != 0:
            # llama.cpp leaves a failed batch's cells allocated; drop them so the cache stays ours
            self._ll.llama_memory_seq_rm(self.mem, 0, p0, -1)
            raise BackendError(f"llama_decode failed with code {rc} ({native.last_log_error()})")
        self.tokens.extend(int(t) for t in tokens)
        rows = n if all_logits else 1
        ptr = self._ll.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(rows, self.model.n_vocab))

    def prefill(self, tokens) -> np.ndarray:
        """Evaluate a prompt, re-using the longest cached prefix; return the last token's logits.

        At least the last token is always evaluated, so there are fresh logits to sample from.
        """
        tokens = list(tokens)
        if not tokens:
            raise RequestError("empty prompt: nothing to condition on")
        if len(tokens) >= self.n_ctx:
            raise RequestError(f"prompt has {len(tokens)} tokens, the context holds {self.n_ctx}; "
                               "shorten it or raise n_ctx")
        keep = 0
        limit = min(len(self.tokens), len(tokens) - 1)
        while keep < limit and self.tokens[keep] == tokens[keep]:
            keep += 1
        self.truncate(keep)
        logits = None
        for i in range(keep, len(tokens), self.n_batch):
            logits = self.decode(tokens[i:i + self.n_batch])
        return logits[-1]

    # -- layer ranges, the DMTD gate, hidden states (native patch P3) -----------------------
    def set_layers(self, start: int = 0, end: int | None = None) -> None:
        """Run only layers [start, end) in the following decodes (all layers by default).

        Rows are the input of layer `start`; KV cells of other layers are not written. Logits
        come from the output head applied after layer end-1 (early-exit logits when end < n_layer).
        """
        end = self.model.n_layer if end is None else end
        if (start, end) == self.layers:
            return
        rc = native.fn("llama_set_layer_range")(self.ctx, start, end)
        if rc == -2:
            raise RequestError(f"architecture {self.model.architecture} does not support layer "
                               "ranges (llama, qwen2 and qwen3 do)")
        if rc != 0:
            raise RequestError(f"bad layer range [{start}, {end}) for {self.model.n_layer} layers")
        self.layers = (start, end)

    def decode_rows(self, tokens=None, embd: np.ndarray | None = None, gate=None,
                    gate_layers: tuple[int, int] | None = None, hidden: int | None = None,
                    last_only: bool = False):
        """Append rows (token ids, or embedding rows = the input of the first layer of the range)
        and run the current layer range; every row gets logits (only the last with last_only:
        the output head is the costly part of a many-row pass on a large vocabulary).

        gate (one float per row) with gate_layers = (il_gate, il_src): the input of layer il_gate
        becomes h(il_src) + gate * h(il_gate), DMTD's h_enc + m * h_think (il_src 0: the input rows).
        hidden = l returns a copy of every row's input of layer l (l = end of the range: its output).
        Returns (logits view (n, n_vocab), hidden rows or None).
        """
        if (tokens is None) == (embd is None):
            raise RequestError("give either tokens or embedding rows")
        if self._tree is not None:
            self.commit([])
        n = len(tokens) if tokens is not None else len(embd)
        if n == 0 or n > self.n_batch:
            raise RequestError(f"a decode takes 1..{self.n_batch} rows, got {n}")
        if self.n_past + n > self.n_ctx:
            raise RequestError(f"context full: {self.n_past} + {n} rows > n_ctx {self.n_ctx}")
        start, end = self.layers
        if hidden is not None and not (start <= hidden < end or hidden == end < self.model.n_layer):
            raise RequestError(f"hidden state of layer {hidden} is not computed by layers [{start}, {end})")
        self._hidden_outputs({hidden} if hidden is not None else set())
        if embd is not None:
            batch, view = self._embedding_batch()
            view[:n] = embd
            pos, out = self._epos, self._eout
        else:
            batch, pos, out = self.batch, self._pos, self._out
            self._tok[:n] = tokens
        p0 = self.n_past
        pos[:n] = np.arange(p0, p0 + n, dtype=np.int32)
        out[:n] = 0 if last_only else 1
        out[n - 1] = 1
        batch.n_tokens = n
        t0 = time.perf_counter()
        if gate is None:
            rc = self._ll.llama_decode(self.ctx, batch)
        else:
            g = np.ascontiguousarray(gate, dtype=np.float32)
            if g.shape != (n,) or gate_layers is None:
                raise RequestError("gate needs one value per row and gate_layers=(il_gate, il_src)")
            rc = native.fn("llama_decode_gated")(self.ctx, batch, gate_layers[0], gate_layers[1],
                                                 g.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        self.model_s += time.perf_counter() - t0
        if rc != 0:
            self._ll.llama_memory_seq_rm(self.mem, 0, p0, -1)
            raise BackendError(f"decode of layers [{start}, {end}) failed with code {rc} "
                               f"({native.last_log_error()})")
        self.tokens.extend(int(t) for t in tokens) if tokens is not None else self.tokens.extend([-1] * n)
        logits = np.ctypeslib.as_array(self._ll.llama_get_logits(self.ctx),
                                       shape=(1 if last_only else n, self.model.n_vocab))
        h = None
        if hidden is not None:
            ptr = native.fn("llama_get_hidden")(self.ctx, hidden)
            h = np.ctypeslib.as_array(ptr, shape=(n, self.model.n_embd)).copy()
        return logits, h

    def _hidden_outputs(self, wanted: set[int]) -> None:
        """Make llama.cpp copy out exactly these layers' inputs (each switch re-plans the graph)."""
        for layer in self._hidden_on - wanted:
            native.fn("llama_set_hidden_output")(self.ctx, layer, False)
        for layer in wanted - self._hidden_on:
            native.fn("llama_set_hidden_output")(self.ctx, layer, True)
        self._hidden_on = set(wanted)

    # -- token trees (native patch P2) ------------------------------------------------------
    def decode_tree(self, tokens, parents, embd: np.ndarray | None = None) -> np.ndarray:
        """Decode a token tree after the cached tokens in one forward pass; logits of every row.

        tokens[i] >= 0 is a token row, -1 an embedding row (the next row of `embd`, n_embd floats:
        e.g. a synthesized mask token). parents[i] < i is the row's parent, or -1 for a child of
        the last cached token; row i sits at position n_past + depth(i), sees the cache, its
        ancestors and itself. Rows must be in breadth-first (non-decreasing depth) order.
        Returns a view (n, n_vocab), valid until the next decode. Follow with `commit(path)`.
        """
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        parents = np.ascontiguousarray(parents, dtype=np.int32)
        n = len(tokens)
        if self._tree is not None:
            self.commit([])
        if self._hidden_on:
            self._hidden_outputs(set())
        if n == 0 or n > self.n_batch or parents.shape != (n,):
            raise RequestError(f"a tree takes 1..{self.n_batch} rows with one parent each, got {n}")
        if np.any(parents >= np.arange(n)) or np.any(parents < -1):
            raise RequestError("every row's parent must be an earlier row or -1")
        if self.n_past + n > self.n_ctx:
            raise RequestError(f"context full: a tree of {n} rows after {self.n_past} tokens does "
                               f"not fit n_ctx {self.n_ctx}")
        depth = tree_depths(parents)
        if np.any(np.diff(depth) < 0):
            raise RequestError("tree rows must be in breadth-first order (non-decreasing depth)")
        is_embd = tokens < 0
        if is_embd.any() or embd is not None:
            batch, view = self._embedding_batch()
            n_embd_rows = 0 if embd is None else len(embd)
            if n_embd_rows != int(is_embd.sum()):
                raise RequestError(f"{int(is_embd.sum())} embedding rows but {n_embd_rows} embeddings given")
            if is_embd.any():
                view[:n][is_embd] = embd
            if (~is_embd).any():
                view[:n][~is_embd] = self.model.input_rows(tokens[~is_embd])
            pos, out = self._epos, self._eout
        else:
            batch, pos, out = self.batch, self._pos, self._out
            self._tok[:n] = tokens
        pos[:n] = self.n_past + depth
        out[:n] = 1
        batch.n_tokens = n
        t0 = time.perf_counter()
        rc = native.fn("llama_decode_tree")(self.ctx, batch, parents.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)))
        self.model_s += time.perf_counter() - t0
        if rc != 0:
            self._ll.llama_memory_seq_rm(self.mem, 0, self.n_past, -1)
            raise BackendError(f"tree decode failed with code {rc} ({native.last_log_error()})")
        self._tree = tokens
        return np.ctypeslib.as_array(self._ll.llama_get_logits(self.ctx), shape=(n, self.model.n_vocab))

    def commit(self, path) -> None:
        """Keep the accepted root-to-node path of the last tree (row indices, root first) in the
        cache at consecutive positions and free every other cell that tree wrote."""
        if self._tree is None:
            raise RequestError("no tree decode to commit")
        path = np.ascontiguousarray(path, dtype=np.int32)
        if len(path) and np.any(self._tree[path] < 0):
            raise RequestError("only token rows can be committed, not embedding rows")
        rc = native.fn("llama_tree_commit")(self.ctx, path.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), len(path))
        if rc != 0:
            raise RequestError(f"rows {path.tolist()} are not a root-to-node path of the last tree")
        self.tokens.extend(int(t) for t in self._tree[path])
        self._tree = None

    def _abandon_tree(self) -> None:
        """Close a pending tree on both sides, keeping none of its cells. Asks the native side even
        when Python saw no tree: Ctrl-C can land between llama_decode_tree's return and
        `self._tree = tokens` (-13: nothing was pending there)."""
        rc = native.fn("llama_tree_commit")(self.ctx, None, 0)
        if rc not in (0, -13):
            raise BackendError(f"could not close the pending tree (code {rc})")
        self._tree = None

    def _embedding_batch(self):
        if self._ebatch is None:
            b = self._ll.llama_batch_init(self.n_batch, self.model.n_embd, 1)
            np.ctypeslib.as_array(b.n_seq_id, shape=(self.n_batch,))[:] = 1
            for i in range(self.n_batch):
                b.seq_id[i][0] = 0
            view = np.ctypeslib.as_array(b.embd, shape=(self.n_batch, self.model.n_embd))
            self._epos = np.ctypeslib.as_array(b.pos, shape=(self.n_batch,))
            self._eout = np.ctypeslib.as_array(b.logits, shape=(self.n_batch,))
            self._ebatch = (b, view)
        return self._ebatch

    # -- KV cache --------------------------------------------------------------------------
    def truncate(self, n: int) -> None:
        """Forget every cached position >= n."""
        if n < len(self.tokens):
            if not self._ll.llama_memory_seq_rm(self.mem, 0, n, -1):
                raise BackendError(f"could not remove KV cells from position {n}")
            del self.tokens[n:]

    def sync(self) -> None:
        """Drop KV cells past the tracked tokens (and an uncommitted tree): after an interrupt
        between llama_decode and our bookkeeping, the cache again holds exactly `tokens`."""
        self._abandon_tree()
        self._ll.llama_memory_seq_rm(self.mem, 0, len(self.tokens), -1)

    def clear(self) -> None:
        self._abandon_tree()
        self._ll.llama_memory_clear(self.mem, True)
        self.tokens.clear()


def tree_depths(parents: np.ndarray) -> np.ndarray:
    """Depth of every row of a parent array (roots: 0), one vectorized pass per tree level."""
    depth = np.zeros(len(parents), dtype=np.int32)
    up = parents.copy()
    while (live := up >= 0).any():
        depth[live] += 1
        up[live] = parents[up[live]]
    return depth
