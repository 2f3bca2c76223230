"""The `edge-mtp` command line: chat, generate, pull, models. Flag names follow llama-cli."""
from __future__ import annotations

import functools
import json
import sys

import click

from . import __version__
from .errors import EdgeMTPError

DEFAULT_MODEL = "smollm2-135m"


def clean_errors(fn):
    """Our errors become one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except EdgeMTPError as e:
            click.echo(f"edge-mtp: error: {e}".splitlines()[0], err=True)
            sys.exit(2)

    return wrapper


def engine_options(fn):
    for opt in reversed([
        click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True,
                     help="model name (see `edge-mtp models`) or path to a .gguf file"),
        click.option("-c", "--ctx-size", "n_ctx", default=4096, show_default=True, type=int,
                     help="context size in tokens (0 = the model's training context)"),
        click.option("-t", "--threads", "n_threads", default=None, type=int,
                     help="CPU threads (default: all cores, at most 8)"),
        click.option("--strategy", default="plain", show_default=True,
                     help="decoding strategy: plain, probe, lookup (name or name:budget)"),
        click.option("--budget", type=int, default=None,
                     help="rows per forward pass for speculative strategies (probe: 4, 6, 10, 30, 60)"),
        click.option("--masks", type=int, default=None, help="probe: mask tokens per node (1 or 2)"),
        click.option("--flash-attn/--no-flash-attn", default=True, show_default=True,
                     help="flash attention (on: batch rows compute exactly what single rows do)"),
        click.option("--exact-rows/--no-exact-rows", default=True, show_default=True,
                     help="row-invariant CPU kernels: speculation stays token-identical to plain"),
        click.option("--verbose-backend", is_flag=True, help="show llama.cpp's own log"),
    ]):
        fn = opt(fn)
    return fn


def sampling_options(fn):
    for opt in reversed([
        click.option("--temp", "temperature", default=0.8, show_default=True, type=float,
                     help="temperature (0 = greedy)"),
        click.option("--top-k", default=40, show_default=True, type=int),
        click.option("--top-p", default=0.95, show_default=True, type=float),
        click.option("--min-p", default=0.05, show_default=True, type=float),
        click.option("-s", "--seed", default=None, type=int, help="RNG seed (default: random)"),
    ]):
        fn = opt(fn)
    return fn


def make_engine(model, n_ctx, n_threads, strategy, budget, masks, flash_attn, exact_rows,
                verbose_backend):
    from .engine import Engine

    options = {k: v for k, v in (("budget", budget), ("masks", masks)) if v is not None}
    return Engine(model, n_ctx=n_ctx, n_threads=n_threads, strategy=strategy,
                  strategy_options=options, flash_attn=flash_attn, exact_rows=exact_rows,
                  verbose=verbose_backend)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edge-mtp")
def main():
    """Multi-token decoding for local LLMs on top of llama.cpp."""


@main.command()
@engine_options
@sampling_options
@click.option("-p", "--prompt", required=True, help="prompt text (raw, no chat template)")
@click.option("-n", "--n-predict", "max_tokens", default=128, show_default=True, type=int,
              help="tokens to generate (-1 = until EOS or the context is full)")
@click.option("--stop", multiple=True, help="stop string (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object with text, tokens and stats")
@clean_errors
def generate(model, n_ctx, n_threads, strategy, budget, masks, flash_attn, exact_rows,
             verbose_backend, temperature, top_k, top_p, min_p, seed, prompt, max_tokens, stop, as_json):
    """Complete a prompt, streaming text to stdout (or one JSON object with --json)."""
    engine = make_engine(model, n_ctx, n_threads, strategy, budget, masks, flash_attn, exact_rows,
                         verbose_backend)
    stream = engine.stream(prompt, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           min_p=min_p, seed=seed, stop=list(stop))
    if as_json:
        for _ in stream:
            pass
        click.echo(json.dumps(stream.result, ensure_ascii=False))
        return
    for piece in stream:
        click.echo(piece, nl=False)
    click.echo()


@main.command()
@engine_options
@sampling_options
@click.option("-n", "--n-predict", "max_tokens", default=1024, show_default=True, type=int,
              help="most tokens per answer (-1 = until EOS or the context is full)")
@click.option("--system", default=None, help="system prompt")
@clean_errors
def chat(model, n_ctx, n_threads, strategy, budget, masks, flash_attn, exact_rows, verbose_backend,
         temperature, top_k, top_p, min_p, seed, max_tokens, system):
    """Chat in the terminal. /bye quits, /clear forgets, /set verbose shows stats; Ctrl-C stops an
    answer, Ctrl-D exits."""
    from .repl import ChatRepl

    engine = make_engine(model, n_ctx, n_threads, strategy, budget, masks, flash_attn, exact_rows,
                         verbose_backend)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    ChatRepl(engine, model, sampling, max_tokens, system).run()


@main.command()
@click.argument("name")
@clean_errors
def pull(name):
    """Download a known model into the local cache (checksum verified)."""
    from .models import pull as pull_model

    click.echo(str(pull_model(name)))


@main.command()
@clean_errors
def models():
    """List the known models and whether they are cached."""
    from .models import list_models

    for m in list_models():
        state = "cached" if m["cached"] else "not pulled"
        click.echo(f"{m['name']:<16} {m['size'] / 1e6:8.1f} MB  {state:<10}  {m['description']}")


if __name__ == "__main__":
    main()
