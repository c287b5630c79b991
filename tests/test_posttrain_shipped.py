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
