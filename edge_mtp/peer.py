"""The peer: stock llama.cpp's own llama-server, measured by `edge-mtp bench --peer` in the same run.

llama-server is built once from the same pinned llama-cpp-python sdist the backend comes from
(its vendored llama.cpp b11312, no edge-mtp patches) and cached under the edge-mtp cache like the
backend wheel, keyed by the sdist, the cmake flags and the platform. One server process runs per
speculation type (llama-server takes `--spec-type` at start-up), each on 127.0.0.1 with the
bench's model, context and threads, one slot, flash attention on as edge-mtp's default, no prompt
cache; the bench sends every turn's chat-templated prompt as token ids to its /completion endpoint
with the same sampling settings and max tokens, and reads `timings` (prompt_ms, predicted_n,
predicted_ms, draft_n, draft_n_accepted) and the returned tokens.

Stdlib only (subprocess, http.client): no new dependency. The build is not part of the install.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import http.client
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BackendError, RequestError
from .models import cache_dir

NAME = "llama-server"
BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "native" / "build.py"


def _backend_build():
    """native/build.py, the one owner of the pinned sdist (its pin, fetch and checksum)."""
    spec = importlib.util.spec_from_file_location("edge_mtp_native_build", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build = _backend_build()
SDIST, SDIST_SHA256, SDIST_VERSION = _build.SDIST, _build.SDIST_SHA256, _build.VERSION
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_HTML=OFF", "-DLLAMA_BUILD_APP=OFF", "-DBUILD_SHARED_LIBS=OFF")
# llama-server's --spec-type values that need nothing but the target model
SPEC_TYPES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")


def say(msg: str) -> None:
    print(f"[edge-mtp peer] {msg}", file=sys.stderr, flush=True)


def parse_peer(text: str) -> list[str]:
    """`llama-server` or `llama-server:TYPE[,TYPE...]` -> strategy names, plain llama-server first:
    ["llama-server", "llama-server:ngram-mod", ...]."""
    name, _, types = text.partition(":")
    if name.strip() != NAME:
        raise RequestError(f"unknown peer {name!r} (known: {NAME}, {NAME}:TYPE[,TYPE...])")
    out = [NAME]
    for t in (t.strip() for t in types.split(",")):
        if not t or t == "none":
            continue
        if t not in SPEC_TYPES:
            raise RequestError(f"unknown llama-server spec type {t!r} (known: {', '.join(SPEC_TYPES)})")
        if f"{NAME}:{t}" in out:
            raise RequestError(f"spec type listed twice: {t}")
        out.append(f"{NAME}:{t}")
    return out


def spec_type_of(strategy: str) -> str | None:
    return strategy.partition(":")[2] or None


# -- the build ----------------------------------------------------------------------------------
def build_key() -> str:
    h = hashlib.sha256()
    for part in (SDIST_SHA256, *CMAKE_FLAGS, sys.platform, platform.machine()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def cached_binary() -> Path:
    return cache_dir() / "peer" / build_key() / NAME


def _sdist() -> Path:
    """The pinned sdist, from the cache native/build.py fills (fetched and checked there)."""
    try:
        return _build.fetch_sdist(cache_dir())
    except _build.BuildError as e:
        raise BackendError(f"could not fetch the llama.cpp source: {str(e).splitlines()[0]}") from None


def ensure_server(jobs: int | None = None) -> Path:
    """The cached stock llama-server binary, built on first use (about 8 minutes on 2 cores)."""
    final = cached_binary()
    if final.is_file() and os.access(final, os.X_OK):
        return final
    sdist = _sdist()
    final.parent.mkdir(parents=True, exist_ok=True)
    log = final.parent / "build.log"
    with tempfile.TemporaryDirectory(prefix="edge-mtp-peer-") as tmp:
        say("unpacking the pinned llama.cpp source")
        prefix = f"{SDIST.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **kw)
        src = Path(tmp) / prefix
        build = src / "build"
        jobs = jobs or os.cpu_count() or 2
        say(f"building stock llama-server once (a few minutes; log: {log})")
        with open(log, "w") as fh:
            for cmd in (["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", *CMAKE_FLAGS],
                        ["cmake", "--build", str(build), "--target", NAME, "-j", str(jobs)]):
                fh.write("$ " + " ".join(cmd) + "\n")
                fh.flush()
                if subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode != 0:
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                    raise BackendError(f"llama-server build failed (log: {log}):\n{tail}")
        partial = final.with_name(f".{NAME}.partial")
        shutil.copy2(build / "bin" / NAME, partial)
        os.replace(partial, final)  # a binary at the final path is always complete
    say(f"llama-server cached at {final}")
    return final


# -- one server per spec type -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PeerServer:
    """One llama-server process (one spec type), on 127.0.0.1, one slot."""

    binary: Path
    model: Path
    n_ctx: int
    n_threads: int
    spec_type: str | None = None
    log_dir: Path | None = None
    port: int = 0
    no_repack: bool = False  # keep llama.cpp's extra weight buffers (AMX, CPU repack) out
    command: list[str] = field(default_factory=list)
    _proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600.0) -> "PeerServer":
        """Start and wait until healthy. Stock llama.cpp dies of SIGILL while loading on CPUs that
        offer AMX to its weight buffers (seen on an AMX Xeon; edge-mtp's patch P7 keeps AMX out of
        its own build): then it is started once more with --no-repack, which the recorded command
        shows."""
        self.port = self.port or _free_port()
        self.command = [str(self.binary), "-m", str(self.model), "-c", str(self.n_ctx),
                        "-t", str(self.n_threads), "-tb", str(self.n_threads), "-np", "1",
                        "-fa", "on", "--cache-ram", "0", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.spec_type:
            self.command += ["--spec-type", self.spec_type]
        if self.no_repack:
            self.command.append("--no-repack")
        log = open(self.log_path(), "w") if self.log_dir else subprocess.DEVNULL
        self._proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                if self._proc.returncode == -signal.SIGILL and not self.no_repack:
                    say(f"{self.label()} died of SIGILL while loading (stock llama.cpp's AMX weight "
                        "buffers on this CPU); starting it again with --no-repack")
                    self.no_repack, self._proc = True, None
                    return self.start(max(1.0, deadline - time.monotonic()))
                raise BackendError(f"llama-server ({self.label()}) exited with {self._proc.returncode}"
                                   + (f"; log: {self.log_path()}" if self.log_dir else ""))
            try:
                status, _ = self._request("GET", "/health", None, timeout=5)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise BackendError(f"llama-server ({self.label()}) did not become ready in {timeout:.0f} s")

    def label(self) -> str:
        return f"{NAME}:{self.spec_type}" if self.spec_type else NAME

    def log_path(self) -> Path:
        return Path(self.log_dir) / f"{self.label().replace(':', '-')}.log"

    def _request(self, method: str, path: str, body: dict | None, timeout: float = 3600):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def complete(self, tokens: list[int], max_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05) -> dict:
        """One /completion of the prompt's token ids; the response with its timings."""
        body = {"prompt": list(tokens), "n_predict": max_tokens, "temperature": temperature,
                "top_k": top_k, "top_p": top_p, "min_p": min_p, "cache_prompt": False,
                "return_tokens": True, "stream": False}
        if seed is not None:
            body["seed"] = seed
        status, data = self._request("POST", "/completion", body)
        if status != 200:
            raise BackendError(f"llama-server ({self.label()}) answered {status}: {data[:200]!r}")
        return json.loads(data)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def start_servers(strategies: list[str], model: Path, n_ctx: int, n_threads: int,
                  log_dir: Path | None = None) -> dict[str, PeerServer]:
    """Build (once) and start one server per peer strategy; stops them all if one fails. Until
    stop_servers, SIGTERM unwinds this process like Ctrl-C does (its default would end it on the
    spot and leave the llama-server children running)."""
    binary = ensure_server()
    servers: dict[str, PeerServer] = {}
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        for s in strategies:
            say(f"starting {s}")
            servers[s] = PeerServer(binary, Path(model), n_ctx, n_threads, spec_type_of(s),
                                    log_dir).start()
    except BaseException:
        stop_servers(servers)
        raise
    return servers


def stop_servers(servers: dict[str, PeerServer]) -> None:
    for srv in servers.values():
        srv.stop()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
