"""Gopher-style quality rules (Rae et al., 2021, appendix A), thresholds from the recipe.

`quality_reason(text, t)` returns the name of the first rule a document fails, or None."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

_WORD = re.compile(r"\S+")
_SYMBOLS = ("#", "...", "\u2026")


@dataclass
class QualityThresholds:
    """Gopher's defaults; `[filters]` in a recipe overrides any of them."""

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_ellipsis_line_frac: float = 0.3
    max_bullet_line_frac: float = 0.9
    min_alpha_word_frac: float = 0.8
    max_dup_line_frac: float = 0.3   # by line count
    max_dup_para_frac: float = 0.3   # by characters

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QualityThresholds:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown filter thresholds {sorted(unknown)}; known: "
                             f"{', '.join(sorted(names))}")
        return cls(**d)


RULES = ("min_words", "max_words", "mean_word_len", "symbol_word_ratio", "ellipsis_lines",
         "bullet_lines", "alpha_words", "dup_lines", "dup_paragraphs")


def _dup_frac(items: list[str], by_chars: bool) -> float:
    """Fraction of items (or of their characters) that repeat an earlier item."""
    items = [x for x in items if x.strip()]
    if not items:
        return 0.0
    seen: set[str] = set()
    dup = 0
    for x in items:
        if x in seen:
            dup += len(x) if by_chars else 1
        seen.add(x)
    return dup / (sum(len(x) for x in items) if by_chars else len(items))


def quality_reason(text: str, t: QualityThresholds) -> str | None:
    """The first Gopher rule `text` fails, or None if it passes all."""
    words = _WORD.findall(text)
    n = len(words)
    if n < t.min_words:
        return "min_words"
    if n > t.max_words:
        return "max_words"
    mean_len = sum(map(len, words)) / n
    if not t.min_mean_word_len <= mean_len <= t.max_mean_word_len:
        return "mean_word_len"
    symbols = sum(text.count(s) for s in _SYMBOLS)
    if symbols / n > t.max_symbol_word_ratio:
        return "symbol_word_ratio"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines:
        ell = sum(ln.rstrip().endswith(("...", "\u2026")) for ln in lines) / len(lines)
        if ell > t.max_ellipsis_line_frac:
            return "ellipsis_lines"
        bullets = sum(ln.lstrip().startswith(("*", "-", "\u2022")) for ln in lines) / len(lines)
        if bullets > t.max_bullet_line_frac:
            return "bullet_lines"
    alpha = sum(any(map(str.isalpha, w)) for w in words) / n  # = any(c.isalpha() ...), faster
    if alpha < t.min_alpha_word_frac:
        return "alpha_words"
    if _dup_frac(text.split("\n"), by_chars=False) > t.max_dup_line_frac:
        return "dup_lines"
    if _dup_frac(re.split(r"\n\s*\n", text), by_chars=True) > t.max_dup_para_frac:
        return "dup_paragraphs"
    return None
