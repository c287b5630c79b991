"""Document readers: bundled corpus, directory of .txt, JSONL (.jsonl/.gz/.zst), Parquet, and
MediaWiki XML dumps. Each yields `{"id": str, "text": str}` dicts."""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from llamaworks.errors import LlamaworksError

Doc = dict[str, str]
KINDS = ("bundled", "txt", "jsonl", "parquet", "mediawiki")


def _open_text(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise LlamaworksError(f"{path}: reading .zst needs `pip install zstandard`") from None
        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))  # noqa: SIM115
        return io.TextIOWrapper(raw, encoding="utf-8")
    if path.name.endswith(".xz"):
        import lzma
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")  # noqa: SIM115


def read_txt_dir(path: str | Path) -> Iterator[Doc]:
    """Every `*.txt` file under `path` (recursively, sorted) is one document."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(root.rglob("*.txt"))
    for f in files:
        yield {"id": str(f.relative_to(root) if f != root else f.name),
               "text": f.read_text(encoding="utf-8", errors="replace")}


def _files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))


def read_jsonl(path: str | Path, text_field: str = "text") -> Iterator[Doc]:
    """JSON lines (plain, .gz or .zst), one document per line, text in `text_field`."""
    for f in _files(Path(path), (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".jsonl.xz")):
        with _open_text(f) as fh:
            for n, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LlamaworksError(f"{f}:{n + 1}: invalid JSON ({e.msg}); each line must "
                                          "be one JSON object") from None
                if text_field not in row:
                    raise LlamaworksError(f"{f}:{n + 1}: no field {text_field!r} (fields: "
                                          f"{', '.join(row)}); set text_field in the recipe")
                yield {"id": str(row.get("id", f"{f.name}:{n}")), "text": str(row[text_field])}


def read_parquet(path: str | Path, text_field: str = "text") -> Iterator[Doc]:
    """Parquet files (one or a directory), text in column `text_field`."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LlamaworksError("reading Parquet needs `pip install pyarrow`") from None
    for f in _files(Path(path), (".parquet",)):
        pf = pq.ParquetFile(f)
        if text_field not in pf.schema_arrow.names:
            raise LlamaworksError(f"{f}: no column {text_field!r} (columns: "
                                  f"{', '.join(pf.schema_arrow.names)}); set text_field")
        n = 0
        for batch in pf.iter_batches(columns=[text_field]):
            for t in batch.column(0).to_pylist():
                if t is not None:
                    yield {"id": f"{f.name}:{n}", "text": t}
                n += 1


_WIKI_MARKUP = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>]*/>"), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"\{\{[^{}]*\}\}"), ""),  # templates (innermost first, repeated below)
    (re.compile(r"\[\[(?:File|Image|Category):[^\]]*\]\]"), ""),
    (re.compile(r"\[\[[^\]|]*\|([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[\[([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"<[^>]+>"), ""),
]


def wikitext_to_text(wikitext: str) -> str:
    """Plain text from wikitext: drops templates, refs, files, categories; keeps link labels."""
    t = wikitext
    for _ in range(3):  # nested templates
        t = _WIKI_MARKUP[3][0].sub("", t)
    for pat, rep in _WIKI_MARKUP:
        t = pat.sub(rep, t)
    return re.sub(r"\n{3,}", "\n\n", t).strip()


def read_mediawiki(path: str | Path) -> Iterator[Doc]:
    """A MediaWiki XML dump (`pages-articles.xml[.bz2|.gz]`): main-namespace pages, no
    redirects, markup stripped."""
    import xml.etree.ElementTree as ET

    for f in _files(Path(path), (".xml", ".xml.bz2", ".xml.gz")):
        if f.name.endswith(".bz2"):
            import bz2
            fh: IO[bytes] = bz2.open(f, "rb")
        elif f.name.endswith(".gz"):
            fh = gzip.open(f, "rb")
        else:
            fh = open(f, "rb")  # noqa: SIM115
        with fh:
            title = ns = None
            redirect = False
            for _event, el in ET.iterparse(fh, events=("end",)):
                tag = el.tag.rsplit("}", 1)[-1]
                if tag == "title":
                    title = el.text or ""
                elif tag == "ns":
                    ns = el.text
                elif tag == "redirect":
                    redirect = True
                elif tag == "text":
                    text = el.text or ""
                    if ns in (None, "0") and not redirect and not text.lstrip().upper(
                    ).startswith("#REDIRECT"):
                        body = wikitext_to_text(text)
                        if body:
                            yield {"id": str(title), "text": f"{title}\n\n{body}"}
                elif tag == "page":
                    title, ns, redirect = None, None, False
                    el.clear()


def read_source(kind: str, path: str, text_field: str = "text") -> Iterator[Doc]:
    """Dispatch on `kind` (one of KINDS). For `bundled`, `path` is the corpus name."""
    if kind == "bundled":
        from llamaworks.data.corpus import bundled_documents
        return bundled_documents(path)
    p = Path(path).expanduser()
    if not p.exists():
        raise LlamaworksError(f"source path {p} does not exist; download the data there or fix "
                              "`path` in the recipe")
    if kind == "txt":
        return read_txt_dir(p)
    if kind == "jsonl":
        return read_jsonl(p, text_field)
    if kind == "parquet":
        return read_parquet(p, text_field)
    if kind == "mediawiki":
        return read_mediawiki(p)
    raise LlamaworksError(f"unknown source kind {kind!r}; use one of {', '.join(KINDS)}")
