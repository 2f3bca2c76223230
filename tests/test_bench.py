"""`edge-mtp bench` on a tiny Spec-Bench-schema file: the results' shape, equality with plain,
mismatch counting and one-line errors for bad arguments."""
import json
import subprocess
import sys

import pytest

from edge_mtp import Engine, bench
from edge_mtp.strategies import STRATEGIES
from edge_mtp.strategies.speculative import Speculative

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


class OffByOne(Speculative):
    """Plain decoding that emits the token after the model's choice: never identical to plain."""

    def __init__(self):
        super().__init__()
        self.name = "off-by-one"

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


# -- sampled decoding ----------------------------------------------------------------------------
class PlainTwin(Speculative):
    """Plain under another name: with the same seed per turn it must sample plain's very tokens."""

    def __init__(self):
        super().__init__()
        self.name = "plain-twin"


def test_sampled_bench_gives_every_strategy_the_turns_seed(model_path, monkeypatch):
    monkeypatch.setitem(STRATEGIES, "plain-twin", PlainTwin)
    with Engine(str(model_path), n_ctx=1024, n_threads=1) as engine:
        res = bench.bench(engine, QUESTIONS[:1], ["plain", "plain-twin", "lookup:4"], 24,
                          progress=False, temperature=0.8, seed=11)
        # the seed is what decides: other seeds sample other text for the first turn
        msgs = QUESTIONS[0]["turns"][:1]
        texts = {engine.chat([{"role": "user", "content": msgs[0]}], max_tokens=24,
                             strategy="plain", **bench.sampling_for(0.8, seed, 0))["text"]
                 for seed in (11, 12, 13)}
    assert len(texts) > 1
    assert res["temperature"] == 0.8 and res["seed"] == 11 and res["equality"] == "distribution-level"
    assert res["overall"]["plain-twin"]["mismatches"] == 0  # same seed, same sampler: same tokens
    assert res["overall"]["lookup:4"]["mismatches"] == 0  # the verifier emits the drawn tokens too
    for rows in [*res["subtasks"].values(), res["overall"]]:
        for row in rows.values():
            assert row["identical_to_plain"] is None and row["equality"] == "distribution-level"
    md = bench.markdown(res)
    assert "sampled at temperature 0.8 (seed 11)" in md and "| lookup:4 |" in md
    assert "distribution-level" in md and "| yes |" not in md


def test_sampled_bench_cli_records_temp_and_seed(tmp_path, model_path):
    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[2:3])
    out = tmp_path / "out"
    r = run_cli("-m", str(model_path), "--data", str(data), "--strategies", "plain,lookup:4",
                "-n", "8", "--out", str(out), "-t", "1", "--temp", "0.8", "--seed", "5")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert (res["temperature"], res["seed"], res["equality"]) == (0.8, 5, "distribution-level")
    greedy = bench.sampling_for(0.0, 5, 3)
    assert greedy == {"temperature": 0.0}  # greedy runs keep the token check
    assert bench.sampling_for(0.8, 5, 3)["seed"] == 8


# -- a model without a chat template -------------------------------------------------------------
@pytest.fixture(scope="module")
def no_template_model(tmp_path_factory, model_path):
    from conftest import load_tool

    tiny = load_tool("tiny_model")
    return tiny.write_tiny_model(tmp_path_factory.mktemp("base") / "tiny-base.gguf", model_path,
                                 "llama", chat_template=False)


class RecordingPeer:
    """Stands in for a llama-server process (not for llama.cpp: edge-mtp decodes on the real
    model): records the prompt tokens it is sent, answers with fixed timings."""

    command = ["llama-server", "-m", "model.gguf"]

    def __init__(self, predicted_n=9, predicted_ms=80.0, draft_n=0, accepted=0):
        self.prompts, self.calls = [], []
        self.timings = {"prompt_n": 5, "prompt_ms": 4.0, "predicted_n": predicted_n,
                        "predicted_ms": predicted_ms}
        if draft_n:
            self.timings.update(draft_n=draft_n, draft_n_accepted=accepted)

    def complete(self, tokens, max_tokens, **sampling):
        self.prompts.append(list(tokens))
        self.calls.append((max_tokens, sampling))
        return {"timings": dict(self.timings), "tokens": []}


