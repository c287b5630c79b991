"""The `calculator` tool: arithmetic by walking Python's AST (no `eval`), with bounded sizes.

Allowed: int/float literals, + - * / // % **, unary + and -, parentheses, the constants pi, e, tau,
and the functions in `FUNCTIONS` (`^` is read as a power, as people and models write it; `×` and
`÷` as * and /). Integers stay exact (`2**100` is every digit); `/` gives an
int when the division is exact, else a float. Results are limited to `MAX_BITS` bits and
exponents to `MAX_EXPONENT`, so `9**9**9` is refused instead of eating the machine.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

MAX_CHARS = 2000
MAX_BITS = 13_000  # ~3,900 digits: under Python's 4,300-digit int->str limit
MAX_EXPONENT = 13_000
MAX_DEPTH = 100

NAME = "calculator"
DESCRIPTION = ("Evaluate an arithmetic expression exactly: + - * / // % ** and parentheses, "
               "functions sqrt, abs, round, min, max, floor, ceil, log, log10, exp, sin, cos, tan, "
               "factorial, gcd; constants pi, e.")
PARAMETERS = {"type": "object", "properties": {"expression": {
    "type": "string", "description": "e.g. (17 * 23) + sqrt(2) / 4"}}, "required": ["expression"]}


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot evaluate; the message says why."""


def _factorial(n: Any) -> int:
    if not isinstance(n, int) or n < 0:
        raise CalculatorError("factorial needs a non-negative integer")
    if n > 5000:
        raise CalculatorError(f"factorial({n}) is too large (limit 5000)")
    return math.factorial(n)


def _round(x: Any, ndigits: Any = None) -> Any:
    return round(x) if ndigits is None else round(x, int(ndigits))


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "abs": abs, "round": _round, "min": min, "max": max,
    "floor": math.floor, "ceil": math.ceil, "log": math.log, "log10": math.log10,
    "log2": math.log2, "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan,
    "factorial": _factorial, "gcd": math.gcd, "isqrt": math.isqrt,
}
CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
}


def _check_size(x: Any) -> Any:
    if isinstance(x, int) and x.bit_length() > MAX_BITS:
        raise CalculatorError(f"result too large (over {MAX_BITS} bits)")
    if isinstance(x, float) and not math.isfinite(x):
        raise CalculatorError("result is not a finite number (float overflow or nan)")
    if isinstance(x, complex):
        raise CalculatorError("complex result (e.g. a fractional power of a negative number)")
    return x


def _pow(a: Any, b: Any) -> Any:
    if isinstance(b, int) and abs(b) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {b} too large (limit {MAX_EXPONENT})")
    if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1 \
            and (abs(a).bit_length() - 1) * b > MAX_BITS:
        raise CalculatorError(f"result too large (over {MAX_BITS} bits)")
    return a ** b


def _div(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and b != 0 and a % b == 0:
        return a // b
    return a / b


def _eval(node: ast.AST, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise CalculatorError("expression nested too deeply")
    d = depth + 1
    if isinstance(node, ast.Expression):
        return _eval(node.body, d)
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float):
            return node.value
        raise CalculatorError(f"only numbers are allowed, not {node.value!r}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand, d)
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left, d), _eval(node.right, d)
        if isinstance(node.op, ast.Pow):
            return _check_size(_pow(a, b))
        if isinstance(node.op, ast.Div):
            return _check_size(_div(a, b))
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise CalculatorError(f"operator {type(node.op).__name__} is not allowed")
        return _check_size(op(a, b))
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        raise CalculatorError(f"unknown name {node.id!r}; constants: {', '.join(CONSTANTS)}")
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise CalculatorError(f"unknown function; allowed: {', '.join(FUNCTIONS)}")
        if node.keywords:
            raise CalculatorError("keyword arguments are not allowed")
        args = [_eval(a, d) for a in node.args]
        return _check_size(FUNCTIONS[node.func.id](*args))
    raise CalculatorError(f"{type(node).__name__} is not allowed in an arithmetic expression")


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; raises CalculatorError (a ValueError) with the
    reason when the expression is not allowed, invalid or too large."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("empty expression")
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"expression longer than {MAX_CHARS} characters")
    text = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"not a valid expression ({e.msg})") from None
    try:
        return _eval(tree)
    except CalculatorError:
        raise
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("result too large for a float") from None
    except (ValueError, TypeError) as e:
        raise CalculatorError(str(e)) from None


def format_number(x: int | float) -> str:
    """Ints exactly; floats to 15 significant digits (so 0.1 + 0.2 shows as 0.3)."""
    if isinstance(x, float):
        if x.is_integer() and abs(x) < 1e15:
            return str(int(x))
        return format(x, ".15g")
    return str(x)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly and return the result as text."""
    return format_number(evaluate(expression))
