"""Device profile: what one forward pass of n rows costs on this machine, relative to one row.

Speculation pays only if the extra rows of a verification pass cost less than the tokens they win
(measured-facts.md: on 2 cores 8 rows cost 4.7 single steps for a Q4_1 model, 1.8 for its F32
twin). `auto` reads this curve to decide, so it is measured, not assumed: a tree decode of n rows
(n on a grid up to 64) after a 256-token context, plus the graph rebuild it costs the plain step
after it, divided by the plain one-token step timed just before it; the median of these ratios
over several interleaved rounds (taking the fastest round of each instead swung the 2-row cost of
the F32 twin between 1.16 and 1.53 from one calibration to the next). Profiles
are cached per model file, thread count, backend build and numeric mode (exact rows and flash
attention change the kernels, and so the cost).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .backend import Session
from .models import cache_dir

GRID = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64)
CONTEXT = 256  # cached tokens before each measured pass, as in measured-facts.md
FORMAT = 2  # 2: paired medians with the graph switch-back (1: fastest of rounds)


@dataclass
class Profile:
    """cost(n) = time of one n-row verification pass / time of one plain step."""

    key: str
    rows: list[int]
    cost: list[float]
    step_ms: float                      # one plain step, ms
    late_layers: dict[str, float] = field(default_factory=dict)  # "D": 1-row pass through the last D layers / step
    device: dict = field(default_factory=dict)

    def cost_of(self, n: float) -> float:
        """Relative cost of n rows (linear between measured points, linear extrapolation past them)."""
        rows, cost = self.rows, self.cost
        if n <= rows[-1]:
            return float(np.interp(n, rows, cost))
        slope = (cost[-1] - cost[-2]) / (rows[-1] - rows[-2])
        return cost[-1] + slope * (n - rows[-1])

    @property
    def ceiling(self) -> tuple[float, int]:
        """(max over n of n / cost(n), the n reaching it): the best any verify-based method can do."""
        best = max(range(len(self.rows)), key=lambda i: self.rows[i] / self.cost[i])
        return self.rows[best] / self.cost[best], self.rows[best]

    def table(self) -> str:
        lines = [f"plain step {self.step_ms:.2f} ms; cost of one pass of n rows, relative to it:",
                 "| rows | " + " | ".join(str(n) for n in self.rows) + " |",
                 "|---|" + "---|" * len(self.rows),
                 "| cost | " + " | ".join(f"{c:.2f}" for c in self.cost) + " |",
                 "| n / cost | " + " | ".join(f"{n / c:.2f}" for n, c in zip(self.rows, self.cost)) + " |"]
        ceiling, at = self.ceiling
        lines.append(f"ceiling for verify-based speculation: {ceiling:.2f}x (at {at} rows)")
        for d, c in sorted(self.late_layers.items(), key=lambda kv: int(kv[0])):
            lines.append(f"one row through the last {d} layers: {c:.3f} of a full step")
        return "\n".join(lines)


def profile_key(session: Session) -> str:
    """Identity of what the curve depends on (a changed model file, build or mode re-measures)."""
    from .backend.native import build_key

    st = os.stat(session.model.path)
    parts = [str(Path(session.model.path).resolve()), str(st.st_size), str(st.st_mtime_ns),
             f"threads={session.n_threads}", f"build={build_key()}", f"exact={session.exact_rows}",
             f"flash={session.flash_attn}", f"format={FORMAT}", platform.machine()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def profile_path(key: str) -> Path:
    return cache_dir() / "profiles" / f"{key}.json"


def load_profile(session: Session) -> Profile | None:
    path = profile_path(profile_key(session))
    try:
        return Profile(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def device_info(session: Session) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": session.n_threads,
            "os": f"{platform.system()} {platform.release()}", "exact_rows": session.exact_rows,
            "flash_attn": session.flash_attn, "model": Path(session.model.path).name}


@contextlib.contextmanager
def scratch(session: Session, n_ctx: int):
    """A short-lived second context over the session's weights, threads and numeric mode, so a
    measurement never touches the serving context: its KV cache and the prompt prefix it
    re-uses survive a calibration inside a request."""
    s = Session(session.model, n_ctx=n_ctx, n_threads=session.n_threads,
                flash_attn=session.flash_attn, exact_rows=session.exact_rows)
    try:
        yield s
    finally:
        s.close()


def measure(session: Session, rounds: int = 7, late_layers: tuple[int, ...] = (),
            progress=None) -> Profile:
    """Time the grid for this session's model and mode (on a scratch context) and cache it."""
    with scratch(session, CONTEXT + GRID[-1] + 1) as s:
        return _measure(s, rounds, late_layers, progress)


