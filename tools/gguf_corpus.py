#!/usr/bin/env python3
"""A corpus of malformed GGUF files made from a real model's header, and a check that edge-mtp
refuses every one with one ModelError line: no crash, no hang, no oversized allocation.

Each case is the source header with one fault (truncation, flipped header fields, huge counts and
string lengths, wrong value types, duplicate keys and tensors, missing tensors, a vocabulary that
does not match the embeddings, bad dmtd.* metadata, misplaced tensor data), followed by a data
section of the source's size left as a hole in the file (sparse: no disk written, weights read as
zeros). One control case keeps the header intact and must load, which proves that the files are
otherwise well formed and the refusals come from the faults.

    python tools/gguf_corpus.py MODEL.gguf -o DIR    # write the corpus (sparse files)
    python tools/gguf_corpus.py MODEL.gguf --check   # load each case in turn, report who refused
"""
from __future__ import annotations

import argparse
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STRING, ARRAY, U32, I32, F32 = 8, 9, 4, 5, 6


def s8(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


@dataclass
class Source:
    """A GGUF header taken apart: KV records and tensor records as raw bytes, in file order."""
    version: int
    kvs: list[tuple[str, int, bytes]]                      # key, value type, value bytes
    tensors: list[tuple[str, tuple, int, int]]             # name, dims (ggml order), type, offset
    data_size: int
    alignment: int = 32
    magic: bytes = b"GGUF"
    n_kv: int | None = None        # header counts; None: the real list lengths
    n_tensors: int | None = None
    extra: bytes = b""             # raw bytes appended after the tensor records

    def header(self) -> bytes:
        out = [self.magic, struct.pack("<IQQ", self.version,
                                       len(self.tensors) if self.n_tensors is None else self.n_tensors,
                                       len(self.kvs) if self.n_kv is None else self.n_kv)]
        out += [s8(k) + struct.pack("<I", t) + v for k, t, v in self.kvs]
        for name, dims, qtype, off in self.tensors:
            out.append(s8(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, off))
        return b"".join(out) + self.extra

    def write(self, path: Path, cut: int | None = None) -> Path:
        """The header, padding to the alignment, the data section as a hole; `cut`: file length."""
        head = self.header()
        start = -(-len(head) // self.alignment) * self.alignment
        with open(path, "wb") as fh:
            fh.write(head if cut is None else head[:cut])
            fh.truncate(start + self.data_size if cut is None else cut)
        return path

    def copy(self, **kw) -> "Source":
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        fields.update(kvs=list(self.kvs), tensors=list(self.tensors), **kw)
        return Source(**fields)

    def set_kv(self, key: str, vtype: int, value: bytes) -> "Source":
        new = self.copy()
        at = next((i for i, kv in enumerate(new.kvs) if kv[0] == key), None)
        if at is None:
            new.kvs.append((key, vtype, value))
        else:
            new.kvs[at] = (key, vtype, value)
        return new

    def drop_kv(self, key: str) -> "Source":
        new = self.copy()
        new.kvs = [kv for kv in new.kvs if kv[0] != key]
        return new

    def kv(self, key: str) -> tuple[int, bytes]:
        return next((t, v) for k, t, v in self.kvs if k == key)

    @property
    def arch(self) -> str:
        return self.kv("general.architecture")[1][8:].decode()


def parse(path: Path) -> Source:
    """Split a well-formed GGUF's header into records (edge_mtp's scan has checked it first)."""
    from edge_mtp.gguf_file import SCALARS, read_header

    h = read_header(path)
    with path.open("rb") as fh:
        buf = fh.read(h.data_start)
    size = lambda t: struct.calcsize("<" + SCALARS[t])  # noqa: E731

    def skip(t: int, off: int) -> int:
        if t == STRING:
            return off + 8 + struct.unpack_from("<Q", buf, off)[0]
        if t == ARRAY:
            et, n = struct.unpack_from("<IQ", buf, off)
            off += 12
            if et != STRING:
                return off + n * size(et)
            for _ in range(n):
                off = skip(STRING, off)
            return off
        return off + size(t)

    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    off, kvs = 24, []
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", buf, off)
        key = buf[off + 8:off + 8 + n].decode()
        (t,) = struct.unpack_from("<I", buf, off + 8 + n)
        end = skip(t, off + 12 + n)
        kvs.append((key, t, buf[off + 12 + n:end]))
        off = end
    tensors = []
    for t in h.tensors:
        rel = t.offset - h.data_start
        tensors.append((t.name, tuple(reversed(t.shape)), t.qtype, rel))
    return Source(version, kvs, tensors, path.stat().st_size - h.data_start, h.alignment)


@dataclass
class Case:
    name: str
    make: object                 # Path -> Path: writes the case file
    expect: str = "refuse"       # or "load"
    note: str = field(default="")


def cases(src: Source) -> list[Case]:
    """Every fault, each on an otherwise intact copy of the source header."""
    arch, head = src.arch, src.header()
    kv_end = head.index(s8(src.tensors[0][0]) + struct.pack("<I", len(src.tensors[0][1])))
    data_start = -(-len(head) // src.alignment) * src.alignment
    out = [Case("control", lambda p: src.write(p), "load", "the header intact: must load")]

    for cut in sorted({0, 3, 4, 8, 20, 24, 30, kv_end // 4, kv_end // 2, kv_end - 1, kv_end + 10,
                       (kv_end + len(head)) // 2, len(head) - 1, data_start + 4096,
                       data_start + src.data_size // 2, data_start + src.data_size - 1}):
        out.append(Case(f"truncated-at-{cut}", lambda p, c=cut: src.write(p, cut=c)))

    hdr = {  # header fields: magic, version, counts
        "magic-ggml": dict(magic=b"ggml"), "magic-GGUG": dict(magic=b"GGUG"),
        "version-0": dict(version=0), "version-1": dict(version=1), "version-4": dict(version=4),
        "version-byteswapped": dict(version=struct.unpack("<I", struct.pack(">I", src.version))[0]),
        "n_kv-plus-1": dict(n_kv=len(src.kvs) + 1), "n_kv-minus-1": dict(n_kv=len(src.kvs) - 1),
        "n_kv-huge": dict(n_kv=2 ** 63 - 1), "n_kv-2^32": dict(n_kv=2 ** 32),
        "n_tensors-plus-1": dict(n_tensors=len(src.tensors) + 1),
        "n_tensors-minus-1": dict(n_tensors=len(src.tensors) - 1),
        "n_tensors-huge": dict(n_tensors=2 ** 63 - 1), "n_tensors-0": dict(n_tensors=0),
    }
    out += [Case(name, lambda p, kw=kw: src.copy(**kw).write(p)) for name, kw in hdr.items()]

    def with_kvs(kvs: list) -> Source:
        new = src.copy()
        new.kvs = kvs
        return new

    first_key, first_t, first_v = src.kvs[0]
    raw_kvs = {  # hand-made records where a well-formed key cannot express the fault
        "key-length-huge": struct.pack("<Q", 2 ** 63) + first_key.encode(),
        "key-length-past-end": struct.pack("<Q", 10 ** 9) + first_key.encode(),
        "key-empty": s8("") + struct.pack("<I", first_t) + first_v,
        "key-not-utf8": s8(b"\xff\xfe" + first_key.encode()) + struct.pack("<I", first_t) + first_v,
        "value-type-13": s8(first_key) + struct.pack("<I", 13) + first_v,
        "value-type-huge": s8(first_key) + struct.pack("<I", 2 ** 31) + first_v,
        "string-length-huge": s8("general.name") + struct.pack("<IQ", STRING, 2 ** 63) + b"x",
        "string-length-past-end": s8("general.name") + struct.pack("<IQ", STRING, 10 ** 10) + b"x",
        "array-count-huge": s8("general.tags") + struct.pack("<IIQ", ARRAY, U32, 2 ** 61),
        "string-array-count-huge": s8("general.tags") + struct.pack("<IIQ", ARRAY, STRING, 2 ** 62),
        "array-of-arrays": s8("general.tags") + struct.pack("<IIQIQ", ARRAY, ARRAY, 1, U32, 1) + b"\0" * 4,
        "array-element-type-99": s8("general.tags") + struct.pack("<IIQ", ARRAY, 99, 1) + b"\0" * 4,
    }
    for name, record in raw_kvs.items():
        def make(p, record=record):
            new = src.copy()
            head = new.header()
            # splice the record in place of the first KV (or before it, for the added keys)
            start = 24
            first_len = len(s8(first_key)) + 4 + len(first_v)
            replace = not record.startswith((s8("general.name"), s8("general.tags")))
            body = head[:start] + record + head[start + (first_len if replace else 0):]
            if not replace:
                body = body[:16] + struct.pack("<Q", len(src.kvs) + 1) + body[24:]
            with open(p, "wb") as fh:
                fh.write(body)
                fh.truncate(-(-len(body) // src.alignment) * src.alignment + src.data_size)
            return p
        out.append(Case(name, make))

    n_layer = struct.unpack("<I", src.kv(f"{arch}.block_count")[1])[0] if \
        src.kv(f"{arch}.block_count")[0] == U32 else None
    tokens_t, tokens_v = src.kv("tokenizer.ggml.tokens")
    n_vocab = struct.unpack_from("<Q", tokens_v, 4)[0]
    first_token_len = 8 + struct.unpack_from("<Q", tokens_v, 12)[0]
    short_vocab = tokens_v[:4] + struct.pack("<Q", n_vocab - 1) + tokens_v[12 + first_token_len:]
    u32 = lambda v: struct.pack("<I", v)  # noqa: E731
    dmtd = lambda **kw: [("dmtd." + k, U32, u32(v)) for k, v in kw.items()]  # noqa: E731
    good_dmtd = dict(version=1, encoding_layers=0, thinking_layers=(n_layer or 2) - 2,
                     decoding_layers=2, cycle=4)
    kv_cases = {
        "architecture-missing": src.drop_kv("general.architecture"),
        "architecture-as-uint32": src.set_kv("general.architecture", U32, u32(7)),
        "architecture-unknown": src.set_kv("general.architecture", STRING, s8("nosucharch")),
        "block_count-missing": src.drop_kv(f"{arch}.block_count"),
        "block_count-as-string": src.set_kv(f"{arch}.block_count", STRING, s8("30")),
        "block_count-zero": src.set_kv(f"{arch}.block_count", U32, u32(0)),
        "block_count-plus-1": src.set_kv(f"{arch}.block_count", U32, u32((n_layer or 0) + 1)),
        "block_count-huge": src.set_kv(f"{arch}.block_count", U32, u32(2 ** 32 - 1)),
        "embedding_length-as-string": src.set_kv(f"{arch}.embedding_length", STRING, s8("576")),
        "embedding_length-zero": src.set_kv(f"{arch}.embedding_length", U32, u32(0)),
        "head_count-zero": src.set_kv(f"{arch}.attention.head_count", U32, u32(0)),
        "context_length-as-float": src.set_kv(f"{arch}.context_length", F32, struct.pack("<f", 1.5)),
        "alignment-zero": src.set_kv("general.alignment", U32, u32(0)),
        "alignment-3": src.set_kv("general.alignment", U32, u32(3)),
        "alignment-as-string": src.set_kv("general.alignment", STRING, s8("32")),
        "duplicate-key": with_kvs(src.kvs + [src.kvs[0]]),
        "vocab-missing": src.drop_kv("tokenizer.ggml.tokens"),
        "vocab-one-short": src.set_kv("tokenizer.ggml.tokens", tokens_t, short_vocab),
        "vocab-as-string": src.set_kv("tokenizer.ggml.tokens", STRING, s8("hello")),
        "token_type-short": src.set_kv("tokenizer.ggml.token_type", ARRAY,
                                       struct.pack("<IQ", I32, 1) + u32(1)),
        "eos-out-of-vocab": src.set_kv("tokenizer.ggml.eos_token_id", U32, u32(n_vocab + 5)),
        "bos-as-string": src.set_kv("tokenizer.ggml.bos_token_id", STRING, s8("1")),
        "dmtd-incomplete": with_kvs(src.kvs + dmtd(version=1, encoding_layers=0, cycle=4)),
        "dmtd-layers-do-not-add-up": with_kvs(src.kvs + dmtd(**{**good_dmtd, "decoding_layers": 3})),
        "dmtd-cycle-zero": with_kvs(src.kvs + dmtd(**{**good_dmtd, "cycle": 0})),
        "dmtd-version-2": with_kvs(src.kvs + dmtd(**{**good_dmtd, "version": 2})),
        "dmtd-thinking-zero": with_kvs(src.kvs + dmtd(**{**good_dmtd, "thinking_layers": 0,
                                                          "encoding_layers": good_dmtd["thinking_layers"]})),
        "dmtd-cycle-as-string": with_kvs(src.kvs + [("dmtd.cycle", STRING, s8("4")), *dmtd(
            **{k: v for k, v in good_dmtd.items() if k != "cycle"})]),
        "dmtd-unknown-key": with_kvs(src.kvs + dmtd(**good_dmtd, horizon=4)),
    }
    out += [Case(name, lambda p, s=s: s.write(p)) for name, s in kv_cases.items()]

    def tensors(edit) -> Source:
        new = src.copy()
        new.tensors = edit(list(src.tensors))
        return new

    def at(name):
        return next(i for i, t in enumerate(src.tensors) if t[0] == name)

    def replace(target, **kw):
        def edit(ts):
            i = at(target)
            n, dims, qtype, off = ts[i]
            ts[i] = (kw.get("name", n), kw.get("dims", dims), kw.get("qtype", qtype), kw.get("offset", off))
            return ts
        return edit

    embd = src.tensors[at("token_embd.weight")]
    layer1 = [t[0] for t in src.tensors if t[0].startswith("blk.1.")]
    last = src.tensors[-1][0]
    tensor_cases = {
        "token_embd-missing": tensors(lambda ts: [t for t in ts if t[0] != "token_embd.weight"]),
        "layer-1-missing": tensors(lambda ts: [t for t in ts if t[0] not in layer1]),
        "one-layer-tensor-missing": tensors(lambda ts: [t for t in ts if t[0] != layer1[0]]),
        "duplicate-tensor": tensors(lambda ts: ts + [ts[-1]]),
        "tensor-name-empty": tensors(replace(last, name="")),
        "tensor-name-64-bytes": tensors(replace(last, name="x" * 64)),
        "tensor-type-99": tensors(replace(last, qtype=99)),
        "tensor-type-removed-q4_2": tensors(replace(last, qtype=4)),
        "tensor-0-dims": tensors(replace(last, dims=())),
        "tensor-5-dims": tensors(replace(last, dims=(1, 1, 1, 1, 1))),
        "tensor-dim-negative": tensors(replace(last, dims=(2 ** 64 - 1,))),
        "tensor-shape-overflows": tensors(replace(last, dims=(2 ** 32, 2 ** 32, 2 ** 32))),
        "tensor-row-not-whole-blocks": tensors(replace("token_embd.weight", dims=(embd[1][0] + 1, embd[1][1]))),
        "embd-rows-plus-1": tensors(replace("token_embd.weight", dims=(embd[1][0], embd[1][1] + 1))),
        "tensor-offset-misaligned": tensors(replace(last, offset=src.tensors[-1][3] + 1)),
        "tensor-offset-past-end": tensors(replace(last, offset=src.data_size * 2)),
        "tensor-offset-huge": tensors(replace(last, offset=2 ** 64 - 32)),
        "tensors-overlap": tensors(replace(last, offset=0)),
    }
    out += [Case(name, lambda p, s=s: s.write(p)) for name, s in tensor_cases.items()]
    return out


def check_case(case: Case, folder: Path) -> dict:
    """Load one case through the Model (validator first, then llama.cpp); who refused, and how."""
    from edge_mtp.backend.model import Model
    from edge_mtp.errors import ModelError
    from edge_mtp.gguf_file import validate

    path = case.make(folder / f"{case.name}.gguf")
    t0 = time.perf_counter()
    result = {"case": case.name, "expect": case.expect}
    try:
        validate(path)
        by = "llama.cpp"
    except ModelError:
        by = "validator"
    try:
        Model(path).close()
        result.update(outcome="load", by=None)
    except ModelError as e:
        result.update(outcome="refuse", by=by, message=str(e))
    result["seconds"] = round(time.perf_counter() - t0, 3)
    result["ok"] = result["outcome"] == case.expect and "\n" not in result.get("message", "")
    path.unlink()
    return result


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries the
    maxrss of the process that started us across exec, so a child of a big pytest would report
    pytest's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 1024)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="a well-formed GGUF (e.g. the default model)")
    ap.add_argument("-o", "--out", type=Path, help="write the corpus here")
    ap.add_argument("--check", action="store_true", help="load every case; exit 1 if one is not refused")
    args = ap.parse_args()
    src = parse(args.model)
    corpus = cases(src)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for c in corpus:
            c.make(args.out / f"{c.name}.gguf")
        print(f"{len(corpus)} cases in {args.out}")
    if not args.check:
        return 0
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for c in corpus:
            r = check_case(c, Path(tmp))
            failed += not r["ok"]
            print(f"{'ok ' if r['ok'] else 'BAD'} {r['case']:<28} {r['outcome']:<6} by {r['by'] or '-':<9} "
                  f"{r['seconds']:6.3f}s  {r.get('message', '')}", flush=True)
    rss_mb = peak_rss_mb()
    print(f"{len(corpus)} cases, {failed} not as expected; peak RSS {rss_mb:.0f} MB")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
