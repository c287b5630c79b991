"""`llamaworks chat --tools/--json/--adapter`: the adapter hook and the CLI wiring."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from infer_fixtures import tiny_model

from llamaworks.checkpoint import save_native
from llamaworks.cli import _model, main
from llamaworks.tools import chat as tool_chat


def _args(**kw) -> argparse.Namespace:
    base = {"tools": None, "model": None, "adapter": None, "quant": None, "group_size": 32}
    return argparse.Namespace(**{**base, **kw})


def test_default_tool_adapter_is_used_only_for_tools_on_the_default_model(tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(tool_chat, "DEFAULT_TOOL_ADAPTER", tmp_path)
    assert tool_chat.chat_adapter(_args(tools="calculator")) == tmp_path
    assert tool_chat.chat_adapter(_args()) is None
    assert tool_chat.chat_adapter(_args(tools="calculator", model="x.gguf")) is None
    assert tool_chat.chat_adapter(_args(tools="calculator", adapter="none")) is None
    monkeypatch.setattr(tool_chat, "DEFAULT_TOOL_ADAPTER", tmp_path / "missing")
    assert tool_chat.chat_adapter(_args(tools="calculator")) is None


def test_adapter_is_merged_into_the_loaded_model(tmp_path):
    from llamaworks.posttrain.lora import LoraConfig, apply_lora, lora_modules, save_adapter

    torch.manual_seed(0)
    cfg = LoraConfig(r=2, alpha=4, dropout=0.0, target_modules=("q_proj",))
    trained = apply_lora(tiny_model(), cfg)
    for _, m in lora_modules(trained):
        torch.nn.init.normal_(m.lora_B, std=0.5)
    save_adapter(trained, cfg, tmp_path / "adapter")
    base = tiny_model()
    save_native(tmp_path / "base", base.config, base.state_dict())
    merged = tool_chat.load_chat_model(
        _args(model=str(tmp_path / "base"), adapter=str(tmp_path / "adapter")), _model)
    x = torch.tensor([[1, 5, 9, 4]])
    with torch.no_grad():
        assert not torch.allclose(merged(x), tiny_model()(x))
        torch.testing.assert_close(merged(x), trained(x), atol=1e-4, rtol=1e-4)


def test_missing_adapter_dir_is_a_clear_error(capsys, tmp_path):
    rc = main(["chat", "--adapter", str(tmp_path / "nope"), "-p", "hi"])
    assert rc == 2
    assert "--adapter" in capsys.readouterr().err


def test_unknown_tool_name_fails_before_loading_the_model(capsys):
    rc = main(["chat", "--tools", "calculator,web", "-p", "hi"])
    assert rc == 2
    assert "unknown built-in tool 'web'" in capsys.readouterr().err


@pytest.mark.slow
def test_chat_tools_json_prints_answer_and_steps(capsys):
    rc = main(["chat", "--tools", "calculator", "-p", "What is 2+2?", "--json", "-n", "8",
               "--temperature", "0", "--adapter", "none"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"answer", "steps"}
    assert isinstance(out["answer"], str) and out["answer"]
    assert all(set(s) == {"tool", "arguments", "result"} for s in out["steps"])
