"""The one checkpoint writer of pretraining, SFT and GRPO: `OUT/checkpoints/step_NNNNNN/` holds
the weights (a native checkpoint: config.json, model.safetensors in fp32, tokenizer; or a LoRA
adapter: adapter_config.json + adapter_model.safetensors) plus `trainer_state.pt` (optimizer,
schedule, RNG, data position: `train/skeleton.py`) or, under torchrun, a DCP sharded `dcp/`
folder. Each folder's `manifest.json` (sizes and sha256, `train/manifest.py`) is written after
its files; `OUT/latest.json` names the newest one and is written last; older folders beyond
`keep_last` are pruned. Every file is written atomically. A resume verifies folders newest first
and continues from the first intact one (`newest_intact`), so a crash mid-save or a damaged file
falls back to the one before."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llamaworks.atomic import atomic_path, atomic_write_json
from llamaworks.checkpoint.native import save_native
from llamaworks.config import ModelConfig
from llamaworks.errors import CheckpointError
from llamaworks.train.manifest import seal, unseal, verify

LATEST = "latest.json"
STATE = "trainer_state.pt"
# the per-trainer state files before the shared format (SFT's and GRPO's), refused on resume
LEGACY_STATES = ("sft_state.pt", "grpo_state.pt")
_STEP = re.compile(r"step_(\d+)")


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:06d}"


def begin(out: Path, step: int) -> Path:
    """The folder for `step`, unsealed: whatever a crash leaves in it now reads as damaged."""
    d = step_dir(out, step)
    d.mkdir(parents=True, exist_ok=True)
    unseal(d)
    return d


def commit(out: Path, step: int, keep_last: int) -> None:
    """Seal `step`'s folder, point latest.json at it, prune: the end of every save."""
    d = step_dir(out, step)
    seal(d)
    atomic_write_json(out / LATEST, {"step": step, "dir": str(d.relative_to(out))})
    prune(out, keep_last)


def save_trainer_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def write_checkpoint(out: Path, step: int, state: dict[str, Any] | None, keep_last: int,
                     weights: Callable[[Path], Any] | None = None) -> Path:
    """Unseal `step`'s folder, let `weights(folder)` write the weights (native or adapter),
    write the trainer state, seal, point latest.json at it, prune to `keep_last`."""
    d = begin(out, step)
    if weights is not None:
        weights(d)
    if state is not None:
        save_trainer_state(d / STATE, state)
    commit(out, step, keep_last)
    return d


def save_checkpoint(out: Path, step: int, cfg: ModelConfig, sd: dict[str, torch.Tensor],
                    tokenizer: Any, state: dict[str, Any] | None, keep_last: int) -> Path:
    """`write_checkpoint` with full native weights (fp32) + trainer state for `step`."""
    return write_checkpoint(out, step, state, keep_last, lambda d: save_native(
        d, cfg, sd, tokenizer=tokenizer, dtype=torch.float32))


def _step_dirs(out: Path) -> list[tuple[int, Path]]:
    root = out / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP.fullmatch(p.name))] if root.is_dir() else []
    return sorted(found)


def prune(out: Path, keep_last: int) -> None:
    dirs = _step_dirs(out)
    for _, old in dirs[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest(out: Path) -> tuple[int, Path] | None:
    """(step, folder) that latest.json names, or None when it is missing or unreadable."""
    try:
        d = json.loads((out / LATEST).read_text())
        return int(d["step"]), out / d["dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def newest_intact(out: Path, require: tuple[str, ...] = (STATE,)) -> tuple[int, Path] | None:
    """(step, folder) of the newest checkpoint whose files all match its manifest and which
    holds every file in `require`; each newer damaged one is named in a warning. None when
    there are no checkpoints; CheckpointError when there are some and none is intact."""
    skipped: list[str] = []
    for step, d in reversed(_step_dirs(out)):
        problem = verify(d, require)
        if problem is None:
            return step, d
        skipped.append(f"{d.name}: {problem}")
        warnings.warn(f"skipping damaged checkpoint {d}: {problem}", stacklevel=2)
    if skipped:
        raise CheckpointError(f"no intact checkpoint in {out / 'checkpoints'} "
                              f"({'; '.join(skipped)}); move the folder away to start over")
    return None


def refuse_legacy(out: Path) -> None:
    """CheckpointError when a checkpoint folder under `out` holds only a pre-skeleton state file
    (`sft_state.pt`, `grpo_state.pt`): its optimizer layout differs, so it is not resumed."""
    for _, d in reversed(_step_dirs(out)):
        old = [n for n in LEGACY_STATES if (d / n).is_file()]
        if old and not (d / STATE).is_file():
            raise CheckpointError(
                f"{d / old[0]} is the trainer state of llamaworks before the shared trainer "
                f"skeleton and cannot be resumed by this version: finish that run with the "
                f"version that wrote it, or move {out / 'checkpoints'} away and train again "
                f"(the adapter or model already at the top of {out} stays usable, e.g. with "
                f"--adapter)")


def load_trainer_state(path: Path) -> dict[str, Any]:
    """A state file written by `save_trainer_state` (weights_only: no code runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - intact by its manifest, yet not ours
        raise CheckpointError(f"{path}: cannot resume from it ({type(e).__name__}: {e})") from e
