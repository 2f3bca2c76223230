"""A loaded GGUF model: vocabulary, chat template, metadata and exact token-embedding rows."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from ..errors import ModelError, RequestError
from ..gguf_file import validate, validate_adapter
from . import native


# Architectures whose graph transforms token inputs in ways an embedding row skips (llama.cpp's
# `ubatch.token ? ... : ...` in src/models/): embedding rows cannot stand in for their tokens.
# gemma3 only scales token rows by sqrt(n_embd), which input_rows applies itself.
TOKEN_ONLY_INPUT_ARCHS = {
    "cogvlm", "cohere2moe", "deepseek2", "deepseek32", "deepseek4", "gemma-embedding", "gemma3n",
    "gemma4", "glm-dsa", "glm4moe", "graniteswitch", "nemotron_h_moe", "qwen35", "qwen35moe",
    "qwen3next",
}

# Weight types quantize_model writes (llama.cpp ftypes; the K-quant mixes put some tensors in
# other types, and rows not a multiple of 256 fall back to a legacy quant).
WEIGHT_TYPES = {
    "F32": "LLAMA_FTYPE_ALL_F32", "F16": "LLAMA_FTYPE_MOSTLY_F16", "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "IQ4_NL": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
}


def quantize_model(src: str | Path, dst: str | Path, weight_type: str) -> Path:
    """Write src with its weights converted to weight_type (dequantizing or re-quantizing an
    already quantized file): variants of one model for the exactness table and tests."""
    if weight_type not in WEIGHT_TYPES:
        raise RequestError(f"unknown weight type {weight_type!r} (known: {', '.join(WEIGHT_TYPES)})")
    ll = native.llama()
    params = ll.llama_model_quantize_default_params()
    params.ftype = getattr(ll, WEIGHT_TYPES[weight_type])
    params.allow_requantize = True
    native.clear_log()
    if ll.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise ModelError(f"could not write {dst} as {weight_type} ({native.last_log_error()})")
    return Path(dst)


class Model:
    """Weights and vocabulary of one GGUF file (shared by every Session made from it), and the
    LoRA adapter over them, if any (every Session applies it)."""

    def __init__(self, path: str | Path, n_gpu_layers: int | None = None,
                 lora: str | Path | None = None):
        ll = native.llama()
        self.path = Path(path)
        self.lora = Path(lora) if lora is not None else None
        self.adapter = None  # llama.cpp's adapter, for Session
        header = validate(self.path)  # refuse a malformed file before llama.cpp reads it
        self.dmtd = header.dmtd
        if self.lora is not None:  # the adapter's header too, before loading anything
            lora_dmtd = validate_adapter(self.lora, header.architecture,
                                         header.fields[f"{header.architecture}.block_count"])
            if lora_dmtd is not None and self.dmtd is not None:
                raise ModelError(f"{self.lora.name}: carries dmtd.* keys and so does its base "
                                 f"{self.path.name}; only one of them may define the DMTD split")
            self.dmtd = lora_dmtd or self.dmtd
        params = ll.llama_model_default_params()
        if n_gpu_layers is not None:
            params.n_gpu_layers = n_gpu_layers
        native.clear_log()
        self.ptr = ll.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            raise ModelError(f"{self.path}: llama.cpp could not load the model ({native.last_log_error()})")
        self._ll = ll
        if self.lora is not None:
            native.clear_log()
            self.adapter = ll.llama_adapter_lora_init(self.ptr, str(self.lora).encode())
            if not self.adapter:
                reason = native.last_log_error()
                self.close()
                raise ModelError(f"{self.lora}: llama.cpp could not load the LoRA adapter ({reason})")
        self.vocab = ll.llama_model_get_vocab(self.ptr)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.n_embd = ll.llama_model_n_embd(self.ptr)
        self.n_layer = ll.llama_model_n_layer(self.ptr)
        self.n_ctx_train = ll.llama_model_n_ctx_train(self.ptr)
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self.bos = ll.llama_vocab_bos(self.vocab)
        self.eos = ll.llama_vocab_eos(self.vocab)
        self.architecture = self.meta("general.architecture") or "unknown"
        self.name = self.meta("general.name") or self.path.stem
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self._chat_formatter = None

    def close(self) -> None:
        """Free the adapter, then the weights (close every Session made from it first)."""
        if getattr(self, "adapter", None):
            self._ll.llama_adapter_lora_free(self.adapter)
            self.adapter = None
        if getattr(self, "ptr", None):
            self._ll.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self):
        self.close()

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text (llama.cpp keeps every key, ours included)."""
        buf = ctypes.create_string_buffer(4096)
        n = self._ll.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            self._ll.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    # -- text <-> tokens -------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of text; special tokens in the text are parsed (as llama-cpp-python's Llama)."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(f"prompt is not valid Unicode text ({e.reason} at {e.start})") from None
        add_bos = self.add_bos if add_bos is None else add_bos
        n_max = len(data) + 8
        buf = (ctypes.c_int32 * n_max)()
        n = self._ll.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            n_max = -n
            buf = (ctypes.c_int32 * n_max)()
            n = self._ll.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            raise RequestError("prompt could not be tokenized")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens render as nothing, as in llama-cpp-python)."""
        p = self._pieces.get(token)
        if p is None:
            if not 0 <= token < self.n_vocab:  # llama.cpp would abort the process (std::out_of_range)
                raise RequestError(f"token id {token} is out of range (vocabulary of {self.n_vocab})")
            buf = ctypes.create_string_buffer(64)
            n = self._ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            p = self._pieces[token] = buf.raw[:n]
        return p

    def detokenize(self, tokens) -> str:
        return b"".join(self.piece(int(t)) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """End of generation (EOS, EOT, <|im_end|> ...), as the GGUF's vocabulary marks them."""
        v = self._eog.get(token)
        if v is None:
            v = self._eog[token] = bool(self._ll.llama_vocab_is_eog(self.vocab, token))
        return v

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """Prompt tokens for chat messages, rendered with the GGUF's own Jinja chat template."""
        if self._chat_formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            template = self.meta("tokenizer.chat_template")
            if not template:
                raise RequestError(f"{self.path.name} has no chat template; use a plain prompt")
            text = lambda t: self._ll.llama_vocab_get_text(self.vocab, t).decode() if t >= 0 else ""
            self._chat_formatter = Jinja2ChatFormatter(template, eos_token=text(self.eos),
                                                       bos_token=text(self.bos))
        try:
            text = self._chat_formatter(messages=messages).prompt
        except Exception as e:  # a template raising on bad roles or order
            raise RequestError(f"chat template rejected the messages: {e}") from None
        # templates that write the BOS text themselves must not get a second BOS
        bos_text = self._chat_formatter.bos_token
        return self.tokenize(text, add_bos=self.add_bos and not (bos_text and text.startswith(bos_text)))

    # -- embeddings ------------------------------------------------------------------------
    def input_rows(self, ids) -> np.ndarray:
        """What the graph's first layer receives for these tokens, as embedding rows: the exact
        token-embedding rows, scaled where the architecture scales token inputs (gemma3)."""
        if self.architecture in TOKEN_ONLY_INPUT_ARCHS:
            raise RequestError(f"architecture {self.architecture} transforms token inputs; "
                               "embedding rows cannot stand in for its tokens")
        rows = self.tok_embd_rows(ids)
        if self.architecture == "gemma3":
            rows *= np.sqrt(np.float32(self.n_embd), dtype=np.float32)
        return rows

    def tok_embd_rows(self, ids) -> np.ndarray:
        """Exact float32 input-embedding rows for token ids, shape (n, n_embd) (native patch P1)."""
        ids = np.ascontiguousarray(ids, dtype=np.int32).reshape(-1)
        out = np.empty((len(ids), self.n_embd), dtype=np.float32)
        rc = native.fn("edge_mtp_model_tok_embd_rows")(self.ptr, ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                                  len(ids), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        if rc != 0:
            raise RequestError({-1: "model has no token embeddings", -2: "token id out of range",
                                -3: "token embedding type cannot be dequantized"}.get(rc, f"error {rc}"))
        return out
