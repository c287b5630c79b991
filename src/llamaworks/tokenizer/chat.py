"""Chat templates rendered with jinja2 exactly as `transformers.apply_chat_template` renders them.

Same environment (sandboxed, immutable, trim_blocks + lstrip_blocks, loopcontrols, a no-op
`{% generation %}` block), same globals (`raise_exception`, `strftime_now`, `dict`, `namespace`),
same `tojson` filter (ensure_ascii=False, indent/separators/sort_keys), same variables
(`messages`, `tools`, `documents`, `add_generation_prompt`, the special-token strings, extra keyword
arguments), and the same input clean-up (message keys whose value is None are dropped, reasoning
fields aliased).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llamaworks.errors import TokenizerError

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its
    body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A jinja namespace that refuses underscore-prefixed attributes (as transformers does)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace "
                f"({name!r})")


@lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
    """Compile (cached) a chat template in transformers' jinja environment."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template does not parse (line {e.lineno}: {e.message}); "
                             "fix the template or pass another one") from None


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON-like types (what transformers exposes)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list[Any]) -> list[Any]:
    out = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next((message[k] for k in _REASONING_FIELDS
                              if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat(template: str | None, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool = True, tools: Sequence[Any] | None = None,
                documents: Sequence[Mapping[str, Any]] | None = None,
                special_tokens: Mapping[str, str] | None = None, **kwargs: Any) -> str:
    """Render `messages` with `template` the way transformers does (tokenize=False)."""
    if not template:
        raise TokenizerError(
            "this tokenizer has no chat template: pass one (chat_template=... / --chat-template "
            "FILE), or use a model whose GGUF has tokenizer.chat_template or whose "
            "tokenizer_config.json has chat_template")
    if not messages:
        raise TokenizerError("cannot apply a chat template to an empty conversation; pass at "
                             "least one message")
    chat: list[Any] = []
    for m in messages:
        if not isinstance(m, Mapping):
            raise TokenizerError(f"chat messages must be dicts with 'role' and 'content', got "
                                 f"{m!r}")
        chat.append({k: v for k, v in m.items() if v is not None})
    tool_schemas = None
    if tools is not None:
        tool_schemas = []
        for tool in tools:
            if not isinstance(tool, Mapping):
                raise TokenizerError(
                    f"tools must be JSON-schema dicts ({{'type': 'function', 'function': {{...}}}})"
                    f", got {type(tool).__name__}; convert functions with "
                    "transformers.utils.get_json_schema first")
            tool_schemas.append(tool)
    if documents is not None and any(not isinstance(d, Mapping) for d in documents):
        raise TokenizerError("documents must be dicts with 'title' and 'text' keys")
    variables = {**(special_tokens or {}), **kwargs}
    compiled = compile_template(template)
    try:
        return compiled.render(messages=_alias_reasoning(_plain(chat)), tools=_plain(tool_schemas),
                               documents=_plain(documents),
                               add_generation_prompt=add_generation_prompt, **_plain(variables))
    except jinja2.TemplateError as e:
        raise TokenizerError(f"the chat template refused these messages: {e}") from e
