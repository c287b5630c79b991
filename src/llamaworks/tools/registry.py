"""Tools described by JSON schema (OpenAI `tools` format) and called by name with JSON arguments.

`ToolRegistry.register(fn)` derives the schema from the signature and type hints (str, int,
float, bool, list[...], dict, Literal[...], Optional) and the docstring (first paragraph = the
description; Google-style `Args:` lines = parameter descriptions), or takes one given explicitly.
`call(name, arguments)` validates the arguments against the schema and returns the result as
text; every failure (unknown tool, bad arguments, the tool raising) comes back as an "error: ..."
string for the model to read, never as an exception.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llamaworks.errors import LlamaworksError

_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean",
                               list: "array", dict: "object", type(None): "null"}


class ToolError(LlamaworksError, ValueError):
    """A tool that cannot be registered or looked up; the message names the fix."""


@dataclass
class Tool:
    """A callable tool: `fn(**arguments)` returns anything (text, or JSON-encodable)."""

    name: str
    description: str
    parameters: dict
    fn: Callable[..., Any]

    def schema(self) -> dict:
        """The OpenAI `tools` entry for this tool."""
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": self.parameters}}


def _type_schema(tp: Any) -> dict:
    """JSON schema for a Python type hint."""
    if tp is inspect.Parameter.empty or tp is Any:
        return {}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1:
            return _type_schema(non_null[0])
        return {"anyOf": [_type_schema(a) for a in args]}
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple):
        item = _type_schema(args[0]) if args else {}
        return {"type": "array", **({"items": item} if item else {})}
    if origin is dict or tp is dict:
        return {"type": "object"}
    if tp in _JSON_TYPES:
        return {"type": _JSON_TYPES[tp]}
    raise ToolError(f"cannot describe parameter type {tp!r} in JSON schema; use str, int, "
                    "float, bool, list, dict or Literal, or pass parameters= explicitly")


def _doc_parts(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    doc = inspect.getdoc(fn) or ""
    description = doc.split("\n\n")[0].replace("\n", " ").strip()
    params: dict[str, str] = {}
    m = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.*\n?)+)", doc, re.M)
    if m:
        for line in m.group(1).splitlines():
            pm = re.match(r"\s*(\w+)(?:\s*\([^)]*\))?\s*:\s*(.+)", line)
            if pm:
                params[pm.group(1)] = pm.group(2).strip()
    return description, params


def schema_from_function(fn: Callable[..., Any]) -> tuple[str, dict]:
    """(description, JSON-schema parameters) from a function's signature, hints and docstring."""
    description, docs = _doc_parts(fn)
    hints = typing.get_type_hints(fn)
    props: dict[str, dict] = {}
    required: list[str] = []
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        prop = _type_schema(hints.get(name, p.annotation))
        if name in docs:
            prop["description"] = docs[name]
        props[name] = prop
        if p.default is inspect.Parameter.empty:
            required.append(name)
    return description, {"type": "object", "properties": props, "required": required}


def _is_type(value: Any, t: str) -> bool:
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or (
            isinstance(value, float) and value.is_integer())
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    py = {"string": str, "boolean": bool, "array": list, "object": dict, "null": type(None)}
    return isinstance(value, py.get(t, object))


