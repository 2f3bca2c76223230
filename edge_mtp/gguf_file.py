"""GGUF files: one bounded scan of the header, and the checks a file passes before llama.cpp sees it.

GGUF loaders have had memory-safety bugs reachable from crafted headers (huge counts and string
lengths, tensor data outside the file, shapes that overflow; CVE-2024-21802, CVE-2024-23605,
CVE-2025-53630, CVE-2025-49847). The pinned llama.cpp checks most of this itself; edge-mtp checks
it again here, plus what llama.cpp only finds later or not at all (required tensors, a vocabulary
that matches the embedding matrix, DMTD keys), and refuses with one ModelError line. Every read is
checked against the bytes left in the file and every loop is bounded by the file's length, so a
malformed file costs at most one pass over its header: no crash, no hang, no oversized allocation.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ModelError
from .gguf_meta import DmtdConfig, validate_dmtd

VERSIONS = (2, 3)        # llama.cpp reads GGUF v2 and v3 (v1 is long gone)
MAX_NAME = 63            # GGML_MAX_NAME - 1: longest tensor name llama.cpp accepts
MAX_DIMS = 4
MAX_ELEMENTS = 2 ** 62   # per tensor: beyond this, byte sizes overflow int64
STRING, ARRAY = 8, 9
# value type -> struct format of the scalar types; 8 = string, 9 = array
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
MIN_KV_BYTES = 8 + 1 + 4 + 1           # key length, a 1-byte key, type, smallest value
MIN_TENSOR_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, one dim, type, offset


class _Bad(Exception):
    """A structural fault at a byte offset; becomes one ModelError line."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: the GGUF dims reversed (rows, ..., row length)
    qtype: int              # ggml type id
    offset: int             # absolute byte offset of the data in the file
    nbytes: int


@dataclass
class Header:
    """What the scan read: the wanted metadata values, the count of every array, the tensors."""
    version: int
    fields: dict                     # key -> python value, for the keys that were wanted
    types: dict                      # key -> GGUF value type, for every key
    array_lengths: dict              # key -> element count, for every array key
    tensors: list[TensorInfo] = field(default_factory=list)
    alignment: int = 32
    data_start: int = 0
    dmtd: DmtdConfig | None = None   # after check(): the validated dmtd.* split, if any

    @property
    def architecture(self) -> str | None:
        arch = self.fields.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def tensor(self, name: str) -> TensorInfo | None:
        return next((t for t in self.tensors if t.name == name), None)


