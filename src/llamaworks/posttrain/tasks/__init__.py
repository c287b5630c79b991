"""Verifiable task data, generated procedurally (no download).

- `legacy`: the seven arithmetic templates the shipped tool-use adapter was trained on, with
  their API unchanged (`problems`, `tool_conversation`, `write_split`, `is_correct`).
- `suite`: the generalization suite, ~60 template families of four kinds (arithmetic,
  python, multi_call, no_tool) with canonical tool calls, think-then-act SFT conversations, a
  split by family (`HELDOUT`) on top of the split by question hash, per-kind checkers and
  per-family reports. The families live in `arithmetic`, `programs`, `multi` and `notool`.
"""

from llamaworks.posttrain.tasks.base import KINDS, Call, Family, SuiteProblem
from llamaworks.posttrain.tasks.legacy import (
    CALCULATOR_CALL,
    NAMES,
    TEMPLATES,
    Problem,
    calculator_schemas,
    extract_answer,
    is_correct,
    iter_jsonl,
    problems,
    write_split,
)
from llamaworks.posttrain.tasks.suite import (
    CHECKERS,
    HELDOUT,
    HELDOUT_FAMILIES,
    LEGACY_FAMILIES,
    SPLITS,
    answer_text,
    check,
    check_number,
    check_python,
    families,
    final_answer,
    format_report,
    legacy_suite,
    report,
    suite,
    suite_schemas,
    think_conversation,
    tool_conversation,
    write_suite,
)

__all__ = [
    "CALCULATOR_CALL", "CHECKERS", "HELDOUT", "HELDOUT_FAMILIES", "KINDS", "LEGACY_FAMILIES",
    "NAMES", "SPLITS", "TEMPLATES", "Call", "Family", "Problem", "SuiteProblem", "answer_text",
    "calculator_schemas", "check", "check_number", "check_python", "extract_answer", "families",
    "final_answer", "format_report", "is_correct", "iter_jsonl", "legacy_suite", "problems",
    "report", "suite", "suite_schemas", "think_conversation", "tool_conversation", "write_split",
    "write_suite",
]
