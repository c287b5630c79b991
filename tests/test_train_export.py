"""A trained checkpoint opens in transformers with the same per-token NLL as `llamaworks score`,
and its tokenizer in AutoTokenizer with the same ids; bits per byte is measured in bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_fixtures import prepare_small, small_train_config

from llamaworks.cli import main
from llamaworks.config import get_preset
from llamaworks.tokenizer import Tokenizer
from llamaworks.train.loop import train
from llamaworks.train.metrics import token_byte_lengths, unigram_bpb

TEXT = "And God said, Let there be light: and there was light. A hacker is 1337."


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    data = prepare_small(d)
    s = train(get_preset("tiny"), small_train_config(max_steps=15, eval_every=15), data, d / "o")
    return d / "o", data, s


@pytest.mark.slow
def test_transformers_loads_the_checkpoint_with_our_score_nll_within_1e_4(trained, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = trained
    assert main(["score", "--model", str(out), "--text", TEXT, "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = hf_tok(TEXT, add_special_tokens=False).input_ids
    assert len(ids) == ours["tokens"]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    np.testing.assert_allclose(nll.numpy(), ours["nll"], atol=1e-4, rtol=0)


def test_generate_runs_on_the_trained_checkpoint(trained, capsys):
    out, _, _ = trained
    assert main(["generate", "--model", str(out), "-p", "And God", "-n", "8", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["ids"]) > 0


def test_token_byte_lengths_add_up_to_the_utf8_length_of_the_text(trained):
    _, data, _ = trained
    tok = Tokenizer.from_dir(data / "tokenizer")
    lens = token_byte_lengths(tok)
    for s in (TEXT, "naïve café ☃ 🦙 東京", "  \n\t x"):
        ids = tok.encode(s, bos=True, eos=True)
        assert int(lens[ids].sum()) == len(s.encode("utf-8"))


def test_unigram_bpb_is_the_smoothed_unigram_cross_entropy_in_bits_per_byte():
    train_ids = [np.array([3, 3, 3, 4], dtype=np.uint16)]
    byte_len = np.array([0, 0, 0, 2, 1])
    targets = torch.tensor([[3, 4]])
    p3, p4 = 4 / 9, 2 / 9  # counts + 1 over 5 ids
    want = -(np.log2(p3) + np.log2(p4)) / 3
    assert unigram_bpb(train_ids, targets, byte_len) == pytest.approx(want)

