"""`prepare` on a Dask cluster (`executor=`): a LocalCluster it starts (`dask-local:N`) and an
existing scheduler with its own worker processes (`dask://HOST:PORT`) write the same bytes as
one process, resume the same way, and a bad address or an empty cluster is a clear error."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
from test_data_parallel import Interrupted, _assert_same, _counting_imap, _interrupt_reader, _tree
from train_fixtures import write_jsonl, write_recipe

from llamaworks.cli import main
from llamaworks.data import parallel, pipeline
from llamaworks.data.corpus import bundled_documents
from llamaworks.data.parallel import (
    DaskPool,
    EncodeSpec,
    WorkerPool,
    encode_chunk,
    parse_executor,
)
from llamaworks.data.pipeline import prepare
from llamaworks.data.recipe import load_recipe
from llamaworks.data.resume import ResumeWarning
from llamaworks.errors import LlamaworksError

pytest.importorskip("distributed")

CHUNK = 16        # documents per task (default 256): many tasks, spread over both workers
CHECKPOINT = 32   # documents between progress records (default 4096)
N_KJV, N_MIXED = 40, 167


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory) -> Path:
    """kjv chapters, then Jargon File entries followed by exact and near copies of kjv
    chapters: tasks on different workers see the originals and the copies, so the copies are
    dropped only if dedup is global."""
    d = tmp_path_factory.mktemp("corpus")
    kjv = list(islice(bundled_documents("kjv"), 40))
    jar = list(islice(bundled_documents("jargon"), 160))

    def near(doc: dict) -> dict:  # the last words changed: ~97% shingle overlap
        words = doc["text"].split()
        return {"id": f"near/{doc['id']}", "text": " ".join(words[:-3] + ["amen", "selah"])}

    mixed = (jar[:80] + [{"id": "exact", "text": kjv[3]["text"]}] + jar[80:]
             + [near(k) for k in kjv[:6]])
    assert len(kjv) == N_KJV and len(mixed) == N_MIXED
    src = {"kjv": write_jsonl(d / "kjv.jsonl", kjv), "mixed": write_jsonl(d / "mixed.jsonl",
                                                                           mixed)}
    return write_recipe(d, src, {"kjv": 0.5, "mixed": 0.5})


@pytest.fixture(scope="module")
def reference(recipe_path, tmp_path_factory) -> dict[str, bytes]:
    """Every output file of a single-process run (default chunk sizes)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    m = prepare(load_recipe(recipe_path), out, progress=False, workers=1)
    assert m["sources"]["mixed"]["dropped"]["exact_dup"] == 1
    assert m["sources"]["mixed"]["dropped"]["near_dup"] >= 5
    return _tree(out)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(pipeline, "CHUNK_DOCS", CHUNK)


@pytest.fixture
def pools(monkeypatch) -> list[DaskPool]:
    """The DaskPools `prepare` makes, to check where the work went."""
    made: list[DaskPool] = []
    real = DaskPool.__init__

    def init(self, spec, timeout=None):
        real(self, spec, timeout)
        made.append(self)

    monkeypatch.setattr(DaskPool, "__init__", init)
    return made


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory) -> str:
    """An existing cluster, as on a real one: `dask scheduler` and `dask worker --nworkers 2
    --nthreads 1`, separate processes of the same venv. Yields its tcp:// address."""
    d = tmp_path_factory.mktemp("cluster")
    sfile = d / "scheduler.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler",
                               "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(sfile)], env=env, cwd=d,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    try:
        deadline = time.monotonic() + 60
        while not sfile.exists() or not sfile.read_text().strip():
            assert time.monotonic() < deadline, "dask scheduler did not start"
            assert procs[0].poll() is None, "dask scheduler exited"
            time.sleep(0.2)
        time.sleep(0.2)  # the file is written whole, but let the write finish
        address = json.loads(sfile.read_text())["address"]
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker",
                                       address, "--nworkers", "2", "--nthreads", "1",
                                       "--no-dashboard", "--death-timeout", "30"],
                                      env=env, cwd=d, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
        from distributed import Client

        with Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=60)
        yield address
    finally:  # each started in its own session: its group is these processes and theirs
        for p in reversed(procs):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=20)


