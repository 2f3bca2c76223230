"""`edge-mtp bench`: MAT, tokens/s and speedup of decoding strategies on a Spec-Bench-schema JSONL.

Spec-Bench protocol: batch 1, greedy, every turn of a question in order with the chat template,
the conversation continued with plain decoding's answer. Every strategy decodes each turn right
after plain, from a cleared KV cache (all pay the same prompt pass), so machine noise hits all
alike and speedups are ratios taken in one run. Each strategy's tokens are compared with plain's:
a lossless strategy must match them token for token.

A model without a chat template (Gemma 3 270M base) gets the raw text instead, as llama.cpp does:
the first turn as is, later turns after the earlier turns and answers, separated by blank lines.

Sampled decoding (temperature > 0): every strategy decodes a turn with the same seed (the run's
seed plus the turn's index); the equality is reported as "distribution-level", what lossless
speculative sampling promises in general. edge-mtp's verifier goes further (Sampler.draw: one
uniform per emitted token, the drawn token emitted), so with exact rows its lossless strategies
sample plain's very tokens and `mismatches` stays 0 for them; the peer samples with its own RNG.

The peer (edge_mtp.peer, `--peer llama-server[:TYPES]`): stock llama-server, one process per spec
type, decodes the same turns (the same prompt tokens, sampling settings and max tokens) right after
edge-mtp's strategies; its rows are extra strategies named llama-server[:TYPE], their speedups
relative to edge-mtp's plain like every other row, and each table adds edge-mtp plain vs
llama-server plain.

Input lines: {"question_id": int, "category": str, "turns": [str, ...]}; the subtask is "mt_bench"
for question_id <= 160 (Spec-Bench's MT-Bench block), else the category.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .errors import RequestError
from .strategies import make_strategy

REFERENCE = "plain"
PEER_PLAIN = "llama-server"
MT_BENCH_LAST_ID = 160
TOKENS, DISTRIBUTION = "tokens", "distribution-level"  # what "identical to plain" checks


def subtask_of(question: dict) -> str:
    return "mt_bench" if question["question_id"] <= MT_BENCH_LAST_ID else question["category"]


def parse_strategies(text: str) -> list[str]:
    """Comma-separated strategy specs, each checked by make_strategy; plain is added if missing
    (every speedup is relative to it)."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    for spec in specs:
        make_strategy(spec)
    dupes = sorted({s for s in specs if specs.count(s) > 1})
    if dupes:
        raise RequestError(f"strategy listed twice: {', '.join(dupes)}")
    return specs if REFERENCE in specs else [REFERENCE, *specs]


def load_questions(path: str | Path, limit: int | None = None) -> list[dict]:
    """Questions of a Spec-Bench-schema JSONL, in file order; with limit, the first `limit` of
    each subtask."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"data file not found: {path}")
    if limit is not None and limit < 1:
        raise RequestError(f"--limit must be at least 1, got {limit}")
    questions, per_subtask = [], {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise RequestError(f"{path.name}:{lineno}: not JSON ({e.msg})") from None
        if not (isinstance(q, dict) and isinstance(q.get("question_id"), int)
                and isinstance(q.get("category"), str) and isinstance(q.get("turns"), list)
                and q["turns"] and all(isinstance(t, str) for t in q["turns"])):
            raise RequestError(f"{path.name}:{lineno}: expected question_id (int), category (str) "
                               "and turns (non-empty list of str)")
        task = subtask_of(q)
        per_subtask[task] = per_subtask.get(task, 0) + 1
        if limit is None or per_subtask[task] <= limit:
            questions.append(q)
    if not questions:
        raise RequestError(f"no questions in {path.name}")
    return questions


class Counts:
    """What a strategy's and the peer's tallies share: summing per-turn tallies, and the rates."""

    def __iadd__(self, other):
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    def end_to_end_tokens_per_second(self) -> float:
        seconds = self.prompt_s + self.decode_s
        return self.tokens / seconds if seconds else 0.0

    def rates(self, reference: "Tally", questions: int, equality: str, steps: int) -> tuple[dict, dict]:
        """The fields every row has, in results.json's order (split around the timing fields)."""
        ref_tps, ref_e2e = reference.tokens_per_second(), reference.end_to_end_tokens_per_second()
        head = {"mat": round(self.tokens / steps, 4) if steps > 0 else 0.0,
                "tokens_per_second": round(self.tokens_per_second(), 3),
                "speedup": round(self.tokens_per_second() / ref_tps, 4) if ref_tps else 0.0,
                "identical_to_plain": self.mismatches == 0 if equality == TOKENS else None,
                "equality": equality, "mismatches": self.mismatches, "questions": questions,
                "turns": self.turns, "tokens": self.tokens, "steps": steps}
        tail = {"prompt_seconds": round(self.prompt_s, 4),
                "end_to_end_tokens_per_second": round(self.end_to_end_tokens_per_second(), 3),
                "end_to_end_speedup": (round(self.end_to_end_tokens_per_second() / ref_e2e, 4)
                                       if ref_e2e else 0.0)}
        return head, tail


