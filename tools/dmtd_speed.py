#!/usr/bin/env python3
"""DMTD decode speed vs plain decoding on a real model given a DMTD layer split, next to the bound
from measured pass costs. Without --lora the split's weights are not DMTD-trained, so the text is
wrong, but every pass does the real work, so the speed is real; with --lora (a trained DMTD
adapter, which carries the split) plain decoding runs on the base model alone and DMTD on the
base with the adapter, so the adapter's own cost counts against DMTD.

Writes a copy of the model with dmtd.* keys (optionally dequantized to F32: extra rows are cheap
there), then, interleaved over rounds (fastest of each kept):
- pass costs, each timed by itself at the same context length: a plain 1-row step, a head pass
  (tau rows through all layers with the gate), a late-only 1-row pass through the last D layers;
- bound(tau) = tau * t_plain / (t_head(tau) + (tau - 1) * t_late);
- achieved(tau) = (dmtd tokens/s) / (plain tokens/s) over real generations of n tokens.

    python tools/dmtd_speed.py -m smollm2-135m --decoding-layers 8 --taus 2,3,4 [--f32]
    python tools/dmtd_speed.py -m smollm2-135m --lora models/smollm2-135m-dmtd.lora.gguf --f32
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_mtp.backend import Model, Session  # noqa: E402
from edge_mtp.generation import Generation  # noqa: E402
from edge_mtp.gguf_meta import DmtdConfig  # noqa: E402
from edge_mtp.models import resolve_model  # noqa: E402
from edge_mtp.sampling import Sampler, SamplingParams  # noqa: E402
from edge_mtp.strategies import make_strategy  # noqa: E402
from edge_mtp.strategies.dmtd import late_layers  # noqa: E402

PROMPT = ("The history of the printing press begins in the fifteenth century, when a goldsmith in "
          "Mainz combined movable metal type, oil-based ink and a wooden press. Within fifty years")


def with_dmtd_keys(src: Path, out: Path, cfg: DmtdConfig | None, f32: bool) -> Path:
    """Copy a GGUF with the dmtd.* keys of cfg added (and every matrix dequantized to F32 with f32)."""
    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(out), arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
            continue
        if name == "general.file_type" and f32:
            w.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for key, value in (cfg.kv() if cfg else {}).items():
        w.add_uint32(key, value)
    for t in r.tensors:
        data, plain = np.asarray(t.data), t.tensor_type in (gguf.GGMLQuantizationType.F32,
                                                            gguf.GGMLQuantizationType.F16)
        if f32 and not plain:
            w.add_tensor(t.name, gguf.quants.dequantize(data, t.tensor_type).astype(np.float32))
        elif plain:
            w.add_tensor(t.name, data)
        else:  # quantized bytes pass through unchanged (shape given in bytes per row)
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def timed(fn, reps: int) -> float:
    """Fastest seconds of fn() over reps calls (interference from other work only adds time)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def pass_costs(plain_session: Session, session: Session, cfg: DmtdConfig, prompt: list[int], taus,
               reps: int) -> dict:
    """Seconds of a plain step (on plain_session), a gated head pass of tau rows and a late-only
    pass (on session), each at the prompt's context length (every pass is undone before the next)."""
    model, n = session.model, len(prompt)
    for s in {plain_session, session}:
        s.truncate(0)
        s.prefill(prompt)
    tok = prompt[-1]

    def plain():
        plain_session.decode([tok])
        plain_session.truncate(n)

    def head(tau):
        gate = np.zeros(tau, dtype=np.float32)
        gate[-1] = 1
        session.decode(embd=model.input_rows([tok] * tau), gate=(gate, cfg.late_start, cfg.encoding_layers))
        session.truncate(n)

    def late():
        session.decode(embd=model.input_rows([tok]))
        session.truncate(n)

    out = {"plain": timed(plain, reps)}
    for tau in taus:
        out[f"head{tau}"] = timed(lambda: head(tau), reps)
    with late_layers(session, cfg):
        out["late"] = timed(late, reps)
    return out


