"""`edge-mtp serve` as a client sees it: a real server process on 127.0.0.1 with the real default
model, driven by the official `openai` client and by raw HTTP; answers compared with the Engine's."""
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")

KEY = "test-key-123"
CHAT = [{"role": "user", "content": "Name three planets and one fact about each."}]
LONG = [{"role": "user", "content": "Write a very long essay about the history of Rome."}]
PROMPT = "Once upon a time, in a small village by the sea,"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`edge-mtp serve` in a child process; its log lines are collected as they come."""

    def __init__(self, model_path, *args):
        self.port = free_port()
        cmd = [sys.executable, "-m", "edge_mtp.cli", "serve", "-m", str(model_path), "--strategy", "plain",
               "-c", "2048", "-t", "2", "--port", str(self.port), "--api-key", KEY, *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        threading.Thread(target=self._read_log, daemon=True).start()
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if self.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            self.close()
            raise RuntimeError("server did not start:\n" + "\n".join(self.log))

    def _read_log(self):
        for line in self.proc.stderr:
            self.log.append(line.rstrip())

    def request(self, method, path, body=None, key=KEY, headers=None, raw=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        h = {"Content-Type": "application/json", **(headers or {})}
        if key:
            h["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        payload = r.read()
        conn.close()
        try:
            payload = json.loads(payload)
        except ValueError:
            pass
        return r.status, payload, r.headers  # case-insensitive

    def client(self):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY, max_retries=0)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(model_path):
    s = Server(model_path, "--max-queue", "16")  # the ten-clients test queues 9 behind one
    yield s
    s.close()


@pytest.fixture(scope="module")
def model_id(server):
    return server.request("GET", "/v1/models")[1]["data"][0]["id"]


def speculation_counts(spec: dict) -> dict:
    """The speculation block without its timings (which differ run to run)."""
    return {k: v for k, v in spec.items() if not k.endswith("_ms")}


def test_models_and_health(server, model_id):
    status, body, _ = server.request("GET", "/health", key=None)
    assert status == 200 and body["status"] == "ok" and body["model"] == model_id
    assert [m.id for m in server.client().models.list().data] == [model_id]


def test_chat_equals_the_engine_and_reports_speculation(server, model_id, engine):
    r = server.client().chat.completions.create(model=model_id, messages=CHAT, max_tokens=40, temperature=0,
                                                extra_body={"speculation": "lookup"})
    ref = engine.chat(CHAT, max_tokens=40, temperature=0, strategy="lookup")
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref["text"]
    assert r.choices[0].finish_reason == ref["choices"][0]["finish_reason"]
    assert r.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    assert r.usage.completion_tokens == ref["usage"]["completion_tokens"]
    extra = r.model_extra
    assert speculation_counts(extra["speculation"]) == speculation_counts(ref["speculation"])
    assert extra["speculation"]["strategy"] == "lookup" and extra["timings"]["tokens_per_second"] > 0


def test_speculation_false_is_plain_and_bad_strategy_is_400(server, model_id):
    status, body, _ = server.request("POST", "/v1/chat/completions", {
        "model": model_id, "messages": CHAT, "max_tokens": 4, "speculation": False})
    assert status == 200 and body["speculation"]["strategy"] == "plain"
    status, body, _ = server.request("POST", "/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 4, "speculation": "warp-drive"})
    assert status == 400 and body["error"]["param"] == "speculation"


def test_streamed_chat_equals_the_engine_with_usage(server, model_id, engine):
    chunks = list(server.client().chat.completions.create(
        model=model_id, messages=CHAT, max_tokens=40, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    ref = engine.chat(CHAT, max_tokens=40, temperature=0)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref["text"]
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == ref["choices"][0]["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref["usage"]["completion_tokens"]
    assert len({c.id for c in chunks}) == 1


def test_completions_plain_and_streamed_equal_the_engine(server, model_id, engine):
    ref = engine.generate(PROMPT, max_tokens=24, temperature=0)
    client = server.client()
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == ref["text"]
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 24
    chunks = list(client.completions.create(model=model_id, prompt=PROMPT, max_tokens=24, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref["text"]
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None


def test_logprobs_are_consistent(server, model_id, engine):
    r = server.client().chat.completions.create(model=model_id, messages=CHAT, max_tokens=16, temperature=0,
                                                logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 3
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == c.logprob  # greedy
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
    status, body, _ = server.request("POST", "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 2})
    lp = body["choices"][0]["logprobs"]
    assert status == 200 and len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 8
    assert "".join(lp["tokens"]) == body["choices"][0]["text"]
    ref = engine.create_completion(PROMPT, max_tokens=8, temperature=0, logprobs=2)
    assert lp == ref["choices"][0]["logprobs"]


def test_ten_clients_at_once_get_their_sequential_answers(server, model_id, engine):
    prompts = [[{"role": "user", "content": f"Tell me one fact about the number {i}."}] for i in range(10)]
    expected = [engine.chat(p, max_tokens=12, temperature=0)["text"] for p in prompts]
    got: dict = {}
    client = server.client()

    def work(i):
        for k in range(5):
            r = client.chat.completions.create(model=model_id, messages=prompts[i], max_tokens=12,
                                               temperature=0, stream=k % 2 == 1)
            text = r.choices[0].message.content if k % 2 == 0 else \
                "".join(c.choices[0].delta.content or "" for c in r if c.choices)
            got[(i, k)] = text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 50
    assert all(got[(i, k)] == expected[i] for i in range(10) for k in range(5))


def test_a_client_that_leaves_mid_stream_stops_its_generation(server, model_id, engine):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({
        "messages": LONG, "max_tokens": 1500, "temperature": 0, "stream": True, "speculation": "lookup"}),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    seen = 0
    while seen < 5:
        line = r.readline()
        seen += line.startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 30
    while not any("client left" in line for line in server.log) and time.time() < deadline:
        time.sleep(0.1)
    left = [line for line in server.log if "client left" in line]
    assert left and "/v1/chat/completions" in left[-1]
    assert int(left[-1].split("client left after ")[1].split()[0]) < 1500
    # the engine stays exact: the same prompt now equals a fresh engine's answer
    r2 = server.client().chat.completions.create(model=model_id, messages=LONG, max_tokens=48, temperature=0)
    assert r2.choices[0].message.content == engine.chat(LONG, max_tokens=48, temperature=0)["text"]


@pytest.mark.parametrize("case", ["malformed", "wrong_type", "no_messages", "unknown_model", "over_context",
                                  "no_key", "wrong_key", "huge_body", "n", "top_logprobs_alone"])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, model_id, case):
    good = {"model": model_id, "messages": CHAT, "max_tokens": 2}
    path, body, raw, key = "/v1/chat/completions", good, None, KEY
    expected = 400
    if case == "malformed":
        raw = b'{"messages": [}'
    elif case == "wrong_type":
        body = {**good, "temperature": "hot"}
    elif case == "no_messages":
        body = {"model": model_id, "messages": []}
    elif case == "unknown_model":
        body, expected = {**good, "model": "gpt-17"}, 404
    elif case == "over_context":
        path, body = "/v1/completions", {"prompt": "hello " * 3000, "max_tokens": 2}
    elif case in ("no_key", "wrong_key"):
        key, expected = (None if case == "no_key" else "nope"), 401
    elif case == "huge_body":
        body, expected = {**good, "messages": [{"role": "user", "content": "x" * (9 << 20)}]}, 413
    elif case == "n":
        body = {**good, "n": 3}
    elif case == "top_logprobs_alone":
        body = {**good, "top_logprobs": 2}
    status, payload, _ = server.request("POST", path, body, key=key, raw=raw)
    assert status == expected, payload
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "\n" not in err["message"]
    status, payload, _ = server.request("POST", "/v1/chat/completions", good)
    assert status == 200 and payload["choices"][0]["message"]["content"] is not None


def test_a_full_queue_answers_503_with_retry_after(model_path):
    s = Server(model_path, "--max-queue", "1")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({
            "messages": LONG, "max_tokens": 1500, "temperature": 0, "stream": True}),
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        running = conn.getresponse()
        assert running.status == 200 and running.readline().startswith(b"data: ")
        waiting = threading.Thread(target=s.request, args=("POST", "/v1/chat/completions",
                                                          {"messages": CHAT, "max_tokens": 4}))
        waiting.start()
        deadline = time.time() + 30
        while s.request("GET", "/health")[1]["waiting"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        status, body, headers = s.request("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 4})
        assert status == 503 and body["error"]["code"] == "server_busy" and int(headers["Retry-After"]) > 0
        conn.close()
        waiting.join(timeout=120)
        assert s.request("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 4})[0] == 200
        assert sum(" 503 " in line for line in s.log) == 1  # one log line per request
    finally:
        s.close()


def test_chunks_flushed_together_travel_as_one():
    """Pieces produced within one flush interval are sent as one chunk: text and logprobs
    concatenated in order; the role chunk and the last chunk stay apart; the inputs are kept."""
    from edge_mtp.server import merged

    def chunk(delta, lp=None, finish=None, **extra):
        return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}], **extra}

    role = chunk({"role": "assistant", "content": ""})
    a = chunk({"content": "Hel"}, {"content": [{"token": "Hel"}]})
    b = chunk({"content": "lo"}, {"content": [{"token": "lo"}]})
    last = chunk({}, None, "stop", usage={"completion_tokens": 2})
    out = merged([role, a, b, last])
    assert [c["choices"][0]["delta"] for c in out] == [role["choices"][0]["delta"], {"content": "Hello"}, {}]
    assert out[1]["choices"][0]["logprobs"] == {"content": [{"token": "Hel"}, {"token": "lo"}]}
    assert out[2]["usage"] == {"completion_tokens": 2} and out[2]["choices"][0]["finish_reason"] == "stop"
    assert a["choices"][0]["delta"] == {"content": "Hel"} and "_content" not in a
    text = lambda t, lp: {"id": "c", "object": "text_completion", "created": 1, "model": "m",  # noqa: E731
                          "choices": [{"index": 0, "text": t, "logprobs": lp, "finish_reason": None}]}
    two = merged([text("a", {"tokens": ["a"], "text_offset": [0]}), text("b", {"tokens": ["b"], "text_offset": [1]})])
    assert len(two) == 1 and two[0]["choices"][0]["text"] == "ab"
    assert two[0]["choices"][0]["logprobs"] == {"tokens": ["a", "b"], "text_offset": [0, 1]}
