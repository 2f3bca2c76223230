"""DMTD metadata in GGUF files: the dmtd.* keys, read, validated and written in one place.

A DMTD model is an ordinary llama/qwen2/qwen3 GGUF whose layers split into encoding (first E),
thinking (middle T) and decoding (last D) groups, trained with cycle length C (docs/dmtd.md).
llama.cpp ignores these keys; edge-mtp reads them with its header scan (gguf_file.py), which keeps
each key's type.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelError

DMTD_VERSION = 1
KEY_VERSION = "dmtd.version"
LAYER_KEYS = ("dmtd.encoding_layers", "dmtd.thinking_layers", "dmtd.decoding_layers")
KEY_CYCLE = "dmtd.cycle"
DMTD_KEYS = (KEY_VERSION, *LAYER_KEYS, KEY_CYCLE)


@dataclass(frozen=True)
class DmtdConfig:
    encoding_layers: int
    thinking_layers: int
    decoding_layers: int
    cycle: int  # the trained cycle length (tokens per full pass); run time may use 1..cycle

    @property
    def n_layer(self) -> int:
        return self.encoding_layers + self.thinking_layers + self.decoding_layers

    @property
    def late_start(self) -> int:
        """First decoding layer: where the gate h_enc + m * h_think is applied."""
        return self.encoding_layers + self.thinking_layers

    @property
    def label(self) -> str:
        """The paper's naming plus the cycle, e.g. E0T28D8C4."""
        return (f"E{self.encoding_layers}T{self.thinking_layers}D{self.decoding_layers}"
                f"C{self.cycle}")

    def kv(self) -> dict[str, int]:
        """The dmtd.* keys for this split (all GGUF uint32)."""
        return {KEY_VERSION: DMTD_VERSION, "dmtd.encoding_layers": self.encoding_layers,
                "dmtd.thinking_layers": self.thinking_layers,
                "dmtd.decoding_layers": self.decoding_layers, KEY_CYCLE: self.cycle}


def validate_dmtd(values: dict, n_layer: int, source: str = "model") -> DmtdConfig | None:
    """DmtdConfig from a file's dmtd.* keys ({key: python value}), None when it has none.

    Raises ModelError (one line, naming `source`) for incomplete, unknown, mistyped or
    inconsistent keys, so a broken file is refused before any decoding.
    """
    keys = {k: v for k, v in values.items() if k.startswith("dmtd.")}
    if not keys:
        return None
    unknown = sorted(set(keys) - set(DMTD_KEYS))
    if unknown:
        raise ModelError(f"{source}: unknown DMTD metadata key {unknown[0]} "
                         f"(known: {', '.join(DMTD_KEYS)})")
    missing = [k for k in DMTD_KEYS if k not in keys]
    if missing:
        raise ModelError(f"{source}: incomplete DMTD metadata, {missing[0]} is missing")
    for k, v in keys.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise ModelError(f"{source}: DMTD key {k} must be an integer, got {type(v).__name__} {v!r}")
    if keys[KEY_VERSION] != DMTD_VERSION:
        raise ModelError(f"{source}: DMTD metadata version {keys[KEY_VERSION]} is not supported "
                         f"(this edge-mtp reads version {DMTD_VERSION})")
    e, t, d = (keys[k] for k in LAYER_KEYS)
    if e < 0 or t < 1 or d < 1:
        raise ModelError(f"{source}: DMTD layer counts need encoding >= 0, thinking >= 1 and "
                         f"decoding >= 1, got E{e} T{t} D{d}")
    if e + t + d != n_layer:
        raise ModelError(f"{source}: DMTD layer counts E{e} + T{t} + D{d} = {e + t + d} do not add "
                         f"up to the model's {n_layer} layers")
    if keys[KEY_CYCLE] < 1:
        raise ModelError(f"{source}: dmtd.cycle must be >= 1, got {keys[KEY_CYCLE]}")
    return DmtdConfig(e, t, d, keys[KEY_CYCLE])


def dmtd_from_hf_config(config: dict, cycle: int | None = None,
                        source: str = "config.json") -> DmtdConfig | None:
    """The DMTD split of a Hugging Face config (the authors' field names: num_encoding_layers,
    num_thinking_layers, num_decoding_layers, mtp_horizon); `cycle` overrides mtp_horizon.
    None for a config without DMTD fields."""
    fields = ("num_encoding_layers", "num_thinking_layers", "num_decoding_layers")
    if not any(f in config for f in fields):
        if cycle is not None:
            raise ModelError(f"{source} has no DMTD fields ({', '.join(fields)}); "
                             "a cycle length alone does not make a DMTD model")
        return None
    horizon = cycle if cycle is not None else config.get("mtp_horizon")
    values = {KEY_VERSION: DMTD_VERSION, KEY_CYCLE: horizon}
    values.update({k: config.get(f) for k, f in zip(LAYER_KEYS, fields)})
    missing = [f for f, k in zip((*fields, "mtp_horizon"), (*LAYER_KEYS, KEY_CYCLE)) if values[k] is None]
    if missing:
        raise ModelError(f"{source}: DMTD field {missing[0]} is missing")
    return validate_dmtd(values, config.get("num_hidden_layers", -1), source)
