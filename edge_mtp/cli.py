"""The `edge-mtp` command line: chat, generate, pull, models. Flag names follow llama-cli."""
from __future__ import annotations

import functools
import json
import sys

import click

from . import __version__
from .convert import OUTTYPES
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


LORA_OPTION = click.option("--lora", default=None, type=click.Path(dir_okay=False),
                           help="LoRA adapter GGUF (llama.cpp's format) to apply over the model")


def engine_options(fn):
    for opt in reversed([
        click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True,
                     help="model name (see `edge-mtp models`) or path to a .gguf file"),
        LORA_OPTION,
        click.option("-c", "--ctx-size", "n_ctx", default=4096, show_default=True, type=int,
                     help="context size in tokens (0 = the model's training context)"),
        click.option("-t", "--threads", "n_threads", default=None, type=int,
                     help="CPU threads (default: all cores, at most 8)"),
        click.option("--strategy", default="auto", show_default=True,
                     help="decoding strategy: plain, probe, lookup, lookahead, auto, dmtd (DMTD "
                          "models; dmtd:TAU) (name or name:budget)"),
        click.option("--budget", type=int, default=None,
                     help="rows per forward pass for speculative strategies "
                          "(probe: 4, 6, 10, 30, 60; lookahead: >= 4)"),
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


def make_engine(model, lora, n_ctx, n_threads, strategy, budget, masks, flash_attn, exact_rows,
                verbose_backend):
    from .engine import Engine

    options = {k: v for k, v in (("budget", budget), ("masks", masks)) if v is not None}
    engine = Engine(model, lora=lora, n_ctx=n_ctx, n_threads=n_threads, strategy=strategy,
                    strategy_options=options, flash_attn=flash_attn, exact_rows=exact_rows,
                    verbose=verbose_backend)
    if strategy.partition(":")[0] == "auto":
        from .profile import CONTEXT, GRID, get_profile, load_profile

        if engine.n_ctx >= CONTEXT + GRID[-1] + 1 and load_profile(engine.session) is None:
            click.echo("edge-mtp: measuring this device once for the auto strategy (about 10 s; "
                       "`edge-mtp calibrate` shows the curve)", err=True)
            get_profile(engine.session)
    return engine


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
def generate(model, lora, n_ctx, n_threads, strategy, budget, masks, flash_attn, exact_rows,
             verbose_backend, temperature, top_k, top_p, min_p, seed, prompt, max_tokens, stop, as_json):
    """Complete a prompt, streaming text to stdout (or one JSON object with --json)."""
    engine = make_engine(model, lora, n_ctx, n_threads, strategy, budget, masks, flash_attn,
                         exact_rows, verbose_backend)
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
def chat(model, lora, n_ctx, n_threads, strategy, budget, masks, flash_attn, exact_rows,
         verbose_backend, temperature, top_k, top_p, min_p, seed, max_tokens, system):
    """Chat in the terminal. /bye quits, /clear forgets, /set verbose shows stats; Ctrl-C stops an
    answer, Ctrl-D exits."""
    from .repl import ChatRepl

    engine = make_engine(model, lora, n_ctx, n_threads, strategy, budget, masks, flash_attn,
                         exact_rows, verbose_backend)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    ChatRepl(engine, model, sampling, max_tokens, system).run()


@main.command()
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True,
              help="model name (see `edge-mtp models`) or path to a .gguf file")
@LORA_OPTION
@click.option("-t", "--threads", "n_threads", default=None, type=int,
              help="CPU threads (default: all cores, at most 8)")
@click.option("--flash-attn/--no-flash-attn", default=True, show_default=True)
@click.option("--exact-rows/--no-exact-rows", default=True, show_default=True)
@click.option("--rounds", default=7, show_default=True, type=click.IntRange(1, 50),
              help="interleaved timing rounds (the median per row count counts)")
@click.option("--late-layers", multiple=True, type=click.IntRange(1),
              help="also time one row through only the last D layers (DMTD; repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print the profile as JSON")
@click.option("--show", is_flag=True,
              help="measure nothing: show the cached curve, what recent runs saw and where auto starts")
