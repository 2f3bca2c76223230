"""`auto`: speculate only when this device makes it pay, one step at a time.

A verification pass of n rows costs cost(n) plain steps, measured on this machine (edge_mtp.profile:
on 2 cores a Q4_1 model pays about 2x for 2 rows, its F32 twin 1.2-1.6x). Each step auto looks up
the prompt-lookup draft for the current text and the length L of the match it came from, predicts
the chance that each draft token is accepted, and sizes the draft d to maximise the expected gain
over a plain step, in plain-step units:

    gain(d) = sum_{i=1..d} prod_{j=1..i} a_j  -  s * (cost(d + 1) - 1)  -  overhead

where a_j is the probability that draft token j is accepted: lookup.py's MatchAcceptance, priors
per match-length bucket measured on Spec-Bench's dev split (accepting a token lengthens the match
by one; a 1-token match predicts 0.25, a 49+ token one, a passage being copied, 0.99), shifted on
the logit scale by what the text says about each token (whether it continues a word, and for the
first one whether the matched n-gram was always followed by it) and by one offset per request,
learned online from every draft token whose truth becomes known: those of verified drafts, and
the first draft token of every plain step taken while a draft was at hand, which the step itself
tests for free (tools/auto_replay.py measures the priors and replays this policy offline). When
no d has a positive gain the step is plain. Drafts also start short, like TCP's slow
start: a request may draft at most FIRST_CAP tokens, the cap doubling after a fully accepted draft
and halving after a rejected first token, so a text whose long matches do not continue (a RAG
answer paraphrasing its passages) loses a 5-row pass, not an 11-row one, before the estimate
learns. The overheads (Python time of a tree step vs a plain step) are tracked online as fractions
of a plain step, and so is s, the measured extra model time of this request's tree steps over the
profile's prediction: the machine's state moves the curve (the F32 twin's 2-row cost measured
1.16 to 1.62 plain steps from one process to the next), far more than the context does (the
default model's 2-row cost: 2.12 at 256 cached tokens, 2.02 at 1280, 2.05 at 2048; one run).

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
from .lookup import BUCKET_START, LONGEST, Lookup, MatchAcceptance, continues_word

MAX_DRAFT = 10
FIRST_CAP = 4
PROBE_MAT = {4: 1.08, 10: 1.18, 30: 1.30, 60: 1.38}  # papers.md / the probing issue: one mask


def cost_table(profile: Profile | None, max_draft: int = MAX_DRAFT) -> np.ndarray:
    """cost[n] for n = 0..max_draft + 1 rows, in plain steps (no profile: drafting never pays)."""
    n = np.arange(max_draft + 2)
    if profile is None:
        return np.where(n <= 1, 1.0, np.inf)
    return np.array([1.0 if k <= 1 else profile.cost_of(k) for k in n])


class DraftPolicy:
    """auto's drafting decisions, apart from the session: how long a lookup draft to verify this
    step (0: a plain step), and what each step teaches. tools/auto_replay.py drives the same
    object along recorded greedy text to tune it offline."""

    def __init__(self, cost: np.ndarray, max_draft: int = MAX_DRAFT):
        self.cost = [float(c) for c in cost]  # cost[n]: a pass of n rows, in plain steps
        self.max_draft = max_draft
        self.acceptance = MatchAcceptance()
        self.overhead = {"plain": 0.02, "tree": 0.06}  # Python time per step / plain step time
        self.row_scale = 1.0  # observed / predicted extra model time of a tree step
        self.cap = FIRST_CAP

    def choose(self, match: int, available: int, continues=None,
               support: tuple[int, int] = (0, 0)) -> int:
        """The draft length with the best expected gain over a plain step (0: plain);
        continues and support describe the draft (MatchAcceptance.along)."""
        d_max = min(available, self.max_draft, self.cap)
        if d_max == 0:
            return 0
        extra = self.overhead["tree"] - self.overhead["plain"]
        price = [self.row_scale * (self.cost[d + 1] - 1.0) + extra for d in range(d_max + 1)]
        first = self.acceptance.along(match, 1, continues, support)[0]
        if all(first * d <= price[d] for d in range(1, d_max + 1)):
            return 0  # P(reaching token i) <= the first one's acceptance: none can pay (most steps)
        best, best_gain, tokens, reach = 0, 0.0, 0.0, 1.0
        for d, a in enumerate(self.acceptance.along(match, d_max, continues, support), 1):
            reach *= a  # P(the first d drafts are all accepted)
            tokens += reach
            if tokens - price[d] > best_gain:
                best, best_gain = d, tokens - price[d]
        return best

    def learn(self, match: int, drafts: list[int], out: list[int], continues=None,
              support: tuple[int, int] = (0, 0), verified: bool = True) -> None:
        """What a step showed: out is the accepted drafts and the bonus token of a verified draft,
        or the one token a plain step chose while drafts were at hand (which tests the first
        draft token for free, so the estimate learns even while auto drafts nothing)."""
        self.acceptance.learn(match, drafts, out, continues, support)
        if verified:
            accepted, d = len(out) - 1, len(drafts)
            self.cap = min(2 * self.cap, MAX_DRAFT) if accepted == d else \
                max(1, self.cap // 2) if accepted == 0 else self.cap

    def observe(self, drafted: int, extra_model: float, python: float) -> None:
        """A measured step, in plain steps: extra_model = its model time - 1 (tree steps), python =
        its Python time. Running means of how much dearer than predicted the extra rows were
        (clipped to [0.5, 4]: one slow step is not a trend) and of each kind's Python time."""
        if drafted:
            predicted = max(self.cost[drafted + 1] - 1.0, 1e-3)  # a curve may price extra rows at 0
            ratio = min(max(extra_model / predicted, 0.5), 4.0)
            self.row_scale += 0.2 * (ratio - self.row_scale)
        key = "tree" if drafted else "plain"
        self.overhead[key] += 0.1 * (python - self.overhead[key])


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
        self.policy = DraftPolicy(cost_table(self.profile, self.max_draft), self.max_draft)
        self.plain_ms = self.profile.step_ms if self.profile else 0.0  # model time of a plain step
        self.kinds = {"plain": 0, "draft": 0}
        self.draft_rows = 0
        return super().prefill(session, prompt)

    def dmtd_cycle(self, split) -> int:
        """The cycle length tau maximising tau / (head pass over tau rows + (tau - 1) late passes)."""
        late = self.profile.late_layers[str(split.decoding_layers + split.encoding_layers)]
        speed = {tau: tau / (self.profile.cost_of(tau) + (tau - 1) * late)
                 for tau in range(1, split.cycle + 1)}
        return max(speed, key=speed.get)

    def step(self, session, sampler, pending):
        if self.dmtd is not None:
            return self.dmtd.step(session, sampler, pending)
        t0, m0 = time.perf_counter(), session.model_s
        lk = self.lookup
        lk.history.append(pending)
        room = session.room - 1
        match, drafts = lk.find(min(self.max_draft, room), longest=LONGEST)
        d, continues = 0, None
        if self.profile is not None and drafts:
            piece = session.model.piece  # the policy looks at most `cap` tokens ahead
            continues = [continues_word(piece(t)) for t in drafts[:self.policy.cap]]
            d = self.policy.choose(match, len(drafts), continues, lk.support)
        if d == 0:
            out = [sampler(session.decode([pending])[-1])]
            if continues is not None:  # a draft was at hand: the step tested its first token
                self.policy.learn(match, drafts[:1], out, continues, lk.support, verified=False)
        else:
            tree = TokenTree()
            parent = tree.add(pending, -1)
            for t in drafts[:d]:
                parent = tree.add(t, parent)
            out = self.verify_tree(session, sampler, tree)[0].tokens
            self.policy.learn(match, drafts[:d], out, continues, lk.support)
            self.draft_rows += d
        lk.history.extend(out[:-1])
        self.kinds["draft" if d else "plain"] += 1
        if self.profile is not None:
            self._observe(d, session.model_s - m0, time.perf_counter() - t0)
        return out

    def _observe(self, drafted: int, model_s: float, step_s: float) -> None:
        """Feed the policy this step's measured times, in plain steps (a plain step's model time
        is itself a running mean)."""
        model_ms = model_s * 1e3
        if not drafted:
            self.plain_ms += 0.1 * (model_ms - self.plain_ms)
        extra = model_ms / self.plain_ms - 1.0
        self.policy.observe(drafted, extra, (step_s - model_s) * 1e3 / self.profile.step_ms)

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
        drafts = self.kinds["draft"]
        ceiling, at = self.profile.ceiling
        acceptance = self.policy.acceptance
        return {
            "decision": (f"lookup drafts sized per step by predicted acceptance vs this device's cost "
                         f"curve (2 rows cost {self.profile.cost_of(2):.2f}x, ceiling {ceiling:.2f}x at "
                         f"{at} rows); {self.kinds['plain']} plain steps, {drafts} draft steps; masks off: "
                         f"{self.probe_verdict()}"),
            "steps_by_kind": dict(self.kinds),
            "mean_draft_length": round(self.draft_rows / drafts, 3) if drafts else 0.0,
            "row_cost_scale": round(self.policy.row_scale, 3),
            "acceptance_offset": round(acceptance.offset, 3),  # logit, learned in this request
            "acceptance_by_match_length": {f"{start}+": round(acceptance.at(int(start)), 3)
                                           for start in BUCKET_START},
            "profile": self.profile.key,
        }
