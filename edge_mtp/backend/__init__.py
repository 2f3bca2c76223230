"""The only code that talks to llama.cpp: models, sessions (contexts) and our native additions."""
from .model import WEIGHT_TYPES, Model, quantize_model
from .session import Session, default_threads

__all__ = ["WEIGHT_TYPES", "Model", "Session", "default_threads", "quantize_model"]