def test_a_model_without_chat_template_is_benched_on_raw_prompts(no_template_model):
    with Engine(str(no_template_model), n_ctx=512, n_threads=1) as engine:
        assert not bench.has_chat_template(engine)
        with pytest.raises(Exception, match="no chat template"):
            engine.chat([{"role": "user", "content": "hi"}], max_tokens=2)
        peer = RecordingPeer()
        res = bench.bench(engine, QUESTIONS[:1], ["plain", "lookup:4"], 6, progress=False,
                          peers={"llama-server": peer})
        first, second = QUESTIONS[0]["turns"]
        assert peer.prompts[0] == engine.tokenize(first)  # the warm-up
        assert peer.prompts[1] == engine.tokenize(first)
        assert engine.detokenize(peer.prompts[2]).startswith(first + "\n\n")
        assert engine.detokenize(peer.prompts[2]).endswith("\n\n" + second)
    assert res["chat_template"] is False and res["overall"]["lookup:4"]["identical_to_plain"]
    assert res["overall"]["plain"]["turns"] == 2
    assert "no chat template: raw prompts" in bench.markdown(res)


# -- the peer's rows -------------------------------------------------------------------------------
def test_peer_rows_merge_into_the_results(model_path, tmp_path):
    plain_peer = RecordingPeer(predicted_n=9, predicted_ms=80.0)
    mod_peer = RecordingPeer(predicted_n=9, predicted_ms=40.0, draft_n=10, accepted=4)
    peers = {"llama-server": plain_peer, "llama-server:ngram-mod": mod_peer}
    with Engine(str(model_path), n_ctx=1024, n_threads=1) as engine:
        res = bench.bench(engine, QUESTIONS[2:4], ["plain", "lookup:4"], 8, progress=False,
                          peers=peers)
    names = ["plain", "lookup:4", "llama-server", "llama-server:ngram-mod"]
    assert res["strategies"] == names and list(res["peers"]) == names[2:]
    assert res["peers"]["llama-server"] == RecordingPeer.command
    assert plain_peer.calls[1:] == [(8, {"temperature": 0.0})] * 2  # same max tokens, greedy
    row, ref = res["overall"]["llama-server:ngram-mod"], res["overall"]["plain"]
    assert row["peer"] and row["turns"] == 2 and row["tokens"] == 18
    assert row["tokens_per_second"] == pytest.approx(2 * 8 / 0.08)
    assert (row["drafted"], row["accepted"], row["acceptance"]) == (20, 8, 0.4)
    assert row["mat"] == pytest.approx(18 / (2 + 16 - 8), abs=1e-4)  # passes saved by accepted drafts
    assert row["speedup"] == pytest.approx(row["tokens_per_second"] / ref["tokens_per_second"], rel=1e-3)
    assert row["identical_to_plain"] is False  # the fake returned no tokens
    vs = res["plain_vs_llama_server"]
    assert set(vs) == {"qa", "overall"}
    assert vs["overall"] == pytest.approx(ref["tokens_per_second"] / (2 * 8 / 0.16), rel=1e-3)
    md = bench.markdown(res)
    assert "| llama-server:ngram-mod |" in md and "20 / 8" in md
    assert "edge-mtp plain / llama-server plain" in md and f"{vs['overall']:.2f}x |" in md
    paths = bench.write_report(res, tmp_path / "out")
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("text, want", [
    ("llama-server", ["llama-server"]),
    ("llama-server:ngram-mod,ngram-simple",
     ["llama-server", "llama-server:ngram-mod", "llama-server:ngram-simple"]),
])
def test_parse_peer(text, want):
    from edge_mtp.peer import parse_peer

    assert parse_peer(text) == want


