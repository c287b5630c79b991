"""One exception family, so the CLI can print a clear message instead of a traceback."""


class LlamaworksError(Exception):
    """Base class: the message names the problem and, where possible, the fix."""


class CheckpointError(LlamaworksError):
    """A weights file or directory cannot be read: truncated, corrupt, or an unsupported kind."""


class TokenizerError(LlamaworksError):
    """A tokenizer cannot be built from what the model directory or GGUF provides."""


class ModelNotFoundError(LlamaworksError):
    """No model at the given path, or the default model package is not installed."""
