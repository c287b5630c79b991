"""Meta's Llama 3 `tokenizer.model` (tiktoken format) loads as a Tokenizer that gives llama.cpp's
ids, and Meta's own tokenizer's (tiktoken with Meta's regex and special tokens).

No Meta file is available offline, so the test makes a real-shaped one from llama.cpp's
ggml-vocab-llama-bpe.gguf: its first 128000 tokens are Llama 3's in rank order, their bytes the
GPT-2 byte-decoded token strings; the 256 tokens after them are Meta's special tokens (Llama 3.0's
names). References: llama.cpp tokenizing with that GGUF, tiktoken (`tiktoken.Encoding` as Meta's
llama3 tokenizer.py builds it, and as meta-llama/llama-models' Llama 3.1 one does with 3.1's
special tokens: <|eom_id|>, <|python_tag|>, ...), and transformers' TikTokenConverter for the
merges derived from the ranks."""

from __future__ import annotations

import base64
import json
import random

import pytest
from test_tokenizer_llamacpp import MULTILINGUAL, SPECIAL_STRINGS, _llamacpp_cases

from llamaworks.checkpoint import load_tokenizer
from llamaworks.checkpoint.gguf import read_metadata
from llamaworks.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

N_RANKS = 128000
# Meta's llama3 tokenizer.py (tiktoken's Llama 3 / cl100k regex).
META_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# The MULTILINGUAL texts made to show where llama.cpp's Unicode tables (which we follow) and
# case-insensitive contractions differ from regex engines such as tiktoken's: letters of Unicode
# 16 and "'ſ".
UNICODE_EDGE = [t for t in MULTILINGUAL if "\U00016137" in t]
GGUF = "ggml-vocab-llama-bpe.gguf"


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted (as transformers has it)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


@pytest.fixture(scope="module")
def gguf_md(vocab_dir):
    return read_metadata(vocab_dir / GGUF)


@pytest.fixture(scope="module")
def meta_dir(gguf_md, tmp_path_factory):
    """A Meta Llama 3.0 directory: params.json (Meta-Llama-3-8B's: no use_scaled_rope) and the
    tiktoken tokenizer.model."""
    tokens, types = gguf_md["tokenizer.ggml.tokens"], gguf_md["tokenizer.ggml.token_type"]
    assert len(tokens) == N_RANKS + 256 and set(types[:N_RANKS]) == {1}
    dec = _gpt2_byte_decoder()
    lines = [f"{base64.b64encode(bytes(dec[c] for c in tok)).decode()} {rank}"
             for rank, tok in enumerate(tokens[:N_RANKS])]
    d = tmp_path_factory.mktemp("llama3")
    (d / "tokenizer.model").write_text("\n".join(lines) + "\n")
    (d / "params.json").write_text(json.dumps({
        "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
        "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05,
        "rope_theta": 500000.0}))
    return d


@pytest.fixture(scope="module")
def ours(meta_dir):
    return load_tokenizer(meta_dir)  # a Meta dir: params.json + tokenizer.model