def _scan(buf, size: int, wanted) -> Header:
    length = struct.Struct("<Q").unpack_from

    def need(off: int, n: int, what: str) -> None:
        if n < 0 or off + n > size:
            raise _Bad(f"{what} at byte {off} runs past the end of the file ({size} bytes)")

    def unpack(fmt: str, off: int, what: str):
        n = struct.calcsize(fmt)
        need(off, n, what)
        return struct.unpack_from(fmt, buf, off), off + n

    def string(off: int, what: str) -> tuple[bytes, int]:
        (n,), off = unpack("<Q", off, what)
        need(off, n, f"{what} of {n} bytes")
        return bytes(buf[off:off + n]), off + n

    def skip_string(off: int, what: str) -> int:
        (n,), off = unpack("<Q", off, what)
        need(off, n, f"{what} of {n} bytes")
        return off + n

    def value(t: int, off: int, keep: bool, key: str):
        if t == STRING:
            if not keep:
                return None, skip_string(off, f"value of {key}")
            raw, off = string(off, f"value of {key}")
            return raw.decode("utf-8", errors="replace"), off
        if t in SCALARS:
            (v,), off = unpack("<" + SCALARS[t], off, f"value of {key}")
            return v, off
        raise _Bad(f"key {key} has unknown value type {t}")

    (magic,), off = unpack("<4s", 0, "magic")
    if magic != b"GGUF":
        raise _Bad(f"not a GGUF file (magic {magic!r})")
    (version, n_tensors, n_kv), off = unpack("<IQQ", off, "header")
    if version not in VERSIONS:
        raise _Bad(f"GGUF version {version} is not supported (only {' and '.join(map(str, VERSIONS))})")
    if n_kv > (size - off) // MIN_KV_BYTES:
        raise _Bad(f"header claims {n_kv} metadata keys, more than a {size}-byte file can hold")
    if n_tensors > (size - off) // MIN_TENSOR_BYTES:
        raise _Bad(f"header claims {n_tensors} tensors, more than a {size}-byte file can hold")

    header = Header(version, {}, {}, {})
    for i in range(n_kv):
        raw, off = string(off, f"key {i}")
        try:
            key = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"key {i} is not UTF-8 text") from None
        if not key:
            raise _Bad(f"key {i} is empty")
        if key in header.types:
            raise _Bad(f"duplicate metadata key {key}")
        (t,), off = unpack("<I", off, f"type of {key}")
        header.types[key] = t
        keep = wanted(key) or key in ("general.architecture", "general.alignment") or \
            key.endswith(".block_count")
        if t != ARRAY:
            v, off = value(t, off, keep, key)
            if keep:
                header.fields[key] = v
            continue
        (et, n), off = unpack("<IQ", off, f"array header of {key}")
        header.array_lengths[key] = n
        if et == STRING:
            if n > (size - off) // 8:
                raise _Bad(f"array {key} claims {n} strings, more than the file holds")
            items = []
            if keep:
                for _ in range(n):
                    s, off = value(STRING, off, True, key)
                    items.append(s)
            else:  # the hot loop of a tokenizer's 50k-250k strings: lengths only
                try:
                    for _ in range(n):
                        off += 8 + length(buf, off)[0]
                except (struct.error, OverflowError):  # a length ran off the end (or past 2^63)
                    off = size + 1
                need(off, 0, f"array {key} of {n} strings")
        elif et in SCALARS:
            width = struct.calcsize(SCALARS[et])
            need(off, n * width, f"array {key} of {n} values")
            items = list(struct.unpack_from(f"<{n}{SCALARS[et]}", buf, off)) if keep else []
            off += n * width
        else:
            raise _Bad(f"array {key} has element type {et} (nested or unknown)")
        if keep:
            header.fields[key] = items

    align = header.fields.get("general.alignment", 32)
    if header.types.get("general.alignment", 4) != 4 or align <= 0 or align & (align - 1):
        raise _Bad(f"general.alignment must be a power of two stored as uint32, got {align!r}")
    header.alignment = align

    infos = []
    for i in range(n_tensors):
        raw, off = string(off, f"tensor name {i}")
        name = raw.decode("utf-8", errors="replace")
        if not raw or len(raw) > MAX_NAME:
            raise _Bad(f"tensor {i} has a name of {len(raw)} bytes (1..{MAX_NAME} allowed)")
        (n_dims,), off = unpack("<I", off, f"dimensions of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Bad(f"tensor {name} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        dims, off = unpack(f"<{n_dims}q", off, f"shape of {name}")
        (qtype, rel), off = unpack("<IQ", off, f"type and offset of {name}")
        elements = 1
        for d in dims:
            if d < 0:
                raise _Bad(f"tensor {name} has a negative dimension {d}")
            elements *= d
            if elements > MAX_ELEMENTS:
                raise _Bad(f"tensor {name} has a shape {dims} whose size overflows")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise _Bad(f"tensor {name} has unknown ggml type {qtype}") from None
        if dims[0] % block:
            raise _Bad(f"tensor {name}: rows of {dims[0]} values do not fill whole "
                       f"{GGMLQuantizationType(qtype).name} blocks of {block}")
        infos.append((name, tuple(reversed(dims)), qtype, rel, elements // block * type_size))

    names = set()
    data_start = -(-off // align) * align
    expected = 0
    for name, shape, qtype, rel, nbytes in infos:
        if name in names:
            raise _Bad(f"duplicate tensor name {name}")
        names.add(name)
        if rel != expected:  # llama.cpp requires the data in header order, each aligned, no gaps
            raise _Bad(f"tensor {name} has data offset {rel}, expected {expected}")
        if data_start + rel + nbytes > size:
            raise _Bad(f"tensor {name} ({nbytes} bytes at {data_start + rel}) runs past the end "
                       f"of the file ({size} bytes); the file is truncated")
        header.tensors.append(TensorInfo(name, shape, qtype, data_start + rel, nbytes))
        expected = -(-(rel + nbytes) // align) * align
    header.data_start = data_start
    return header


def scan(data, wanted=lambda key: False, name: str = "model") -> Header:
    """Scan GGUF header bytes (bytes, mmap or memoryview of the whole file); decode the metadata
    values `wanted(key)` accepts (and the architecture, alignment and block count), skip the rest.
    ModelError naming `name` for anything malformed."""
    try:
        return _scan(data, len(data), wanted)
    except _Bad as e:
        raise ModelError(f"{name}: {e}") from None


def read_header(path: str | Path, wanted=lambda key: False) -> Header:
    """scan() of a file, mapped rather than read (a model is gigabytes, its header kilobytes)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            if fh.seek(0, 2) == 0:
                raise ModelError(f"{path.name}: the file is empty")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                buf = memoryview(mm)
                try:
                    return scan(buf, wanted, path.name)
                finally:
                    buf.release()
    except IsADirectoryError:
        raise ModelError(f"{path}: is a directory, not a GGUF file") from None
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{path.name}: cannot read the file ({e})") from None


def validate(path: str | Path, wanted=lambda key: False) -> Header:
    """read_header and check(): what edge-mtp runs on every model file before llama.cpp loads it.
    The returned Header carries the decoded `wanted` keys and the DMTD split."""
    path = Path(path)
    return check(read_header(path, lambda k: wanted(k) or checked(k)), path.name)


def checked(key: str) -> bool:
    """The metadata keys check() needs decoded: dmtd.*, the special token ids and the file type."""
    return key.startswith("dmtd.") or key == "general.type" or \
        (key.startswith("tokenizer.ggml.") and key.endswith("_token_id"))


def check(h: Header, name: str = "model") -> Header:
    """What a language model needs beyond a well-formed header: an architecture, a layer count
    with tensors for every layer, a token-embedding matrix whose rows match the vocabulary, and
    sane dmtd.* keys (h must have been scanned with the `checked` keys wanted)."""

    def bad(msg: str):
        return ModelError(f"{name}: {msg}")

    if h.fields.get("general.type") == "adapter":
        raise bad("is a LoRA adapter, not a model; load it with --lora over its base model")
    arch = h.architecture
    if arch is None:
        raise bad("general.architecture is missing or not a string")
    n_layer = h.fields.get(f"{arch}.block_count")
    if not isinstance(n_layer, int) or isinstance(n_layer, bool) or not 1 <= n_layer <= 100_000:
        raise bad(f"{arch}.block_count is missing or invalid ({n_layer!r})")
    layers = {int(t.name.split(".")[1]) for t in h.tensors
              if t.name.startswith("blk.") and t.name.split(".")[1].isdigit()}
    missing = [i for i in range(n_layer) if i not in layers]
    if missing:
        raise bad(f"layer {missing[0]} of {n_layer} has no tensors (the file is incomplete)")
    embd = h.tensor("token_embd.weight")
    if embd is None:
        raise bad("the token-embedding tensor token_embd.weight is missing")
    n_vocab = h.array_lengths.get("tokenizer.ggml.tokens")
    if n_vocab is None:
        raise bad("the vocabulary tokenizer.ggml.tokens is missing")
    if len(embd.shape) != 2 or embd.shape[0] != n_vocab:
        raise bad(f"the vocabulary has {n_vocab} tokens but token_embd.weight has shape "
                  f"{embd.shape} (rows must equal the vocabulary size)")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if key in h.array_lengths and h.array_lengths[key] != n_vocab:
            raise bad(f"{key} has {h.array_lengths[key]} entries for {n_vocab} tokens")
    for key, v in h.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and \
                (not isinstance(v, int) or not 0 <= v < n_vocab):
            raise bad(f"{key} = {v!r} is not a token of the {n_vocab}-token vocabulary")
    output = h.tensor("output.weight")
    if output is not None and (len(output.shape) != 2 or output.shape != embd.shape):
        raise bad(f"output.weight has shape {output.shape}, token_embd.weight {embd.shape}")
    h.dmtd = validate_dmtd(h.fields, n_layer, name)
    return h


def validate_adapter(path: str | Path, architecture: str, n_layer: int) -> DmtdConfig | None:
    """What a LoRA adapter passes before llama.cpp reads it over a base model of `architecture`
    with `n_layer` layers: a well-formed header, general.type "adapter", the base's architecture
    and dmtd.* keys that add up to the base's layers (returned, None without). llama.cpp checks
    the rest against the base itself (adapter.type, tensor names and shapes) and says why it
    refuses them."""
    path = Path(path)
    h = read_header(path, lambda k: k == "general.type" or k.startswith("dmtd."))
    kind = h.fields.get("general.type")
    if kind != "adapter":
        raise ModelError(f"{path.name}: not a LoRA adapter (general.type is {kind!r}, not "
                         "'adapter'); give the model with -m and its adapter with --lora")
    if h.architecture != architecture:
        raise ModelError(f"{path.name}: a LoRA adapter for {h.architecture}, but the base model "
                         f"is {architecture}")
    return validate_dmtd(h.fields, n_layer, path.name)
