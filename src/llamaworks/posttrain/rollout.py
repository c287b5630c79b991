"""Batched tool-using rollouts for GRPO and for scoring the arithmetic task, on the engine.

Each prompt is one engine sequence (`infer.engine.Engine`) with a turn hook (nanochat's forced
tokens): when the model ends its turn (EOS) with a complete tool call, the tool runs and its
result, rendered in the chat format up to the next assistant header, is forced into the row and
fed as one chunk. Forced tokens are marked 0 in `mask`, so training never learns to predict tool
output. The shared prompt prefix (system prompt + tool schemas) is computed once: the engine's
prefix cache hands its blocks to every later row.

`lazy_grammars` (one `(trigger, grammar)` per prompt, `chat.calls.lazy_call_grammar`) samples
each row's tool calls under the call grammar of its tools, so every call the model finishes
parses. `ConversationStep` is the turn hook of one tool-using conversation; it follows the agent
loop's rule (`tools.agent`): a turn with any call that does not parse runs none of its calls, and
the parse errors go back to the model as the tool result (counted in `malformed`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llamaworks.chat.calls import schema_functions
from llamaworks.infer.engine import Engine
from llamaworks.infer.sampling import SamplingParams
from llamaworks.model import Llama

# Given a prompt's index and the assistant text of its turn, return the text to force in (tool
# results + the next assistant header), or None when the turn holds no tool call: the row is done.
ToolStep = Callable[[int, str], str | None]


@dataclass
class Rollout:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # everything after the prompt
    mask: list[int] = field(default_factory=list)  # 1 = sampled by the model, 0 = forced
    turns: list[str] = field(default_factory=list)  # assistant text of each turn
    tool_calls: int = 0  # turns answered by the tool step (with a ConversationStep: calls run)
    finished: bool = False  # ended its last turn with EOS (not cut by max_new)
    malformed_calls: int = 0  # parse errors in turns the model ended (ConversationStep)
    invalid_calls: int = 0  # parsed calls naming no offered tool, or refused by its schema
    cut_call: bool = False  # max_new cut the last turn inside a call

    @property
    def final_text(self) -> str:
        return self.turns[-1] if self.turns else ""


@torch.inference_mode()
def rollout(model: Llama, tokenizer: Any, prompts: Sequence[Sequence[int]], *,
            max_new: int = 96, temperature: float = 0.0, seed: int | None = None,
            tool_step: ToolStep | None = None, max_tool_calls: int = 2,
            eos_ids: Sequence[int] | None = None, max_batch: int = 32,
            lazy_grammars: Sequence[tuple[str, str] | None] | None = None) -> list[Rollout]:
    """Generate one rollout per prompt (use repeated prompts for groups); sampled rollouts use
    generator seed + i for prompt i; `lazy_grammars[i]`: prompt i's tool-call grammar."""
    if lazy_grammars is not None and len(lazy_grammars) != len(prompts):
        raise ValueError("lazy_grammars needs one entry (or None) per prompt")
    longest = max(len(p) for p in prompts)
    max_new = min(max_new, model.config.max_seq_len - longest)
    if max_new < 1:
        raise ValueError(f"a prompt has {longest} tokens; the context is "
                         f"{model.config.max_seq_len}")
    engine = Engine(model, tokenizer, max_batch=min(max_batch, len(prompts)),
                    context=longest + max_new)
    eos = set(eos_ids if eos_ids is not None else tokenizer.stop_ids or [])
    eos |= set(model.config.eos_token_ids)
    base = seed if seed is not None else int(torch.randint(2**31, ()))
    groups = []
    for i, p in enumerate(prompts):
        params = SamplingParams(temperature=temperature, max_tokens=max_new,
                                seed=base + i if temperature > 0 else None,
                                lazy_grammar=lazy_grammars[i] if lazy_grammars else None)
        hook = lambda text, i=i: tool_step(i, text) if tool_step is not None else None  # noqa
        groups.append(engine.sequences(list(p), params, hook, max_tool_calls, eos))
    engine.run(groups)
    out = []
    for p, (s,) in zip(prompts, groups, strict=True):
        r = Rollout(list(p), s.ids, s.sampled, s.turns, s.turn_hooks, s.finish == "stop")
        if not r.finished and len(r.turns) <= r.tool_calls:  # cut by max_new: the partial turn
            r.turns.append(tokenizer.decode(s.ids[s.turn_start:], skip_special_tokens=True))
        out.append(r)
    return out