@clean_errors
def calibrate(model, lora, n_threads, flash_attn, exact_rows, rounds, late_layers, as_json, show):
    """Measure what a forward pass of n rows costs here (n = 1..64), the curve `auto` decides by.

    The profile is cached per model file, threads, backend build and mode, and re-measured here;
    auto re-prices rows from the steps it runs and records them in it (see --show)."""
    from dataclasses import asdict

    from .backend import Model, Session
    from .errors import RequestError
    from .models import resolve
    from .profile import CONTEXT, GRID, load_profile, measure

    files = resolve(model, lora)
    m = Model(files.path, lora=files.lora)
    for d in late_layers:
        if d > m.n_layer:
            raise RequestError(f"--late-layers {d}: the model has {m.n_layer} layers")
    session = Session(m, n_ctx=CONTEXT + GRID[-1] + 1, n_threads=n_threads, flash_attn=flash_attn,
                      exact_rows=exact_rows)
    if show:
        prof = load_profile(session)
        if prof is None:
            raise RequestError("no profile cached for this model, thread count and mode yet "
                               "(`edge-mtp calibrate` measures one; auto does on its first request)")
        click.echo(json.dumps(asdict(prof)) if as_json else prof.show())
        return
    with click.progressbar(length=rounds, label="timing", file=sys.stderr) as bar:
        prof = measure(session, rounds=rounds, late_layers=tuple(late_layers),
                       progress=lambda done, total: bar.update(1))
    click.echo(json.dumps(asdict(prof)) if as_json else prof.table())


@main.command()
@click.argument("name")
@clean_errors
def pull(name):
    """Download a known model into the local cache (checksum verified); for a model shipped as a
    LoRA adapter, its base (the adapter, shipped with edge-mtp, is checked)."""
    from .models import pull as pull_model, resolve

    pull_model(name)
    files = resolve(name)
    click.echo(str(files.path) + (f" + LoRA adapter {files.lora}" if files.lora else ""))


@main.command()
@clean_errors
def models():
    """List the known models, their licenses and whether they are cached."""
    from .models import list_models

    for m in list_models():
        state = "cached" if m["cached"] else "not pulled"
        click.echo(f"{m['name']:<18} {m['size'] / 1e6:8.1f} MB  {state:<10}  {m['license']:<18}  "
                   f"{m['description']}")


@main.command()
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True,
              help="model name (see `edge-mtp models`) or path to a .gguf file")
@LORA_OPTION
@click.option("--data", required=True, help="questions as Spec-Bench JSONL (question_id, category, turns)")
@click.option("--strategies", default="plain,lookup,probe:4,probe:10", show_default=True,
              help="comma-separated strategies to compare (plain, the reference, is always run)")
@click.option("-n", "--n-predict", "max_tokens", default=128, show_default=True, type=int,
              help="most new tokens per turn")
@click.option("--limit", type=int, default=None, help="only the first K questions of each subtask")
@click.option("--out", default=None, help="output folder [default: ./bench-results/MODEL-TIMESTAMP]")
@click.option("-t", "--threads", "n_threads", default=None, type=int,
              help="CPU threads (default: all cores, at most 8)")
@click.option("-c", "--ctx-size", "n_ctx", default=4096, show_default=True, type=int,
              help="context size in tokens")
@click.option("--temp", "temperature", default=0.0, show_default=True, type=float,
              help="temperature (0 = greedy, token equality checked; > 0: sampled, the same seed "
                   "per turn for every strategy, equality distribution-level)")
@click.option("-s", "--seed", default=None, type=int,
              help="base RNG seed of a sampled run (turn k gets seed + k; default: random, recorded)")
@click.option("--peer", default=None,
              help="also measure stock llama.cpp's server on the same turns: llama-server or "
                   "llama-server:TYPE[,TYPE...] (spec types, e.g. ngram-mod,ngram-simple); built "
                   "once from the pinned source and cached")
@clean_errors
def bench(model, lora, data, strategies, max_tokens, limit, out, n_threads, n_ctx, temperature, seed, peer):
    """Compare strategies on a benchmark, interleaved per turn: MAT, tokens/s, speedup vs plain and
    token equality with plain, per subtask; writes results.json, results.md and speedup.png."""
    import re
    import shlex
    import time
    from pathlib import Path

    from . import bench as benchmark
    from .engine import Engine
    from .errors import RequestError

    specs = benchmark.parse_strategies(strategies)
    if max_tokens < 1:
        raise RequestError(f"-n must be at least 1, got {max_tokens}")
    if temperature < 0:
        raise RequestError(f"--temp must be >= 0, got {temperature}")
    peer_names = []
    if peer:
        from . import peer as peers_mod

        peer_names = peers_mod.parse_peer(peer)
    questions = benchmark.load_questions(data, limit)
    engine = Engine(model, lora=lora, n_ctx=n_ctx, n_threads=n_threads)
    if peer_names and engine.model.lora:
        raise RequestError("--peer runs llama-server on the base model alone; it cannot compare "
                           "a model with a LoRA adapter")
    command = shlex.join(["edge-mtp", *sys.argv[1:]])
    if out is None:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", engine.model_name)
        out = Path("bench-results") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    servers = {}
    try:
        if peer_names:
            Path(out).mkdir(parents=True, exist_ok=True)
            servers = peers_mod.start_servers(peer_names, engine.model_path, engine.n_ctx,
                                              engine.session.n_threads, log_dir=Path(out))
        results = benchmark.bench(engine, questions, specs, max_tokens, command,
                                  temperature=temperature, seed=seed, peers=servers)
    finally:
        if servers:
            peers_mod.stop_servers(servers)
    paths = benchmark.write_report(results, out)
    click.echo(benchmark.markdown_table(results["overall"]))
    click.echo(f"results: {', '.join(str(p) for p in paths)}")


