"""Shared fixtures: the real default model and one greedy Engine on it (loaded once per run)."""
import importlib.util
import sys
from pathlib import Path

import pytest

from edge_mtp.models import resolve_model

DEFAULT_MODEL = "smollm2-135m"


@pytest.fixture(scope="session")
def model_path():
    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def engine(model_path):
    from edge_mtp import Engine

    with Engine(str(model_path), n_ctx=2048, n_threads=2, strategy="plain") as e:
        yield e


@pytest.fixture
def greedy():
    return {"temperature": 0.0}


def load_tool(name: str):
    """Import a script from tools/ (they are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"edge_mtp_tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, model_path):
    """tiny_model_path(arch) -> a tiny random-weight GGUF of that architecture (written once)."""
    tiny = load_tool("tiny_model")
    made = {}

    def make(arch: str = "qwen3") -> Path:
        if arch not in made:
            out = tmp_path_factory.mktemp("tiny") / f"tiny-{arch}.gguf"
            made[arch] = tiny.write_tiny_model(out, model_path, arch)
        return made[arch]

    return make
