#!/usr/bin/env python3
"""Self-distil a GGUF base model into a DMTD model, shipped as a llama.cpp LoRA adapter GGUF.

DMTD (papers.md §1) teaches the last D layers to write the next tokens of a cycle from token
embeddings alone. The authors fine-tune every layer on ~1.5B tokens; a CPU session affords ~1M,
so this trains what a cycle's non-head steps actually run and leaves the rest as it is: the
encoding and thinking layers [0, E+T) stay the base model's (their output for every row is then
the base model's own, computed once per batch without gradients), and the decoding layers learn
through LoRA (or, with --full, by full fine-tuning, for comparisons at equal compute). Token
embeddings and output head stay frozen, as in the paper.

One training row runs as the decoding loop with cyclical refilling runs it (docs/dmtd.md): every
row's thinking-layer output is the base model's on the real sequence, and the decoding layers get
h_enc + m * h_think, with m = 1 on prompt rows and on every cycle-th answer row counted from the
prompt end (the cycle is drawn per sequence from --cycles, so one adapter serves several tau).
The loss is KL(base || student) over the answer rows, the teacher being the base model's own
decoding layers on h_think. Data: tools/dmtd_data.py (the base model's own chat answers).

    python tools/dmtd_finetune.py -m smollm2-135m --data train.jsonl -o run/ --split 0,22,8 \\
        --rank 32 --minutes 45          # resumable: the same command continues from run/ckpt.pt
    python tools/dmtd_finetune.py ... --export run/adapter.gguf   # write the adapter and stop

Logs (run/log.jsonl): loss, tokens seen, and every --eval-every steps the teacher-forced top-1
agreement with the base model at each cycle position on held-back lines of the data.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dmtd_reference import Weights  # noqa: E402
from lora_gguf import LINEAR, write_lora_adapter  # noqa: E402
from edge_mtp.gguf_meta import DmtdConfig  # noqa: E402


class Model:
    """A llama/qwen2/qwen3 decoder over GGUF tensors (llama.cpp's layout and RoPE pairing), with the
    DMTD gate and trainable low-rank (or full) updates on some layers."""

    def __init__(self, w: Weights, dtype=torch.float32):
        self.w, self.dtype = w, dtype
        self.t = {k: torch.from_numpy(v).to(dtype) for k, v in w.t.items()}
        half = w.n_rot // 2
        self.inv_freq = w.rope_base ** (-torch.arange(half, dtype=torch.float64) * 2.0 / w.n_rot)
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scale = 1.0
        self.original: dict[str, torch.Tensor] = {}  # the base's copy of fully trained tensors

    def add_lora(self, layers, rank: int, alpha: float, seed: int) -> list[torch.Tensor]:
        """A (rank, n_in) small random, B (n_out, rank) zero: training starts at the base model."""
        g = torch.Generator().manual_seed(seed)
        self.scale = alpha / rank
        for il in layers:
            for m in LINEAR:
                n_out, n_in = self.t[f"blk.{il}.{m}.weight"].shape
                a = (torch.randn(rank, n_in, generator=g) / math.sqrt(n_in)).requires_grad_()
                self.lora[f"blk.{il}.{m}.weight"] = (a, torch.zeros(n_out, rank, requires_grad=True))
        return [p for ab in self.lora.values() for p in ab]

    def unfreeze(self, layers) -> list[torch.Tensor]:
        """Full fine-tuning of these layers' weights (float32 master copies)."""
        names = [k for k in self.t if any(k.startswith(f"blk.{il}.") for il in layers)]
        for k in names:
            self.original[k] = self.t[k]
            self.t[k] = self.t[k].float().requires_grad_()
        return [self.t[k] for k in names]

    def mm(self, x, name):
        y = x @ self.t[name].to(x.dtype).T
        if name in self.lora:
            a, b = self.lora[name]
            y = y + self.scale * ((x @ a.to(x.dtype).T) @ b.to(x.dtype).T)
        bias = self.t.get(name.replace(".weight", ".bias"))
        return y if bias is None else y + bias.to(x.dtype)

    def norm(self, x, name):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.w.eps)).to(x.dtype) \
            * self.t[name].to(x.dtype)

    def rope(self, x, pos):
        n_rot, half = self.w.n_rot, self.w.n_rot // 2
        f = pos[:, None].double() * self.inv_freq[None]
        cos, sin = f.cos().to(x.dtype)[:, None], f.sin().to(x.dtype)[:, None]
        if self.w.neox:
            a, b = x[..., :half], x[..., half:n_rot]
        else:
            a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        ra, rb = a * cos - b * sin, a * sin + b * cos
        rot = torch.cat([ra, rb], -1) if self.w.neox else torch.stack([ra, rb], -1).flatten(-2)
        return torch.cat([rot, x[..., n_rot:]], -1)

    def layer(self, il, x, pos):
        """x: (batch, rows, n_embd); causal attention over each sequence's rows."""
        w, p = self.w, f"blk.{il}."
        bsz, n = x.shape[:2]
        h = self.norm(x, p + "attn_norm.weight")
        q = self.mm(h, p + "attn_q.weight").view(bsz, n, w.n_head, w.head_dim)
        k = self.mm(h, p + "attn_k.weight").view(bsz, n, w.n_head_kv, w.head_dim)
        v = self.mm(h, p + "attn_v.weight").view(bsz, n, w.n_head_kv, w.head_dim)
        if p + "attn_q_norm.weight" in self.t:
            q, k = self.norm(q, p + "attn_q_norm.weight"), self.norm(k, p + "attn_k_norm.weight")
        q, k = self.rope(q, pos), self.rope(k, pos)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=w.n_head != w.n_head_kv)
        x = x + self.mm(a.transpose(1, 2).reshape(bsz, n, -1), p + "attn_output.weight")
        h = self.norm(x, p + "ffn_norm.weight")
        ff = F.silu(self.mm(h, p + "ffn_gate.weight")) * self.mm(h, p + "ffn_up.weight")
        return x + self.mm(ff, p + "ffn_down.weight")

    def layers(self, lo, hi, x, pos):
        for il in range(lo, hi):
            x = self.layer(il, x, pos)
        return x

    def head(self, x):
        return self.norm(x, "output_norm.weight") @ self.t["output.weight"].to(x.dtype).T

    def dmtd_logits(self, tokens, split: DmtdConfig, gate, base_too: bool = False):
        """Logits of every row under the DMTD gate, and (base_too) the base model's, which shares
        the frozen early layers. tokens, gate: (batch, rows)."""
        pos = torch.arange(tokens.shape[1])
        x = self.t["token_embd.weight"][tokens].to(self.dtype)
        e, late = split.encoding_layers, split.late_start
        with torch.no_grad():
            h_enc = self.layers(0, e, x, pos)
            h_think = self.layers(e, late, h_enc, pos)
            if base_too:  # the base model's own decoding layers on h_think
                saved, self.lora = (self.lora, self.t), {}
                self.t = {**self.t, **self.original}
                base = self.head(self.layers(late, self.w.n_layer, h_think, pos)).float()
                self.lora, self.t = saved
        student = self.head(self.layers(late, self.w.n_layer, h_enc + gate[..., None].to(x.dtype) * h_think, pos))
        return (student.float(), base) if base_too else student.float()