@main.command()
@click.argument("hf_dir", type=click.Path(file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="GGUF file to write")
@click.option("--outtype", default="f16", show_default=True, type=click.Choice(OUTTYPES),
              help="weight type; q4_*/q5_*/q6_* go through llama.cpp's quantizer after an f16 conversion")
@click.option("--dmtd-cycle", type=click.IntRange(1), default=None,
              help="DMTD cycle length to record (default: config.json's mtp_horizon)")
@clean_errors
def convert(hf_dir, out, outtype, dmtd_cycle):
    """Convert a Hugging Face checkpoint (llama, qwen3; DMTD or not) to GGUF with llama.cpp's own
    converter, writing the dmtd.* keys of a DMTD checkpoint. Needs `pip install 'edge-mtp[convert]'`."""
    from .convert import convert as run_convert

    click.echo(str(run_convert(hf_dir, out, outtype, dmtd_cycle)))


@main.command()
@click.argument("src")
@click.argument("dst", type=click.Path(dir_okay=False))
@click.argument("weight_type", type=click.Choice(OUTTYPES, case_sensitive=False))
@clean_errors
def quantize(src, dst, weight_type):
    """Write SRC (a .gguf or a known model's name) with its weights in WEIGHT_TYPE, with llama.cpp's
    quantizer (re-quantizing or dequantizing a quantized file too, e.g. the F32 twin of a Q4_1
    model); metadata, dmtd.* keys included, is kept."""
    from .backend import quantize_model
    from .models import resolve_model

    click.echo(str(quantize_model(resolve_model(src), dst, weight_type.upper())))


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@clean_errors
def inspect(file, as_json):
    """Show a GGUF's architecture, layers, quantization, DMTD split and chat template."""
    from .convert import describe

    info = describe(file)
    if as_json:
        click.echo(json.dumps(info))
        return
    types = ", ".join(f"{k} x{v}" for k, v in info["tensor_types"].items())
    dmtd = info["dmtd"]
    click.echo(f"architecture   {info['architecture']} ({info['name']})\n"
               f"layers         {info['layers']}\n"
               f"quantization   {info['file_type']} ({info['tensors']} tensors: {types})\n"
               f"dmtd           {dmtd['split'] if dmtd else 'no (not a DMTD model)'}\n"
               f"chat template  {'yes' if info['chat_template'] else 'no'}")


@main.command()
@engine_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind (0.0.0.0 exposes the server to the network)")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option("--api-key", default=None, envvar="EDGE_MTP_API_KEY",
              help="require 'Authorization: Bearer KEY' on /v1 (or set EDGE_MTP_API_KEY)")
@click.option("--max-queue", default=8, show_default=True, type=click.IntRange(0),
              help="requests that may wait while one runs; more get 503")
@click.option("--alias", default=None, help="model id the server reports [default: the model's name]")
@clean_errors
def serve(model, lora, n_ctx, n_threads, strategy, budget, masks, flash_attn, exact_rows,
          verbose_backend, host, port, api_key, max_queue, alias):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models, /health); needs the `server` extra."""
    try:
        from .server import serve as run_server
    except ImportError as e:
        raise EdgeMTPError(f"the server needs its extra: pip install 'edge-mtp[server]' ({e})") from None
    engine = make_engine(model, lora, n_ctx, n_threads, strategy, budget, masks, flash_attn,
                         exact_rows, verbose_backend)
    click.echo(f"edge-mtp: serving {alias or engine.model_name} ({strategy}) on "
               f"http://{host}:{port}/v1", err=True)
    run_server(engine, host=host, port=port, api_key=api_key, max_queue=max_queue, model_id=alias)


if __name__ == "__main__":
    main()
