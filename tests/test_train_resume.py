"""Exact resume on CPU: stopped at step 20 (cleanly, by SIGTERM, or by kill -9) and resumed to
40, a run logs bit-identical losses to an uninterrupted 40-step run; a damaged newest checkpoint
is skipped (with a warning naming it) and the run continues bit-exactly from the one before."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_fixtures import prepare_small, read_metrics, small_train_config

from llamaworks.checkpoint import load_state_dict
from llamaworks.config import get_preset
from llamaworks.errors import CheckpointError
from llamaworks.train.checkpoints import latest
from llamaworks.train.loop import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_small(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train(get_preset("tiny"), small_train_config(), data, out)
    return out


def _losses(out, steps):
    m = read_metrics(out)
    return [m[s]["loss"] for s in steps]


@pytest.mark.slow
def test_stop_at_20_then_resume_to_40_reproduces_every_loss_and_the_weights(data, straight,
                                                                           tmp_path):
    s = train(get_preset("tiny"), small_train_config(stop_at=20), data, tmp_path)
    assert s["step"] == 20 and latest(tmp_path)[0] == 20
    assert not (tmp_path / "model.safetensors").exists()  # not finished: no final export
    s = train(get_preset("tiny"), small_train_config(), data, tmp_path, resume=True)
    assert s["start_step"] == 20 and s["step"] == 40
    steps = range(1, 41)
    assert _losses(tmp_path, steps) == _losses(straight, steps)
    assert read_metrics(tmp_path)[40]["val_loss"] == read_metrics(straight)[40]["val_loss"]
    _, a, _ = load_state_dict(tmp_path)
    _, b, _ = load_state_dict(straight)
    assert all(a[k].equal(b[k]) for k in a)


@pytest.fixture(scope="module")
def stopped_at_30(data, tmp_path_factory):
    """A run stopped at step 30: checkpoints step_000020 and step_000030 (keep_last=2)."""
    out = tmp_path_factory.mktemp("stopped30")
    train(get_preset("tiny"), small_train_config(stop_at=30), data, out)
    return out


def test_each_checkpoint_records_every_files_size_and_sha256_in_its_manifest(stopped_at_30):
    d = stopped_at_30 / "checkpoints" / "step_000030"
    files = json.loads((d / "manifest.json").read_text())["files"]
    on_disk = sorted(p.relative_to(d).as_posix() for p in d.rglob("*")
                     if p.is_file() and p.name != "manifest.json")
    assert sorted(files) == on_disk and "trainer_state.pt" in files
    for rel, rec in files.items():
        data = (d / rel).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


def _append(path, text):
    with open(path, "a") as f:
        f.write(text)


DAMAGE = {  # what is damaged -> the step a resume must continue from
    "truncated trainer_state.pt": (lambda d: _truncate(d / "checkpoints/step_000030/"
                                                       "trainer_state.pt"), 20),
    "a flipped byte in model.safetensors": (lambda d: _flip_a_byte(
        d / "checkpoints/step_000030/model.safetensors"), 20),
    "half-written latest.json": (lambda d: _truncate(d / "latest.json"), 30),
    "a half-written last line in metrics.jsonl (kill -9 mid-append)": (
        lambda d: _append(d / "metrics.jsonl", '{"step": 31, "lo'), 30),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_skips_a_damaged_checkpoint_and_continues_bit_exactly_from_the_newest_intact(
        data, straight, stopped_at_30, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(stopped_at_30, out)
    harm, want_start = DAMAGE[damage]
    harm(out)
    warned = "metrics.jsonl:31: not a metrics row" if "metrics" in damage else \
        "skipping damaged checkpoint .*step_000030"
    if "latest.json" in damage:
        s = train(get_preset("tiny"), small_train_config(), data, out, resume=True)
    else:
        with pytest.warns(UserWarning, match=warned):
            s = train(get_preset("tiny"), small_train_config(), data, out, resume=True)
    assert s["start_step"] == want_start and s["step"] == 40
    assert _losses(out, range(1, 41)) == _losses(straight, range(1, 41))
    _, a, _ = load_state_dict(out)
    _, b, _ = load_state_dict(straight)
    assert all(a[k].equal(b[k]) for k in a)
    assert latest(out)[0] == 40


def test_resume_with_every_checkpoint_damaged_is_a_clear_error_that_changes_nothing(
        data, stopped_at_30, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped_at_30, out)
    _truncate(out / "checkpoints/step_000030/trainer_state.pt")
    (out / "checkpoints/step_000020/manifest.json").unlink()
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.warns(UserWarning), pytest.raises(
            CheckpointError, match=r"no intact checkpoint.*step_000030: trainer_state.pt has "
                                   r"\d+ bytes.*step_000020: no manifest.json"):
        train(get_preset("tiny"), small_train_config(), data, out, resume=True)
    assert (out / "metrics.jsonl").read_bytes() == before


def test_the_loss_goes_down_and_metrics_have_the_documented_fields(straight):
    m = read_metrics(straight)
    assert m[40]["loss"] < m[1]["loss"] - 0.5
    for key in ("step", "loss", "lr", "tok_per_s", "mfu", "grad_norm"):
        assert key in m[1]
    assert {"val_loss", "val_bpb"} <= set(m[20]) and "val_loss" not in m[19]
    assert (straight / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_the_last_k_checkpoints_are_kept(straight):
    dirs = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert dirs == ["step_000030", "step_000040"]


def _spawn(data, out, *extra):
    cmd = [sys.executable, "-m", "llamaworks.cli", "pretrain", "--preset", "tiny",
           "--data", str(data), "--out", str(out), "--lr", "3e-3", "--micro-batch", "4",
           "--seq-len", "32", "--max-steps", "40", "--eval-every", "20", "--eval-rows", "8",
           "--log-every", "1", "--save-every", "5", "--keep-last", "2", "--no-progress",
           "--device", "cpu", *extra]
    # the killed run computes as the in-process ones do: the same thread count (an earlier test
    # in the session may have changed this process's), else sums differ in their last bits
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)


def _wait_for_checkpoint(proc, out, step, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        found = latest(out)
        if found and found[0] >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"trainer exited early:\n{proc.stdout.read()}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill-9", "sigterm"])
def test_a_killed_run_resumes_from_its_last_checkpoint_bit_exactly(data, straight, tmp_path,
                                                                     how):
    proc = _spawn(data, tmp_path)
    _wait_for_checkpoint(proc, tmp_path, 5)
    os.kill(proc.pid, signal.SIGKILL if how == "kill-9" else signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    if how == "sigterm":
        assert proc.returncode == 0, output
        assert "stopped by signal" in output
        stopped = latest(tmp_path)[0]
        assert stopped >= 5 and stopped == max(read_metrics(tmp_path))  # saved where it stopped
    else:
        assert proc.returncode == -signal.SIGKILL
    s = train(get_preset("tiny"), small_train_config(), data, tmp_path, resume=True)
    assert s["step"] == 40
    assert _losses(tmp_path, range(1, 41)) == _losses(straight, range(1, 41))


def test_activation_checkpointing_changes_memory_not_the_losses(data, straight, tmp_path):
    train(get_preset("tiny"), small_train_config(activation_checkpointing=True, stop_at=5),
          data, tmp_path)
    a, b = read_metrics(tmp_path), read_metrics(straight)
    for s in range(1, 6):
        assert abs(a[s]["loss"] - b[s]["loss"]) <= 1e-6 * b[s]["loss"]


@pytest.mark.slow
def test_bf16_autocast_on_cpu_trains_like_fp32_and_resumes_bit_exactly(data, straight, tmp_path):
    """`precision="bf16"` really autocasts on CPU (losses differ from fp32 in the low digits),
    learns as well (within 2% at step 40), and its resume is as exact as fp32's."""
    full, part = tmp_path / "full", tmp_path / "part"
    train(get_preset("tiny"), small_train_config(precision="bf16"), data, full)
    train(get_preset("tiny"), small_train_config(precision="bf16", stop_at=20), data, part)
    train(get_preset("tiny"), small_train_config(precision="bf16"), data, part, resume=True)
    steps = range(1, 41)
    bf16, fp32 = _losses(full, steps), _losses(straight, steps)
    assert _losses(part, steps) == bf16
    assert bf16 != fp32 and abs(bf16[-1] - fp32[-1]) < 0.02 * fp32[-1]


def test_an_unknown_precision_is_a_clear_error(data, tmp_path):
    from llamaworks.errors import LlamaworksError

    with pytest.raises(LlamaworksError, match="precision must be auto, fp32 or bf16"):
        train(get_preset("tiny"), small_train_config(precision="fp16"), data, tmp_path)



def test_resuming_pretraining_from_a_fine_tuning_runs_folder_is_refused_and_changes_nothing(
        data, straight, tmp_path):
    """The trainers share one resume point: a folder whose newest checkpoint another trainer
    (SFT) wrote is refused by name, before anything is written."""
    from llamaworks.train import checkpoints as ckpt

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    d = ckpt.begin(out, 41)  # a newer, intact checkpoint of another trainer
    torch.save({"format": 1, "kind": "sft", "step": 41}, d / ckpt.STATE)
    ckpt.commit(out, 41, keep_last=100)
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match=r"is a sft checkpoint, not pretrain"):
        train(get_preset("tiny"), small_train_config(), data, out, resume=True)
    assert (out / "metrics.jsonl").read_bytes() == before
