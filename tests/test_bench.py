"""`edge-mtp bench` on a tiny Spec-Bench-schema file: the results' shape, equality with plain,
mismatch counting and one-line errors for bad arguments."""
import json
import subprocess
import sys

import pytest

from edge_mtp import Engine, bench
from edge_mtp.strategies import STRATEGIES
from edge_mtp.strategies.plain import Plain

CLI = [sys.executable, "-m", "edge_mtp.cli"]

# our own text; ids <= 160 are the mt_bench subtask, others are named by their category
QUESTIONS = [
    {"question_id": 90, "category": "writing",
     "turns": ["Write two sentences about a lighthouse keeper who collects seashells.",
               "Now repeat the same two sentences, but in the past tense."]},
    {"question_id": 95, "category": "reasoning",
     "turns": ["What is heavier, a kilogram of iron or of wool?"]},
    {"question_id": 400, "category": "qa", "turns": ["Which planet is closest to the sun?"]},
    {"question_id": 401, "category": "qa", "turns": ["How many legs does a spider have?"]},
]
SUMMARY_TYPES = {"mat": float, "tokens_per_second": float, "speedup": float,
                 "identical_to_plain": bool, "mismatches": int, "questions": int}


def write_jsonl(path, questions):
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path


def run_cli(*args, timeout=300):
    return subprocess.run(CLI + ["bench", *args], capture_output=True, text=True, timeout=timeout)


def test_bench_cli_writes_results(tmp_path, model_path):
    data = write_jsonl(tmp_path / "questions.jsonl", QUESTIONS)
    out = tmp_path / "out"
    r = run_cli("-m", str(model_path), "--data", str(data), "--strategies", "plain,lookup:4,probe:4",
                "-n", "16", "--limit", "1", "--out", str(out), "-t", "1")
    assert r.returncode == 0, r.stderr
    assert "| probe:4 |" in r.stdout and str(out / "results.json") in r.stdout

    res = json.loads((out / "results.json").read_text())
    names = ["plain", "lookup:4", "probe:4"]
    assert res["strategies"] == names and res["max_new_tokens"] == 16
    assert isinstance(res["model"], str) and res["model"]
    assert {"cpu", "cores", "threads", "os", "python", "backend"} <= set(res["device"])
    assert res["device"]["threads"] == 1
    # --limit 1: the first question of each subtask (mt_bench: the two-turn one)
    assert list(res["subtasks"]) == ["mt_bench", "qa"]
    for task, rows in [*res["subtasks"].items(), ("overall", res["overall"])]:
        assert list(rows) == names
        for name, row in rows.items():
            for field, kind in SUMMARY_TYPES.items():
                assert type(row[field]) is kind, (task, name, field)
            assert row["identical_to_plain"] and row["mismatches"] == 0, (task, name)
            assert row["tokens_per_second"] > 0 and 0 < row["mat"]
        assert rows["plain"]["speedup"] == 1.0 and rows["plain"]["mat"] <= 1.0
        assert rows["plain"]["questions"] == rows["probe:4"]["questions"]
    assert res["subtasks"]["mt_bench"]["plain"]["questions"] == 1
    assert res["subtasks"]["mt_bench"]["plain"]["turns"] == 2
    assert res["subtasks"]["qa"]["plain"]["questions"] == 1
    assert res["overall"]["plain"]["questions"] == 2 and res["overall"]["plain"]["turns"] == 3
    assert res["overall"]["plain"]["tokens"] == sum(
        res["subtasks"][t]["plain"]["tokens"] for t in ("mt_bench", "qa"))

    md = (out / "results.md").read_text()
    assert "--strategies plain,lookup:4,probe:4" in md and "## qa (1 question)" in md
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class OffByOne(Plain):
    """Plain decoding that emits the token after the model's choice: never identical to plain."""

    name = "off-by-one"

    def step(self, session, sampler, pending):
        return [(super().step(session, sampler, pending)[0] + 1) % session.model.n_vocab]


def test_bench_counts_mismatches(model_path, monkeypatch):
    monkeypatch.setitem(STRATEGIES, "off-by-one", OffByOne)
    questions = QUESTIONS[:3]
    # one thread: on a busy machine two threads stall each other at llama.cpp's barriers
    with Engine(str(model_path), n_ctx=1024, n_threads=1) as engine:
        res = bench.bench(engine, questions, ["plain", "off-by-one"], 8, progress=False)
    assert res["subtasks"]["mt_bench"]["off-by-one"]["mismatches"] == 3  # two questions, three turns
    assert res["subtasks"]["qa"]["off-by-one"]["mismatches"] == 1
    assert res["overall"]["off-by-one"]["mismatches"] == 4
    assert not res["overall"]["off-by-one"]["identical_to_plain"]
    assert res["overall"]["plain"]["mismatches"] == 0 and res["overall"]["plain"]["identical_to_plain"]
    assert res["overall"]["off-by-one"]["questions"] == 3


@pytest.mark.parametrize("case", ["missing data", "bad json", "unknown strategy", "duplicate strategy"])
def test_bench_bad_arguments_one_line(tmp_path, case):
    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    args = {"missing data": ["--data", str(tmp_path / "nope.jsonl")],
            "bad json": ["--data", str(tmp_path / "bad.jsonl")],
            "unknown strategy": ["--data", str(data), "--strategies", "plain,warp:4"],
            "duplicate strategy": ["--data", str(data), "--strategies", "lookup,lookup"]}[case]
    (tmp_path / "bad.jsonl").write_text(json.dumps(QUESTIONS[0]) + "\n{not json\n")
    # a model that does not exist: the argument errors must come before any model work
    r = run_cli("-m", "no-such-model", *args, timeout=60)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.startswith("edge-mtp: error:") and "\n" not in err and "Traceback" not in r.stderr
    assert {"missing data": "nope.jsonl", "bad json": "bad.jsonl:2", "unknown strategy": "'warp'",
            "duplicate strategy": "lookup"}[case] in err
    assert "no-such-model" not in err
