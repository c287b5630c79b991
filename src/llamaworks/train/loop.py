"""The pretraining loop: paper recipe, grad accumulation, bf16 autocast on GPU (on CPU too with
`precision="bf16"`), periodic eval (val loss + bits per byte), metrics, atomic checkpoints, exact
resume, clean exit on signals."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llamaworks.atomic import atomic_write_json
from llamaworks.checkpoint import load_state_dict
from llamaworks.checkpoint.native import save_native
from llamaworks.config import ModelConfig
from llamaworks.data.loader import PackedLoader, sequential_rows
from llamaworks.data.shards import read_manifest, split_tokens
from llamaworks.errors import LlamaworksError
from llamaworks.model import Llama
from llamaworks.tokenizer import Tokenizer
from llamaworks.train import checkpoints as ckpt
from llamaworks.train import distributed as D
from llamaworks.train.allocator import reuse_freed_memory
from llamaworks.train.config import TrainConfig
from llamaworks.train.loss import linear_cross_entropy
from llamaworks.train.metrics import (
    MetricsLog,
    flops_per_token,
    nats_to_bpb,
    peak_flops,
    token_byte_lengths,
    unigram_bpb,
)
from llamaworks.train.moe import RouterBalance
from llamaworks.train.optim import build_optimizer, lr_lambda
from llamaworks.train.skeleton import (
    StopFlag,
    load_optimizer,
    resume_point,
    set_rng_state,
    trainer_state,
)


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: torch.Tensor, byte_len: torch.Tensor,
             device: torch.device, micro_batch: int, autocast: Any) -> tuple[float, float]:
    """(mean val loss in nats/token, bits per byte) over `rows` [n, T+1]."""
    model.eval()
    nll_sum, n_tok, n_bytes = 0.0, 0, 0
    for i in range(0, len(rows), micro_batch):
        b = rows[i:i + micro_batch].to(device)
        y = b[:, 1:]
        with autocast():  # the training loss, so no [rows, T, vocab] logits here either
            h = model(b[:, :-1], hidden_only=True)
            nll_sum += float(linear_cross_entropy(h, model.lm_head.weight, y)) * y.numel()
        n_tok += y.numel()
        n_bytes += int(byte_len[b[:, 1:].cpu()].sum())
    model.train()
    return nll_sum / max(1, n_tok), nats_to_bpb(nll_sum, n_bytes)


def train(cfg: ModelConfig, tc: TrainConfig, data_dir: str | Path, out: str | Path,
          resume: bool = False, device: str | None = None) -> dict[str, Any]:
    """Train `cfg` on the prepared data in `data_dir`, writing checkpoints and metrics to `out`.
    Returns a summary (final step, val_loss, val_bpb, unigram_bpb, ...)."""
    info = D.setup(device)
    try:
        with reuse_freed_memory(tc.reuse_memory and info.device.type == "cpu"):
            return _train(cfg, tc, Path(data_dir), Path(out), resume, info)
    finally:
        D.teardown(info)


def _train(cfg: ModelConfig, tc: TrainConfig, data_dir: Path, out: Path, resume: bool,
           info: D.DistInfo) -> dict[str, Any]:
    dev = info.device
    manifest = read_manifest(data_dir)
    tok = Tokenizer.from_dir(data_dir / manifest.get("tokenizer", "tokenizer"))
    if cfg.vocab_size < tok.vocab_size:
        raise LlamaworksError(f"model vocab_size {cfg.vocab_size} < tokenizer's "
                              f"{tok.vocab_size}; pass --vocab-size {tok.vocab_size}")
    cfg = cfg.replace(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                      max_seq_len=max(cfg.max_seq_len, tc.seq_len))
    out.mkdir(parents=True, exist_ok=True)

    # -- model, optimizer, schedule (fresh, or from the latest checkpoint) ---------------
    torch.manual_seed(tc.seed)
    model = Llama(cfg, device="meta")
    model.to_empty(device=dev)
    start_step, state = 0, None
    # the trainers' one resume point: refuses an SFT / GRPO run's folder (another kind)
    found = resume_point(out, "pretrain") if resume else None
    if resume and found is None and info.is_main:
        print(f"no checkpoint in {out} to resume from; starting fresh")
    if found is not None:
        start_step, cdir, state = found
        _, sd, _ = load_state_dict(cdir)
        if cfg.tie_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise LlamaworksError(f"{cdir} does not match the model being trained ({e}); "
                                  "resume with the same preset and overrides") from None
        model.reset_rope()
        model.tie_weights()
    else:
        model.init_weights(tc.init_std, generator=torch.Generator(dev).manual_seed(tc.seed))
    if tc.precision not in ("auto", "fp32", "bf16"):
        raise LlamaworksError(f"precision must be auto, fp32 or bf16, not {tc.precision!r}")
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and dev.type == "cuda")
    try:  # TP and EP -> activation checkpointing -> compile -> FSDP2 (distributed.py)
        D.parallelize(model, info, tensor_parallel=tc.tensor_parallel,
                      expert_parallel=tc.expert_parallel,
                      activation_checkpointing=tc.activation_checkpointing,
                      compile=tc.compile, mixed_bf16=use_bf16 and dev.type == "cuda")
    except ValueError as e:
        raise LlamaworksError(str(e)) from None
    try:
        balance = RouterBalance.of(model, tc, info)  # None for a dense model
    except ValueError as e:
        raise LlamaworksError(str(e)) from None
    opt = build_optimizer(model, tc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))
    if found is not None:
        sharded = found[1] / "dcp"  # a torchrun run's optimizer: DCP reshards it to this one
        if info.enabled and not sharded.is_dir():
            raise LlamaworksError(f"{found[1]} was saved by one process; resume it with one "
                                  "(its optimizer state is not sharded for torchrun)")
        if sharded.is_dir() and (info.enabled or not (state or {}).get("optimizer")):
            D.load_sharded(sharded, model, opt)
        if state is not None:
            if not info.enabled and state.get("optimizer"):
                load_optimizer(opt, state["optimizer"])  # this build's kernel, not the saved
            sched.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            if balance is not None and "moe" in state:
                balance.load_state_dict(state["moe"])

    def autocast() -> Any:
        return torch.autocast(dev.type, dtype=torch.bfloat16) if use_bf16 \
            else contextlib.nullcontext()

    # -- data ---------------------------------------------------------------------------
    train_shards = split_tokens(data_dir, "train")
    dp_rank, dp_size = D.data_rank(info, tc.tensor_parallel)  # a TP group reads one slice
    loader = PackedLoader(train_shards, tc.seq_len, tc.micro_batch, tc.grad_accum,
                          seed=tc.seed, rank=dp_rank, world_size=dp_size)
    val_rows = sequential_rows(split_tokens(data_dir, "val"), tc.seq_len, tc.eval_rows)
    byte_len_np = token_byte_lengths(tok)
    byte_len = torch.from_numpy(byte_len_np)
    uni_bpb = unigram_bpb(train_shards, val_rows[:, 1:], byte_len_np)

    log = MetricsLog(out / "metrics.jsonl", resume_step=start_step) if info.is_main else None
    tokens_per_step = loader.global_batch * tc.seq_len
    flops_step = flops_per_token(cfg, tc.seq_len) * tokens_per_step
    peak = (tc.peak_tflops * 1e12 if tc.peak_tflops else peak_flops(dev)) * info.world_size
    if info.is_main:
        atomic_write_json(out / "train_config.json", {
            "model": cfg.to_hf_dict(), "train": asdict(tc), "data": str(data_dir),
            "tokenizer_sha256": manifest.get("tokenizer_sha256"), "world_size": info.world_size})

    def save(step: int) -> None:
        if info.is_main:
            ckpt.begin(out, step)  # unsealed before any rank rewrites it
        sd = D.full_state_dict(model, info)
        if info.enabled:
            D.save_sharded(ckpt.step_dir(out, step) / "dcp", model, opt)
        st = trainer_state("pretrain", step, {} if info.enabled else opt.state_dict(), sched,
                           {"seed": tc.seed, "next_step": step,
                            "global_batch": loader.global_batch})
        if balance is not None:  # a collective under torchrun: every rank
            st["moe"] = balance.state_dict()
        if info.is_main:
            ckpt.save_checkpoint(out, step, cfg, sd, tok, st, tc.keep_last)
        if info.enabled:
            torch.distributed.barrier()

    summary: dict[str, Any] = {"unigram_bpb": uni_bpb, "start_step": start_step}
    step = start_step
    t0 = time.monotonic()
    bar = tqdm(total=tc.max_steps, initial=start_step, desc="pretrain", unit="step",
               disable=not (tc.progress and info.is_main), dynamic_ncols=True)
    last_eval: tuple[float, float] | None = None
    out_of_time, signalled, loss_val = False, False, None
    with StopFlag() as stop:
        while step < tc.max_steps:
            t_step = time.monotonic()
            loss_sum = 0.0
            for x, y in loader.batch(step):
                x, y = x.to(dev), y.to(dev)
                with autocast():
                    h = model(x, hidden_only=True)
                    loss = linear_cross_entropy(h, model.lm_head.weight, y)
                    total = loss if balance is None else balance.loss(loss)  # + router aux
                (total / tc.grad_accum).backward()
                loss_sum += float(loss.detach())
            grad_norm = float(D.clip_grad_norm_(model.parameters(), tc.grad_clip))
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if balance is not None:
                balance.end_step()  # loads over ranks; bias updates when router_bias_rate
            step += 1
            loss_val = D.all_reduce_mean(loss_sum / tc.grad_accum, info)
            if not math.isfinite(loss_val):
                raise LlamaworksError(f"loss is {loss_val} at step {step}; lower --lr or "
                                      "check the data")
            dt = time.monotonic() - t_step
            row: dict[str, Any] = {"step": step, "loss": loss_val, "lr": lr,
                                   "grad_norm": grad_norm, "tok_per_s": tokens_per_step / dt,
                                   "mfu": flops_step / dt / peak}
            done = step >= tc.max_steps
            # reduced over ranks, so every rank stops (and saves) at the same step
            out_of_time = D.any_rank(tc.max_minutes is not None and
                                     (time.monotonic() - t0) / 60 >= tc.max_minutes, info)
            signalled = D.any_rank(stop.signum is not None, info)
            stopping = done or out_of_time or signalled or \
                (tc.stop_at is not None and step >= tc.stop_at)
            if step % tc.eval_every == 0 or stopping:
                last_eval = evaluate(model, val_rows, byte_len, dev, tc.micro_batch, autocast)
                row["val_loss"], row["val_bpb"] = last_eval
                row["unigram_bpb"] = uni_bpb  # the baseline val_bpb should beat
            logging = step % tc.log_every == 0 or "val_loss" in row or stopping
            if balance is not None and logging:  # on every rank (reduces the aux loss)
                row.update(balance.metrics())
            if log is not None and logging:
                log.log(row)
                if "val_loss" in row:
                    log.plot(out / "loss.png")
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{row['tok_per_s']:.0f}",
                            **({"val_bpb": f"{row['val_bpb']:.3f}"} if "val_bpb" in row else {}))
            if step % tc.save_every == 0 or stopping:
                save(step)
            if stopping:
                break
    bar.close()
    if signalled and info.is_main:
        print(stop.message(step))
    if step >= tc.max_steps or out_of_time:  # the final model, at the top of `out`
        sd = D.full_state_dict(model, info)
        if info.is_main:
            save_native(out, cfg, sd, tokenizer=tok, dtype=torch.float32)
    summary.update(step=step, loss=loss_val,
                   val_loss=last_eval[0] if last_eval else None,
                   val_bpb=last_eval[1] if last_eval else None,
                   minutes=(time.monotonic() - t0) / 60, world_size=info.world_size)
    if info.is_main:
        atomic_write_json(out / "summary.json", summary)
    return summary
