"""`llamaworks chat --tools ...`: the agent loop on the command line (one prompt or a REPL).

With `-p PROMPT --json` it prints `{"answer": final assistant text, "steps": [{"tool",
"arguments", "result"}, ...]}`; otherwise the answer streams to stdout and each tool step is
shown on stderr. `--adapter DIR` merges a LoRA adapter into the model first; without it,
`chat --tools` on the default model uses `DEFAULT_TOOL_ADAPTER` when that directory exists
(`--adapter none` turns that off).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamaworks.errors import LlamaworksError

# The tool-use adapter shipped for the default model (SmolLM2-135M-Instruct), used by
# `chat --tools` when present.
DEFAULT_TOOL_ADAPTER = (Path(__file__).resolve().parents[1] / "posttrain" / "adapters"
                        / "smollm2-135m-tools")


def chat_adapter(args: argparse.Namespace) -> Path | None:
    """The adapter directory `chat` should merge: --adapter DIR, none for `--adapter none`, else
    DEFAULT_TOOL_ADAPTER for `--tools` on the default model when it exists."""
    given = getattr(args, "adapter", None)
    if given is not None:
        if given.lower() == "none":
            return None
        path = Path(given)
        if not path.is_dir():
            raise LlamaworksError(f"--adapter {given}: no such directory; pass the folder a "
                                  "finetune run saved its LoRA adapter to")
        return path
    if getattr(args, "tools", None) and not getattr(args, "model", None) \
            and DEFAULT_TOOL_ADAPTER.is_dir():
        return DEFAULT_TOOL_ADAPTER
    return None


def load_chat_model(args: argparse.Namespace,
                    load: Callable[[argparse.Namespace, tuple[str, ...]], Any]) -> Any:
    """The model for `chat`: `load(args, adapters)` with the adapter (if any: --adapter, or the
    shipped tool adapter with --tools) merged before --quant applies."""
    if getattr(args, "tools", None):
        from llamaworks.tools.registry import default_registry

        default_registry(args.tools)  # unknown tool names fail before the model loads
    adapter = chat_adapter(args)
    if adapter is None:
        return load(args, ())
    model = load(args, (str(adapter),))
    print(f"(LoRA adapter merged: {adapter})", file=sys.stderr)
    return model


def _show_step(event: dict) -> None:
    """Human-readable progress: the answer streams to stdout, tool steps go to stderr."""
    if event["type"] == "delta":
        sys.stdout.write(event["text"])
        sys.stdout.flush()
    elif event["type"] == "tool":
        args = json.dumps(event["arguments"], ensure_ascii=False)
        print(f"\n[{event['tool'] or 'tool call'} {args if event['tool'] else ''}] -> "
              f"{event['result']}", file=sys.stderr)
    elif event["type"] == "final" and event["finish_reason"] != "stop":
        print(f"\n(stopped: {event['finish_reason']})", file=sys.stderr)


def run_tool_chat(args: argparse.Namespace, model: Any, tok: Any, voice: Any = None) -> int:
    """`chat --tools`: answer -p once (optionally as JSON) or run a REPL, with the agent loop.
    `voice` (a `voice.cli.ChatVoice`): --voice-in / --voice-out's one spoken reply, and the
    REPL's /voice."""
    from llamaworks.infer.llm import LLM
    from llamaworks.infer.sampling import SamplingParams
    from llamaworks.tools.agent import run_agent
    from llamaworks.tools.registry import default_registry

    try:
        registry = default_registry(args.tools)
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed,
                                max_tokens=args.max_new_tokens)
    except ValueError as e:
        raise LlamaworksError(str(e)) from None
    llm = LLM(model, tokenizer=tok, compile=getattr(args, "compile", False))
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    show = None if args.json else _show_step
    if voice is not None and voice.once_requested:  # --voice-in, or -p with --voice-out
        from llamaworks.voice.turn import agent_deltas

        def reply(text: str) -> Any:
            return agent_deltas(lambda on_event: run_agent(
                llm, history + [{"role": "user", "content": text}], registry,
                max_steps=args.max_steps, params=params, on_event=on_event))

        return voice.once(reply)
    if args.prompt is not None:
        res = run_agent(llm, history + [{"role": "user", "content": args.prompt}], registry,
                        max_steps=args.max_steps, params=params, on_event=show)
        if args.json:
            print(json.dumps({"answer": res.answer, "steps": res.steps}, ensure_ascii=False))
        else:
            sys.stdout.write("\n")
        return 0
    from llamaworks.cli import chat_repl

    start = list(history)

    def turn(line: str) -> None:
        nonlocal history
        res = run_agent(llm, history + [{"role": "user", "content": line}], registry,
                        max_steps=args.max_steps, params=params, on_event=show)
        if args.json:
            print(json.dumps({"answer": res.answer, "steps": res.steps}, ensure_ascii=False))
        else:
            sys.stdout.write("\n")
        history = res.messages

    def reset() -> None:
        nonlocal history
        history = list(start)

    chat_repl(f"llamaworks chat · tools: {', '.join(registry.names())} · /reset clears the "
              "history, /exit quits", turn, reset, voice.hear_file if voice is not None else None)
    return 0
