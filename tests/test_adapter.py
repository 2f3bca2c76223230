"""LoRA adapters applied at load: the runtime with an adapter computes what the merged weights
compute, DMTD runs through an adapter that carries the dmtd.* keys, bad adapters are refused with
one line, and a known model can be a shipped adapter over a pulled base.

Tiny random F32 llama models (tools/tiny_model.py) and random adapters (tools/lora_gguf.py); the
merged twin is the base with W + alpha / rank * b @ a written into its weights.
"""
import dataclasses
import hashlib
import json

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from edge_mtp import Engine, models
from edge_mtp.backend import Model, Session
from edge_mtp.cli import main
from edge_mtp.errors import ModelError
from edge_mtp.generation import Generation
from edge_mtp.gguf_meta import DmtdConfig
from edge_mtp.profile import profile_key, scratch
from edge_mtp.sampling import Sampler, SamplingParams
from edge_mtp.strategies.dmtd import Dmtd

from conftest import load_tool

PROMPT = "Once upon a time, in a land far away, there lived"
SPLIT = DmtdConfig(0, 2, 2, 4)


@pytest.fixture(scope="module")
def lora():
    return load_tool("lora_gguf")


@pytest.fixture(scope="module")
def files(tmp_path_factory, model_path, lora):
    """files(name) -> path: a 4-layer F32 llama base without dmtd.* keys, adapters over it (rank
    4, all seven matrices of layers 1-3, alpha 2: a scale of 0.5) and their merged twins."""
    tiny = load_tool("tiny_model")
    d = tmp_path_factory.mktemp("lora")
    f32 = gguf.GGMLQuantizationType.F32
    base = tiny.write_tiny_model(d / "base.gguf", model_path, "llama", n_layer=4, seed=3, qtype=f32)
    pairs = lora.random_pairs(base, range(1, 4), rank=4, seed=5)
    out = {"base": base,
           "dmtd-base": tiny.write_tiny_model(d / "dmtd-base.gguf", model_path, "llama", n_layer=4,
                                              seed=3, qtype=f32, extra_kv=SPLIT.kv())}
    out["lora"] = lora.write_lora_adapter(d / "lora.gguf", "llama", pairs, alpha=2.0)
    out["lora-f16"] = lora.write_lora_adapter(d / "lora-f16.gguf", "llama", pairs, alpha=2.0,
                                              dtype=np.float16)
    out["dmtd-lora"] = lora.write_lora_adapter(d / "dmtd-lora.gguf", "llama", pairs, alpha=2.0,
                                               extra_kv=SPLIT.kv())
    for name in ("lora", "lora-f16"):
        out[f"merged-{name}"] = lora.write_merged(base, out[name], d / f"merged-{name}.gguf")
    return out.__getitem__


def prompt_logits(path, lora_path=None) -> np.ndarray:
    """Logits of every prompt row, float32 K/V and no flash attention (no float16 rounding)."""
    model = Model(path, lora=lora_path)
    session = Session(model, n_ctx=128, n_threads=1, flash_attn=False, f32_cache=True)
    try:
        return session.decode(model.tokenize(PROMPT), logits="all").copy()
    finally:
        session.close()
        model.close()


# -- the adapter computes what the merged weights compute ---------------------------------------
@pytest.mark.parametrize("adapter, tolerance", [("lora", 1e-4), ("lora-f16", 5e-3)])
def test_adapter_gives_the_logits_of_the_merged_weights(files, adapter, tolerance):
    """F32 adapter: the merged model's logits to float32 rounding. F16: llama.cpp rounds the
    activations to float16 for the adapter's matmuls, so only close."""
    with_adapter = prompt_logits(files("base"), files(adapter))
    merged = prompt_logits(files(f"merged-{adapter}"))
    base = prompt_logits(files("base"))
    assert np.abs(with_adapter - merged).max() < tolerance
    assert np.abs(with_adapter - base).max() > 0.5  # the adapter does change the model


