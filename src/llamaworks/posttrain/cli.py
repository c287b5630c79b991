"""Verbs `finetune` (SFT, LoRA or full), `merge` (fold an adapter into a native checkpoint),
`tasks` (write the procedural data: `arithmetic`, the legacy templates, or `suite`, the
generalization suite; `eval`: run the suite through the agent loop) and `rl` (GRPO)."""

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
    p.add_argument("--dropout", type=float, default=None, help="dropout on the LoRA input "
                   "(default 0.05; 0 on mixture-of-experts models, whose expert LoRA takes none)")
    p.add_argument("--targets", default=",".join(ALL_LINEARS),
                   help="comma-separated linear layers that get adapters")


def _lora_config(args: argparse.Namespace):
    from llamaworks.posttrain.lora import LoraConfig

    try:
        return LoraConfig(r=args.rank, alpha=args.alpha,
                          dropout=0.05 if args.dropout is None else args.dropout,
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
                        eval_every=args.eval_every, seed=args.seed, bf16=args.bf16,
                        tensor_parallel=args.tensor_parallel)
    except ValueError as e:
        raise LlamaworksError(str(e)) from None
    if args.qlora:  # LoRA on the base as the file stores it (its blocks stay quantized)
        if args.full or args.adapter:
            raise LlamaworksError("--qlora trains LoRA adapters on the stored base: drop --full "
                                  "/ --adapter (merge an adapter into an unquantized base first)")
        from llamaworks.infer.load import load_as_stored, with_float_head

        model = with_float_head(load_as_stored(path).model)
    else:
        from llamaworks.posttrain.sft import load_split_base

        try:
            model = load_split_base(path, cfg.tensor_parallel)
        except ValueError as e:  # a model that does not split
            raise LlamaworksError(str(e)) from None
        model = model if model is not None else load_model(path).model
    if cfg.lora is not None and args.dropout is None and model.config.n_experts:
        cfg.lora.dropout = 0.0  # experts get one LoRA each, without dropout (as PEFT's)
    if args.adapter:  # continue from an adapter: merge it into the base (its share) first
        from llamaworks.posttrain.lora import load_adapter

        load_adapter(model, args.adapter)
    summary = finetune(model, load_tokenizer(path), convs, cfg, args.out,
                       base_model=str(path.resolve()), fmt=args.format, resume=args.resume,
                       stop_after=args.stop_after)
    import os

    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 writes and prints
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


