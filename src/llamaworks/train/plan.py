"""`llamaworks plan`: how many GPUs, in which layout, and how many days a pretraining run takes.

Pure arithmetic on a `ModelConfig` (no torch.distributed, no GPU): parameters, memory per GPU
under a searched FSDP x TP x EP (x PP) layout, tokens/s at a stated MFU, days for D tokens.

Memory model, per GPU (bytes; GB below means 1e9 bytes):
- Persistent, sharded over every GPU that holds a copy of the stage (FSDP2 with
  MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), as `train/distributed.py` sets it:
  the sharded parameters stay fp32 and are the master copy): 4 (fp32 params) + 4 (fp32 grads)
  + 8 (AdamW exp_avg, exp_avg_sq in fp32) = 16 bytes per parameter, ZeRO's mixed-precision
  Adam figure.
- Transient, unsharded bf16: the root (embeddings, output) held through forward and backward
  (FSDP2 does not reshard the root after forward) and two blocks (the current one and the
  prefetched next); in backward a block's bf16 grads plus their fp32 reduce-scatter input and
  the root's bf16 grads.
- Activations: what eager autograd saves per token per layer for this code (`model.py`, bf16),
  `activation_bytes`; with activation checkpointing (per block, `apply_activation_checkpointing`)
  only each block's bf16 input plus one block's activations being recomputed. The fused loss
  (`train/loss.py`) adds its fp32 output-weight gradient, the hidden-state gradient and one chunk
  of logits.
- A layout fits when the total is at most HEADROOM of the GPU's published memory; the rest is
  left to the CUDA context, NCCL buffers and allocator fragmentation.

Layouts follow torchtitan's: GPUs = FSDP (data parallel) x TP x PP; EP borrows its ranks from
FSDP x TP (torchtitan's `ParallelDims`: ep divides dp_shard * cp * tp), each EP rank holding
n_experts / ep whole experts, FSDP-sharded over the rest; TP with sequence parallelism, so all
of a block's activations divide by TP; PP runs 1F1B, the first stage holding `pp` micro-batches
in flight. Context parallelism and float8 are not modeled. llamaworks' own trainer runs FSDP2
(+ activation checkpointing) only today; TP/EP/PP layouts are what a torchtitan-style trainer
would run.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from typing import Any

from llamaworks.config import ModelConfig, get_preset
from llamaworks.errors import LlamaworksError
from llamaworks.train.loss import CHUNK_BYTES
from llamaworks.train.metrics import flops_per_token

GB = 1e9
HEADROOM = 0.9  # a plan may use this share of the GPU's memory
SHARDED_BYTES = 16  # per parameter: fp32 param 4 + fp32 grad 4 + AdamW moments 8
MAX_TP = 8  # tensor parallelism stays inside one NVLink node of 8 GPUs
MAX_PP = 64
DEFAULT_MFU = 0.40
DEFAULT_BATCH_TOKENS = 4 << 20  # the LLaMA paper's 4M tokens per step
DEFAULT_SEQ_LEN = 8192


@dataclass(frozen=True)
class GPU:
    """A GPU's published memory (decimal GB, as sold) and dense bf16 tensor-core peak."""

    name: str
    memory_gb: float
    peak_tflops: float


# Dense (no 2:4 sparsity) bf16 peaks from NVIDIA's datasheets: A100 "BFLOAT16 Tensor Core 312
# TFLOPS" (624 with sparsity); H100 SXM "BF16 Tensor Core 1,979 teraFLOPS" with sparsity, i.e.
# 989 dense; H200 SXM the same 989 (H100's compute, 141 GB HBM3e). `train/metrics.peak_flops`
# uses the same figures for MFU.
GPUS: dict[str, GPU] = {
    "a100-80gb": GPU("NVIDIA A100 80GB SXM", 80, 312),
    "h100-80gb": GPU("NVIDIA H100 80GB SXM", 80, 989),
    "h200": GPU("NVIDIA H200 141GB SXM", 141, 989),
}


@dataclass(frozen=True)
class Layout:
    """One way to lay a run out: dp x tp x pp GPUs, EP over `ep` of the dp x tp ranks."""

    dp: int
    tp: int
    pp: int
    ep: int
    micro_batch_rows: int  # sequences per micro-batch per data-parallel rank
    grad_accum: int  # micro-batches per optimizer step (the pipeline's micro-batches under PP)
    activation_checkpointing: bool

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp

    def describe(self) -> str:
        ep = f" (EP {self.ep} of the FSDP x TP ranks)" if self.ep > 1 else ""
        return (f"FSDP {self.dp} x TP {self.tp} x PP {self.pp}{ep}, micro-batch "
                f"{self.micro_batch_rows} row{'s' if self.micro_batch_rows > 1 else ''}, "
                f"{self.grad_accum} micro-batch{'es' if self.grad_accum > 1 else ''} per step, "
                f"activation checkpointing {'on' if self.activation_checkpointing else 'off'}")


