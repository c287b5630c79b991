"""The tool-use adapter shipped in the repo: `chat --tools` on the default model picks it up, calls
the calculator on held-out word problems and answers them exactly."""

from __future__ import annotations

import json

import pytest

from llamaworks.cli import main
from llamaworks.posttrain.lora import read_adapter
from llamaworks.posttrain.tasks import is_correct, problems
from llamaworks.tools.chat import DEFAULT_TOOL_ADAPTER


def test_the_shipped_adapter_is_a_peft_lora_for_smollm2():
    cfg, tensors, _ = read_adapter(DEFAULT_TOOL_ADAPTER)
    assert cfg.r >= 8 and len(tensors) == 2 * 7 * 30  # every linear of the 30 layers
    assert (DEFAULT_TOOL_ADAPTER / "README.md").is_file()


@pytest.mark.slow
def test_chat_tools_solves_heldout_problems_with_the_shipped_adapter(capsys):
    solved = 0
    for p in problems(3, "test", seed=7):
        assert main(["chat", "--tools", "calculator", "-p", p.question, "--json",
                     "--temperature", "0"]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["steps"] and out["steps"][0]["tool"] == "calculator"
        solved += is_correct(out["answer"], p.answer)
    assert solved >= 2


@pytest.mark.slow
def test_server_with_the_adapter_calls_the_calculator_on_its_own_and_answers(tmp_path):
    """tool_choice "auto" through the official openai client: the adapter-tuned model asks for
    the calculator, the client runs it, the model answers with the exact result."""
    import openai

    from llamaworks.posttrain.tasks import calculator_schemas
    from llamaworks.serve.app import create_app
    from llamaworks.serve.background import BackgroundServer
    from llamaworks.serve.cli import build_engine, serve_args
    from llamaworks.tools.registry import default_registry

    engine, name = build_engine(serve_args("--adapter", str(DEFAULT_TOOL_ADAPTER), "--max-batch",
                                           "2", "--max-queue", "4", "--context", "1024",
                                           "--model-name", "tools"))
    p = problems(1, "test", seed=11)[0]
    try:
        with BackgroundServer(create_app(engine, name)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                   timeout=300)
            messages = [{"role": "user", "content": p.question}]
            first = client.chat.completions.create(model=name, messages=messages,
                                                   tools=calculator_schemas(), max_tokens=64,
                                                   temperature=0)
            choice = first.choices[0]
            assert choice.finish_reason == "tool_calls"
            call = choice.message.tool_calls[0]
            assert call.function.name == "calculator"
            result = default_registry(["calculator"]).call("calculator",
                                                           json.loads(call.function.arguments))
            messages += [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": result}]
            final = client.chat.completions.create(model=name, messages=messages,
                                                   tools=calculator_schemas(), max_tokens=32,
                                                   temperature=0)
            assert is_correct(final.choices[0].message.content, p.answer)
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_sampled_tool_calls_in_auto_mode_are_always_valid_calls(monkeypatch):
    """tool_choice "auto" at temperature 1.0: once the adapter-tuned model opens a call, the lazy
    grammar holds it to the calculator's schema, so every call it starts parses (without the
    grammar, some of the same sampled replies are broken calls left in the text)."""
    import openai

    from llamaworks.chat import calls as C
    from llamaworks.posttrain.tasks import calculator_schemas
    from llamaworks.serve.app import create_app
    from llamaworks.serve.background import BackgroundServer
    from llamaworks.serve.cli import build_engine, serve_args

    engine, name = build_engine(serve_args("--adapter", str(DEFAULT_TOOL_ADAPTER), "--max-batch",
                                           "4", "--context", "1024", "--model-name", "tools"))
    qs = [p.question for p in problems(8, "test", seed=5)]

    def broken(client) -> tuple[int, int]:
        calls = bad = 0
        for i, q in enumerate(qs):
            r = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": q}],
                tools=calculator_schemas(), max_tokens=64, temperature=1.0, seed=i)
            msg = r.choices[0].message
            for c in msg.tool_calls or []:
                calls += 1
                try:
                    args = json.loads(c.function.arguments)
                except json.JSONDecodeError:
                    args = None
                ok = c.function.name == "calculator" and isinstance(args, dict) and \
                    isinstance(args.get("expression"), str) and set(args) == {"expression"}
                bad += not ok
            bad += "<tool_call>" in (msg.content or "")  # a call that did not parse
        return calls, bad

    try:
        with BackgroundServer(create_app(engine, name)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                   timeout=300)
            calls, bad = broken(client)
            assert calls >= len(qs) // 2 and bad == 0
            monkeypatch.setattr(C, "lazy_call_grammar", lambda *a, **k: None)  # no grammar
            _, bad_free = broken(client)
    finally:
        engine.shutdown()
    assert bad_free > 0  # the same sampling without the grammar breaks calls
