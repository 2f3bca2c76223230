"""tools/probe_ablations.py: its replay mode measures exactly the steps of a full run."""
import pytest

from conftest import load_tool

TEXT = "Write a Python function that reverses a string, then explain it."


@pytest.mark.parametrize("spec,options", [("probe:10", {}), ("hybrid:6", {})])
def test_replay_counts_the_same_steps_as_a_full_run(engine, spec, options):
    tool = load_tool("probe_ablations")
    messages = [{"role": "user", "content": TEXT}]
    full = engine.chat(messages, max_tokens=40, temperature=0, strategy=spec, strategy_options=options)
    prompt = engine.model.chat_tokens(messages)
    truth = tool.greedy_text(engine.session, prompt, 40 + 16)
    tokens, steps = tool.replay_run(engine, prompt, truth, spec, options, 40)
    assert tokens == full["tokens"] and steps == full["speculation"]["steps"]


def test_replay_refuses_a_text_the_model_would_not_produce(engine):
    tool = load_tool("probe_ablations")
    prompt = engine.model.chat_tokens([{"role": "user", "content": TEXT}])
    truth = tool.greedy_text(engine.session, prompt, 24)
    truth[len(prompt) + 3] = (truth[len(prompt) + 3] + 1) % engine.model.n_vocab  # not the argmax
    with pytest.raises(RuntimeError, match="greedy text"):
        tool.replay_run(engine, prompt, truth, "probe:4", {}, 16)


def test_variant_specs_parse():
    tool = load_tool("probe_ablations")
    assert tool.parse_variant("probe:30,masks=2,tree=dynamic,lam=0.5") == (
        "probe:30", {"masks": 2, "tree": "dynamic", "lam": 0.5})
    assert tool.parse_variant("lookup:4") == ("lookup:4", {})