# -- the model's shape: parameters and activations per layer ---------------------------------
def ffn_params(cfg: ModelConfig, layer: int) -> tuple[int, int]:
    """(non-expert, routed-expert) parameters of `layer`'s feed-forward: a gated MLP is
    3 x dim x hidden; a MoE layer has a router (dim x E), E stacked experts and a shared one."""
    d = cfg.dim
    if not cfg.is_moe(layer):
        return 3 * d * cfg.hidden_dim, 0
    experts = 3 * d * cfg.moe_hidden_dim * cfg.n_experts
    return d * cfg.n_experts + 3 * d * cfg.shared_hidden_dim, experts


def activation_bytes(cfg: ModelConfig, layer: int) -> int:
    """Bytes eager autograd keeps per token for `layer` in bf16 without checkpointing, counted
    from `model.py` (and checked against `saved_tensors_hooks` in tests/test_plan.py):
    - each RMSNorm of width w: its fp32 input, bf16 normed value and fp32 rsqrt (6w + 4), and
      its output for the next matmul (2w);
    - attention: q, k, v as SDPA gets them (after RoPE/norms), its output and fp32 logsumexp;
      flash/memory-efficient kernels keep no T x T scores; q/k RMSNorm (Qwen3) or Llama 4's
      fp32 L2 norm add their saved inputs; latent attention keeps the q_a and latent norms,
      q and k (nope + RoPE parts) and the kv_b output that v is a view of;
    - the gated MLP: gate, act(gate), up and their product (8f);
    - a MoE layer instead: each token's k gathered copies, k outputs and their bf16 cast
      (6kd), the k experts' MLPs (8k f_e), the shared expert's (8 f_s), fp32 router scores (4E)
      and the routing indices and weights (~40k).
    Dense Llama: 16d + 8 + 2(q + 2kv) + 2q + 4h + 8f, with q = heads x head_dim, kv likewise,
    h the heads, f the MLP width."""
    d, hd, h = cfg.dim, cfg.head_dim, cfg.n_heads

    def norm(width: int, rows: int = 1) -> int:
        return 6 * width + 4 * rows

    total = 2 * (norm(d) + 2 * d)  # input_layernorm, post_attention_layernorm and outputs
    if cfg.sandwich_norm:  # Gemma 3's norms on the branch outputs too
        total += 2 * norm(d)
    if cfg.mla:
        qk, v, qr, rank = cfg.qk_nope_dim + hd, cfg.v_head_dim, cfg.q_lora_rank, cfg.kv_lora_rank
        attn = norm(qr) + 2 * qr if qr else 0
        attn += norm(rank) + 2 * rank
        attn += 4 * h * qk + 2 * h * (cfg.qk_nope_dim + v) + 2 * h * v + 4 * h
    else:
        q, kvh = h * hd, cfg.n_kv_heads
        kv = kvh * hd
        attn = 2 * (q + 2 * kv) + 2 * q + 4 * h
        if cfg.qk_norm:
            attn += norm(q, h) + norm(kv, kvh)
        if cfg.qk_l2_norm and cfg.uses_rope(layer):
            attn += 8 * (q + kv) + 4 * (h + kvh)
    if cfg.is_moe(layer):
        k = cfg.n_active_experts
        ffn = 6 * k * d + 8 * k * cfg.moe_hidden_dim + 8 * cfg.shared_hidden_dim
        ffn += 4 * cfg.n_experts + 40 * k
    else:
        ffn = 8 * cfg.hidden_dim
    return total + attn + ffn


