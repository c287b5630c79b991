"""Gopher quality rules: each rule rejects a document built to break it, and only that rule;
a normal paragraph passes all of them."""

from __future__ import annotations

import pytest

from llamaworks.data.filters import RULES, QualityThresholds, quality_reason

T = QualityThresholds(min_words=20, max_words=500)
GOOD = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch "
        "and drinks his coffee slowly in the morning sun.\n") * 1 + (
        "Later that day the children walked to the river to look for smooth stones and frogs "
        "among the reeds near the old mill.")
LINES = [f"line number {w} has some plain words about the weather today" for w in
         ("one", "two", "three", "four", "five")]

CASES = {
    "min_words": "too short to keep",
    "max_words": "word " * 501,
    "mean_word_len": " ".join(["a"] * 30),
    "symbol_word_ratio": GOOD + " # # # # # # # # # # # # # #",
    "ellipsis_lines": "\n".join(f"{ln} ..." for ln in LINES),
    "bullet_lines": "\n".join(f"- {ln}" for ln in LINES),
    "alpha_words": GOOD + " " + " ".join(["1234 5678"] * 20),
    "dup_lines": "\n".join([LINES[0]] * 5 + LINES[1:2]),
    # few repeated lines by count, but most characters sit in a repeated paragraph
    "dup_paragraphs": "\n\n".join([GOOD.replace("\n", " ")] * 3 + LINES),
}


def test_a_normal_paragraph_passes_every_rule():
    assert quality_reason(GOOD, T) is None


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_rejects_its_planted_document(rule):
    assert quality_reason(CASES[rule], T) == rule


def test_thresholds_come_from_the_recipe_and_unknown_keys_are_errors():
    assert quality_reason("too short to keep", QualityThresholds.from_dict({"min_words": 3})) \
        is None
    with pytest.raises(ValueError, match="unknown filter thresholds.*min_wrods"):
        QualityThresholds.from_dict({"min_wrods": 3})
