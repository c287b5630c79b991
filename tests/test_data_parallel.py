"""`prepare` with worker processes and resume inside a source: outputs are byte-identical to a
single-process, uninterrupted run, whatever the worker count, the point of interruption (an
exception, SIGKILL) or the damage done to a progress record."""

from __future__ import annotations

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
from train_fixtures import write_jsonl, write_recipe

from llamaworks.data import pipeline
from llamaworks.data.corpus import bundled_documents
from llamaworks.data.parallel import WorkerPool
from llamaworks.data.pipeline import prepare
from llamaworks.data.recipe import load_recipe
from llamaworks.data.resume import ResumableFiles, ResumeWarning
from llamaworks.errors import LlamaworksError

CHUNK = 16        # documents per worker task in these tests (default 256)
CHECKPOINT = 32   # documents between progress records (default 4096)
N_MIXED = 326     # documents in the `mixed` source


def _near(doc: dict, tag: str) -> dict:
    words = doc["text"].split()  # the last words changed: ~97% shingle overlap
    return {"id": f"{tag}/{doc['id']}", "text": " ".join(words[:-3] + ["amen", "selah", "so"])}


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory) -> Path:
    """kjv (60 chapters) then `mixed`: Jargon File entries with, after the points where the
    tests interrupt it, exact and near copies of kjv chapters and of chapters earlier in
    `mixed` itself; so a resumed run drops them only if it rebuilt both dedup indexes."""
    d = tmp_path_factory.mktemp("corpus")
    kjv = list(islice(bundled_documents("kjv"), 70))
    jar = list(islice(bundled_documents("jargon"), 300))
    mixed = (jar[:5] + kjv[60:70] + jar[5:200] + [_near(k, "x") for k in kjv[:5]]
             + [{"id": "exact", "text": kjv[6]["text"]}] + jar[200:]
             + [_near(k, "y") for k in kjv[60:70]])
    assert len(mixed) == N_MIXED
    src = {"kjv": write_jsonl(d / "kjv.jsonl", kjv[:60]),
           "mixed": write_jsonl(d / "mixed.jsonl", mixed)}
    return write_recipe(d, src, {"kjv": 0.5, "mixed": 0.5})


@pytest.fixture(scope="module")
def reference(recipe_path, tmp_path_factory) -> dict[str, bytes]:
    """Every output file of an uninterrupted single-process run (default chunk sizes)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    m = prepare(load_recipe(recipe_path), out, progress=False, workers=1)
    mixed = m["sources"]["mixed"]
    assert mixed["dropped"]["exact_dup"] == 1 and mixed["dropped"]["near_dup"] >= 15
    return _tree(out)


def _tree(out: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file()}
    leftovers = [f for f in files if f.endswith((".progress.json", ".part"))]
    assert not leftovers, f"progress files left behind: {leftovers}"
    return files


def _assert_same(out: Path, reference: dict[str, bytes]) -> None:
    got = _tree(out)
    assert sorted(got) == sorted(reference)
    differ = [f for f in reference if got[f] != reference[f]]
    assert not differ, f"files differ from the uninterrupted single-process run: {differ}"


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(pipeline, "CHUNK_DOCS", CHUNK)


def _counting_imap(count: Counter):
    """A `WorkerPool.imap` that counts the documents handed to each function."""
    real = WorkerPool.imap

    def imap(self, fn, chunks, *args):
        def counted():
            for c in chunks:
                count[fn.__name__] += len(c)
                yield c
        return real(self, fn, counted(), *args)
    return imap


class Interrupted(Exception):
    pass


def _interrupt_reader(monkeypatch, after: int) -> None:
    """The `mixed` source's reader fails after `after` documents, like a lost mount."""
    real = pipeline.read_source

    def read_source(kind, path, text_field="text", **kw):
        docs = real(kind, path, text_field, **kw)
        if not path.endswith("mixed.jsonl"):
            return docs

        def failing():
            for i, d in enumerate(docs):
                if i == after:
                    raise Interrupted(f"reader died after {after} documents")
                yield d
        return failing()

    monkeypatch.setattr(pipeline, "read_source", read_source)


