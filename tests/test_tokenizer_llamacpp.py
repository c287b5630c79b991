"""Our GGUF tokenizers give llama.cpp's ids (llama-cpp-python, vocab_only=True) on the real SmolLM2
GGUF and llama.cpp's own vocab GGUFs (Llama SPM, Llama 3 BPE, GPT-2, Qwen2), for a multilingual set,
special-token strings with special=True/False, llama.cpp's own .inp/.out cases, and seeded random
text; decode(encode(t)) == t; decode agrees with llama.cpp's detokenize."""

from __future__ import annotations

import ctypes
import io
import random

import pytest

from llamaworks.checkpoint.gguf import read_metadata
from llamaworks.tokenizer import Tokenizer
from llamaworks.tokenizer.spm import read_sentencepiece

pytestmark = pytest.mark.slow

VOCAB_FILES = {  # name -> file in .cache/vocab (None = the SmolLM2 model GGUF)
    "smollm2": None,
    "llama-spm": "ggml-vocab-llama-spm.gguf",
    "llama-bpe": "ggml-vocab-llama-bpe.gguf",
    "gpt-2": "ggml-vocab-gpt-2.gguf",
    "qwen2": "ggml-vocab-qwen2.gguf",  # Qwen2 / Qwen2.5 / Qwen3
    "gpt-2-no-pre": "gpt-2 vocab written without tokenizer.ggml.pre (llama.cpp's 'default')",
    "spm-user-defined": "a SentencePiece BPE trained here, with user-defined and control pieces",
}
SPM_NAMES = ("llama-spm", "spm-user-defined")

MULTILINGUAL = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see—won't we?",
    "I'm HERE'S they'RE we'VE 'll 'd 's",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n"
    "    return fib(n - 1) + fib(n - 2)\n",
    "for i in range(10):\n\tprint(f\"{i:>4}\")  # tabs & spaces\n",
    "class A:\n\tdef __init__(self):\n\t\tself.x = {'a': [1, 2.5, -3e-4]}\n",
    "عام ٢٠٢٢ كان عاماً جيداً",
    "مرحبا بالعالم! الرقم ١٢٣٤٥٦٧٨٩٠ و ۱۲۳",
    "שלום עולם, מה שלומך? 2024",
    "我想在apple工作1314151天～",
    "日本語のテキストです。東京都、2023年。",
    "한국어 텍스트 123",
    "Привет, мир! Ёжик",
    "Ελληνικά κείμενα",
    "हिन्दी पाठ १२३",
    "🦙🚀 emoji 😶‍🌫️ family 👨‍👩‍👧‍👦 flags 🇺🇸🇩🇪 ✅",
    "12345678", "1", "12", "123", "1234567890123", "3.14159 2,718 1e-9 0x1F",
    "a  b   c    d", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n \n ",
    "\t\t\tx\n\n\n\ty", "      lots of leading spaces", "trailing spaces     ",
    " leading space", "                                         forty-one spaces",
    "\u00a0non-breaking\u2003em space\u3000ideographic\u200bzero-width",
    "Cửa Việt Äpfel naïve café ﬁ ligature e\u0301",
    "!!!!!! ??? ... ,,, ;;; ::: --- ___ *** ### @@@ $+<=>^~|",
    "https://example.com/path?q=1&r=2#frag email@example.org",
    "x" * 60 + " " + "ab" * 30,
    # Letters/digits Oniguruma knows but llama.cpp's Unicode tables do not (Unicode 16), and a
    # long s after an apostrophe (Oniguruma's (?i) would fold it to 's').
    "\U00016137 \U00011bc8躜 \U0001360f*S \U00016d70 it'\u017f",
    "\U0001ebe56\x0c                 \U00016137               \U000264ef ye",
]

SPECIAL_STRINGS = [
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<s>Hello</s> <unk> [INST] hi [/INST]",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<|endoftext|> after", "text<|endoftext|>text", "<|endoftext|><|endoftext|>",
    "<jupyter_code>x = 1<jupyter_output>", " <|im_end|> spaced <|im_end|>",
    "a<tool>b [[x]]<ctl> <tool>  [[x]]y", "[PAD400][PAD401]",
]

_loaded: dict[str, tuple[Tokenizer, object]] = {}