@pytest.mark.parametrize("case", ["vllm", "llama-server:warp", "llama-server:ngram-mod,ngram-mod"])
def test_bad_peer_is_one_line_before_any_model_work(tmp_path, case):
    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    r = run_cli("-m", "no-such-model", "--data", str(data), "--peer", case, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = r.stderr.strip()
    assert err.startswith("edge-mtp: error:") and "\n" not in err and "no-such-model" not in err


def test_peer_builds_from_the_backends_pinned_source():
    from conftest import load_tool  # noqa: F401  (tools/ and native/ are scripts)
    import importlib.util
    from pathlib import Path

    from edge_mtp import peer

    path = Path(__file__).resolve().parents[1] / "native" / "build.py"
    spec = importlib.util.spec_from_file_location("edge_mtp_native_build", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert (peer.SDIST, peer.SDIST_SHA256, peer.SDIST_VERSION) == (build.SDIST, build.SDIST_SHA256,
                                                                    build.VERSION)


def test_real_peer_when_built(model_path, tmp_path):
    """Stock llama-server on the default model, when a build is cached (never built here: the
    build takes minutes; `edge-mtp bench --peer llama-server` makes it)."""
    from edge_mtp import peer

    if not peer.cached_binary().is_file():
        pytest.skip("no cached llama-server build")
    with Engine(str(model_path), n_ctx=1024, n_threads=1) as engine:
        servers = peer.start_servers(["llama-server", "llama-server:ngram-mod"], engine.model_path,
                                     engine.n_ctx, 1, log_dir=tmp_path)
        try:
            res = bench.bench(engine, QUESTIONS[2:3], ["plain"], 16, progress=False, peers=servers)
        finally:
            peer.stop_servers(servers)
    row = res["overall"]["llama-server"]
    assert row["tokens"] > 0 and row["tokens_per_second"] > 0
    assert row["identical_to_plain"]  # stock greedy decoding gives edge-mtp plain's tokens
    assert res["overall"]["llama-server:ngram-mod"]["tokens"] > 0


STAND_IN_SERVER = """#!{python}
# stands in for a llama-server that dies of SIGILL while loading unless --no-repack is given ({mode})
import http.server, os, signal, sys
if "--no-repack" not in sys.argv or "{mode}" == "always":
    os.kill(os.getpid(), signal.SIGILL)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{{}}")
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), Health).serve_forever()
"""


@pytest.mark.parametrize("mode", ["amx", "always"])
def test_peer_dying_of_sigill_is_started_once_more_without_repack(tmp_path, mode):
    """Stock llama.cpp dies of SIGILL while loading on AMX CPUs: the peer is started again with
    --no-repack (recorded in its command), once; a second death is a one-line error."""
    import sys

    from edge_mtp.errors import BackendError
    from edge_mtp.peer import PeerServer

    binary = tmp_path / "llama-server"
    binary.write_text(STAND_IN_SERVER.format(python=sys.executable, mode=mode))
    binary.chmod(0o755)
    server = PeerServer(binary, tmp_path / "m.gguf", 512, 1, "ngram-mod", log_dir=tmp_path)
    if mode == "always":
        with pytest.raises(BackendError, match="exited with -4"):
            server.start(timeout=60)
        assert server.no_repack
        return
    try:
        server.start(timeout=60)
        assert server.no_repack and server.command[-1] == "--no-repack"
        assert "--spec-type" in server.command
    finally:
        server.stop()


def test_peer_eos_token_is_not_counted():
    """llama-server's predicted_n and tokens include the EOS it stopped at; ours do not."""
    eos = {"timings": {"predicted_n": 5, "predicted_ms": 40.0, "prompt_ms": 1.0},
           "tokens": [7, 8, 9, 10, 2], "stop_type": "eos"}
    limit = {**eos, "stop_type": "limit"}
    assert bench.peer_tokens(eos) == [7, 8, 9, 10] and bench.peer_tokens(limit) == eos["tokens"]
    t = bench.PeerTally()
    t.add(eos, False)
    t.add(limit, False)
    assert (t.tokens, t.decode_tokens) == (9, 7)
