"""Document readers: bundled corpus, directory of .txt, JSONL (.jsonl/.gz/.zst), Parquet, and
MediaWiki XML dumps. Each yields `{"id": str, "text": str}` dicts.

A record that cannot be a document (a binary .txt file, a line of invalid UTF-8, a JSONL line
that is not a JSON object or has no string text) is named by file and line: by default the reader
stops with a `LlamaworksError`; with `skip_bad=True` it warns (the first few per file) and yields
`{"id": "FILE:LINE", "text": None}` in the record's place, so the caller counts it in order."""

from __future__ import annotations

import gzip
import io
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from llamaworks.errors import LlamaworksError

Doc = dict[str, Any]  # {"id": str, "text": str}; "text" is None for a skipped bad record
KINDS = ("bundled", "txt", "jsonl", "parquet", "mediawiki")
WARN_BAD = 5  # bad records named one by one per file when skipping them


def _open_bytes(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed (.gz, .zst, .xz). Lines are decoded one at a time, so an
    invalid byte is reported at its line instead of ending the file."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise LlamaworksError(f"{path}: reading .zst needs `pip install zstandard`") from None
        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))  # noqa: SIM115
        return io.BufferedReader(raw)
    if path.name.endswith(".xz"):
        import lzma
        return lzma.open(path, "rb")
    return open(path, "rb")  # noqa: SIM115


class BadRecords:
    """A bad record: stop (the default), or warn about the first few per file and skip it."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.seen: dict[Path, int] = {}

    def __call__(self, f: Path, line: int, reason: str) -> Doc:
        where = f"{f}:{line}"
        if not self.skip:
            raise LlamaworksError(f"{where}: {reason}; fix or remove that record, or set "
                                  "bad_records = \"skip\" in the recipe's [data] to skip such "
                                  "records (the report counts them)")
        n = self.seen[f] = self.seen.get(f, 0) + 1
        if n <= WARN_BAD:
            more = f"; further bad records in {f.name} are skipped silently" \
                if n == WARN_BAD else ""
            warnings.warn(f"{where}: {reason}; skipped{more}", stacklevel=3)
        return {"id": where, "text": None}


def _decode(raw: bytes) -> tuple[str | None, int, str]:
    """(text, -1, "") or (None, offset of the first bad byte, what is wrong)."""
    if (nul := raw.find(b"\0")) >= 0:
        return None, nul, "binary data (a NUL byte), not text"
    try:
        return raw.decode("utf-8"), -1, ""
    except UnicodeDecodeError as e:
        return None, e.start, f"invalid UTF-8 (byte 0x{raw[e.start]:02x})"


def read_txt_dir(path: str | Path, skip_bad: bool = False) -> Iterator[Doc]:
    """Every `*.txt` file under `path` (recursively, sorted) is one document."""
    root = Path(path)
    bad = BadRecords(skip_bad)
    files = [root] if root.is_file() else sorted(root.rglob("*.txt"))
    for f in files:
        raw = f.read_bytes()
        text, at, why = _decode(raw)
        if text is None:
            yield bad(f, raw.count(b"\n", 0, at) + 1, why)
            continue
        yield {"id": str(f.relative_to(root) if f != root else f.name), "text": text}


def _files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))


def _jsonl_doc(f: Path, n: int, raw: bytes, text_field: str) -> Doc | str:
    """The document on line `n` of `f`, or why that line is not one."""
    line, _, why = _decode(raw)
    if line is None:
        return why
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return f"invalid JSON ({e.msg}); each line must be one JSON object"
    if not isinstance(row, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean"}.get(type(row), "a number")
        return f"{kind if row is not None else 'null'}, not a JSON object; each line must be one"
    if text_field not in row:
        return f"no field {text_field!r} (fields: {', '.join(row)}); set text_field in the recipe"
    if not isinstance(row[text_field], str):
        return f"field {text_field!r} is {json.dumps(row[text_field])[:40]}, not a string"
    return {"id": str(row.get("id", f"{f.name}:{n - 1}")), "text": row[text_field]}


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    import lzma

    errors: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError)
    try:
        import zstandard
    except ImportError:
        return errors
    return (*errors, zstandard.ZstdError)


def read_jsonl(path: str | Path, text_field: str = "text", skip_bad: bool = False
               ) -> Iterator[Doc]:
    """JSON lines (plain, .gz or .zst), one document per line, text in `text_field`."""
    bad = BadRecords(skip_bad)
    for f in _files(Path(path), (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".jsonl.xz")):
        n = 0
        try:
            with _open_bytes(f) as fh:
                for n, raw in enumerate(fh, 1):
                    if raw.strip():
                        doc = _jsonl_doc(f, n, raw, text_field)
                        yield bad(f, n, doc) if isinstance(doc, str) else doc
        except _corrupt_errors() as e:  # truncated or corrupt (compressed) data
            raise LlamaworksError(f"{f}: unreadable after line {n} ({type(e).__name__}: {e})"
                                  ) from None


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
    for f in _files(Path(path), (".xml", ".xml.bz2", ".xml.gz")):
        if f.name.endswith(".bz2"):
            import bz2
            fh: IO[bytes] = bz2.open(f, "rb")
        elif f.name.endswith(".gz"):
            fh = gzip.open(f, "rb")
        else:
            fh = open(f, "rb")  # noqa: SIM115
        with fh:
            yield from _wiki_pages(f, fh)


def _wiki_pages(f: Path, fh: IO[bytes]) -> Iterator[Doc]:
    import xml.etree.ElementTree as ET

    title = ns = None
    redirect = False
    try:
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
    except ET.ParseError as e:  # not XML, or cut off: no later page can be found
        raise LlamaworksError(f"{f}:{e.position[0]}: invalid XML ({e}); a MediaWiki dump "
                              "must be one well-formed XML document") from None
    except (OSError, EOFError) as e:
        raise LlamaworksError(f"{f}: unreadable ({type(e).__name__}: {e})") from None


def read_source(kind: str, path: str, text_field: str = "text", skip_bad: bool = False
                ) -> Iterator[Doc]:
    """Dispatch on `kind` (one of KINDS). For `bundled`, `path` is the corpus name; `skip_bad`
    as the module docstring says (txt and JSONL; a broken Parquet or XML file always stops)."""
    if kind == "bundled":
        from llamaworks.data.corpus import bundled_documents
        return bundled_documents(path)
    p = Path(path).expanduser()
    if not p.exists():
        raise LlamaworksError(f"source path {p} does not exist; download the data there or fix "
                              "`path` in the recipe")
    if kind == "txt":
        return read_txt_dir(p, skip_bad)
    if kind == "jsonl":
        return read_jsonl(p, text_field, skip_bad)
    if kind == "parquet":
        return read_parquet(p, text_field)
    if kind == "mediawiki":
        return read_mediawiki(p)
    raise LlamaworksError(f"unknown source kind {kind!r}; use one of {', '.join(KINDS)}")
