"""Meta's Llama 3 `tokenizer.model` (tiktoken format) loads as a Tokenizer that gives llama.cpp's
ids, and Meta's own tokenizer's (tiktoken with Meta's regex and special tokens).

No Meta file is available offline, so the test makes a real-shaped one from llama.cpp's
ggml-vocab-llama-bpe.gguf: its first 128000 tokens are Llama 3's in rank order, their bytes the
GPT-2 byte-decoded token strings; the 256 tokens after them are Meta's special tokens. References:
llama.cpp tokenizing with that GGUF, tiktoken (`tiktoken.Encoding` as Meta's llama3 tokenizer.py
builds it), and transformers' TikTokenConverter for the merges derived from the ranks."""

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
    """A Meta Llama 3 directory: params.json and the tiktoken tokenizer.model."""
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
