"""The patched llama.cpp library: import, log capture, and ctypes bindings of our extern "C" additions.

llama-cpp-python binds the stock API; the functions added by native/patches/ are bound here on the
same library object (`llama_cpp.llama_cpp._lib`), so both see one llama.cpp.
"""
from __future__ import annotations

import ctypes
import threading
from collections import deque

from ..errors import BackendError

_lock = threading.Lock()
_state: dict = {}
_log_tail: deque[str] = deque(maxlen=40)  # recent llama.cpp log lines, for one-line error reasons
_verbose = False

REBUILD_HINT = "run `python native/build.py` in the edge-mtp checkout"


def llama():
    """The `llama_cpp.llama_cpp` module, imported once with logging routed through us."""
    if "ll" in _state:
        return _state["ll"]
    with _lock:
        if "ll" in _state:
            return _state["ll"]
        try:
            import llama_cpp.llama_cpp as ll
        except ImportError as e:
            raise BackendError(f"llama.cpp backend is not installed ({e}); {REBUILD_HINT}") from None

        @ll.llama_log_callback
        def _on_log(level: int, text: bytes, user_data) -> None:
            line = text.decode("utf-8", errors="replace")
            if line.strip():
                _log_tail.append(line.strip())
            if _verbose:
                print(line, end="", flush=True, file=__import__("sys").stderr)

        ll.llama_log_set(_on_log, ctypes.c_void_p(0))
        _state["log_cb"] = _on_log  # keep the callback alive as long as the library
        ll.llama_backend_init()
        _bind_patches(ll)
        _state["ll"] = ll
        return ll


def set_verbose(on: bool) -> None:
    global _verbose
    _verbose = on


def last_log_error() -> str:
    """The most telling recent llama.cpp log line (errors first), for error messages."""
    for line in reversed(_log_tail):
        if "error" in line.lower() or "failed" in line.lower():
            return line
    return _log_tail[-1] if _log_tail else "no details from llama.cpp"


def clear_log() -> None:
    _log_tail.clear()


def build_key() -> str:
    """The build key native/build.py wrote into the installed llama_cpp (patch set, flags, source)."""
    import json
    from pathlib import Path

    import llama_cpp

    try:
        return json.loads((Path(llama_cpp.__file__).parent / "_edge_mtp_build.json").read_text())["key"]
    except (OSError, ValueError, KeyError):
        return "unknown"


def _bind_patches(ll) -> None:
    """Bind the functions our patches add; a stock llama-cpp-python build lacks them."""
    i32, f32 = ctypes.c_int32, ctypes.c_float
    p_i32 = ctypes.POINTER(i32)
    signatures = {  # name: (argtypes, restype), as declared in the patched include/llama.h
        "edge_mtp_model_tok_embd_rows": ([ll.llama_model_p_ctypes, p_i32, i32, ctypes.POINTER(f32)], i32),
        "edge_mtp_decode_tree": ([ll.llama_context_p_ctypes, ll.llama_batch, p_i32], i32),
        "edge_mtp_tree_commit": ([ll.llama_context_p_ctypes, p_i32, i32], i32),
        "edge_mtp_set_exact_rows": ([ll.llama_context_p_ctypes, ctypes.c_bool], i32),
        "edge_mtp_set_layer_range": ([ll.llama_context_p_ctypes, i32, i32], i32),
        "edge_mtp_set_layer_skip": ([ll.llama_context_p_ctypes, i32, i32], i32),
        "edge_mtp_decode_gated": ([ll.llama_context_p_ctypes, ll.llama_batch, i32, i32, ctypes.POINTER(f32)], i32),
        "edge_mtp_set_hidden_output": ([ll.llama_context_p_ctypes, i32, ctypes.c_bool], i32),
        "edge_mtp_get_hidden": ([ll.llama_context_p_ctypes, i32], ctypes.POINTER(f32)),
    }
    for name, (argtypes, restype) in signatures.items():
        try:
            fn = getattr(ll._lib, name)
        except AttributeError:
            raise BackendError(f"the installed llama_cpp is not edge-mtp's patched build ({name} "
                               f"missing); {REBUILD_HINT}") from None
        fn.argtypes, fn.restype = argtypes, restype
        _state[name] = fn


def fn(name: str):
    """A bound native function of our patch set (after llama() has run)."""
    return _state[name]
