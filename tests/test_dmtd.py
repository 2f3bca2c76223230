"""DMTD: the dmtd.* metadata, and the `dmtd` strategy against a plain numpy reference.

Tiny random DMTD models (tools/tiny_model.py weights plus dmtd.* keys) with F32 matrices, so the
float64 numpy reference (tools/dmtd_reference.py) and the runtime agree to ~1e-6 in the logits;
the reference's smallest top-1/top-2 margin of each run is asserted far above that, so equal
greedy tokens are a real check, not luck at near-ties.
"""
import importlib.util
import json
from pathlib import Path

import gguf
import pytest

from edge_mtp import Engine
from edge_mtp.backend import Model, Session
from edge_mtp.errors import ModelError, RequestError
from edge_mtp.generation import Generation
from edge_mtp.gguf_file import read_header
from edge_mtp.gguf_meta import DmtdConfig, dmtd_from_hf_config, validate_dmtd
from edge_mtp.sampling import Sampler, SamplingParams
from edge_mtp.strategies.dmtd import Dmtd

from conftest import load_tool

PROMPT = "Once upon a time, in a land far away, there lived"
SPLITS = {"E0": DmtdConfig(0, 2, 2, 4), "E1": DmtdConfig(1, 2, 1, 4)}


@pytest.fixture(scope="module")
def tiny_dmtd(tmp_path_factory, model_path):
    """tiny_dmtd(arch, split) -> path of a 4-layer F32 DMTD GGUF (written once)."""
    tiny = load_tool("tiny_model")
    made = {}

    def make(arch="llama", split="E0"):
        if (arch, split) not in made:
            out = tmp_path_factory.mktemp("dmtd") / f"dmtd-{arch}-{split}.gguf"
            made[arch, split] = tiny.write_tiny_model(out, model_path, arch, n_layer=4, seed=3,
                                                      extra_kv=SPLITS[split].kv(),
                                                      qtype=gguf.GGMLQuantizationType.F32)
        return made[arch, split]

    return make


@pytest.fixture(scope="module")
def reference():
    return load_tool("dmtd_reference")


def engine_for(path):
    return Engine(str(path), n_ctx=512, n_threads=1, strategy="dmtd")


# -- metadata ---------------------------------------------------------------------------------
GOOD = DmtdConfig(0, 2, 2, 4).kv()


@pytest.mark.parametrize("change, message", [
    ({"dmtd.cycle": 0}, "dmtd.cycle must be >= 1"),
    ({"dmtd.decoding_layers": 3}, "do not add up to the model's 4 layers"),
    ({"dmtd.thinking_layers": 0, "dmtd.decoding_layers": 4}, "thinking >= 1"),
    ({"dmtd.cycle": "4"}, "dmtd.cycle must be an integer, got str"),
    ({"dmtd.cycle": 4.0}, "must be an integer, got float"),
    ({"dmtd.version": 2}, "version 2 is not supported"),
    ({"dmtd.horizon": 4}, "unknown DMTD metadata key dmtd.horizon"),
    ({"dmtd.cycle": None}, "dmtd.cycle is missing"),
])
def test_bad_dmtd_metadata_is_refused_with_one_line(change, message):
    values = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(ModelError, match=message) as e:
        validate_dmtd(values, 4, "m.gguf")
    assert "\n" not in str(e.value) and str(e.value).startswith("m.gguf: ")


def read_dmtd(path) -> DmtdConfig | None:
    """The validated DMTD split in a GGUF file's header (the only part these files have)."""
    h = read_header(path, lambda key: key.startswith("dmtd."))
    return validate_dmtd(h.fields, h.fields.get(f"{h.architecture}.block_count", 0), Path(path).name)