@pytest.fixture(scope="module")
def ref(vocab_dir, llama_cpp):
    return llama_cpp.Llama(model_path=str(vocab_dir / GGUF), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def meta_tiktoken(meta_dir, gguf_md):
    """Meta's tokenizer as its tokenizer.py builds it: tiktoken.Encoding over the file's ranks,
    the special tokens after them."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(meta_dir / "tokenizer.model"))
    specials = gguf_md["tokenizer.ggml.tokens"][N_RANKS:]
    return tiktoken.Encoding(name="llama3", pat_str=META_PAT, mergeable_ranks=ranks,
                             special_tokens={t: N_RANKS + i for i, t in enumerate(specials)})


def test_llamacpp_inp_out_cases_give_the_expected_ids(ours, vocab_dir):
    for text, expected in _llamacpp_cases(vocab_dir, GGUF):
        assert ours.encode(text, special=False) == expected, text


@pytest.mark.parametrize("special", [True, False], ids=["special", "plain"])
def test_multilingual_ids_match_llamacpp(ours, ref, special):
    for text in MULTILINGUAL + SPECIAL_STRINGS:
        assert ours.encode(text, special=special) == ref.tokenize(
            text.encode(), add_bos=False, special=special), text


def test_random_text_ids_match_llamacpp(ours, ref):
    rng = random.Random(4321)
    pieces = list("aZ09 \t\n\r'.,!?-_()<>|/\\\"") + [
        "'s", "'RE", "  ", "    ", "\n\n", "١٢٣", "۳", "שָׁ", "中文", "🦙", "👨‍👩‍👧", "e\u0301", "ß",
        "\u00a0", "\u2003", "\u200b", "1234567", "<|eot_id|>", "<|begin_of_text|>",
        "<|start_header_id|>", "<|reserved_special_token_7|>", " " * 17]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 20)))
        for special in (True, False):
            assert ours.encode(text, special=special) == ref.tokenize(
                text.encode(), add_bos=False, special=special), text


@pytest.mark.parametrize("special", [True, False], ids=["special", "plain"])
def test_ids_match_metas_tiktoken_tokenizer(ours, meta_tiktoken, vocab_dir, special):
    cases = [t for t, _ in _llamacpp_cases(vocab_dir, GGUF)]
    for text in cases + [t for t in MULTILINGUAL if t not in UNICODE_EDGE] + SPECIAL_STRINGS:
        want = (meta_tiktoken.encode(text, allowed_special="all") if special
                else meta_tiktoken.encode(text, disallowed_special=()))
        assert ours.encode(text, special=special) == want, text
        assert ours.decode(want) == meta_tiktoken.decode(want) == text


def test_special_tokens_get_metas_ids(ours, gguf_md, ref, llama_cpp):
    names = gguf_md["tokenizer.ggml.tokens"][N_RANKS:]
    assert ours.vocab_size == llama_cpp.llama_vocab_n_tokens(ref._model.vocab) == N_RANKS + 256
    assert [ours.token_to_id(t) for t in names] == list(range(N_RANKS, N_RANKS + 256))
    for name, i in (("<|begin_of_text|>", 128000), ("<|end_of_text|>", 128001),
                    ("<|reserved_special_token_0|>", 128002), ("<|start_header_id|>", 128006),
                    ("<|end_header_id|>", 128007), ("<|eot_id|>", 128009),
                    ("<|reserved_special_token_250|>", 128255)):
        assert ours.token_to_id(name) == i == ref.tokenize(name.encode(), add_bos=False,
                                                           special=True)[0]
    vocab = ref._model.vocab
    assert (ours.bos_id, ours.eos_id) == (llama_cpp.llama_vocab_bos(vocab),
                                          llama_cpp.llama_vocab_eos(vocab))
    assert ours.add_bos == llama_cpp.llama_vocab_get_add_bos(vocab)
    assert ours.stop_ids == [i for i in range(ours.vocab_size)
                             if llama_cpp.llama_vocab_is_eog(vocab, i)]
    text = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    assert ours.encode(text, bos=None) == ref.tokenize(text.encode(), add_bos=True, special=True)
    assert ours.decode(ours.encode(text, bos=None)) == "<|begin_of_text|>" + text
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == "user\n\nHi"


def test_merges_are_transformers_tiktoken_converters(ours, meta_dir):
    from transformers.convert_slow_tokenizer import TikTokenConverter  # reads it with tiktoken

    vocab, merges = TikTokenConverter().extract_vocab_merges_from_model(
        str(meta_dir / "tokenizer.model"))
    model = json.loads(ours.backend.to_str())["model"]
    assert model["vocab"] == vocab
    assert [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))
            for m in model["merges"]] == merges
    assert model["ignore_merges"] is True


def test_load_and_from_dir_pick_tiktoken_for_tokenizer_model(meta_dir, ref):
    text = "Hello world 1234567 <|eot_id|>"
    for tok in (Tokenizer.load(meta_dir / "tokenizer.model"), Tokenizer.from_dir(meta_dir),
                Tokenizer.from_model_file(meta_dir / "tokenizer.model")):
        assert tok.encode(text, bos=None) == ref.tokenize(text.encode(), add_bos=True,
                                                          special=True)


# -- Llama 3.1+ names ---------------------------------------------------------------------------
# meta-llama/llama-models, models/llama3_1/api/tokenizer.py (Llama 3.1; the same list for the 3.2
# and 3.3 text models), as its Tokenizer.__init__ builds them.
META31_NAMED = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
META31_SPECIALS = META31_NAMED + [f"<|reserved_special_token_{2 + i}|>"
                                  for i in range(256 - len(META31_NAMED))]
LLAMA31_PARAMS = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32,
                  "n_kv_heads": 8, "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0,
                  "use_scaled_rope": True, "vocab_size": 128256}


@pytest.fixture(scope="module")
def meta31_dir(meta_dir, tmp_path_factory):
    """A Meta Llama 3.1 directory: the same ranks, Llama-3.1-8B's params.json."""
    d = tmp_path_factory.mktemp("llama31")
    (d / "tokenizer.model").symlink_to(meta_dir / "tokenizer.model")
    (d / "params.json").write_text(json.dumps(LLAMA31_PARAMS))
    return d


@pytest.fixture(scope="module")
def ours31(meta31_dir):
    return load_tokenizer(meta31_dir)


@pytest.fixture(scope="module")
def meta31_tiktoken(meta_dir):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(meta_dir / "tokenizer.model"))
    return tiktoken.Encoding(name="llama3.1", pat_str=META_PAT, mergeable_ranks=ranks,
                             special_tokens={t: N_RANKS + i for i, t in
                                             enumerate(META31_SPECIALS)})


