"""Supervised fine-tuning on chat conversations with the loss on assistant tokens only.

Data: JSONL, one `{"messages": [...OpenAI format...], "tools": [...optional schemas...]}` per
line. Each conversation is rendered with the model's chat format (`chat.formats`), and the
assistant's spans (content, tool calls, end-of-turn marker) become the loss mask. Segments are
tokenized one by one, so the ids are exactly what inference sees: a prompt encoded up to the
assistant header, then the tokens the model itself emits.

Two ways to batch, both exact in the forward pass:
- shared prefix (the default when every conversation starts with the same >= 32 tokens, e.g. a
  system prompt listing the tools): the prefix's keys/values are computed once per step without
  gradient and every row attends to them, so only the varying part is trained on. The gradient
  through the prefix's keys/values is dropped (they are treated as constants for the step);
- packing: conversations are concatenated into rows of `max_len` tokens with per-document
  positions and a block-diagonal causal mask, so no token attends across documents.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llamaworks.errors import CheckpointError, LlamaworksError
from llamaworks.model import Llama
from llamaworks.posttrain.lora import (
    LoraConfig,
    apply_lora,
    lora_state_dict,
    read_adapter,
    save_adapter,
)
from llamaworks.posttrain.prefix import prefix_kv, prefixed_hidden, trainable_prefix_len
from llamaworks.train import checkpoints as ckpt
from llamaworks.train import distributed as D
from llamaworks.train import skeleton
from llamaworks.train.loss import linear_cross_entropy
from llamaworks.train.optim import adamw, lr_scheduler

IGNORE = -100


class DataError(LlamaworksError):
    """A fine-tuning data file that cannot be used (names the line and the problem)."""


@dataclass
class SFTConfig:
    """Fine-tuning hyperparameters. lora=None means full fine-tuning. The optimizer and the
    schedule are pretraining's (`train/optim.py`) with these values: AdamW(betas, eps; decay on
    matrices only), warmup over `warmup_frac` of the steps, cosine to `min_lr_ratio`."""

    lora: LoraConfig | None = field(default_factory=LoraConfig)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_frac: float = 0.05
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    keep_last: int = 2  # checkpoints kept (one is saved at every eval)
    grad_clip: float = 1.0
    batch_size: int = 4
    epochs: float = 1.0
    max_steps: int | None = None
    max_len: int = 1024
    pack: bool = False
    min_shared_prefix: int = 32
    eval_fraction: float = 0.05
    eval_every: int = 50
    seed: int = 0
    bf16: bool = False  # bf16 autocast for the matmuls (fast on CPUs with AVX-512 BF16 / AMX)
    # under torchrun: split every block's heads and MLP over this many ranks (all of them)
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_len < 8 or self.lr <= 0:
            raise ValueError("batch_size must be >= 1, max_len >= 8 and lr > 0")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.tensor_parallel < 1:
            raise ValueError(f"--tensor-parallel must be >= 1, not {self.tensor_parallel}")
        if self.keep_last < 1 or self.eval_every < 1:
            raise ValueError(f"keep_last and eval_every must be >= 1, got {self.keep_last} and "
                             f"{self.eval_every}")


# -- data ----------------------------------------------------------------------------------------
def load_conversations(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a JSONL file of conversations."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    convs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from e
        msgs = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
            raise DataError(f'{path}:{n}: expected {{"messages": [{{"role": ..., "content": ...}}'
                            f', ...]}}')
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{path}:{n}: no assistant message, so nothing to learn from")
        convs.append({"messages": msgs, "tools": obj.get("tools")})
    if not convs:
        raise DataError(f"{path}: no conversations")
    return convs


def encode_conversation(tokenizer: Any, conv: dict[str, Any], fmt: str | None = None
                        ) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 mask (1 = assistant-generated token) of one conversation.

    The rendered text is tokenized whole, as at inference (pieces tokenized apart would differ
    where a tokenizer adds a space prefix, as SentencePiece Llama/Mistral ones do, at each);
    a span boundary falls where the ids of the text before it stop agreeing with the whole
    text's, so a token straddling it belongs to what follows."""
    from llamaworks.chat.formats import assistant_spans

    text, spans = assistant_spans(tokenizer, conv["messages"], conv.get("tools"), fmt=fmt)
    ids = tokenizer.encode(text, bos=False)
    mask = [0] * len(ids)

    def boundary(pos: int) -> int:
        head = tokenizer.encode(text[:pos], bos=False) if pos else []
        n = 0
        while n < min(len(head), len(ids)) and head[n] == ids[n]:
            n += 1
        return n

    for start, end in spans:
        a, b = boundary(start), boundary(end)
        mask[a:b] = [1] * (b - a)
    return ids, mask