def _write_vocab_gguf(md: dict, path) -> None:
    """A vocab-only GGUF with the given metadata (plain types as llama.cpp expects them)."""
    import gguf

    t = gguf.GGUFValueType
    w = gguf.GGUFWriter(str(path), arch=md["general.architecture"])
    for key, v in md.items():
        if key == "general.architecture":
            continue
        if isinstance(v, bool):
            w.add_key_value(key, v, t.BOOL)
        elif isinstance(v, str):
            w.add_key_value(key, v, t.STRING)
        elif isinstance(v, float):
            w.add_key_value(key, v, t.FLOAT32)
        elif isinstance(v, int):
            w.add_key_value(key, v, t.UINT32)
        elif isinstance(v, list) and v:
            sub = t.STRING if isinstance(v[0], str) else (
                t.FLOAT32 if isinstance(v[0], float) else t.INT32)
            w.add_key_value(key, v, t.ARRAY, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _trained_spm_gguf(vocab_dir, folder):
    """Train a small SentencePiece BPE (byte fallback, user-defined <tool> and [[x]], control
    <ctl>) and write it as a GGUF vocabulary padded with "unused" tokens; returns (gguf path,
    tokenizer.model path)."""
    import sentencepiece

    corpus = ["The quick brown fox jumps over the lazy dog. <tool> call [[x]] now.",
              "def tokenize(text):\n    return [ord(c) for c in text]\n",
              "Les élèves étudient à l'université. Привет, как дела? 東京は日本の首都です。",
              "In 2024, about 8,100,000,000 people lived on Earth."] * 50
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, model_type="bpe", vocab_size=400,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, character_coverage=0.98, num_threads=1, minloglevel=2,
        user_defined_symbols=["<tool>", "[[x]]"], control_symbols=["<ctl>"])
    model = folder / "tokenizer.model"
    model.write_bytes(buf.getvalue())
    info = read_sentencepiece(model)
    md = {k: v for k, v in read_metadata(vocab_dir / "ggml-vocab-llama-spm.gguf").items()
          if not k.startswith("tokenizer.")}
    pad = [f"[PAD{i}]" for i in range(len(info["pieces"]), len(info["pieces"]) + 4)]
    md.update({"llama.vocab_size": len(info["pieces"]) + len(pad), "tokenizer.ggml.model": "llama",
               "tokenizer.ggml.tokens": info["pieces"] + pad,  # padded like gguf_export pads
               "tokenizer.ggml.scores": info["scores"] + [0.0] * len(pad),
               "tokenizer.ggml.token_type": info["types"] + [5] * len(pad),
               "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
               "tokenizer.ggml.unknown_token_id": 0})
    assert {4, 3} <= set(info["types"])  # user-defined and control pieces are there
    path = folder / "spm-user-defined.gguf"
    _write_vocab_gguf(md, path)
    return path, model


@pytest.fixture(scope="module")
def pair(smollm_gguf, vocab_dir, llama_cpp, tmp_path_factory):
    """(our Tokenizer, llama_cpp.Llama(vocab_only=True)) for a vocab name, loaded once."""

    def get(name: str):
        if name not in _loaded:
            if name == "smollm2":
                path = smollm_gguf
            elif name == "gpt-2-no-pre":
                md = read_metadata(vocab_dir / "ggml-vocab-gpt-2.gguf")
                del md["tokenizer.ggml.pre"]
                path = tmp_path_factory.mktemp("vocab") / "gpt-2-no-pre.gguf"
                _write_vocab_gguf(md, path)
            elif name == "spm-user-defined":
                path, model = _trained_spm_gguf(vocab_dir, tmp_path_factory.mktemp("spm"))
                from_model = Tokenizer.from_sentencepiece(model)
            else:
                path = vocab_dir / VOCAB_FILES[name]
            ours = Tokenizer.from_gguf(path)
            if name == "spm-user-defined":  # the .model and its GGUF tokenize the same
                assert ours.vocab_size == from_model.vocab_size + 4
                for text in MULTILINGUAL + SPECIAL_STRINGS:
                    assert ours.encode(text) == from_model.encode(text), text
            ref = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
            _loaded[name] = (ours, ref)
        return _loaded[name]

    yield get
    _loaded.clear()


def _pieces(llama_cpp, ref, ids: list[int], special: bool) -> str:
    """llama-cpp-python's detokenize (token_to_piece concatenated), with a buffer big enough for
    long pieces (its own 32-byte buffer truncates e.g. a 40-space Llama-3 token to nothing)."""
    buf = ctypes.create_string_buffer(1024)
    out = b""
    for i in ids:
        n = llama_cpp.llama_token_to_piece(ref._model.vocab, i, buf, len(buf), 0, special)
        assert 0 <= n <= len(buf)
        out += buf.raw[:n]
    return out.decode("utf-8", errors="replace")


def _llamacpp_cases(vocab_dir, name):
    raw = (vocab_dir / f"{name}.inp").read_text(encoding="utf-8")
    sep = "\n__ggml_vocab_test__\n"
    inputs = raw[:-len(sep)].split(sep) if raw.endswith(sep) else raw.split(sep)
    outputs = (vocab_dir / f"{name}.out").read_text(encoding="utf-8").splitlines()
    assert len(inputs) == len(outputs) > 40
    return [(s, [int(t) for t in o.split()]) for s, o in zip(inputs, outputs, strict=True)]


ALL = list(VOCAB_FILES)


