"""Reasoning blocks: the `<think>...</think>` text of models that think before they answer
(DeepSeek-R1 and its distills, Qwen3, QwQ), kept apart from the answer.

A reply is `<think>reasoning</think>answer`; templates that open the block themselves (the R1
distills' generation prompt ends in `<think>\\n`) make the model start inside it, which
`opens_in_thought(prompt)` tells. `split_reasoning` cuts a whole reply, `ReasoningStreamer` does it
for text arriving in pieces (holding back what could be the start of a tag), so a server can send
`delta.reasoning_content` and `delta.content` as DeepSeek's API does.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def opens_in_thought(prompt: str) -> bool:
    """The rendered prompt leaves the model inside a reasoning block (it ends with an open
    `<think>`, as the R1 distills' and some Qwen3 prompts do)."""
    tail = prompt.rstrip()
    return tail.endswith(OPEN)


def split_reasoning(text: str, in_thought: bool = False) -> tuple[str | None, str]:
    """(reasoning, answer) of a whole reply; reasoning None when the reply has no block. A block
    never closed (the reply was cut) is all reasoning."""
    if not in_thought:
        stripped = text.lstrip()
        if not stripped.startswith(OPEN):
            return None, text
        text = stripped[len(OPEN):]
    end = text.find(CLOSE)
    if end < 0:
        return text.strip(), ""
    return text[:end].strip(), text[end + len(CLOSE):].lstrip()


def _held(text: str, tag: str) -> int:
    """How many trailing characters of `text` could begin `tag` (so must wait for more)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningStreamer:
    """Feed reply text as it arrives; get back (reasoning delta, answer delta) each time."""

    def __init__(self, in_thought: bool = False):
        self.state = "thinking" if in_thought else "start"
        self.buf = ""
        self.reasoning_started = False

    def feed(self, delta: str) -> tuple[str, str]:
        self.buf += delta
        reasoning = content = ""
        while True:
            if self.state == "start":  # a reply may open with (blanks and) <think>
                stripped = self.buf.lstrip()
                if stripped.startswith(OPEN):
                    self.buf, self.state = stripped[len(OPEN):], "thinking"
                    continue
                if OPEN.startswith(stripped):  # maybe the tag, not complete yet
                    return reasoning, content
                self.state = "answer"
                continue
            if self.state == "thinking":
                end = self.buf.find(CLOSE)
                if end >= 0:
                    reasoning += self.buf[:end]
                    self.buf, self.state = self.buf[end + len(CLOSE):], "after"
                    continue
                keep = _held(self.buf, CLOSE)
                reasoning += self.buf[:len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
                break
            if self.state == "after":  # the blank line between the block and the answer
                stripped = self.buf.lstrip()
                if not stripped:
                    self.buf = ""
                    break
                self.buf, self.state = stripped, "answer"
                continue
            content += self.buf
            self.buf = ""
            break
        if not self.reasoning_started:  # drop the blanks that open a block
            reasoning = reasoning.lstrip()
            self.reasoning_started = bool(reasoning)
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """What is still held at the end of the reply."""
        rest, self.buf = self.buf, ""
        if self.state == "thinking":
            return rest, ""
        return "", rest if self.state != "after" else rest.lstrip()
