"""Acceptance on the real SmolLM2 GGUF, against lm-evaluation-harness's own `hf` backend
(transformers): `llamaworks eval` and lm-eval with our adapter give lm-eval's numbers."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "eval"
MC, GEN, ROLL = DATA / "mc_small.jsonl", DATA / "gen_small.jsonl", DATA / "rolling_small.jsonl"
TASKS = ["lw_mc", "lw_gen", "lw_roll"]
GEN_TOKENS = 16

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these small forward passes gain little from a second thread, and on
    a shared 2-core machine spinning thread pools slow them several-fold."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory, one_thread):
    """A TaskManager over local YAMLs for our three test task files (no download)."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    from lm_eval.tasks import TaskManager

    from llamaworks.eval.harness import task_yaml

    d = tmp_path_factory.mktemp("lm_eval_tasks")
    (d / "lw_mc.yaml").write_text(task_yaml("lw_mc", MC, "mc"))
    (d / "lw_gen.yaml").write_text(task_yaml("lw_gen", GEN, "gen", max_gen_toks=GEN_TOKENS))
    (d / "lw_roll.yaml").write_text(task_yaml("lw_roll", ROLL, "rolling"))
    return d, TaskManager(include_path=str(d), include_defaults=False)


def _run(model, tasks) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(model=model, tasks=TASKS, task_manager=tasks[1],
                                   batch_size=16, log_samples=True)


@pytest.fixture(scope="module")
def hf_results(lm_eval_tasks, hf_smollm, smollm_gguf):
    """lm-eval's `hf` backend on the GGUF (transformers' loader), run once."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name)
    return _run(HFLM(pretrained=hf_smollm, tokenizer=tok, batch_size=16), lm_eval_tasks)


@pytest.fixture(scope="module")
def ours_results(lm_eval_tasks, smollm, smollm_tokenizer):
    """lm-eval with the llamaworks adapter on our model."""
    from llamaworks.eval.harness import LlamaworksLM

    return _run(LlamaworksLM.from_model(smollm, smollm_tokenizer), lm_eval_tasks)


def _lls(res: dict) -> list[list[float]]:
    return [[r[0][0] for r in s["resps"]] for s in res["samples"]["lw_mc"]]


def test_adapter_matches_hf_backend_on_multiple_choice(hf_results, ours_results):
    for m in ("acc,none", "acc_norm,none"):
        assert ours_results["results"]["lw_mc"][m] == hf_results["results"]["lw_mc"][m]
    ours, ref = _lls(ours_results), _lls(hf_results)
    assert len(ours) == 48
    assert max(abs(a - b) for x, y in zip(ours, ref, strict=True)
               for a, b in zip(x, y, strict=True)) < 1e-3


def test_llamaworks_eval_matches_hf_backend(hf_results, smollm, smollm_tokenizer):
    """Our own `eval` path (not the adapter): same acc/acc_norm and per-choice sums."""
    from llamaworks.eval.mc import evaluate_mc
    from llamaworks.eval.tasks import load_task_file

    res = evaluate_mc(smollm, smollm_tokenizer, load_task_file(MC).items, batch_size=8)
    assert res.metrics["acc"] == hf_results["results"]["lw_mc"]["acc,none"]
    assert res.metrics["acc_norm"] == hf_results["results"]["lw_mc"]["acc_norm,none"]
    ref = _lls(hf_results)
    assert max(abs(a - b) for x, y in zip(res.loglikelihoods, ref, strict=True)
               for a, b in zip(x, y, strict=True)) < 1e-3


def test_adapter_rolling_loglikelihood_matches_hf_backend(hf_results, ours_results):
    ours, ref = ours_results["results"]["lw_roll"], hf_results["results"]["lw_roll"]
    for m in ("bits_per_byte,none", "byte_perplexity,none", "word_perplexity,none"):
        assert math.isclose(ours[m], ref[m], rel_tol=1e-4), m


def test_adapter_generate_until_matches_hf_backend(hf_results, ours_results):
    """Greedy completions cut at the same stop strings: identical text."""
    ours = [s["resps"][0][0] for s in ours_results["samples"]["lw_gen"]]
    ref = [s["resps"][0][0] for s in hf_results["samples"]["lw_gen"]]
    assert ours == ref
    assert any(t.strip() for t in ours)


def test_generative_eval_uses_the_same_completions_as_lm_eval(hf_results, smollm,
                                                              smollm_tokenizer):
    from llamaworks.eval.generative import evaluate_gen
    from llamaworks.eval.tasks import GenItem, load_task_file
    from llamaworks.infer.llm import LLM

    items = [GenItem(it.prompt, it.answer, ["\n\n", "Question:"])
             for it in load_task_file(GEN).items]
    res = evaluate_gen(LLM(smollm, tokenizer=smollm_tokenizer), items, max_tokens=GEN_TOKENS)
    ref = [s["resps"][0][0] for s in hf_results["samples"]["lw_gen"]]
    assert [r["completion"] for r in res["items"]] == ref


def test_eval_bpb_equals_what_score_implies(smollm_gguf, tmp_path, capsys):
    from llamaworks.cli import main
    from llamaworks.train.metrics import token_byte_lengths

    text = json.loads(ROLL.read_text().splitlines()[0])["text"]
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    assert main(["score", "--model", str(smollm_gguf), "--file", str(f), "--json"]) == 0
    nll = json.loads(capsys.readouterr().out)["nll"]
    assert main(["eval", "--model", str(smollm_gguf), "--task-file", str(f), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    from llamaworks.checkpoint import load_tokenizer

    tok = load_tokenizer(smollm_gguf)
    ids = tok.encode(text, bos=False)
    n_bytes = int(token_byte_lengths(tok)[ids[1:]].sum())
    assert n_bytes == len(text.encode()) - len(tok.decode(ids[:1]).encode())
    assert got["scored"] == len(nll)
    assert got["bpb"] == pytest.approx(sum(nll) / math.log(2) / n_bytes, rel=1e-5)


def test_lm_eval_command_line_runs_with_model_llamaworks(lm_eval_tasks, hf_results,
                                                          smollm_gguf, tmp_path):
    """`llamaworks eval lm-eval --model llamaworks ...` is lm-eval's own CLI (in-process here;
    `python -m llamaworks.eval.lm_eval` is the same function)."""
    from llamaworks.cli import main

    assert main(["eval", "lm-eval", "--model", "llamaworks", "--model_args",
                 f"pretrained={smollm_gguf},threads=1", "--tasks", "lw_mc", "--include_path",
                 str(lm_eval_tasks[0]), "--limit", "4", "--output_path", str(tmp_path)]) == 0
    (res_file,) = tmp_path.rglob("results_*.json")
    got = json.loads(res_file.read_text())["results"]["lw_mc"]
    ref = hf_results["samples"]["lw_mc"][:4]
    assert got["acc,none"] == sum(s["acc"] for s in ref) / 4
    assert got["acc_norm,none"] == sum(s["acc_norm"] for s in ref) / 4
