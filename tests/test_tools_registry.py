"""The tool registry (schemas from signatures, validation, errors as text) and the calculator."""

from __future__ import annotations

import ast
import json
import math
from typing import Literal

import pytest
from transformers.utils import get_json_schema

from llamaworks.tools.calculator import CalculatorError, calculator, evaluate
from llamaworks.tools.registry import ToolRegistry, default_registry


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius",
                days: int | None = None) -> dict:
    """Get the weather forecast for a city.

    Args:
        city: The city name, e.g. Zürich
        unit: The temperature unit
        days: How many days ahead
    """
    return {"city": city, "unit": unit, "days": days}


def test_schema_from_signature_matches_transformers_get_json_schema():
    reg = ToolRegistry()
    reg.register(get_weather)
    ours = reg.schemas()[0]
    ref = get_json_schema(get_weather)
    assert ours["function"]["name"] == ref["function"]["name"] == "get_weather"
    assert ours["function"]["description"] == ref["function"]["description"]
    assert ours["function"]["parameters"]["required"] == ref["function"]["parameters"]["required"]
    for name, prop in ref["function"]["parameters"]["properties"].items():
        mine = ours["function"]["parameters"]["properties"][name]
        assert mine.get("description") == prop.get("description")
        assert mine.get("enum") == prop.get("enum")
        assert mine.get("type", "string" if "enum" in mine else None) == prop["type"] or \
            prop["type"] in mine.get("type", [])


def test_call_validates_arguments_and_returns_errors_as_text():
    reg = ToolRegistry()
    reg.register(get_weather)
    assert json.loads(reg.call("get_weather", '{"city": "Bern"}')) == {
        "city": "Bern", "unit": "celsius", "days": None}
    assert reg.call("get_weather", {}).startswith("error: invalid arguments for get_weather: "
                                                  "arguments.city is required")
    assert "must be one of" in reg.call("get_weather", {"city": "x", "unit": "kelvin"})
    assert "must be integer" in reg.call("get_weather", {"city": "x", "days": "two"})
    assert reg.call("nope", {}).startswith("error: unknown tool 'nope'")
    assert "not valid JSON" in reg.call("get_weather", "{city")


def test_tool_exceptions_come_back_as_text():
    reg = ToolRegistry()

    @reg.register(description="Always fails.")
    def broken(x: int) -> str:
        raise RuntimeError(f"boom {x}")

    assert reg.call("broken", {"x": 3}) == "error: RuntimeError: boom 3"
    assert reg.schemas()[0]["function"]["description"] == "Always fails."


def test_explicit_schema_is_used_as_given():
    reg = ToolRegistry()
    params = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"],
              "additionalProperties": False}
    reg.register(lambda q: q.upper(), name="shout", description="Upper-case.", parameters=params)
    assert reg.schemas() == [{"type": "function", "function": {
        "name": "shout", "description": "Upper-case.", "parameters": params}}]
    assert reg.call("shout", {"q": "hi"}) == "HI"
    assert "not an accepted argument" in reg.call("shout", {"q": "hi", "extra": 1})


def test_default_registry_from_comma_list():
    reg = default_registry("calculator, python")
    assert reg.names() == ["calculator", "python"]
    assert reg.call("calculator", {"expression": "17*23"}) == "391"
    with pytest.raises(ValueError, match="unknown built-in tool 'web'"):
        default_registry("web")


@pytest.mark.parametrize("expr", ["17*23", "2**100", "-(3)**2", "7 // 2", "-7 % 3",
                                  "(1 + 2) * (3 - 4) ** 3", "10 - -4", "2**-2", "1.5e3 * 2"])
def test_calculator_agrees_with_python_arithmetic(expr):
    """Python's own evaluation of the same (literal-only) expression is the reference."""
    ref = eval(compile(ast.parse(expr, mode="eval"), "<ref>", "eval"), {"__builtins__": {}})
    assert evaluate(expr) == ref
    assert type(evaluate(expr)) is type(ref)


@pytest.mark.parametrize("expr,want", [
    ("6/3", "2"), ("7/2", "3.5"), ("0.1 + 0.2", "0.3"), ("sqrt(16)", "4"), ("2^10", "1024"),
    ("round(pi, 3)", "3.142"), ("max(1, 5, 3)", "5"), ("factorial(20)", "2432902008176640000"),
    ("2**127 - 1", str(2**127 - 1)), ("gcd(12, 18)", "6"),
])
def test_calculator_results(expr, want):
    assert calculator(expr) == want


@pytest.mark.parametrize("expr,why", [
    ("9**9**9", "too large"), ("10**5000", "too large"), ("factorial(10**6)", "too large"),
    ("1/0", "division by zero"), ("__import__('os')", "unknown function"),
    ("().__class__", "not allowed"), ("'a' * 3", "only numbers"), ("x + 1", "unknown name"),
    ("1e308 * 10", "not a finite number"), ("(-8) ** 0.5", "complex"), ("2 +", "not a valid"),
    ("[1, 2]", "not allowed"), ("True + 1", "only numbers"), ("exp(1000)", "too large"),
])
def test_calculator_refuses_with_a_reason(expr, why):
    with pytest.raises(CalculatorError, match=why):
        evaluate(expr)


def test_calculator_math_functions_match_math_module():
    assert evaluate("sin(1) + log(10)") == math.sin(1) + math.log(10)
