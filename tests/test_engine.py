"""The Engine API on the real default model: result shape, chat template, streaming, stopping."""
import threading

import pytest

from edge_mtp import Engine, RequestError

PROMPT = "List three facts about the Moon."
CHAT_MSGS = [{"role": "user", "content": "Name three planets."}]


def test_result_dict_shape(engine, greedy):
    r = engine.generate("The capital of France is", max_tokens=16, **greedy)
    assert r["object"] == "text_completion"
    assert r["choices"][0]["text"] == r["text"]
    assert r["choices"][0]["finish_reason"] in ("stop", "length")
    assert r["usage"]["completion_tokens"] == len(r["tokens"]) <= 16
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    assert r["text"] == engine.detokenize(r["tokens"])
    assert set(r["timings"]) >= {"prompt_ms", "decode_ms", "tokens_per_second"}
    spec = r["speculation"]
    assert spec["strategy"] == "plain" and spec["drafted"] == spec["accepted"] == 0
    if r["choices"][0]["finish_reason"] == "length":
        assert spec["steps"] == len(r["tokens"])
        assert spec["mean_accepted_tokens_per_step"] == 1.0


def test_max_tokens_is_exact(engine, greedy):
    for n in (1, 2, 7):
        r = engine.generate("Count from one to one hundred: one, two,", max_tokens=n, **greedy)
        assert len(r["tokens"]) == n and r["choices"][0]["finish_reason"] == "length"


def test_chat_uses_the_gguf_chat_template(engine, greedy):
    msgs = [{"role": "user", "content": "Hi there"}]
    expected = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    toks = engine.model.chat_tokens(msgs)
    # the template may add a default system message; the user turn and the open assistant turn end it
    assert toks[-len(engine.tokenize(expected, special=True)):] == engine.tokenize(expected, special=True)
    r = engine.chat(msgs, max_tokens=24, **greedy)
    assert r["object"] == "chat.completion"
    assert r["choices"][0]["message"]["role"] == "assistant"
    assert r["choices"][0]["message"]["content"] == r["text"] and r["text"].strip()
    assert "<|im_end|>" not in r["text"]


def test_chat_stops_at_end_of_turn(engine, greedy):
    r = engine.chat([{"role": "user", "content": "Say hello."}], max_tokens=200, **greedy)
    assert r["choices"][0]["finish_reason"] == "stop"
    assert len(r["tokens"]) < 200


def test_stream_pieces_concatenate_to_the_full_text(engine, greedy):
    s = engine.stream(PROMPT, 48, **greedy)
    pieces = list(s)
    assert len(pieces) > 5
    assert "".join(pieces) == s.result["text"]
    assert s.result["text"] == engine.generate(PROMPT, 48, **greedy)["text"]


def test_stop_string_cuts_text_and_stops(engine, greedy):
    full = engine.generate(PROMPT, 64, **greedy)
    text = full["text"]
    # a stop string that starts in the middle of the output, spanning several tokens
    stop = text[len(text) // 2: len(text) // 2 + 6]
    assert len(stop) == 6
    r = engine.generate(PROMPT, 64, stop=[stop], **greedy)
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["text"] == text[: text.index(stop)]
    assert len(r["tokens"]) < len(full["tokens"])
    streamed = "".join(engine.stream(PROMPT, 64, stop=stop, **greedy))
    assert streamed == r["text"]


def test_prompt_longer_than_context_is_refused_and_engine_stays_usable(engine, greedy):
    with pytest.raises(RequestError, match="context"):
        engine.generate("hello " * (engine.n_ctx + 10), max_tokens=4, **greedy)
    assert len(engine.generate("Hello", max_tokens=4, **greedy)["tokens"]) == 4


def test_generation_stops_at_the_end_of_the_context(model_path, greedy):
    with Engine(str(model_path), n_ctx=64, n_threads=2) as e:
        r = e.generate("Count: one, two, three, four, five,", max_tokens=500, **greedy)
        assert r["choices"][0]["finish_reason"] == "length"
        assert r["usage"]["total_tokens"] == e.n_ctx


@pytest.mark.parametrize("bad", [
    {"max_tokens": 0}, {"max_tokens": -5}, {"temperature": -1}, {"temperature": float("nan")},
    {"top_p": 0}, {"top_p": 1.5}, {"min_p": 1.0}, {"top_k": -1}, {"strategy": "nope"},
    {"stop": [3]},
])
def test_bad_parameters_get_a_clear_error(engine, bad):
    kw = {"max_tokens": 4, **bad}
    with pytest.raises(RequestError):
        engine.generate("Hello", **kw)


def test_empty_prompt_is_refused(engine):
    with pytest.raises(RequestError, match="empty"):
        engine.generate("", max_tokens=4)


def test_seeded_sampling_is_reproducible(engine):
    a = engine.generate(PROMPT, 24, temperature=0.9, seed=123)["tokens"]
    b = engine.generate(PROMPT, 24, temperature=0.9, seed=123)["tokens"]
    assert a == b


def test_abandoned_stream_leaves_the_engine_consistent(engine, greedy):
    expected = engine.generate(PROMPT, 32, **greedy)["tokens"]
    s = engine.stream("Once upon a time, in a small village by the sea,", 100, **greedy)
    next(s), next(s)
    s.close()
    assert s.result["choices"][0]["finish_reason"] is None  # did not finish (OpenAI has no "cancelled")
    assert engine.generate(PROMPT, 32, **greedy)["tokens"] == expected


def test_two_threads_are_serialized(engine, greedy):
    expected = engine.generate(PROMPT, 24, **greedy)["tokens"]
    results = []

    def work():
        results.append(engine.generate(PROMPT, 24, **greedy)["tokens"])

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected, expected]


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, edge_mtp; "
            "bad = [m for m in ('click', 'llama_cpp', 'numpy') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