def test_dmtd_metadata_round_trips_through_a_gguf(tiny_dmtd, tmp_path):
    assert read_dmtd(tiny_dmtd("qwen3", "E1")) == SPLITS["E1"]
    assert validate_dmtd({"general.name": "x"}, 4) is None
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")  # the header is all read_dmtd reads
    w.add_block_count(4)
    for key, value in {**GOOD, "dmtd.cycle": "four"}.items():
        (w.add_uint32 if isinstance(value, int) else w.add_string)(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(ModelError, match="bad.gguf: DMTD key dmtd.cycle must be an integer, got str"):
        read_dmtd(tmp_path / "bad.gguf")


def test_dmtd_fields_of_a_hugging_face_config():
    cfg = {"num_hidden_layers": 36, "num_encoding_layers": 0, "num_thinking_layers": 28,
           "num_decoding_layers": 8, "mtp_horizon": 4}
    assert dmtd_from_hf_config(cfg) == DmtdConfig(0, 28, 8, 4)
    assert dmtd_from_hf_config(cfg, cycle=2).cycle == 2
    assert dmtd_from_hf_config({"num_hidden_layers": 36}) is None
    with pytest.raises(ModelError, match="do not add up to the model's 30 layers"):
        dmtd_from_hf_config({**cfg, "num_hidden_layers": 30})
    with pytest.raises(ModelError, match="mtp_horizon is missing"):
        dmtd_from_hf_config({k: v for k, v in cfg.items() if k != "mtp_horizon"})


# -- the strategy against the reference ---------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2"])
def test_greedy_tokens_equal_the_numpy_reference(arch, tiny_dmtd, reference):
    """64 greedy tokens for tau = 2, 4 (E0 T2 D2) and tau = 3 with an encoding layer (E1 T2 D1);
    the converter test below runs tau = 1..4 on converted checkpoints.

    Float32 K/V and no flash attention (CPU flash attention rounds through float16): the runtime's
    logits then differ from the float64 reference by ~1e-6, far below every run's top-2 margin."""
    for split, taus in (("E0", (2, 4)), ("E1", (3,))):
        path = tiny_dmtd(arch, split)
        model = Model(path)
        session = Session(model, n_ctx=256, n_threads=1, flash_attn=False, f32_cache=True)
        prompt = model.tokenize(PROMPT)
        for tau in taus:
            gen = Generation(session, Dmtd(tau), Sampler(SamplingParams(temperature=0)), prompt, 64)
            gen.run()
            want, margins = reference.dmtd_generate(path, prompt, 64, tau)
            assert min(margins) > 1e-4, f"{arch} {split} tau {tau}: a near-tie makes this run no test"
            assert gen.tokens == want, f"{arch} {split} tau {tau}"
            spec, steps = gen.speculation, len(gen.tokens) - 1  # the prompt pass gave the first token
            assert spec["tau"] == tau and spec["full_passes"] == -(-steps // tau)
            assert spec["late_passes"] == steps - spec["full_passes"]
        session.close()
        model.close()


def test_stats_stop_strings_sampling_and_a_plain_request_after(tiny_dmtd):
    path = tiny_dmtd("qwen3", "E0")
    with engine_for(path) as e:
        plain = e.generate(PROMPT, 12, temperature=0, strategy="plain")
        r = e.generate(PROMPT, 9, temperature=0, strategy="dmtd:3")
        spec = r["speculation"]
        # 8 steps after the prompt pass: heads at local 0, 3, 6 (full), 5 late-only passes of 2/4 layers
        assert (spec["full_passes"], spec["late_passes"], spec["refilled_rows"]) == (3, 5, 4)
        assert spec["layer_fraction"] == round((3 * 4 + 5 * 2) / (8 * 4), 4)
        assert r["choices"][0]["finish_reason"] == "length" and len(r["tokens"]) == 9
        # a stop string cuts inside a cycle; the text before it is all that is returned
        text = e.generate(PROMPT, 40, temperature=0, strategy="dmtd:4")["text"]
        stop = text[len(text) // 2:len(text) // 2 + 3]
        cut = e.generate(PROMPT, 40, temperature=0, strategy="dmtd:4", stop=[stop])
        assert cut["text"] == text[:text.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"
        a = e.generate(PROMPT, 24, temperature=0.9, seed=7, strategy="dmtd:2")
        b = e.generate(PROMPT, 24, temperature=0.9, seed=7, strategy="dmtd:2")
        assert a["tokens"] == b["tokens"] and a["text"] == b["text"]
        # DMTD's cells (gated prompt, skipped thinking layers) are never reused by a plain request
        assert e.generate(PROMPT, 12, temperature=0, strategy="plain")["tokens"] == plain["tokens"]


def test_bad_requests_leave_the_engine_usable(tiny_dmtd, model_path):
    with engine_for(tiny_dmtd("llama", "E0")) as e:
        with pytest.raises(RequestError, match="longer than the 4 the model was trained with"):
            e.generate(PROMPT, 4, temperature=0, strategy="dmtd:5")
        with pytest.raises(RequestError, match="budget after ':' is a row count"):
            e.generate(PROMPT, 4, strategy="dmtd:x")
        assert len(e.generate(PROMPT, 4, temperature=0)["tokens"]) == 4
    with Engine(str(model_path), n_ctx=256, n_threads=1) as e:
        with pytest.raises(RequestError, match="is not a DMTD model"):
            e.generate(PROMPT, 4, strategy="dmtd")
        assert len(e.generate(PROMPT, 4, temperature=0)["tokens"]) == 4


# -- the converter ------------------------------------------------------------------------------
def run_cli(*args):
    from click.testing import CliRunner

    from edge_mtp.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory, model_path):
    """hf_checkpoint(flavour, **kw) -> a tiny Hugging Face DMTD folder (tools/tiny_dmtd.py)."""
    pytest.importorskip("tokenizers")
    tiny = load_tool("tiny_dmtd")

    def make(flavour, **kw):
        out = tmp_path_factory.mktemp(f"hf-{flavour}")
        return tiny.write_tiny_dmtd(out, model_path, flavour, **kw)

    return make


@pytest.mark.parametrize("flavour", ["llama", "qwen3"])
def test_converted_checkpoint_decodes_like_the_reference_on_its_weights(flavour, hf_checkpoint,
                                                                         tmp_path, reference):
    """HF folder -> `edge-mtp convert` -> runtime: 64 greedy tokens equal the numpy reference run
    on the Hugging Face weights themselves (rotate-half RoPE), for tau = 1..4: this checks the
    converter's tensor mapping (llama's q/k permutation included) and the dmtd.* keys too."""
    pytest.importorskip("torch")
    hf = hf_checkpoint(flavour, split=(0, 2, 2), cycle=4, seed=1)
    out = tmp_path / f"{flavour}.gguf"
    r = run_cli("convert", hf, "-o", out, "--outtype", "f32")
    assert r.exit_code == 0, r.output
    assert read_dmtd(out) == DmtdConfig(0, 2, 2, 4)
    model = Model(out)
    session = Session(model, n_ctx=256, n_threads=1, flash_attn=False, f32_cache=True)
    prompt = model.tokenize(PROMPT)
    for tau in (1, 2, 3, 4):
        gen = Generation(session, Dmtd(tau), Sampler(SamplingParams(temperature=0)), prompt, 64)
        gen.run()
        want, margins = reference.dmtd_generate(hf, prompt, 64, tau)
        assert min(margins) > 1e-4, f"{flavour} tau {tau}: a near-tie makes this run no test"
        assert gen.tokens == want, f"{flavour} tau {tau}"
    session.close()
    model.close()


def test_convert_options_inspect_and_refusals(hf_checkpoint, tmp_path):
    hf = hf_checkpoint("qwen3", split=(1, 2, 1), cycle=4)
    if importlib.util.find_spec("torch"):
        out = tmp_path / "q8.gguf"
        r = run_cli("convert", hf, "-o", out, "--outtype", "q8_0", "--dmtd-cycle", "2")
        assert r.exit_code == 0, r.output
        r = run_cli("inspect", out)
        assert r.exit_code == 0 and "MOSTLY_Q8_0" in r.output and "E1T2D1C2" in r.output, r.output
        assert "chat template  yes" in r.output
        q4 = tmp_path / "q4.gguf"  # lower bits: the f16 conversion, then llama.cpp's quantizer
        r = run_cli("convert", hf, "-o", q4, "--outtype", "q4_1", "--dmtd-cycle", "2")
        assert r.exit_code == 0, r.output
        r = run_cli("inspect", q4)
        assert "MOSTLY_Q4_1" in r.output and "E1T2D1C2" in r.output, r.output
        q = tmp_path / "requantized.gguf"  # `edge-mtp quantize` keeps the dmtd.* keys
        r = run_cli("quantize", out, q, "q4_0")
        assert r.exit_code == 0, r.output
        r = run_cli("inspect", q)
        assert "MOSTLY_Q4_0" in r.output and "E1T2D1C2" in r.output, r.output
        r = run_cli("quantize", tmp_path / "nothing.gguf", q, "q4_0")
        assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    config = json.loads((hf / "config.json").read_text())
    for change, message in [
        ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel' is not supported"),
        ({"num_decoding_layers": 3}, "do not add up to the model's 4 layers"),
        ({"mtp_horizon": 0}, "dmtd.cycle must be >= 1"),
    ]:
        (hf / "config.json").write_text(json.dumps({**config, **change}))
        r = run_cli("convert", hf, "-o", tmp_path / "x.gguf")
        assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, r.output
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "tokenizer.json").unlink()
    r = run_cli("convert", hf, "-o", tmp_path / "x.gguf")
    assert r.exit_code == 2 and "no tokenizer" in r.output
    assert not (tmp_path / "x.gguf").exists()


# -- the fine-tuning recipe -----------------------------------------------------------------------
def test_finetune_forward_matches_the_decoding_loop_and_resumes(tiny_dmtd, tmp_path, reference):
    """The training forward (every row through every layer, gated by the cycle phase anchored at
    the prompt end) predicts what the decoding loop with cyclical refilling predicts; a few
    self-distillation steps lower the loss; a run stopped and resumed from its checkpoint takes
    the very steps of an uninterrupted one."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)  # a tiny model: more threads only wait on each other
    tune = load_tool("dmtd_finetune")
    split = DmtdConfig(0, 2, 2, 4)
    base = tiny_dmtd("llama", "E0")
    prompt = [504, 3058, 282, 253, 1029, 28, 436]
    want, margins = reference.dmtd_generate(base, prompt, 24, 3, split)
    assert min(margins) > 1e-3
    model = tune.Model(reference.Weights(base))
    seq = torch.tensor([prompt + want])
    with torch.no_grad():
        logits = model.dmtd_logits(seq, split, tune.cycle_gate(seq.shape[1], len(prompt), 3)[None])
    assert logits[0, len(prompt) - 1:-1].argmax(-1).tolist() == want

    lines = [{"tokens": prompt + want, "prompt_len": len(prompt)},
             {"tokens": prompt[::-1] + want[::-1], "prompt_len": len(prompt)}] * 4

    def run(out, steps):
        return tune.train(base, lines, out, split, rank=4, cycles=(3,), lr=3e-2, bsz=2, steps=steps,
                          eval_lines=2, eval_every=5, bf16=False, log=lambda _: None)

    def logged(out):
        return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

    trained = run(tmp_path / "whole", 12)
    whole = logged(tmp_path / "whole")
    assert sum(r["loss"] for r in whole[-3:]) < 0.7 * sum(r["loss"] for r in whole[:3]), whole
    run(tmp_path / "resumed", 5)
    run(tmp_path / "resumed", 12)
    resumed = logged(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in whole], abs=1e-4)


def test_a_trained_adapter_runs_as_it_trained(tiny_dmtd, tmp_path):
    """The adapter the training tool exports, applied by llama.cpp over the base, agrees with the
    base model where the training forward with the same weights agrees, cycle position by cycle
    position (tools/dmtd_quality.py's teacher forcing through the runtime vs the trainer's
    evaluation): the adapter, the gate and both tools' cycle bookkeeping line up."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    tune, quality = load_tool("dmtd_finetune"), load_tool("dmtd_quality")
    split = DmtdConfig(0, 2, 2, 4)
    base = load_tool("tiny_model").write_tiny_model(tmp_path / "base.gguf", tiny_dmtd("llama", "E0"),
                                                    "llama", n_layer=4, seed=3,
                                                    qtype=gguf.GGMLQuantizationType.F32)
    prompt = [504, 3058, 282, 253, 1029, 28, 436]
    with Engine(str(base), n_ctx=256, n_threads=1, strategy="plain") as e:
        answer = e.create_completion(prompt, max_tokens=20, temperature=0)["tokens"]
    line = {"tokens": prompt + answer, "prompt_len": len(prompt)}
    model = tune.train(base, [line] * 4, tmp_path / "run", split, rank=4, cycles=(2, 3), lr=3e-2,
                       bsz=2, steps=10, eval_lines=0, bf16=False, log=lambda _: None)
    adapter = tune.export(model, split, tmp_path / "dmtd.lora.gguf", 4, "llama")
    runtime = Model(base, lora=adapter)
    session = Session(runtime, n_ctx=256, n_threads=1, flash_attn=False, f32_cache=True)
    for tau in (2, 3):
        hits, counts = quality.teacher_forced(session, prompt, answer, tau)
        assert list(hits / counts) == pytest.approx(tune.evaluate(model, [line], split, tau, 1)), tau
    session.close()
    runtime.close()
