"""LoRA (Hu et al., 2021) applied from outside the model, saved in PEFT's adapter format.

`apply_lora` swaps the target `nn.Linear`s for `LoRALinear` (frozen base + trainable low-rank
update B·A scaled by alpha/r), and a MoE layer's stacked experts for `LoRAExperts` (one update
per expert, `posttrain.lora_experts`) when gate/up/down are targets; `merge_lora` folds the
updates back into the plain modules.
Adapters are written as PEFT writes them (`adapter_config.json` + `adapter_model.safetensors`
with `base_model.model.<module>.lora_A.weight` names), so `peft.PeftModel.from_pretrained` on
the transformers model opens what we save, and `load_adapter` opens PEFT's adapters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from llamaworks.atomic import atomic_path, atomic_write_json
from llamaworks.checkpoint.experts import (
    PER_EXPERT_FAMILIES,
    expert_key,
    hf_module_name,
    parse_expert_key,
    rename,
)
from llamaworks.errors import CheckpointError
from llamaworks.model import Experts
from llamaworks.posttrain.lora_experts import PROJS as EXPERT_PROJS
from llamaworks.posttrain.lora_experts import LoRAExperts

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclass
class LoraConfig:
    """Rank, scaling (alpha / r), dropout on the LoRA input, and which linears get adapters
    (module names as in HF's Llama: q_proj ... down_proj; lm_head is never adapted)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: Sequence[str] = field(default_factory=lambda: ALL_LINEARS)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = set(self.target_modules) - set(ALL_LINEARS)
        if unknown:
            raise ValueError(f"unknown LoRA target modules {sorted(unknown)}; "
                             f"choose from {', '.join(ALL_LINEARS)}")
        self.target_modules = tuple(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Module):
    """y = base(x) + (dropout(x) A^T B^T) * scaling, with A Kaiming-uniform and B zero (so a
    fresh adapter changes nothing). The base weight stays frozen."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.r, self.scaling = r, alpha / r
        # fp32 even over a bf16 base: the optimizer updates stay exact, the matmuls are tiny.
        dev = next(iter([*base.parameters(), *base.buffers()])).device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    @property
    def weight(self) -> Tensor:  # code that reads `.weight` (dtype/device probes) still works
        return self.base.weight

    def delta(self) -> Tensor:
        """The dense update scaling * B @ A, shaped like the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        a, b = self.lora_A, self.lora_B
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        split = _tensor_parallel_split(getattr(self.base, "weight", None))  # None: quantized
        if split is not None:
            return y + self._split_delta(x, *split).to(y.dtype)
        return y + ((self.dropout(x) @ a.t() @ b.t()) * self.scaling).to(y.dtype)

    def _split_delta(self, x: Tensor, dim: int, group: Any, rank: int, tp: int) -> Tensor:
        """This rank's part of the update when the base is split by tensor parallelism
        (`train/tensor_parallel.py`). The adapter stays replicated: A and B whole and alike on
        every rank (r is small, so splitting them would save little, and the saved adapter,
        the optimizer and the RNG draws stay those of one process), each rank using the
        slice its base needs:
        - column-parallel base (weight split on dim 0; x whole, the output this rank's rows):
          (x A^T) B_mine^T with B_mine this rank's rows of B. x, A and B are each used whole
          for a share of the output, so their gradients are summed over the group.
        - row-parallel base (dim 1; x this rank's columns, the output whole): x_mine A_mine^T
          summed over the group is x A^T, then times B^T, whole and alike on every rank (B's
          gradient is already whole); A's is summed (each rank fills its columns).
        Dropout draws the mask of the whole input, as one process does, and keeps this rank's
        columns, so the random stream and the masks match a 1-rank run's."""
        from llamaworks.train.distributed import sum_grad_over, sum_over

        a, b = sum_grad_over(self.lora_A, group), self.lora_B
        if dim == 0:
            n = b.shape[0] // tp
            b = sum_grad_over(b, group)[rank * n:(rank + 1) * n]
            return (self.dropout(sum_grad_over(x, group)) @ a.t() @ b.t()) * self.scaling
        n = a.shape[1] // tp
        drop = self.dropout
        if isinstance(drop, nn.Dropout) and drop.training and drop.p > 0:
            mask = x.new_empty(*x.shape[:-1], a.shape[1]).bernoulli_(1 - drop.p)
            x = x * (mask[..., rank * n:(rank + 1) * n] * (1 / (1 - drop.p)))
        h = sum_over(x @ a[:, rank * n:(rank + 1) * n].t(), group)
        return (h @ b.t()) * self.scaling


def _tensor_parallel_split(w: Tensor | None) -> tuple[int, Any, int, int] | None:
    """(split dim, group, rank in it, its size) when `w` is a tensor-parallel shard (a DTensor
    sharded on a one-dimensional mesh, as a split base weight is inside the forward), else
    None."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(w, DTensor) or w.device_mesh.ndim != 1 or w.device_mesh.size() == 1:
        return None
    (place,) = w.placements
    if not isinstance(place, Shard):
        return None
    mesh = w.device_mesh
    return place.dim, mesh.get_group(), mesh.get_local_rank(), mesh.size()


def _whole(t: Tensor) -> Tensor:
    """`t`, or the full tensor of a DTensor (FSDP2's shards of a distributed run; a collective
    then: every rank calls it)."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            return t.full_tensor()
    return t


def lora_modules(model: nn.Module) -> Iterable[tuple[str, LoRALinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def expert_lora_modules(model: nn.Module) -> Iterable[tuple[str, LoRAExperts]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRAExperts))


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Swap every target linear for a LoRALinear and, where gate/up/down are targets, every
    MoE layer's experts for LoRAExperts (in place); freeze everything else. Experts are adapted
    in the families whose checkpoints store one tensor per expert (Mixtral, Qwen3-MoE), as PEFT
    does; Llama 4's fused experts are not (PEFT leaves them out of gate/up/down targets too:
    those adapt its dense layers and shared experts)."""
    model.requires_grad_(False)
    targets = [(n, m) for n, m in model.named_modules()
               if _is_linear(m) and n.rsplit(".", 1)[-1] in cfg.target_modules]
    projs = tuple(p for p in EXPERT_PROJS if p in cfg.target_modules)
    per_expert = getattr(getattr(model, "config", None), "family", None) in PER_EXPERT_FAMILIES
    experts = [(n, m) for n, m in model.named_modules()
               if type(m) is Experts] if projs and per_expert else []
    if not targets and not experts:
        raise ValueError(f"no linear layer named {cfg.target_modules} in the model")
    if experts and cfg.dropout:
        raise ValueError(f"LoRA dropout ({cfg.dropout}) cannot apply to experts (PEFT's expert "
                         "LoRA refuses it too): use dropout 0 for a mixture-of-experts model")
    for name, lin in targets:
        parent, child = _parent(model, name)
        new = LoRALinear(lin, cfg.r, cfg.alpha, cfg.dropout).train(lin.training)
        setattr(parent, child, new)
    for name, ex in experts:
        parent, child = _parent(model, name)
        setattr(parent, child, LoRAExperts(ex, cfg.r, cfg.alpha, projs).train(ex.training))
    return model


def _is_linear(m: nn.Module) -> bool:
    """An nn.Linear, or a quantized linear kept in blocks (QLoRA: `infer.quantize`'s layers, which
    have in/out features and `blocks`; the base stays frozen and quantized)."""
    return isinstance(m, nn.Linear) or (
        hasattr(m, "in_features") and hasattr(m, "out_features")
        and getattr(m, "blocks", None) is not None and not isinstance(m, LoRALinear))


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter on or off (off = the base model, e.g. GRPO's frozen reference)."""
    for _, m in [*lora_modules(model), *expert_lora_modules(model)]:
        m.enabled = enabled


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight and put the plain nn.Linear back."""
    for name, m in list(lora_modules(model)):
        if not isinstance(m.base, nn.Linear):
            raise ValueError(f"{name}: the base is quantized; merge the adapter into the "
                             "unquantized checkpoint (llamaworks merge --model BASE)")
        m.base.weight += m.delta().to(m.base.weight.dtype)
        parent, child = _parent(model, name)
        setattr(parent, child, m.base)
    for name, ex in list(expert_lora_modules(model)):
        parent, child = _parent(model, name)
        setattr(parent, child, ex.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter weights under PEFT's names (views of the parameters; in a distributed run their
    gathered full tensors, so every rank must call it)."""
    out = {}
    for name, m in lora_modules(model):
        name = hf_module_name(model.config, name) if hasattr(model, "config") else name
        out[f"{_PREFIX}{name}.lora_A.weight"] = _whole(m.lora_A.detach()).contiguous()
        out[f"{_PREFIX}{name}.lora_B.weight"] = _whole(m.lora_B.detach()).contiguous()
    for name, ex in expert_lora_modules(model):  # one pair per expert, the family's HF names
        layer = name.rsplit(".mlp.", 1)[0]
        for proj in ex.projs:
            a, b = ex.pair(proj)
            for e in range(ex.n_experts):
                key = _PREFIX + expert_key(model.config, layer, e, proj)
                out[f"{key}.lora_A.weight"] = a[e].detach().contiguous()
                out[f"{key}.lora_B.weight"] = b[e].detach().contiguous()
    return out


def save_adapter(model: nn.Module, cfg: LoraConfig, path: str | Path,
                 base_model: str | None = None, dtype: torch.dtype = torch.float32,
                 tensors: dict[str, Tensor] | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (atomic) into `path`; bf16
    halves the file (the update B·A is merged in fp32 either way). `tensors`: what
    `lora_state_dict(model)` returned, when a distributed run gathered it on every rank and
    one rank writes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).cpu() for k, v in (
        lora_state_dict(model) if tensors is None else tensors).items()}
    if not tensors:
        raise ValueError("the model has no LoRA layers to save")
    with atomic_path(path / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_json(path / CONFIG_NAME, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(_hf_targets(model, cfg.target_modules)), "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True, "modules_to_save": None, "use_rslora": False, "use_dora": False,
    })
    return path


