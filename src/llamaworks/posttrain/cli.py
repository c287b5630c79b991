"""Verbs `finetune` (SFT, LoRA or full), `merge` (fold an adapter into a native checkpoint),
`tasks` (write the procedural arithmetic data) and `rl` (GRPO)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llamaworks.cli import _model_path
from llamaworks.errors import LlamaworksError


def _lora_flags(p: argparse.ArgumentParser) -> None:
    from llamaworks.posttrain.lora import ALL_LINEARS

    p.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scaling = alpha/r)")
    p.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA input")
    p.add_argument("--targets", default=",".join(ALL_LINEARS),
                   help="comma-separated linear layers that get adapters")


def _lora_config(args: argparse.Namespace):
    from llamaworks.posttrain.lora import LoraConfig

    try:
        return LoraConfig(r=args.rank, alpha=args.alpha, dropout=args.dropout,
                          target_modules=[t.strip() for t in args.targets.split(",") if t.strip()])
    except ValueError as e:
        raise LlamaworksError(str(e)) from None


def cmd_finetune(args: argparse.Namespace) -> int:
    from llamaworks.checkpoint import load_model, load_tokenizer
    from llamaworks.posttrain.sft import SFTConfig, finetune, load_conversations

    path = _model_path(args)
    convs = load_conversations(args.data)
    try:
        cfg = SFTConfig(lora=None if args.full else _lora_config(args), lr=args.lr,
                        batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps,
                        max_len=args.max_len, pack=args.pack, eval_fraction=args.eval_fraction,
                        eval_every=args.eval_every, seed=args.seed, bf16=args.bf16)
    except ValueError as e:
        raise LlamaworksError(str(e)) from None
    if args.qlora:  # LoRA on the base as the file stores it (its blocks stay quantized)
        if args.full or args.adapter:
            raise LlamaworksError("--qlora trains LoRA adapters on the stored base: drop --full "
                                  "/ --adapter (merge an adapter into an unquantized base first)")
        from llamaworks.infer.load import load_as_stored, with_float_head

        model = with_float_head(load_as_stored(path).model)
    else:
        model = load_model(path).model
    if args.adapter:  # continue from an adapter: merge it into the base first
        from llamaworks.posttrain.lora import load_adapter

        load_adapter(model, args.adapter)
    summary = finetune(model, load_tokenizer(path), convs, cfg, args.out,
                       base_model=str(path.resolve()), fmt=args.format, resume=args.resume,
                       stop_after=args.stop_after)
    print(json.dumps(summary, indent=2))
    kind = "adapter" if cfg.lora else "checkpoint"
    print(f"{kind} written to {args.out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from llamaworks.checkpoint import load_model, load_tokenizer, save_native
    from llamaworks.posttrain.lora import load_adapter

    path = _model_path(args)
    model = load_model(path).model
    load_adapter(model, args.adapter)
    try:
        tok = load_tokenizer(path)
    except LlamaworksError as e:  # weights alone are still worth merging
        print(f"warning: writing no tokenizer ({e})", file=sys.stderr)
        tok = None
    save_native(args.out, model.config, model.state_dict(), tok)
    print(f"merged {args.adapter} into {path.name}: {args.out}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from llamaworks.posttrain.tasks import write_split

    if args.solve:
        return _solve(args)
    if not args.out:
        raise LlamaworksError("pass --out FILE to write problems, or --solve to score a model")
    out = write_split(args.out, args.n, args.split, args.seed, tools=args.conversations)
    print(f"wrote {args.n} {args.split} {'conversations' if args.conversations else 'problems'}"
          f" to {out}")
    return 0


def _load(args: argparse.Namespace):
    from llamaworks.checkpoint import load_model, load_tokenizer
    from llamaworks.posttrain.lora import load_adapter

    path = _model_path(args)
    model = load_model(path).model
    for adapter in args.adapter or []:
        load_adapter(model, adapter)
    if getattr(args, "bf16_weights", False):
        import torch

        model = model.to(torch.bfloat16)
    return path, model, load_tokenizer(path)


def _solve(args: argparse.Namespace) -> int:
    from llamaworks.posttrain.evaluate import accuracy
    from llamaworks.posttrain.tasks import problems

    _, model, tok = _load(args)
    res = accuracy(model, tok, problems(args.n, args.split, args.seed), tools=args.tools,
                   batch_size=args.batch_size)
    res |= {"split": args.split, "tools": args.tools, "adapter": args.adapter,
            "dtype": "bf16" if args.bf16_weights else "fp32"}
    print(json.dumps(res, indent=2))
    return 0


def cmd_rl(args: argparse.Namespace) -> int:
    from llamaworks.posttrain.grpo import GRPOConfig, stack_adapters, train_grpo
    from llamaworks.posttrain.lora import LoraConfig
    from llamaworks.posttrain.tasks import problems

    path, model, tok = _load(args)
    try:
        cfg = GRPOConfig(group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                         steps=args.steps, max_minutes=args.max_minutes, lr=args.lr,
                         kl_coef=args.kl, inner_epochs=args.inner_epochs,
                         temperature=args.temperature, max_new=args.max_new, seed=args.seed,
                         bf16=args.bf16,
                         lora=LoraConfig(r=args.rank, alpha=args.alpha, dropout=0.0))
    except ValueError as e:
        raise LlamaworksError(str(e)) from None
    train_set = problems(args.problems, "train", args.seed + 1)
    out = Path(args.out)
    base = str(path.resolve())
    if not args.adapter:
        summary = train_grpo(model, tok, train_set, cfg, out, base_model=base,
                             resume=args.resume)
    else:  # the policy starts from the merged adapter; OUT gets one adapter stacking both,
        # OUT/policy the GRPO adapter alone (and the state to resume from)
        summary = train_grpo(model, tok, train_set, cfg, out / "policy", base_model=base,
                             resume=args.resume)
        stack_adapters(args.adapter[-1], out / "policy", out, base_model=base)
        for name in ("metrics.jsonl", "reward.png", "grpo_summary.json"):
            (out / name).write_bytes((out / "policy" / name).read_bytes())
    summary.pop("config", None)
    print(json.dumps(summary, indent=2))
    print(f"adapter written to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="supervised fine-tuning (LoRA by default) on chat JSONL")
    p.add_argument("--model", help="base checkpoint (default: the bundled SmolLM2)")
    p.add_argument("--data", required=True,
                   help='JSONL: {"messages": [...OpenAI format...], "tools": [...]} per line')
    p.add_argument("--out", required=True, help="output directory (adapter or checkpoint)")
    p.add_argument("--adapter", help="merge this adapter into the base before training")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--qlora", action="store_true",
                   help="LoRA on the base as stored: a GGUF's quantized matrices stay in their "
                   "blocks (backward through the dequantizing kernels)")
    _lora_flags(p)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (LoRA: 1e-3)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per conversation / row")
    p.add_argument("--pack", action="store_true",
                   help="pack conversations into rows instead of sharing a common prefix")
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=25)
    from llamaworks.chat.formats import FORMATS

    p.add_argument("--format", choices=FORMATS,
                   help="chat format (default: detected from the tokenizer)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast (GPU, or a CPU with AVX-512 BF16/AMX: ~3x faster matmuls)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact OUT/checkpoints/step_N/sft_state.pt "
                        "(saved at every eval), bit-exactly on CPU")
    p.add_argument("--stop-after", type=int, help="stop after this step, schedule unchanged")
    p.set_defaults(fn=cmd_finetune)

    p = sub.add_parser("merge", help="fold a LoRA adapter into a native checkpoint")
    p.add_argument("--model", help="base checkpoint (default: the bundled SmolLM2)")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_merge)

    p = sub.add_parser("tasks", help="write procedural arithmetic word problems (JSONL)")
    p.add_argument("name", choices=["arithmetic"])
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conversations", action="store_true",
                   help="tool-use SFT conversations instead of bare problems")
    p.add_argument("--out", help="JSONL file to write")
    p.add_argument("--solve", action="store_true",
                   help="score a model on the split instead (greedy; prints JSON)")
    p.add_argument("--tools", action="store_true", help="with --solve: offer the calculator")
    p.add_argument("--model", help="with --solve: checkpoint (default: the bundled SmolLM2)")
    p.add_argument("--adapter", action="append", help="with --solve: LoRA adapter(s) to merge")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bf16-weights", action="store_true",
                   help="with --solve: run in bf16 (after merging adapters; ~3x faster on CPUs "
                        "with AVX-512 BF16)")
    p.set_defaults(fn=cmd_tasks)

    p = sub.add_parser("rl", help="GRPO with verifiable rewards on the arithmetic task (LoRA)")
    p.add_argument("--model", help="base checkpoint (default: the bundled SmolLM2)")
    p.add_argument("--adapter", action="append",
                   help="start from this adapter (e.g. the SFT one); the output then stacks both")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--max-minutes", type=float, help="stop (and save) after this wall time")
    p.add_argument("--group-size", type=int, default=4, help="samples per prompt (G)")
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--problems", type=int, default=2000, help="training problems to draw from")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--kl", type=float, default=0.02, help="KL coefficient to the reference")
    p.add_argument("--inner-epochs", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new", type=int, default=96, help="tokens per rollout")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--bf16", action="store_true",
                   help="frozen base weights in bf16 (the adapter stays fp32): ~3x faster on "
                        "CPUs with AVX-512 BF16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue from the state saved every 5 steps in OUT (OUT/policy)")
    p.set_defaults(fn=cmd_rl)
