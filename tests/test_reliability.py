"""Bad input, interrupts and long use: every refusal is one clear error and the engine stays usable.

Model files: tools/gguf_corpus.py's malformed variants of the default model (all refused, by the
validator or by llama.cpp, in one line) and a smoke run of tools/fuzz_gguf.py. Requests: the edges
of the request surface. Interrupts and reuse: Ctrl-C inside a speculative step, nested streams,
1,000 requests on one Engine, several Engines in one process.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_tool
from edge_mtp import Engine
from edge_mtp.backend.session import Session
from edge_mtp.errors import ModelError, RequestError
from edge_mtp.generation import TextStream

ROOT = Path(__file__).resolve().parents[1]
LOSSLESS = ["probe:10", "lookup", "lookahead:8", "hybrid:6", "auto"]


# -- model files ---------------------------------------------------------------------------
def test_every_corpus_case_is_refused_in_one_line(model_path):
    """Each case in its own file, loaded through Model (validator, then llama.cpp), all in one child
    process: a crash, hang or huge allocation there fails this test instead of killing pytest."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gguf_corpus.py"), str(model_path), "--check"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert " 0 not as expected" in last
    assert int(last.split("peak RSS ")[1].split()[0]) < 1024  # MB: no count was trusted to allocate


def test_the_validator_refuses_what_llama_cpp_would_only_notice_later(model_path, tmp_path):
    corpus = load_tool("gguf_corpus")
    cases = {c.name: c for c in corpus.cases(corpus.parse(model_path))}
    from edge_mtp.gguf_file import validate

    for name in ("vocab-one-short", "layer-1-missing", "dmtd-layers-do-not-add-up", "n_kv-huge",
                 "string-length-huge", "tensor-offset-past-end", "eos-out-of-vocab"):
        with pytest.raises(ModelError, match=cases[name].make(tmp_path / "x.gguf").name):
            validate(tmp_path / "x.gguf")
    validate(cases["control"].make(tmp_path / "ok.gguf"))


@pytest.mark.parametrize("case", ["truncated-at-30", "n_tensors-huge", "vocab-one-short",
                                  "dmtd-cycle-zero", "tensor-type-99"])
