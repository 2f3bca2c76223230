"""The only code that talks to llama.cpp: models, sessions (contexts) and our native additions."""
from .model import Model
from .session import Session, default_threads

__all__ = ["Model", "Session", "default_threads"]
