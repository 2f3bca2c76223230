"""`auto`: speculate only when this device makes it pay, one step at a time.

A verification pass of n rows costs cost(n) plain steps, measured on this machine (edge_mtp.profile:
on 2 cores a Q4_1 model pays 1.5x for 2 rows, its F32 twin 1.1x). Each step auto looks up the
prompt-lookup draft for the current text and the length L of the match it came from, predicts the
chance that each draft token is accepted, and sizes the draft d to maximise the expected gain over
a plain step, in plain-step units:

    gain(d) = sum_{i=1..d} prod_{j=1..i} a(L + j - 1)  -  s * (cost(d + 1) - 1)  -  overhead

where a(l) is the probability that the next draft token is accepted when the match is l tokens
long (accepting a token lengthens the match by one): lookup.py's MatchAcceptance, a Beta
posterior per match length started from priors measured on Spec-Bench's dev split and updated
with every verified draft token of the request. When no d has a positive gain the step is plain,
and after RETRY such steps a one-token draft is tried anyway so that pessimistic estimates can
recover; each failed try doubles the wait (up to MAX_RETRY), a success resets it, so a text that
drafts never fit pays almost nothing for the tries. Drafts also start short, like TCP's slow
start: a request may draft at most FIRST_CAP tokens, the cap doubling after a fully accepted draft
and halving after a rejected first token, so a text whose long matches do not continue (a RAG
answer paraphrasing its passages) loses a 3-row pass, not an 11-row one, before the estimate
learns. The overheads (Python time of a tree step vs a plain step) are tracked online as fractions
of a plain step, and so is s, the measured extra model time of this request's tree steps over the profile's prediction:
the profile is taken at 256 cached tokens, and with a long prompt (RAG, summarization) attention
makes every extra row dearer than that.

Probing masks need a row each on every pass; auto turns them on only when the profile says the
paper's acceptance could pay for them (never on the CPUs measured so far) and reports why not.
Lossless: every step is either plain or a verified tree (verify.py), for greedy and sampling.
"""
from __future__ import annotations

import time

import numpy as np

from ..profile import CONTEXT, GRID, Profile, get_profile
from ..tree import TokenTree
from .base import Strategy
from .dmtd import Dmtd
from .lookup import LONGEST, Lookup, MatchAcceptance

MAX_DRAFT = 10
RETRY = 32    # plain steps with a draft at hand between forced one-token tries
MAX_RETRY = 512
FIRST_CAP = 2
PROBE_MAT = {4: 1.08, 10: 1.18, 30: 1.30, 60: 1.38}  # papers.md / the probing issue: one mask


