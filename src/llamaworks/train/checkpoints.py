"""Training checkpoints: `OUT/checkpoints/step_NNNNNN/` holds a native checkpoint (config.json,
model.safetensors in fp32, tokenizer) plus `trainer_state.pt` (optimizer, scheduler, RNG, data
position) or, under torchrun, a DCP sharded `dcp/` folder. `OUT/latest.json` names the newest
complete one and is written last, atomically, so a crash mid-save leaves the previous one valid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from llamaworks.atomic import atomic_path, atomic_write_json
from llamaworks.checkpoint.native import save_native
from llamaworks.config import ModelConfig

LATEST = "latest.json"


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:06d}"


def save_trainer_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def save_checkpoint(out: Path, step: int, cfg: ModelConfig, sd: dict[str, torch.Tensor],
                    tokenizer: Any, state: dict[str, Any] | None, keep_last: int) -> Path:
    """Write the native weights + trainer state for `step`, point latest.json at it, prune."""
    d = step_dir(out, step)
    save_native(d, cfg, sd, tokenizer=tokenizer, dtype=torch.float32)
    if state is not None:
        save_trainer_state(d / "trainer_state.pt", state)
    atomic_write_json(out / LATEST, {"step": step, "dir": str(d.relative_to(out))})
    prune(out, keep_last)
    return d


def prune(out: Path, keep_last: int) -> None:
    dirs = sorted((out / "checkpoints").glob("step_*"))
    for old in dirs[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest(out: Path) -> tuple[int, Path] | None:
    """(step, folder) of the newest complete checkpoint, or None."""
    p = out / LATEST
    if not p.exists():
        return None
    d = json.loads(p.read_text())
    return int(d["step"]), out / d["dir"]


def load_trainer_state(d: Path) -> dict[str, Any]:
    return torch.load(d / "trainer_state.pt", map_location="cpu", weights_only=True)
