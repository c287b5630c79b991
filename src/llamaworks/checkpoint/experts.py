"""Expert weights between the families' HF files and our stacked layout.

The model holds each MoE layer's experts stacked (`mlp.experts.gate_proj` [E, I, dim], `up_proj`,
`down_proj` [E, dim, I]), as GGUF stores them and grouped kernels read them. HF checkpoints store
one tensor per expert under each family's names: Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2`
(gate / up / down) and `block_sparse_moe.gate`, Qwen3-MoE `mlp.experts.{e}.gate_proj/up_proj/
down_proj` and `mlp.gate`; Llama 4 keeps them fused under `feed_forward.`: `experts.gate_up_proj`
[E, dim, 2I] and `experts.down_proj` [E, I, dim] (input-major, for `bmm`), `router`,
`shared_expert`. `Stacker` turns a stream of file tensors into model tensors (each
layer's experts gathered, then stacked); `split_experts` does the reverse for saving.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from llamaworks.config import ModelConfig
from llamaworks.errors import CheckpointError

PROJS = ("gate_proj", "up_proj", "down_proj")
PER_EXPERT_FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3")  # one tensor per expert
_MIXTRAL = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                         r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")


def _family_prefix(cfg: ModelConfig) -> str:
    return "block_sparse_moe" if cfg.family == "mixtral" else "mlp"


def rename(cfg: ModelConfig, name: str) -> str:
    """A non-expert HF name in our spelling (Mixtral's router lives under `mlp.` here, Llama 4's
    feed-forward is `mlp` with the router as `gate`)."""
    if cfg.family == "mixtral":
        return name.replace(".block_sparse_moe.gate.", ".mlp.gate.")
    if cfg.family == "llama4_text":
        return name.replace(".feed_forward.router.", ".mlp.gate.").replace(
            ".feed_forward.", ".mlp.")
    if cfg.family == "deepseek_v3":
        return name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")
    return name


def hf_module_name(cfg: ModelConfig, name: str) -> str:
    """Our module name in the family's HF spelling (the inverse of `rename` for modules other
    than the stacked experts): Llama 4's `mlp.` is `feed_forward.`, its `mlp.gate` `router`."""
    if cfg.family == "llama4_text":
        name = re.sub(r"\.mlp\.gate$", ".feed_forward.router", name)
        return name.replace(".mlp.", ".feed_forward.")
    if cfg.family == "mixtral":
        return re.sub(r"\.mlp\.gate$", ".block_sparse_moe.gate", name)
    if cfg.family == "deepseek_v3":
        return name.replace(".mlp.shared_expert.", ".mlp.shared_experts.")
    return name


