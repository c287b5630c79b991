"""Exact and near (MinHash LSH) deduplication on planted duplicates."""

from __future__ import annotations

from llamaworks.data.corpus import bundled_documents
from llamaworks.data.dedup import ExactDedup, NearDedup


def _chapters(n: int) -> list[str]:
    return [d["text"] for _, d in zip(range(n), bundled_documents("kjv"), strict=False)]


def test_exact_dedup_ignores_whitespace_and_case_only():
    d = ExactDedup()
    assert not d.seen("Hello   world\n")
    assert d.seen("hello world")
    assert not d.seen("hello world!")


def test_near_dedup_catches_planted_near_duplicates_and_keeps_distinct_documents():
    docs = _chapters(30)
    near = NearDedup(threshold=0.8)
    assert [near.seen(t) for t in docs] == [False] * 30  # 30 distinct chapters survive
    for t in docs[:10]:  # a few words changed at the end: ~97% shingle overlap
        words = t.split()
        edited = " ".join(words[:-3] + ["amen", "selah", "indeed"])
        assert near.seen(edited)
    assert not near.seen(" ".join(docs[3].split()[::-1]))  # same words, different text
