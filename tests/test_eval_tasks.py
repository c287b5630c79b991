"""Task semantics on tiny models: lm-eval's request encoding and metrics (its own code as the
reference), few-shot prompts, answer extraction, task-file errors and the `eval` verb."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from infer_fixtures import ByteTokenizer, tiny_model

from llamaworks.cli import main
from llamaworks.eval.generative import extract_answer, normalize
from llamaworks.eval.mc import encode_pair, evaluate_mc
from llamaworks.eval.tasks import (
    GenItem,
    MCItem,
    TaskError,
    gen_prompts,
    load_task_file,
    mc_contexts,
)

DATA = Path(__file__).parent / "data" / "eval"


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_encode_pair_is_lm_evals_encode_pair(smollm_tokenizer):
    """Trailing context whitespace moves to the continuation; the continuation is what the
    whole string encodes to after the context's tokens (lm-eval's `TemplateLM._encode_pair`
    run over our tokenizer is the reference)."""
    from llamaworks.eval.harness import LlamaworksLM

    lm = LlamaworksLM.from_model(tiny_model(), smollm_tokenizer)
    cases = [("The capital of France is", " Paris."), ("Answer: ", "yes"),
             ("She said  \n", "hello"), ("x\t", "\ty"), ("Numbers: 12", "345"),
             ("emoji 😀", "😀 ok"), ("", " start")]
    for ctx, cont in cases:
        want = lm._encode_pair(ctx, cont) if ctx else None
        got = encode_pair(smollm_tokenizer, ctx, cont)
        if want is not None:
            assert got == want, (ctx, cont)
        assert got[1], "a continuation always has tokens"
    assert encode_pair(smollm_tokenizer, "", " start")[0] == [smollm_tokenizer.bos_id]


@pytest.mark.slow
def test_mc_metrics_equal_lm_eval_with_our_adapter(one_thread, tmp_path):
    """`evaluate_mc` and lm-eval's multiple-choice metrics over the adapter agree item by item
    (same model, so this pins the metric definitions: acc, acc_norm by characters)."""
    import os

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import lm_eval
    from lm_eval.tasks import TaskManager

    from llamaworks.eval.harness import LlamaworksLM, task_yaml

    model, tok = tiny_model(seed=1), ByteTokenizer()
    items = load_task_file(DATA / "mc_small.jsonl").items[:12]
    f = tmp_path / "mc.jsonl"
    f.write_text("".join(json.dumps({"context": i.context, "choices": i.choices,
                                     "gold": i.gold}) + "\n" for i in items))
    (tmp_path / "t.yaml").write_text(task_yaml("tiny_mc", f, "mc"))
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)
    res = lm_eval.simple_evaluate(model=LlamaworksLM.from_model(model, tok), tasks=["tiny_mc"],
                                  task_manager=tasks, log_samples=True)
    ours = evaluate_mc(model, tok, items, batch_size=4)
    ref = res["samples"]["tiny_mc"]
    assert [s["acc"] for s in ref] == [float(p == i.gold)
                                      for p, i in zip(ours.predictions, items, strict=True)]
    assert ours.metrics["acc"] == res["results"]["tiny_mc"]["acc,none"]
    assert ours.metrics["acc_norm"] == res["results"]["tiny_mc"]["acc_norm,none"]


def test_mc_batched_equals_unbatched(one_thread):
    model, tok = tiny_model(seed=2), ByteTokenizer()
    items = load_task_file(DATA / "mc_small.jsonl").items[:10]
    a = evaluate_mc(model, tok, items, batch_size=1)
    b = evaluate_mc(model, tok, items, batch_size=7)
    assert a.predictions == b.predictions and a.metrics == b.metrics
    for x, y in zip(a.loglikelihoods, b.loglikelihoods, strict=True):
        assert x == pytest.approx(y, abs=1e-4)


def test_fewshot_prompts_are_seeded_and_never_include_the_item_itself():
    items = [MCItem(f"Q{i}:", [" a", " b"], i % 2) for i in range(6)]
    ctx = mc_contexts(items, k=2, seed=7)
    assert ctx == mc_contexts(items, k=2, seed=7) != mc_contexts(items, k=2, seed=8)
    for i, c in enumerate(ctx):
        shots = c.split("\n\n")
        assert len(shots) == 3 and shots[-1] == f"Q{i}:"
        assert all(s.startswith("Q") and f"Q{i}:" not in s for s in shots[:2])
        assert all(s.endswith((" a", " b")) for s in shots[:2])
    gen = [GenItem(f"Question: {i}?\nAnswer:", str(i), target=f" so {i}\n#### {i}")
           for i in range(4)]
    p = gen_prompts(gen, k=1, seed=0)[0]
    assert p.endswith("\n\nQuestion: 0?\nAnswer:") and "#### " in p
    with pytest.raises(TaskError, match="num-fewshot"):
        mc_contexts(items, k=6)


@pytest.mark.parametrize("text,want", [
    ("She pays 3 * 4 = 12 dollars.\n#### 12", "12"),
    ("#### 1,234", "1234"),
    ("The answer is $1,000.00.", "1000"),
    ("First 5 then 7, so 12.0", "12"),
    ("It is -3.50 degrees", "-3.5"),
    ("no number here", None),
])
def test_answer_extraction(text, want):
    assert extract_answer(text) == want


def test_number_normalisation():
    assert normalize("1,234") == normalize("1234.0") == normalize(" 1234. ") == "1234"
    assert normalize("Paris.") == "paris"


def test_task_file_errors_name_the_line_and_the_fix(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": [" b"], "gold": 3}\n')
    with pytest.raises(TaskError, match=r"bad.jsonl:1: \"gold\" must be an index"):
        load_task_file(bad)
    bad.write_text('{"context": "a"\n')
    with pytest.raises(TaskError, match="not valid JSON"):
        load_task_file(bad)
    bad.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(TaskError, match="eval convert"):
        load_task_file(bad)
    with pytest.raises(TaskError, match="cannot read"):
        load_task_file(tmp_path / "missing.jsonl")


def test_eval_verb_reports_errors_with_exit_status_2(tmp_path, capsys):
    assert main(["eval", "--task-file", str(tmp_path / "none.jsonl")]) == 2
    assert "cannot read task file" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "--task" in capsys.readouterr().err
    assert main(["eval", "--task", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_lm_eval_sub_verb_passes_every_argument_through():
    from llamaworks.cli import build_parser

    argv = ["--model", "llamaworks", "--model_args", "pretrained=m.gguf", "--tasks", "t", "-h"]
    args = build_parser().parse_args(["eval", "lm-eval", *argv])
    assert args.rest == argv


@pytest.mark.slow
def test_adapter_option_scores_the_lora_model(one_thread, smollm_gguf, smollm, smollm_tokenizer,
                                              tmp_path):
    """--adapter merges a saved LoRA: the scores are those of the unmerged LoRA model, and
    differ from the base model's."""
    from llamaworks.checkpoint import load_model
    from llamaworks.eval.runner import load_for_eval
    from llamaworks.posttrain.lora import LoraConfig, apply_lora, lora_modules, save_adapter

    tok = smollm_tokenizer
    lora = apply_lora(load_model(smollm_gguf).model, LoraConfig(r=2, dropout=0.0,
                                                                target_modules=["q_proj",
                                                                                "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in lora_modules(lora):
            for p in m.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(lora, LoraConfig(r=2, dropout=0.0, target_modules=["q_proj", "v_proj"]),
                 tmp_path / "adapter")
    items = load_task_file(DATA / "mc_small.jsonl").items[:6]
    merged, _ = load_for_eval(smollm_gguf, adapter=tmp_path / "adapter")
    got = evaluate_mc(merged, tok, items).loglikelihoods
    want = evaluate_mc(lora.eval(), tok, items).loglikelihoods
    base = evaluate_mc(smollm, tok, items).loglikelihoods
    flat = lambda xs: [v for x in xs for v in x]
    assert flat(got) == pytest.approx(flat(want), abs=1e-3)
    assert max(abs(a - b) for a, b in zip(flat(got), flat(base), strict=True)) > 1e-2


def test_quantized_model_scores_close_to_full_precision(one_thread):
    """--quant swaps the linears (the lm_head too) and scoring still runs on the result."""
    from llamaworks.infer.quantize import quantize_model

    model, tok = tiny_model(seed=4, std=0.05), ByteTokenizer()
    items = load_task_file(DATA / "mc_small.jsonl").items[:4]
    ref = evaluate_mc(model, tok, items).loglikelihoods
    got = evaluate_mc(quantize_model(model, "int8"), tok, items).loglikelihoods
    for x, y in zip(got, ref, strict=True):
        assert x == pytest.approx(y, rel=0.05, abs=0.5)


def test_limit_scores_a_prefix_of_the_same_few_shot_prompts(one_thread):
    model, tok = tiny_model(seed=5), ByteTokenizer()
    items = load_task_file(DATA / "mc_small.jsonl").items[:8]
    full = evaluate_mc(model, tok, items, num_fewshot=2, seed=3)
    part = evaluate_mc(model, tok, items, num_fewshot=2, seed=3, limit=3)
    assert part.metrics["n"] == 3 and part.predictions == full.predictions[:3]
    for x, y in zip(part.loglikelihoods, full.loglikelihoods[:3], strict=True):
        assert x == pytest.approx(y, abs=1e-4)


def test_arithmetic_task_is_the_post_training_held_out_split():
    from llamaworks.eval.tasks import load_task
    from llamaworks.posttrain.tasks import problems

    task = load_task("arithmetic", 3)
    assert task.kind == "gen" and len(task.items) == 3
    for it, p in zip(task.items, problems(3, split="test"), strict=True):
        assert it.prompt == f"Question: {p.question}\nAnswer:" and it.answer == str(p.answer)
