"""Device profile: what one forward pass of n rows costs on this machine, relative to one row.

Speculation pays only if the extra rows of a verification pass cost less than the tokens they
win, so `auto` decides by a measured curve: a tree decode of n rows (n on a grid up to 64) after a
256-token context, plus the graph rebuild it costs the next plain step, divided by the plain step
timed just before it; the median of these ratios over interleaved rounds. A pair whose plain step
was disturbed (another process took the core) is thrown away; a calibration that lost too many,
or whose plain steps spread too widely, is cached as untrusted and taken again by the next process
that needs it. Profiles are cached per model file, threads, backend build and numeric mode.

A calibration is one snapshot of a machine whose state moves, so it is only the prior: auto's
`CostEstimate` re-prices rows from every step it times and writes what it saw back into the
profile (`runs`), where the next process's prior is the per-row-count median of the calibration
and the recent runs, so one busy run cannot overwrite a good curve, nor one busy calibration
poison every later run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
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
FORMAT = 3  # 3: disturbed pairs dropped, trust and runs kept (2: all pairs; 1: fastest of rounds)
DISTURBED = 1.25  # a plain step this much slower than the median one: its pair is thrown away
MAX_DROPPED = 0.25  # a calibration that lost more of its pairs than this is not trusted
MAX_STEP_SPREAD = 0.15  # ... nor one whose kept plain steps spread wider (IQR / median)
STEP_DRIFT = 0.25  # recent runs' plain steps this far from the calibration's: it measured another machine state
RUNS_KEPT = 9  # live estimates kept per profile (one per process)
RUNS_DISAGREE = 1.5  # runs that all find the calibrated rows this far off outvote it


@dataclass
class Profile:
    """cost(n) = time of one n-row verification pass / time of one plain step."""

    key: str
    rows: list[int]
    cost: list[float]
    step_ms: float                      # one plain step, ms
    late_layers: dict[str, float] = field(default_factory=dict)  # "D": 1-row pass through the last D layers / step
    device: dict = field(default_factory=dict)
    spread: list[float] = field(default_factory=list)  # per row count: IQR / median of the ratios
    trusted: bool = True  # False: disturbed while measuring; the next process measures again
    dropped: float = 0.0  # fraction of pairs thrown away as disturbed
    runs: list[dict] = field(default_factory=list)  # recent live estimates: {"id", "step_ms", "cost": {n: c}}

    def cost_of(self, n: float) -> float:
        """Relative cost of n rows (linear between measured points, linear extrapolation past them)."""
        return float(self.costs(np.array([n]))[0])

    def calibration_counts(self) -> bool:
        """Whether the calibrated curve gets a vote in the prior: it was trusted, and recent runs
        (two or more) did not see a plain step more than STEP_DRIFT away from its own, nor agree
        that its rows cost more than RUNS_DISAGREE times (or less than 1 / RUNS_DISAGREE of) what
        they measured."""
        steps = [r["step_ms"] for r in self.runs]
        if not self.trusted:
            return False
        if len(steps) < 2:
            return True
        scales = [fit_scale([(self.cost_of(int(n)) - 1.0, c - 1.0, 1, int(n)) for n, c in r["cost"].items()], 0.0)
                  for r in self.runs if r["cost"]]
        off = len(scales) >= 2 and (all(x > RUNS_DISAGREE for x in scales)
                                    or all(x < 1 / RUNS_DISAGREE for x in scales))
        return abs(self.step_ms / float(np.median(steps)) - 1) <= STEP_DRIFT and not off

    def prior(self) -> "Profile":
        """The curve a new estimate starts from: per row count the median of the calibration (when
        it counts) and the recent runs that timed that count; counts no run timed follow the
        calibrated shape, scaled as the runs scale it."""
        seen: dict[int, list[float]] = {}
        for run in self.runs:
            for n, c in run["cost"].items():
                seen.setdefault(int(n), []).append(float(c))
        if not seen:
            return self
        counts = self.calibration_counts()
        scale = fit_scale([(self.cost_of(n) - 1.0, float(np.median(v)) - 1.0, len(v), n)
                           for n, v in seen.items()], 1.0 if counts else 0.0)
        rows = sorted(set(self.rows) | set(seen))
        cost = []
        for n in rows:
            shaped = 1.0 + scale * extra_floor(self.cost_of(n) - 1.0, n)
            votes = (seen[n] + ([self.cost_of(n)] if counts else [])) if n in seen else [shaped]
            cost.append(1.0 if n == 1 else float(np.median(votes)))
        steps = [r["step_ms"] for r in self.runs] + ([self.step_ms] if counts else [])
        return Profile(self.key, rows, list(np.maximum.accumulate(cost)), float(np.median(steps)),
                       self.late_layers, self.device, self.spread, self.trusted, self.dropped, self.runs)

    def costs(self, n: np.ndarray) -> np.ndarray:
        """cost_of for an array of row counts."""
        n = np.asarray(n, dtype=float)
        out = np.interp(n, self.rows, self.cost)
        slope = (self.cost[-1] - self.cost[-2]) / (self.rows[-1] - self.rows[-2])
        beyond = n > self.rows[-1]
        out[beyond] = self.cost[-1] + slope * (n[beyond] - self.rows[-1])
        return out

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
        if self.spread:
            lines.insert(4, "| spread | " + " | ".join(f"{s:.2f}" for s in self.spread) + " |")
        for d, c in sorted(self.late_layers.items(), key=lambda kv: int(kv[0])):
            lines.append(f"one row through the last {d} layers: {c:.3f} of a full step")
        if not self.trusted:
            lines.append(f"NOT TRUSTED: the machine was busy while measuring ({self.dropped:.0%} of the "
                         f"pairs disturbed); auto re-prices rows as it runs and the next run measures again")
        return "\n".join(lines)

    def show(self) -> str:
        """The calibration, what recent runs saw, and the curve auto starts from now."""
        lines = [self.table(), "", f"{len(self.runs)} recent runs re-priced rows "
                 f"(calibration {'counts' if self.calibration_counts() else 'outvoted: its plain step or trust is off'}):"]
        for r in self.runs:
            seen = ", ".join(f"{n} rows {c:.2f}" for n, c in sorted(r["cost"].items(), key=lambda kv: int(kv[0])))
            lines.append(f"  plain step {r['step_ms']:.2f} ms; {seen or 'no tree steps'}")
        if self.runs:
            prior = self.prior()
            lines.append("auto starts from: " + ", ".join(
                f"{n} rows {prior.cost_of(n):.2f}" for n in (2, 4, 8, 16, 32, 64)))
        return "\n".join(lines)


EXTRA_FLOOR = 0.05  # plain steps per extra row: a curve pricing rows at nothing still scales


def extra_floor(extra, n):
    """A curve's extra cost of n rows, at least EXTRA_FLOOR per extra row (so that a scale fitted
    against an optimistic curve, which prices every row at 0, still moves it); arrays too."""
    return np.maximum(extra, EXTRA_FLOOR * (np.asarray(n) - 1))


def fit_scale(pairs, prior_weight: float) -> float:
    """The factor by which observed extra costs exceed a curve's, from (curve extra, observed
    extra, weight, rows) pairs: a weighted geometric mean, with a pseudo-observation of 1 at
    prior_weight (the curve is right until shown otherwise); within [0.02, 50]."""
    num, den = 0.0, prior_weight
    for extra, seen, weight, n in pairs:
        w = min(weight, 10)
        num += w * math.log(max(seen, 1e-3) / max(extra, EXTRA_FLOOR * (n - 1)))  # extra_floor, scalar
        den += w
    return min(max(math.exp(num / den), 0.02), 50.0) if den else 1.0


def profile_key(session: Session) -> str:
    """Identity of what the curve depends on (a changed model or adapter file, build or mode
    re-measures; an adapter's extra matmuls make its curve its own, never mixed with the base's)."""
    from .backend.native import build_key

    files = [session.model.path] + ([session.model.lora] if session.model.lora else [])
    parts = []
    for path in files:
        st = os.stat(path)
        parts += [str(Path(path).resolve()), str(st.st_size), str(st.st_mtime_ns)]
    parts += [f"threads={session.n_threads}", f"build={build_key()}", f"exact={session.exact_rows}",
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
        session.decode(chains[n], parents[n])
        dt = time.perf_counter() - t0
        session.commit([])
        return dt

    def late(d: int) -> float:
        with session.layer_range(model.n_layer - d):
            t0 = time.perf_counter()
            session.decode(embd=np.zeros((1, model.n_embd), np.float32), logits="all")
            dt = time.perf_counter() - t0
        session.truncate(CONTEXT)
        return dt

    jobs = [(rows, n) for n in GRID[1:]] + [(late, d) for d in late_layers]
    for fn, arg in jobs:  # warm-up: every shape once (graph allocation, caches)
        fn(arg)
        plain()
    pairs: list[tuple[tuple, float, float]] = []  # (job, its plain step, ratio)
    for r in range(rounds):
        for i in rng.permutation(len(jobs)):
            fn, arg = jobs[i]
            plain()  # the graph is a plain step's, as when decoding switches to a tree step
            step, t = plain(), fn(arg)
            # a tree step also costs the next plain step its graph rebuild (llama.cpp re-uses a
            # graph only for the same shape): about 0.5 ms here, 7% of a plain step of the default
            back = plain() - step if fn is rows else 0.0
            pairs.append(((fn.__name__, arg), step, (t + back) / step))
        if progress:
            progress(r + 1, rounds)
    ratios, steps, dropped = robust_ratios(pairs)
    # each pass timed against the plain step just before it (slow drifts of the machine cancel),
    # the median over rounds (a stray slow pass moves nothing)
    med = {job: float(np.median(v)) for job, v in ratios.items()}
    cost = np.maximum.accumulate([1.0] + [med[("rows", n)] for n in GRID[1:]])
    spread = [0.0] + [float(np.subtract(*np.percentile(ratios[("rows", n)], [75, 25]))) / med[("rows", n)]
                      for n in GRID[1:]]
    q75, q25 = np.percentile(steps, [75, 25])
    trusted = dropped <= MAX_DROPPED and (q75 - q25) / float(np.median(steps)) <= MAX_STEP_SPREAD
    prof = Profile(profile_key(session), list(GRID), [round(float(c), 4) for c in cost],
                   round(float(np.median(steps)) * 1e3, 4),
                   {str(d): round(med[("late", d)], 4) for d in late_layers}, device_info(session),
                   [round(x, 3) for x in spread], bool(trusted), round(dropped, 3))
    old = load_profile(session)
    if old is not None:
        prof.runs = old.runs  # what runs saw stays: the new calibration is one more vote
    save_profile(prof)
    return prof


def robust_ratios(pairs) -> tuple[dict[tuple, list[float]], list[float], float]:
    """Throw away the pairs whose plain step was DISTURBED-times slower than the median step (the
    core was taken while timing them; both halves of such a pair are suspect), keeping at least
    one per job. Returns the kept ratios per job, the kept plain steps, the fraction dropped."""
    median = float(np.median([step for _, step, _ in pairs]))
    ratios: dict[tuple, list[float]] = {}
    steps, dropped = [], 0
    for job, step, ratio in pairs:
        if step > DISTURBED * median:
            dropped += 1
            continue
        ratios.setdefault(job, []).append(ratio)
        steps.append(step)
    for job, step, ratio in pairs:  # a job whose every pair was disturbed keeps them all
        if job not in ratios:
            ratios.setdefault(job, []).extend(r for j, _, r in pairs if j == job)
    return ratios, steps or [step for _, step, _ in pairs], dropped / len(pairs)


def save_profile(prof: Profile) -> None:
    path = profile_path(prof.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.partial")
    tmp.write_text(json.dumps(asdict(prof), indent=1))
    os.replace(tmp, path)


def record_run(prof: Profile, run: dict) -> None:
    """Merge one live estimate into the cached profile: it replaces this run's earlier entry (a
    long-lived engine writes after each request) and the oldest fall out past RUNS_KEPT."""
    path = profile_path(prof.key)
    try:
        cached = Profile(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        cached = prof
    cached.runs = [r for r in cached.runs if r.get("id") != run["id"]][-(RUNS_KEPT - 1):] + [run]
    save_profile(cached)


class CostEstimate:
    """The cost of n rows as auto sees it now, in plain steps: the profile's prior (calibration
    and recent runs) moved by every step timed in this process.

    A plain step's model time is a running mean (its first samples replace the prior's at once: a
    profile taken on a busy machine says nothing about now). A tree step of n rows gives a ratio
    to it; per row count the ratios are a running mean that outweighs the prior after a single
    step (timings swing 10-30%, priors can be off 3x), and together they scale the prior's shape
    for the row counts not timed yet (fit_scale). `tested(n)` says whether n was timed recently
    enough to trust; auto explores the others (edge_mtp.strategies.auto)."""

    PRIOR_WEIGHT = 0.25  # in steps: one timed step outweighs the prior 4 to 1
    RECENT = 256  # steps after which a row count's timing is stale enough to be worth re-testing

    def __init__(self, profile: Profile):
        self.profile = profile
        self.prior = profile.prior()
        self.plain_ms = self.prior.step_ms
        self.plain_steps = 0
        self.seen: dict[int, list[float]] = {}  # n -> [mean ratio, steps timed, step last timed]
        self.scale = 1.0
        self.steps = 0
        self.run = os.urandom(4).hex()  # this estimate's entry in the profile's runs
        self._shape = np.zeros(0)  # the prior's extra cost per row count (extra_floor), grown on demand

    def _prior_extra(self, max_rows: int) -> np.ndarray:
        """extra_floor(prior cost - 1) for n = 0..max_rows (auto asks every step: kept, not recomputed)."""
        if len(self._shape) <= max_rows:
            n = np.arange(max_rows + 1)
            self._shape = extra_floor(self.prior.costs(n) - 1.0, n)
        return self._shape[:max_rows + 1]

    def new_request(self) -> None:
        """A new context length: its first plain steps re-weight the plain step's mean quickly."""
        self.plain_steps = min(self.plain_steps, 3)

    def cost(self, n: int) -> float:
        return float(self.table(n)[n])

    def table(self, max_rows: int) -> np.ndarray:
        """cost[n] for n = 0..max_rows: the prior's shape times the fitted scale, blended per timed
        count with its running mean."""
        out = 1.0 + self.scale * self._prior_extra(max_rows)
        for m, (mean, k, _) in self.seen.items():
            if m <= max_rows:
                out[m] = (self.PRIOR_WEIGHT * out[m] + k * mean) / (self.PRIOR_WEIGHT + k)
        out[:2] = 1.0
        return out

    def tested(self, n: int) -> bool:
        seen = self.seen.get(n)
        return seen is not None and seen[1] >= 2 and self.steps - seen[2] < self.RECENT

    def observe(self, n: int, model_ms: float) -> None:
        """One timed step of n rows (its model time, ms)."""
        self.steps += 1
        if n <= 1:
            self.plain_steps += 1
            self.plain_ms += max(0.1, 1.0 / self.plain_steps) * (model_ms - self.plain_ms)
            return
        ratio = model_ms / self.plain_ms
        mean, k, _ = self.seen.get(n, (ratio, 0, 0))
        k = min(k + 1, 10)  # a running mean over about the last 10 timings of n rows
        self.seen[n] = [mean + (ratio - mean) / k, k, self.steps]
        shape = self._prior_extra(max(self.seen))
        self.scale = fit_scale([(shape[m], mean - 1.0, k, m) for m, (mean, k, _) in self.seen.items()],
                               self.PRIOR_WEIGHT)

    def report(self) -> dict:
        timed = sorted(self.seen)
        return {"plain_step_ms": round(self.plain_ms, 3), "profile_step_ms": round(self.prior.step_ms, 3),
                "row_cost_scale": round(self.scale, 3),
                "row_cost": {str(n): round(self.cost(n), 3) for n in timed},
                "row_cost_prior": {str(n): round(self.prior.cost_of(n), 3) for n in timed},
                "calibration_trusted": self.profile.trusted}

    def write_back(self) -> None:
        """Record what this process saw in the cached profile (a single timing is one vote among
        the calibration and the other runs' in the next prior's median)."""
        cost = {str(n): round(v[0], 4) for n, v in self.seen.items()}
        if self.plain_steps >= 8 or cost:
            try:
                record_run(self.profile, {"id": self.run, "step_ms": round(self.plain_ms, 4), "cost": cost})
            except OSError:
                pass  # a read-only cache: this process still uses what it learned


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
            batch = s.decode(rows, logits="all").copy()
            s.truncate(len(context))
            single = np.stack([s.decode([t])[-1].copy() for t in rows])
        _ROW_NOISE[key] = float(np.abs(batch - single).max())
    return _ROW_NOISE[key]


_REMEASURED: set[str] = set()


def get_profile(session: Session, late_layers: tuple[int, ...] = ()) -> Profile | None:
    """The cached profile of this session's model and mode, measured now if there is none, it
    lacks a late-layer pass that is asked for, or it was not trusted (once per process: a machine
    that stays busy keeps an untrusted profile, which the live estimate then corrects); None when
    the session's context is too small to calibrate in."""
    if session.n_ctx < CONTEXT + GRID[-1] + 1:
        return None
    prof = load_profile(session)
    missing = prof is None or any(str(d) not in prof.late_layers for d in late_layers)
    if missing or (not prof.trusted and prof.key not in _REMEASURED):
        late = tuple(sorted({*late_layers, *(int(d) for d in (prof.late_layers if prof else {}))}))
        prof = measure(session, late_layers=late)
        _REMEASURED.add(prof.key)
    return prof
