"""Shared fixtures: the real SmolLM2 GGUF, llama.cpp's vocab GGUFs, and the llama.cpp reference.

`make test` installs every reference, so a missing one is a setup error (fail), never a skip.
"""

from __future__ import annotations

import ctypes
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


@pytest.fixture(scope="session")
def smollm2_q4_k_m(smollm_gguf, llama_cpp, tmp_path_factory) -> Path:
    """SmolLM2 re-quantized by llama.cpp's own quantizer to its Q4_K_M recipe (as the files people
    download are made): K-quant tensors, with Q5_0 where rows are not multiples of 256."""
    path = tmp_path_factory.mktemp("q4km") / "smollm2-Q4_K_M.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.allow_requantize = True  # the source file is Q4_1
    assert llama_cpp.llama_model_quantize(str(smollm_gguf).encode(), str(path).encode(),
                                          ctypes.byref(params)) == 0
    return path
