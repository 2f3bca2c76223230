"""The native build pipeline: patch application, cache key, and the installed build's identity."""
import importlib.util
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("edge_mtp_native_build", ROOT / "native" / "build.py")
build = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = build
spec.loader.exec_module(build)


def fake_tree(tmp_path: Path) -> Path:
    vendor = tmp_path / "tree" / "vendor" / "llama.cpp"
    vendor.mkdir(parents=True)
    (vendor / "a.txt").write_text("one\ntwo\nthree\n")
    return tmp_path / "tree"


GOOD = """--- a/a.txt
+++ b/a.txt
@@ -1,3 +1,3 @@
 one
-two
+TWO
 three
"""
BROKEN = GOOD.replace(" one\n-two", " uno\n-dos")


def test_patches_apply_in_order(tmp_path, monkeypatch):
    pdir = tmp_path / "patches"
    pdir.mkdir()
    (pdir / "0001-good.patch").write_text("what and why\n\n" + GOOD)
    monkeypatch.setattr(build, "PATCH_DIR", pdir)
    tree = fake_tree(tmp_path)
    build.apply_patches(tree)
    assert (tree / "vendor" / "llama.cpp" / "a.txt").read_text() == "one\nTWO\nthree\n"


def test_a_broken_patch_stops_the_build_naming_it(tmp_path, monkeypatch):
    pdir = tmp_path / "patches"
    pdir.mkdir()
    (pdir / "0001-good.patch").write_text(GOOD)
    (pdir / "0002-broken.patch").write_text(BROKEN)
    monkeypatch.setattr(build, "PATCH_DIR", pdir)
    with pytest.raises(build.BuildError, match="0002-broken.patch"):
        build.apply_patches(fake_tree(tmp_path))


def test_build_key_follows_patches_and_flags(tmp_path, monkeypatch):
    pdir = tmp_path / "patches"
    pdir.mkdir()
    (pdir / "0001-good.patch").write_text(GOOD)
    monkeypatch.setattr(build, "PATCH_DIR", pdir)
    k1 = build.build_key()
    assert build.build_key() == k1
    (pdir / "0001-good.patch").write_text(GOOD + "\n")
    k2 = build.build_key()
    assert k2 != k1
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_BLAS=ON")
    assert build.build_key() != k2


def test_installed_backend_is_this_checkouts_build():
    """The llama_cpp in this environment was built from exactly native/patches (else: rebuild)."""
    assert build.installed_key() == build.build_key()


def test_our_patches_apply_to_the_pinned_source(tmp_path):
    """Every patch applies to the real vendored llama.cpp (checked on the cached pinned sdist)."""
    sdist = build.cache_root() / "sdist" / build.SDIST
    if not sdist.exists():
        pytest.skip("pinned sdist not in the cache (native/build.py fetches it)")
    assert build.sha256_of(sdist) == build.SDIST_SHA256
    touched = set()
    for p in build.patches():
        touched |= {line[6:].strip() for line in p.read_text().splitlines() if line.startswith("+++ b/")}
    prefix = build.SDIST.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.removeprefix(prefix) in touched]
        tar.extractall(tmp_path, members=members)
    build.apply_patches(tmp_path / build.SDIST.removesuffix(".tar.gz"))