@dataclass(frozen=True)
class Shape:
    """What the planner needs of a model, computed once: per layer (non-expert params, expert
    params, activation bytes per token), the embedding, the output projection, final norm."""

    dim: int
    layers: tuple[tuple[int, int, int], ...]
    embed: int
    output: int
    final_norm: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> Shape:
        d = cfg.dim
        ffn = [ffn_params(cfg, i) for i in range(cfg.n_layers)]
        output = 0 if cfg.tie_embeddings else cfg.vocab_size * d
        # attention + norms, the same in every layer: what num_params counts beyond the FFNs
        rest = cfg.num_params(include_embeddings=False) - d - output - sum(a + b for a, b in ffn)
        attn, odd = divmod(rest, cfg.n_layers)
        assert odd == 0, "attention parameters differ between layers"
        layers = tuple((attn + a, b, activation_bytes(cfg, i)) for i, (a, b) in enumerate(ffn))
        return cls(d, layers, cfg.vocab_size * d, output, d)

    @property
    def params(self) -> int:
        return sum(a + b for a, b, _ in self.layers) + self.embed + self.output + self.final_norm


def stages(n_layers: int, pp: int) -> list[range]:
    """Layers per pipeline stage, as even as possible (the first stages take the extra)."""
    base, extra = divmod(n_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (s < extra)
        out.append(range(start, start + n))
        start += n
    return out


def memory(shape: Shape, layout: Layout, seq_len: int) -> dict[str, float]:
    """Bytes per GPU by part (weights, gradients, optimizer, activations, total) on the pipeline
    stage that needs the most; the model in the module docstring."""
    dp, tp, pp, ep = layout.dp, layout.tp, layout.pp, layout.ep
    tokens = layout.micro_batch_rows * seq_len  # per micro-batch per data-parallel rank
    worst: dict[str, float] = {}
    for s, rng in enumerate(stages(len(shape.layers), pp)):
        layers = [shape.layers[i] for i in rng]
        first, last = s == 0, s == pp - 1
        root = shape.embed * first + (shape.output + shape.final_norm) * last
        params = sum(a + b for a, b, _ in layers) + root
        shard = params / (dp * tp)  # experts: params / (ep x dp x tp / ep), the same
        block = max((a / tp + b / ep for a, b, _ in layers), default=0.0)
        root_local = root / tp
        in_flight = min(pp - s, layout.grad_accum)  # 1F1B: micro-batches alive on stage s
        if layout.activation_checkpointing:
            act = in_flight * tokens * len(layers) * 2 * shape.dim
            act += tokens * max((c for _, _, c in layers), default=0)  # one block recomputed
        else:
            act = in_flight * tokens * sum(c for _, _, c in layers)
        if last:  # the final norm, then the fused loss: fp32 d(output weight), d(hidden)
            act += tokens * (8 + 2) * shape.dim + 4 * shape.output
        act = act / tp + (1.5 * CHUNK_BYTES if last else 0)  # + the loss's logits chunk
        parts = {"weights": 4 * shard + 2 * (root_local + 2 * block),
                 "gradients": 4 * shard + 2 * root_local + 6 * block,
                 "optimizer": 8 * shard,
                 "activations": act}
        parts["total"] = sum(parts.values())
        if not worst or parts["total"] > worst["total"]:
            worst = parts
    return worst


# -- the search --------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def layouts(cfg: ModelConfig, gpus: int, batch_rows: int, checkpointing: str
            ) -> list[tuple[int, int, int, bool]]:
    """Valid (tp, pp, ep, checkpointing) choices for `gpus`, simplest first: fewer pipeline
    stages, then less tensor parallelism, then no recomputation, then fewer EP ranks. Valid:
    tp <= 8 divides the query and KV heads, pp <= layers, ep divides the experts and dp x tp, and
    the global batch has a sequence for every data-parallel rank (and `pp` micro-batches each
    under PP)."""
    kv = cfg.n_heads if cfg.mla else cfg.n_kv_heads
    acs = {"auto": (False, True), "on": (True,), "off": (False,)}[checkpointing]
    out = []
    for pp in _divisors(gpus):
        if pp > min(cfg.n_layers, MAX_PP):
            break
        for tp in _divisors(gpus // pp):
            if tp > MAX_TP or cfg.n_heads % tp or kv % tp:
                continue
            dp = gpus // (pp * tp)
            if batch_rows < dp or math.ceil(batch_rows / dp) < pp:  # a rank without a
                continue  # sequence, or a pipeline without a micro-batch per stage
            eps = [e for e in _divisors(cfg.n_experts) if (dp * tp) % e == 0] or [1]
            out += [(tp, pp, ep, ac) for ac in acs for ep in eps]
    return sorted(out, key=lambda t: (t[1], t[0], t[3], t[2]))


def search(cfg: ModelConfig, gpus: int, gpu: GPU, seq_len: int, batch_rows: int,
           checkpointing: str = "auto", shape: Shape | None = None) -> Layout | None:
    """The simplest layout (see `layouts`) that fits in HEADROOM of `gpu`'s memory, with the
    largest micro-batch that still fits; None when none does."""
    shape = shape or Shape.of(cfg)
    budget = HEADROOM * gpu.memory_gb * GB
    for tp, pp, ep, ac in layouts(cfg, gpus, batch_rows, checkpointing):
        dp = gpus // (tp * pp)
        local = math.ceil(batch_rows / dp)  # sequences per data-parallel rank per step
        micros = [m for m in _divisors(local) if local // m >= pp]
        fitting = None
        for m in micros:  # memory grows with the micro-batch: stop at the first that fails
            lay = Layout(dp, tp, pp, ep, m, local // m, ac)
            if memory(shape, lay, seq_len)["total"] > budget:
                break
            fitting = lay
        if fitting is not None:
            return fitting
    return None


def smallest_gpus(cfg: ModelConfig, gpu: GPU, seq_len: int, batch_rows: int,
                  checkpointing: str = "auto", limit: int = 1 << 20) -> int | None:
    """The smallest GPU count with a layout that fits: 1, 2, 4, then doubling multiples of 8
    until one fits, then the smallest in the last doubling's interval (steps of 8, or of 1/256
    of it above 2048 GPUs). None up to `limit`."""
    shape = Shape.of(cfg)

    def fits(n: int) -> bool:
        return search(cfg, n, gpu, seq_len, batch_rows, checkpointing, shape) is not None

    prev = 4
    for n in (1, 2, 4):
        if fits(n):
            return n
    n = 8
    while n <= limit:
        if fits(n):
            step = max(8, n // 256)
            return next((m for m in range(prev + step, n, step) if fits(m)), n)
        prev, n = n, n * 2
    return None


# -- the plan ----------------------------------------------------------------------------------
def plan(preset: str, gpus: int, gpu: str, seq_len: int | None = None,
         global_batch_tokens: int = DEFAULT_BATCH_TOKENS, tokens: float | None = None,
         mfu: float = DEFAULT_MFU, checkpointing: str = "auto",
         tokens_per_gpu_s: float | None = None) -> dict[str, Any]:
    """The plan as a JSON-ready dict: parameters, layout, memory per GPU (GB), FLOPs per token,
    MFU, tokens/s and days for `tokens` (default: 20 per active parameter, Chinchilla's ratio).
    `tokens_per_gpu_s`, when given, replaces the MFU as the throughput (the MFU it implies is
    reported). Raises LlamaworksError for an unknown preset or GPU, or when nothing fits (naming
    the smallest GPU count that would)."""
    try:
        cfg = get_preset(preset)
    except KeyError as e:
        raise LlamaworksError(e.args[0]) from None
    if gpu not in GPUS:
        raise LlamaworksError(f"unknown GPU {gpu!r}; choose one of: {', '.join(GPUS)}")
    spec = GPUS[gpu]
    if gpus < 1:
        raise LlamaworksError(f"--gpus must be at least 1, got {gpus}")
    seq = seq_len or min(cfg.max_seq_len, DEFAULT_SEQ_LEN)
    rows = max(1, round(global_batch_tokens / seq))
    active = cfg.num_params(active=True)
    tokens = float(tokens if tokens is not None else 20 * active)
    lay = search(cfg, gpus, spec, seq, rows, checkpointing)
    if lay is None:
        least = smallest_gpus(cfg, spec, seq, rows, checkpointing)
        why = (f"the smallest GPU count with a layout that fits is {least}" if least
               else "no GPU count up to 2^20 fits")
        if least and least < gpus:
            why += (f" (the global batch of {rows} x {seq} tokens has too few sequences for "
                    f"{gpus} GPUs: raise --global-batch-tokens)")
        raise LlamaworksError(f"no layout of {preset} fits on {gpus} x {spec.name} "
                              f"({spec.memory_gb:g} GB, {HEADROOM:.0%} usable, seq {seq}, "
                              f"activation checkpointing {checkpointing}); {why}")
    shape = Shape.of(cfg)
    mem = memory(shape, lay, seq)
    per_layer = max(c for _, _, c in shape.layers)
    fpt = flops_per_token(cfg, seq)
    peak = spec.peak_tflops * 1e12
    if tokens_per_gpu_s is not None:
        mfu = tokens_per_gpu_s * fpt / peak
    tps = mfu * peak * gpus / fpt
    return {"preset": preset, "gpu": gpu, "gpu_name": spec.name, "gpus": gpus,
            "gpu_memory_gb": spec.memory_gb, "peak_tflops": spec.peak_tflops,
            "total_params": cfg.num_params(), "active_params": active,
            "weights_bf16_gb": 2 * cfg.num_params() / GB, "seq_len": seq,
            "global_batch_tokens": lay.dp * lay.micro_batch_rows * lay.grad_accum * seq,
            "layout": {**asdict(lay), "gpus": lay.gpus, "describe": lay.describe()},
            "memory_per_gpu_gb": {k: round(v / GB, 2) for k, v in mem.items()},
            "activation_bytes_per_token_layer": {"without_checkpointing": per_layer,
                                                 "with_checkpointing": 2 * cfg.dim},
            "flops_per_token": fpt, "mfu": mfu, "tokens_per_s": tps,
            "tokens_per_gpu_s": tps / gpus, "tokens": tokens, "days": tokens / tps / 86400}


def format_plan(p: dict[str, Any]) -> str:
    """The plan as the CLI prints it."""
    def num(n: float) -> str:
        return f"{n / 1e12:.2f}T" if n >= 1e12 else f"{n / 1e9:.1f}B"

    m, act = p["memory_per_gpu_gb"], p["activation_bytes_per_token_layer"]
    return "\n".join([
        f"{p['preset']} on {p['gpus']} x {p['gpu_name']} ({p['gpu_memory_gb']:g} GB, "
        f"{p['peak_tflops']:g} TFLOPS dense bf16)",
        f"  parameters: {num(p['total_params'])} total, {num(p['active_params'])} active per "
        "token",
        f"  layout: {p['layout']['describe']}",
        f"  batch: {p['global_batch_tokens']:,} tokens per step ({p['seq_len']} per sequence)",
        f"  memory per GPU: weights {m['weights']:.1f} GB, gradients {m['gradients']:.1f}, "
        f"optimizer {m['optimizer']:.1f}, activations {m['activations']:.1f}: total "
        f"{m['total']:.1f} of {p['gpu_memory_gb']:g} GB",
        f"  activations per token per layer: {act['without_checkpointing'] / 1024:.0f} KiB, "
        f"{act['with_checkpointing'] / 1024:.0f} KiB checkpointed (the block's bf16 input)",
        f"  throughput at {p['mfu']:.1%} MFU ({p['flops_per_token'] / 1e9:.0f} GFLOPs per "
        f"token): {p['tokens_per_s']:,.0f} tokens/s, {p['tokens_per_gpu_s']:,.0f} per GPU",
        f"  {num(p['tokens'])} tokens: {p['days']:.1f} days",
        "  (bf16 compute, fp32 master weights, grads and AdamW moments sharded by FSDP2: 16 "
        "bytes/param)"])


# -- the verb ----------------------------------------------------------------------------------
def count(text: str) -> float:
    """A count as typed: 1.4e12, 30T, 32M, 4096K (K, M, B/G, T: powers of 1000)."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(text[-1:].upper())
    try:
        return float(text[:-1]) * scale if scale else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 1.4e12, 30T, 4M)"
                                         ) from None


def cmd_plan(args: Any) -> int:
    import json

    p = plan(args.preset, args.gpus, args.gpu, args.seq_len, args.global_batch_tokens,
             args.tokens, args.mfu, args.activation_checkpointing, args.tokens_per_gpu_s)
    print(json.dumps(p) if args.json else format_plan(p))
    return 0


def register(sub: Any) -> None:
    """Add `llamaworks plan` to the CLI's subparsers."""
    p = sub.add_parser("plan", help="GPUs, layout, memory per GPU and days to pretrain a preset")
    p.add_argument("--preset", required=True, help="a named shape (llamaworks info --preset)")
    p.add_argument("--gpus", type=int, required=True, help="how many GPUs")
    p.add_argument("--gpu", required=True, help=f"one of: {', '.join(GPUS)}")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per sequence (default: the context, at most {DEFAULT_SEQ_LEN})")
    p.add_argument("--global-batch-tokens", type=lambda s: int(count(s)),
                   default=DEFAULT_BATCH_TOKENS,
                   help="tokens per optimizer step, e.g. 16M (default 4 x 2^20)")
    p.add_argument("--tokens", type=count, default=None,
                   help="training tokens, e.g. 1.4T (default: 20 per active parameter)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                   help="model FLOPs utilization to assume (default 0.40)")
    p.add_argument("--tokens-per-gpu-s", type=float, default=None,
                   help="a measured throughput instead of --mfu")
    p.add_argument("--activation-checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="auto: only when the layout does not fit without it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_plan)