def test_dmtd_through_an_adapter_equals_the_reference_on_merged_weights(files):
    """A base without dmtd.* keys + an adapter that carries them (E0 T2 D2 C4, LoRA on a thinking
    and both decoding layers): 64 greedy DMTD tokens at tau 1..4 equal the numpy reference's on
    the merged weights, so every pass (gated heads, late-only layer ranges) applies the adapter."""
    reference = load_tool("dmtd_reference")
    model = Model(files("base"), lora=files("dmtd-lora"))
    assert model.dmtd == SPLIT
    session = Session(model, n_ctx=256, n_threads=1, flash_attn=False, f32_cache=True)
    prompt = model.tokenize(PROMPT)
    for tau in (1, 2, 3, 4):
        gen = Generation(session, Dmtd(tau), Sampler(SamplingParams(temperature=0)), prompt, 64)
        gen.run()
        want, margins = reference.dmtd_generate(files("merged-lora"), prompt, 64, tau, SPLIT)
        assert min(margins) > 1e-4, f"tau {tau}: a near-tie makes this run no test"
        assert gen.tokens == want, f"tau {tau}"
    session.close()
    model.close()


def test_scratch_contexts_and_speculation_run_with_the_adapter(files):
    """profile.py's scratch context computes with the adapter, its profile is not the base's, and
    a lossless strategy stays token-identical to plain decoding over the adapter."""
    with Engine(str(files("base")), lora=str(files("lora")), n_ctx=512, n_threads=1,
                strategy="plain") as e, \
            Engine(str(files("base")), n_ctx=512, n_threads=1, strategy="plain") as b:
        assert e.model_name.endswith("base.gguf+lora")
        tokens = e.model.tokenize(PROMPT)
        want = e.session.decode(tokens, logits="all").copy()
        with scratch(e.session, 128) as s:
            assert np.array_equal(s.decode(tokens, logits="all"), want)
        assert profile_key(e.session) != profile_key(b.session)
        plain = e.generate(PROMPT, 32, temperature=0)
        probe = e.generate(PROMPT, 32, temperature=0, strategy="probe:4")
        assert probe["speculation"]["drafted"] > 0 and probe["tokens"] == plain["tokens"]
        assert plain["tokens"] != b.generate(PROMPT, 32, temperature=0)["tokens"]


# -- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case, message", [
    ("not-an-adapter", "base.gguf: not a LoRA adapter (general.type is None"),
    ("arch", "qwen3.gguf: a LoRA adapter for qwen3, but the base model is llama"),
    ("shape", "tensor 'blk.0.attn_q.weight' has incorrect shape"),
    ("dmtd", "E0 + T2 + D3 = 5 do not add up to the model's 4 layers"),
    ("missing", "nothing.gguf: no such file"),
    ("two-splits", "dmtd-lora.gguf: carries dmtd.* keys and so does its base dmtd-base.gguf"),
    ("adapter-as-model", "lora.gguf: is a LoRA adapter, not a model"),
])
def test_bad_adapters_are_refused_in_one_line(files, lora, tmp_path, case, message):
    base, adapter = files("base"), tmp_path / f"{case}.gguf"
    rank4 = (np.zeros((4, 64)), np.zeros((64, 4)))
    if case == "not-an-adapter":
        adapter = base
    elif case == "arch":
        adapter = lora.write_lora_adapter(tmp_path / "qwen3.gguf", "qwen3", {"blk.0.attn_q.weight": rank4}, 4)
    elif case == "shape":
        wrong = (np.zeros((4, 32)), np.zeros((64, 4)))
        lora.write_lora_adapter(adapter, "llama", {"blk.0.attn_q.weight": wrong}, 4)
    elif case == "dmtd":
        lora.write_lora_adapter(adapter, "llama", {"blk.0.attn_q.weight": rank4}, 4,
                                extra_kv=DmtdConfig(0, 2, 3, 4).kv())
    elif case == "missing":
        adapter = tmp_path / "nothing.gguf"
    elif case == "two-splits":
        base, adapter = files("dmtd-base"), files("dmtd-lora")
    elif case == "adapter-as-model":
        base, adapter = files("lora"), None
    with pytest.raises(ModelError) as e:
        Model(base, lora=adapter)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    r = CliRunner().invoke(main, ["generate", "-m", str(base), *(["--lora", str(adapter)] if adapter else []),
                                  "-p", "hi", "-n", "1", "--strategy", "plain"])
    assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, r.output