# Mixtral checkpoints (and so PEFT adapters of them) name the expert projections w1 / w3 / w2.
_MIXTRAL_EXPERTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _hf_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Target module names as the family's HF checkpoint spells them (what PEFT matches)."""
    if getattr(getattr(model, "config", None), "family", None) != "mixtral":
        return list(targets)
    back = {v: k for k, v in _MIXTRAL_EXPERTS.items()}
    return [back.get(t, t) for t in targets]


def read_adapter(path: str | Path) -> tuple[LoraConfig, dict[str, Tensor], str | None]:
    """The config, tensors (PEFT names) and recorded base model of an adapter directory."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{path}: not a LoRA adapter (needs {CONFIG_NAME} and "
                              f"{WEIGHTS_NAME}; create one with `llamaworks finetune --lora`)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from e
    if raw.get("peft_type", "LORA") != "LORA" or raw.get("use_dora") or raw.get("use_rslora"):
        raise CheckpointError(f"{cfg_file}: only plain LoRA adapters are supported "
                              f"(peft_type LORA, no DoRA/rsLoRA)")
    targets = raw.get("target_modules") or ALL_LINEARS
    if isinstance(targets, str):  # PEFT allows a regex or "all-linear"
        targets = ALL_LINEARS
    targets = [_MIXTRAL_EXPERTS.get(t, t) for t in targets]
    cfg = LoraConfig(r=int(raw["r"]), alpha=float(raw.get("lora_alpha", raw["r"])),
                     dropout=float(raw.get("lora_dropout", 0.0)),
                     target_modules=[t for t in targets if t in ALL_LINEARS])
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"{weights}: unreadable safetensors file ({e})") from e
    return cfg, tensors, raw.get("base_model_name_or_path")


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | Path, merge: bool = True) -> nn.Module:
    """Attach the adapter in `path` to `model` (in place): merged into the weights (the fast
    path for inference) or as trainable LoRALinear layers (`merge=False`)."""
    cfg, tensors, _ = read_adapter(path)
    # Every rank/shape must fit before anything changes, so a bad adapter leaves the model intact.
    modules = dict(model.named_modules())
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    per_expert: dict[tuple[str, str], dict[int, tuple[Tensor, Tensor]]] = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[:-len(".lora_A.weight")].removeprefix(_PREFIX)
        if hasattr(model, "config"):  # the family's HF module names -> ours
            name = rename(model.config, name)
        parsed = parse_expert_key(name)
        if parsed is not None and tensors.get(key.replace("lora_A", "lora_B")) is not None:
            layer, e, proj = parsed
            per_expert.setdefault((layer, proj), {})[e] = (
                tensors[key], tensors[key.replace("lora_A", "lora_B")])
            continue
        lin = modules.get(name)
        a, b = tensors[key], tensors.get(key.replace("lora_A", "lora_B"))
        base = lin.base if isinstance(lin, LoRALinear) else lin
        if not isinstance(base, nn.Linear) or b is None or a.shape[0] != b.shape[1] \
                or a.shape[1] != base.in_features or b.shape[0] != base.out_features:
            raise CheckpointError(f"{path}: adapter tensor {key} does not fit this model "
                                  f"(module {name!r}, shapes {tuple(a.shape)}/"
                                  f"{None if b is None else tuple(b.shape)})")
        pairs[name] = (a, b)
    stacked = _stack_expert_pairs(modules, per_expert, path)
    if not pairs and not stacked:
        raise CheckpointError(f"{path}: the adapter holds no lora_A/lora_B tensors")
    _attach_expert_pairs(model, stacked, cfg, merge)
    for name, (a, b) in pairs.items():
        parent, child = _parent(model, name)
        lin = getattr(parent, child)
        base = lin.base if isinstance(lin, LoRALinear) else lin
        w = base.weight
        if merge:
            _add_update(w, ((b.to(torch.float32) @ a.to(torch.float32)) * cfg.scaling
                            ).to(w.dtype))
            continue
        new = LoRALinear(base, a.shape[0], cfg.alpha * a.shape[0] / cfg.r, cfg.dropout)
        new.train(base.training)
        new.lora_A.copy_(a)
        new.lora_B.copy_(b)
        setattr(parent, child, new)
    return model


def _add_update(w: Tensor, delta: Tensor) -> None:
    """w += delta (whole, as a weight's shape); a tensor-parallel shard (a DTensor base that
    `train.tensor_parallel.load_split` read) adds its own rows / columns of it, no collective."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(w, DTensor):
            w += distribute_tensor(delta, w.device_mesh, w.placements, src_data_rank=None)
            return
    w += delta


