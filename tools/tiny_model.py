#!/usr/bin/env python3
"""Write a tiny random-weight GGUF (qwen3, llama, qwen2 or mistral3 architecture) for tests.

The vocabulary and tokenizer are copied from a real GGUF (the default SmolLM2 model), so the tiny
model tokenizes text like a real one; the weights are seeded random numbers, so its text is noise
but every computation is deterministic and fast (a few layers of width 64). Matrices are Q4_1 by
default, like the default model: on CPU its batched kernels compute a row exactly as a single row
does (F32 matrices do not; see the exactness issue), so tests can demand bit-equality.

    python tools/tiny_model.py -o tiny-qwen3.gguf --arch qwen3 --layers 4 [--vocab-from MODEL]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

ARCHS = ("qwen3", "llama", "qwen2", "mistral3")  # mistral3: llama's tensors, a graph builder
# without layer-range support (native patch P3 covers llama, qwen2 and qwen3)

# tokenizer keys copied verbatim from the source model
TOKENIZER_KEYS = [
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
]


def copy_field(writer: gguf.GGUFWriter, field: gguf.ReaderField) -> None:
    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.ARRAY:
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=field.types[-1])
    else:
        writer.add_key_value(field.name, field.contents(), vtype)


def write_tiny_model(out: Path, vocab_from: Path, arch: str = "qwen3", n_layer: int = 4,
                     n_embd: int = 64, n_head: int = 4, n_head_kv: int = 2, n_ff: int = 128,
                     seed: int = 0, extra_kv: dict | None = None,
                     qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.Q4_1,
                     chat_template: bool = True) -> Path:
    """Write the model and return its path. extra_kv: more metadata ({key: int | str});
    chat_template False: leave the source's chat template out (like a base model)."""
    if arch not in ARCHS:
        raise ValueError(f"unsupported tiny-model architecture {arch!r}")
    src = gguf.GGUFReader(str(vocab_from))
    n_vocab = len(src.fields["tokenizer.ggml.tokens"].data)
    head_dim = n_embd // n_head
    rng = np.random.default_rng(seed)

    def add_matrix(name: str, a: np.ndarray) -> None:
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(2048)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch in ("llama", "mistral3"):
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if qtype == gguf.GGMLQuantizationType.Q4_1
                    else gguf.LlamaFileType.ALL_F32)
    for key in TOKENIZER_KEYS:
        if key in src.fields and (chat_template or key != "tokenizer.chat_template"):
            copy_field(w, src.fields[key])
    for key, value in (extra_kv or {}).items():
        (w.add_uint32 if isinstance(value, int) else w.add_string)(key, value)

    add_matrix("token_embd.weight", (0.5 * rng.standard_normal((n_vocab, n_embd))).astype(np.float32))
    w.add_tensor("output_norm.weight", norm(n_embd))
    add_matrix("output.weight", mat(n_vocab, n_embd))
    for il in range(n_layer):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", norm(n_embd))
        add_matrix(p + "attn_q.weight", mat(n_head * head_dim, n_embd))
        add_matrix(p + "attn_k.weight", mat(n_head_kv * head_dim, n_embd))
        add_matrix(p + "attn_v.weight", mat(n_head_kv * head_dim, n_embd))
        add_matrix(p + "attn_output.weight", mat(n_embd, n_head * head_dim))
        if arch == "qwen3":
            w.add_tensor(p + "attn_q_norm.weight", norm(head_dim))
            w.add_tensor(p + "attn_k_norm.weight", norm(head_dim))
        w.add_tensor(p + "ffn_norm.weight", norm(n_embd))
        add_matrix(p + "ffn_gate.weight", mat(n_ff, n_embd))
        add_matrix(p + "ffn_up.weight", mat(n_ff, n_embd))
        add_matrix(p + "ffn_down.weight", mat(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--arch", default="qwen3", choices=ARCHS)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-from", default="smollm2-135m",
                    help="model name or .gguf whose tokenizer to copy")
    args = ap.parse_args()
    from edge_mtp.models import resolve_model

    path = write_tiny_model(args.out, resolve_model(args.vocab_from), args.arch, args.layers,
                            args.embd, seed=args.seed)
    print(path)


if __name__ == "__main__":
    main()
