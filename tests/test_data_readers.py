"""Readers: txt directories, JSONL (.gz/.zst), Parquet, MediaWiki XML dumps; cleaning."""

from __future__ import annotations

import gzip
import json

import pytest

from llamaworks.data.clean import clean_text
from llamaworks.data.readers import read_jsonl, read_mediawiki, read_parquet, read_txt_dir
from llamaworks.errors import LlamaworksError

ROWS = [{"id": "a", "body": "first doc"}, {"id": "b", "body": "second doc ü"}]


def _jsonl_bytes() -> bytes:
    return "".join(json.dumps(r) + "\n" for r in ROWS).encode()


def test_txt_dir_yields_one_document_per_file_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub" / "a.txt").write_text("ay")
    (tmp_path / "skip.md").write_text("no")
    assert [d["text"] for d in read_txt_dir(tmp_path)] == ["bee", "ay"]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_reads_plain_gzip_and_zstd_with_a_configurable_field(tmp_path, suffix):
    import zstandard

    data = _jsonl_bytes()
    data = {".jsonl": data, ".jsonl.gz": gzip.compress(data),
            ".jsonl.zst": zstandard.ZstdCompressor().compress(data)}[suffix]
    p = tmp_path / f"x{suffix}"
    p.write_bytes(data)
    docs = list(read_jsonl(p, text_field="body"))
    assert [d["text"] for d in docs] == ["first doc", "second doc ü"]
    assert [d["id"] for d in docs] == ["a", "b"]


def test_jsonl_missing_field_names_the_field_and_the_fix(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(_jsonl_bytes())
    with pytest.raises(LlamaworksError, match="no field 'text'.*text_field"):
        list(read_jsonl(p))


@pytest.mark.slow
def test_parquet_reads_the_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x y", None, "z"]}), tmp_path / "d.parquet")
    assert [d["text"] for d in read_parquet(tmp_path, "content")] == ["x y", "z"]


DUMP = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
<page><title>Alan Turing</title><ns>0</ns><revision><text>'''Alan Turing''' was a
[[mathematician]] and [[computer science|computer scientist]].{{Infobox|x={{y}}}}&lt;ref&gt;c
&lt;/ref&gt;
== Life ==
Born in [[London]].[[Category:People]]</text></revision></page>
<page><title>Turing</title><ns>0</ns><redirect title="Alan Turing"/><revision>
<text>#REDIRECT [[Alan Turing]]</text></revision></page>
<page><title>Talk:Alan Turing</title><ns>1</ns><revision><text>chat</text></revision></page>
</mediawiki>"""


def test_mediawiki_dump_keeps_articles_strips_markup_skips_redirects_and_talk(tmp_path):
    import bz2

    p = tmp_path / "wiki.xml.bz2"
    p.write_bytes(bz2.compress(DUMP.encode()))
    docs = list(read_mediawiki(p))
    assert len(docs) == 1
    assert docs[0]["text"] == ("Alan Turing\n\nAlan Turing was a\nmathematician and computer "
                               "scientist.\nLife\nBorn in London.")


def test_clean_text_normalizes_to_nfc_and_drops_control_characters():
    assert clean_text("Cafe\u0301\x00 ok\x1b\r\nnext  \n") == "Caf\u00e9 ok\nnext"
    assert clean_text("tab\tkept") == "tab\tkept"


GOOD = json.dumps({"text": "a good line"}).encode() + b"\n"
BAD_LINES = {  # what line 2 of a JSONL file holds -> what the error says about it
    "an array": (b"[1, 2, 3]\n", "an array, not a JSON object"),
    "a number": (b"42\n", "a number, not a JSON object"),
    "invalid UTF-8": (b'{"text": "caf\xe9"}\n', "invalid UTF-8 (byte 0xe9)"),
    "binary data": (b"\x00\x01\x02\xff\x00\n", "binary data (a NUL byte)"),
    "a null text": (b'{"text": null}\n', "field 'text' is null, not a string"),
}


@pytest.mark.parametrize("bad", list(BAD_LINES))
def test_a_bad_jsonl_line_stops_the_reader_naming_the_file_the_line_and_the_setting(tmp_path,
                                                                                    bad):
    line, says = BAD_LINES[bad]
    p = tmp_path / "x.jsonl"
    p.write_bytes(GOOD + line + GOOD)
    with pytest.raises(LlamaworksError) as info:
        list(read_jsonl(p))
    msg = str(info.value)
    assert msg.startswith(f"{p}:2: ") and says in msg and 'bad_records = "skip"' in msg


def test_skipping_bad_records_keeps_their_places_and_warns_naming_each(tmp_path):
    p = tmp_path / "x.jsonl.gz"
    p.write_bytes(gzip.compress(GOOD + b"[1]\n" + GOOD + b"7\n"))
    with pytest.warns(UserWarning) as warned:
        docs = list(read_jsonl(p, skip_bad=True))
    assert [d["text"] for d in docs] == ["a good line", None, "a good line", None]
    assert [d["id"] for d in docs if d["text"] is None] == [f"{p}:2", f"{p}:4"]
    assert [str(w.message).split(": ")[0] for w in warned] == [f"{p}:2", f"{p}:4"]


def test_a_binary_txt_file_is_a_bad_record_named_with_its_line(tmp_path):
    (tmp_path / "a.txt").write_text("fine text")
    (tmp_path / "b.txt").write_bytes(b"one\ntwo\n\x00\x00\xff")
    with pytest.raises(LlamaworksError, match=r"b\.txt:3: binary data"):
        list(read_txt_dir(tmp_path))
    with pytest.warns(UserWarning, match=r"b\.txt:3"):
        assert [d["text"] for d in read_txt_dir(tmp_path, skip_bad=True)] == ["fine text", None]


def test_a_truncated_gzip_or_a_broken_xml_dump_stops_naming_the_file(tmp_path):
    p = tmp_path / "x.jsonl.gz"
    p.write_bytes(gzip.compress(GOOD * 2000)[:-40])
    with pytest.raises(LlamaworksError, match=rf"{p}: unreadable after line \d+ \(EOFError"):
        list(read_jsonl(p))
    x = tmp_path / "dump.xml"
    x.write_text("<mediawiki>\n<page><title>A</title>\n<text>body</oops>\n")
    with pytest.raises(LlamaworksError, match=rf"{x}:3: invalid XML"):
        list(read_mediawiki(x))
