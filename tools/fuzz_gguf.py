#!/usr/bin/env python3
"""Coverage-guided fuzzing of edge-mtp's GGUF validator (atheris; libFuzzer underneath).

The property: for any bytes, gguf_file.scan + check return a Header or raise ModelError. Any other
exception, a crash, a hang (libFuzzer's -timeout, seconds per input) or an allocation past the
memory limit (MemoryError under an address-space limit of what the process holds at start plus
MEMORY_HEADROOM; libFuzzer's own -rss_limit_mb reads ru_maxrss, which Linux carries over from the
process that started this one, so it is off) is a finding. The seed is a small well-formed GGUF written with gguf-py (two
layers, an 8-token vocabulary, real tensor data), so mutations start from a file that passes.

    python tools/fuzz_gguf.py -runs=20000                        # the suite's smoke run
    python tools/fuzz_gguf.py -max_total_time=3600 -timeout=5 fuzz-corpus/   # a long run; the
        # folder keeps the inputs that found new coverage, so later runs continue from them
"""
from __future__ import annotations

import resource
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
with atheris.instrument_imports():
    from edge_mtp.errors import ModelError
    from edge_mtp.gguf_file import check, checked, scan


def seed_file(path: Path) -> Path:
    """A minimal llama GGUF: every key and tensor check() looks at, F32 and Q8_0 data."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(32)
    w.add_head_count(2)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(8)])
    w.add_token_types([1] * 8)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in (("dmtd.version", 1), ("dmtd.encoding_layers", 0), ("dmtd.thinking_layers", 1),
                       ("dmtd.decoding_layers", 1), ("dmtd.cycle", 2)):
        w.add_uint32(key, value)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((8, 32), dtype=np.float32))
    for i in range(2):
        q = gguf.quants.quantize(rng.standard_normal((32, 32), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{i}.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


MEMORY_HEADROOM = 1 << 30  # bytes an input may make the validator allocate before it is a finding


def limit_memory() -> None:
    with open("/proc/self/statm") as fh:
        vsize = int(fh.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (vsize + MEMORY_HEADROOM, resource.RLIM_INFINITY))


def test_one_input(data: bytes) -> None:
    try:
        check(scan(data, checked, "fuzz"), "fuzz")
    except ModelError:
        pass


def main() -> None:
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    with tempfile.TemporaryDirectory() as tmp:
        seeds = Path(corpus[0]) if corpus else Path(tmp)
        seeds.mkdir(parents=True, exist_ok=True)
        seed = seed_file(Path(tmp) / "seed.gguf")
        check(scan(seed.read_bytes(), checked, "seed"), "seed")  # the seed itself must pass
        (seeds / "seed.gguf").write_bytes(seed.read_bytes())
        args = [a for a in sys.argv if a.startswith("-") or a == sys.argv[0]]
        atheris.Setup(args + [str(seeds), "-rss_limit_mb=0"], test_one_input)
        limit_memory()
        atheris.Fuzz()


if __name__ == "__main__":
    main()