class Auto(Strategy):
    name = "auto"

    def __init__(self, budget: int = MAX_DRAFT + 1, profile: Profile | None = None):
        super().__init__()
        self.max_draft = max(0, min(MAX_DRAFT, budget - 1))
        self.profile = profile

    def prefill(self, session, prompt):
        split = session.model.dmtd
        late = (split.decoding_layers + split.encoding_layers,) if split else ()
        if session.n_ctx >= CONTEXT + GRID[-1] + 1:
            if self.profile is None or any(str(d) not in self.profile.late_layers for d in late):
                self.profile = get_profile(session, late)  # cached per model, threads and mode
        self.dmtd = None
        if split and self.profile is not None:  # a DMTD model: its own cycle, sized to this device
            self.dmtd = Dmtd(budget=self.dmtd_cycle(split))
            return self.dmtd.prefill(session, prompt)
        self.lookup = Lookup(budget=max(2, self.max_draft + 1))
        self.lookup.start(prompt)
        self.acceptance = MatchAcceptance()
        self.overhead = {"plain": 0.02, "tree": 0.06}  # Python time per step / plain step time
        self.plain_ms = self.profile.step_ms if self.profile else 0.0  # model time of a plain step
        self.row_scale = 1.0  # observed / predicted extra model time of a tree step
        self.kinds = {"plain": 0, "draft": 0, "retry": 0}
        self.since_try, self.retry_after = 0, RETRY
        self.cap = FIRST_CAP
        self.draft_rows = 0
        self.cost = self._cost_table()
        return super().prefill(session, prompt)

    def dmtd_cycle(self, split) -> int:
        """The cycle length tau maximising tau / (head pass over tau rows + (tau - 1) late passes)."""
        late = self.profile.late_layers[str(split.decoding_layers + split.encoding_layers)]
        speed = {tau: tau / (self.profile.cost_of(tau) + (tau - 1) * late)
                 for tau in range(1, split.cycle + 1)}
        return max(speed, key=speed.get)

    def _cost_table(self) -> np.ndarray:
        """cost[n] for n = 0..MAX_DRAFT + 1 rows (no profile: drafting never pays)."""
        n = np.arange(MAX_DRAFT + 2)
        if self.profile is None:
            return np.where(n <= 1, 1.0, np.inf)
        return np.array([1.0 if k <= 1 else self.profile.cost_of(k) for k in n])

    def choose(self, match: int, available: int) -> int:
        """The draft length with the best expected gain over a plain step (0: plain)."""
        d_max = min(available, self.max_draft, self.cap)
        if d_max == 0:
            return 0
        reach = np.cumprod(self.acceptance.along(match, d_max))  # P(first i drafts accepted)
        extra = self.overhead["tree"] - self.overhead["plain"]
        gain = np.cumsum(reach) - self.row_scale * (self.cost[2:d_max + 2] - 1.0) - extra
        best = int(np.argmax(gain))
        return best + 1 if gain[best] > 0 else 0

    def step(self, session, sampler, pending):
        if self.dmtd is not None:
            return self.dmtd.step(session, sampler, pending)
        t0, m0 = time.perf_counter(), session.model_s
        lk = self.lookup
        lk.history.append(pending)
        room = session.room - 1
        match, drafts = lk.find(min(self.max_draft, room), longest=LONGEST)
        d = self.choose(match, len(drafts)) if self.profile is not None else 0
        kind = "draft"
        if d == 0 and drafts and self.profile is not None:
            self.since_try += 1
            if self.since_try >= self.retry_after:
                d, kind, self.since_try = 1, "retry", 0
        if d == 0:
            out = [sampler(session.decode([pending])[-1])]
            kind = "plain"
        else:
            tree = TokenTree()
            parent = tree.add(pending, -1)
            for t in drafts[:d]:
                parent = tree.add(t, parent)
            out = self.verify_tree(session, sampler, tree)[0].tokens
            self.acceptance.learn(match, drafts[:d], out)
            accepted = len(out) - 1
            self.cap = min(2 * self.cap, MAX_DRAFT) if accepted == d else \
                max(1, self.cap // 2) if accepted == 0 else self.cap
            if kind == "retry":
                self.retry_after = RETRY if len(out) > 1 else min(2 * self.retry_after, MAX_RETRY)
            self.draft_rows += d
        lk.history.extend(out[:-1])
        self.kinds[kind] += 1
        if self.profile is not None:
            self._observe(kind, d, session.model_s - m0, time.perf_counter() - t0)
        return out

    def _observe(self, kind: str, d: int, model_s: float, step_s: float) -> None:
        """Track, as running means: a plain step's model time; how much dearer than predicted a
        tree step's extra rows were (clipped to [0.5, 4]: one slow step is not a trend); and the
        Python time of each kind of step as a fraction of a plain step."""
        model_ms = model_s * 1e3
        if kind == "plain":
            self.plain_ms += 0.1 * (model_ms - self.plain_ms)
        else:
            seen = model_ms / self.plain_ms - 1.0
            predicted = max(self.cost[d + 1] - 1.0, 1e-3)  # a curve may price extra rows at 0
            ratio = float(np.clip(seen / predicted, 0.5, 4.0))
            self.row_scale += 0.2 * (ratio - self.row_scale)
        key = "plain" if kind == "plain" else "tree"
        python = (step_s - model_s) * 1e3 / self.profile.step_ms
        self.overhead[key] += 0.1 * (python - self.overhead[key])

    def probe_verdict(self) -> str:
        """Why probing masks are off (or would be on) on this device's curve."""
        if self.profile is None:
            return "no device profile"
        best = max(PROBE_MAT, key=lambda bc: PROBE_MAT[bc] / self.profile.cost_of(bc))
        value = PROBE_MAT[best] / self.profile.cost_of(best)
        return (f"probe:{best} expects {PROBE_MAT[best]:.2f} tokens/step for "
                f"{self.profile.cost_of(best):.2f}x the cost of a plain step ({value:.2f}x plain)")

    def stats(self) -> dict:
        if self.dmtd is not None:
            tau = self.dmtd.tau
            return {"decision": f"dmtd with cycle {tau} of {self.dmtd.cfg.cycle}: the fastest on this "
                                f"device's pass costs (lossy by design: the DMTD model's own output)",
                    **self.dmtd.stats()}
        if self.profile is None:
            return {"decision": "plain: no device profile (context too small to calibrate)",
                    "steps_by_kind": dict(self.kinds)}
        drafts = self.kinds["draft"] + self.kinds["retry"]
        ceiling, at = self.profile.ceiling
        a = self.acceptance.rates()
        return {
            "decision": (f"lookup drafts sized per step by predicted acceptance vs this device's cost "
                         f"curve (2 rows cost {self.profile.cost_of(2):.2f}x, ceiling {ceiling:.2f}x at "
                         f"{at} rows); {self.kinds['plain']} plain steps, {drafts} draft steps; masks off: "
                         f"{self.probe_verdict()}"),
            "steps_by_kind": dict(self.kinds),
            "mean_draft_length": round(self.draft_rows / drafts, 3) if drafts else 0.0,
            "row_cost_scale": round(self.row_scale, 3),
            "acceptance_by_match_length": {str(i): round(float(a[i]), 3) for i in range(1, len(a))},
            "profile": self.profile.key,
        }