@pytest.mark.slow
def test_dask_local_two_workers_write_the_same_bytes_as_one_process(
        recipe_path, reference, tmp_path, small_chunks, pools):
    prepare(load_recipe(recipe_path), tmp_path / "out", progress=False,
            executor="dask-local:2", checkpoint_docs=CHECKPOINT)
    assert pools[0].workers == 2  # two one-thread workers, 2 x 16-document tasks each queued
    assert pools[0].tasks_sent > (N_KJV + N_MIXED) // CHUNK
    _assert_same(tmp_path / "out", reference)


@pytest.mark.slow
def test_an_existing_scheduler_writes_the_same_bytes(recipe_path, reference, tmp_path,
                                                     small_chunks, pools, scheduler):
    host_port = scheduler.removeprefix("tcp://")
    prepare(load_recipe(recipe_path), tmp_path / "out", progress=False,
            executor=f"dask://{host_port}", checkpoint_docs=CHECKPOINT)
    assert pools[0].workers == 2 and pools[0].tasks_sent > (N_KJV + N_MIXED) // CHUNK
    _assert_same(tmp_path / "out", reference)


@pytest.mark.slow
def test_cleaning_interrupted_on_a_cluster_resumes_to_the_same_bytes(
        recipe_path, reference, tmp_path, small_chunks, monkeypatch, scheduler):
    out = tmp_path / "out"
    _interrupt_reader(monkeypatch, after=100)  # `mixed`'s reader dies after 100 documents
    with pytest.raises(Interrupted):
        prepare(load_recipe(recipe_path), out, progress=False, executor=scheduler,
                checkpoint_docs=CHECKPOINT)
    state = json.loads((out / "clean" / "mixed.progress.json").read_text())["state"]
    assert 0 < state["read"] <= 100
    monkeypatch.undo()  # the reader works again
    monkeypatch.setattr(pipeline, "CHUNK_DOCS", CHUNK)
    work: Counter = Counter()
    monkeypatch.setattr(WorkerPool, "imap", _counting_imap(work))  # DaskPool's imap too
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)  # the record must be used
        prepare(load_recipe(recipe_path), out, progress=False, executor=scheduler,
                checkpoint_docs=CHECKPOINT)
    # only the rest of `mixed` was cleaned; the workers recomputed the kept documents' dedup
    # keys so the parent's indexes were whole again (the copies at the end were still dropped)
    assert work["clean_chunk"] == N_MIXED - state["read"]
    assert work["dedup_chunk"] == N_KJV + state["kept"]
    _assert_same(out, reference)


def test_the_tokenizer_is_sent_to_workers_that_cannot_read_its_path(tmp_path):
    from llamaworks.tokenizer.train import train_bpe

    tok = train_bpe((d["text"] for d in islice(bundled_documents("kjv"), 20)), 300)
    tok.save(tmp_path / "tok")
    data = (tmp_path / "tok" / "tokenizer.json").read_bytes()
    lines = [json.dumps({"id": str(i), "text": d["text"], "split": "train"}).encode() + b"\n"
             for i, d in enumerate(islice(bundled_documents("kjv"), 3))]
    spec = EncodeSpec(str(tmp_path / "tok" / "tokenizer.json"),
                      hashlib.sha256(data).hexdigest(), tok.bos_id, tok.eos_id, "<u2")
    from_path = encode_chunk(lines, spec)
    parallel._TOKENIZERS.clear()
    gone = EncodeSpec("/nonexistent/tokenizer.json", spec.tokenizer_sha256, tok.bos_id,
                      tok.eos_id, "<u2")
    from_bytes = encode_chunk(lines, gone, data)
    assert from_path[:2] == from_bytes[:2]
    assert (from_path[2]["train"][0] == from_bytes[2]["train"][0]).all()