def test_llama31_special_tokens_get_metas_3_1_names_and_ids(ours31, meta31_tiktoken):
    assert ours31.vocab_size == N_RANKS + 256
    assert {t: ours31.token_to_id(t) for t in META31_SPECIALS} == \
        meta31_tiktoken._special_tokens
    for name, i in (("<|finetune_right_pad_id|>", 128004), ("<|step_id|>", 128005),
                    ("<|eom_id|>", 128008), ("<|eot_id|>", 128009), ("<|python_tag|>", 128010),
                    ("<|reserved_special_token_2|>", 128011),
                    ("<|reserved_special_token_246|>", 128255)):
        assert ours31.token_to_id(name) == i
    # Meta's stop tokens (eom_id, eot_id) and end_of_text
    assert ours31.stop_ids == [128001, 128008, 128009]
    assert (ours31.bos_id, ours31.eos_id) == (128000, 128001)


@pytest.mark.parametrize("name,i", [("<|eom_id|>", 128008), ("<|python_tag|>", 128010)])
def test_eom_and_python_tag_encode_and_decode_as_one_special_token(ours31, meta31_tiktoken,
                                                                   name, i):
    assert ours31.encode(name) == [i] == meta31_tiktoken.encode(name, allowed_special="all")
    assert ours31.decode([i]) == name == meta31_tiktoken.decode([i])
    plain = ours31.encode(name, special=False)
    assert len(plain) > 1 and plain == meta31_tiktoken.encode(name, disallowed_special=())
    assert i in ours31.special_ids


def test_ids_with_llama31_tokens_match_metas_tiktoken(ours31, meta31_tiktoken):
    texts = SPECIAL_STRINGS + [
        '<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>{"name": "f", '
        '"parameters": {}}<|eom_id|>', "x<|finetune_right_pad_id|><|step_id|>y",
        "<|reserved_special_token_2|> <|reserved_special_token_246|>"]
    for text in texts:
        for special in (True, False):
            want = (meta31_tiktoken.encode(text, allowed_special="all") if special
                    else meta31_tiktoken.encode(text, disallowed_special=()))
            assert ours31.encode(text, special=special) == want, text
            assert ours31.decode(want) == text


def test_a_python_tag_call_reaches_the_chat_parser(ours31):
    """A Llama 3.1 tool call as the model generates it (`<|python_tag|>` + JSON + `<|eom_id|>`):
    decoding keeps the tag (a tool-call marker) and drops the stop token, and the llama3 parser
    sees the call, whole and streamed."""
    from llamaworks.chat.formats import detect_format
    from llamaworks.chat.parse import PYTHON_TAG, ToolCallStreamer, parse_tool_calls

    assert detect_format(ours31) == "llama3"
    reply = f'{PYTHON_TAG}{{"name": "get_weather", "parameters": {{"city": "Paris"}}}}<|eom_id|>'
    ids = ours31.encode(reply)
    assert ids[0] == 128010 and ids[-1] == 128008 and ids.count(128010) == 1
    text = ours31.decode(ids[:-1], skip_special_tokens=True)  # generation stops at eom_id
    assert text.startswith(PYTHON_TAG)
    res = parse_tool_calls(text, "llama3")
    assert [(c.name, c.arguments) for c in res.calls] == [("get_weather", {"city": "Paris"})]
    assert (res.content, res.errors) == ("", [])
    streamer, dec = ToolCallStreamer("llama3"), ours31.stream_decoder(skip_special_tokens=True)
    shown = "".join(streamer.feed(dec.put(i)) for i in ids[:-1]) + streamer.feed(dec.flush())
    assert shown == "" and streamer.text == text
    assert [(c.name, c.arguments) for c in streamer.finish().calls] == \
        [(c.name, c.arguments) for c in res.calls]


def test_which_names_a_tokenizer_model_gets(meta_dir, meta31_dir, tmp_path, ours, ours31):
    from llamaworks.errors import TokenizerError
    from llamaworks.tokenizer.tiktoken_bpe import llama3_version

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.model").symlink_to(meta_dir / "tokenizer.model")
    assert llama3_version(meta_dir / "tokenizer.model") == "3"  # Llama 3.0's params.json
    assert llama3_version(meta31_dir / "tokenizer.model") == "3.1"
    assert llama3_version(bare / "tokenizer.model") == "3.1"  # nothing says: 3.1+'s names
    assert ours.token_to_id("<|eom_id|>") is None and ours.token_to_id("<|python_tag|>") is None
    assert ours.token_to_id("<|reserved_special_token_3|>") == 128005
    assert ours31.token_to_id("<|reserved_special_token_3|>") == 128012
    forced = Tokenizer.from_tiktoken(meta_dir / "tokenizer.model", version="3.1")
    assert forced.token_to_id("<|eom_id|>") == 128008
    text = "Hello world 1234567 ١٢٣ 🦙"
    assert forced.encode(text) == ours.encode(text) == ours31.encode(text)  # the same ranks
    with pytest.raises(TokenizerError, match="unknown Llama 3 special-token version"):
        Tokenizer.from_tiktoken(meta_dir / "tokenizer.model", version="3.9")
    (bare / "params.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="params.json: not valid JSON"):
        llama3_version(bare / "tokenizer.model")
