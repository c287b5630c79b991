"""`llamaworks tokenizer train`: byte-level BPE that transformers' AutoTokenizer loads."""

from __future__ import annotations

import pytest

from llamaworks.cli import main
from llamaworks.data.corpus import bundled_documents
from llamaworks.tokenizer import Tokenizer
from llamaworks.tokenizer.train import SPECIAL_TOKENS, train_bpe

SAMPLES = ["In the beginning God created 12345 heavens.", "naïve café ☃ 🦙 — 東京 \t\n x",
           "<|im_start|>user\nhi<|im_end|>", "  leading  spaces", "\x00\x7f bytes"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    src = out / "texts"
    src.mkdir()
    for i, d in zip(range(200), bundled_documents("kjv"), strict=False):
        (src / f"{i}.txt").write_text(d["text"])
    assert main(["tokenizer", "train", "--input", str(src), "--input", "bundled:jargon",
                 "--vocab-size", "600", "--out", str(out / "tok")]) == 0
    return out / "tok"


@pytest.mark.slow
def test_cli_writes_a_tokenizer_that_autotokenizer_loads_with_identical_ids(trained):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_dir(trained)
    hf = AutoTokenizer.from_pretrained(trained)
    assert ours.vocab_size == len(hf) == 600
    for s in SAMPLES:
        assert hf(s).input_ids == ours.encode(s, bos=None)
        assert hf.decode(hf(s).input_ids[1:]) == s  # after the BOS


def test_every_text_round_trips_because_the_alphabet_is_bytes(trained):
    tok = Tokenizer.from_dir(trained)
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s


def test_digits_are_split_one_per_token(trained):
    tok = Tokenizer.from_dir(trained)
    ids = tok.encode("2024")
    assert [tok.decode([i]) for i in ids] == ["2", "0", "2", "4"]


def test_special_and_chat_tokens_are_single_ids_and_bos_is_added(trained):
    tok = Tokenizer.from_dir(trained)
    assert [tok.id_to_token(i) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.encode("hi", bos=None)[0] == 1
    ids = tok.encode("<|im_start|>user", bos=False)
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert tok.token_to_id("<|im_end|>") in tok.stop_ids


def test_too_small_a_vocabulary_is_an_error_naming_the_minimum():
    with pytest.raises(ValueError, match="need 262"):
        train_bpe(["abc"], 100)