@dataclass
class Tally(Counts):
    """One strategy's sums over the turns of one subtask."""

    turns: int = 0
    tokens: int = 0          # generated tokens
    steps: int = 0           # forward passes that produced them, the prompt pass included
    decode_tokens: int = 0   # tokens of the decode phase (the prompt pass gives the first)
    decode_steps: int = 0    # strategy steps in the decode phase
    prompt_s: float = 0.0
    decode_s: float = 0.0
    model_s: float = 0.0     # of decode_s, inside llama.cpp
    mismatches: int = 0      # turns whose tokens differ from plain's

    def add(self, result: dict, mismatch: bool) -> None:
        n, spec, timing = len(result["tokens"]), result["speculation"], result["timings"]
        self.turns += 1
        self.tokens += n
        self.steps += spec["steps"]
        self.decode_tokens += max(n - 1, 0)
        self.decode_steps += max(spec["steps"] - 1, 0)
        self.prompt_s += timing["prompt_ms"] / 1e3
        self.decode_s += timing["decode_ms"] / 1e3
        self.model_s += spec["model_ms"] / 1e3
        self.mismatches += mismatch

    def summary(self, reference: "Tally", questions: int, equality: str = TOKENS) -> dict:
        orchestration_s = self.decode_s - self.model_s
        per_step = 1e3 / self.decode_steps if self.decode_steps else 0.0
        head, tail = self.rates(reference, questions, equality, self.steps)
        return {
            **head,
            "decode_seconds": round(self.decode_s, 4),
            "model_seconds": round(self.model_s, 4),
            "orchestration_seconds": round(orchestration_s, 4),
            "orchestration_share": round(orchestration_s / self.decode_s, 4) if self.decode_s else 0.0,
            "model_ms_per_step": round(self.model_s * per_step, 3),
            "python_ms_per_step": round(orchestration_s * per_step, 3),
            **tail,
        }


@dataclass
class PeerTally(Counts):
    """One llama-server spec type's sums over the turns of one subtask, from its `timings`."""

    turns: int = 0
    tokens: int = 0          # predicted_n
    decode_tokens: int = 0   # predicted_n - 1 (its first token comes from the prompt pass)
    drafted: int = 0         # draft_n
    accepted: int = 0        # draft_n_accepted
    prompt_s: float = 0.0    # prompt_ms
    decode_s: float = 0.0    # predicted_ms
    mismatches: int = 0      # turns whose tokens differ from edge-mtp plain's

    def add(self, response: dict, mismatch: bool) -> None:
        """predicted_n counts an end-of-generation token, our tokens do not (its pass is timed on
        both sides): a turn that stopped at EOS counts one token less, as ours."""
        t = response["timings"]
        n = int(t["predicted_n"]) - (response.get("stop_type") == "eos")
        self.turns += 1
        self.tokens += n
        self.decode_tokens += max(n - 1, 0)
        self.drafted += int(t.get("draft_n", 0))
        self.accepted += int(t.get("draft_n_accepted", 0))
        self.prompt_s += t["prompt_ms"] / 1e3
        self.decode_s += t["predicted_ms"] / 1e3
        self.mismatches += mismatch

    def summary(self, reference: Tally, questions: int, equality: str = TOKENS) -> dict:
        """Fields of a strategy row; MAT is derived (each accepted draft token saved one pass:
        passes = prompt pass + decode tokens - accepted), model/python split unknown (None)."""
        head, tail = self.rates(reference, questions, equality, self.turns + self.decode_tokens - self.accepted)
        return {
            **head,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance": round(self.accepted / self.drafted, 4) if self.drafted else 0.0,
            "decode_seconds": round(self.decode_s, 4),
            "model_seconds": None,
            "orchestration_seconds": None,
            "orchestration_share": None,
            "model_ms_per_step": None,
            "python_ms_per_step": None,
            **tail,
            "peer": True,
        }


