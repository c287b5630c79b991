"""Tokenizer behaviour against real references: llama.cpp's own expected ids (the .inp/.out files
shipped with its vocab GGUFs), transformers' AutoTokenizer on the files `save` writes, and
sentencepiece on a model trained here."""

from __future__ import annotations

import io
import json
import random

import pytest

from llamaworks.checkpoint.gguf import read_metadata
from llamaworks.errors import TokenizerError
from llamaworks.tokenizer import StreamDecoder, Tokenizer

TEXTS = [
    "Hello world",
    " Hello world",
    "The quick brown fox — it's 12345678 o'clock!\n\tdef f(x):\n        return x  # ok\n",
    "عام ٢٠٢٢ كان عاماً جيداً",
    "שלום עולם",
    "我想在apple工作1314151天～ 日本語 한국어",
    "🦙🚀 😶‍🌫️ 👨‍👩‍👧‍👦 ✅",
    "   leading spaces and trailing   ",
    "\n\n\t\t  \r\n",
    "Äpfel café naïve",
]


@pytest.fixture(scope="module")
def spm_md(vocab_dir):
    return read_metadata(vocab_dir / "ggml-vocab-llama-spm.gguf")


@pytest.fixture(scope="module")
def gpt2_md(vocab_dir):
    return read_metadata(vocab_dir / "ggml-vocab-gpt-2.gguf")


@pytest.fixture(scope="module")
def spm(spm_md):
    return Tokenizer.from_gguf(spm_md)


@pytest.fixture(scope="module")
def gpt2(gpt2_md):
    return Tokenizer.from_gguf(gpt2_md)


@pytest.fixture(scope="module")
def smollm(smollm_gguf):
    return Tokenizer.from_gguf(smollm_gguf)


def _llamacpp_cases(vocab_dir, name):
    """llama.cpp's test-tokenizer-0 data: inputs split on the separator line, expected ids."""
    raw = (vocab_dir / f"{name}.inp").read_text(encoding="utf-8")
    sep = "\n__ggml_vocab_test__\n"
    inputs = raw[:-len(sep)].split(sep) if raw.endswith(sep) else raw.split(sep)
    outputs = (vocab_dir / f"{name}.out").read_text(encoding="utf-8").splitlines()
    assert len(inputs) == len(outputs)
    return [(s, [int(t) for t in o.split()]) for s, o in zip(inputs, outputs, strict=True)]


# ----------------------------------------------------------------------------- BOS / EOS


def test_spm_vocab_ids_and_bos_eos_follow_flags(spm, vocab_dir):
    expected = dict(_llamacpp_cases(vocab_dir, "ggml-vocab-llama-spm.gguf"))
    assert (spm.bos_id, spm.eos_id, spm.add_bos, spm.add_eos) == (1, 2, True, False)
    assert spm.encode("Hello world") == expected["Hello world"] == [15043, 3186]
    assert spm.encode("Hello world", bos=None) == [1, 15043, 3186]  # the model's add_bos
    assert spm.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert spm.encode("Hello world", eos=None) == [15043, 3186]  # add_eos is False
    assert spm.encode("", bos=None) == [1]


def test_smollm2_does_not_add_bos_by_default(smollm):
    assert (smollm.bos_id, smollm.eos_id, smollm.add_bos) == (1, 2, False)
    ids = smollm.encode("Hello", bos=None, eos=None)
    assert ids and ids[0] != 1 and ids[-1] != 2
    assert smollm.encode("Hello", bos=True, eos=True) == [1, *ids, 2]


def test_stop_ids_hold_eos_and_end_of_turn_tokens(smollm, spm, gpt2):
    assert {0, 2} <= set(smollm.stop_ids)  # <|endoftext|>, <|im_end|> (= eos)
    assert smollm.token_to_id("<|im_end|>") in smollm.stop_ids
    assert spm.stop_ids == [2]
    assert gpt2.stop_ids == [50256]


def test_special_true_parses_control_tokens_special_false_spells_them(smollm):
    text = "<|im_start|>user\nHi<|im_end|>"
    parsed = smollm.encode(text, special=True)
    plain = smollm.encode(text, special=False)
    assert parsed[0] == 1 and parsed[-1] == 2
    assert 1 not in plain and 2 not in plain and len(plain) > len(parsed)
    assert smollm.decode(plain) == smollm.decode(parsed) == text
    assert smollm.decode(parsed, skip_special_tokens=True) == "user\nHi"


def test_llamacpp_expected_ids_for_gpt2_vocab(gpt2, vocab_dir):
    for text, ids in _llamacpp_cases(vocab_dir, "ggml-vocab-gpt-2.gguf"):
        assert gpt2.encode(text, special=False) == ids, text


