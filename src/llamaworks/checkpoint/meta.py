"""Meta's original layout: `params.json` + `consolidated.NN.pth` (model-parallel shards).

Shards are read with `torch.load(weights_only=True)` (never unpickling code), merged along each
weight's model-parallel dimension, renamed to HF names, and Q/K rows are converted from Meta's
interleaved rotary layout to HF's half-split layout.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llamaworks.checkpoint.gguf import unpermute_qk
from llamaworks.checkpoint.hf import read_json, torch_load_tensors
from llamaworks.checkpoint.shapes import check_state_dict
from llamaworks.config import ModelConfig
from llamaworks.errors import CheckpointError

# Meta name -> (HF name, concat dim across model-parallel shards; None = replicated).
_LAYER = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_GLOBAL = {
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
    "tok_embeddings.weight": ("model.embed_tokens.weight", "embed"),
}


def shard_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{directory}: no consolidated.NN.pth files next to params.json")
    return files


def _merge(name: str, parts: list[torch.Tensor], dim: int | str | None, cfg_dim: int,
           source: Path) -> torch.Tensor:
    if len(parts) == 1 or dim is None:
        return parts[0]
    if dim == "embed":  # Llama 1/2 split the embedding width, Llama 3 the vocabulary
        dim = 1 if parts[0].dim() == 2 and parts[0].shape[1] * len(parts) == cfg_dim else 0
    try:
        return torch.cat(parts, dim=dim)
    except (RuntimeError, IndexError) as e:
        shapes = [tuple(t.shape) for t in parts]
        raise CheckpointError(f"{source}: cannot merge the shards of {name!r} along dim {dim} "
                              f"(shapes {shapes}): {e}") from None


def load_meta_dir(directory: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, HF-named state dict) from `params.json` + `consolidated.NN.pth`."""
    d = Path(directory)
    params_path = d / "params.json"
    params = read_json(params_path)
    try:
        dim = int(params["dim"])
    except KeyError:
        raise CheckpointError(f"{params_path}: missing required key 'dim'") from None
    except (TypeError, ValueError):
        raise CheckpointError(f"{params_path}: 'dim' is not an integer") from None
    files = shard_files(d)
    shards = [torch_load_tensors(f) for f in files]
    keys = [k for k in shards[0] if not k.startswith("rope.freqs")]
    for f, s in zip(files[1:], shards[1:], strict=True):
        if set(k for k in s if not k.startswith("rope.freqs")) != set(keys):
            raise CheckpointError(f"{f}: holds different tensors than {files[0].name}")
    sd: dict[str, torch.Tensor] = {}
    for k in keys:
        if k in _GLOBAL:
            hf, cat_dim = _GLOBAL[k]
        elif k.startswith("layers.") and k.count(".") >= 2 and k.split(".", 2)[2] in _LAYER \
                and k.split(".")[1].isdigit():
            i, rest = k.split(".", 2)[1:]
            hf, cat_dim = _LAYER[rest]
            hf = f"model.layers.{int(i)}.{hf}"
        else:
            raise CheckpointError(f"{files[0]}: unexpected tensor {k!r} in a Meta Llama "
                                  "checkpoint")
        sd[hf] = _merge(k, [s[k] for s in shards], cat_dim, dim, d)
    if "model.embed_tokens.weight" not in sd:
        raise CheckpointError(f"{files[0]}: no 'tok_embeddings.weight' tensor")
    vocab = sd["model.embed_tokens.weight"].shape[0]
    try:
        cfg = ModelConfig.from_meta_params(params, vocab_size=vocab)
    except KeyError as e:
        raise CheckpointError(f"{params_path}: missing required key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{params_path}: invalid ({e})") from None
    cfg.tie_embeddings = "lm_head.weight" not in sd
    gate = sd.get("model.layers.0.mlp.gate_proj.weight")
    if gate is not None and gate.shape[0] != cfg.hidden_dim:
        cfg.hidden_dim = gate.shape[0]  # trust the weights over the multiple_of rule
    check_state_dict(cfg, sd, str(d))
    for name, w in list(sd.items()):
        if name.endswith("q_proj.weight"):
            sd[name] = unpermute_qk(w, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            sd[name] = unpermute_qk(w, cfg.n_kv_heads)
    return cfg, sd
