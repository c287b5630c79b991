"""What pretraining, SFT and GRPO share around their step: the stop-signal handler (SIGINT /
SIGTERM -> save at the next step boundary and exit cleanly), the RNG states, and one trainer
state format (`trainer_state.pt` beside the weights or adapter in each checkpoint folder,
written and read by `train/checkpoints.py`).

The state is a dict of tensors, numbers, strings, lists and tuples only, saved with
`torch.save` and read back with `torch.load(weights_only=True)`, so loading one runs no code:
{"format": 1, "kind": "pretrain" | "sft" | "grpo", "step": optimizer steps done,
"optimizer": AdamW's state_dict, "scheduler": the LR schedule's, "rng": {"cpu", "cuda",
"python"}, "data": the trainer's data position (pretraining: seed and next step; SFT: the
shuffled order left and its random.Random; GRPO: the prompt sampler's random.Random)}."""

from __future__ import annotations

import contextlib
import random
import signal
from pathlib import Path
from typing import Any

import torch

from llamaworks.errors import CheckpointError
from llamaworks.train import checkpoints as ckpt

FORMAT = 1


class StopFlag:
    """SIGINT/SIGTERM set a flag (nothing is interrupted mid-step); the trainer saves at the end
    of the step and exits. Outside the main thread signals cannot be caught: the flag stays
    unset."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[s] = signal.signal(s, self._set)
        return self

    def _set(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def message(self, step: int) -> str:
        """What to print after stopping on a signal at `step`."""
        return (f"stopped by signal {self.signum or 'on another rank'} at step {step}; "
                "checkpoint saved, resume with --resume")


def rng_state() -> dict[str, Any]:
    """torch's CPU (and CUDA) generators and Python's `random`, as the state keeps them."""
    v, internal, gauss = random.getstate()
    st: dict[str, Any] = {"cpu": torch.get_rng_state(), "python": [v, list(internal), gauss]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (a state without "python" or "cuda" leaves those)."""
    torch.set_rng_state(st["cpu"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if "python" in st:
        random.setstate(py_rng_state(st["python"]))


def py_rng_state(saved: Any) -> tuple:
    """A `random.Random` state as `random.getstate()` gives it, from its saved list form."""
    v, internal, gauss = saved
    return int(v), tuple(int(x) for x in internal), gauss


def saved_py_rng(r: random.Random) -> list:
    """`r`'s state as lists (what the state file keeps; `py_rng_state` reverses it)."""
    v, internal, gauss = r.getstate()
    return [v, list(internal), gauss]


def trainer_state(kind: str, step: int, optimizer: dict[str, Any],
                  scheduler: torch.optim.lr_scheduler.LRScheduler, data: dict[str, Any],
                  **extra: Any) -> dict[str, Any]:
    """The one trainer-state dict (see the module docstring); `optimizer` is a state_dict
    ({} when a torchrun run keeps it sharded in DCP); `extra` adds trainer-specific entries
    (pretraining's router balance, "moe")."""
    return {"format": FORMAT, "kind": kind, "step": step, "optimizer": optimizer,
            "scheduler": scheduler.state_dict(), "rng": rng_state(), "data": data, **extra}


def load_optimizer(opt: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load a saved AdamW state, keeping this build's kernel choice (fused / foreach)."""
    opt.load_state_dict(saved)
    for g in opt.param_groups:
        for k in ("fused", "foreach"):
            if k in opt.defaults:
                g[k] = opt.defaults[k]


def resume_point(out: Path, kind: str) -> tuple[int, Path, dict[str, Any]] | None:
    """(step, folder, state) of the newest intact checkpoint under `out` (damaged newer ones
    skipped with a warning), None when there is none. CheckpointError when the state is
    another trainer's or from before this format (the old `sft_state.pt` / `grpo_state.pt`)."""
    ckpt.refuse_legacy(out)
    found = ckpt.newest_intact(out)
    if found is None:
        return None
    step, d = found
    state = ckpt.load_trainer_state(d / ckpt.STATE)
    got = state.get("kind", "pretrain") if isinstance(state, dict) else None
    if got != kind:
        raise CheckpointError(f"{d / ckpt.STATE} is a {got} checkpoint, not {kind}: resume a "
                              f"{kind} run from the folder it wrote, or pick a new --out")
    if state.get("format", FORMAT) != FORMAT:
        raise CheckpointError(f"{d / ckpt.STATE}: trainer state format {state.get('format')}, "
                              f"this version reads {FORMAT}")
    return step, d, state


def restore(state: dict[str, Any], opt: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """Load the optimizer, schedule position and RNG states from `state`; returns its data
    position for the trainer to restore."""
    load_optimizer(opt, state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["data"]
