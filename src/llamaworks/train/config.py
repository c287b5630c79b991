"""`TrainConfig`: every trainer knob, with the LLaMA paper's defaults; filled from a recipe's
[train] section and then from CLI overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainConfig:
    lr: float = 3e-4                 # peak; the paper: 3e-4 (7B/13B), 1.5e-4 (33B/65B)
    min_lr_ratio: float = 0.1        # cosine decays to 10% of peak
    warmup_steps: int | None = None  # None: the paper's 2000, scaled to max_steps // 20 if fewer
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1        # matrices only; norms and embeddings excluded
    grad_clip: float = 1.0
    micro_batch: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    max_steps: int = 1000
    max_minutes: float | None = None
    stop_at: int | None = None       # exit (with a checkpoint) after this step; schedule unchanged
    eval_every: int = 100
    eval_rows: int = 64
    log_every: int = 10
    save_every: int = 100
    keep_last: int = 2
    seed: int = 0
    init_std: float = 0.02
    compile: bool = False
    # auto: bf16 autocast on CUDA, float32 on CPU (the paper's setup); "bf16": bf16 autocast on
    # any device (CPUs with AVX512-BF16/AMX run its matmuls several times faster); "fp32"
    precision: str = "auto"
    activation_checkpointing: bool = False
    # CPU: keep freed heap memory for the next step instead of unmapping it (glibc; see
    # train/allocator.py); False restores the default malloc behaviour
    reuse_memory: bool = True
    # mixture of experts (ignored by dense models): the Switch load-balancing loss, summed over
    # MoE layers, joins the backpropagated loss times this (0: off; logged loss stays pure LM)
    router_aux_loss_coef: float = 0.01
    # DeepSeek-V3's auxiliary-loss-free balancing: after each optimizer step every router's
    # correction bias moves by rate * sign(mean load - load_e); 0: off (needs router_bias)
    router_bias_rate: float = 0.0
    # expert parallelism for MoE models under torchrun: each rank holds E / N of every MoE
    # layer's experts, tokens travel by all-to-all (N must equal the world size; 1: off)
    expert_parallel: int = 1
    # tensor parallelism under torchrun: attention heads and MLP units of every block split over
    # groups of N consecutive ranks, FSDP2 over world / N of them (1: off; dense models only)
    tensor_parallel: int = 1
    peak_tflops: float | None = None  # for MFU; None = a guess from the device
    progress: bool = True

    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(2000, max(1, self.max_steps // 20))

    def updated(self, d: dict[str, Any], where: str = "[train]") -> TrainConfig:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{where}: unknown training option(s) {sorted(unknown)}; known: "
                             f"{', '.join(sorted(names))}")
        return dataclasses.replace(self, **d)
