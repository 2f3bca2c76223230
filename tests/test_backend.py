"""The backend on the real default model: exactness against stock llama-cpp-python and patch P1."""
import gguf
import numpy as np
import pytest

from edge_mtp.backend import Model, Session
from edge_mtp.errors import RequestError

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]


@pytest.fixture(scope="module")
def stock(model_path):
    from llama_cpp import Llama

    return Llama(str(model_path), n_ctx=2048, n_threads=2, n_threads_batch=2, flash_attn=True,
                 verbose=False)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_stock_llama_cpp_python(engine, stock, prompt):
    ids = stock.tokenize(prompt.encode(), special=True)
    assert ids == engine.tokenize(prompt, special=True)
    stock.reset()
    expected = []
    for tok in stock.generate(ids, temp=0.0, reset=True):
        if engine.model.is_eog(tok):  # same vocabulary
            break
        expected.append(tok)
        if len(expected) == 64:
            break
    got = engine.generate(prompt, max_tokens=64, temperature=0.0)["tokens"]
    assert got == expected
    assert len(got) >= 32  # the prompts are chosen to run long; a short run would prove little


@pytest.fixture(scope="module")
def embd_matrix(model_path):
    reader = gguf.GGUFReader(str(model_path))
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return t


def test_tok_embd_rows_are_the_exact_dequantized_rows(engine, embd_matrix):
    ids = np.array([0, 1, 2, 17, 1234, engine.model.n_vocab - 1], dtype=np.int32)
    rows = engine.model.tok_embd_rows(ids)
    assert rows.shape == (len(ids), engine.model.n_embd) and rows.dtype == np.float32
    ref = gguf.quants.dequantize(np.asarray(embd_matrix.data)[ids], embd_matrix.tensor_type)
    np.testing.assert_array_equal(rows, ref.reshape(rows.shape))


def test_tok_embd_rows_rejects_out_of_range_ids(engine):
    with pytest.raises(RequestError, match="out of range"):
        engine.model.tok_embd_rows([engine.model.n_vocab])
    with pytest.raises(RequestError, match="out of range"):
        engine.model.tok_embd_rows([-1])


def test_out_of_range_token_ids_are_refused_not_fatal(engine):
    """llama.cpp's token_to_piece aborts the process on an id outside the vocabulary."""
    model = engine.model
    for bad in (model.n_vocab, -1):
        with pytest.raises(RequestError, match="out of range"):
            model.detokenize([1, bad])
    assert model.detokenize([model.n_vocab - 1]) == model.piece(model.n_vocab - 1).decode("utf-8", "replace")


def test_prefix_reuse_matches_a_fresh_session(model_path):
    """A second prompt sharing a prefix re-uses cached KV cells and still gives identical logits."""
    model = Model(model_path)
    a, b = Session(model, n_ctx=512, n_threads=2), Session(model, n_ctx=512, n_threads=2)
    first = model.tokenize("Once upon a time there was a dragon")
    second = model.tokenize("Once upon a time there was a princess who")
    a.prefill(first)
    reused = a.prefill(second).copy()
    fresh = b.prefill(second)
    np.testing.assert_array_equal(reused, fresh)
    assert a.tokens == second


def test_decode_past_the_context_is_refused_and_cache_stays_intact(model_path):
    model = Model(model_path)
    s = Session(model, n_ctx=64, n_threads=2)
    fill = s.n_ctx - 4  # llama.cpp may round n_ctx up
    s.prefill(list(range(100, 100 + fill)))
    with pytest.raises(RequestError, match="context full"):
        s.decode(list(range(10)))
    assert s.n_past == fill
    s.decode([5])  # still usable
    assert s.n_past == fill + 1
