"""Device profile: what one forward pass of n rows costs on this machine, relative to one row.

Speculation pays only if the extra rows of a verification pass cost less than the tokens they win
(measured-facts.md: on 2 cores 8 rows cost 4.7 single steps for a Q4_1 model, 1.8 for its F32
twin). `auto` reads this curve to decide, so it is measured, not assumed: a tree decode of n rows
(n on a grid up to 64) after a 256-token context, interleaved over several rounds, the fastest
round per n (interference only adds time) divided by the fastest plain one-token step. Profiles
are cached per model file, thread count, backend build and numeric mode (exact rows and flash
attention change the kernels, and so the cost).
"""
from __future__ import annotations

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
FORMAT = 1


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


def measure(session: Session, rounds: int = 5, late_layers: tuple[int, ...] = (),
            progress=None) -> Profile:
    """Time the grid on this session (its cache is cleared before and after) and cache the result."""
    model = session.model
    need = CONTEXT + GRID[-1] + 1
    if session.n_ctx < need:
        raise ValueError(f"calibration needs a context of at least {need} tokens")
    rng = np.random.default_rng(0)
    context = rng.integers(100, model.n_vocab, CONTEXT).tolist()
    session.clear()
    session.prefill(context)
    chains = {n: rng.integers(100, model.n_vocab, n).astype(np.int32) for n in GRID}
    parents = {n: np.arange(-1, n - 1, dtype=np.int32) for n in GRID}

    def one(n: int) -> float:
        t0 = time.perf_counter()
        if n == 1:  # exactly what a plain step does
            session.decode(chains[1])
            dt = time.perf_counter() - t0
            session.truncate(CONTEXT)
        else:
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

    jobs = [(one, n) for n in GRID] + [(late, d) for d in late_layers]
    for fn, arg in jobs:  # warm-up: every shape once (graph allocation, caches)
        fn(arg)
    times: dict[tuple, list[float]] = {}
    for r in range(rounds):
        order = rng.permutation(len(jobs))
        for i in order:
            fn, arg = jobs[i]
            times.setdefault((fn.__name__, arg), []).append(fn(arg))
        if progress:
            progress(r + 1, rounds)
    session.clear()
    # the fastest round per shape: interference (other processes, frequency dips) only adds time
    step = min(times[("one", 1)])
    cost = np.maximum.accumulate([min(times[("one", n)]) / step for n in GRID])  # more rows never cost less
    prof = Profile(profile_key(session), list(GRID), [round(float(c), 4) for c in cost],
                   round(step * 1e3, 4),
                   {str(d): round(min(times[("late", d)]) / step, 4) for d in late_layers},
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
    tokens one at a time (0 under exact rows). Measured once per model, threads and mode; the
    session's cache is cleared."""
    key = profile_key(session)
    if key not in _ROW_NOISE:
        rng = np.random.default_rng(1)
        vocab = session.model.n_vocab
        context = rng.integers(100, vocab, 32).tolist()
        rows = rng.integers(100, vocab, NOISE_ROWS).tolist()
        session.clear()
        session.prefill(context)
        batch = session.decode(rows, all_logits=True).copy()
        session.truncate(len(context))
        single = np.stack([session.decode([t])[-1].copy() for t in rows])
        session.clear()
        _ROW_NOISE[key] = float(np.abs(batch - single).max())
    return _ROW_NOISE[key]


def get_profile(session: Session, late_layers: tuple[int, ...] = ()) -> Profile:
    """The cached profile of this session's model and mode, measured now if there is none (or it
    lacks a late-layer pass that is asked for)."""
    prof = load_profile(session)
    if prof is None or any(str(d) not in prof.late_layers for d in late_layers):
        prof = measure(session, late_layers=late_layers)
    return prof