def test_cli_applies_lora(files):
    def run(*extra):
        r = CliRunner().invoke(main, ["generate", "-m", str(files("base")), *extra, "-p", PROMPT,
                                      "-n", "8", "--temp", "0", "--strategy", "plain", "--json", "-t", "1"])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    with Engine(str(files("base")), lora=str(files("lora")), n_ctx=512, n_threads=1) as e:
        want = e.generate(PROMPT, 8, temperature=0, strategy="plain")["tokens"]
    r = run("--lora", str(files("lora")))
    assert r["tokens"] == want and r["model"].endswith("base.gguf+lora")
    assert run()["tokens"] != want
    r = CliRunner().invoke(main, ["calibrate", "-m", str(files("base")), "--lora", str(files("dmtd-base")), "--show"])
    assert r.exit_code == 2 and "not a LoRA adapter" in r.output, r.output


def test_bench_refuses_a_peer_that_would_run_without_the_adapter(files, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["Hi"]}) + "\n")
    r = CliRunner().invoke(main, ["bench", "-m", str(files("base")), "--lora", str(files("lora")),
                                  "--data", str(data), "--peer", "llama-server", "-t", "1"])
    assert r.exit_code == 2 and "cannot compare a model with a LoRA adapter" in r.output, r.output


# -- a known model that is an adapter over a known base -------------------------------------------
def test_the_dmtd_manifest_resolves_to_base_and_adapter(model_path):
    m = models.manifests()["smollm2-135m-dmtd"]
    assert isinstance(m, models.AdapterManifest) and m.base == "smollm2-135m"
    assert m.license == "Apache-2.0" and "DMTD LoRA adapter" in m.description
    adapter = models.manifest_dir() / m.adapter
    assert models.resolve("smollm2-135m-dmtd") == models.ModelFiles(model_path, adapter)
    assert models.pull("smollm2-135m-dmtd", progress=False) == model_path
    r = CliRunner().invoke(main, ["pull", "smollm2-135m-dmtd"])
    assert r.exit_code == 0 and r.output.strip() == f"{model_path} + LoRA adapter {adapter}", r.output
    r = CliRunner().invoke(main, ["models"])
    row = next(line for line in r.output.splitlines() if line.startswith("smollm2-135m-dmtd "))
    assert "cached" in row and m.license in row and m.description in row
    with pytest.raises(ModelError, match="is a LoRA adapter over smollm2-135m, not one model file"):
        models.resolve_model("smollm2-135m-dmtd")
    with pytest.raises(ModelError, match="already is smollm2-135m with a LoRA adapter"):
        models.resolve("smollm2-135m-dmtd", lora=adapter)
    model = Model(model_path, lora=adapter)  # the shipped adapter fits the real base
    assert model.dmtd == DmtdConfig(0, 22, 8, 4)
    model.close()


def test_a_damaged_adapter_is_refused_in_one_line(tmp_path, monkeypatch):
    m, base = models.manifests()["smollm2-135m-dmtd"], models.manifests()["smollm2-135m"]
    data = bytearray((models.manifest_dir() / m.adapter).read_bytes())
    assert len(data) == m.adapter_size and hashlib.sha256(data).hexdigest() == m.adapter_sha256
    data[-1] ^= 1  # same size, one bit off
    (tmp_path / m.adapter).write_bytes(data)
    monkeypatch.setattr(models, "manifest_dir", lambda: tmp_path)
    monkeypatch.setattr(models, "manifests", lambda: {m.name: m, base.name: base})
    for call in (lambda: models.resolve(m.name), lambda: models.pull(m.name, progress=False)):
        with pytest.raises(ModelError, match="its adapter .* is damaged") as e:
            call()
        assert "\n" not in str(e.value)
    monkeypatch.setattr(models, "manifests", lambda: {m.name: dataclasses.replace(m, adapter="gone.gguf"),
                                                      base.name: base})
    with pytest.raises(ModelError, match="its adapter .*gone.gguf is missing"):
        models.resolve(m.name)