# ----------------------------------------------------------------------------- save / load


@pytest.mark.slow
@pytest.mark.parametrize("name", ["spm", "gpt2", "smollm"])
def test_save_loads_in_transformers_with_identical_ids(name, request, tmp_path):
    from transformers import AutoTokenizer

    tok = request.getfixturevalue(name)
    out = tok.save(tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["add_bos_token"] is tok.add_bos and cfg["add_eos_token"] is tok.add_eos
    assert cfg["bos_token"] == tok.id_to_token(tok.bos_id)
    hf = AutoTokenizer.from_pretrained(out)
    for text in TEXTS + ["<s>x</s>", "<|endoftext|>y", "<|im_start|>z<|im_end|>"]:
        assert hf(text)["input_ids"] == tok.encode(text, bos=None, eos=None), text
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf.decode(ids) == tok.decode(ids)
    again = Tokenizer.from_dir(out)
    assert (again.bos_id, again.eos_id, again.add_bos, again.add_eos, again.chat_template) == (
        tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos, tok.chat_template)
    assert all(again.encode(t, bos=None) == tok.encode(t, bos=None) for t in TEXTS)


@pytest.mark.slow
def test_load_dispatches_on_what_the_path_is(spm, tiny_spm_model, vocab_dir, tmp_path):
    spm.save(tmp_path / "saved")
    text = "Hello world"
    assert Tokenizer.load(tmp_path / "saved").encode(text) == spm.encode(text)
    assert Tokenizer.load(tmp_path / "saved" / "tokenizer.json").encode(text) == spm.encode(text)
    assert Tokenizer.load(vocab_dir / "ggml-vocab-llama-spm.gguf").encode(text) == [15043, 3186]
    assert Tokenizer.load(tiny_spm_model).vocab_size == 400
    (tmp_path / "x.bin").write_bytes(b"nope")
    with pytest.raises(TokenizerError, match="not a tokenizer file"):
        Tokenizer.load(tmp_path / "x.bin")


def test_save_replaces_files_atomically_without_leftovers(spm, tmp_path):
    (tmp_path / "tokenizer.json").write_text("old")
    spm.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json",
                                                          "tokenizer_config.json"]


def test_from_file_reads_special_tokens_map_and_chat_template_jinja(spm, tmp_path):
    (tmp_path / "tokenizer.json").write_text(spm.backend.to_str())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>"}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}")
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": False, "eos_token": "<unk>", "chat_template": "T"}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.add_bos, tok.eos_id, tok.chat_template) == (False, 0, "T")


# ----------------------------------------------------------------------------- SentencePiece

SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!  Twice.",
    "def tokenize(text):\n    return [ord(c) for c in text]\n",
    "Les élèves étudient la physique quantique à l'université.",
    "Привет, как дела? Всё хорошо.",
    "東京は日本の首都です。",
    "In 2024, about 8,100,000,000 people lived on Earth.",
] * 40


@pytest.fixture(scope="module")
def tiny_spm_model(tmp_path_factory):
    import sentencepiece as sentencepiece_lib

    buf = io.BytesIO()
    sentencepiece_lib.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS), model_writer=buf, model_type="bpe", vocab_size=400,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, character_coverage=0.98, num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


def test_from_sentencepiece_matches_sentencepiece_processor(tiny_spm_model):
    import sentencepiece as sentencepiece_lib

    sp = sentencepiece_lib.SentencePieceProcessor(model_file=str(tiny_spm_model))
    tok = Tokenizer.from_sentencepiece(tiny_spm_model)
    assert tok.vocab_size == sp.get_piece_size()
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.add_bos) == (sp.bos_id(), sp.eos_id(),
                                                                 sp.unk_id(), True)
    byte_fallback_used = False
    for text in TEXTS + SPM_CORPUS[:7] + ["zebra quartz ☃ Ω", "  two  spaces  ", "x" * 50]:
        ids = tok.encode(text, special=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids) == text
        byte_fallback_used |= any(sp.is_byte(i) for i in ids)
    assert byte_fallback_used
    assert Tokenizer.from_dir(tiny_spm_model.parent).encode("Pack my box") == sp.encode(
        "Pack my box")


def test_from_sentencepiece_rejects_unigram_models_with_a_fix(tmp_path):
    import sentencepiece as sentencepiece_lib

    buf = io.BytesIO()
    sentencepiece_lib.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS), model_writer=buf, model_type="unigram",
        vocab_size=100, num_threads=1, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    with pytest.raises(TokenizerError, match="unigram.*tokenizer.json"):
        Tokenizer.from_sentencepiece(tmp_path / "tokenizer.model")