def cycle_gate(n: int, prompt_len: int, cycle: int) -> torch.Tensor:
    """m = 1 on prompt rows and on cycle heads counted from the prompt end, else 0."""
    i = torch.arange(n)
    return ((i < prompt_len) | ((i - prompt_len) % cycle == 0)).float()


def batch_of(lines: list[dict], cycles: list[int]):
    """Right-padded tokens, gates, answer-row mask and cycle position of each row."""
    n = max(len(d["tokens"]) for d in lines)
    tokens = torch.zeros(len(lines), n, dtype=torch.long)
    gate, rows, phase = torch.zeros(len(lines), n), torch.zeros(len(lines), n, dtype=torch.bool), \
        torch.full((len(lines), n), -1)
    for b, (d, c) in enumerate(zip(lines, cycles)):
        t, plen = d["tokens"], d["prompt_len"]
        tokens[b, :len(t)] = torch.tensor(t)
        gate[b, :len(t)] = cycle_gate(len(t), plen, c)
        rows[b, plen - 1:len(t) - 1] = True  # rows whose next token is an answer token
        phase[b, plen:len(t)] = torch.arange(len(t) - plen) % c  # a row's place in its cycle
        phase[b, plen - 1] = 0  # the prompt's last row is gated as a head
    return tokens, gate, rows, phase


