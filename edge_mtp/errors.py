"""The exceptions edge-mtp raises: one base type, so an app can catch everything we refuse."""


class EdgeMTPError(Exception):
    """Base of every error edge-mtp raises on purpose (bad input, missing model, failed build)."""


class ModelError(EdgeMTPError):
    """A model name, manifest or file cannot be used (unknown, missing, corrupt, wrong checksum)."""


class RequestError(EdgeMTPError, ValueError):
    """A generation request is invalid (bad parameters, prompt longer than the context)."""


class BackendError(EdgeMTPError):
    """The patched llama.cpp backend is missing or failed (not built, decode error)."""