def peer_tokens(response: dict) -> list[int]:
    """llama-server's generated tokens without the end-of-generation token it includes."""
    tokens = list(response.get("tokens") or [])
    return tokens[:-1] if tokens and response.get("stop_type") == "eos" else tokens


def has_chat_template(engine) -> bool:
    return bool(engine.model.meta("tokenizer.chat_template"))


def raw_conversation(history: list[dict]) -> str:
    """The conversation as raw text for a model without a chat template (as llama.cpp does):
    turns and answers in order, separated by blank lines; the answer continues the text."""
    return "\n\n".join(m["content"] for m in history)


def render(engine, history: list[dict]) -> tuple[list[dict] | str, list[int]]:
    """(what edge-mtp's engine gets, the prompt tokens that are, for the peer)."""
    if has_chat_template(engine):
        return history, engine.model.chat_tokens(history)
    text = raw_conversation(history)
    return text, engine.tokenize(text)


def decode(engine, prompt, max_tokens: int, sampling: dict, strategy: str) -> dict:
    engine.session.clear()  # no prompt-prefix reuse: every run pays the same prefill
    if isinstance(prompt, str):
        return engine.generate(prompt, max_tokens=max_tokens, strategy=strategy, **sampling)
    return engine.chat(prompt, max_tokens=max_tokens, strategy=strategy, **sampling)


def sampling_for(temperature: float, seed: int | None, turn: int, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05) -> dict:
    """Sampling settings of one turn: greedy, or the same seed for every strategy on this turn."""
    if temperature == 0:
        return {"temperature": 0.0}
    return {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
            "seed": (seed or 0) + turn}


def run(engine, questions: list[dict], strategies: list[str], max_new_tokens: int,
        progress: bool = True, temperature: float = 0.0, seed: int | None = None,
        peers: dict | None = None) -> dict[str, dict[str, Tally]]:
    """Decode every turn with plain, then with each other strategy, then with each peer server
    (peers: name -> an object with complete(tokens, max_tokens, **sampling)); tallies per subtask."""
    peers = peers or {}
    order = [REFERENCE] + [s for s in strategies if s != REFERENCE and s not in peers]
    warm_up(engine, questions[0]["turns"][0], order, peers)
    tallies: dict[str, dict[str, Tally]] = {}
    bar = tqdm(total=sum(len(q["turns"]) for q in questions), unit="turn", disable=not progress,
               dynamic_ncols=True)
    n_turn = 0
    with bar:
        for q in questions:
            task = subtask_of(q)
            per = tallies.setdefault(task, {s: PeerTally() if s in peers else Tally()
                                            for s in strategies})
            bar.set_description(f"{task} {q['question_id']}")
            history: list[dict] = []
            for turn in q["turns"]:
                history.append({"role": "user", "content": turn})
                prompt, tokens = render(engine, history)
                sampling = sampling_for(temperature, seed, n_turn)
                ref = None
                for spec in order:
                    r = decode(engine, prompt, max_new_tokens, sampling, spec)
                    ref = ref or r
                    per[spec].add(r, r["tokens"] != ref["tokens"])
                for name, server in peers.items():
                    r = server.complete(tokens, max_new_tokens, **sampling)
                    per[name].add(r, peer_tokens(r) != ref["tokens"])
                history.append({"role": "assistant", "content": ref["text"]})
                n_turn += 1
                bar.update(1)
    return tallies


def warm_up(engine, text: str, strategies: list[str], peers: dict | None = None) -> None:
    """A few untimed tokens per strategy, so first-use costs (page faults of the weights, buffer
    allocations, a strategy's one-time set-up) do not land on whichever strategy runs first."""
    prompt, tokens = render(engine, [{"role": "user", "content": text}])
    for spec in strategies:
        decode(engine, prompt, 4, {"temperature": 0.0}, spec)
    for server in (peers or {}).values():
        server.complete(tokens, 4)


