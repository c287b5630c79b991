"""llamaworks: the open Llama system in Python on PyTorch."""

from llamaworks.config import ModelConfig, get_preset, list_presets

__version__ = "0.1.0"
__all__ = ["ModelConfig", "get_preset", "list_presets", "__version__"]
