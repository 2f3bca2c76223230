#!/usr/bin/env python3
"""LoRA adapters in llama.cpp's own GGUF form: write one, merge one into float weights, make a
random one for a base model, and keep a known-model manifest's adapter fields in step with its file.

llama.cpp reads an adapter as `general.type` "adapter", `general.architecture` the base's,
`adapter.type` "lora", `adapter.lora.alpha` (float32) and, per adapted base tensor W (n_out x n_in),
`W.lora_a` (numpy shape (rank, n_in)) and `W.lora_b` (numpy shape (n_out, rank)); it computes
W x + scale * alpha / rank * b (a x) (scale: the context's, 1.0 in edge-mtp; alpha 0: no alpha/rank).
An adapter may also carry the five dmtd.* keys (docs/dmtd.md): a DMTD model shipped as an adapter.

    python tools/lora_gguf.py random BASE.gguf -o ADAPTER.gguf --layers 22-29 --rank 4 --dmtd 0,22,8,4
    python tools/lora_gguf.py manifest models/smollm2-135m-dmtd.json   # after replacing the adapter file
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_model import copy_field  # noqa: E402

from edge_mtp.gguf_file import read_header  # noqa: E402
from edge_mtp.gguf_meta import DmtdConfig  # noqa: E402

# the seven matrices of a llama/qwen layer that llama.cpp multiplies through build_lora_mm
LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def write_lora_adapter(path: str | Path, arch: str, pairs: dict, alpha: float,
                       extra_kv: dict | None = None, dtype=np.float32) -> Path:
    """Write pairs {base tensor name: (a (rank, n_in), b (n_out, rank))} as an adapter for `arch`,
    in F32 or F16. extra_kv: more metadata (int -> uint32, as the dmtd.* keys are; str -> string)."""
    if np.dtype(dtype) not in (np.float32, np.float16):
        raise ValueError(f"adapter tensors are F32 or F16, not {np.dtype(dtype)}")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for key, value in (extra_kv or {}).items():
        (w.add_uint32 if isinstance(value, int) else w.add_string)(key, value)
    for name, (a, b) in pairs.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{name}: lora_a {a.shape} and lora_b {b.shape} do not share a rank")
        w.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=dtype))
        w.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def read_lora_adapter(path: str | Path) -> tuple[float, dict]:
    """(alpha, {base tensor name: (a, b)} as float64) of an adapter file."""
    r = gguf.GGUFReader(str(path))
    alpha = float(r.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in r.tensors:
        name, _, half = t.name.rpartition(".lora_")
        parts.setdefault(name, {})[half] = np.asarray(t.data, dtype=np.float64)
    return alpha, {name: (p["a"], p["b"]) for name, p in parts.items()}


def merge_lora(tensors: dict, adapter_path: str | Path, scale: float = 1.0) -> dict:
    """The weights as llama.cpp computes with the adapter applied at `scale`: a copy of tensors
    ({name: array}) with W + scale * alpha / rank * b @ a (float64) for each adapted W."""
    alpha, pairs = read_lora_adapter(adapter_path)
    merged = dict(tensors)
    for name, (a, b) in pairs.items():
        factor = scale * alpha / a.shape[0] if alpha else scale
        merged[name] = np.asarray(tensors[name], dtype=np.float64) + factor * (b @ a)
    return merged


def write_merged(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """A copy of an F32 base GGUF with the adapter merged into its weights (no adapter left): what
    the runtime with the adapter applied must compute, as a model file of its own."""
    r = gguf.GGUFReader(str(base))
    arch = r.fields["general.architecture"].contents()
    tensors = {}
    for t in r.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ValueError(f"{Path(base).name}: {t.name} is {t.tensor_type.name}; merge into F32 weights")
        tensors[t.name] = np.asarray(t.data)
    merged = merge_lora(tensors, adapter)
    w = gguf.GGUFWriter(str(out), arch)
    for field in r.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            copy_field(w, field)
    for name, value in merged.items():
        w.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)


def random_pairs(base: str | Path, layers, rank: int, seed: int = 0, size: float = 0.5) -> dict:
    """Random pairs for every LINEAR matrix of the given layers of the base GGUF, so b @ a is
    about `size` times the magnitude of a random base weight (with alpha = rank)."""
    header = read_header(base)
    rng = np.random.default_rng(seed)
    pairs = {}
    for il in layers:
        for stem in LINEAR:
            t = header.tensor(f"blk.{il}.{stem}.weight")
            if t is None:
                raise ValueError(f"{Path(base).name} has no blk.{il}.{stem}.weight")
            n_out, n_in = t.shape
            a = rng.standard_normal((rank, n_in)) / np.sqrt(n_in)
            b = rng.standard_normal((n_out, rank)) * size / np.sqrt(rank)
            pairs[t.name] = (a, b)
    return pairs


def update_manifest(manifest: str | Path) -> dict:
    """Set a manifest's adapter_sha256 and adapter_size from the adapter file beside it."""
    manifest = Path(manifest)
    d = json.loads(manifest.read_text())
    data = (manifest.parent / d["adapter"]).read_bytes()
    d["adapter_sha256"], d["adapter_size"] = hashlib.sha256(data).hexdigest(), len(data)
    manifest.write_text(json.dumps(d, indent=2) + "\n")
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rnd = sub.add_parser("random", help="a random adapter for a base GGUF (for development)")
    rnd.add_argument("base", type=Path)
    rnd.add_argument("-o", "--out", type=Path, required=True)
    rnd.add_argument("--layers", required=True, help="first-last layer to adapt, e.g. 22-29")
    rnd.add_argument("--rank", type=int, default=4)
    rnd.add_argument("--size", type=float, default=0.5, help="magnitude of b @ a against a base weight")
    rnd.add_argument("--seed", type=int, default=0)
    rnd.add_argument("--dmtd", default=None, help="E,T,D,C: dmtd.* keys to carry")
    rnd.add_argument("--f16", action="store_true", help="F16 tensors (default F32)")
    man = sub.add_parser("manifest", help="refresh a manifest's adapter_sha256 and adapter_size")
    man.add_argument("manifest", type=Path)
    args = ap.parse_args()
    if args.command == "manifest":
        d = update_manifest(args.manifest)
        print(f"{args.manifest}: adapter_size {d['adapter_size']}, adapter_sha256 {d['adapter_sha256']}")
        return
    lo, hi = (int(x) for x in args.layers.split("-"))
    pairs = random_pairs(args.base, range(lo, hi + 1), args.rank, args.seed, args.size)
    kv = DmtdConfig(*(int(x) for x in args.dmtd.split(","))).kv() if args.dmtd else None
    arch = read_header(args.base).architecture
    print(write_lora_adapter(args.out, arch, pairs, alpha=args.rank, extra_kv=kv,
                             dtype=np.float16 if args.f16 else np.float32))


if __name__ == "__main__":
    main()