@dataclass
class Example:
    ids: list[int]
    mask: list[int]


def encode_all(tokenizer: Any, convs: Sequence[dict[str, Any]], max_len: int,
               fmt: str | None = None) -> list[Example]:
    out = []
    for c in convs:
        ids, mask = encode_conversation(tokenizer, c, fmt)
        if len(ids) > max_len:  # keep the start; a cut assistant turn still teaches its prefix
            ids, mask = ids[:max_len], mask[:max_len]
        if any(mask[1:]):
            out.append(Example(ids, mask))
    return out


def shared_prefix_len(examples: Sequence[Example]) -> int:
    """Length of the token prefix every example shares and none is trained on."""
    return trainable_prefix_len([e.ids for e in examples], [e.mask for e in examples])


def _labels(ids: list[int], mask: list[int]) -> list[int]:
    """Next-token targets: ids[t+1] where token t+1 is assistant-generated, else IGNORE."""
    return [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def prefixed_loss(model: Llama, prefix: list[int], batch: Sequence[Example]
                  ) -> tuple[Tensor, int]:
    """Summed assistant-token NLL of `batch` (all sharing `prefix`) and the token count."""
    p = len(prefix)
    kv = prefix_kv(model, prefix)
    rows = [e.ids[p:] for e in batch]
    labels = [_labels(e.ids, e.mask)[p:] for e in batch]
    t = max(map(len, rows))
    tokens = torch.tensor([r + [0] * (t - len(r)) for r in rows])
    target = torch.tensor([lab + [IGNORE] * (t - len(lab)) for lab in labels])
    return _head_nll(model, prefixed_hidden(model, kv, tokens), target)


def pack(examples: Sequence[Example], max_len: int) -> list[list[Example]]:
    """Greedy first-fit packing of examples into rows of at most `max_len` tokens."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e.ids)):
        for i, r in enumerate(room):
            if len(e.ids) <= r:
                rows[i].append(e)
                room[i] -= len(e.ids)
                break
        else:
            rows.append([e])
            room.append(max_len - len(e.ids))
    return rows


def packed_loss(model: Llama, rows: Sequence[Sequence[Example]], max_len: int
                ) -> tuple[Tensor, int]:
    """Summed assistant-token NLL of packed rows: per-document positions, block-diagonal mask."""
    t = min(max_len, max(sum(len(e.ids) for e in r) for r in rows))
    tokens = torch.zeros(len(rows), t, dtype=torch.long)
    target = torch.full((len(rows), t), IGNORE)
    pos = torch.zeros(len(rows), t, dtype=torch.long)
    doc = torch.full((len(rows), t), -1)
    for b, row in enumerate(rows):
        o = 0
        for d, e in enumerate(row):
            n = len(e.ids)
            tokens[b, o:o + n] = torch.tensor(e.ids)
            target[b, o:o + n] = torch.tensor(_labels(e.ids, e.mask))
            pos[b, o:o + n] = torch.arange(n)
            doc[b, o:o + n] = d
            o += n
    q = torch.arange(t)
    causal = q[None, :] <= q[:, None]
    same = doc[:, :, None] == doc[:, None, :]
    mask = (same & causal) | torch.eye(t, dtype=torch.bool)  # padding sees itself only
    h = model(tokens, pos, attn_mask=mask[:, None], hidden_only=True)
    return _head_nll(model, h, target)


def _head_nll(model: Llama, h: Tensor, target: Tensor) -> tuple[Tensor, int]:
    sel = target != IGNORE  # the vocabulary projection runs only where there is a target
    n = int(sel.sum())
    # the pretraining loss: no [targets, vocab] logits tensor (lm_head is never LoRA-adapted)
    return linear_cross_entropy(h[sel], model.lm_head.weight, target[sel]) * n, n


# -- training ------------------------------------------------------------------------------------
class SFTTrainer:
    """Fine-tunes `model` (LoRA or full) on encoded examples; see `finetune` for the driver.
    Under torchrun (`info`) the adapters are applied, then `distributed.parallelize` splits the
    model over the ranks (`cfg.tensor_parallel` of them: every rank trains on the same batch)."""

    def __init__(self, model: Llama, train: list[Example], evals: list[Example], cfg: SFTConfig,
                 info: D.DistInfo | None = None):
        self.model, self.train_set, self.eval_set, self.cfg = model, train, evals, cfg
        self.info = info or D.DistInfo()
        if cfg.lora is not None:
            apply_lora(model, cfg.lora)
        else:
            model.requires_grad_(True)
        if self.info.enabled or cfg.tensor_parallel > 1:
            _parallelize(model, self.info, cfg.tensor_parallel)
        everything = train + evals
        n = 0 if cfg.pack else shared_prefix_len(everything)
        self.prefix = everything[0].ids[:n] if n >= cfg.min_shared_prefix else None
        if self.prefix is None:
            self.rows = pack(train, cfg.max_len)
        units = len(self.rows) if self.prefix is None else len(train)
        per_epoch = max(1, math.ceil(units / cfg.batch_size))
        self.total = cfg.max_steps or max(1, round(per_epoch * cfg.epochs))
        self.opt = adamw(model, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)
        self.sched = lr_scheduler(self.opt, max(1, int(self.total * cfg.warmup_frac)),
                                  self.total, cfg.min_lr_ratio)
        self.rng = random.Random(cfg.seed)
        self.order: list[int] = []

    def _next_batch(self) -> list:
        units = self.rows if self.prefix is None else self.train_set
        if len(self.order) < self.cfg.batch_size:
            idx = list(range(len(units)))
            self.rng.shuffle(idx)
            self.order += idx
        take, self.order = self.order[:self.cfg.batch_size], self.order[self.cfg.batch_size:]
        return [units[i] for i in take]

    def loss(self, batch: Sequence) -> tuple[Tensor, int]:
        device = self.model.lm_head.weight.device.type
        with torch.autocast(device, torch.bfloat16, enabled=self.cfg.bf16):
            if self.prefix is None:
                return packed_loss(self.model, batch, self.cfg.max_len)
            return prefixed_loss(self.model, self.prefix, batch)

    def step(self) -> dict[str, Any]:
        """One optimizer step; its row for metrics.jsonl (step, loss, the LR it used)."""
        self.model.train()
        lr = self.opt.param_groups[0]["lr"]
        total, n = self.loss(self._next_batch())
        loss = total / max(n, 1)
        loss.backward()
        D.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                          self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return {"step": self.sched.last_epoch, "loss": float(loss.detach()), "lr": lr}

    def state(self, step: int) -> dict[str, Any]:
        """The trainer state at `step` (`train/skeleton.py`): the data position is the shuffled
        order still to draw from and the shuffling random.Random. Under torchrun the optimizer
        is not in it but in the checkpoint's DCP folder (`save_sharded`)."""
        opt = {} if self.info.enabled else self.opt.state_dict()
        return skeleton.trainer_state("sft", step, opt, self.sched, {
            "seed": self.cfg.seed, "order": list(self.order),
            "rng": skeleton.saved_py_rng(self.rng)})

    def restore(self, folder: Path, state: dict[str, Any]) -> int:
        """Continue from a checkpoint folder: its weights, optimizer, schedule, RNGs, data
        position; returns its step. A torchrun run's checkpoint resumes under torchrun with
        the same ranks (weights and optimizer from its DCP folder), one process's in one."""
        sharded = folder / "dcp"
        if self.info.enabled != sharded.is_dir():
            how = "torchrun ranks; resume it under torchrun with as many and --tensor-parallel" \
                if sharded.is_dir() else "one process; resume it with one"
            raise CheckpointError(f"{folder} was saved by {how}")
        if self.info.enabled:
            D.load_sharded(sharded, self.model, self.opt)
            self.sched.load_state_dict(state["scheduler"])
            skeleton.set_rng_state(state["rng"])
            data = state["data"]
        else:
            restore_weights(self.model, self.cfg.lora, folder)
            data = skeleton.restore(state, self.opt, self.sched)
        self.order = [int(i) for i in data["order"]]
        self.rng.setstate(skeleton.py_rng_state(data["rng"]))
        return int(state["step"])

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean assistant-token NLL on the eval split."""
        if not self.eval_set:
            return None
        self.model.eval()
        tot, n = 0.0, 0
        for s in range(0, len(self.eval_set), self.cfg.batch_size):
            chunk = self.eval_set[s:s + self.cfg.batch_size]
            batch = [[e] for e in chunk] if self.prefix is None else chunk
            lsum, k = self.loss(batch)
            tot, n = tot + float(lsum), n + k
        return tot / max(n, 1)


def split_eval(convs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    idx = list(range(len(convs)))
    random.Random(seed).shuffle(idx)
    k = int(round(len(convs) * fraction)) if len(convs) > 1 else 0
    return [convs[i] for i in idx[k:]], [convs[i] for i in idx[:k]]


def _parallelize(model: Llama, info: D.DistInfo, tensor_parallel: int) -> None:
    """`distributed.parallelize` for fine-tuning: tensor parallelism over every rank of the run
    (so one data-parallel group, FSDP2 over a dimension of one); LlamaworksError for a layout
    it cannot take."""
    if info.enabled and tensor_parallel != info.world_size:
        raise LlamaworksError(
            f"finetune under torchrun splits the model over all {info.world_size} ranks: pass "
            f"--tensor-parallel {info.world_size} (data-parallel fine-tuning is not supported)")
    try:
        D.parallelize(model, info, tensor_parallel=tensor_parallel)
    except ValueError as e:
        raise LlamaworksError(str(e)) from None


def trained_tensors(model: Llama, lora: LoraConfig | None,
                    info: D.DistInfo | None = None) -> dict[str, Tensor]:
    """What `save_weights` writes: the adapter's tensors (PEFT names) or the full state dict,
    whole (under torchrun the split and sharded ones gathered: every rank calls it)."""
    if lora is not None:
        return lora_state_dict(model)
    return D.full_state_dict(model, info or D.DistInfo())


def save_weights(model: Llama, lora: LoraConfig | None, folder: Path,
                 base_model: str | None = None, tokenizer: Any = None,
                 tensors: dict[str, Tensor] | None = None) -> None:
    """The trained weights into `folder`: a LoRA adapter, or (full fine-tuning) a native
    checkpoint with the tokenizer; what a checkpoint folder and the top of OUT both hold, in
    one process's format. `tensors`: `trained_tensors`'s, gathered by every rank of a torchrun
    run for the one that writes."""
    if lora is not None:
        save_adapter(model, lora, folder, base_model=base_model, tensors=tensors)
    else:
        from llamaworks.checkpoint import save_native

        save_native(folder, model.config, model.state_dict() if tensors is None else tensors,
                    tokenizer)


@torch.no_grad()
def restore_weights(model: Llama, lora: LoraConfig | None, folder: Path) -> None:
    """Copy what `save_weights` wrote in `folder` back into `model`'s trainable parameters
    (bit-exact: both are fp32); CheckpointError when they are not this model's."""
    def mismatch(what: str) -> CheckpointError:
        return CheckpointError(f"{folder} holds {what} than this run's model; resume with the "
                               "same model and LoRA settings")

    if lora is not None:
        saved_cfg, saved, _ = read_adapter(folder)
        live = lora_state_dict(model)  # views of the LoRA parameters, under PEFT's names
        if (saved_cfg.r, saved_cfg.alpha) != (lora.r, lora.alpha) or saved.keys() != live.keys() \
                or any(saved[k].shape != v.shape for k, v in live.items()):
            raise mismatch("another adapter (rank, alpha or layers)")
        for k, v in live.items():
            v.copy_(saved[k])
        if not all(torch.equal(v, saved[k]) for k, v in lora_state_dict(model).items()):
            raise RuntimeError("lora_state_dict returned copies, not views: cannot restore")
        return
    from llamaworks.checkpoint import load_state_dict

    _, sd, _ = load_state_dict(folder)
    params = dict(model.named_parameters())  # a tied head appears once, as the embedding
    if not params.keys() <= sd.keys() or any(sd[n].shape != p.shape for n, p in params.items()):
        raise mismatch("other weights")
    for n, p in params.items():
        p.copy_(sd[n])


def load_split_base(path: str | Path, tensor_parallel: int) -> Llama | None:
    """The base model of a fine-tuning run under torchrun with `tensor_parallel` = the world
    size (> 1) from an HF safetensors directory (one file or shards): this rank's share only,
    read as `generate --tensor-parallel` reads it (`train.tensor_parallel.load_split`, over the
    "tp" dimension of the (dp, tp) mesh `parallelize` builds alike next; this joins the process
    group first), so no rank holds a whole block matrix. None for any other run or checkpoint
    (GGUF, Meta, `.bin`: they cannot be read in parts, so the caller loads them whole on every
    rank and `parallelize` splits them). ValueError for a model that does not split."""
    import os

    if tensor_parallel < 2 or int(os.environ.get("WORLD_SIZE", "1")) != tensor_parallel:
        return None  # one process, or a layout `_parallelize` refuses by name
    from llamaworks.checkpoint import resolve
    from llamaworks.infer.tensor_parallel import reads_slices
    from llamaworks.train.tensor_parallel import load_split

    if not reads_slices(path):
        return None
    info = D.setup("cpu")
    try:
        return load_split(resolve(path, "hf"), D.world_mesh(info, tensor_parallel)["tp"])
    except BaseException:
        D.teardown(info)
        raise


def finetune(model: Llama, tokenizer: Any, convs: list[dict], cfg: SFTConfig, out: str | Path,
             base_model: str | None = None, fmt: str | None = None, progress: bool = True,
             resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Fine-tune and save into `out`: a LoRA adapter (adapter_config.json +
    adapter_model.safetensors) or, for full fine-tuning, a native checkpoint. Also writes
    metrics.jsonl, loss.png, sft_config.json and, at every eval, a checkpoint
    `checkpoints/step_N/` (the weights or adapter + trainer_state.pt; the last `keep_last`
    kept), from which `resume=True` continues bit-exactly (on CPU). SIGINT / SIGTERM end the
    run at the next step boundary with a checkpoint. `stop_after` ends early with the schedule
    unchanged. Returns a summary.

    Under torchrun with `cfg.tensor_parallel` = the world size, every rank runs this on the
    same data: the model is split over the ranks (`SFTTrainer`), rank 0 logs and writes what
    one process writes (the gathered adapter or weights), and each checkpoint also holds the
    ranks' DCP folder (weights and optimizer) to resume from under torchrun. `model` is
    whole, or already this rank's share (`load_split_base`, whose DTensors `parallelize`
    keeps)."""
    info = D.setup("cpu" if model.lm_head.weight.device.type == "cpu" else None)
    try:
        return _finetune(model, tokenizer, convs, cfg, Path(out), base_model, fmt, progress,
                         resume, stop_after, info)
    finally:
        D.teardown(info)


def _finetune(model: Llama, tokenizer: Any, convs: list[dict], cfg: SFTConfig, out: Path,
              base_model: str | None, fmt: str | None, progress: bool, resume: bool,
              stop_after: int | None, info: D.DistInfo) -> dict[str, Any]:
    from tqdm import tqdm

    from llamaworks.train.metrics import MetricsLog

    main = info.is_main
    out.mkdir(parents=True, exist_ok=True)
    train_c, eval_c = split_eval(convs, cfg.eval_fraction, cfg.seed)
    torch.manual_seed(cfg.seed)
    tr = SFTTrainer(model, encode_all(tokenizer, train_c, cfg.max_len, fmt),
                    encode_all(tokenizer, eval_c, cfg.max_len, fmt), cfg, info)
    found = skeleton.resume_point(out, "sft") if resume else None
    start = tr.restore(found[1], found[2]) if found else 0
    log = MetricsLog(out / "metrics.jsonl", resume_step=start if start else None) if main \
        else None
    if start:
        rows = log.rows if log is not None else []
        first_eval = next((r.get("val_loss") for r in rows if r["step"] == 0), None)
        last_eval = next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None)
    else:
        first_eval = last_eval = tr.evaluate()
        if first_eval is not None and log is not None:
            log.log({"step": 0, "val_loss": first_eval})
    end = min(tr.total, stop_after) if stop_after else tr.total
    bar = tqdm(range(start, end), desc="finetune", disable=not (progress and main),
               initial=start, total=tr.total)

    def save(step: int) -> None:
        tensors = trained_tensors(model, cfg.lora, info)  # every rank: a gather when split
        if info.enabled:
            if main:
                ckpt.begin(out, step)  # unsealed before any rank writes into it
            torch.distributed.barrier()
            D.save_sharded(ckpt.step_dir(out, step) / "dcp", model, tr.opt)
        state = tr.state(step)
        if main:
            ckpt.write_checkpoint(out, step, state, cfg.keep_last, lambda d: save_weights(
                model, cfg.lora, d, base_model, tokenizer, tensors))
        if info.enabled:
            torch.distributed.barrier()

    t0, done = time.time(), start
    with skeleton.StopFlag() as stop:
        for s in bar:
            row = tr.step() | {"elapsed_s": round(time.time() - t0, 2)}
            done = s + 1
            signalled = D.any_rank(stop.signum is not None, info)  # all ranks stop together
            if done % cfg.eval_every == 0 or done in (tr.total, end):
                last_eval = tr.evaluate()
                if last_eval is not None:
                    row["val_loss"] = last_eval
                save(done)
            elif signalled:
                save(done)
            if log is not None:
                log.log(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}",
                            val=f"{last_eval:.3f}" if last_eval else "-")
            if signalled:
                if main:
                    print(stop.message(done))
                break
    bar.close()
    model.eval()
    tensors = trained_tensors(model, cfg.lora, info)
    summary = {"steps": done, "planned_steps": tr.total, "train_examples": len(tr.train_set),
               "eval_examples": len(tr.eval_set), "shared_prefix_tokens": len(tr.prefix or []),
               "first_val_loss": first_eval, "final_val_loss": last_eval,
               "minutes": round((time.time() - t0) / 60, 2), "stopped_by_signal": stop.signum}
    if main:
        from llamaworks.atomic import atomic_write_json

        log.plot(out / "loss.png")
        save_weights(model, cfg.lora, out, base_model, tokenizer, tensors)
        atomic_write_json(out / "sft_config.json", {"config": asdict(cfg), "summary": summary,
                                                    "base_model": base_model})
    return summary


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
