"""Reasoning blocks kept apart from the answer: whole replies, replies arriving in any pieces
(the streamed split always equals the whole one), and prompts that open the block themselves
(the DeepSeek-R1 distills' template, as published)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from llamaworks.chat.reasoning import ReasoningStreamer, opens_in_thought, split_reasoning

REPLIES = [
    ("<think>\nAdd them: 2 + 2 = 4.\n</think>\n\nThe answer is 4.", False,
     ("Add them: 2 + 2 = 4.", "The answer is 4.")),
    ("  <think>short</think>Yes.", False, ("short", "Yes.")),
    ("No block, <think> later is text.", False, (None, "No block, <think> later is text.")),
    ("I weigh it up.\n</think>\n\nDone.", True, ("I weigh it up.", "Done.")),
    ("<think>cut off mid-thought", False, ("cut off mid-thought", "")),
    ("<think>plan</think><tool_call>\n{\"name\": \"f\"}\n</tool_call>", False,
     ("plan", "<tool_call>\n{\"name\": \"f\"}\n</tool_call>")),
    ("", False, (None, "")),
]


@pytest.mark.parametrize(("text", "in_thought", "want"), REPLIES)
def test_a_whole_reply_splits_into_reasoning_and_answer(text, in_thought, want):
    assert split_reasoning(text, in_thought) == want


@pytest.mark.parametrize(("text", "in_thought", "want"), REPLIES)
def test_streamed_pieces_of_any_size_give_the_same_split(text, in_thought, want):
    rng = random.Random(len(text))
    for _ in range(30):
        s, reasoning, answer, i = ReasoningStreamer(in_thought), "", "", 0
        while i < len(text):
            n = rng.randint(1, 6)
            r, a = s.feed(text[i:i + n])
            reasoning, answer, i = reasoning + r, answer + a, i + n
        r, a = s.flush()
        reasoning, answer = reasoning + r, answer + a
        want_r, want_a = want
        assert answer == want_a
        assert (reasoning.strip() or None) == (want_r or None) or (want_r == "" and not reasoning)


R1 = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}
QWEN3 = {"eos_token": "<|im_end|>"}


def _render(name: str, special: dict, **kwargs) -> str:
    from llamaworks.tokenizer.chat import render_chat

    path = Path(__file__).resolve().parents[1] / ".cache" / "templates" / f"{name}.jinja"
    if not path.is_file():
        pytest.fail(f"{path} is missing: `make test` extracts the published templates")
    return render_chat(path.read_text(encoding="utf-8"), [{"role": "user", "content": "2+2?"}],
                       add_generation_prompt=True, special_tokens=special, **kwargs)


def test_the_r1_distill_prompt_opens_the_block_and_qwen3_without_thinking_does_not():
    r1 = "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"  # (llama.cpp's copy: enable_thinking switch)
    assert opens_in_thought(_render(r1, R1, enable_thinking=True))
    assert not opens_in_thought(_render(r1, R1))  # closed at once: no reasoning
    thinking = _render("Qwen-Qwen3-0.6B", QWEN3)
    off = _render("Qwen-Qwen3-0.6B", QWEN3, enable_thinking=False)
    assert not opens_in_thought(thinking) and not opens_in_thought(off)
    assert off.endswith("<think>\n\n</think>\n\n") and not thinking.endswith("</think>\n\n")


@pytest.mark.parametrize("dim", [True, False])
def test_the_cli_shows_reasoning_dimmed_on_a_terminal_and_the_answer_after_it(dim):
    import io

    from llamaworks.cli import _Thoughts

    out = io.StringIO()
    shown = _Thoughts(out, dim)
    streamer = ReasoningStreamer()
    w = shown.writer(streamer)
    for piece in ["<th", "ink>wei", "gh it</thi", "nk>\n\nThe ", "answer."]:
        w.write(piece)
    shown.write(*streamer.flush())
    shown.close()
    want = "\x1b[2mweigh it\x1b[0m\n\nThe answer." if dim else "weigh it\n\nThe answer."
    assert out.getvalue() == want
