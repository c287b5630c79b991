"""Write our native checkpoint = the HF layout, so transformers and llama.cpp tools open it.

`config.json`, `model.safetensors` (or shards + `model.safetensors.index.json` above
`max_shard_bytes`), `generation_config.json`, and the tokenizer files when a tokenizer is given.
Every file is written to a temporary name in the same directory and renamed into place, so a crash
never leaves a half-written checkpoint behind a valid name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llamaworks.atomic import atomic_path, atomic_write_json
from llamaworks.config import ModelConfig

DEFAULT_SHARD_BYTES = 5 * 1024**3


def _atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def save_native(directory: str | Path, cfg: ModelConfig, state_dict: dict[str, torch.Tensor],
                tokenizer: Any | None = None, dtype: torch.dtype | None = None,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Save weights (HF names) + config (+ tokenizer) to `directory`; returns it."""
    from llamaworks.checkpoint.experts import split_experts

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in split_experts(cfg, state_dict).items():
        if cfg.tie_embeddings and k == "lm_head.weight":
            continue  # tied: transformers re-ties it from the embedding
        v = v.detach().to("cpu")
        tensors[k] = (v.to(dtype) if dtype is not None and v.is_floating_point() else v
                      ).contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    index_path = d / "model.safetensors.index.json"
    written: set[str] = set()
    if len(shards) == 1:
        _atomic_save_safetensors(d / "model.safetensors", shards[0])
        index_path.unlink(missing_ok=True)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save_safetensors(d / name, shard)
            weight_map.update(dict.fromkeys(shard, name))
            written.add(name)
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        atomic_write_json(index_path, {"metadata": {"total_size": total},
                                       "weight_map": weight_map})
        (d / "model.safetensors").unlink(missing_ok=True)
    for stale in d.glob("model-?????-of-?????.safetensors"):  # from an earlier save's sharding
        if stale.name not in written:
            stale.unlink()
    first = next(iter(tensors.values()))
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = str(first.dtype).removeprefix("torch.")
    atomic_write_json(d / "config.json", hf)
    atomic_write_json(d / "generation_config.json", {
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
    })
    if tokenizer is not None:
        tokenizer.save(d)
    return d
