"""Constrained decoding: JSON schemas and Lark grammars enforced token by token with llguidance.

`Grammars(tokenizer, vocab_size)` compiles a request's constraint once (the tokenizer's vocabulary
as llguidance reads it is built on first use, ~0.1-1 s, then kept); each sequence gets its own
`Constraint` (an `llguidance.LLMatcher`): before sampling, tokens the grammar cannot continue with
get -inf logits; after sampling, the token advances the matcher; when the grammar is complete the
sequence ends ("stop"). A schema llguidance cannot enforce is refused up front with its message
(`GrammarError`, a ValueError: the server's 400), never silently ignored.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from torch import Tensor

from llamaworks.chat.calls import JSON_LAYOUT  # the layout of JSON in generated text
from llamaworks.errors import LlamaworksError


class GrammarError(LlamaworksError, ValueError):
    """The schema or grammar cannot be enforced (the message says why)."""


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.torch  # noqa: F401 - the bitmask helpers
    except ImportError as e:  # a dependency: only a broken install lacks it
        raise GrammarError(f"structured outputs need llguidance ({e})") from None
    return llguidance


class Constraint:
    """One sequence's grammar state."""

    def __init__(self, matcher: Any, vocab_size: int):
        import llguidance.torch as lt

        self.matcher = matcher
        self.bitmask = lt.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size

    def apply(self, logits: Tensor) -> Tensor:
        """A copy of `logits` [vocab] with every token the grammar forbids at -inf."""
        import llguidance.torch as lt

        out = logits.float().clone()
        lt.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        lt.apply_token_bitmask_inplace(out[None], self.bitmask)
        return out

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} does not continue the grammar: "
                               f"{self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete (nothing more may follow, or only EOS)."""
        return self.matcher.is_stopped()


class Grammars:
    """Compiles constraints for one tokenizer; thread-safe, compiled grammars cached (LRU)."""

    def __init__(self, tokenizer: Any, vocab_size: int, cache: int = 64):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._ll: Any = None
        self._lock = threading.Lock()
        self._grammars: OrderedDict[str, str] = OrderedDict()
        self._cache = cache

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._ll is None:
                ll = _llguidance()
                backend = getattr(self.tokenizer, "backend", None)
                if backend is None:
                    raise GrammarError("structured outputs need a `tokenizers` vocabulary")
                eos = sorted(set(self.tokenizer.stop_ids or []) | (
                    {self.tokenizer.eos_id} if self.tokenizer.eos_id is not None else set()))
                self._ll = ll.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size,
                                          eos_token=eos or None)
            return self._ll

    def compile(self, json_schema: dict | str | None = None, grammar: str | None = None) -> str:
        """The llguidance grammar for a JSON schema (dict or JSON text) or a Lark grammar;
        GrammarError if it cannot be enforced."""
        ll = _llguidance()
        if (json_schema is None) == (grammar is None):
            raise GrammarError("give exactly one of json_schema and grammar")
        if json_schema is not None:
            text = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
            key = "json:" + text
        else:
            key = "lark:" + grammar  # type: ignore[operator]
        with self._lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        try:
            g = (ll.LLMatcher.grammar_from_json_schema(text, defaults=JSON_LAYOUT)
                 if json_schema is not None
                 else ll.LLMatcher.grammar_from_lark(grammar))  # type: ignore[arg-type]
        except ValueError as e:
            raise GrammarError(f"invalid {'JSON schema' if json_schema is not None else 'grammar'}"
                               f": {e}") from None
        bad, messages = ll.LLMatcher.validate_grammar_with_warnings(g, self._tokenizer())
        if bad:
            raise GrammarError(messages[0] if messages else "the grammar is invalid")
        with self._lock:
            self._grammars[key] = g
            while len(self._grammars) > self._cache:
                self._grammars.popitem(last=False)
        return g

    def constraint(self, json_schema: dict | str | None = None, grammar: str | None = None
                   ) -> Constraint:
        """A fresh matcher for one sequence."""
        ll = _llguidance()
        m = ll.LLMatcher(self._tokenizer(), self.compile(json_schema, grammar), log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        return Constraint(m, self.vocab_size)


def json_object_schema() -> dict:
    """What `response_format: {"type": "json_object"}` asks for: any JSON object."""
    return {"type": "object"}


__all__ = ["Constraint", "GrammarError", "Grammars", "json_object_schema"]
