"""edge-mtp: several tokens per forward pass for local LLMs, on top of llama.cpp.

    from edge_mtp import Engine
    engine = Engine("smollm2-135m")
    print(engine.generate("The capital of France is", max_tokens=16, temperature=0)["text"])

Importing this package loads neither the model nor llama.cpp (that happens in Engine()).
"""
from .errors import BackendError, EdgeMTPError, ModelError, RequestError

__version__ = "0.1.0"


def __getattr__(name):
    if name == "Engine":  # lazy: keeps `import edge_mtp` cheap and free of numpy/llama.cpp
        from .engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["Engine", "EdgeMTPError", "ModelError", "RequestError", "BackendError", "__version__"]
