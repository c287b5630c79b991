"""llamaworks: the open Llama system in Python on PyTorch."""

from llamaworks.config import ModelConfig, get_preset, list_presets

__version__ = "0.1.0"
__all__ = ["LLM", "ModelConfig", "SamplingParams", "get_preset", "list_presets", "__version__"]


def __getattr__(name: str):  # LLM and SamplingParams load torch: import them on first use
    if name in ("LLM", "SamplingParams"):
        from llamaworks import infer

        return getattr(infer, name)
    raise AttributeError(f"module 'llamaworks' has no attribute {name!r}")
