"""The `edge-mtp` command line, run as a user runs it: subprocesses and a pseudo-terminal."""
import json
import re
import subprocess
import sys

import pexpect
import pytest

CLI = [sys.executable, "-m", "edge_mtp.cli"]


def run_cli(*args, timeout=120):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout)


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and "edge-mtp" in r.stdout


def test_generate_json_schema(model_path):
    r = run_cli("generate", "-m", str(model_path), "-p", "The capital of France is", "-n", "32",
                "--temp", "0", "--json", "-t", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1  # exactly one JSON object
    d = json.loads(lines[0])
    assert isinstance(d["text"], str) and d["text"]
    assert isinstance(d["tokens"], list) and all(isinstance(t, int) for t in d["tokens"])
    assert d["usage"]["completion_tokens"] == len(d["tokens"]) <= 32
    assert {"prompt_ms", "decode_ms", "tokens_per_second"} <= set(d["timings"])
    assert {"strategy", "steps", "drafted", "accepted", "mean_accepted_tokens_per_step"} <= set(d["speculation"])
    assert d["choices"][0]["text"] == d["text"]
    assert "Paris" in d["text"]


def test_generate_streams_plain_text(model_path):
    r = run_cli("generate", "-m", str(model_path), "-p", "The capital of France is", "-n", "8",
                "--temp", "0", "-t", "2")
    assert r.returncode == 0 and "Paris" in r.stdout


@pytest.fixture
def bad_files(tmp_path, model_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n" * 100)
    truncated = tmp_path / "truncated.gguf"
    with open(model_path, "rb") as src:
        truncated.write_bytes(src.read(5_000_000))
    return {"missing": tmp_path / "missing.gguf", "empty": empty, "text": text,
            "truncated": truncated}


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "truncated"])
def test_bad_model_file_gives_one_line_error(bad_files, kind):
    r = run_cli("generate", "-m", str(bad_files[kind]), "-p", "hi", "-n", "4")
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.startswith("edge-mtp: error:") and "\n" not in err
    assert "Traceback" not in r.stderr


def test_unknown_model_name():
    r = run_cli("generate", "-m", "no-such-model", "-p", "hi")
    assert r.returncode == 2 and "no-such-model" in r.stderr and "Traceback" not in r.stderr


def spawn_chat(model_path):
    child = pexpect.spawn(CLI[0], CLI[1:] + ["chat", "-m", str(model_path), "--temp", "0", "-t", "2"],
                          encoding="utf-8", timeout=120)
    child.expect(">>> ")
    return child


def ask_prompt_tokens(child, question: str) -> int:
    """Ask in the REPL (verbose on) and return the prompt size the footer reports."""
    child.sendline(question)
    child.expect(r"prompt (\d+) tok in")
    n = int(child.match.group(1))
    child.expect(">>> ")
    return n


def test_chat_repl_answers_shows_stats_and_exits_with_bye(model_path):
    child = spawn_chat(model_path)
    child.sendline("/set verbose")
    child.expect("Verbose stats on")
    child.expect(">>> ")
    child.sendline("Say hello.")
    child.expect(r"Say hello\.\r\n")  # the terminal's echo
    child.expect(r"tok/s")  # the verbose footer after the answer
    assert re.search(r"\w{2,}", child.before)  # some answer text came before it
    child.expect(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_repl_ctrl_c_stops_the_answer_and_keeps_the_conversation(model_path):
    child = spawn_chat(model_path)
    child.sendline("/set verbose")
    child.expect(">>> ")
    child.sendline("Write a very long essay about the history of Rome.")
    child.expect(r"Rome\.\r\n")  # the terminal's echo of the question
    child.expect(r"\w+ \w+ \w+")  # the answer is streaming
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect(r"finish none \(stopped\)")
    child.expect(">>> ")
    with_history = ask_prompt_tokens(child, "Say hi.")
    child.sendline("/clear")
    child.expect("Conversation cleared")
    child.expect(">>> ")
    fresh = ask_prompt_tokens(child, "Say hi.")
    assert with_history > fresh + 10  # the interrupted exchange stayed in the conversation
    child.sendeof()  # Ctrl-D exits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