def _kinds(args: argparse.Namespace) -> tuple[str, ...] | None:
    """--kinds as a tuple (space- or comma-separated), None for all; unknown kinds refused."""
    from llamaworks.posttrain.tasks import KINDS

    if not args.kinds:
        return None
    kinds = tuple(k.strip() for part in args.kinds for k in part.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise LlamaworksError(f"unknown kind {bad[0]!r}: use {', '.join(KINDS)}")
    return kinds


def cmd_tasks(args: argparse.Namespace) -> int:
    if args.name == "eval":
        return _eval_suite(args)
    if args.name == "arithmetic" and (args.split == "heldout" or args.kinds):
        raise LlamaworksError("--split heldout and --kinds are the suite's: the legacy "
                              "arithmetic templates have train and test (use `tasks suite`)")
    split = args.split or "train"
    n = args.n if args.n is not None else 1000
    if args.solve:
        return _solve(args)
    if not args.out:
        raise LlamaworksError("pass --out FILE to write problems, or --solve to score a model")
    what = "conversations" if args.conversations else "problems"
    if args.name == "suite":
        from llamaworks.posttrain.tasks import write_suite

        try:
            out = write_suite(args.out, n, split, _kinds(args), args.seed,
                              conversations=args.conversations)
        except ValueError as e:
            raise LlamaworksError(str(e)) from None
        print(f"wrote {n} suite {split} {what} to {out}")
        return 0
    from llamaworks.posttrain.tasks import write_split

    out = write_split(args.out, n, split, args.seed, tools=args.conversations)
    print(f"wrote {n} {split} {what} to {out}")
    return 0


def _validity_lines(rep: dict) -> list[str]:
    """Tool-call counts overall and per kind: run, malformed, invalid, validity."""
    def line(name: str, c: dict) -> str:
        return (f"{name:<24} {c['calls']:>5} run {c['malformed_calls']:>4} malformed "
                f"{c['invalid_calls']:>4} invalid  validity {c['call_validity']:>6.1%}")

    return ["tool calls", *(line(k, c) for k, c in rep["per_kind"].items() if "calls" in c),
            line("all", rep),
            "finish: " + ", ".join(f"{k} {v}" for k, v in sorted(rep["finish_reasons"].items()))]


def _eval_suite(args: argparse.Namespace) -> int:
    from llamaworks.checkpoint import load_tokenizer
    from llamaworks.cli import _model
    from llamaworks.infer.llm import LLM
    from llamaworks.infer.sampling import SamplingParams
    from llamaworks.posttrain.evaluate import suite_accuracy
    from llamaworks.posttrain.tasks import format_report, suite

    if args.solve or args.out or args.conversations:
        raise LlamaworksError("`tasks eval` runs the suite through the agent loop and prints a "
                              "report: drop --solve / --out / --conversations")
    split = args.split or "heldout"
    n = args.n if args.n is not None else 80
    try:
        problems = suite(n, split, _kinds(args), args.seed)
    except ValueError as e:
        raise LlamaworksError(str(e)) from None
    path = _model_path(args)
    llm = LLM(_model(args, tuple(args.adapter or ())), tokenizer=load_tokenizer(path))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new)
    modes = [False, True] if args.compare else [not args.no_grammar]
    runs = {}
    for grammar in modes:
        try:
            runs["grammar" if grammar else "free"] = suite_accuracy(
                llm, problems, grammar=grammar, max_steps=args.max_steps, params=params,
                progress=not args.json)
        except ValueError as e:  # a chat format without a call grammar
            raise LlamaworksError(f"{e} (--no-grammar)") from None
    meta = {"split": split, "n": n, "kinds": list(_kinds(args) or []), "seed": args.seed,
            "model": str(path), "adapter": args.adapter or []}
    if args.json:
        print(json.dumps(meta | {"runs": runs}, ensure_ascii=False, indent=2))
        return 0
    adapters = f" + {', '.join(args.adapter)}" if args.adapter else ""
    for name, rep in runs.items():
        print(f"== suite {split}, {n} problems, {path.name}{adapters}, "
              f"{'lazy call grammar' if name == 'grammar' else 'free sampling (no grammar)'}")
        print(format_report(rep))
        print("\n".join(_validity_lines(rep)))
        print()
    if len(runs) == 2:
        f, g = runs["free"], runs["grammar"]
        print(f"grammar vs free: accuracy {g['accuracy']:.1%} vs {f['accuracy']:.1%}, "
              f"call validity {g['call_validity']:.1%} vs {f['call_validity']:.1%}")
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
    from llamaworks.posttrain.tasks import problems, suite

    split = args.split or "train"
    n = args.n if args.n is not None else 1000
    _, model, tok = _load(args)
    try:
        items = suite(n, split, _kinds(args), args.seed) if args.name == "suite" else \
            problems(n, split, args.seed)
    except ValueError as e:
        raise LlamaworksError(str(e)) from None
    res = accuracy(model, tok, items, tools=args.tools, batch_size=args.batch_size)
    res |= {"split": split, "tools": args.tools, "adapter": args.adapter,
            "dtype": "bf16" if args.bf16_weights else "fp32"}
    print(json.dumps(res, indent=2))
    return 0


