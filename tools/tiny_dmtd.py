#!/usr/bin/env python3
"""Write a tiny random-weight DMTD checkpoint in Hugging Face form (config.json with the DMTD
fields, model.safetensors, tokenizer.json + tokenizer_config.json) for `edge-mtp convert` tests.

Flavours: qwen3 (architecture MTPQwen3ForCausalLM, as the DMTD authors' training code names it)
and llama (LlamaForCausalLM plus the same DMTD fields). The tokenizer is SmolLM2's byte-level BPE,
rebuilt from the default model's GGUF (vocabulary, merges, special tokens, chat template), so the
converted model tokenizes like the default one. Weights are seeded random float32 in Hugging
Face's layout (rotate-half RoPE; the converter permutes llama's q/k for llama.cpp).

    python tools/tiny_dmtd.py -o tiny-dmtd/ --flavour qwen3 --split 0,2,2 --cycle 4
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mtp.gguf_file import read_header  # noqa: E402

FLAVOURS = {"qwen3": ("MTPQwen3ForCausalLM", "qwen3"), "llama": ("LlamaForCausalLM", "llama")}


def write_tokenizer(out: Path, vocab_from: Path) -> dict:
    """tokenizer.json + tokenizer_config.json from a GGUF's gpt2-style vocabulary; returns the
    special token ids for config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    f = read_header(vocab_from, lambda k: k.startswith("tokenizer.")).fields
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    # SmolLM's pre-tokenizer: single digits, then GPT-2 byte level (llama.cpp names it "smollm")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.save(str(out / "tokenizer.json"))
    ids = {k: f[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos")}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
        "bos_token": tokens[ids["bos"]], "eos_token": tokens[ids["eos"]],
        "chat_template": f.get("tokenizer.chat_template"), "model_max_length": 2048}, indent=1))
    return {f"{k}_token_id": v for k, v in ids.items()} | {"vocab_size": len(tokens)}


def write_tiny_dmtd(out: str | Path, vocab_from: str | Path, flavour: str = "qwen3",
                    split: tuple[int, int, int] = (0, 2, 2), cycle: int = 4, n_embd: int = 64,
                    n_head: int = 4, n_head_kv: int = 2, n_ff: int = 128, seed: int = 0,
                    dmtd: bool = True) -> Path:
    """Write the checkpoint folder and return it (dmtd=False: the plain base model config)."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arch, model_type = FLAVOURS[flavour]
    special = write_tokenizer(out, Path(vocab_from))
    n_layer, head_dim = sum(split), n_embd // n_head
    config = {
        "architectures": [arch if dmtd else arch.replace("MTP", "")], "model_type": model_type,
        "hidden_size": n_embd, "intermediate_size": n_ff, "num_hidden_layers": n_layer,
        "num_attention_heads": n_head, "num_key_value_heads": n_head_kv, "head_dim": head_dim,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "float32",
        "attention_bias": False, **special,
    }
    if dmtd:
        config.update(num_encoding_layers=split[0], num_thinking_layers=split[1],
                      num_decoding_layers=split[2], mtp_horizon=cycle)
    (out / "config.json").write_text(json.dumps(config, indent=1))

    rng = np.random.default_rng(seed)
    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    n_vocab = special["vocab_size"]
    t = {"model.embed_tokens.weight": (0.5 * rng.standard_normal((n_vocab, n_embd))).astype(np.float32),
         "model.norm.weight": norm(n_embd), "lm_head.weight": mat(n_vocab, n_embd)}
    for il in range(n_layer):
        p = f"model.layers.{il}."
        t[p + "input_layernorm.weight"] = norm(n_embd)
        t[p + "self_attn.q_proj.weight"] = mat(n_head * head_dim, n_embd)
        t[p + "self_attn.k_proj.weight"] = mat(n_head_kv * head_dim, n_embd)
        t[p + "self_attn.v_proj.weight"] = mat(n_head_kv * head_dim, n_embd)
        t[p + "self_attn.o_proj.weight"] = mat(n_embd, n_head * head_dim)
        if flavour == "qwen3":
            t[p + "self_attn.q_norm.weight"] = norm(head_dim)
            t[p + "self_attn.k_norm.weight"] = norm(head_dim)
        t[p + "post_attention_layernorm.weight"] = norm(n_embd)
        t[p + "mlp.gate_proj.weight"] = mat(n_ff, n_embd)
        t[p + "mlp.up_proj.weight"] = mat(n_ff, n_embd)
        t[p + "mlp.down_proj.weight"] = mat(n_embd, n_ff)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--flavour", default="qwen3", choices=sorted(FLAVOURS))
    ap.add_argument("--split", default="0,2,2", help="encoding,thinking,decoding layer counts")
    ap.add_argument("--cycle", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-from", default="smollm2-135m",
                    help="model name or .gguf whose tokenizer to copy")
    args = ap.parse_args()
    from edge_mtp.models import resolve_model

    split = tuple(int(x) for x in args.split.split(","))
    print(write_tiny_dmtd(args.out, resolve_model(args.vocab_from), args.flavour, split, args.cycle,
                          seed=args.seed))


if __name__ == "__main__":
    main()