@pytest.mark.parametrize("command", ["generate", "inspect"])
def test_cli_refuses_a_corrupt_file_with_exit_code_2(model_path, tmp_path, case, command):
    corpus = load_tool("gguf_corpus")
    made = next(c for c in corpus.cases(corpus.parse(model_path)) if c.name == case)
    path = made.make(tmp_path / f"{case}.gguf")
    args = ["generate", "-m", str(path), "-p", "hi", "-n", "2"] if command == "generate" else ["inspect", str(path)]
    r = subprocess.run([sys.executable, "-m", "edge_mtp.cli", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert err.startswith("edge-mtp: error:") and "\n" not in err and path.name in err


def test_fuzz_smoke_run(tmp_path):
    pytest.importorskip("atheris")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "fuzz_gguf.py"), "-runs=20000", "-timeout=10",
                        f"-artifact_prefix={tmp_path}/"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done 20000 runs" in r.stderr


# -- requests ------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["\ud800 lone surrogate", "bad \udcff byte", b"bytes prompt", None, 42])
def test_prompts_that_are_not_text_are_refused(engine, prompt):
    with pytest.raises(RequestError):
        engine.generate(prompt, max_tokens=2, temperature=0)


@pytest.mark.parametrize("bad", [
    {"temperature": float("inf")}, {"temperature": 1e9}, {"top_p": float("nan")},
    {"min_p": -0.1}, {"top_k": 2.5}, {"max_tokens": 2.5}, {"max_tokens": "8"},
    {"strategy": "probe:0"}, {"strategy": "probe:x"}, {"strategy": "lookup:-3"},
    {"strategy": "plain", "strategy_options": {"nonsense": 1}},
])
def test_absurd_parameters_are_refused_and_the_engine_stays_usable(engine, bad):
    with pytest.raises(RequestError):
        engine.generate("Hello", **{"max_tokens": 4, **bad})
    assert len(engine.generate("Hello", max_tokens=3, temperature=0)["tokens"]) == 3


def test_utf8_split_across_pieces_is_never_shown_broken():
    text = "naïve 日本語 😀 done"
    data = text.encode()
    for cut in range(1, len(data)):
        ts = TextStream([])
        shown = [ts.feed(data[:cut]), ts.feed(data[cut:]), ts.feed(b"", final=True)]
        assert "".join(shown) == text and all("\ufffd" not in s for s in shown)


def test_stop_string_split_across_pieces():
    for cut in range(1, 12):
        ts = TextStream(["<END>"])
        data = b"answer <END> never shown"
        out = ts.feed(data[:cut]) + ts.feed(data[cut:]) + ts.feed(b"", final=True)
        assert out == "answer " and ts.stopped


@pytest.mark.parametrize("strategy", ["plain", *LOSSLESS])
def test_multibyte_text_streams_whole_characters(engine, strategy):
    """Byte-level BPE splits CJK and emoji across tokens; pieces must still be whole characters."""
    prompt = "Copy this line twice: 日本語のテキスト 😀🎉 naïve café\n1. 日本語のテキスト 😀🎉 naïve café\n2."
    ref = engine.generate(prompt, max_tokens=40, temperature=0, strategy="plain")
    pieces = list(engine.stream(prompt, 40, temperature=0, strategy=strategy))
    assert "".join(pieces) == ref["text"]
    assert any(ord(ch) > 0x2FFF for ch in ref["text"]), "the model should have copied some CJK/emoji"
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("strategy", ["probe:60", "lookahead:64", "hybrid:16", "lookup:11"])
def test_tree_budget_larger_than_the_context(model_path, strategy):
    """At most 8 tokens of room left, fewer than the tree budget: plain's output, cut at the end of
    the context. (llama.cpp pads a context to 256 cells, so the prompt fills it up; a short prompt
    let the model stop on its own first on some CPUs.)"""
    with Engine(str(model_path), n_ctx=256, n_threads=2, strategy="plain") as e:
        words = "one two three four five six seven eight nine ten".split()
        prompt, i = "", 0
        while len(e.tokenize(prompt)) < e.n_ctx - 8:
            prompt, i = prompt + words[i % len(words)] + ", ", i + 1
        ref = e.generate(prompt, max_tokens=-1, temperature=0)
        assert ref["choices"][0]["finish_reason"] == "length"
        r = e.generate(prompt, max_tokens=-1, temperature=0, strategy=strategy)
        assert r["tokens"] == ref["tokens"] and r["choices"][0]["finish_reason"] == "length"


# -- interrupts and reuse ------------------------------------------------------------------
PROMPT = "The three primary colors are red, yellow and blue. The three primary colors are"


@pytest.mark.parametrize("where", ["commit", "decode"])
@pytest.mark.parametrize("strategy", LOSSLESS)
def test_ctrl_c_inside_a_speculative_step_leaves_the_cache_consistent(engine, monkeypatch, strategy, where):
    """KeyboardInterrupt right after a tree was decoded (before or instead of its commit), as a
    signal arriving mid-step would raise it; the next request equals a fresh engine's output."""
    expected = engine.generate(PROMPT, 40, temperature=0, strategy="plain")["tokens"]
    real = getattr(Session, where)
    calls = {"n": 0}

    def interrupted(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] != 3:
            return real(self, *a, **kw)
        if where == "decode" and len(a) > 1 and a[1] is not None:  # a tree: pending, never recorded
            real(self, *a, **kw)
            self._tree = None
        raise KeyboardInterrupt

    monkeypatch.setattr(Session, where, interrupted)
    if strategy == "auto":  # auto drafts only where it pays; make every step a tree step
        monkeypatch.setattr("edge_mtp.strategies.auto.DraftPolicy.choose", lambda self, match, avail, *_: min(avail, 3))
    stream = engine.stream(PROMPT, 40, temperature=0, strategy=strategy)
    with pytest.raises(KeyboardInterrupt):
        for _ in stream:
            pass
    assert calls["n"] >= 3 and stream.result["choices"][0]["finish_reason"] is None
    monkeypatch.undo()
    assert engine.generate(PROMPT, 40, temperature=0, strategy=strategy)["tokens"] == expected
    assert engine.generate(PROMPT, 40, temperature=0, strategy="plain")["tokens"] == expected


def test_a_second_request_from_a_streaming_thread_is_refused_not_deadlocked(engine):
    s = engine.stream(PROMPT, 20, temperature=0)
    next(s)
    with pytest.raises(RequestError, match="unfinished stream"):
        engine.generate("Hello", max_tokens=2, temperature=0)
    rest = "".join(s)
    assert s.result["choices"][0]["finish_reason"] == "length" and rest
    assert len(engine.generate("Hello", max_tokens=2, temperature=0)["tokens"]) == 2


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RSS from /proc")
def test_a_thousand_requests_on_one_engine_neither_grow_nor_drift(engine):
    prompts = ["Hi", "The capital of France is", "def add(a, b):", "1, 2, 3,", "Once upon a time"]
    strategies = ["plain", "probe:4", "lookup", "lookahead:8"]
    expected = {p: engine.generate(p, 3, temperature=0, strategy="plain")["tokens"] for p in prompts}
    for i in range(100):  # warm every allocator path first
        engine.generate(prompts[i % 5], 3, temperature=0, strategy=strategies[i % 4])
    before = rss_mb()
    for i in range(1000):
        p = prompts[i % 5]
        out = engine.generate(p, 3, temperature=0, strategy=strategies[(i // 5) % 4])["tokens"]
        assert out == expected[p], (i, p)
    grown = rss_mb() - before
    assert grown < 16, f"RSS grew {grown:.1f} MB over 1000 requests"


def test_several_engines_in_one_process(model_path, engine):
    expected = engine.generate(PROMPT, 16, temperature=0, strategy="plain")["tokens"]
    with Engine(str(model_path), n_ctx=512, n_threads=1, strategy="probe:4") as a, \
            Engine(str(model_path), n_ctx=256, n_threads=1, strategy="lookup") as b:
        sa, sb = a.stream(PROMPT, 16, temperature=0), b.stream(PROMPT, 16, temperature=0)
        for _ in range(4):  # interleave the two engines' steps
            next(sa), next(sb)
        list(sa), list(sb)
        assert sa.result["tokens"] == sb.result["tokens"] == expected