REPEATS = ("The list: apple, banana, cherry, grape, lemon, mango. Again: apple, banana, cherry, "
           "grape, lemon, mango. Again: apple,")


@pytest.mark.parametrize("strategy", ["probe:10", "lookup", "hybrid", "lookahead", "auto"])
def test_logprobs_are_the_same_for_every_strategy(engine, strategy):
    """Each token's log-probabilities come from the row it was chosen from: a verified tree row
    for drafted tokens, bit-identical to plain's row under exact rows."""
    ref = engine.create_completion(REPEATS, 32, temperature=0, logprobs=3, strategy="plain")
    r = engine.create_completion(REPEATS, 32, temperature=0, logprobs=3, strategy=strategy)
    assert r["tokens"] == ref["tokens"]
    assert r["choices"][0]["logprobs"] == ref["choices"][0]["logprobs"]
    if strategy != "auto":  # auto drafts only where this machine's curve says it pays
        assert r["speculation"]["accepted"] > 0


def test_completion_logprobs_shape(engine):
    r = engine.create_completion(PROMPT, 12, temperature=0, logprobs=2)
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 12
    assert "".join(lp["tokens"]) == r["text"]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(12)]
    for tok, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0 and len(top) <= 2 and max(top.values()) == value and top[tok] == value  # greedy
    assert engine.create_completion(PROMPT, 4, temperature=0)["choices"][0]["logprobs"] is None


def test_chat_stream_chunks_match_the_full_answer(engine):
    full = engine.create_chat_completion(CHAT_MSGS, max_tokens=24, temperature=0, logprobs=True, top_logprobs=1)
    chunks = list(engine.create_chat_completion(CHAT_MSGS, max_tokens=24, temperature=0, logprobs=True,
                                                top_logprobs=1, stream=True))
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full["text"]
    content = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert content == full["choices"][0]["logprobs"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == full["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["usage"] == full["usage"]


def test_closing_a_chunk_stream_stops_the_request(engine, greedy):
    expected = engine.generate(PROMPT, 32, **greedy)["tokens"]
    chunks = engine.create_completion(PROMPT, 200, stream=True, **greedy)
    next(chunks), next(chunks)
    chunks.close()
    assert engine.generate(PROMPT, 32, **greedy)["tokens"] == expected


@pytest.mark.parametrize("bad", [{"logprobs": 21}, {"logprobs": -1}, {"logprobs": True}, {"seed": "7"},
                                 {"stop": "a b".split() + [None]}])
def test_bad_completion_parameters(engine, bad):
    with pytest.raises(RequestError):
        engine.create_completion("Hello", 4, **bad)
    with pytest.raises(RequestError, match="logprobs"):
        engine.create_chat_completion(CHAT_MSGS, 4, top_logprobs=2)


def test_prompt_as_token_ids(engine, greedy):
    ids = engine.tokenize(PROMPT)
    assert engine.create_completion(ids, 8, **greedy)["tokens"] == engine.generate(PROMPT, 8, **greedy)["tokens"]
    with pytest.raises(RequestError, match="token ids"):
        engine.create_completion([engine.model.n_vocab + 5], 4)


def test_tokenize_defaults_follow_llama_cpp_python(engine):
    text = "<|im_start|>user"
    plain, special = engine.tokenize(text), engine.tokenize(text, special=True)
    assert len(special) < len(plain)  # the marker is one special token only when asked for
    assert engine.tokenize("hi", add_bos=False) == engine.model.tokenize("hi", add_bos=False, special=False)


def test_n_batch_reaches_the_backend(model_path, greedy):
    with Engine(str(model_path), n_ctx=256, n_threads=2, strategy="plain", n_batch=64, n_gpu_layers=0) as e:
        assert e.session.n_batch == 64
        r = e.generate("word " * 150, max_tokens=4, **greedy)  # a prompt of several batches
        assert r["usage"]["prompt_tokens"] > 128 and len(r["tokens"]) == 4
