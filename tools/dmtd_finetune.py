#!/usr/bin/env python3
"""Self-distil a base model (Hugging Face llama or qwen3 folder) into a DMTD model, and write a
Hugging Face checkpoint that `edge-mtp convert` takes. Needs torch (`pip install 'edge-mtp[convert]'`).

The recipe follows the DMTD authors (papers.md §1.4): every transformer layer is trained, the
token embeddings and the output head stay frozen; all positions of a sequence run every layer
with causal attention, and the decoding layers' input is h_enc + m * h_think with the cycle gate m.
The gate follows edge-mtp's decoding (docs/dmtd.md): m = 1 on prompt rows, then 1 on every
cycle-th generated row counted from the prompt end. Targets are the base model's own next-token
distributions (self-distillation: KL(teacher || student) on the generated rows), on continuations
the base model writes greedily for the given prompts.

The real recipe for a 4B model: ~1.5B tokens (the authors distil AM-Thinking-v1 answers), 4k
context, lr 1e-4 with warmup 0.1 and cosine decay, AdamW betas (0.9, 0.95), grad clip 1.0, global
batch ~512 sequences, bf16. The defaults here are for a smoke run on a tiny model.

    python tools/dmtd_finetune.py BASE_HF_DIR -o OUT_DIR --split 0,22,8 --cycle 4 \\
        --prompts prompts.txt --steps 200 --gen-tokens 128
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

FROZEN = ("model.embed_tokens.weight", "lm_head.weight")
DMTD_ARCH = {"qwen3": "MTPQwen3ForCausalLM", "llama": "LlamaForCausalLM"}


class Model:
    """A llama/qwen3 decoder over a Hugging Face state dict, with the DMTD gate."""

    def __init__(self, config: dict, weights: dict[str, torch.Tensor]):
        self.c, self.w = config, weights
        self.n_layer = config["num_hidden_layers"]
        self.n_head = config["num_attention_heads"]
        self.n_kv = config.get("num_key_value_heads", self.n_head)
        self.hd = config.get("head_dim", config["hidden_size"] // self.n_head)
        self.eps = config["rms_norm_eps"]
        inv = config.get("rope_theta", 10000.0) ** (-torch.arange(0, self.hd, 2).float() / self.hd)
        self.inv_freq = inv
        if "lm_head.weight" not in weights:  # tied head
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]

    def norm(self, x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w[name]

    def rope(self, x, pos):
        f = pos[:, None].float() * self.inv_freq[None]
        cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos[:, None] + rot * sin[:, None]

    def layer(self, il, x, pos):
        w, p, n = self.w, f"model.layers.{il}.", x.shape[0]
        h = self.norm(x, p + "input_layernorm.weight")
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(n, self.n_head, self.hd)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(n, self.n_kv, self.hd)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(n, self.n_kv, self.hd)
        if p + "self_attn.q_norm.weight" in w:
            q, k = self.norm(q, p + "self_attn.q_norm.weight"), self.norm(k, p + "self_attn.k_norm.weight")
        q, k = self.rope(q, pos), self.rope(k, pos)
        rep = self.n_head // self.n_kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           is_causal=True)
        x = x + a.transpose(0, 1).reshape(n, -1) @ w[p + "self_attn.o_proj.weight"].T
        h = self.norm(x, p + "post_attention_layernorm.weight")
        ff = F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        return x + ff @ w[p + "mlp.down_proj.weight"].T

    def logits(self, tokens, split=None, gate=None):
        """Logits of every row; with split = (E, T, D) the decoding layers get h_enc + gate * h_think."""
        x = self.w["model.embed_tokens.weight"][tokens]
        pos = torch.arange(len(tokens))
        if split is None:
            for il in range(self.n_layer):
                x = self.layer(il, x, pos)
        else:
            e, t, _ = split
            for il in range(e):
                x = self.layer(il, x, pos)
            h_enc = x
            for il in range(e, e + t):
                x = self.layer(il, x, pos)
            x = h_enc + gate[:, None] * x
            for il in range(e + t, self.n_layer):
                x = self.layer(il, x, pos)
        return self.norm(x, "model.norm.weight") @ self.w["lm_head.weight"].T


def cycle_gate(n: int, prompt_len: int, cycle: int) -> torch.Tensor:
    """m = 1 on prompt rows and on cycle heads counted from the prompt end, else 0."""
    i = torch.arange(n)
    return ((i < prompt_len) | ((i - prompt_len) % cycle == 0)).float()


@torch.no_grad()
def teacher_data(base: Model, prompts: list[list[int]], gen_tokens: int, eos: set[int]) -> list[tuple]:
    """(tokens, prompt_len, teacher log-probs of every row) per prompt; greedy continuations."""
    data = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(gen_tokens):
            nxt = int(base.logits(torch.tensor(seq))[-1].argmax())
            if nxt in eos:
                break
            seq.append(nxt)
        tokens = torch.tensor(seq)
        data.append((tokens, len(prompt), F.log_softmax(base.logits(tokens), -1)))
    return data


def finetune(base_dir: Path, out_dir: Path, split: tuple[int, int, int], cycle: int,
             prompts: list[list[int]], steps: int, gen_tokens: int = 32, lr: float = 1e-4,
             warmup: float = 0.1, seed: int = 0, log=print) -> list[float]:
    """Train and write the DMTD checkpoint; returns the loss of every step."""
    torch.manual_seed(seed)
    config = json.loads((base_dir / "config.json").read_text())
    if sum(split) != config["num_hidden_layers"]:
        raise SystemExit(f"split {split} does not add up to {config['num_hidden_layers']} layers")
    weights = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        weights.update({k: v.float() for k, v in load_file(str(f)).items()})
    eos = config.get("eos_token_id", [])
    eos = set(eos if isinstance(eos, list) else [eos])
    data = teacher_data(Model(config, dict(weights)), prompts, gen_tokens, eos)
    student = Model(config, {k: v.clone().requires_grad_(k not in FROZEN) for k, v in weights.items()})
    params = [v for k, v in student.w.items() if v.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    n_warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / n_warm, 0.5 * (1 + math.cos(
        math.pi * min(1.0, max(0, s - n_warm) / max(1, steps - n_warm))))))
    losses = []
    for step in range(steps):
        tokens, plen, teacher = data[step % len(data)]
        logp = F.log_softmax(student.logits(tokens, split, cycle_gate(len(tokens), plen, cycle)), -1)
        rows = slice(plen - 1, len(tokens))  # rows that predict generated tokens (and the next)
        loss = F.kl_div(logp[rows], teacher[rows], log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        log(f"step {step + 1}/{steps} loss {losses[-1]:.4f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in student.w.items()
               if not (k == "lm_head.weight" and config.get("tie_word_embeddings"))},
              str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    model_type = config.get("model_type", "llama")
    config.update(architectures=[DMTD_ARCH.get(model_type, config["architectures"][0])],
                  num_encoding_layers=split[0], num_thinking_layers=split[1],
                  num_decoding_layers=split[2], mtp_horizon=cycle)
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    for f in base_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(f, out_dir / f.name)
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path, help="Hugging Face folder of the base model")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--split", required=True, help="encoding,thinking,decoding layer counts (e.g. 0,22,8)")
    ap.add_argument("--cycle", type=int, default=4)
    ap.add_argument("--prompts", type=Path, required=True, help="text file, one prompt per line")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--gen-tokens", type=int, default=64, help="teacher continuation length")
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(args.base / "tokenizer.json"))
    prompts = [tok.encode(line).ids for line in args.prompts.read_text().splitlines() if line.strip()]
    split = tuple(int(x) for x in args.split.split(","))
    finetune(args.base, args.out, split, args.cycle, prompts, args.steps, args.gen_tokens, args.lr)
    print(args.out)


if __name__ == "__main__":
    main()
