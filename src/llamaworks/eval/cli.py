"""`llamaworks eval`: bits per byte, multiple-choice and generative tasks; `eval convert` turns
published dataset layouts into task files; `eval lm-eval ...` runs lm-eval's CLI with
`--model llamaworks` registered."""

from __future__ import annotations

import argparse
import json
from typing import Any

from llamaworks.errors import LlamaworksError

CONVERT_FORMATS = ("hellaswag", "piqa", "arc", "boolq", "gsm8k")


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from llamaworks.eval.runner import load_for_eval, run_task
    from llamaworks.eval.tasks import load_task, load_task_file

    if args.task is None and args.task_file is None:
        raise LlamaworksError("pass --task NAME or --task-file F (.jsonl task or a text file "
                              "for bits per byte)")
    if args.threads:
        torch.set_num_threads(args.threads)
    task = (load_task_file(args.task_file) if args.task_file
            else load_task(args.task, args.limit and args.limit + args.num_fewshot, args.seed))
    model, tok = load_for_eval(args.model, args.adapter, args.quant, args.group_size)
    res = run_task(task, model, tok, num_fewshot=args.num_fewshot, limit=args.limit,
                   batch_size=args.batch_size, seed=args.seed, window=args.window,
                   stride=args.stride, chat=args.chat, max_tokens=args.max_new_tokens)
    items = res.pop("items", None)
    if args.json:
        print(json.dumps(res if not args.show_items else {**res, "items": items},
                         ensure_ascii=False))
    else:
        print(format_table(res))
        if args.show_items and items:
            for it in items:
                print(json.dumps(it, ensure_ascii=False))
    return 0


def format_table(res: dict[str, Any]) -> str:
    """One header line and one value line, metrics in a fixed order."""
    keys = [k for k in ("n", "acc", "acc_norm", "acc_bytes", "exact_match", "scored", "bytes",
                        "bpb", "perplexity") if k in res]
    cells = [("task", str(res["task"]))] + [
        (k, f"{res[k]:.4f}" if isinstance(res[k], float) else str(res[k])) for k in keys]
    widths = [max(len(a), len(b)) for a, b in cells]
    return ("  ".join(a.ljust(w) for (a, _), w in zip(cells, widths, strict=True)) + "\n"
            + "  ".join(b.ljust(w) for (_, b), w in zip(cells, widths, strict=True))).rstrip()


def cmd_convert(args: argparse.Namespace) -> int:
    from llamaworks.eval.convert import convert_file

    n = convert_file(args.format, args.input, args.output)
    print(f"wrote {n} items to {args.output} ({args.format} -> llamaworks task schema)")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from llamaworks.eval.lm_eval import main

    return main(args.rest)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `eval` verb (with `convert` and `lm-eval` sub-verbs)."""
    p = sub.add_parser("eval", help="evaluate: bits per byte, multiple choice, generative tasks")
    p.add_argument("--model", "-m", help="GGUF file, HF/native directory or Meta directory "
                   "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (merged in)")
    p.add_argument("--quant", choices=["bf16", "int8", "int4"], default=None)
    p.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128])
    p.add_argument("--task", default=None, help="a built-in task: arithmetic")
    p.add_argument("--task-file", default=None, help="multiple-choice or generative .jsonl, "
                   "or a text file (bits per byte)")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--seed", type=int, default=1234, help="few-shot example draw")
    p.add_argument("--window", type=int, default=None,
                   help="bits per byte: tokens per forward pass (default: the model's context)")
    p.add_argument("--stride", type=int, default=None,
                   help="bits per byte: new tokens scored per window (default: the window)")
    p.add_argument("--chat", action="store_true",
                   help="generative: wrap prompts in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generative: token limit")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--show-items", action="store_true",
                   help="generative: also print each completion and extracted answer")
    p.set_defaults(fn=cmd_eval)
    verbs = p.add_subparsers(dest="eval_verb", metavar="{convert,lm-eval}")
    c = verbs.add_parser("convert", help="published dataset JSON/JSONL -> llamaworks task file")
    c.add_argument("--from", dest="format", required=True, choices=CONVERT_FORMATS)
    c.add_argument("input", help="the dataset's JSON or JSONL file")
    c.add_argument("output", help="the task .jsonl to write")
    c.set_defaults(fn=cmd_convert)
    # prefix_chars "+": every argument after `lm-eval` (options included) goes to lm-eval
    h = verbs.add_parser("lm-eval", help="lm-eval's CLI with --model llamaworks registered",
                         add_help=False, prefix_chars="+")
    h.add_argument("rest", nargs=argparse.REMAINDER)
    h.set_defaults(fn=cmd_lm_eval)