class ConversationStep:
    """The tool step of one conversation (a turn hook): parse the turn's tool calls, run them,
    and return the rendered tool results up to the next assistant header (in the model's chat
    format, `fmt`: default the tokenizer's); None when the turn holds no call (the row is
    done).

    As in the agent loop, a turn with any call that does not parse (bad JSON, no name, unclosed)
    runs none of its calls: the turn stays as the model wrote it and the tool message carries the
    parse errors, so the model can write the call again. Counts: `calls` (run), `malformed` (one
    per parse error), `invalid` (a parsed call naming no offered tool, or whose arguments its
    schema refuses; the runner answers it with its own error)."""

    def __init__(self, tokenizer: Any, messages: list[dict], tools: list[dict],
                 run_tool: Callable[[str, dict], str], fmt: str | None = None):
        from llamaworks.chat.formats import detect_format

        self.tokenizer, self.tools, self.run_tool = tokenizer, tools, run_tool
        self.fmt = fmt or detect_format(tokenizer)
        self.history = list(messages)
        self.calls = self.malformed = self.invalid = 0
        self._params = {n: p for n, p in schema_functions(tools)}

    def _invalid(self, name: str, arguments: dict) -> bool:
        from llamaworks.tools.registry import validate

        return name not in self._params or bool(validate(arguments, self._params[name] or {}))

    def __call__(self, text: str) -> str | None:
        from llamaworks.chat.formats import render
        from llamaworks.chat.parse import parse_tool_calls
        from llamaworks.tools.agent import parse_error_result

        parsed = parse_tool_calls(text, self.fmt)
        history, tools = self.history, self.tools
        if parsed.errors:  # nothing of this turn runs; the model sees what it wrote and why
            self.malformed += len(parsed.errors)
            history.append({"role": "assistant", "content": text})
            before = render(self.tokenizer, history, tools, fmt=self.fmt)
            history.append({"role": "tool", "tool_call_id": "",
                            "content": parse_error_result(parsed.errors)})
        elif not parsed.calls:
            return None
        else:
            calls = [c.to_openai() for c in parsed.calls]
            history.append({"role": "assistant", "content": parsed.content, "tool_calls": calls})
            before = render(self.tokenizer, history, tools, fmt=self.fmt)
            for c in parsed.calls:
                self.calls += 1
                self.invalid += self._invalid(c.name, c.arguments)
                history.append({"role": "tool", "tool_call_id": c.id, "name": c.name,
                                "content": self.run_tool(c.name, c.arguments)})
        after = render(self.tokenizer, history, tools, add_generation_prompt=True, fmt=self.fmt)
        # The model's own turn ended at its EOS token; everything the template adds after that
        # marker (a newline, the tool turn, the next assistant header) is forced in.
        end = before.rstrip()
        if not after.startswith(end):
            raise ValueError("the chat template rewrites earlier turns; cannot continue a rollout")
        return after[len(end):]


def conversation_step(tokenizer: Any, messages: list[dict], tools: list[dict],
                      run_tool: Callable[[str, dict], str], fmt: str | None = None
                      ) -> ConversationStep:
    """`ConversationStep(...)`: the tool step of one conversation."""
    return ConversationStep(tokenizer, messages, tools, run_tool, fmt)


def cut_call(text: str, fmt: str = "chatml") -> bool:
    """Whether a turn cut off by the token limit holds a call that does not parse (one left
    unfinished, or broken before the cut)."""
    from llamaworks.chat.parse import parse_tool_calls

    return bool(parse_tool_calls(text, fmt).errors)


def per_prompt(steps: Sequence[Callable[[str], str | None]]) -> ToolStep:
    """One ToolStep dispatching to each prompt's own conversation step."""
    return lambda i, text: steps[i](text)


def calculator_runner(name: str, arguments: dict) -> str:
    """Run a tool of the arithmetic task (just the calculator); errors come back as text."""
    from llamaworks.tools.registry import default_registry

    return default_registry(["calculator"]).call(name, arguments)
