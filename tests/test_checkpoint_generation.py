"""The sampling settings a checkpoint ships: generation_config.json and GGUF general.sampling.*."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from llamaworks.checkpoint.generation import sampling_defaults
from llamaworks.errors import CheckpointError


def _hf_dir(tmp_path: Path, generation: dict | None) -> Path:
    (tmp_path / "config.json").write_text("{}")
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_generation_config_sampling_values_are_read_by_their_transformers_names(tmp_path):
    d = _hf_dir(tmp_path, {"bos_token_id": 1, "do_sample": True, "temperature": 0.6,
                           "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05})
    assert sampling_defaults(d) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                    "repetition_penalty": 1.05}


def test_generation_config_with_do_sample_false_means_greedy(tmp_path):
    d = _hf_dir(tmp_path, {"do_sample": False, "temperature": 0.6, "repetition_penalty": 1.2})
    assert sampling_defaults(d) == {"temperature": 0.0, "repetition_penalty": 1.2}


def test_a_directory_without_generation_config_ships_no_sampling_values(tmp_path):
    assert sampling_defaults(_hf_dir(tmp_path, None)) == {}
    assert sampling_defaults(_hf_dir(tmp_path, {"bos_token_id": 1, "eos_token_id": 2})) == {}


def test_a_non_numeric_sampling_value_is_a_checkpoint_error_naming_the_key(tmp_path):
    d = _hf_dir(tmp_path, {"temperature": "hot"})
    with pytest.raises(CheckpointError, match="temperature"):
        sampling_defaults(d)


def test_gguf_general_sampling_keys_are_read_as_llama_cpp_writes_them(tmp_path):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_float32(gguf.Keys.General.SAMPLING_TEMP, 0.5)
    w.add_int32(gguf.Keys.General.SAMPLING_TOP_K, 30)
    w.add_float32(gguf.Keys.General.SAMPLING_PENALTY_REPEAT, 1.25)
    w.add_int32(gguf.Keys.General.SAMPLING_PENALTY_LAST_N, 32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = sampling_defaults(path)
    assert got == {"temperature": 0.5, "top_k": 30, "repetition_penalty": 1.25,
                   "penalty_last_n": 32}


@pytest.mark.slow
def test_the_default_smollm2_gguf_ships_no_sampling_values(smollm_gguf):
    assert sampling_defaults(smollm_gguf) == {}