def _record(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_two_workers_write_the_same_bytes_as_one(recipe_path, reference, tmp_path,
                                                 small_chunks, monkeypatch):
    pools: list[WorkerPool] = []
    real_init = WorkerPool.__init__

    def init(self, workers):
        real_init(self, workers)
        pools.append(self)

    monkeypatch.setattr(WorkerPool, "__init__", init)
    prepare(load_recipe(recipe_path), tmp_path / "out", progress=False, workers=2,
            checkpoint_docs=CHECKPOINT)
    # the work really went to processes: cleaning (386 docs) and tokenizing, 16 per task
    assert pools[0].workers == 2 and pools[0].tasks_sent > (60 + N_MIXED) // CHUNK
    _assert_same(tmp_path / "out", reference)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_cleaning_interrupted_mid_source_resumes_to_the_same_bytes(
        recipe_path, reference, tmp_path, small_chunks, monkeypatch, workers):
    out = tmp_path / "out"
    _interrupt_reader(monkeypatch, after=150)
    with pytest.raises(Interrupted):
        prepare(load_recipe(recipe_path), out, progress=False, workers=workers,
                checkpoint_docs=CHECKPOINT)
    state = _record(out / "clean" / "mixed.progress.json")["state"]
    assert 0 < state["read"] <= 150 and not (out / "clean" / "mixed.stats.json").exists()
    assert (out / "clean" / "kjv.stats.json").exists()
    monkeypatch.undo()  # the reader works again
    monkeypatch.setattr(pipeline, "CHUNK_DOCS", CHUNK)
    work: Counter = Counter()
    monkeypatch.setattr(WorkerPool, "imap", _counting_imap(work))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)  # the record must be used
        prepare(load_recipe(recipe_path), out, progress=False, workers=workers,
                checkpoint_docs=CHECKPOINT)
    # only the documents after the record were cleaned again; the dedup indexes were rebuilt
    # from the kept output (all of kjv's and mixed's kept prefix)
    assert work["clean_chunk"] == N_MIXED - state["read"]
    kjv_kept = json.loads((out / "clean" / "kjv.stats.json").read_text())["kept"]
    assert work["dedup_chunk"] == kjv_kept + state["kept"]
    _assert_same(out, reference)


def _interrupt_writes(monkeypatch, record: str, checkpoints: int, writes: int) -> None:
    """Writes to the outputs recorded in `record` (e.g. tokens/mixed.progress.json) fail
    `writes` writes after its `checkpoints`-th progress record: the files then hold more than
    the record says, as after a crash."""
    real_checkpoint, real_write = ResumableFiles.checkpoint, ResumableFiles.write
    seen = Counter()

    def checkpoint(self, state):
        real_checkpoint(self, state)
        if self.record.as_posix().endswith(record):
            seen["checkpoints"] += 1

    def write(self, name, data):
        if self.record.as_posix().endswith(record) and seen["checkpoints"] >= checkpoints:
            seen["writes"] += 1
            if seen["writes"] > writes:
                raise Interrupted("disk went away")
        real_write(self, name, data)

    monkeypatch.setattr(ResumableFiles, "checkpoint", checkpoint)
    monkeypatch.setattr(ResumableFiles, "write", write)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_tokenizing_interrupted_mid_source_resumes_to_the_same_bytes(
        recipe_path, reference, tmp_path, small_chunks, monkeypatch, workers):
    out = tmp_path / "out"
    _interrupt_writes(monkeypatch, "tokens/mixed.progress.json", checkpoints=4, writes=5)
    with pytest.raises(Interrupted):
        prepare(load_recipe(recipe_path), out, progress=False, workers=workers,
                checkpoint_docs=CHECKPOINT)
    rec = _record(out / "tokens" / "mixed.progress.json")
    assert rec["state"]["docs"] == 4 * CHECKPOINT
    assert (out / "tokens" / "mixed.train.bin").stat().st_size > rec["files"]["train"]["bytes"]
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "CHUNK_DOCS", CHUNK)
    work: Counter = Counter()
    monkeypatch.setattr(WorkerPool, "imap", _counting_imap(work))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        prepare(load_recipe(recipe_path), out, progress=False, workers=workers,
                checkpoint_docs=CHECKPOINT)
    kept = json.loads((out / "clean" / "mixed.stats.json").read_text())["kept"]
    assert work["encode_chunk"] == kept - 4 * CHECKPOINT and work["clean_chunk"] == 0
    _assert_same(out, reference)


def _damage(out: Path, how: str) -> str:
    """Damage an interrupted run's state; returns what the warning must say."""
    rec_path = out / "clean" / "mixed.progress.json"
    rec = _record(rec_path)
    jsonl = out / "clean" / "mixed.jsonl"
    if how == "truncated_record":
        rec_path.write_bytes(rec_path.read_bytes()[:40])
        return "unreadable"
    if how == "garbage_record":
        rec_path.write_bytes(os.urandom(64))
        return "unreadable"
    if how == "edited_record":  # valid JSON, counts changed: the checksum catches it
        rec["state"]["read"] += 10
        rec["state"]["dropped"]["min_words"] = rec["state"]["dropped"].get("min_words", 0) + 10
        rec_path.write_text(json.dumps(rec))
        return "checksum"
    if how == "other_settings":  # a record from another recipe, checksum recomputed
        from llamaworks.data.resume import _checksum
        rec["fingerprint"]["seed"] = 7
        body = {k: v for k, v in rec.items() if k != "checksum"}
        rec_path.write_text(json.dumps({**body, "checksum": _checksum(body)}))
        return "other settings"
    if how == "input_touched":  # the source file changed since: its documents may differ
        src = next(Path(x) for x in rec["fingerprint"]["source"] if str(x).endswith(".jsonl"))
        st = src.stat()
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        return "other settings"
    if how == "output_shorter":
        data = jsonl.read_bytes()[:rec["files"]["jsonl"]["bytes"] - 100]
        jsonl.write_bytes(data)
        return "shorter"
    if how == "output_changed":
        data = bytearray(jsonl.read_bytes())
        data[50] ^= 0x20
        jsonl.write_bytes(bytes(data))
        return "differ"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated_record", "garbage_record", "edited_record",
                                 "other_settings", "input_touched", "output_shorter",
                                 "output_changed"])
