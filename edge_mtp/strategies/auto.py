"""`auto`: speculate only when this device makes it pay, one step at a time.

A verification pass of n rows costs cost(n) plain steps on this machine (edge_mtp.profile). Each
step auto takes the prompt-lookup draft for the current text and sizes it to maximise the
expected tokens per unit of time, in plain-step units:

    rate(d) = (1 + sum_{i=1..d} prod_{j=1..i} a_j) / (cost(d + 1) + overhead_tree)

against a plain step's 1 / (1 + overhead_plain); a_j, the chance that draft token j is accepted,
is lookup.py's MatchAcceptance (priors by match length, shifted by what the text says about each
token and by an offset learned from every draft token whose truth becomes known, a plain step's
free test of the first one included). Tokens per time, not per step: a 64-row pass that wins 40
tokens can be slower than four 11-row passes winning 10 each.

Drafts start short, like TCP's slow start: FIRST_CAP tokens, the cap growing GROWTH-fold after a
fully accepted draft and halving after a rejected first token. cost(n) is a live estimate
(profile.CostEstimate) moved by every step's model time and written back to the profile after each
request; because a prior that prices rows too high is never corrected by steps it never takes,
auto explores short drafts that would pay at EXPLORE_PRICE of the estimate, paid from a credit of
EXPLORE_SHARE of decode time. What an Engine's auto learned carries to its next request
(AutoState). Probing masks stay off unless the profile says the paper's acceptance could pay for
their rows. Lossless: every step is plain or a verified tree. The figures behind these choices
are in docs/benchmarks.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..profile import CostEstimate, Profile, get_profile, profile_key
from ..tree import TokenTree
from .lookup import BUCKET_START, LONGEST, Lookup, MatchAcceptance, continues_word
from .speculative import Drafter

MAX_DRAFT = 64
FIRST_CAP = 4
GROWTH = 4  # the cap's factor after a fully accepted draft
EXPLORE_PRICE = 0.25  # explore a draft that would pay if the extra rows cost this share of the estimate
EXPLORE_SHARE = 0.01  # of each step's time, credited to exploration
EXPLORE_START = 1.0  # plain steps of credit an Engine starts with (and at most holds)
EXPLORE_DRAFT = 2  # explore with short drafts: the fitted scale carries what they show to long ones
OFFSET_CARRIED = 0.5  # of the acceptance offset, into the next request (texts differ)
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
        self.cap = FIRST_CAP

    def choose(self, match: int, available: int, continues=None,
               support: tuple[int, int] = (0, 0), price: float = 1.0) -> int:
        """The draft length with the best expected tokens per time (0: plain); continues and
        support describe the draft (MatchAcceptance.along); price scales the extra rows' cost."""
        d_max = min(available, self.max_draft, self.cap)
        if d_max == 0:
            return 0
        plain = 1.0 / (1.0 + self.overhead["plain"])
        tree, cost = 1.0 + self.overhead["tree"], self.cost
        spent = [tree + price * (cost[d + 1] - 1.0) for d in range(d_max + 1)]
        first = self.acceptance.along(match, 1, continues, support)[0]
        if all((1.0 + first * d) <= plain * spent[d] for d in range(1, d_max + 1)):
            return 0  # P(reaching token i) <= the first one's acceptance: none can pay (most steps)
        best, best_rate, tokens, reach = 0, plain, 1.0, 1.0
        for d, a in enumerate(self.acceptance.along(match, d_max, continues, support), 1):
            reach *= a  # P(the first d drafts are all accepted)
            tokens += reach
            if tokens / spent[d] > best_rate:
                best, best_rate = d, tokens / spent[d]
        return best

    def learn(self, match: int, drafts: list[int], out: list[int], continues=None,
              support: tuple[int, int] = (0, 0), verified: bool = True) -> None:
        """What a step showed: out is the accepted drafts and the bonus token of a verified draft,
        or the one token a plain step chose while drafts were at hand (which tests the first
        draft token for free, so the estimate learns even while auto drafts nothing)."""
        self.acceptance.learn(match, drafts, out, continues, support)
        if verified:
            accepted, d = len(out) - 1, len(drafts)
            self.cap = min(GROWTH * self.cap, self.max_draft) if accepted == d else \
                max(1, self.cap // 2) if accepted == 0 else self.cap

    def observe(self, drafted: int, python: float) -> None:
        """A step's Python time, in plain steps: a running mean per kind."""
        key = "tree" if drafted else "plain"
        self.overhead[key] += 0.1 * (python - self.overhead[key])


@dataclass
class AutoState:
    """What auto learned on one Engine, carried from request to request."""

    estimate: CostEstimate | None = None
    offset: float = 0.0  # acceptance logit offset
    overhead: dict | None = None
    credit: float = EXPLORE_START  # exploration credit, plain steps
    requests: int = 0  # requests that taught this state
    decode_cost: float = 0.0  # all decode steps' time, plain steps


class Auto(Drafter):
    """The policy of `auto`: per step, no draft or a lookup draft sized by DraftPolicy on the live
    cost estimate. Apart from `begin` (which finds the device profile) it never touches the
    session, so tools/auto_replay.py drives this very object along recorded text."""

    name = "auto"

    def __init__(self, budget: int = MAX_DRAFT + 1, profile: Profile | None = None,
                 state: AutoState | None = None):
        self.max_draft = max(0, min(MAX_DRAFT, budget - 1))
        self.profile = profile
        self.given = profile is not None  # a caller's curve: used, never written back
        self.state = state if state is not None else AutoState()

    def begin(self, session, prompt):
        state = self.state
        if not self.given:
            known = state.estimate.profile if state.estimate else None
            if known is not None and known.key == profile_key(session):
                self.profile = known  # this Engine's: re-priced by its earlier requests
            else:
                self.profile = get_profile(session)  # cached per model, threads and mode
        self.start(session.model.piece, prompt)

    def start(self, piece, prompt) -> None:
        """A new request: `piece(token)` gives a token's bytes (whether a draft continues a word)."""
        self.piece = piece
        state = self.state
        self.lookup = Lookup(budget=max(2, self.max_draft + 1))
        self.lookup.start(prompt)
        self.policy = DraftPolicy(cost_table(self.profile, self.max_draft), self.max_draft)
        if self.profile is not None:
            if state.estimate is None or state.estimate.profile is not self.profile:
                state.estimate = CostEstimate(self.profile)
            self.estimate = state.estimate
            self.policy.cost = list(self.estimate.table(self.max_draft + 1))
            self.policy.acceptance.offset = OFFSET_CARRIED * state.offset
            self.estimate.new_request()
            if state.overhead:
                self.policy.overhead = dict(state.overhead)
        self.kinds = {"plain": 0, "draft": 0}
        self.draft_rows = self.longest = self.explored = 0
        self.explore_loss = 0.0

    def propose(self, pending, rows):
        lk, policy = self.lookup, self.policy
        lk.see([pending])
        self.match = lk.find(min(self.max_draft, rows - 1), longest=LONGEST)
        match, drafts, support = self.match
        d, self.continues, self.exploring = 0, None, False
        if self.profile is not None and drafts:
            self.continues = [continues_word(self.piece(t)) for t in drafts[:policy.cap]]
            d = policy.choose(match, len(drafts), self.continues, support)  # looks at most `cap` ahead
            if d == 0 and self.state.credit > 0 and not self.explored_enough():
                d = min(policy.choose(match, len(drafts), self.continues, support, price=EXPLORE_PRICE),
                        EXPLORE_DRAFT)
                self.exploring = d > 0 and not self.estimate.tested(d + 1)
                d = d if self.exploring else 0
        return TokenTree.chain(pending, drafts[:d]) if d else None

    def explored_enough(self) -> bool:
        """Every exploration draft length is timed recently: nothing to explore (most steps)."""
        return all(self.estimate.tested(d + 1) for d in range(1, EXPLORE_DRAFT + 1))

    def accept(self, step):
        match, drafts, support = self.match
        d = len(step.tree) - 1 if step.tree is not None else 0
        if d:
            self.policy.learn(match, drafts[:d], step.tokens, self.continues, support)
            self.draft_rows, self.longest = self.draft_rows + d, max(self.longest, d)
        elif self.continues is not None:  # a draft was at hand: the plain step tested its first token
            self.policy.learn(match, drafts[:1], step.tokens, self.continues, support, verified=False)
        self.lookup.see(step.tokens[:-1])
        self.kinds["draft" if d else "plain"] += 1
        if self.profile is not None:
            self._observe(d, step.model_ms, step.step_ms, len(step.tokens), self.exploring)

    def _observe(self, drafted: int, model_ms: float, step_ms: float, tokens: int, explore: bool) -> None:
        """Feed the estimate and the policy this step's measured times; settle exploration."""
        est, state = self.estimate, self.state
        est.observe(drafted + 1, model_ms)
        cost = model_ms / est.plain_ms  # this step, in plain steps
        if drafted:
            self.policy.cost = list(est.table(self.max_draft + 1))
        self.policy.observe(drafted, (step_ms - model_ms) / est.plain_ms)
        state.decode_cost += cost
        state.credit = min(EXPLORE_START, state.credit + EXPLORE_SHARE * cost)
        if explore:
            loss = max(0.0, cost - tokens)  # what plain steps would have spent on these tokens
            state.credit -= loss
            self.explored += 1
            self.explore_loss += loss

    def finish(self) -> None:
        """Keep what this request taught for the Engine's next one, and in the profile's runs."""
        if self.profile is None:
            return
        state = self.state
        state.offset = self.policy.acceptance.offset
        state.overhead = dict(self.policy.overhead)
        state.requests += 1
        if not self.given:
            self.estimate.write_back()

    def probe_verdict(self) -> str:
        """Why probing masks are off (or would be on) on this device's curve."""
        if self.profile is None:
            return "no device profile"
        best = max(PROBE_MAT, key=lambda bc: PROBE_MAT[bc] / self.profile.cost_of(bc))
        value = PROBE_MAT[best] / self.profile.cost_of(best)
        return (f"probe:{best} expects {PROBE_MAT[best]:.2f} tokens/step for "
                f"{self.profile.cost_of(best):.2f}x the cost of a plain step ({value:.2f}x plain)")

    def stats(self) -> dict:
        if self.profile is None:
            return {"decision": "plain: no device profile (context too small to calibrate)",
                    "steps_by_kind": dict(self.kinds)}
        drafts = self.kinds["draft"]
        ceiling, at = self.profile.ceiling
        acceptance = self.policy.acceptance
        est = self.estimate
        return {
            "decision": (f"lookup drafts sized per step by predicted acceptance vs this device's live "
                         f"cost estimate (2 rows cost {est.cost(2):.2f}x, calibrated "
                         f"{self.profile.cost_of(2):.2f}x, ceiling {ceiling:.2f}x at {at} rows); "
                         f"{self.kinds['plain']} plain steps, {drafts} draft steps "
                         f"({self.explored} exploring); masks off: {self.probe_verdict()}"),
            "steps_by_kind": dict(self.kinds),
            "mean_draft_length": round(self.draft_rows / drafts, 3) if drafts else 0.0,
            "longest_draft": self.longest,
            "explored_steps": self.explored,
            "exploration_loss": round(self.explore_loss, 3),  # plain steps lost to exploring
            **est.report(),
            "acceptance_offset": round(acceptance.offset, 3),  # logit, learned on this Engine
            "acceptance_by_match_length": {f"{start}+": round(acceptance.at(int(start)), 3)
                                           for start in BUCKET_START},
            "requests_learned_from": self.state.requests,
            "profile": self.profile.key,
        }
