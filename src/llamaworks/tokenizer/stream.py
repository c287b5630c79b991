"""Incremental detokenization for streaming output.

Feed ids one at a time; each call returns the new text. Text is produced by decoding a short window
of recent ids and diffing it against the same window without the newest ids, so decoders that look
at neighbours (byte fallback, UTF-8 split across byte-level tokens, SentencePiece's leading-space
strip) give exactly what decoding everything at once gives. A window whose text ends in U+FFFD
(an incomplete UTF-8 sequence) is held back until more ids complete it or `flush()` is called.
With HF's ByteFallback decoder (tokenizer.json sources) a trailing run of `<0xXX>` byte tokens is
held back too: it turns a whole run into U+FFFD when any byte in it is invalid, so earlier bytes of
the run are not final until the run ends. The concatenation of everything returned equals
`tokenizer.decode(all_ids)`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamaworks.tokenizer.core import Tokenizer

REPLACEMENT = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class StreamDecoder:
    """Streaming detokenizer: `put(id) -> str` per token, `flush() -> str` at the end."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # everything returned so far
        self._prefix = 0  # window start: ids[_prefix:_read] were already turned into text
        self._read = 0
        self._byte_ids: dict[int, bool] = {}
        self._hold_byte_runs = tokenizer.uses_backend_decoder
        self._skipped: frozenset[int] = frozenset()
        if skip_special_tokens:  # as Tokenizer.decode: tool-call markers are kept
            self._skipped = tokenizer.special_ids - tokenizer.kept_specials

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def put(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        return self._step(final=False)

    def feed(self, ids: Iterable[int]) -> str:
        """Add several ids; return the text they complete."""
        return "".join(self.put(i) for i in ids)

    def flush(self) -> str:
        """Return whatever is held back (an incomplete character decodes as U+FFFD)."""
        return self._step(final=True)

    def reset(self) -> None:
        """Forget everything (start a new stream)."""
        self.ids.clear()
        self.text = ""
        self._prefix = self._read = 0

    def _is_byte_token(self, token_id: int) -> bool:
        hit = self._byte_ids.get(token_id)
        if hit is None:
            text = self.tokenizer.id_to_token(token_id)
            hit = self._byte_ids[token_id] = bool(text and _BYTE_TOKEN.fullmatch(text))
        return hit

    def _in_byte_run(self) -> bool:
        """Whether the newest id that decode keeps is a byte token."""
        for i in reversed(self.ids):
            if i not in self._skipped:
                return self._is_byte_token(i)
        return False

    def _step(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        if not final and self._hold_byte_runs and self._in_byte_run():
            return ""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if not final and after.endswith(REPLACEMENT):
            return ""
        if after.startswith(before):
            delta = after[len(before):]
        else:  # a decoder rewrote earlier text: fall back to decoding everything
            full = self._decode(self.ids)
            delta = full[len(self.text):] if full.startswith(self.text) else ""
        # Move the window start only past ids that produce text on their own, so a decoder's
        # leading-space strip always lands on text inside the window.
        if self._decode(self.ids[self._read:]):
            self._prefix = self._read
        self._read = len(self.ids)
        self.text += delta
        return delta
