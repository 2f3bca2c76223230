#!/usr/bin/env python3
"""Build and install the patched llama.cpp backend as the `llama_cpp` package.

The backend is llama.cpp exactly as vendored by llama-cpp-python 0.3.36 (b11312), plus our
additive patches in native/patches/ (applied in name order). The compiled wheel is cached under a
key made of the sdist checksum, the patch set and the build flags, so llama.cpp is compiled once
and re-installed from the cache until one of those changes.

Usage: python native/build.py [--force]    (extra cmake flags: CMAKE_ARGS="-DGGML_BLAS=ON ...")
Stdlib only: it runs before anything else is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
DEFAULT_CMAKE_ARGS = "-DLLAVA_BUILD=OFF"  # no multimodal projector library: we never load one
MARKER = "_edge_mtp_build.json"  # written into the llama_cpp package to tell which build it is
PATCH_DIR = Path(__file__).resolve().parent / "patches"


class BuildError(Exception):
    """A step of the build failed; the message names the step (and the patch, where one broke)."""


def say(msg: str) -> None:
    print(f"[edge-mtp backend] {msg}", flush=True)


def cache_root() -> Path:
    """The per-user cache shared with edge_mtp.models (EDGE_MTP_CACHE overrides XDG)."""
    if os.environ.get("EDGE_MTP_CACHE"):
        return Path(os.environ["EDGE_MTP_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "edge-mtp"


def patches() -> list[Path]:
    return sorted(PATCH_DIR.glob("*.patch"))


def cmake_args() -> str:
    return " ".join(a for a in (DEFAULT_CMAKE_ARGS, os.environ.get("CMAKE_ARGS", "")) if a)


def build_key() -> str:
    """Everything that changes the compiled library: source, patches, flags, platform."""
    h = hashlib.sha256()
    for part in (SDIST_SHA256, cmake_args(), sys.platform, platform.machine(),
                 f"{sys.version_info.major}.{sys.version_info.minor}"):
        h.update(part.encode() + b"\0")
    for p in patches():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def installed_key() -> str | None:
    """Key of the llama_cpp build in this environment, without importing it (no library load)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    marker = Path(list(spec.submodule_search_locations)[0]) / MARKER
    try:
        return json.loads(marker.read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def run(step: str, cmd: list[str], log: Path | None = None, **kw) -> None:
    """Run one command; on failure raise BuildError naming the step and showing the log's tail."""
    if log is None:
        res = subprocess.run(cmd, capture_output=True, text=True, **kw)
        out = res.stdout + res.stderr
    else:
        with open(log, "w") as fh:
            res = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True, **kw)
        out = log.read_text(errors="replace")
    if res.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-25:])
        where = f" (full log: {log})" if log else ""
        raise BuildError(f"step '{step}' failed{where}:\n{tail}")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(cache: Path) -> Path:
    """Download the pinned sdist once with pip and refuse it unless its sha256 matches the pin."""
    target = cache / "sdist" / SDIST
    if not target.exists():
        say(f"fetching {PACKAGE}=={VERSION} source with pip")
        with tempfile.TemporaryDirectory() as tmp:
            run("fetch sdist", [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                                ":all:", f"{PACKAGE}=={VERSION}", "-d", tmp])
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(Path(tmp) / SDIST), target)
    digest = sha256_of(target)
    if digest != SDIST_SHA256:
        target.unlink()
        raise BuildError(f"step 'verify sdist' failed: sha256 {digest} != pinned {SDIST_SHA256}")
    return target


def apply_patches(tree: Path) -> None:
    """Apply every patch to the vendored llama.cpp; the first one that does not apply stops us."""
    vendor = tree / "vendor" / "llama.cpp"
    for p in patches():
        say(f"applying {p.name}")
        try:
            run(f"apply patch {p.name}",
                ["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch", "-i", str(p)],
                cwd=vendor)
        except BuildError as e:
            raise BuildError(f"patch {p.name} does not apply to llama.cpp b11312: {e}") from None


def build_wheel(cache: Path, key: str) -> Path:
    sdist = fetch_sdist(cache)
    out_dir = cache / "backend" / key
    with tempfile.TemporaryDirectory(prefix="edge-mtp-build-") as tmp:
        tmp = Path(tmp)
        say("unpacking source")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(tmp)
        tree = tmp / SDIST.removesuffix(".tar.gz")
        apply_patches(tree)
        (tree / "llama_cpp" / MARKER).write_text(json.dumps(
            {"key": key, "patches": [p.name for p in patches()], "cmake_args": cmake_args()}))
        env = dict(os.environ, CMAKE_ARGS=cmake_args())
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        log = cache / "backend" / f"build-{key}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        say(f"compiling llama.cpp (a few minutes; CMAKE_ARGS='{env['CMAKE_ARGS']}'; log: {log})")
        wheels = tmp / "wheels"
        run("compile", [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels),
                        str(tree)], log=log, env=env)
        built = next(wheels.glob("*.whl"))
        out_dir.mkdir(parents=True, exist_ok=True)
        final = out_dir / built.name
        shutil.move(str(built), final.with_suffix(".partial"))
        os.replace(final.with_suffix(".partial"), final)  # a wheel in the cache is always complete
    return final


def install(force: bool = False) -> None:
    key = build_key()
    if not force and installed_key() == key:
        say(f"patched backend already installed (build {key})")
        return
    cache = cache_root()
    wheel = next((cache / "backend" / key).glob("*.whl"), None) if not force else None
    if wheel is None:
        wheel = build_wheel(cache, key)
    else:
        say(f"installing cached build {key}")
    run("install", [sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps",
                    str(wheel)])
    run("install dependencies", [sys.executable, "-m", "pip", "install", str(wheel)])
    if installed_key() != key:
        raise BuildError("step 'verify install' failed: llama_cpp does not carry the new build marker")
    say(f"patched backend installed (build {key}, patches: {', '.join(p.name for p in patches())})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    ap.add_argument("--print-key", action="store_true", help="print the build key and exit")
    args = ap.parse_args()
    if args.print_key:
        print(build_key())
        return 0
    try:
        install(force=args.force)
    except BuildError as e:
        print(f"edge-mtp: backend build failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
