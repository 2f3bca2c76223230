"""The interactive chat loop behind `edge-mtp chat` (Ollama-like commands, streaming output)."""
from __future__ import annotations

import sys

import click

from .engine import Engine
from .errors import EdgeMTPError

HELP = "/bye quit · /clear forget the conversation · /set verbose toggle stats · Ctrl-C stop answer · Ctrl-D quit"


class ChatRepl:
    def __init__(self, engine: Engine, model_name: str, sampling: dict, max_tokens: int,
                 system: str | None):
        self.engine, self.model_name = engine, model_name
        self.sampling, self.max_tokens, self.system = sampling, max_tokens, system
        self.verbose = False
        self.messages: list[dict] = []
        self.clear()

    def clear(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def run(self) -> None:
        click.echo(f"edge-mtp chat · {self.model_name} · strategy {self.engine.strategy}")
        click.echo(HELP)
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                click.echo()
                return
            except KeyboardInterrupt:
                click.echo("\nUse Ctrl-D or /bye to exit.")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line):
                    return
                continue
            self.answer(line)

    def command(self, line: str) -> bool:
        """Handle a slash command; True means quit."""
        words = line.split()
        if words[0] in ("/bye", "/exit", "/quit"):
            return True
        if words[0] == "/clear":
            self.clear()
            click.echo("Conversation cleared.")
        elif words[:2] == ["/set", "verbose"]:
            self.verbose = not self.verbose
            click.echo(f"Verbose stats {'on' if self.verbose else 'off'}.")
        elif words[:2] == ["/set", "quiet"]:
            self.verbose = False
            click.echo("Verbose stats off.")
        else:
            click.echo(f"Unknown command {words[0]}. {HELP}")
        return False

    def answer(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        try:
            stream = self.engine.stream(self.messages, self.max_tokens, **self.sampling)
        except EdgeMTPError as e:
            self.messages.pop()
            click.echo(f"error: {e}", err=True)
            return
        try:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()
            click.echo(" [stopped]", nl=False)
        click.echo()
        result = stream.result
        # the conversation keeps what the user saw, even when the answer was cut short
        self.messages.append({"role": "assistant", "content": result["text"]})
        if self.verbose:
            click.echo(click.style(footer(result), dim=True))


def footer(result: dict) -> str:
    t, s = result["timings"], result["speculation"]
    return (f"[{result['usage']['completion_tokens']} tokens · {t['tokens_per_second']:.1f} tok/s · "
            f"prompt {result['usage']['prompt_tokens']} tok in {t['prompt_ms']:.0f} ms · "
            f"{s['mean_accepted_tokens_per_step']:.2f} tok/step · {s['strategy']} · "
            f"finish {result['choices'][0]['finish_reason'] or 'none (stopped)'}]"
            + (f"\n[auto: {s['decision']}]" if "decision" in s else ""))