def cmd_rl(args: argparse.Namespace) -> int:
    from llamaworks.posttrain.grpo import GRPOConfig, stack_adapters, train_grpo
    from llamaworks.posttrain.lora import LoraConfig
    from llamaworks.posttrain.tasks import problems, suite

    suite_tasks = args.tasks == "suite"
    if args.kinds and not suite_tasks:
        raise LlamaworksError("--kinds picks suite kinds: add --tasks suite")
    # the suite: room for a <think> plan and up to 3 calls (their results forced in), one retry
    max_new = args.max_new or (384 if suite_tasks else 96)
    max_tool_calls = args.max_tool_calls or (4 if suite_tasks else 2)
    try:
        cfg = GRPOConfig(group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                         steps=args.steps, max_minutes=args.max_minutes, lr=args.lr,
                         kl_coef=args.kl, inner_epochs=args.inner_epochs,
                         temperature=args.temperature, max_new=max_new,
                         max_tool_calls=max_tool_calls, grammar=not args.no_grammar,
                         seed=args.seed, bf16=args.bf16, save_every=args.save_every,
                         keep_last=args.keep_last,
                         lora=LoraConfig(r=args.rank, alpha=args.alpha, dropout=0.0))
        train_set = suite(args.problems, "train", _kinds(args), args.seed + 1) if suite_tasks \
            else problems(args.problems, "train", args.seed + 1)
    except ValueError as e:
        raise LlamaworksError(str(e)) from None
    path, model, tok = _load(args)
    if cfg.grammar:  # refused now (gemma's Python calls have no call grammar), not at step 1
        from llamaworks.chat.calls import schema_functions, tool_call_grammar
        from llamaworks.posttrain.evaluate import tool_schemas

        try:
            tool_call_grammar(tok, schema_functions(tool_schemas(train_set[0])))
        except ValueError as e:
            raise LlamaworksError(f"{e} (--no-grammar)") from None
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
                   help="continue from the newest intact OUT/checkpoints/step_N/ (adapter or "
                        "weights + trainer_state.pt, saved at every eval and on SIGINT/SIGTERM),"
                        " bit-exactly on CPU")
    p.add_argument("--stop-after", type=int, help="stop after this step, schedule unchanged")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="under torchrun --nproc-per-node N: split every block's attention "
                   "heads and MLP over the N ranks (dense float models; LoRA adapters stay "
                   "whole on every rank; each rank reads only its share of an HF safetensors "
                   "checkpoint, GGUF/Meta/.bin ones whole); rank 0 writes what one process "
                   "writes")
    p.set_defaults(fn=cmd_finetune)

    p = sub.add_parser("merge", help="fold a LoRA adapter into a native checkpoint")
    p.add_argument("--model", help="base checkpoint (default: the bundled SmolLM2)")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_merge)

    p = sub.add_parser("tasks", help="write procedural task data (JSONL): the legacy arithmetic "
                       "templates or the generalization suite; `tasks eval`: score a model on "
                       "the suite through the agent loop")
    p.add_argument("name", choices=["arithmetic", "suite", "eval"],
                   help="arithmetic: the seven legacy templates; suite: the generalization "
                   "suite's families; eval: run the suite through the agent loop and print its "
                   "report per family and kind, with tool-call validity")
    p.add_argument("--split", choices=["train", "test", "heldout"],
                   help="train (default) / test: disjoint by question; heldout (suite, and the "
                   "default of eval): the held-out families")
    p.add_argument("--kinds", nargs="+", metavar="KIND",
                   help="suite kinds to draw (arithmetic python multi_call no_tool; default all)")
    p.add_argument("-n", type=int, help="problems (default 1000; eval: 80)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conversations", action="store_true",
                   help="tool-use SFT conversations instead of bare problems (the suite's think "
                   "first, then call, with both tools offered)")
    p.add_argument("--out", help="JSONL file to write")
    p.add_argument("--solve", action="store_true",
                   help="score a model on the split instead (batched greedy rollouts; JSON)")
    p.add_argument("--tools", action="store_true",
                   help="with --solve: offer the tools (arithmetic: the calculator; suite: both)")
    p.add_argument("--model", help="with --solve / eval: checkpoint (default: the bundled "
                   "SmolLM2)")
    p.add_argument("--adapter", action="append",
                   help="with --solve / eval: LoRA adapter(s) to merge (e.g. the shipped "
                   "src/llamaworks/posttrain/adapters/smollm2-135m-tools)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bf16-weights", action="store_true",
                   help="with --solve: run in bf16 (after merging adapters; ~3x faster on CPUs "
                        "with AVX-512 BF16)")
    p.add_argument("--no-grammar", action="store_true",
                   help="eval: sample tool calls freely (default: under the lazy call grammar)")
    p.add_argument("--compare", action="store_true",
                   help="eval: run without and with the grammar, and print both")
    p.add_argument("--max-steps", type=int, default=5,
                   help="eval: model turns per problem (3 calls, a retry, the answer)")
    p.add_argument("--max-new", type=int, default=192, help="eval: tokens per model turn")
    p.add_argument("--json", action="store_true", help="eval: print the reports as JSON")
    p.set_defaults(fn=cmd_tasks)

    p = sub.add_parser("rl", help="GRPO with verifiable rewards on the procedural tasks (LoRA)")
    p.add_argument("--model", help="base checkpoint (default: the bundled SmolLM2)")
    p.add_argument("--adapter", action="append",
                   help="start from this adapter (e.g. the SFT one); the output then stacks both")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--max-minutes", type=float, help="stop (and save) after this wall time")
    p.add_argument("--save-every", type=int, default=5,
                   help="checkpoint every N steps (adapter + trainer state, for --resume)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    p.add_argument("--group-size", type=int, default=4, help="samples per prompt (G)")
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--tasks", choices=["legacy", "suite"], default="legacy",
                   help="legacy: the seven arithmetic templates (as the shipped adapter); suite: "
                   "the generalization suite's training families (checked by kind)")
    p.add_argument("--kinds", nargs="+", metavar="KIND",
                   help="with --tasks suite: the kinds to train on (default all)")
    p.add_argument("--problems", type=int, default=2000, help="training problems to draw from")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--kl", type=float, default=0.02, help="KL coefficient to the reference")
    p.add_argument("--inner-epochs", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new", type=int,
                   help="tokens per rollout, tool results included (default 96; suite 384)")
    p.add_argument("--max-tool-calls", type=int,
                   help="tool turns per rollout (default 2; suite 4: 3 calls and a retry)")
    p.add_argument("--no-grammar", action="store_true",
                   help="sample tool calls freely (default: under the lazy tool-call grammar, "
                   "so every finished call parses)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--bf16", action="store_true",
                   help="frozen base weights in bf16 (the adapter stays fp32): ~3x faster on "
                        "CPUs with AVX-512 BF16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue bit-exactly from the newest intact checkpoint in "
                        "OUT/checkpoints (OUT/policy/checkpoints with --adapter), saved every 5 "
                        "steps and on SIGINT/SIGTERM")
    p.set_defaults(fn=cmd_rl)
