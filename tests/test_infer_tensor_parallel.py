"""Tensor-parallel decoding (`infer/tensor_parallel.py`, `generate --tensor-parallel N` under
torchrun): on 2 gloo ranks the engine's greedy tokens are one process's, its per-step logits
agree within 1e-4, each rank holds half of every block's matrices and a KV cache of its own
key/value heads, decode runs eagerly, sampled tokens are rank 0's on every rank; what cannot run
split (world size, heads, --quant, --compile, quantized GGUFs) is refused by name. `serve
--tensor-parallel 2`: rank 0 serves, both ranks step alike, one process's answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
import torch
from infer_fixtures import tiny_model

from llamaworks.checkpoint import save_native
from llamaworks.checkpoint.gguf_export import export_gguf
from llamaworks.cli import main
from llamaworks.infer import tensor_parallel as T
from llamaworks.infer.engine import Engine
from llamaworks.tokenizer.train import train_bpe

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PROMPT = "the quick brown fox"

# Runs as `python SCRIPT MODEL OUT TP PROMPT` (TP 1) or under torchrun (TP = the world size): greedy
# generation through the engine, then a sampled one with each rank's own unseeded generator.
SCRIPT = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    from llamaworks.checkpoint import load_tokenizer
    from llamaworks.infer import tensor_parallel as T
    from llamaworks.infer.engine import Engine
    from llamaworks.infer.generate import generate_tokens
    from llamaworks.infer.sampling import SamplingParams

    path, out, tp, text = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    tok, model = load_tokenizer(path), None
    logits = []

    class Recording(Engine):
        def _append(self, s, t, lg):
            logits.append(lg.float().clone())
            super()._append(s, t, lg)

    def run(agree, params):
        eng = Recording(model, tok, max_batch=1, agree=agree)
        prompt = tok.encode(text, bos=None)
        return eng, list(generate_tokens(eng, prompt, 24, params))

    def report(agree, rank):
        eng, ids = run(agree, SamplingParams(temperature=0))
        greedy_logits = torch.stack(logits)
        torch.manual_seed(100 + rank)  # each rank's unseeded generator draws its own seed
        _, sampled = run(agree, SamplingParams(temperature=1.5))
        q = model.model.layers[0].self_attn.q_proj.weight
        local = q.to_local() if hasattr(q, "to_local") else q
        torch.save({"ids": ids, "logits": greedy_logits, "sampled": sampled,
                    "kind": eng.step_fn.kind, "cache": tuple(eng.pool.cache.k.shape),
                    "q_local": tuple(local.shape),
                    "q_storage": local.untyped_storage().nbytes() // local.element_size()},
                   f"{out}.{rank}")

    if tp == 1:
        model = T.load_float(path)
        report(None, 0)
    else:
        with T.tensor_parallel(path, tp) as (model, main, agree):
            report(agree, dist.get_rank())
''')


@pytest.fixture(scope="module")
def tok():
    return train_bpe([f"{PROMPT} jumps over the lazy dog"] * 20, 300)


def _checkpoint(folder, tok, **overrides):
    m = tiny_model(seed=3, std=0.1, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                   eos_token_id=None, **overrides)
    return m, save_native(folder, m.config, m.state_dict(), tokenizer=tok, dtype=torch.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    return _checkpoint(tmp_path_factory.mktemp("tp") / "m", tok)[1]


def _torchrun(args: list[str], n: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(n), *args], capture_output=True, text=True,
                          timeout=300, env=ENV)


@pytest.mark.slow
def test_two_ranks_decode_the_tokens_and_logits_of_one_process(model_dir, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(model_dir), str(tmp_path / "one"), "1",
                        PROMPT],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _torchrun([str(script), str(model_dir), str(tmp_path / "tp"), "2", PROMPT])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one = torch.load(tmp_path / "one.0")
    ranks = [torch.load(tmp_path / f"tp.{i}") for i in range(2)]
    assert len(one["ids"]) == 24
    for got in ranks:
        assert got["ids"] == one["ids"]  # greedy: the same 24 tokens
        assert got["logits"].shape == one["logits"].shape
        worst = float((got["logits"] - one["logits"]).abs().max())
        assert worst < 1e-4, worst
        assert got["kind"] == "eager" and one["kind"] == "fused"
        assert got["cache"][2] == 1 and one["cache"][2] == 2  # key/value heads cached per rank
        assert got["q_local"] == (32, 64) and got["q_storage"] == 32 * 64  # its half only
    # sampled with differently seeded generators: every rank keeps rank 0's tokens
    assert ranks[0]["sampled"] == ranks[1]["sampled"]
    assert len(ranks[0]["sampled"]) == 24


@pytest.mark.slow
def test_generate_refuses_more_ranks_than_processes_and_heads_that_do_not_split(
        model_dir, tmp_path, tok):
    gen = ["-m", "llamaworks.cli", "generate", "-p", PROMPT, "-n", "4", "--threads", "1"]
    r = _torchrun([*gen, "--model", str(model_dir), "--tensor-parallel", "4"])
    assert r.returncode != 0
    assert "error: --tensor-parallel 4 needs as many processes: torchrun --nproc-per-node 4 " \
           "(this run has 2)" in r.stderr, r.stderr[-3000:]
    _, odd = _checkpoint(tmp_path / "kv1", tok, n_kv_heads=1)
    r = _torchrun([*gen, "--model", str(odd), "--tensor-parallel", "2"])
    assert r.returncode != 0
    assert "error: --tensor-parallel 2: the model's 1 key/value heads do not split into 2 " \
           "equal parts" in r.stderr, r.stderr[-3000:]
    assert "/llamaworks/" not in r.stderr  # no traceback of ours (torchrun prints its own)


def test_options_the_split_model_does_not_take_are_refused_by_name(monkeypatch, model_dir,
                                                                   capsys):
    with pytest.raises(ValueError, match=r"needs as many processes: torchrun --nproc-per-node 2 "
                                         r"\(this run has 1\)"):
        T.check_launch(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    T.check_launch(2)
    with pytest.raises(ValueError, match="--quant does not combine with --tensor-parallel"):
        T.check_launch(2, quant="int8")
    with pytest.raises(ValueError, match="--compile does not combine with --tensor-parallel"):
        T.check_launch(2, compile=True)
    with pytest.raises(ValueError, match="must be >= 1"):
        T.check_launch(0)
    with pytest.raises(ValueError, match="agree"):
        Engine(tiny_model(), None, max_gap=4.0, agree=lambda t: t)
    for flag in (["--draft", "ngram"], ["--adapter", "x"], ["--quant", "int8"]):
        assert main(["serve", "--model", str(model_dir), "--tensor-parallel", "2", *flag]) == 2
        assert f"{flag[0]} does not combine with --tensor-parallel" in capsys.readouterr().err


def test_quantized_gguf_is_refused_and_float_gguf_loads_as_float_linears(tmp_path):
    m = tiny_model(seed=1)
    sd = m.state_dict()
    q8 = export_gguf(tmp_path / "q8.gguf", m.config, sd, file_type="Q8_0")
    with pytest.raises(ValueError, match="q8.gguf stores Q8_0 matrices: --tensor-parallel splits "
                                         "float weights only"):
        T.load_float(q8)
    f16 = T.load_float(export_gguf(tmp_path / "f16.gguf", m.config, sd, file_type="F16"))
    assert type(f16.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert f16.dtype == torch.float32



def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> Any:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=120)


@pytest.mark.slow
def test_serve_on_two_ranks_answers_as_one_process(model_dir, tmp_path):
    """`serve --tensor-parallel 2` under torchrun: rank 0 serves, both ranks step alike. Three
    concurrent greedy requests over 2 rows (one waits, then joins mid-decode), after a sampled
    one and a stream the client leaves early (its rows aborted), give one process's texts."""
    import signal
    import threading
    import urllib.request

    from llamaworks.infer.llm import LLM
    from llamaworks.infer.sampling import SamplingParams

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "llamaworks.cli", "serve", "--model", str(model_dir), "--port", str(port),
         "--tensor-parallel", "2", "--max-batch", "2", "--threads", "1"],
        env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(480):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.25)
        done = url + "/v1/completions"
        sampled = json.loads(_post(done, {"model": "m", "prompt": PROMPT, "max_tokens": 12,
                                          "temperature": 1.5, "n": 2}).read())
        assert len(sampled["choices"]) == 2
        with _post(done, {"model": "m", "prompt": "over the", "max_tokens": 240,
                          "stream": True, "ignore_eos": True}) as left:
            left.readline()  # the first event, then the client is gone
        for _ in range(120):  # its rows are aborted on both ranks (their next steps agree)
            if "llamaworks_cancelled_requests_total 1" in \
                    urllib.request.urlopen(url + "/metrics").read().decode():
                break
            time.sleep(0.25)
        else:
            raise AssertionError("the stream the client left was not cancelled")
        prompts = [PROMPT, "over the lazy", "jumps"]
        got: list[str | None] = [None] * 3

        def ask(i: int) -> None:
            body = {"model": "m", "prompt": prompts[i], "max_tokens": 12, "temperature": 0}
            got[i] = json.loads(_post(done, body).read())["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=200)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    want = [r.outputs[0].text for r in LLM(model_dir).generate(
        prompts, SamplingParams(max_tokens=12))]
    assert got == want