def generation_speed(session: Session, spec: str, prompt: list[int], n: int) -> float:
    """Decode tokens per second (the prompt pass excluded) of one greedy generation of n tokens."""
    gen = Generation(session, make_strategy(spec), Sampler(SamplingParams(temperature=0)), prompt, n)
    gen.run()
    return (len(gen.tokens) - 1) / gen.decode_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--decoding-layers", type=int, default=8)
    ap.add_argument("--encoding-layers", type=int, default=0)
    ap.add_argument("--taus", default="2,3,4")
    ap.add_argument("--f32", action="store_true", help="dequantize the model to F32 first")
    ap.add_argument("-n", type=int, default=64, help="tokens per generation")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the fastest counts)")
    ap.add_argument("--reps", type=int, default=15, help="repetitions per pass-cost measurement")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--lora", type=Path, help="a trained DMTD adapter (its split is used)")
    args = ap.parse_args()
    taus = [int(x) for x in args.taus.split(",")]
    src = resolve_model(args.model)
    base = Model(src, lora=args.lora)
    cfg = base.dmtd if args.lora else DmtdConfig(
        args.encoding_layers, base.n_layer - args.encoding_layers - args.decoding_layers,
        args.decoding_layers, max(taus))
    base.close()
    with tempfile.TemporaryDirectory() as tmp:
        path = with_dmtd_keys(src, Path(tmp) / "dmtd.gguf", None if args.lora else cfg, args.f32)
        model = Model(path, lora=args.lora)
        session = Session(model, n_ctx=1024, n_threads=args.threads)
        plain_model = Model(path) if args.lora else model
        plain_session = Session(plain_model, n_ctx=1024, n_threads=args.threads) if args.lora else session
        prompt = model.tokenize(PROMPT)
        costs, speeds = [], {s: [] for s in ["plain"] + [f"dmtd:{t}" for t in taus]}
        for _ in range(args.rounds):
            costs.append(pass_costs(plain_session, session, cfg, prompt, taus, args.reps))
            for spec in speeds:
                speeds[spec].append(generation_speed(plain_session if spec == "plain" else session,
                                                     spec, prompt, args.n))
        med = {k: min(c[k] for c in costs) for k in costs[0]}
        best = {k: max(v) for k, v in speeds.items()}
        plain = best["plain"]
        split = f"E{cfg.encoding_layers}T{cfg.thinking_layers}D{cfg.decoding_layers}"
        print(f"{args.model} {'F32' if args.f32 else 'as stored'} {split}"
              f"{' (adapter ' + args.lora.name + '; plain without it)' if args.lora else ''}, {session.n_threads} threads, "
              f"prompt {len(prompt)} tokens, {args.n} tokens x {args.rounds} rounds (fastest)")
        print(f"pass costs: plain {med['plain'] * 1e3:.2f} ms, late-only {med['late'] * 1e3:.2f} ms "
              f"({med['late'] / med['plain']:.3f} of plain), head " +
              ", ".join(f"tau {t}: {med[f'head{t}'] * 1e3:.2f} ms" for t in taus))
        print(f"plain decoding: {plain:.1f} tokens/s")
        print("| tau | dmtd tokens/s | achieved speedup | bound | achieved / bound |")
        print("|---|---|---|---|---|")
        for t in taus:
            bound = t * med["plain"] / (med[f"head{t}"] + (t - 1) * med["late"])
            got = best[f"dmtd:{t}"] / plain
            print(f"| {t} | {best[f'dmtd:{t}']:.1f} | {got:.3f}x | {bound:.3f}x | "
                  f"{got / bound:.3f} |")
        for s in {session, plain_session}:
            s.close()
        for m in {model, plain_model}:
            m.close()


if __name__ == "__main__":
    main()
