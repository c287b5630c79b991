"""The bundled corpus: size, sources, provenance hashes, document splitting."""

from __future__ import annotations

import hashlib
import lzma
import re

from llamaworks.data.corpus import BUNDLED, CORPUS_DIR, bundled_documents


def test_bundled_corpus_is_at_least_5mb_from_two_sources_and_small_compressed():
    raw = {n: lzma.decompress((CORPUS_DIR / f"{n}.txt.xz").read_bytes()) for n in BUNDLED}
    assert len(raw) >= 2
    assert sum(map(len, raw.values())) >= 5_000_000
    assert sum((CORPUS_DIR / f"{n}.txt.xz").stat().st_size for n in BUNDLED) < 3_000_000


def test_provenance_lists_the_sha256_of_raw_and_compressed_files():
    prov = (CORPUS_DIR / "PROVENANCE.md").read_text()
    for n in BUNDLED:
        comp = (CORPUS_DIR / f"{n}.txt.xz").read_bytes()
        assert hashlib.sha256(comp).hexdigest() in prov
        assert hashlib.sha256(lzma.decompress(comp)).hexdigest() in prov
    assert re.search(r"public domain", prov, re.I)


def test_kjv_splits_into_its_1189_chapters_without_verse_numbers():
    docs = list(bundled_documents("kjv"))
    assert len(docs) == 1189
    assert docs[0]["text"].startswith("Genesis 1\n\nIn the beginning God created")
    assert docs[-1]["text"].startswith("Revelation 22\n")
    assert not re.search(r"^\s*\d+ ", docs[0]["text"].split("\n\n", 1)[1], re.M)


def test_jargon_file_splits_into_entries():
    docs = {d["text"].split("\n", 1)[0]: d["text"] for d in bundled_documents("jargon")}
    assert len(docs) > 2000
    assert "black hole" in docs["/dev/null"]
