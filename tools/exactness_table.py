#!/usr/bin/env python3
"""Does a batch row compute what the same token computes decoded alone? Max abs logit difference,
batch vs one by one, per weight type, batch size, exact rows on/off and flash attention on/off.

Random tokens as context, then n random tokens decoded as one batch and one at a time; `0` is
bit-exact, a `*` marks rows whose argmax differs. Variants of the model in other weight types are
written with llama.cpp's quantizer (--types), so any GGUF can be checked across types.

    python tools/exactness_table.py -m smollm2-135m --types F32,F16,BF16,Q8_0,Q4_0,Q4_1,Q4_K_M,Q5_K_M,Q6_K,IQ4_NL
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_mtp.backend import WEIGHT_TYPES, Model, Session, quantize_model
from edge_mtp.models import resolve_model

SIZES = (2, 4, 8, 16, 32, 64)
SETTINGS = ((False, False), (False, True), (True, False), (True, True))  # (flash attn, exact rows)


def batch_vs_sequential(session: Session, context, tokens, sizes=SIZES) -> dict[int, tuple[float, int]]:
    """For each n: (max abs difference of the logits of tokens[:n] decoded as one batch vs one at a
    time after `context`, number of those rows whose argmax differs)."""
    session.clear()
    session.prefill(context)
    base = session.n_past
    alone = np.stack([session.decode([t])[-1].copy() for t in tokens[:max(sizes)]])
    out = {}
    for n in sizes:
        session.truncate(base)
        batch = session.decode(tokens[:n], logits="all")
        out[n] = (float(np.abs(batch - alone[:n]).max()),
                  int((batch.argmax(1) != alone[:n].argmax(1)).sum()))
    session.truncate(base)
    return out


def variants(model: Path, types: list[str], out_dir: Path) -> list[tuple[str, Path]]:
    """The model itself, then one file per weight type (written once into out_dir)."""
    made = [(f"{model.name} as is", model)]
    for t in types:
        dst = out_dir / f"{model.stem}.{t}.gguf"
        if not dst.exists():
            t0 = time.perf_counter()
            quantize_model(model, dst.with_suffix(".partial"), t)
            dst.with_suffix(".partial").rename(dst)
            print(f"wrote {dst.name} in {time.perf_counter() - t0:.1f} s", flush=True)
        made.append((t, dst))
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--types", default="", help=f"comma-separated, from {','.join(WEIGHT_TYPES)}")
    ap.add_argument("--out", type=Path, help="folder for the variants (default: a temporary one)")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--exact", choices=("both", "on", "off"), default="both", help="exact rows settings to run")
    args = ap.parse_args()
    settings = [(f, e) for f, e in SETTINGS if args.exact == "both" or e == (args.exact == "on")]
    sizes = [int(n) for n in args.sizes.split(",")]
    types = [t for t in args.types.split(",") if t]
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"context {args.context} random tokens, {args.threads} threads; max abs logit "
              "difference batch vs one by one (* = argmax differs in some row)\n")
        print("| weights | flash attn | exact rows | " + " | ".join(f"n={n}" for n in sizes) + " |")
        print("|---|---|---|" + "---|" * len(sizes))
        for label, path in variants(resolve_model(args.model), types, out_dir):
            model = Model(path)
            rng = np.random.default_rng(0)
            context = rng.integers(100, model.n_vocab - 1, size=args.context).tolist()
            tokens = rng.integers(100, model.n_vocab - 1, size=max(sizes)).tolist()
            for flash, exact in settings:
                s = Session(model, n_ctx=args.context + max(sizes) + 8, n_threads=args.threads,
                            flash_attn=flash, exact_rows=exact)
                res = batch_vs_sequential(s, context, tokens, sizes)
                s.close()
                cells = [f"{d:.3g}{'*' if flips else ''}" for d, flips in res.values()]
                print(f"| {label} | {'on' if flash else 'off'} | {'on' if exact else 'off'} | "
                      + " | ".join(cells) + " |", flush=True)
            model.close()


if __name__ == "__main__":
    main()
