"""Check a state dict against the shapes a `ModelConfig` implies (used by loading and export)."""

from __future__ import annotations

import torch

from llamaworks.config import ModelConfig
from llamaworks.errors import CheckpointError


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape for `cfg` (no `lm_head.weight` when embeddings are tied)."""
    from llamaworks.model import Llama

    model = Llama(cfg, device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def check_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor], source: str) -> None:
    """Raise `CheckpointError` naming `source` if names or shapes do not match `cfg`."""
    expected = expected_shapes(cfg)
    given = set(sd)
    if cfg.tie_embeddings:
        given.discard("lm_head.weight")  # a tied copy is harmless; it is re-tied on load
    missing = sorted(set(expected) - given)
    unexpected = sorted(given - set(expected))
    if missing or unexpected:
        parts = [f"{label} {names[:4]}{f' (+{len(names) - 4} more)' if len(names) > 4 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise CheckpointError(f"{source}: weights do not match the config: {'; '.join(parts)}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{source}: tensor {k} has shape {tuple(sd[k].shape)}, the "
                                  f"config implies {shape}")