def summarize(tallies: dict[str, dict[str, Tally]], questions: list[dict],
              strategies: list[str], equality: str = TOKENS) -> tuple[dict, dict]:
    """Per-subtask and overall fields of results.json."""
    counts: dict[str, int] = {}
    for q in questions:
        counts[subtask_of(q)] = counts.get(subtask_of(q), 0) + 1
    subtasks = {task: {s: per[s].summary(per[REFERENCE], counts[task], equality) for s in strategies}
                for task, per in tallies.items()}
    first = next(iter(tallies.values()))
    totals = {s: type(first[s])() for s in strategies}
    for per in tallies.values():
        for s in strategies:
            totals[s] += per[s]
    overall = {s: totals[s].summary(totals[REFERENCE], len(questions), equality) for s in strategies}
    return subtasks, overall


def plain_vs_peer(subtasks: dict, overall: dict) -> dict[str, float] | None:
    """edge-mtp plain's decode tokens/s over llama-server plain's, per subtask and overall."""
    if PEER_PLAIN not in overall:
        return None
    out = {}
    for task, rows in {**subtasks, "overall": overall}.items():
        peer = rows[PEER_PLAIN]["tokens_per_second"]
        out[task] = round(rows[REFERENCE]["tokens_per_second"] / peer, 4) if peer else 0.0
    return out


