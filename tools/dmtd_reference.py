#!/usr/bin/env python3
"""A plain numpy DMTD: the forward pass of a llama/qwen3 GGUF and the DMTD decoding loop, written
step by step from the method's description (papers.md §1.2-1.3, docs/dmtd.md), independent of
edge-mtp's runtime. Tests compare the runtime's greedy tokens with this one's.

It keeps one K/V cache per layer with a "written" flag per position, so the loop's bookkeeping is
explicit: a head step writes the thinking-layer K/V of the positions the cycle skipped (cyclical
refilling), a non-head step writes only encoding and decoding layers, and attention refuses to
read a position a layer never wrote. K and V are stored as float32 (compare with a session made
with f32_cache=True: llama.cpp's default float16 cache moves logits by ~1e-3).

    python tools/dmtd_reference.py MODEL.gguf|HF_DIR --prompt-ids 1,2,3 -n 64 --tau 3
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mtp.gguf_file import read_header  # noqa: E402
from edge_mtp.gguf_meta import DmtdConfig, dmtd_from_hf_config, validate_dmtd  # noqa: E402

ROPE_NEOX = {"qwen3", "qwen2"}  # llama.cpp rotates (i, i + d/2) pairs for these, (2i, 2i+1) for llama


# Hugging Face tensor names -> GGUF names (the reference computes with the GGUF names)
HF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
            "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
            "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
            "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


class Weights:
    """Hyperparameters, DMTD split and float64 weights of a GGUF file (quantized tensors are
    dequantized) or of a Hugging Face checkpoint folder (config.json + *.safetensors)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            self._load_hf(path)
        else:
            self._load_gguf(path)
        if "output.weight" not in self.t:  # tied output head
            self.t["output.weight"] = self.t["token_embd.weight"]

    def _load_gguf(self, path: Path) -> None:
        header = read_header(path, lambda key: True)
        fields = header.fields
        f = lambda k, d=None: fields.get(k, d)  # noqa: E731
        self.arch = a = f("general.architecture")
        self.neox = a in ROPE_NEOX
        self.n_layer = f(f"{a}.block_count")
        self.n_embd = f(f"{a}.embedding_length")
        self.n_head = f(f"{a}.attention.head_count")
        self.n_head_kv = f(f"{a}.attention.head_count_kv", self.n_head)
        self.head_dim = f(f"{a}.attention.key_length", self.n_embd // self.n_head)
        self.eps = f(f"{a}.attention.layer_norm_rms_epsilon")
        self.rope_base = f(f"{a}.rope.freq_base", 10000.0)
        self.n_rot = f(f"{a}.rope.dimension_count", self.head_dim)
        self.dmtd = validate_dmtd(fields, self.n_layer, path.name)
        data = np.memmap(path, dtype=np.uint8, mode="r")
        self.t = {}
        for t in header.tensors:
            name, shape, offset = t.name, t.shape, t.offset
            qtype = gguf.GGMLQuantizationType(t.qtype)
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            row_bytes = shape[-1] // block * size
            raw = data[offset:offset + int(np.prod(shape[:-1])) * row_bytes].reshape(*shape[:-1], row_bytes)
            self.t[name] = gguf.quants.dequantize(raw, qtype).astype(np.float64)

    def _load_hf(self, path: Path) -> None:
        """Hugging Face layout: rotate-half RoPE for every architecture, float32 safetensors read
        directly (8-byte header length, JSON header, raw little-endian data)."""
        c = json.loads((path / "config.json").read_text())
        self.arch, self.neox = c.get("model_type"), True
        self.n_layer, self.n_embd = c["num_hidden_layers"], c["hidden_size"]
        self.n_head = c["num_attention_heads"]
        self.n_head_kv = c.get("num_key_value_heads", self.n_head)
        self.head_dim = c.get("head_dim", self.n_embd // self.n_head)
        self.eps, self.rope_base = c["rms_norm_eps"], c.get("rope_theta", 10000.0)
        self.n_rot = self.head_dim
        self.dmtd = dmtd_from_hf_config(c)
        self.t = {}
        for file in sorted(path.glob("*.safetensors")):
            raw = file.read_bytes()
            n = int.from_bytes(raw[:8], "little")
            for name, info in json.loads(raw[8:8 + n]).items():
                if name == "__metadata__":
                    continue
                if info["dtype"] != "F32":
                    raise ValueError(f"{file.name}: {name} is {info['dtype']}; the reference reads F32")
                a, b = info["data_offsets"]
                data = np.frombuffer(raw, np.float32, (b - a) // 4, 8 + n + a).reshape(info["shape"])
                self.t[self._gguf_name(name)] = data.astype(np.float64)

    @staticmethod
    def _gguf_name(name: str) -> str:
        stem = name.removesuffix(".weight")
        if stem.startswith("model.layers."):
            il, rest = stem[len("model.layers."):].split(".", 1)
            return f"blk.{il}.{HF_NAMES[rest]}.weight"
        return f"{HF_NAMES[stem]}.weight"


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, pos: np.ndarray, n_rot: int, base: float, neox: bool) -> np.ndarray:
    """Rotary embedding of x (rows, heads, head_dim) at positions pos (rows,)."""
    half = n_rot // 2
    theta = pos[:, None].astype(np.float64) * base ** (-np.arange(half) * 2.0 / n_rot)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    out = x.copy()
    if neox:
        a, b = x[..., :half], x[..., half:n_rot]
        out[..., :half], out[..., half:n_rot] = a * cos - b * sin, a * sin + b * cos
    else:
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2], out[..., 1:n_rot:2] = a * cos - b * sin, a * sin + b * cos
    return out


class Reference:
    """The model with a per-layer K/V cache; `layers` runs a block of rows through [lo, hi)."""

    def __init__(self, w: Weights, n_ctx: int = 512):
        self.w = w
        shape = (w.n_layer, n_ctx, w.n_head_kv, w.head_dim)
        self.k, self.v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        self.written = np.zeros((w.n_layer, n_ctx), dtype=bool)

    def embed(self, tokens) -> np.ndarray:
        return self.w.t["token_embd.weight"][np.asarray(tokens)]

    def layers(self, lo: int, hi: int, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        for il in range(lo, hi):
            x = self.layer(il, x, pos)
        return x

    def layer(self, il: int, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        w, t, p = self.w, self.w.t, f"blk.{il}."
        n = len(x)
        h = rms_norm(x, t[p + "attn_norm.weight"], w.eps)
        q = (h @ t[p + "attn_q.weight"].T).reshape(n, w.n_head, w.head_dim)
        k = (h @ t[p + "attn_k.weight"].T).reshape(n, w.n_head_kv, w.head_dim)
        v = (h @ t[p + "attn_v.weight"].T).reshape(n, w.n_head_kv, w.head_dim)
        if p + "attn_q_norm.weight" in t:  # qwen3: RMSNorm of every head before the rotation
            q = rms_norm(q, t[p + "attn_q_norm.weight"], w.eps)
            k = rms_norm(k, t[p + "attn_k_norm.weight"], w.eps)
        q = rope(q, pos, w.n_rot, w.rope_base, w.neox)
        k = rope(k, pos, w.n_rot, w.rope_base, w.neox)
        self.k[il, pos], self.v[il, pos] = k, v
        self.written[il, pos] = True
        group = w.n_head // w.n_head_kv
        out = np.empty((n, w.n_head, w.head_dim))
        for i, pi in enumerate(pos):
            if not self.written[il, :pi + 1].all():
                gap = int(np.flatnonzero(~self.written[il, :pi + 1])[0])
                raise AssertionError(f"layer {il}: position {pi} would attend to unwritten position {gap}")
            keys = self.k[il, :pi + 1].astype(np.float64)
            vals = self.v[il, :pi + 1].astype(np.float64)
            for hd in range(w.n_head):
                s = keys[:, hd // group] @ q[i, hd] / np.sqrt(w.head_dim)
                a = np.exp(s - s.max())
                out[i, hd] = (a / a.sum()) @ vals[:, hd // group]
        x = x + out.reshape(n, -1) @ t[p + "attn_output.weight"].T
        h = rms_norm(x, t[p + "ffn_norm.weight"], w.eps)
        g = h @ t[p + "ffn_gate.weight"].T
        ff = (g / (1 + np.exp(-g))) * (h @ t[p + "ffn_up.weight"].T)
        return x + ff @ t[p + "ffn_down.weight"].T

    def logits(self, x: np.ndarray) -> np.ndarray:
        t = self.w.t
        return rms_norm(x, t["output_norm.weight"], self.w.eps) @ t["output.weight"].T


@functools.lru_cache(maxsize=4)
def load_weights(path: str) -> Weights:
    return Weights(path)


def dmtd_generate(path: str | Path, prompt: list[int], n: int, tau: int,
                  split: DmtdConfig | None = None) -> tuple[list[int], list[float]]:
    """Greedy DMTD decoding of n tokens by the model at path (a GGUF file or a Hugging Face
    folder; split overrides its DMTD layer split); returns the tokens and each step's top-1 minus
    top-2 logit.

    The first token comes from the prompt pass, every other from one DMTD step.
    """
    w = load_weights(str(path))
    cfg = split or w.dmtd
    E, L = cfg.encoding_layers, cfg.late_start
    ref = Reference(w, n_ctx=len(prompt) + n + 1)

    def full(tokens, pos, gate):
        """Encoding and thinking layers on every row, decoding layers on the gated rows only
        (the refill rows' decoding-layer K/V were written by their own non-head steps)."""
        h_enc = ref.layers(0, E, ref.embed(tokens), pos)
        h_think = ref.layers(E, L, h_enc, pos)
        keep = gate > 0
        x = h_enc[keep] + gate[keep, None] * h_think[keep]
        return ref.logits(ref.layers(L, w.n_layer, x, pos[keep])[-1])

    def late(token, p):
        pos = np.array([p])
        h_enc = ref.layers(0, E, ref.embed([token]), pos)
        return ref.logits(ref.layers(L, w.n_layer, h_enc, pos)[-1])

    P = len(prompt)
    logits = full(prompt, np.arange(P), np.ones(P))  # prompt rows are all gated as heads
    out, margins, seq = [], [], list(prompt)
    for _ in range(n):
        top = np.sort(logits)[-2:]
        margins.append(float(top[1] - top[0]))
        tok = int(np.argmax(logits))
        out.append(tok)
        if len(out) == n:
            break
        p = len(seq)
        seq.append(tok)
        local = p - P
        if local % tau == 0:  # cycle head: refill the positions the last cycle skipped
            r = min(local, tau - 1)
            gate = np.zeros(r + 1)
            gate[-1] = 1.0
            logits = full(seq[p - r:], np.arange(p - r, p + 1), gate)
        else:
            logits = late(tok, p)
    return out, margins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="a DMTD GGUF file or Hugging Face checkpoint folder")
    ap.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--tau", type=int, default=None, help="cycle length (default: the trained one)")
    args = ap.parse_args()
    prompt = [int(x) for x in args.prompt_ids.split(",")]
    tau = args.tau or load_weights(str(args.model)).dmtd.cycle
    tokens, margins = dmtd_generate(args.model, prompt, args.n, tau)
    print(",".join(map(str, tokens)))
    print(f"smallest top-1/top-2 logit margin: {min(margins):.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
