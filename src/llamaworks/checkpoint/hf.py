"""HF / native directories: `config.json` + `model.safetensors` (or shards with an index).

Our native format *is* this layout, so one reader serves checkpoints from transformers, from
`llamaworks pretrain`/`finetune`, and from `convert`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from llamaworks.config import ModelConfig
from llamaworks.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
LEGACY_BIN = "pytorch_model.bin"
# Buffers some older exports carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# `iter_tensors(part=)`: (HF name, stored shape) -> the index of the part to read (a tuple of
# slices, one per dimension), or None for the whole tensor.
Part = Callable[[str, tuple[int, ...]], tuple[slice, ...] | None]


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    try:
        return ModelConfig.from_hf_dict(read_json(path), source=str(path))
    except (TypeError, ValueError) as e:  # e.g. a null size, or heads that do not divide
        raise CheckpointError(f"{path}: invalid model config ({e})") from None


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files holding the weights (one, or the shards an index names)."""
    if (directory / INDEX).exists():
        index = read_json(directory / INDEX)
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{directory / INDEX}: no 'weight_map' in the index")
        names = list(dict.fromkeys(wm.values()))
        for name in names:
            if not isinstance(name, str) or Path(name).name != name:
                raise CheckpointError(f"{directory / INDEX}: shard name {name!r} is not a plain "
                                      "file name in this directory")
        files = [directory / f for f in names]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: shard listed in {INDEX} is missing")
        return files
    if (directory / SINGLE).exists():
        return [directory / SINGLE]
    if (directory / LEGACY_BIN).exists():
        return [directory / LEGACY_BIN]
    raise CheckpointError(f"{directory}: no weights found (expected {SINGLE}, {INDEX} with "
                          f"shards, or {LEGACY_BIN})")


def torch_load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """`torch.load(weights_only=True)`: a pickle that carries code is refused, never run."""
    import pickle
    import re

    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # pre-zip (legacy) torch files cannot be memory-mapped
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" (it references {found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: refused: the pickle holds more than tensors{what}; "
                              "llamaworks reads weights with torch.load(weights_only=True) "
                              "only. Convert the file where you trust it, or use safetensors"
                              ) from None
    except Exception as e:  # noqa: BLE001 - truncated zip, not a torch file, ...
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CheckpointError(f"{path}: cannot read weights: truncated or corrupt torch file "
                              f"({type(e).__name__}: {first})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return sd


def _file_tensors(path: Path, part: Part | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of one weight file: a `.bin` through the checked pickle loader, safetensors
    one tensor at a time (`safe_open`, memory-mapped). Where `part(key, shape)` gives an index,
    only that part is read, into its own storage (`get_slice`; of a `.bin`, a copy of that part
    of the mapped tensor)."""
    if path.suffix == ".bin":
        for key, t in torch_load_tensors(path).items():
            idx = part(key, tuple(t.shape)) if part is not None else None
            yield key, t if idx is None else t[idx].clone(memory_format=torch.contiguous_format)
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if part is None:
                    yield key, f.get_tensor(key)
                    continue
                sl = f.get_slice(key)
                idx = part(key, tuple(sl.get_shape()))
                # a slice is a view of the mapped file's whole tensor: copied into its own
                yield key, f.get_tensor(key) if idx is None else \
                    sl[idx].clone(memory_format=torch.contiguous_format)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})"
                              ) from None


def _hf_name(key: str) -> str:
    """The HF model name of a stored key (a bare `LlamaModel` export's given `model.`)."""
    return key if key.startswith(("model.", "lm_head.")) else "model." + key


def iter_tensors(directory: Path, cfg: ModelConfig, part: Part | None = None
                 ) -> Iterator[tuple[Path, str, str, torch.Tensor]]:
    """(file, key as stored, HF model name, tensor) of every weight to load, one at a time:
    recomputed buffers and a tied model's `lm_head.weight` skipped, a bare `LlamaModel`
    export's names given the `model.` prefix, a MoE layer's per-expert tensors yielded as one
    stacked tensor once the last has been read (see `checkpoint.experts`). With `part`, a
    tensor for which `part(HF name, stored shape)` returns an index is read as that part only
    (tensor-parallel ranks' rows or columns, `train.tensor_parallel.load_split`); the others
    whole."""
    from llamaworks.checkpoint.experts import Stacker

    stacker = Stacker(cfg, str(directory))
    named = None if part is None else (lambda key, shape: part(_hf_name(key), shape))
    for f in weight_files(directory):
        for key, t in _file_tensors(f, named):
            if key.endswith(_IGNORED_SUFFIXES):
                continue
            name = _hf_name(key)
            if cfg.tie_embeddings and name == "lm_head.weight":
                continue
            for name, t in stacker.add(name, t):  # noqa: B020 - one in, zero or one out
                yield f, key, name, t
    stacker.finish()


def load_hf_dir(directory: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, HF-named state dict in the stored dtypes)."""
    d = Path(directory)
    cfg = read_config(d)
    return cfg, {name: t for _, _, name, t in iter_tensors(d, cfg)}
