"""DMTD (Direct Multi-Token Decoding): a fine-tuned model decodes a cycle of tau tokens with one
full pass and tau - 1 passes through only its late (decoding) layers. Lossy by design: the output
is the DMTD model's own distribution, nothing is verified (docs/dmtd.md, papers.md §1.2-1.3).

Layers split into encoding [0, E), thinking [E, E+T) and decoding [E+T, N). The decoding layers'
input is h_enc + m * h_think with m = 1 on a cycle head, 0 elsewhere (native patch P3's gate).
- Prompt: one pass through all layers, every row gated with m = 1 (the authors' released
  reference treats prompt rows as heads).
- Cycle phase is anchored at the prompt end: the first generated token is a head.
- Head step: the tau - 1 positions the last cycle skipped plus the head, as one causal block
  through all layers, gate m = (0, ..., 0, 1) (cyclical refilling: the skipped positions get their
  thinking-layer K/V; their encoding and decoding K/V come out as before, as the inputs are the
  same). Only the head row has logits.
- Other steps: h_enc of the token (E = 0: its embedding) through the decoding layers only; with
  E > 0 one pass through the encoding and then the decoding layers, the thinking ones skipped.
Every pass is gated or runs a partial layer range, so the session records these cells as
non-reusable (-1): no later request takes a DMTD cell for a plain one. `auto` on a DMTD model is
this decoder with the cycle picked from the device's pass costs (`pick_tau`).
"""
from __future__ import annotations

import numpy as np

from ..errors import RequestError
from ..gguf_meta import DmtdConfig
from ..profile import get_profile
from .base import Strategy


def model_dmtd(model) -> DmtdConfig:
    """The DMTD split of a loaded model (validated at load); RequestError when it is not a DMTD model."""
    cfg = model.dmtd
    if cfg is None:
        raise RequestError(f"{model.path.name} is not a DMTD model (no dmtd.* metadata); convert a "
                           "DMTD checkpoint with `edge-mtp convert`")
    return cfg


def late_layers(session, cfg: DmtdConfig):
    """The layers of a non-head step: the decoding ones, after the encoding ones when E > 0 (one
    pass skipping the thinking layers, patch P19)."""
    if cfg.encoding_layers:
        return session.layer_range(0, skip=(cfg.encoding_layers, cfg.late_start))
    return session.layer_range(cfg.late_start)


class Dmtd(Strategy):
    """`dmtd` runs the trained cycle length, `dmtd:3` (budget = tau) a shorter one; with pick_tau
    (auto on a DMTD model) the cycle with the best tokens per time on this device's profile."""

    name = "dmtd"

    def __init__(self, budget: int | None = None, pick_tau: bool = False):
        super().__init__()
        self.pick_tau = pick_tau
        if budget is not None and (not isinstance(budget, int) or budget < 1):
            raise RequestError(f"dmtd cycle length must be an integer >= 1, got {budget!r}")
        self.requested_tau = budget
        self.cfg: DmtdConfig | None = None
        self.tau = 0
        self.prompt_len = 0
        self.generated: list[int] = []  # tokens fed at positions prompt_len, prompt_len + 1, ...
        self.full_passes = self.late_passes = self.refilled = 0
        self.decision = ""

    def prefill(self, session, prompt):
        self.begin_request()
        self.cfg = cfg = model_dmtd(session.model)
        self.tau = self.requested_tau or cfg.cycle
        if self.pick_tau:
            self.tau = self.fastest_cycle(session)
        if self.tau > cfg.cycle:
            raise RequestError(f"dmtd cycle length {self.tau} is longer than the {cfg.cycle} the "
                               "model was trained with")
        if not prompt:
            raise RequestError("empty prompt: nothing to condition on")
        if len(prompt) >= session.n_ctx:
            raise RequestError(f"prompt has {len(prompt)} tokens, the context holds {session.n_ctx}; "
                               "shorten it or raise n_ctx")
        self.prompt_len, self.generated = len(prompt), []
        self.full_passes = self.late_passes = self.refilled = 0
        session.truncate(0)
        logits = None
        for i in range(0, len(prompt), session.n_batch):
            chunk = prompt[i:i + session.n_batch]
            logits = self._full_pass(session, chunk, np.ones(len(chunk), dtype=np.float32))
        return logits

    def fastest_cycle(self, session) -> int:
        """The cycle tau maximising tau / (head pass over tau rows + (tau - 1) late passes) on the
        device profile (1 when the context is too small to calibrate in)."""
        late = self.cfg.decoding_layers + self.cfg.encoding_layers
        profile = get_profile(session, (late,))
        speed = {tau: tau / (profile.cost_of(tau) + (tau - 1) * profile.late_layers[str(late)])
                 for tau in range(1, self.cfg.cycle + 1)} if profile else {1: 1.0}
        tau = max(speed, key=speed.get)
        self.decision = (f"dmtd with cycle {tau} of {self.cfg.cycle}: " + (
            "the fastest on this device's pass costs (lossy by design: the DMTD model's own output)"
            if profile else "no device profile (context too small to calibrate)"))
        return tau

    def step(self, session, sampler, pending):
        local = session.n_past - self.prompt_len  # the pending token's place in the cycle phase
        self.generated.append(pending)
        if local % self.tau == 0:
            refill = min(local, self.tau - 1)
            block = self.generated[len(self.generated) - 1 - refill:]
            session.truncate(session.n_past - refill)
            gate = np.zeros(len(block), dtype=np.float32)
            gate[-1] = 1.0
            logits = self._full_pass(session, block, gate)
            self.full_passes += 1
            self.refilled += refill
        else:
            logits = self._late_pass(session, pending)
            self.late_passes += 1
        return [sampler(logits)]

    def _full_pass(self, session, tokens, gate) -> np.ndarray:
        """All layers over `tokens`, decoding-layer input h_enc + gate * h_think; last row's logits."""
        cfg = self.cfg
        return session.decode(embd=session.model.input_rows(tokens),
                              gate=(gate, cfg.late_start, cfg.encoding_layers))[-1]

    def _late_pass(self, session, token: int) -> np.ndarray:
        """The token through the encoding layers, then its h_enc straight into the decoding layers:
        one pass skipping the thinking layers (no thinking-layer K/V written), whose encoding and
        decoding K/V land in one cell."""
        with late_layers(session, self.cfg):
            return session.decode(embd=session.model.input_rows([token]))[-1]

    def stats(self) -> dict:
        cfg, passes = self.cfg, self.full_passes + self.late_passes
        if cfg is None:
            return {"tau": self.tau}
        decision = {"decision": self.decision} if self.decision else {}
        late_layers = cfg.encoding_layers + cfg.decoding_layers
        layers = self.full_passes * cfg.n_layer + self.late_passes * late_layers
        return {
            **decision,
            "tau": self.tau,
            "dmtd_split": cfg.label,
            "full_passes": self.full_passes,
            "late_passes": self.late_passes,
            "refilled_rows": self.refilled,
            "layer_fraction": round(layers / (passes * cfg.n_layer), 4) if passes else 1.0,
        }