def kl_and_agreement(student, base, rows):
    logp, logq = F.log_softmax(student[rows], -1), F.log_softmax(base[rows], -1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    return kl.mean(), student[rows].argmax(-1) == base[rows].argmax(-1)


def evaluate(model, lines, split, cycle: int, bsz: int) -> list[float]:
    """Teacher-forced top-1 agreement with the base model, by the cycle position of the row that
    predicts (0: a head, the prompt's last row included; 1..cycle-1: late-only rows)."""
    hits, counts = torch.zeros(cycle), torch.zeros(cycle)
    with torch.no_grad():
        for i in range(0, len(lines), bsz):
            tokens, gate, rows, phase = batch_of(lines[i:i + bsz], [cycle] * len(lines[i:i + bsz]))
            student, base = model.dmtd_logits(tokens, split, gate, base_too=True)
            _, same = kl_and_agreement(student, base, rows)
            hits += torch.bincount(phase[rows], weights=same.float(), minlength=cycle)
            counts += torch.bincount(phase[rows], minlength=cycle).float()
    return (hits / counts.clamp(min=1)).tolist()


def batches(lines: list[dict], bsz: int, rng: random.Random):
    """Endless shuffled batches of similar lengths (little padding)."""
    while True:
        order = list(range(len(lines)))
        rng.shuffle(order)
        chunks = [sorted(order[i:i + 16 * bsz], key=lambda j: len(lines[j]["tokens"]))
                  for i in range(0, len(order), 16 * bsz)]
        group = [c[i:i + bsz] for c in chunks for i in range(0, len(c), bsz)]
        rng.shuffle(group)
        yield from group


def train(base_path: Path, lines: list[dict], out: Path, split: DmtdConfig, *, rank: int = 32,
          full: bool = False, cycles=(2, 3, 4), lr: float = 1e-3, bsz: int = 8, steps: int = 10**9,
          minutes: float = 1e9, eval_lines: int = 32, eval_every: int = 100, seed: int = 0,
          bf16: bool = True, log=print) -> Model:
    """Train (resuming from out/ckpt.pt if present) until steps or minutes; returns the model."""
    torch.manual_seed(seed)
    model = Model(Weights(base_path), torch.bfloat16 if bf16 else torch.float32)
    dec = range(split.late_start, model.w.n_layer)
    params = model.unfreeze(dec) if full else model.add_lora(dec, rank, float(rank), seed)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    held, train_lines = lines[:eval_lines], lines[eval_lines:]
    state = {"step": 0, "tokens": 0, "seconds": 0.0}
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "ckpt.pt"
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        with torch.no_grad():
            for p, v in zip(params, saved["params"]):
                p.copy_(v)
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
    feed = batches(train_lines, bsz, random.Random(seed))
    for _ in range(state["step"]):  # the same batch order as an uninterrupted run
        next(feed)
    warm = 50
    t0, start_seconds, saved_at = time.perf_counter(), state["seconds"], state["step"]

    def finished() -> bool:
        return state["step"] >= steps or time.perf_counter() - t0 >= minutes * 60

    def save():
        nonlocal saved_at
        saved_at = state["step"]
        state["seconds"] = start_seconds + time.perf_counter() - t0
        torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict(), "state": state,
                    "rank": rank, "full": full, "split": split.kv()}, ckpt.with_suffix(".tmp"))
        ckpt.with_suffix(".tmp").replace(ckpt)

    with (out / "log.jsonl").open("a") as logf:
        while not finished():
            idx = next(feed)
            pick = random.Random(seed * 1_000_003 + state["step"])  # resumable: a function of the step
            chosen = [pick.choice(cycles) for _ in idx]
            tokens, gate, rows, _ = batch_of([train_lines[j] for j in idx], chosen)
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (state["step"] + 1) / warm)
            student, base = model.dmtd_logits(tokens, split, gate, base_too=True)
            loss, same = kl_and_agreement(student, base, rows)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            state["step"] += 1
            state["tokens"] += int(rows.sum())
            rec = {"step": state["step"], "tokens": state["tokens"], "loss": round(loss.item(), 4),
                   "agree": round(same.float().mean().item(), 4),
                   "seconds": round(start_seconds + time.perf_counter() - t0, 1)}
            if held and (state["step"] % eval_every == 0 or finished()):
                rec["eval"] = {c: [round(a, 4) for a in evaluate(model, held, split, c, bsz)] for c in (2, 4)}
                save()
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            if state["step"] % 10 == 0 or "eval" in rec:
                log(json.dumps(rec))
    if state["step"] != saved_at:  # steps since the last evaluation (none when only exporting)
        save()
    return model