class _FakeClient:
    """What `DaskPool` asks of a Client: `run(fn)` on every worker, their threads."""

    def __init__(self, answer):
        self.answer = answer

    def run(self, fn):
        return self.answer

    def nthreads(self):  # a cluster whose workers have all gone
        return {}

    def close(self):
        pass


def test_workers_with_other_llamaworks_code_are_refused():
    pool = DaskPool(parse_executor("dask://h:1"))
    pool._client = _FakeClient({"tcp://a:1": "0" * 64})  # their worker_digest differs
    with pytest.raises(LlamaworksError, match="workers tcp://a:1 run other llamaworks data"):
        pool._check_workers()


BLOCK_LLAMAWORKS = """import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "llamaworks":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
"""


@pytest.mark.slow
def test_workers_that_cannot_import_llamaworks_are_refused(tmp_path, monkeypatch):
    """A real `dask worker` whose Python has no llamaworks (a sitecustomize hides it)."""
    from distributed import LocalCluster

    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT_S", 30.0)
    (tmp_path / "sitecustomize.py").write_text(BLOCK_LLAMAWORKS)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    with LocalCluster(n_workers=0, dashboard_address=":0") as empty:
        w = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker",
                              empty.scheduler_address, "--nthreads", "1", "--no-dashboard"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        try:
            pool = DaskPool(parse_executor(empty.scheduler_address))
            with pytest.raises(LlamaworksError, match="cannot run llamaworks' data functions"):
                pool.start()
        finally:
            os.killpg(w.pid, signal.SIGKILL)
            w.wait(timeout=20)


def test_a_task_on_a_cluster_left_without_workers_fails_instead_of_waiting(monkeypatch):
    from concurrent.futures import Future

    monkeypatch.setattr(parallel, "POLL_S", 0.05)
    monkeypatch.setattr(parallel, "LOST_WORKERS_S", 0.2)
    pool = DaskPool(parse_executor("dask://h:1"))
    pool._client = _FakeClient({})
    with pytest.raises(LlamaworksError, match="no workers for"):
        pool._result(Future())  # never finishes


@pytest.mark.parametrize("text", ["dask:/x", "ray://h:1", "dask-local:0", "dask-local:two",
                                  "dask://"])
def test_a_malformed_executor_is_a_clear_error(text):
    with pytest.raises(LlamaworksError, match="--executor"):
        parse_executor(text)


def test_executor_forms_parse():
    assert parse_executor("dask://10.0.0.5").address == "tcp://10.0.0.5:8786"
    assert parse_executor("dask://h:9000").address == "tcp://h:9000"
    assert parse_executor("tcp://h:9000").address == "tcp://h:9000"
    assert parse_executor("dask-local:3").local == 3


@pytest.mark.slow
def test_an_unreachable_scheduler_exits_2_with_a_message_not_a_hang(
        recipe_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT_S", 2.0)
    t0 = time.monotonic()
    rc = main(["data", "prepare", "--config", str(recipe_path), "--out", str(tmp_path / "o"),
               "--no-progress", "--executor", "dask://127.0.0.1:9"])  # nothing listens on 9
    assert rc == 2 and time.monotonic() - t0 < 30
    err = capsys.readouterr().err
    assert "no Dask scheduler answered at tcp://127.0.0.1:9" in err and "dask worker" in err


@pytest.mark.slow
def test_a_scheduler_without_workers_is_a_clear_error(recipe_path, tmp_path, monkeypatch):
    from distributed import LocalCluster

    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT_S", 2.0)
    with LocalCluster(n_workers=0, dashboard_address=":0") as empty:
        with pytest.raises(LlamaworksError, match="has no workers after 2 s"):
            prepare(load_recipe(recipe_path), tmp_path / "o", progress=False,
                    executor=empty.scheduler_address)


def test_workers_and_executor_together_are_refused(recipe_path, tmp_path):
    with pytest.raises(LlamaworksError, match="dask-local:N starts N"):
        prepare(load_recipe(recipe_path), tmp_path / "o", progress=False, workers=2,
                executor="dask-local:2")
