#!/usr/bin/env python3
"""Exact rows on ARM, checked without ARM hardware: cross-build the patched llama.cpp for aarch64,
run tools/exact_rows_check.cpp under qemu-user on a small generated model in every weight type,
and print batch rows vs one-row decodes (0 = bit-identical) with exact rows on, and stock for
comparison.

    apt-get install g++-aarch64-linux-gnu qemu-user     # Debian's cross compiler and qemu-user
    python tools/arm_exactness.py [--arch armv8.6-a+dotprod+i8mm] [--types F32,Q4_0,...]
    python tools/arm_exactness.py --arch armv8.2-a+dotprod+fp16 --qemu-cpu cortex-a76   # no i8mm

Not part of CI: the cross build takes about as long as the native one. Speed under emulation means
nothing, so nothing here is timed. The model is random weights (tools/tiny_model.py, width 256 so
every K-quant applies; `--width 224` gives rows of 7 blocks of 32, an odd count, for the kernels
that take blocks in pairs) written per type with llama.cpp's quantizer on this machine; qemu runs
with `-cpu max`, which reports dotprod, i8mm and SVE, so ggml picks its ARM repacked and mmla
kernels (Q4_0 and Q8_0 as 4x8, the K-quants as 8x8) as a recent ARM CPU would; `--qemu-cpu
cortex-a76` (dotprod, no i8mm) with a build for that CPU takes the 4x4 and 8x4 layouts instead.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_mtp.backend import WEIGHT_TYPES, quantize_model  # noqa: E402
from edge_mtp.models import cache_dir, resolve_model  # noqa: E402

CROSS = "aarch64-linux-gnu"
SYSROOT = Path("/usr") / CROSS


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run(cmd: list[str], log: Path, **kw) -> None:
    with open(log, "a") as fh:
        if subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, **kw).returncode != 0:
            sys.exit(f"step failed: {' '.join(cmd[:3])} ... (log: {log})")


def cross_build(work: Path, arch: str, log: Path) -> Path:
    """libllama for aarch64 from the pinned source with our patches; the build folder (cached by
    the native build's key, so a changed patch gets a fresh tree and build)."""
    build = load(ROOT / "native" / "build.py", "edge_mtp_native_build")
    key = build.build_key()
    tree = work / f"src-{key}"
    for stale in [*work.glob("src*"), *work.glob("build*")]:  # trees and builds of other patch sets
        if stale.is_dir() and not stale.name.startswith((f"src-{key}", f"build-{key}-")):
            shutil.rmtree(stale)
    if not tree.exists():
        with tarfile.open(build.fetch_sdist(build.cache_root())) as tar:
            tar.extractall(work / "unpack", filter="data")
        (work / "unpack" / build.SDIST.removesuffix(".tar.gz")).rename(tree)
        build.apply_patches(tree)
    out = work / f"build-{key}-{re.sub(r'[^A-Za-z0-9]+', '-', arch)}"
    if not (out / "bin" / "libllama.so").exists():
        print(f"cross-building llama.cpp for aarch64 ({arch}); log: {log}", flush=True)
        run(["cmake", "-S", str(tree / "vendor" / "llama.cpp"), "-B", str(out), "-G", "Ninja",
             "-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
             f"-DCMAKE_C_COMPILER={CROSS}-gcc", f"-DCMAKE_CXX_COMPILER={CROSS}-g++",
             "-DGGML_NATIVE=OFF", f"-DGGML_CPU_ARM_ARCH={arch}", "-DGGML_OPENMP=OFF",
             "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF"], log)
        run(["cmake", "--build", str(out), "--target", "llama"], log)
    checker = out / "exact_rows_check"
    src = tree / "vendor" / "llama.cpp"
    run([f"{CROSS}-g++", "-O2", "-std=c++17", str(ROOT / "tools" / "exact_rows_check.cpp"),
         f"-I{src / 'include'}", f"-I{src / 'ggml' / 'include'}", f"-L{out / 'bin'}",
         "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{out / 'bin'}", "-o", str(checker)], log)
    return checker


def models(work: Path, types: list[str], width: int) -> dict[str, Path]:
    tiny = load(ROOT / "tools" / "tiny_model.py", "edge_mtp_tiny_model")
    import gguf

    base = work / f"tiny-llama-{width}.F32.gguf"
    if not base.exists():
        tiny.write_tiny_model(base, resolve_model("smollm2-135m"), arch="llama", n_layer=2, n_embd=width,
                              n_head=4, n_head_kv=2, n_ff=512, qtype=gguf.GGMLQuantizationType.F32)
    out = {}
    for t in types:
        path = work / f"tiny-llama-{width}.{t}.gguf"
        if not path.exists():
            quantize_model(base, path, t)
        out[t] = path
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="armv8.6-a+dotprod+i8mm", help="GGML_CPU_ARM_ARCH of the cross build")
    ap.add_argument("--qemu-cpu", default="max", help="qemu-aarch64 -cpu (cortex-a76: dotprod without i8mm)")
    ap.add_argument("--width", type=int, default=256, help="model width (a multiple of 32; 256 for the K-quants)")
    ap.add_argument("--types", default=",".join(WEIGHT_TYPES))
    ap.add_argument("--sizes", default="2,3,4,8,16")
    ap.add_argument("--context", type=int, default=48)
    ap.add_argument("--work", type=Path, default=cache_dir() / "arm-check")
    args = ap.parse_args()
    missing = [tool for tool in (f"{CROSS}-g++", "qemu-aarch64", "cmake", "ninja") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: apt-get install g++-aarch64-linux-gnu qemu-user cmake ninja-build")
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "build.log"
    checker = cross_build(args.work, args.arch, log)
    failed = False
    sizes = args.sizes.split(",")
    print(f"aarch64 ({args.arch}) under qemu-aarch64 -cpu {args.qemu_cpu}, width {args.width}; max abs logit difference, batch rows vs "
          f"one-row decodes after {args.context} tokens (0: bit-identical, *: some row differs)\n")
    print("| weights | exact rows | flash attn | " + " | ".join(f"n={n}" for n in sizes) + " |")
    print("|---|---|---|" + "---|" * len(sizes))
    for t, path in models(args.work, args.types.split(","), args.width).items():
        for mode in ("exact", "stock"):
            res = subprocess.run(["qemu-aarch64", "-cpu", args.qemu_cpu, "-L", str(SYSROOT), str(checker), str(path),
                                  args.sizes, str(args.context), "2", mode], capture_output=True, text=True)
            if res.returncode == 2 or not res.stdout:
                sys.exit(f"{t} ({mode}): the checker failed: {res.stderr.strip()}")
            rows = re.findall(r"flash_attn=(\w+) n=(\d+) max_abs_diff=(\S+) rows_differing=(\d+)", res.stdout)
            for fa in ("on", "off"):
                cells = [f"{float(d):.3g}{'*' if int(k) else ''}" for f, _, d, k in rows if f == fa]
                print(f"| {t} | {'on' if mode == 'exact' else 'off (stock)'} | {fa} | " + " | ".join(cells) + " |",
                      flush=True)
            failed = failed or (mode == "exact" and res.returncode != 0)
    print("\nexact rows: " + ("some batch row differs from its one-row decode" if failed else
                              "every batch row bit-identical to its one-row decode"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
