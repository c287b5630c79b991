"""SFT and GRPO on the shared trainer skeleton: a run killed with SIGKILL mid-step, or stopped by
SIGTERM (finished at the step boundary, checkpointed, exited 0), then resumed, logs the same
losses / rewards at every step and ends with the same adapter as a straight run, bit for bit.
Every run is a fresh process with the same thread count (in-process and subprocess runs may
differ in the last bits, see test_train_moe's kill -9 test). GRPO samples its rollouts, so this
also checks that the RNG states travel in the checkpoint. Checkpoints from before the skeleton
(sft_state.pt / grpo_state.pt), or another trainer's, are refused with what to do.

Run as a script (`python tests/test_posttrain_resume.py sft|grpo OUT [--kill-at S --signal N]
[--resume]`) this file is the trainer those tests spawn: the tiny ChatML model of
posttrain_fixtures, fine-tuned on suite conversations (LoRA with dropout, so the torch RNG
matters) or GRPO-trained on the legacy arithmetic problems; `--kill-at S` sends signal N to
itself in the middle of step S (0-based), after the forward pass."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

SFT_STEPS, GRPO_STEPS, KILL_AT = 9, 8, 4


def _sft_run(out: Path, resume: bool, full: bool = False, stop_after: int | None = None,
             model: Any = None) -> dict[str, Any]:
    from posttrain_fixtures import suite_tokenizer, tiny_chat_model

    from llamaworks.posttrain import tasks as T
    from llamaworks.posttrain.lora import LoraConfig
    from llamaworks.posttrain.sft import SFTConfig, finetune

    tok = suite_tokenizer()
    convs = [{"messages": T.think_conversation(p), "tools": T.suite_schemas()}
             for p in T.suite(20, "train", kinds=["arithmetic"], seed=0)]
    cfg = SFTConfig(lr=3e-3, batch_size=3, max_steps=SFT_STEPS, eval_fraction=0.1, eval_every=3,
                    lora=None if full else LoraConfig(r=4, alpha=8, dropout=0.1))
    return finetune(tiny_chat_model(tok, std=0.1) if model is None else model, tok, convs, cfg,
                    out, progress=False, resume=resume, stop_after=stop_after)


def _grpo_run(out: Path, resume: bool) -> dict[str, Any]:
    from posttrain_fixtures import suite_tokenizer, tiny_chat_model

    from llamaworks.posttrain import grpo
    from llamaworks.posttrain import tasks as T
    from llamaworks.posttrain.lora import LoraConfig

    # A random model answers nothing correctly: reward a property of the sampled tokens
    # instead, so the rewards of a group differ and every step updates the adapter.
    grpo.reward = lambda p, r, bonus: (sum(r.ids) % 5) / 4
    tok = suite_tokenizer()
    cfg = grpo.GRPOConfig(group_size=3, prompts_per_step=2, steps=GRPO_STEPS, max_new=10,
                          grammar=False, save_every=2, lr=2e-2,
                          lora=LoraConfig(r=2, alpha=4, dropout=0.0))
    return grpo.train_grpo(tiny_chat_model(tok, std=0.1), tok, T.problems(30, "train", 1), cfg,
                           out, progress=False, resume=resume)


def _signal_mid_step(which: str, kill_at: int, signum: int) -> None:
    """Send `signum` to this process inside step `kill_at`, after its forward pass."""
    if which == "sft":
        from llamaworks.posttrain.sft import SFTTrainer

        loss = SFTTrainer.loss

        def patched(self, batch):
            got = loss(self, batch)
            if self.model.training and self.sched.last_epoch == kill_at:
                os.kill(os.getpid(), signum)
            return got

        SFTTrainer.loss = patched
    else:
        from llamaworks.posttrain import grpo

        solve = grpo.solve

        def rollouts(*args, seed, **kw):
            got = solve(*args, seed=seed, **kw)
            if seed == kill_at:  # step s is sampled with seed cfg.seed * 100_003 + s, seed 0
                os.kill(os.getpid(), signum)
            return got

        grpo.solve = rollouts


def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("which", choices=["sft", "grpo"])
    p.add_argument("out", type=Path)
    p.add_argument("--kill-at", type=int)
    p.add_argument("--signal", type=int, default=int(signal.SIGKILL))
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    if a.kill_at is not None:
        _signal_mid_step(a.which, a.kill_at, a.signal)
    run = _sft_run if a.which == "sft" else _grpo_run
    print(json.dumps({k: v for k, v in run(a.out, a.resume).items() if k != "config"}))
    return 0


# -- the tests --------------------------------------------------------------------------------

def _spawn(which: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run([sys.executable, __file__, which, str(out), *extra],
                          capture_output=True, text=True, timeout=600, env=env)


def _rows(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    runs = {}
    for which in ("sft", "grpo"):
        out = tmp_path_factory.mktemp(f"straight_{which}")
        r = _spawn(which, out)
        assert r.returncode == 0, r.stdout + r.stderr
        runs[which] = out
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill-9", "sigterm"])
@pytest.mark.parametrize("which", ["sft", "grpo"])
def test_a_killed_or_stopped_run_resumes_bit_exactly(straight, tmp_path, which, how):
    from llamaworks.train.checkpoints import latest

    total = SFT_STEPS if which == "sft" else GRPO_STEPS
    signum = signal.SIGKILL if how == "kill-9" else signal.SIGTERM
    out = tmp_path / "run"
    r = _spawn(which, out, "--kill-at", str(KILL_AT), "--signal", str(int(signum)))
    rows = _rows(out)
    if how == "kill-9":
        assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
        assert latest(out)[0] < KILL_AT + 1 and max(x["step"] for x in rows) == KILL_AT
    else:  # the step in flight finished, was checkpointed, and the run exited cleanly
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"stopped by signal {int(signum)} at step {KILL_AT + 1}" in r.stdout
        assert latest(out)[0] == KILL_AT + 1 and max(x["step"] for x in rows) == KILL_AT + 1
        assert json.loads(r.stdout.strip().splitlines()[-1])["stopped_by_signal"] == signum
    r = _spawn(which, out, "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    got, want = _rows(out), _rows(straight[which])
    assert [x["step"] for x in got] == [x["step"] for x in want] and want[-1]["step"] == total
    assert got == want  # losses (GRPO: rewards, accuracy, KL, loss) and LRs at every step
    a, b = _adapter(out), _adapter(straight[which])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and b[k].abs().max() > 0 for k in b)  # it trained


@pytest.mark.slow
def test_full_fine_tuning_resumes_bit_exactly_from_the_native_weights_it_saved(tmp_path):
    from posttrain_fixtures import suite_tokenizer, tiny_chat_model

    from llamaworks.checkpoint import load_state_dict

    whole = tiny_chat_model(suite_tokenizer(), std=0.1)
    _sft_run(tmp_path / "whole", False, full=True, model=whole)
    _sft_run(tmp_path / "part", False, full=True, stop_after=3)
    assert (tmp_path / "part" / "checkpoints" / "step_000003" / "model.safetensors").is_file()
    resumed = tiny_chat_model(suite_tokenizer(), std=0.1)
    assert _sft_run(tmp_path / "part", True, full=True, model=resumed)["steps"] == SFT_STEPS
    assert _rows(tmp_path / "part") == _rows(tmp_path / "whole")
    a, b = dict(whole.named_parameters()), dict(resumed.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    _, saved, _ = load_state_dict(tmp_path / "part")  # the final export: the resumed weights
    assert torch.equal(saved["model.norm.weight"], b["model.norm.weight"])
    assert not torch.equal(b["model.norm.weight"], torch.ones_like(b["model.norm.weight"]))


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_a_checkpoints_adapter_restores_into_the_live_lora_parameters_exactly(tmp_path, preset):
    """restore_weights copies a saved adapter (per-expert pairs under the HF names on a MoE
    model) back into the very parameters the optimizer holds; another rank is refused."""
    from llamaworks.errors import CheckpointError
    from llamaworks.posttrain.lora import LoraConfig, apply_lora, lora_state_dict
    from llamaworks.posttrain.sft import restore_weights, save_weights

    cfg = LoraConfig(r=2, alpha=4, dropout=0.0)
    trained = apply_lora(_model(preset), cfg)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_()
    save_weights(trained, cfg, tmp_path)
    fresh = apply_lora(_model(preset), cfg)
    held = [p for p in fresh.parameters() if p.requires_grad]
    restore_weights(fresh, cfg, tmp_path)
    want, got = lora_state_dict(trained), lora_state_dict(fresh)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert any(".experts.7." in k for k in want) == (preset == "tiny-moe")
    assert [p for p in fresh.parameters() if p.requires_grad] == held  # the same objects
    with pytest.raises(CheckpointError, match="another adapter"):
        restore_weights(apply_lora(_model(preset), LoraConfig(r=4, alpha=8, dropout=0.0)),
                        LoraConfig(r=4, alpha=8, dropout=0.0), tmp_path)


def _model(preset: str) -> Any:
    from llamaworks.config import get_preset
    from llamaworks.model import Llama

    m = Llama(get_preset(preset, vocab_size=259), device="meta")
    m.to_empty(device="cpu")
    m.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    return m


def _sealed_folder(out: Path, step: int, name: str, payload: Any) -> None:
    from llamaworks.train import checkpoints as ckpt

    d = ckpt.begin(out, step)
    torch.save(payload, d / name)
    ckpt.commit(out, step, keep_last=2)


@pytest.mark.parametrize("name", ["sft_state.pt", "grpo_state.pt"])
def test_a_state_from_before_the_skeleton_is_refused_with_what_to_do(tmp_path, name):
    from llamaworks.errors import CheckpointError
    from llamaworks.train.skeleton import resume_point

    _sealed_folder(tmp_path, 4, name, {"step": 4, "trainable": {}})
    with pytest.raises(CheckpointError, match=rf"{name} is the trainer state of llamaworks "
                       r"before the shared trainer skeleton.*move .*checkpoints away"):
        resume_point(tmp_path, "sft" if name.startswith("sft") else "grpo")


def test_another_trainers_checkpoint_is_refused(tmp_path):
    from llamaworks.errors import CheckpointError
    from llamaworks.train.checkpoints import STATE
    from llamaworks.train.skeleton import resume_point

    _sealed_folder(tmp_path, 3, STATE, {"format": 1, "kind": "grpo", "step": 3})
    with pytest.raises(CheckpointError, match="is a grpo checkpoint, not sft"):
        resume_point(tmp_path, "sft")
    assert resume_point(tmp_path, "grpo")[0] == 3
    assert resume_point(tmp_path / "empty", "grpo") is None


def test_the_stop_flag_turns_sigterm_and_sigint_into_a_flag_and_restores_the_handlers():
    from llamaworks.train.skeleton import StopFlag

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    for s in (signal.SIGTERM, signal.SIGINT):
        with StopFlag() as stop:
            assert stop.signum is None
            os.kill(os.getpid(), s)  # delivered to the main thread before kill returns here
            assert stop.signum == s
        assert "resume with --resume" in stop.message(7)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