def validate(value: Any, schema: Mapping[str, Any], path: str = "arguments") -> list[str]:
    """Problems with `value` against the JSON-schema subset tools use: type (incl. lists of
    types), enum, const, properties, required, additionalProperties: false, items, anyOf/oneOf,
    minimum/maximum, minLength/maxLength. Unknown keywords are ignored."""
    errs: list[str] = []
    t = schema.get("type")
    if t is not None:
        types_ = t if isinstance(t, list) else [t]
        if not any(_is_type(value, x) for x in types_):
            return [f"{path} must be {' or '.join(types_)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{path} must be one of {schema['enum']}, got {value!r}")
    if "const" in schema and value != schema["const"]:
        errs.append(f"{path} must be {schema['const']!r}")
    for key in ("anyOf", "oneOf"):
        if key in schema and all(validate(value, s, path) for s in schema[key]):
            errs.append(f"{path} matches none of the allowed schemas")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errs.append(f"{path} must be >= {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errs.append(f"{path} must be <= {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errs.append(f"{path} must have at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errs.append(f"{path} must have at most {schema['maxLength']} characters")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errs.append(f"{path}.{name} is required")
        for name, v in value.items():
            if name in props:
                errs += validate(v, props[name], f"{path}.{name}")
            elif schema.get("additionalProperties") is False:
                errs.append(f"{path}.{name} is not an accepted argument "
                            f"(accepted: {', '.join(props) or 'none'})")
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, v in enumerate(value):
            errs += validate(v, schema["items"], f"{path}[{i}]")
    return errs


def _as_text(result: Any) -> str:
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(result)


class ToolRegistry:
    """Named tools; `schemas()` for the prompt, `call()` to run one."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self.tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, tool: Tool) -> Tool:
        """Register a ready Tool (replacing one of the same name)."""
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", tool.name):
            raise ToolError(f"tool name {tool.name!r} must be 1-64 letters, digits, _ or -")
        self.tools[tool.name] = tool
        return tool

    def register(self, fn: Callable[..., Any] | None = None, *, name: str | None = None,
                 description: str | None = None, parameters: dict | None = None) -> Any:
        """Register a Python callable as a tool (also usable as a decorator, with or without
        keyword arguments). The schema comes from its signature unless `parameters` is given."""
        def deco(f: Callable[..., Any]) -> Callable[..., Any]:
            desc, params = (description, parameters) if parameters is not None else (
                None, None)
            if params is None:
                desc_from_doc, params = schema_from_function(f)
                desc = description if description is not None else desc_from_doc
            elif desc is None:
                desc = _doc_parts(f)[0]
            self.add(Tool(name or f.__name__, desc or "", params, f))
            return f
        return deco(fn) if fn is not None else deco

    def __contains__(self, name: object) -> bool:
        return name in self.tools

    def __len__(self) -> int:
        return len(self.tools)

    def names(self) -> list[str]:
        """Registered tool names, in registration order."""
        return list(self.tools)

    def schemas(self) -> list[dict]:
        """The OpenAI `tools` list."""
        return [t.schema() for t in self.tools.values()]

    def call(self, name: str, arguments: Mapping[str, Any] | str | None) -> str:
        """Run tool `name` with `arguments` (a dict or a JSON object string) and return its
        result as text; any failure is returned as "error: ..." text, never raised."""
        tool = self.tools.get(name)
        if tool is None:
            return f"error: unknown tool {name!r}; available tools: {', '.join(self.tools)}"
        if arguments is None or arguments == "":
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                return f"error: arguments for {name} are not valid JSON ({e.msg})"
        problems = validate(arguments, tool.parameters)
        if problems:
            return f"error: invalid arguments for {name}: " + "; ".join(problems)
        try:
            return _as_text(tool.fn(**arguments))
        except Exception as e:  # the model reads the failure and may retry
            return f"error: {type(e).__name__}: {e}"


def python_tool(code: str) -> str:
    """Run Python code in a sandbox (no network, no files outside a fresh temporary directory,
    5 s CPU, 256 MB memory) and return what it prints; the value of a final expression is
    printed too."""
    from llamaworks.tools.sandbox import run_python

    r = run_python(code)
    parts = [r.stdout.rstrip("\n")] if r.stdout else []
    if r.stderr:
        parts.append("stderr:\n" + r.stderr.rstrip("\n"))
    if r.killed_reason:
        parts.append(f"error: killed: {r.killed_reason}")
    elif r.exit_code:
        parts.append(f"error: exit code {r.exit_code}")
    return "\n".join(parts) if parts else "(no output)"


PYTHON_PARAMETERS = {"type": "object", "properties": {"code": {
    "type": "string", "description": "Python source; print() what you need to see"}},
    "required": ["code"]}

BUILTINS = ("calculator", "python")


def builtin_tool(name: str) -> Tool:
    """The built-in tool `name` ("calculator" or "python")."""
    if name == "calculator":
        from llamaworks.tools import calculator as calc

        return Tool(calc.NAME, calc.DESCRIPTION, calc.PARAMETERS, calc.calculator)
    if name == "python":
        from llamaworks.tools.sandbox import check_isolation

        check_isolation()  # strict mode without every layer: a clear error before any model loads
        return Tool("python", inspect.getdoc(python_tool).replace("\n", " "), PYTHON_PARAMETERS,
                    python_tool)
    raise ToolError(f"unknown built-in tool {name!r}; choose from {', '.join(BUILTINS)}")


def default_registry(names: str | Iterable[str] = BUILTINS) -> ToolRegistry:
    """A registry of built-in tools, from a list or a comma-separated string
    ("calculator,python")."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    return ToolRegistry(builtin_tool(n) for n in names)
