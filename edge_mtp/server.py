"""`edge-mtp serve`: an OpenAI-compatible HTTP server over one Engine (FastAPI, uvicorn,
sse-starlette: the stack of llama-cpp-python's own server; the `server` extra).

POST /v1/chat/completions and /v1/completions take OpenAI's request fields plus llama.cpp's top_k
and min_p and a per-request `speculation` (a strategy such as "lookup" or "probe:10", true for the
server's default, false for plain decoding); GET /v1/models, GET /health. Responses are OpenAI's,
plus the Engine's `timings` and `speculation` blocks; streams are server-sent events in OpenAI's
chunk format ending with `data: [DONE]`. Content pieces produced within FLUSH_S of each other
travel as one chunk (as OpenAI's own deltas vary in size): on 2 cores, waking the event loop and
encoding an event per token took a share of the cores the model decodes on.

One Engine runs one request at a time on one worker thread; up to max_queue more wait their turn
and the next get 503 with Retry-After. Each request carries a cancel flag that the worker checks
between steps: a client that goes away (mid-stream, or while waiting) stops its generation there,
and the Engine's interrupt path (docs/reliability.md) leaves the KV cache exact for the next one.
Errors come in OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from sse_starlette.sse import EventSourceResponse

from .engine import Engine
from .errors import EdgeMTPError, RequestError
from .strategies import make_strategy

log = logging.getLogger("edge_mtp.server")
MAX_BODY = 8 * 1024 * 1024  # bytes of one request body; a context of prompt text is far less
RETRY_AFTER_S = 5
FLUSH_S = 0.02  # a stream's chunks go to the event loop at most this often (the first at once)

Number = Union[StrictInt, StrictFloat]


class HTTPError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# -- request bodies (strict: a string where a number belongs is a 400, not a guess) ------------
class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: StrictStr
    content: Union[StrictStr, list[TextPart], None] = None

    def plain(self) -> dict:
        """The {"role", "content"} dict a chat template takes (text parts joined)."""
        c = self.content
        return {"role": self.role, "content": "".join(p.text for p in c) if isinstance(c, list) else c or ""}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    include_usage: StrictBool = False


class Common(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored (as llama-server does); known ones
    that edge-mtp cannot honour are refused in `unsupported` rather than silently dropped."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Number = 0.8
    top_p: Number = 0.95
    top_k: StrictInt = 40
    min_p: Number = 0.05
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    n: StrictInt = 1
    presence_penalty: Number = 0
    frequency_penalty: Number = 0
    logit_bias: dict[str, Any] | None = None
    speculation: Union[StrictStr, StrictBool, None] = None

    def unsupported(self) -> str | None:
        if self.n != 1:
            return "n"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty" if self.presence_penalty else "frequency_penalty"
        if self.logit_bias:
            return "logit_bias"
        return None


class ChatBody(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        if self.response_format and self.response_format.get("type") != "text":
            return "response_format"
        return super().unsupported()


class CompletionBody(Common):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt]]
    max_tokens: StrictInt | None = 16  # OpenAI's default for completions
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if isinstance(self.prompt, list) and len(self.prompt) > 1 and isinstance(self.prompt[0], str):
            return "prompt"  # a batch of prompts: one at a time here
        return super().unsupported()


class Job:
    """One admitted request: its cancel flag, the way back to its coroutine, and what its log
    line says (`info`, in the request's scope state, read by Gate)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, state: dict):
        self.loop, self.state = loop, state
        self.cancel = threading.Event()
        self.out: asyncio.Queue = asyncio.Queue()
        self.finished = asyncio.Event()  # the worker is done with it
        state["job"], state["info"] = self, ""

    def put(self, item) -> None:
        """From the worker thread: hand an item to the request's coroutine."""
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Server:
    """The app's state: the engine, its one worker thread and the admission count."""

    def __init__(self, engine: Engine, model_id: str, api_key: str | None = None, max_queue: int = 8,
                 max_body: int = MAX_BODY):
        self.engine, self.model_id, self.api_key = engine, model_id, api_key
        self.max_queue, self.max_body = max_queue, max_body
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-mtp-engine")
        self.lock = threading.Lock()
        self.admitted = 0  # running + waiting
        self.aliases = {model_id, engine.model_name, engine.model_path.name, engine.model_path.stem}

    # -- admission -------------------------------------------------------------------------
    def admit(self) -> None:
        with self.lock:
            if self.admitted >= 1 + self.max_queue:
                raise HTTPError(503, f"server busy: {self.admitted - 1} requests already waiting "
                                     f"(--max-queue {self.max_queue}); retry later", type="server_error",
                                code="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})
            self.admitted += 1

    def release(self) -> None:
        with self.lock:
            self.admitted -= 1

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())):
            raise HTTPError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                            code="invalid_api_key")

    # -- one request -----------------------------------------------------------------------
    def run(self, job: Job, start: dict, stream: bool) -> None:
        """On the worker thread: set the request up, then run it step by step, stopping when the
        client has gone. Puts ("error", exc) or ("ok", None), then ("chunks", [dict, ...]) when
        streaming (every FLUSH_S at most), then ("done", result) - result None when the client left - or ("error", exc)
        if the backend failed midway."""
        try:
            if job.cancel.is_set():  # the client left while waiting
                job.put(("done", None))
                return
            try:
                s = self.engine.start(**start)
            except Exception as e:  # noqa: BLE001 - handed back to the request's coroutine
                job.put(("error", e))
                return
            job.put(("ok", None))
            items = s.chunks() if stream else iter(s)
            batch, flushed = [], 0.0
            try:
                for item in items:
                    if job.cancel.is_set():
                        break
                    if stream:
                        batch.append(item)
                        if time.perf_counter() - flushed >= FLUSH_S:
                            job.put(("chunks", batch))
                            batch, flushed = [], time.perf_counter()
            except Exception as e:  # noqa: BLE001
                job.put(("error", e))
                return
            finally:
                items.close()
            if batch and not job.cancel.is_set():
                job.put(("chunks", batch))
            if job.cancel.is_set():
                n = s.result["usage"]["completion_tokens"] if s.result else 0
                job.state["info"] = f" client left after {n} tokens"
                job.put(("done", None))
            else:
                job.put(("done", s.result))
        except RuntimeError:  # the event loop is gone: the server is stopping
            pass
        finally:
            self.release()
            with contextlib.suppress(RuntimeError):
                job.loop.call_soon_threadsafe(job.finished.set)


