"""Text cleaning: Unicode NFC normalization and control-character removal."""

from __future__ import annotations

import re
import unicodedata

# C0/C1 controls except tab and newline; carriage returns become newlines first.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def clean_text(text: str) -> str:
    """NFC-normalize, unify line endings, drop control characters, strip trailing spaces."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    return re.sub(r"[ \t]+\n", "\n", text).strip()