def _unfuse_llama4(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
    """Llama 4's fused, input-major expert tensors as our stacked ones (None: not one)."""
    m = re.match(r"^(model\.layers\.\d+)\.feed_forward\.experts\.(gate_up_proj|down_proj)$", name)
    if m is None:
        return None
    key = f"{m.group(1)}.mlp.experts."
    if m.group(2) == "down_proj":  # [E, I, dim] -> [E, dim, I]
        return [(key + "down_proj", t.transpose(1, 2).contiguous())]
    gate, up = t.chunk(2, dim=-1)  # [E, dim, 2I]: gate columns first
    return [(key + "gate_proj", gate.transpose(1, 2).contiguous()),
            (key + "up_proj", up.transpose(1, 2).contiguous())]


def _layer(name: str) -> int:
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    return -1 if m is None else int(m.group(1))


class Stacker:
    """Feed (name, tensor) pairs; get back (model name, tensor) pairs with each layer's
    per-expert tensors replaced by one stacked tensor once all E of them have arrived."""

    def __init__(self, cfg: ModelConfig, source: str):
        self.cfg, self.source = cfg, source
        self.pending: dict[str, dict[int, torch.Tensor]] = {}

    def add(self, name: str, t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if self.cfg.family == "deepseek_v3" and _layer(name) >= self.cfg.n_layers:
            return  # a multi-token-prediction layer: not part of the model (as transformers)
        fused = _unfuse_llama4(name, t) if self.cfg.family == "llama4_text" else None
        if fused is not None:
            yield from fused
            return
        m = _PER_EXPERT.match(name) if self.cfg.n_experts else None
        if m is None:
            yield rename(self.cfg, name), t
            return
        layer, e, proj = m.group(1), int(m.group(2)), _MIXTRAL.get(m.group(3), m.group(3))
        if e >= self.cfg.n_experts:
            raise CheckpointError(f"{self.source}: {name}: expert {e} but the config has "
                                  f"{self.cfg.n_experts}")
        key = f"{layer}.mlp.experts.{proj}"
        got = self.pending.setdefault(key, {})
        got[e] = t
        if len(got) == self.cfg.n_experts:
            del self.pending[key]
            yield key, torch.stack([got[i] for i in range(self.cfg.n_experts)])

    def finish(self) -> None:
        """Raise if some layer's experts never all arrived."""
        if self.pending:
            key, got = next(iter(self.pending.items()))
            missing = sorted(set(range(self.cfg.n_experts)) - set(got))
            raise CheckpointError(f"{self.source}: weights do not match the config: {key} is "
                                  f"missing experts {missing[:8]}")


def stack_experts(cfg: ModelConfig, pairs: Iterable[tuple[str, torch.Tensor]], source: str
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """`Stacker` over a whole stream."""
    stacker = Stacker(cfg, source)
    for name, t in pairs:
        yield from stacker.add(name, t)
    stacker.finish()


def expert_key(cfg: ModelConfig, layer: str, e: int, proj: str) -> str:
    """HF module name of expert `e`'s `proj` (gate_proj/up_proj/down_proj) in `layer`
    ("model.layers.3"): what PEFT adapters and checkpoints of the family call it."""
    if cfg.family == "mixtral":
        proj = {v: k for k, v in _MIXTRAL.items()}[proj]
    return f"{layer}.{_family_prefix(cfg)}.experts.{e}.{proj}"


def parse_expert_key(name: str) -> tuple[str, int, str] | None:
    """(layer, expert, our proj name) of an HF per-expert module name, else None."""
    m = _PER_EXPERT.match(name + ".weight")
    return None if m is None else (m.group(1), int(m.group(2)),
                                   _MIXTRAL.get(m.group(3), m.group(3)))


def split_experts(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in the family's HF file names: stacked experts split into one tensor per
    expert, Mixtral's `mlp.` renamed `block_sparse_moe.`. Dense models pass through."""
    if not cfg.n_experts:
        return sd
    if cfg.family == "llama4_text":
        return _fuse_llama4(sd)
    prefix = _family_prefix(cfg)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = re.match(r"^(model\.layers\.\d+)\.mlp\.(experts\.(gate_proj|up_proj|down_proj)|"
                     r"gate\.weight)$", k)
        if m is None:
            out[hf_module_name(cfg, k)] = v
        elif m.group(3) is None:
            out[f"{m.group(1)}.{prefix}.gate.weight"] = v
        else:
            for e in range(v.shape[0]):
                out[expert_key(cfg, m.group(1), e, m.group(3)) + ".weight"] = v[e]
    return out


def _fuse_llama4(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in Llama 4's file names and fused, input-major expert layout."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = re.match(r"^(model\.layers\.\d+)\.mlp\.(.*)$", k)
        if m is None:
            out[k] = v
            continue
        layer, rest = m.groups()
        if rest == "experts.gate_proj":
            up = sd[f"{layer}.mlp.experts.up_proj"]
            out[f"{layer}.feed_forward.experts.gate_up_proj"] = torch.cat(
                (v.transpose(1, 2), up.transpose(1, 2)), dim=-1).contiguous()
        elif rest == "experts.down_proj":
            out[f"{layer}.feed_forward.experts.down_proj"] = v.transpose(1, 2).contiguous()
        elif rest != "experts.up_proj":
            rest = "router.weight" if rest == "gate.weight" else rest
            out[f"{layer}.feed_forward.{rest}"] = v
    return out