def _stack_expert_pairs(modules: dict[str, nn.Module],
                        per_expert: dict[tuple[str, str], dict[int, tuple[Tensor, Tensor]]],
                        path: Path | str) -> dict[str, dict[str, tuple[Tensor, Tensor]]]:
    """{experts module name: {proj: (A [E, r, in], B [E, out, r])}} from per-expert pairs,
    checked against the model's experts (all of them present, shapes fitting)."""
    out: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
    for (layer, proj), got in per_expert.items():
        name = f"{layer}.mlp.experts"
        ex = modules.get(name)
        base = ex.base if isinstance(ex, LoRAExperts) else ex
        if not isinstance(base, Experts) or sorted(got) != list(range(base.n_experts)):
            raise CheckpointError(f"{path}: adapter has LoRA for {len(got)} experts of {name}."
                                  f"{proj}, the model {getattr(base, 'n_experts', 0)} there")
        a = torch.stack([got[e][0] for e in range(base.n_experts)])
        b = torch.stack([got[e][1] for e in range(base.n_experts)])
        w = getattr(base, proj)
        if a.shape[1] != b.shape[2] or a.shape[2] != w.shape[2] or b.shape[1] != w.shape[1]:
            raise CheckpointError(f"{path}: expert LoRA of {name}.{proj} does not fit this model "
                                  f"(A {tuple(a.shape)}, B {tuple(b.shape)}, weight "
                                  f"{tuple(w.shape)})")
        out.setdefault(name, {})[proj] = (a, b)
    return out


def _attach_expert_pairs(model: nn.Module, stacked: dict[str, dict[str, tuple[Tensor, Tensor]]],
                         cfg: LoraConfig, merge: bool) -> None:
    for name, projs in stacked.items():
        parent, child = _parent(model, name)
        ex = getattr(parent, child)
        base = ex.base if isinstance(ex, LoRAExperts) else ex
        r = next(iter(projs.values()))[0].shape[1]
        if merge:
            for proj, (a, b) in projs.items():
                w = getattr(base, proj)
                w += (torch.bmm(b.float(), a.float()) * (cfg.alpha / cfg.r)).to(w.dtype)
            continue
        new = LoRAExperts(base, r, cfg.alpha * r / cfg.r, tuple(projs)).train(base.training)
        for proj, (a, b) in projs.items():
            new.pair(proj)[0].copy_(a)
            new.pair(proj)[1].copy_(b)
        setattr(parent, child, new)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child
