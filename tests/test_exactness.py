"""Exact rows (native patches P4-P6): every row of a batch (n = 2..64) computes bit for bit what
the same token computes decoded alone, for the default model (Q4_1), its F32 variant (llamafile
sgemm without P5), its F16 and BF16 variants (P14's and P18's dots), its Q5_K_M variant (P15's
two-column and P16's columns Q5_K kernels, in its 1536-wide ffn_down), its Q4_0 variant
(repacked, P17's rows kernel) and Gemma 3 270M Q4_K_M (repacked K-quant weights), flash attention
on and off; one-row decoding is the same with the mode on or off; and so speculation on the F32
variant and on Gemma gives plain greedy's tokens (see docs/exactness.md).
"""
import time

import numpy as np
import pytest

from edge_mtp import Engine
from edge_mtp.backend import Model, Session, quantize_model
from edge_mtp.models import resolve_model

from conftest import load_tool
from test_strategies import FALLBACK_PROMPTS

SIZES = (2, 3, 4, 8, 16, 32, 64)
MATRIX_TOKENS = 32  # 8 short prompts x 3 runs x 2 models stay within the suite's time budget
batch_vs_sequential = load_tool("exactness_table").batch_vs_sequential


def default_model_as(tmp_path_factory, model_path, weight_type: str):
    """The default model converted by llama.cpp's quantizer (F32: about 540 MB, a few seconds)."""
    t0 = time.perf_counter()
    path = quantize_model(model_path, tmp_path_factory.mktemp(weight_type.lower()) / f"smollm2-135m.{weight_type}.gguf",
                          weight_type)
    print(f"{weight_type} variant written in {time.perf_counter() - t0:.1f} s")
    return path


@pytest.fixture(scope="session")
def f32_model_path(tmp_path_factory, model_path):
    return default_model_as(tmp_path_factory, model_path, "F32")


@pytest.fixture(scope="module", params=["default", "f32", "f16", "bf16", "q5_k_m", "q4_0", "gemma3-270m"])
def model(request, tmp_path_factory, model_path):
    if request.param == "f32":
        path = request.getfixturevalue("f32_model_path")
    elif request.param == "gemma3-270m":
        path = resolve_model("gemma3-270m")
    elif request.param == "default":
        path = model_path
    else:  # f16 (P14's dots), bf16 (P18's, on AVX512-BF16), q5_k_m (P15's, P16's: its 1536-wide
        # ffn_down), q4_0 (P17's rows)
        path = default_model_as(tmp_path_factory, model_path, request.param.upper())
    m = Model(path)
    yield m
    m.close()


@pytest.mark.parametrize("flash_attn", [True, False], ids=["flash", "no-flash"])
def test_batch_rows_equal_single_rows(model, flash_attn):
    s = Session(model, n_ctx=512, n_threads=2, flash_attn=flash_attn, exact_rows=True)
    rng = np.random.default_rng(1)
    context = rng.integers(100, model.n_vocab - 1, size=200).tolist()
    tokens = rng.integers(100, model.n_vocab - 1, size=max(SIZES)).tolist()
    diffs = batch_vs_sequential(s, context, tokens, SIZES)
    s.close()
    assert {n: d for n, (d, _) in diffs.items()} == {n: 0.0 for n in SIZES}


def test_exact_rows_leave_single_token_decoding_unchanged(model):
    """Under 512 cached cells one-row decodes take the same kernels with exact rows on or off."""
    tokens = np.random.default_rng(2).integers(100, model.n_vocab - 1, size=24).tolist()
    logits = []
    for exact in (False, True):
        s = Session(model, n_ctx=64, n_threads=2, exact_rows=exact)
        logits.append(np.stack([s.decode([t])[-1].copy() for t in tokens]))
        s.close()
    np.testing.assert_array_equal(logits[1], logits[0])


@pytest.fixture(scope="module", params=["f32", "gemma3-270m"])
def engine_and_plain(request):
    """An engine on a model whose batched kernels differ from one row, and its plain greedy answers."""
    path = (request.getfixturevalue("f32_model_path") if request.param == "f32"
            else resolve_model("gemma3-270m"))
    with Engine(str(path), n_ctx=512, n_threads=2, strategy="plain") as e:
        yield e, [e.generate(p, max_tokens=MATRIX_TOKENS, temperature=0)["tokens"] for p in FALLBACK_PROMPTS]


@pytest.mark.parametrize("strategy", ["probe:10", "lookup:4", "lookahead:8", "hybrid:6", "auto"])
def test_greedy_equivalence_beyond_the_default_model(engine_and_plain, strategy):
    engine, plain = engine_and_plain
    for prompt, expected in zip(FALLBACK_PROMPTS, plain):
        got = engine.generate(prompt, max_tokens=MATRIX_TOKENS, temperature=0, strategy=strategy)["tokens"]
        assert got == expected, f"{strategy} diverged on {prompt[:40]!r}"


def test_near_ties_are_counted_when_exact_rows_are_off(f32_model_path, monkeypatch):
    """Off exact rows, the speculation block says how many greedy choices from batch rows had a
    top-2 gap under the measured batch-row noise; on, it claims nothing of the kind."""
    import edge_mtp.profile as profile

    prompt = FALLBACK_PROMPTS[0]
    with Engine(str(f32_model_path), n_ctx=512, n_threads=2, strategy="probe:10", exact_rows=False) as e:
        spec = e.generate(prompt, max_tokens=24, temperature=0)["speculation"]
        assert spec["row_noise"] > 0  # F32 batches take llamafile sgemm: rows differ (exactness.md)
        assert 0 <= spec["near_ties"] <= spec["verified_choices"] and spec["verified_choices"] >= 12
        monkeypatch.setitem(profile._ROW_NOISE, profile.profile_key(e.session), 1e9)
        spec = e.generate(prompt, max_tokens=24, temperature=0)["speculation"]
        assert spec["near_ties"] == spec["verified_choices"]  # every gap is under an infinite noise
        assert "row_noise" not in e.generate(prompt, max_tokens=4, temperature=0, strategy="plain")["speculation"]
    with Engine(str(f32_model_path), n_ctx=512, n_threads=2, strategy="probe:10") as e:
        assert "near_ties" not in e.generate(prompt, max_tokens=8, temperature=0)["speculation"]
