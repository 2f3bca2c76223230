"""A llama.cpp context over one Model: decode batches, read logits as numpy views, manage the KV cache.

The session tracks which tokens its KV cache holds (sequence 0, positions 0..n-1), so a new prompt
that shares a prefix with what was evaluated before re-uses those cells instead of recomputing them.
"""
from __future__ import annotations

import contextlib
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
    token computes when decoded alone. On CPU two defaults make that hold: flash attention on and
    exact rows on (patches P4-P9: every row of every batch sums as the one-row kernels do, prompts
    included, so a row's value never depends on how prompt and drafts were cut into batches);
    docs/exactness.md says what stock llama.cpp does instead and what it costs.
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
        if model.adapter:  # every context of the model, scratch ones too: costs include the adapter
            ll.llama_set_adapters_lora(self.ctx, (ll.llama_adapter_lora_p_ctypes * 1)(model.adapter),
                                       1, (ctypes.c_float * 1)(1.0))  # returns 0 whatever happens
        self.exact_rows = exact_rows and native.fn("edge_mtp_set_exact_rows")(self.ctx, True) == 0
        self.n_ctx = ll.llama_n_ctx(self.ctx)
        self.mem = ll.llama_get_memory(self.ctx)
        self.tokens: list[int] = []  # what the KV cache holds, position i = tokens[i]
        self.model_s = 0.0  # time spent inside llama.cpp decode calls, for the stats
        self.passes = 0  # forward passes run (decode calls)
        self._rows = 0  # rows of the last decode
        self._tree: np.ndarray | None = None  # token ids of a decoded, not yet committed tree
        self._ebatch = None  # embedding-row batch, made on first use
        self.layers = (0, model.n_layer)  # layer range the next decodes run (native patch P3)
        self.skip = (0, 0)  # layers [a, b) of the range they skip (P19); (0, 0): none
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

    # -- decoding: one entry point ---------------------------------------------------------
    def decode(self, tokens=None, parents=None, *, embd: np.ndarray | None = None, gate=None,
               hidden: int | None = None, logits="last") -> np.ndarray:
        """Decode rows after the cached tokens in one forward pass; return a view of their logits
        (rows with logits, n_vocab) into llama.cpp's buffer, valid until the next decode.

        tokens: token ids, -1 for each embedding row of `embd` (n_embd floats: e.g. a probing mask;
        the input of the range's first layer); embd alone: all rows are embedding rows. Without
        parents the rows are a causal chain and join the cache at once; with parents (parents[i]
        < i, -1: a child of the last cached token, breadth-first order) a token tree (patch P2)
        whose row i sits at n_past + depth(i), sees the cache, its ancestors and itself, and stays
        pending until `commit(path)`. gate = (values, il_gate, il_src): layer il_gate's input
        becomes h(il_src) + value * h(il_gate), per row (DMTD, P3). hidden = l: keep every row's
        input of layer l for `hidden_rows`. logits: "last", "all" (a tree's default) or a mask.

        The invariants live here once: a pending tree is closed first, the rows fit a batch and the
        context, a failed decode leaves the cache as it was, and cells plain decoding would not
        have written alike (embedding rows, a partial range, a gate) are recorded as -1, so no
        later prompt re-uses them.
        """
        if tokens is None:
            if embd is None:
                raise RequestError("give token ids or embedding rows")
            tokens = np.full(len(embd), -1, dtype=np.int32)
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        n = len(tokens)
        if self._tree is not None:
            self.commit([])
        if n == 0 or n > self.n_batch:
            raise RequestError(f"a decode takes 1..{self.n_batch} rows, got {n}")
        if self.n_past + n > self.n_ctx:
            raise RequestError(f"context full: {n} rows after {self.n_past} tokens do not fit n_ctx {self.n_ctx}")
        is_embd = tokens < 0
        n_embd_rows = 0 if embd is None else len(embd)
        if n_embd_rows != int(is_embd.sum()):
            raise RequestError(f"{int(is_embd.sum())} embedding rows but {n_embd_rows} embeddings given")
        if parents is not None:
            parents = np.ascontiguousarray(parents, dtype=np.int32)
            if parents.shape != (n,):
                raise RequestError("a tree needs one parent per row: an earlier row or -1")
            depth = tree_depths(parents)
            if gate is not None or not self.all_layers:
                raise RequestError("a tree decodes every layer, ungated")
            if isinstance(logits, str) and logits == "last":
                logits = "all"
        start, end = self.layers
        if hidden is not None and (not (start <= hidden < end or hidden == end < self.model.n_layer)
                                   or self.skip[0] <= hidden < self.skip[1]):
            raise RequestError(f"hidden state of layer {hidden} is not computed by layers [{start}, {end})"
                               + (f" skipping [{self.skip[0]}, {self.skip[1]})" if self.skip[1] else ""))
        self._hidden_outputs({hidden} if hidden is not None else set())
        if is_embd.any():
            batch, view = self._embedding_batch()
            view[:n][is_embd] = embd
            if (~is_embd).any():
                view[:n][~is_embd] = self.model.input_rows(tokens[~is_embd])
            pos, out = self._epos, self._eout
        else:
            batch, pos, out = self.batch, self._pos, self._out
            self._tok[:n] = tokens
        p0 = self.n_past
        pos[:n] = p0 + (depth if parents is not None else np.arange(n, dtype=np.int32))
        if isinstance(logits, str):
            out[:n] = logits == "all"
            out[n - 1] = 1
            rows = n if logits == "all" else 1
        else:
            out[:n] = np.asarray(logits, dtype=bool)
            rows = int(out[:n].sum())
        batch.n_tokens = self._rows = n
        self.passes += 1
        t0 = time.perf_counter()
        if parents is not None:
            rc = native.fn("edge_mtp_decode_tree")(self.ctx, batch, parents.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)))
        elif gate is not None:
            values, il_gate, il_src = gate
            g = np.ascontiguousarray(values, dtype=np.float32)
            if g.shape != (n,):
                raise RequestError("a gate needs one value per row")
            rc = native.fn("edge_mtp_decode_gated")(self.ctx, batch, il_gate, il_src,
                                                 g.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        else:
            rc = self._ll.llama_decode(self.ctx, batch)
        self.model_s += time.perf_counter() - t0
        if rc != 0:
            # llama.cpp leaves a failed batch's cells allocated; drop them so the cache stays ours
            self._ll.llama_memory_seq_rm(self.mem, 0, p0, -1)
            raise BackendError(f"decode of {n} rows (layers [{start}, {end})) failed with code {rc} "
                               f"({native.last_log_error()})")
        plain_cells = gate is None and self.all_layers
        if parents is not None:
            self._tree = tokens
        else:
            self.tokens.extend(tokens.tolist() if plain_cells else [-1] * n)
        return np.ctypeslib.as_array(self._ll.llama_get_logits(self.ctx), shape=(rows, self.model.n_vocab))

    def hidden_rows(self, layer: int) -> np.ndarray:
        """A copy of every row's input of `layer` from the last decode (which asked for it)."""
        if layer not in self._hidden_on:
            raise RequestError(f"the last decode did not keep layer {layer}'s hidden rows")
        ptr = native.fn("edge_mtp_get_hidden")(self.ctx, layer)
        if not ptr:
            raise RequestError(f"the last decode did not compute layer {layer}'s hidden rows")
        return np.ctypeslib.as_array(ptr, shape=(self._rows, self.model.n_embd)).copy()

    def prefill(self, tokens, riders: np.ndarray | None = None) -> np.ndarray:
        """Evaluate a prompt, re-using the longest cached prefix; return the logits of its last
        token (at least that one is always evaluated, so there are fresh logits to sample from).

        riders: embedding rows (a chain after the last token, e.g. probing masks) that ride in the
        prompt's last pass without joining the cache. With riders the result has rows: the last
        token's, then the riders' (only the first when the context has no room for them).
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
        r = len(riders) if riders is not None and len(riders) < self.n_batch and \
            len(tokens) + len(riders) <= self.n_ctx else 0
        cuts = list(range(keep, len(tokens), self.n_batch))  # where each pass starts
        if r and len(tokens) - cuts[-1] > self.n_batch - r:  # the last pass must hold the riders
            cuts.append(len(tokens) - (self.n_batch - r))
        for a, b in zip(cuts, cuts[1:]):
            self.decode(tokens[a:b])
        last = tokens[cuts[-1]:]
        if not r:
            logits = self.decode(last)
            return logits[-1] if riders is None else logits[-1:]
        m = len(last)
        rows = np.concatenate([last, np.full(r, -1)])
        logits = self.decode(rows, np.arange(-1, m + r - 1), embd=riders,
                             logits=np.arange(m + r) >= m - 1)
        self.commit(np.arange(m))
        return logits
    def commit(self, path) -> None:
        """Keep the accepted root-to-node path of the pending tree (row indices, root first) in
        the cache at consecutive positions and free every other cell that tree wrote."""
        if self._tree is None:
            raise RequestError("no tree decode to commit")
        path = np.ascontiguousarray(path, dtype=np.int32)
        kept = self._tree[path].tolist()
        if kept and min(kept) < 0:
            raise RequestError("only token rows can be committed, not embedding rows")
        rc = native.fn("edge_mtp_tree_commit")(self.ctx, path.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), len(path))
        if rc != 0:
            raise RequestError(f"rows {path.tolist()} are not a root-to-node path of the last tree")
        self.tokens.extend(kept)
        self._tree = None

    # -- layer ranges and hidden states (native patch P3) -----------------------------------
    @property
    def all_layers(self) -> bool:
        """The next decode runs every layer, as plain decoding does."""
        return self.layers == (0, self.model.n_layer) and self.skip[0] == self.skip[1]

    @contextlib.contextmanager
    def layer_range(self, start: int = 0, end: int | None = None, skip: tuple[int, int] | None = None):
        """Run only layers [start, end) in the decodes inside the block, and none of `skip` = (a, b)
        (start < a <= b < end: layer a-1's output goes straight to layer b, patch P19); all layers
        again after it, however it is left.

        Rows are the input of layer `start`; KV cells of layers not run are not written (and are
        recorded as not re-usable). Logits come from the output head applied after layer end-1
        (early-exit logits when end < n_layer).
        """
        try:
            self._set_layers(start, self.model.n_layer if end is None else end, skip or (0, 0))
            yield
        finally:  # also after a refused skip, whose range was already set
            self._set_layers(0, self.model.n_layer, (0, 0))

    def _set_layers(self, start: int, end: int, skip: tuple[int, int]) -> None:
        if (start, end) != self.layers or self.skip != (0, 0):  # a new range clears the skip
            rc = native.fn("edge_mtp_set_layer_range")(self.ctx, start, end)
            self._layers_refused(rc, f"bad layer range [{start}, {end}) for {self.model.n_layer} layers")
            self.layers, self.skip = (start, end), (0, 0)
        if skip != (0, 0):
            rc = native.fn("edge_mtp_set_layer_skip")(self.ctx, *skip)
            self._layers_refused(rc, f"bad skipped layers [{skip[0]}, {skip[1]}): they must lie inside "
                                     f"the range [{start}, {end}), after its first layer and before its last")
            self.skip = skip

    def _layers_refused(self, rc: int, bad: str) -> None:
        if rc == -2:
            raise RequestError(f"architecture {self.model.architecture} does not support layer "
                               "ranges (llama, qwen2, qwen3 and gemma3 do)")
        if rc != 0:
            raise RequestError(bad)

    def _hidden_outputs(self, wanted: set[int]) -> None:
        """Make llama.cpp copy out exactly these layers' inputs (each switch re-plans the graph)."""
        switch = [(layer, False) for layer in self._hidden_on - wanted] + [(layer, True) for layer in wanted - self._hidden_on]
        for layer, on in switch:
            if native.fn("edge_mtp_set_hidden_output")(self.ctx, layer, on) != 0:
                raise RequestError(f"layer {layer} has no hidden rows ({self.model.n_layer} layers)")
        self._hidden_on = set(wanted)

    def _abandon_tree(self) -> None:
        """Close a pending tree on both sides, keeping none of its cells. Asks the native side even
        when Python saw no tree: Ctrl-C can land between edge_mtp_decode_tree's return and
        `self._tree = tokens` (-13: nothing was pending there)."""
        rc = native.fn("edge_mtp_tree_commit")(self.ctx, None, 0)
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
    """Depth of every row of a tree's parent array (roots: 0), checking that each parent is an
    earlier row or -1 and that depths never decrease (llama.cpp wants breadth-first rows). One
    pass over at most a batch of rows: cheaper than any vectorized form at draft sizes."""
    depth: list[int] = []
    last = 0
    for i, p in enumerate(parents.tolist()):
        if not -1 <= p < i:
            raise RequestError("a tree needs one parent per row: an earlier row or -1")
        d = depth[p] + 1 if p >= 0 else 0
        if d < last:
            raise RequestError("tree rows must be in breadth-first order (non-decreasing depth)")
        depth.append(d)
        last = d
    return np.array(depth, dtype=np.int32)