@pytest.mark.slow
def test_a_damaged_progress_record_restarts_the_source_cleanly(
        recipe_path, reference, tmp_path, small_chunks, monkeypatch, how):
    out = tmp_path / "out"
    _interrupt_reader(monkeypatch, after=150)
    with pytest.raises(Interrupted):
        prepare(load_recipe(recipe_path), out, progress=False, workers=1,
                checkpoint_docs=CHECKPOINT)
    said = _damage(out, how)
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "CHUNK_DOCS", CHUNK)
    work: Counter = Counter()
    monkeypatch.setattr(WorkerPool, "imap", _counting_imap(work))
    with pytest.warns(ResumeWarning, match=f"cleaning mixed: .*{said}.*restarting"):
        prepare(load_recipe(recipe_path), out, progress=False, workers=1,
                checkpoint_docs=CHECKPOINT)
    assert work["clean_chunk"] == N_MIXED  # the whole source again, nothing trusted
    _assert_same(out, reference)


@pytest.mark.slow
def test_a_damaged_token_progress_record_restarts_that_source(
        recipe_path, reference, tmp_path, small_chunks, monkeypatch):
    out = tmp_path / "out"
    _interrupt_writes(monkeypatch, "tokens/mixed.progress.json", checkpoints=2, writes=3)
    with pytest.raises(Interrupted):
        prepare(load_recipe(recipe_path), out, progress=False, workers=1,
                checkpoint_docs=CHECKPOINT)
    rec = out / "tokens" / "mixed.progress.json"
    rec.write_text(rec.read_text().replace('"docs": 64', '"docs": 96'))
    monkeypatch.undo()
    with pytest.warns(ResumeWarning, match="tokenizing mixed: .*checksum"):
        prepare(load_recipe(recipe_path), out, progress=False, workers=1)
    _assert_same(out, reference)


_SLOW_CLI = """
import sys, time
import llamaworks.data.pipeline as P
real = P.read_source
def slow(kind, path, text_field="text", **kw):
    for d in real(kind, path, text_field, **kw):
        if path.endswith("mixed.jsonl"):
            time.sleep(0.02)  # slow enough to be caught inside this source
        yield d
P.read_source = slow
from llamaworks.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="lists processes via /proc")
def test_sigkilled_prepare_resumes_to_the_same_bytes_and_leaves_no_workers(
        recipe_path, reference, tmp_path):
    """A real crash: `llamaworks data prepare --workers 2` (reading `mixed` slowed to 20 ms a
    document) killed with SIGKILL once its progress record shows work inside `mixed`. Its
    worker processes exit by themselves, and the resumed run writes the same bytes."""
    out = tmp_path / "out"
    args = ["data", "prepare", "--config", str(recipe_path), "--out", str(out), "--workers",
            "2", "--checkpoint-docs", "16", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, *args],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    rec = out / "clean" / "mixed.progress.json"
    deadline = time.monotonic() + 60
    try:
        while _read_so_far(rec) < 48:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no progress record within 60 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for _ in range(100):
            if not _session(proc.pid):
                break
            time.sleep(0.1)
        assert not _session(proc.pid), "worker processes outlived their parent"
    finally:
        for pid in _session(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.stderr.close()
    assert not (out / "clean" / "mixed.stats.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        prepare(load_recipe(recipe_path), out, progress=False, workers=2)
    _assert_same(out, reference)


def _read_so_far(rec: Path) -> int:
    try:
        return _record(rec)["state"]["read"]
    except (OSError, ValueError):  # not written yet
        return 0


def _session(sid: int) -> list[int]:
    """Live processes of session `sid` (the killed run's workers, if any)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(d.name))
    return pids


def test_workers_must_be_positive(recipe_path, tmp_path):
    with pytest.raises(LlamaworksError, match="workers must be at least 1"):
        prepare(load_recipe(recipe_path), tmp_path / "out", progress=False, workers=0)