def bench(engine, questions: list[dict], strategies: list[str], max_new_tokens: int,
          command: str = "", progress: bool = True, temperature: float = 0.0,
          seed: int | None = None, peers: dict | None = None) -> dict:
    """Run the benchmark; the results.json dict. peers: name -> server (edge_mtp.peer), whose
    names are listed in strategies too."""
    peers = peers or {}
    if temperature < 0:
        raise RequestError(f"--temp must be >= 0, got {temperature}")
    if temperature > 0 and seed is None:
        seed = int.from_bytes(os.urandom(3), "little")
    strategies = list(strategies) + [p for p in peers if p not in strategies]
    equality = TOKENS if temperature == 0 else DISTRIBUTION
    tallies = run(engine, questions, strategies, max_new_tokens, progress, temperature, seed, peers)
    subtasks, overall = summarize(tallies, questions, strategies, equality)
    return {
        "model": engine.model_name,
        "device": device_info(engine),
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed if temperature > 0 else None,
        "equality": equality,
        "chat_template": has_chat_template(engine),
        "strategies": strategies,
        "peers": {name: getattr(srv, "command", []) for name, srv in peers.items()},
        "subtasks": subtasks,
        "overall": overall,
        "plain_vs_llama_server": plain_vs_peer(subtasks, overall),
        "edge_mtp_version": __version__,
        "questions": len(questions),
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def device_info(engine) -> dict:
    """The profile's device fields plus what else decides a speed: Python and the backend build."""
    from importlib import metadata

    from .backend.native import build_key
    from .profile import device_info as profile_device_info

    return {**profile_device_info(engine.session), "python": platform.python_version(),
            "backend": {"llama_cpp_python": metadata.version("llama_cpp_python"), "build": build_key()}}


# -- reports -------------------------------------------------------------------------------------
def same_as_plain(r: dict) -> str:
    if r.get("equality", TOKENS) != TOKENS:
        return DISTRIBUTION
    return "yes" if r["identical_to_plain"] else f"no ({r['mismatches']} of {r['turns']} turns)"


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown_table(rows: dict[str, dict]) -> str:
    """One row per strategy (llama-server rows: drafted/accepted from its timings, no
    model/python split)."""
    peers = any(r.get("peer") for r in rows.values())
    lines = ["| strategy | MAT | tok/s | speedup | identical to plain | model ms/step | "
             "python ms/step | python share | end-to-end speedup |" + (" drafted / accepted |" if peers else ""),
             "|---|---:|---:|---:|---|---:|---:|---:|---:|" + ("---:|" if peers else "")]
    for name, r in rows.items():
        line = (f"| {name} | {r['mat']:.2f} | {r['tokens_per_second']:.1f} | "
                f"{r['speedup']:.2f}x | {same_as_plain(r)} | {_num(r['model_ms_per_step'], '.2f')} | "
                f"{_num(r['python_ms_per_step'], '.2f')} | {_num(r['orchestration_share'], '.1%')} | "
                f"{r['end_to_end_speedup']:.2f}x |")
        if peers:
            line += f" {r['drafted']} / {r['accepted']} |" if r.get("peer") else " - |"
        lines.append(line)
    return "\n".join(lines)


def speedup_table(results: dict) -> str:
    """Subtasks as rows, strategies as columns: the chart as numbers."""
    names = results["strategies"]
    vs_peer = results.get("plain_vs_llama_server")
    extra = " edge-mtp plain / llama-server plain |" if vs_peer else ""
    lines = ["| subtask | " + " | ".join(names) + " |" + extra,
             "|---|" + "---:|" * (len(names) + bool(vs_peer))]
    rows = {**results["subtasks"], "overall": results["overall"]}
    for task, per in rows.items():
        lines.append(f"| {task} | " + " | ".join(
            f"{per[s]['speedup']:.2f}x" + ("" if per[s]["identical_to_plain"] is not False else " (differs)")
            for s in names) + " |" + (f" {vs_peer[task]:.2f}x |" if vs_peer else ""))
    return "\n".join(lines)


def markdown(results: dict) -> str:
    d = results["device"]
    parts = [f"# edge-mtp bench: {results['model']}", ""]
    if results["command"]:
        parts += [f"    {results['command']}", ""]
    parts += [
        f"edge-mtp {results['edge_mtp_version']}, {results['created']}; "
        f"{plural(results['questions'], 'question')}, {decoding(results)}, at most "
        f"{results['max_new_tokens']} new tokens per turn"
        f"{'' if results.get('chat_template', True) else ' (no chat template: raw prompts)'}; "
        f"{d['cpu']}, {plural(d['cores'], 'core')}, {plural(d['threads'], 'thread')}, {d['os']}.",
        "",
        "MAT = generated tokens / forward passes (the prompt pass included); tok/s = decode-phase "
        "tokens per second (after the prompt pass); speedup = tok/s / plain's tok/s in this run; "
        "model / python ms per step = time inside llama.cpp / the rest of a decode step; python "
        "share = python time / decode time; end-to-end speedup counts the prompt pass too.",
        *([] if not results.get("peers") else [
            "", "llama-server rows: stock llama.cpp (same source, no edge-mtp patches) on the same "
            "turns, same prompt tokens and settings; tok/s from its timings (predicted_n - 1) / "
            "predicted_ms; MAT derived from draft_n_accepted; speedups relative to edge-mtp "
            "plain. Servers: " + "; ".join(f"`{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}`"
                                          for cmd in results["peers"].values()) + "."]),
        *([] if results.get("equality", TOKENS) == TOKENS else [
            "", "Sampled decoding: every strategy gets the same seed per turn; equality is "
            "distribution-level (edge-mtp's lossless strategies, with exact rows, also sample "
            "plain's very tokens: mismatches counts the turns that differ)."]),
        "",
        "## Speedup per subtask",
        "",
        speedup_table(results),
        "",
        "## Overall",
        "",
        markdown_table(results["overall"]),
    ]
    for task, rows in results["subtasks"].items():
        n = next(iter(rows.values()))["questions"]
        parts += ["", f"## {task} ({plural(n, 'question')})", "", markdown_table(rows)]
    return "\n".join(parts) + "\n"


def decoding(results: dict) -> str:
    t = results.get("temperature", 0.0)
    return "greedy" if not t else f"sampled at temperature {t:g} (seed {results['seed']})"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def plot_speedup(results: dict, path: Path) -> None:
    """Grouped bars: speedup vs plain per subtask (and overall) per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*results["subtasks"], "overall"]
    rows = {**results["subtasks"], "overall": results["overall"]}
    names = [s for s in results["strategies"] if s != REFERENCE]
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 2), 4))
    for i, name in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [rows[g][name]["speedup"] for g in groups], width, label=name)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="plain")
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylabel("speedup vs plain (tokens/s)")
    ax.set_title(f"{results['model']}, {results['max_new_tokens']} tokens, "
                 f"{results['device']['threads']} threads, {decoding(results)}", fontsize="medium")
    ax.legend(fontsize="small", ncols=min(len(names) + 1, 4))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, out_dir: str | Path) -> list[Path]:
    """results.json, results.md and speedup.png in out_dir (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md", out / "speedup.png"]
    paths[0].write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(results), encoding="utf-8")
    plot_speedup(results, paths[2])
    return paths