def export(model: Model, split: DmtdConfig, path: Path, cycle: int, arch: str,
           dtype=np.float32) -> Path:
    """The trained low-rank updates as a llama.cpp LoRA adapter GGUF with the dmtd.* keys (F16
    halves the file; llama.cpp then rounds the adapter's activations to F16 too)."""
    rank = next(iter(model.lora.values()))[0].shape[0]
    pairs = {name: (a.detach().float().numpy(), b.detach().float().numpy())
             for name, (a, b) in model.lora.items()}
    kv = DmtdConfig(split.encoding_layers, split.thinking_layers, split.decoding_layers, cycle).kv()
    write_lora_adapter(path, arch, pairs, alpha=model.scale * rank, extra_kv=kv, dtype=dtype)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m", help="base model name or GGUF path")
    ap.add_argument("--data", type=Path, required=True, help="JSONL from tools/dmtd_data.py")
    ap.add_argument("-o", "--out", type=Path, required=True, help="run folder (checkpoint, log)")
    ap.add_argument("--split", default="0,22,8", help="encoding,thinking,decoding layer counts")
    ap.add_argument("--cycles", default="2,3,4", help="cycle lengths drawn per training sequence")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--full", action="store_true", help="full fine-tuning of the decoding layers")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10**9)
    ap.add_argument("--minutes", type=float, default=30.0, help="stop (and checkpoint) after this long")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--fp32", action="store_true", help="float32 compute (default bfloat16)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--export", type=Path, help="write the adapter GGUF from the checkpoint and stop")
    ap.add_argument("--f16", action="store_true", help="export F16 tensors (default F32)")
    args = ap.parse_args()
    from edge_mtp.models import resolve_model

    torch.set_num_threads(args.threads)
    base = resolve_model(args.model)
    split = DmtdConfig(*(int(x) for x in args.split.split(",")), 1)
    cycles = [int(c) for c in args.cycles.split(",")]
    lines = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    model = train(base, lines, args.out, split, rank=args.rank, full=args.full, cycles=cycles,
                  lr=args.lr, bsz=args.batch, steps=0 if args.export else args.steps,
                  minutes=args.minutes, eval_every=args.eval_every, bf16=not args.fp32)
    if args.export:
        print(export(model, split, args.export, max(cycles), model.w.arch,
                     np.float16 if args.f16 else np.float32))


if __name__ == "__main__":
    main()