# ----------------------------------------------------------------------------- streaming


def _stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    dec = StreamDecoder(tok, skip_special_tokens=skip)
    return [dec.put(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("name", ["spm", "spm_from_tokenizer_json", "gpt2", "smollm"])
def test_stream_decoder_deltas_concatenate_to_decode(name, request, tmp_path):
    if name == "spm_from_tokenizer_json":
        name, tok = "spm", Tokenizer.from_dir(request.getfixturevalue("spm").save(tmp_path))
    else:
        tok = request.getfixturevalue(name)
    rng = random.Random(0)
    sequences = [tok.encode(t, bos=True, eos=True) for t in TEXTS]
    sequences += [[rng.randrange(tok.vocab_size) for _ in range(30)] for _ in range(100)]
    low = list(range(3, 259)) if name == "spm" else list(range(256))  # byte tokens
    sequences += [[rng.choice(low + [1, 2, 13]) for _ in range(25)] for _ in range(150)]
    for ids in sequences:
        for skip in (False, True):
            assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip), ids


def test_stream_decoder_holds_back_incomplete_characters(gpt2, spm, tmp_path):
    ids = gpt2.encode("🦙!")  # byte-level pieces of the emoji, then "!"
    deltas = _stream(gpt2, ids)
    assert deltas[0] == "" and "".join(deltas) == "🦙!"
    assert "🦙" in "".join(deltas[:-1])
    ids = spm.encode("a🦙b")  # ▁a, four <0xXX> byte tokens, b
    assert [spm.id_to_token(i) for i in ids[1:5]] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert _stream(spm, ids) == ["a", "", "", "", "🦙", "b", ""]
    dec = spm.stream_decoder()
    assert dec.put(ids[0]) == "a" and dec.put(ids[1]) == "" and dec.flush() == "\ufffd"
    # From tokenizer.json, HF's ByteFallback decoder: the byte run is final only when it ends.
    hf_spm = Tokenizer.from_file(spm.save(tmp_path) / "tokenizer.json")
    assert hf_spm.uses_backend_decoder and not spm.uses_backend_decoder
    assert _stream(hf_spm, ids) == ["a", "", "", "", "", "🦙b", ""]


# ----------------------------------------------------------------------------- errors


def test_unknown_tokenizer_model_is_named_in_the_error(gpt2_md):
    md = dict(gpt2_md, **{"tokenizer.ggml.model": "t5"})
    with pytest.raises(TokenizerError, match=r"unknown tokenizer model 't5'.*tokenizer\.json"):
        Tokenizer.from_gguf(md)


def test_unknown_pre_tokenizer_type_is_named_in_the_error(gpt2_md):
    md = dict(gpt2_md, **{"tokenizer.ggml.pre": "brand-new-pre"})
    with pytest.raises(TokenizerError, match="unknown BPE pre-tokenizer type 'brand-new-pre'"):
        Tokenizer.from_gguf(md)


def test_gguf_without_tokenizer_says_what_to_pass(gpt2_md):
    md = {k: v for k, v in gpt2_md.items() if not k.startswith("tokenizer.")}
    with pytest.raises(TokenizerError, match="no tokenizer"):
        Tokenizer.from_gguf(md)


def test_missing_chat_template_raises_with_a_hint(gpt2):
    assert gpt2.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template.*chat_template"):
        gpt2.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_files_and_bad_ids_raise_tokenizer_error(gpt2, tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="no such GGUF|cannot read"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        gpt2.decode([gpt2.vocab_size])


@pytest.mark.slow
def test_skipping_specials_keeps_tool_call_markers(smollm, tmp_path):
    """A vocabulary where [TOOL_CALLS] is a special token (as Mistral's): decoding with
    skip_special_tokens (what generation returns) keeps it, so the tool-call parser sees the
    call, while other specials (<|im_end|>) are still dropped, whole and streamed."""
    smollm.save(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    new_id = smollm.vocab_size
    spec["added_tokens"].append({"id": new_id, "content": "[TOOL_CALLS]", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False,
                                 "special": True})
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.kept_specials == {new_id}
    call = '[{"name": "calc", "arguments": {"x": 1}}]'
    ids = [new_id, *tok.encode(call), tok.token_to_id("<|im_end|>")]
    want = "[TOOL_CALLS]" + call
    assert tok.decode(ids, skip_special_tokens=True) == want
    stream = StreamDecoder(tok, skip_special_tokens=True)
    assert stream.feed(ids) + stream.flush() == want
    assert smollm.kept_specials == frozenset()  # SmolLM2 spells <tool_call> as plain text
