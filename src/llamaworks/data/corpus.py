"""The bundled public-domain corpus (see corpus/PROVENANCE.md): KJV Bible and the Jargon File."""

from __future__ import annotations

import lzma
import re
from collections.abc import Iterator
from pathlib import Path

CORPUS_DIR = Path(__file__).parent / "corpus"
BUNDLED = ("kjv", "jargon")


def raw_text(name: str) -> str:
    """The raw extracted text of a bundled source."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled corpus {name!r}; choose one of {', '.join(BUNDLED)}")
    with lzma.open(CORPUS_DIR / f"{name}.txt.xz", "rt", encoding="utf-8") as f:
        return f.read()


def _split(text: str, starts: re.Pattern[str]) -> Iterator[str]:
    bounds = [m.start() for m in starts.finditer(text)]
    for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True):
        doc = text[a:b].strip()
        if doc:
            yield doc


def bundled_documents(name: str) -> Iterator[dict[str, str]]:
    """Documents of a bundled source: KJV one per chapter, the Jargon File one per entry."""
    text = raw_text(name)
    if name == "kjv":
        pattern = re.compile(r"^(?=\S[^\n]* \d+\n)", re.M)  # "Genesis 1", "1 Kings 3"
        docs = _split(text, pattern)
        # verse numbers are formatting, not text: "  3 And God said" -> "And God said"
        docs = (re.sub(r"^ +\d+ ", "", d, flags=re.M) for d in docs)
    else:
        docs = _split(text, re.compile(r"(?<=\n\n)(?=\S)"))
    for i, d in enumerate(docs):
        yield {"id": f"{name}/{i}", "text": d}
