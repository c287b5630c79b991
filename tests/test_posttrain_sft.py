"""SFT: the loss sees assistant tokens only, the shared-prefix and packed batchings compute the
same loss as one conversation at a time, bad data files are refused with the line number, and a
short LoRA run lowers the held-out loss and saves an adapter that loads."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from infer_fixtures import ByteTokenizer, tiny_model

from llamaworks.posttrain.lora import LoraConfig, load_adapter
from llamaworks.posttrain.sft import (
    IGNORE,
    DataError,
    Example,
    SFTConfig,
    _labels,
    encode_conversation,
    finetune,
    load_conversations,
    pack,
    packed_loss,
    prefixed_loss,
    shared_prefix_len,
)
from llamaworks.posttrain.tasks import problems, tool_conversation


def _one_at_a_time(model, examples):
    total, n = 0.0, 0
    for e in examples:
        logits = model(torch.tensor([e.ids]))[0]
        target = torch.tensor(_labels(e.ids, e.mask))
        total += F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")
        n += int((target != IGNORE).sum())
    return total, n


def _examples(seed: int, n: int, prefix_len: int = 40) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 259, (prefix_len,), generator=g).tolist()
    out = []
    for _ in range(n):
        k = int(torch.randint(10, 30, (), generator=g))
        ids = prefix + torch.randint(3, 259, (k,), generator=g).tolist()
        mask = [0] * (prefix_len + k // 2) + [1] * (k - k // 2)
        out.append(Example(ids, mask))
    return out


def test_shared_prefix_batch_has_the_same_loss_as_one_conversation_at_a_time():
    model = tiny_model(std=0.1)
    ex = _examples(0, 5)
    p = shared_prefix_len(ex)
    assert p >= 40
    with torch.no_grad():
        got, n = prefixed_loss(model, ex[0].ids[:p], ex)
        want, m = _one_at_a_time(model, ex)
    assert n == m
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_packed_rows_have_the_same_loss_as_one_conversation_at_a_time():
    model = tiny_model(std=0.1)
    ex = _examples(1, 7, prefix_len=5)
    rows = pack(ex, 128)
    assert len(rows) < len(ex)  # several conversations share a row
    with torch.no_grad():
        got, n = packed_loss(model, rows, 128)
        want, m = _one_at_a_time(model, ex)
    assert n == m
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_assistant_mask_covers_exactly_the_assistant_turns(smollm_tokenizer):
    conv = {"messages": tool_conversation(problems(1, "test")[0]),
            "tools": [{"type": "function", "function": {
                "name": "calculator", "description": "Evaluate arithmetic.",
                "parameters": {"type": "object", "properties": {
                    "expression": {"type": "string"}}, "required": ["expression"]}}}]}
    ids, mask = encode_conversation(smollm_tokenizer, conv)
    from llamaworks.chat.formats import render

    assert smollm_tokenizer.decode(ids) == render(smollm_tokenizer, conv["messages"],
                                                  conv["tools"])
    trained = smollm_tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    call = conv["messages"][1]["tool_calls"][0]["function"]["arguments"]
    answer = conv["messages"][3]["content"]
    assert trained.startswith("<tool_call>") and json.loads(call)["expression"] in trained
    assert trained.endswith(answer + "<|im_end|>")
    assert "<tool_response>" not in trained and "How many" not in trained
    assert trained.count("<|im_end|>") == 2 and "<|im_start|>" not in trained


def test_mistral_assistant_mask_covers_the_calls_and_answers_with_their_eos(vocab_dir):
    """SFT in the mistral format (Nemo's template, the canonical one; a SentencePiece vocabulary
    as Mistral-7B's): the ids are the whole rendered text's, and the trained tokens are exactly
    the `[TOOL_CALLS]` list and the answer, each with its `</s>`, never the `[AVAILABLE_TOOLS]`
    schemas, the `[INST]` question or the `[TOOL_RESULTS]` block."""
    from llamaworks.chat.formats import assistant_spans, render
    from llamaworks.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(vocab_dir / "ggml-vocab-llama-spm.gguf")
    conv = {"messages": [{"role": "system", "content": "Use the calculator."},
                         *tool_conversation(problems(1, "test")[0])],
            "tools": [{"type": "function", "function": {
                "name": "calculator", "description": "Evaluate arithmetic.",
                "parameters": {"type": "object", "properties": {
                    "expression": {"type": "string"}}, "required": ["expression"]}}}]}
    ids, mask = encode_conversation(tok, conv, fmt="mistral")
    text = render(tok, conv["messages"], conv["tools"], fmt="mistral")
    assert ids == tok.encode(text, bos=False)  # tokenized whole, as a prompt is
    _, spans = assistant_spans(tok, conv["messages"], conv["tools"], fmt="mistral")
    call, answer = (text[a:b] for a, b in spans)
    assert call.startswith("[TOOL_CALLS][{") and call.endswith("}]</s>")
    assert answer == conv["messages"][-1]["content"] + "</s>"
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    # "[/INST][TOOL_CALLS]" has a "][" token across the boundary (not special tokens in this
    # vocabulary): it belongs to the assistant turn it starts
    assert trained == "]" + call + answer
    untrained = tok.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    for part in ("[AVAILABLE_TOOLS]", "How many", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"):
        assert part in untrained and part not in trained


def test_finetune_format_takes_every_chat_format():
    from llamaworks.chat.formats import FORMATS
    from llamaworks.cli import build_parser

    for fmt in FORMATS:
        args = build_parser().parse_args(["finetune", "--data", "d.jsonl", "--out", "o",
                                          "--format", fmt])
        assert args.format == fmt
    assert "mistral" in FORMATS


def test_bad_data_files_name_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "hi"}, '
                 '{"role": "assistant", "content": "yo"}]}\n{not json\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        load_conversations(f)
    f.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=r":1: no assistant message"):
        load_conversations(f)
    with pytest.raises(DataError, match="no such file"):
        load_conversations(tmp_path / "missing.jsonl")


class _ChatBytes(ByteTokenizer):
    chat_template = None


def _byte_chat_spans(tok, messages, tools=None, fmt=None):
    """A byte-level stand-in for the chat renderer: "<user>...\n<assistant>...\n" spans."""
    text, out = "<system>You add numbers.\n", []
    for m in messages:
        head = f"<{m['role']}>"
        if m["role"] == "assistant":
            out.append((len(text) + len(head), len(text) + len(head) + len(m["content"]) + 1))
        text += head + m["content"] + "\n"
    return text, out


@pytest.mark.slow
def test_lora_run_lowers_heldout_loss_and_saves_a_loadable_adapter(tmp_path, monkeypatch):
    import llamaworks.posttrain.sft as sft

    monkeypatch.setattr("llamaworks.chat.formats.assistant_spans", _byte_chat_spans)
    convs = [{"messages": [{"role": "user", "content": f"{a}+{b}"},
                           {"role": "assistant", "content": f"{a + b}"}]}
             for a in range(10) for b in range(10)]
    model = tiny_model(std=0.1)
    cfg = SFTConfig(lr=3e-3, batch_size=8, max_steps=40, eval_fraction=0.1, eval_every=20,
                    min_shared_prefix=8)
    summary = finetune(model, _ChatBytes(), convs, cfg, tmp_path / "ad", progress=False)
    assert summary["shared_prefix_tokens"] >= 8
    assert summary["final_val_loss"] < summary["first_val_loss"] * 0.8
    rows = [json.loads(x) for x in (tmp_path / "ad" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 40 and "val_loss" in rows[-1]
    assert (tmp_path / "ad" / "loss.png").stat().st_size > 1000
    merged = load_adapter(tiny_model(std=0.1), tmp_path / "ad")
    x = torch.tensor([[3, 40, 50, 60]])
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=0)
    assert sft.trainable_parameters(model) > 0


def _assert_stopped_and_resumed_equals_uninterrupted(tmp_path, stop_after, damage=None):
    """8 LoRA steps straight vs. stopped after `stop_after`, `damage(part_dir)`, resumed."""
    convs = [{"messages": [{"role": "user", "content": f"{a}*{b}"},
                           {"role": "assistant", "content": f"{a * b}"}]}
             for a in range(6) for b in range(6)]
    cfg = SFTConfig(lr=3e-3, batch_size=4, max_steps=8, eval_fraction=0.1, eval_every=2,
                    min_shared_prefix=8, lora=LoraConfig(r=4, alpha=8, dropout=0.1))
    whole = tiny_model(std=0.1)
    finetune(whole, _ChatBytes(), convs, cfg, tmp_path / "whole", progress=False)
    part = tiny_model(std=0.1)
    finetune(part, _ChatBytes(), convs, cfg, tmp_path / "part", progress=False,
             stop_after=stop_after)
    if damage is not None:
        damage(tmp_path / "part")
    resumed = tiny_model(std=0.1)
    summary = finetune(resumed, _ChatBytes(), convs, cfg, tmp_path / "part", progress=False,
                       resume=True)
    assert summary["steps"] == 8
    a = {n: p for n, p in whole.named_parameters() if "lora" in n}
    b = {n: p for n, p in resumed.named_parameters() if "lora" in n}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    assert [r.get("loss") for r in rows] == [r.get("loss") for r in ref]


@pytest.mark.slow
def test_stopped_and_resumed_run_equals_the_uninterrupted_run_bit_for_bit(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr("llamaworks.chat.formats.assistant_spans", _byte_chat_spans)
    _assert_stopped_and_resumed_equals_uninterrupted(tmp_path, stop_after=4)


@pytest.mark.slow
def test_resume_skips_a_truncated_state_and_continues_bit_for_bit_from_the_one_before(
        tmp_path, monkeypatch):
    monkeypatch.setattr("llamaworks.chat.formats.assistant_spans", _byte_chat_spans)

    def truncate_newest(part):
        states = sorted(p.name for p in (part / "checkpoints").iterdir())
        assert states == ["step_000004", "step_000006"]  # the last two kept
        newest = part / "checkpoints" / "step_000006" / "trainer_state.pt"
        newest.write_bytes(newest.read_bytes()[:100])

    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*step_000006.*trainer_st"):
        _assert_stopped_and_resumed_equals_uninterrupted(tmp_path, 6, truncate_newest)


def test_shared_prefix_stops_before_the_first_trained_token_even_inside_a_common_turn():
    # Both conversations share 12 tokens; tokens 5-6 of that shared run are trained (an
    # identical first assistant turn), 7-11 are not (a tool result): the prefix must end at the
    # predictor of token 5, not at the last untrained shared token.
    common = list(range(10, 22))
    ex = [Example(common + [40, 41, 42], [0] * 5 + [1] * 2 + [0] * 5 + [1] * 3),
          Example(common + [50, 51], [0] * 5 + [1] * 2 + [0] * 5 + [1] * 2)]
    assert shared_prefix_len(ex) == 4
    model = tiny_model(std=0.1)
    with torch.no_grad():
        got, n = prefixed_loss(model, ex[0].ids[:4], ex)
        want, m = _one_at_a_time(model, ex)
    assert n == m
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
