"""Shared fixtures: the real SmolLM2 GGUF, llama.cpp's vocab GGUFs, and the llama.cpp reference.

`make test` installs every reference, so a missing one is a setup error (fail), never a skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VOCAB_DIR = ROOT / ".cache" / "vocab"


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    from llamaworks.checkpoint.discovery import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    if not (VOCAB_DIR / "ggml-vocab-llama-spm.gguf").exists():
        pytest.fail(f"llama.cpp vocab GGUFs missing in {VOCAB_DIR}: run `make test` (it extracts "
                    "them from the llama-cpp-python source distribution)")
    return VOCAB_DIR


@pytest.fixture(scope="session")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama-cpp-python is not installed: run `make test` (it builds and caches it)")
    return llama_cpp


@pytest.fixture(scope="session")
def hf_smollm(smollm_gguf):
    """transformers' own GGUF loader on the real model: the numerics reference."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm_gguf.parent, gguf_file=smollm_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm(smollm_gguf):
    """Our model loaded from the real GGUF."""
    from llamaworks.checkpoint import load_model

    return load_model(smollm_gguf).model


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_gguf):
    from llamaworks.checkpoint import load_tokenizer

    return load_tokenizer(smollm_gguf)