def create_app(engine: Engine, model_id: str | None = None, api_key: str | None = None,
               max_queue: int = 8, max_body: int = MAX_BODY) -> FastAPI:
    """The FastAPI app serving `engine` (uvicorn runs it; tests may too)."""
    state = Server(engine, model_id or engine.model_name, api_key, max_queue, max_body)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="edge-mtp", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = state
    app.add_middleware(Gate, max_body=max_body)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError):
        return e.response()

    @app.get("/health")
    async def health():
        with state.lock:
            busy = state.admitted
        return {"status": "ok", "model": state.model_id, "running": min(busy, 1), "waiting": max(busy - 1, 0)}

    @app.get("/v1/models")
    async def list_models(request: Request):
        state.check_key(request)
        return {"object": "list", "data": [{"id": state.model_id, "object": "model",
                                             "created": int(engine.model_path.stat().st_mtime),
                                             "owned_by": "edge-mtp"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, ChatBody)
        start = common_start(body, [m.plain() for m in body.messages])
        if body.max_completion_tokens is not None:
            start["max_tokens"] = body.max_completion_tokens
        if body.top_logprobs is not None and not body.logprobs:
            raise HTTPError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        start["top_logprobs"] = (body.top_logprobs or 0) if body.logprobs else None
        return await answer(request, body, start)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionBody)
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) \
            else body.prompt
        start = common_start(body, prompt)
        start["top_logprobs"] = body.logprobs
        return await answer(request, body, start)

    async def parse(request: Request, kind: type[Common]) -> Common:
        state.check_key(request)
        raw = bytearray()
        async for part in request.stream():  # a chunked body has no length to check up front
            raw += part
            if len(raw) > state.max_body:
                raise too_large(state.max_body)
        try:
            data = json.loads(bytes(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise HTTPError(400, "request body must be a JSON object")
        try:
            body = kind.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or None
            raise HTTPError(400, f"{field}: {err['msg']}" if field else err["msg"], param=field) from None
        if body.model is not None and body.model not in state.aliases:
            raise HTTPError(404, f"model {body.model!r} is not served here (this server has "
                                 f"{state.model_id!r})", param="model", code="model_not_found")
        bad = body.unsupported()
        if bad:
            raise HTTPError(400, f"{bad}: not supported by edge-mtp", param=bad)
        return body

    def common_start(body: Common, prompt) -> dict:
        strategy = None
        if body.speculation is False:
            strategy = "plain"
        elif isinstance(body.speculation, str):
            try:
                make_strategy(body.speculation)
            except RequestError as e:
                raise HTTPError(400, f"speculation: {e}", param="speculation") from None
            strategy = body.speculation
        return dict(prompt=prompt, max_tokens=body.max_tokens, temperature=body.temperature,
                    top_k=body.top_k, top_p=body.top_p, min_p=body.min_p, seed=body.seed,
                    stop=body.stop, strategy=strategy)

    async def answer(request: Request, body: Common, start: dict):
        state.admit()
        job = Job(asyncio.get_running_loop(), request.scope.setdefault("state", {}))
        try:
            state.worker.submit(state.run, job, start, body.stream)
        except RuntimeError:  # the worker is shut down: the server is stopping
            state.release()
            raise HTTPError(503, "server is shutting down", type="server_error") from None
        try:
            kind, value = await wait_or_leave(request, job)
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        if kind == "ok" and body.stream:
            return EventSourceResponse(events(request, job, body), ping=15)
        if kind == "ok":
            kind, value = await wait_or_leave(request, job)
        if kind == "error":
            raise as_http(value)
        if value is None:  # the client left; nobody reads this
            return JSONResponse({}, status_code=499)
        note(request, value)
        return JSONResponse(served(value))

    async def wait_or_leave(request: Request, job: Job):
        """The job's next item; a client that disconnects meanwhile cancels it."""
        getter = asyncio.ensure_future(job.out.get())
        try:
            while not (await asyncio.wait({getter}, timeout=0.25))[0]:
                if await request.is_disconnected():
                    job.cancel.set()
            return getter.result()
        finally:
            getter.cancel()

    async def events(request: Request, job: Job, body: Common):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        try:
            while True:
                kind, value = await job.out.get()
                if kind == "error":  # the backend failed midway: say so in the stream, then end it
                    e = as_http(value)
                    yield {"data": json.dumps({"error": {"message": e.message, "type": e.type,
                                                         "param": None, "code": e.code}})}
                    break
                if kind == "done":
                    if value is not None:
                        note(request, value)
                    break
                for chunk in merged(value):
                    usage = chunk.pop("usage", None)
                    yield {"data": json.dumps(chunk, ensure_ascii=False)}
                    if usage is not None and include_usage:
                        yield {"data": json.dumps({k: chunk[k] for k in ("id", "object", "created", "model")}
                                                  | {"choices": [], "usage": usage}, ensure_ascii=False)}
            yield {"data": "[DONE]"}
        finally:
            job.cancel.set()  # a no-op when it finished; stops the generation when the client left

    def note(request: Request, result: dict) -> None:
        u, s = result["usage"], result["speculation"]
        request.scope["state"]["info"] = (f" prompt={u['prompt_tokens']} completion={u['completion_tokens']} "
                              f"strategy={s['strategy']} steps={s['steps']} "
                              f"finish={result['choices'][0]['finish_reason']}")

    return app


def merged(chunks: list[dict]) -> list[dict]:
    """Consecutive content chunks of one stream as one (their text and logprobs concatenated);
    the role chunk and the last one (finish_reason, usage) stay apart. New dicts: the Engine's
    are not changed."""
    out: list[dict] = []
    open_content = False  # the last chunk of out is a content chunk that more may join
    for chunk in chunks:
        choice = chunk["choices"][0]
        content = choice["finish_reason"] is None and "usage" not in chunk and "role" not in choice.get("delta", {})
        if content and open_content:
            prev = out[-1]["choices"][0]
            if "delta" in choice:
                prev["delta"] = {"content": prev["delta"]["content"] + choice["delta"]["content"]}
            else:
                prev["text"] += choice["text"]
            if choice["logprobs"] is not None:
                prev["logprobs"] = {k: v + choice["logprobs"][k] for k, v in (prev["logprobs"] or {}).items()} \
                    if prev["logprobs"] else choice["logprobs"]
            continue
        out.append({**chunk, "choices": [dict(choice)]})
        open_content = content
    return out


def as_http(e: Exception) -> HTTPError:
    """What an exception from the engine is for the client: its fault (400) or ours (500)."""
    if isinstance(e, RequestError):
        return HTTPError(400, str(e).splitlines()[0])
    if isinstance(e, EdgeMTPError):
        return HTTPError(500, str(e).splitlines()[0], type="server_error")
    log.exception("request failed", exc_info=e)
    return HTTPError(500, f"internal error: {type(e).__name__}", type="server_error")


def too_large(limit: int) -> HTTPError:
    return HTTPError(413, f"request body over {limit} bytes", code="body_too_large")


class Gate:
    """ASGI middleware: refuses a body whose Content-Length is over the limit before it is read,
    and logs one line per request (method, path, status, time, and what the handler noted)."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        size = dict(scope["headers"]).get(b"content-length", b"0")
        if not size.isdigit() or int(size) > self.max_body:
            await too_large(self.max_body).response()(scope, receive, send_status)
        else:
            await self.app(scope, receive, send_status)
        state = scope.get("state", {})
        if "job" in state:  # a stream the client left may still be finishing its step
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(state["job"].finished.wait(), timeout=60)
        info = state.get("info", "")
        log.info("%s %s %d %.0f ms%s", scope["method"], scope["path"], status[0],
                 (time.perf_counter() - t0) * 1e3, info)


def served(result: dict) -> dict:
    """An Engine result as the HTTP answer: OpenAI's fields plus timings and speculation (the
    Engine's `text` and `tokens` conveniences stay out)."""
    return {k: v for k, v in result.items() if k not in ("text", "tokens")}


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          max_queue: int = 8, model_id: str | None = None) -> None:
    """Run the server until interrupted (one log line per request on stderr)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # the worker thread takes the GIL back after every decode; while the event loop holds it,
    # Python's default 5 ms switch interval could stall each token that long
    sys.setswitchinterval(0.0002)
    app = create_app(engine, model_id, api_key, max_queue)
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")