@pytest.mark.parametrize("name", ["llama-spm", "llama-bpe", "gpt-2", "qwen2"])
def test_llamacpp_inp_out_cases_give_the_expected_ids(pair, vocab_dir, name):
    ours, ref = pair(name)
    for text, expected in _llamacpp_cases(vocab_dir, VOCAB_FILES[name]):
        assert ref.tokenize(text.encode(), add_bos=False, special=False) == expected, text
        assert ours.encode(text, special=False) == expected, text


@pytest.mark.parametrize("name", ["smollm2", "gpt-2-no-pre"])
def test_llamacpp_inp_cases_match_llamacpp_on_other_vocabs(pair, vocab_dir, name):
    ours, ref = pair(name)
    for text, _ in _llamacpp_cases(vocab_dir, "ggml-vocab-llama-bpe.gguf"):
        assert ours.encode(text, special=False) == ref.tokenize(text.encode(), add_bos=False,
                                                                special=False), text


@pytest.mark.parametrize("special", [True, False], ids=["special", "plain"])
@pytest.mark.parametrize("name", ALL)
def test_multilingual_ids_match_llamacpp(pair, name, special):
    ours, ref = pair(name)
    for text in MULTILINGUAL + SPECIAL_STRINGS:
        assert ours.encode(text, special=special) == ref.tokenize(
            text.encode(), add_bos=False, special=special), text


@pytest.mark.parametrize("name", ALL)
def test_bos_flag_and_special_ids_match_llamacpp(pair, llama_cpp, name):
    ours, ref = pair(name)
    vocab = ref._model.vocab
    assert ours.vocab_size == llama_cpp.llama_vocab_n_tokens(vocab)
    assert ours.bos_id == llama_cpp.llama_vocab_bos(vocab)
    assert ours.eos_id == llama_cpp.llama_vocab_eos(vocab)
    assert ours.add_bos == llama_cpp.llama_vocab_get_add_bos(vocab)
    assert ours.add_eos == llama_cpp.llama_vocab_get_add_eos(vocab)
    eog = [i for i in range(ours.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    assert ours.stop_ids == eog
    text = "Hello world"
    assert ours.encode(text, bos=None, eos=None) == ref.tokenize(text.encode(), add_bos=True,
                                                                 special=False)


@pytest.mark.parametrize("name", ALL)
def test_random_text_ids_match_llamacpp(pair, name):
    ours, ref = pair(name)
    rng = random.Random(1234)
    pieces = list("aZ09 \t\n\r'.,!?-_()<>|/\\\"") + [
        "'s", "'RE", "  ", "    ", "\n\n", "١٢", "۳", "שָׁ", "中文", "🦙", "👨‍👩‍👧", "e\u0301", "ß",
        "\u00a0", "\u2003", "\u200b", "\u0085", "\x00", "\ufffd", "\ue000", "\U00016137", "12345",
        "<s>", "</s>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", " " * 17]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 20)))
        for special in (True, False):
            assert ours.encode(text, special=special) == ref.tokenize(
                text.encode(), add_bos=False, special=special), text


@pytest.mark.parametrize("name", ALL)
def test_decode_of_encode_is_the_exact_text(pair, name):
    ours, _ = pair(name)
    for text in MULTILINGUAL + SPECIAL_STRINGS:
        # SentencePiece vocabularies put a space before text that follows a special or
        # user-defined token (llama.cpp's add_space_prefix per fragment), so those texts do not
        # round-trip there; llama.cpp decodes them the same way (see the detokenize test).
        if name in SPM_NAMES and ("<tool>" in text or "[[x]]" in text):
            continue
        assert ours.decode(ours.encode(text, special=False)) == text
        if name not in SPM_NAMES or text in MULTILINGUAL:
            assert ours.decode(ours.encode(text, special=True)) == text


@pytest.mark.parametrize("name", ALL)
def test_decode_matches_llamacpp_detokenize(pair, llama_cpp, name):
    ours, ref = pair(name)
    rng = random.Random(7)
    random_ids = [[rng.randrange(ours.vocab_size) for _ in range(12)] for _ in range(200)]
    for text in MULTILINGUAL + SPECIAL_STRINGS + random_ids:
        for special in (True, False):
            ids = text if isinstance(text, list) else ours.encode(text, special=special)
            if name in SPM_NAMES:
                # llama-cpp-python drops the SentencePiece prefix space after a leading BOS.
                ids = [ours.bos_id, *ids]
                want = _pieces(llama_cpp, ref, ids, special=True)
                assert ours.decode(ids) == want
                want = _pieces(llama_cpp, ref, ids, special=False)
                assert ours.decode(ids, skip_special_tokens=True) == want.removeprefix(" ")
                assert ref.detokenize(ids).decode("utf-8", "replace") == want.removeprefix(" ")
            else:
                assert ours.decode(ids) == _pieces(llama_cpp, ref, ids, special=True)
                assert ours.decode(ids, skip_special_tokens=True) == _pieces(
                    llama_cpp, ref, ids, special=False)