def _measure(session: Session, rounds: int, late_layers: tuple[int, ...], progress) -> Profile:
    model = session.model
    rng = np.random.default_rng(0)
    context = rng.integers(100, model.n_vocab, CONTEXT).tolist()
    session.prefill(context)
    chains = {n: rng.integers(100, model.n_vocab, n).astype(np.int32) for n in GRID}
    parents = {n: np.arange(-1, n - 1, dtype=np.int32) for n in GRID}

    def plain() -> float:  # exactly what a plain step does
        t0 = time.perf_counter()
        session.decode(chains[1])
        dt = time.perf_counter() - t0
        session.truncate(CONTEXT)
        return dt

    def rows(n: int) -> float:
        t0 = time.perf_counter()
        session.decode_tree(chains[n], parents[n])
        dt = time.perf_counter() - t0
        session.commit([])
        return dt

    def late(d: int) -> float:
        session.set_layers(model.n_layer - d)
        t0 = time.perf_counter()
        session.decode_rows(embd=np.zeros((1, model.n_embd), np.float32))
        dt = time.perf_counter() - t0
        session.set_layers()
        session.truncate(CONTEXT)
        return dt

    jobs = [(rows, n) for n in GRID[1:]] + [(late, d) for d in late_layers]
    for fn, arg in jobs:  # warm-up: every shape once (graph allocation, caches)
        fn(arg)
        plain()
    steps: list[float] = []
    ratios: dict[tuple, list[float]] = {}
    for r in range(rounds):
        for i in rng.permutation(len(jobs)):
            fn, arg = jobs[i]
            plain()  # the graph is a plain step's, as when decoding switches to a tree step
            step, t = plain(), fn(arg)
            # a tree step also costs the next plain step its graph rebuild (llama.cpp re-uses a
            # graph only for the same shape): about 0.5 ms here, 7% of a plain step of the default
            back = plain() - step if fn is rows else 0.0
            steps.append(step)
            ratios.setdefault((fn.__name__, arg), []).append((t + back) / step)
        if progress:
            progress(r + 1, rounds)
    # each pass timed against the plain step just before it (slow drifts of the machine cancel),
    # the median over rounds (a stray slow pass moves nothing)
    cost = np.maximum.accumulate([1.0] + [float(np.median(ratios[("rows", n)])) for n in GRID[1:]])
    prof = Profile(profile_key(session), list(GRID), [round(float(c), 4) for c in cost],
                   round(float(np.median(steps)) * 1e3, 4),
                   {str(d): round(float(np.median(ratios[("late", d)])), 4) for d in late_layers},
                   device_info(session))
    path = profile_path(prof.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(asdict(prof), indent=1))
    os.replace(tmp, path)
    return prof


_ROW_NOISE: dict[str, float] = {}
NOISE_ROWS = 16


def row_noise(session: Session) -> float:
    """How far a batch row's logits can stray from single-token decoding in this session's mode:
    the max abs difference over a NOISE_ROWS-row batch after 32 tokens of context vs the same
    tokens one at a time (0 under exact rows). Measured once per model, threads and mode, on a
    scratch context."""
    key = profile_key(session)
    if key not in _ROW_NOISE:
        rng = np.random.default_rng(1)
        vocab = session.model.n_vocab
        context = rng.integers(100, vocab, 32).tolist()
        rows = rng.integers(100, vocab, NOISE_ROWS).tolist()
        with scratch(session, len(context) + NOISE_ROWS) as s:
            s.prefill(context)
            batch = s.decode(rows, all_logits=True).copy()
            s.truncate(len(context))
            single = np.stack([s.decode([t])[-1].copy() for t in rows])
        _ROW_NOISE[key] = float(np.abs(batch - single).max())
    return _ROW_NOISE[key]


def get_profile(session: Session, late_layers: tuple[int, ...] = ()) -> Profile:
    """The cached profile of this session's model and mode, measured now if there is none (or it
    lacks a late-layer pass that is asked for)."""
    prof = load_profile(session)
    if prof is None or any(str(d) not in prof.late_layers for d in late_layers):
        prof = measure(session, late_layers=late_layers)
    return prof
