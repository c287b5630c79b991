"""Deduplication: exact (hash of whitespace-normalized text) and near (MinHash LSH over word
5-gram shingles, via `datasketch`)."""

from __future__ import annotations

import hashlib
import re

from llamaworks.errors import LlamaworksError


def _normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


class ExactDedup:
    """`seen(text)` is True for a text whose normalized form was seen before."""

    def __init__(self) -> None:
        self._hashes: set[bytes] = set()

    def seen(self, text: str) -> bool:
        h = hashlib.blake2b(_normalized(text).encode("utf-8"), digest_size=16).digest()
        if h in self._hashes:
            return True
        self._hashes.add(h)
        return False


class NearDedup:
    """`seen(text)` is True when a previous text has estimated Jaccard similarity >= threshold
    over word n-gram shingles. Deterministic (fixed MinHash seed)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5,
                 seed: int = 1) -> None:
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError:
            raise LlamaworksError("near dedup needs `pip install datasketch`, or set "
                                  "near = false under [dedup] in the recipe") from None
        self._MinHash = MinHash
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        self._n = 0

    def _minhash(self, text: str):  # -> datasketch.MinHash
        words = _normalized(text).split(" ")
        k = self.ngram
        shingles = {" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))}
        m = self._MinHash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch([s.encode("utf-8") for s in shingles])
        return m

    def seen(self, text: str) -> bool:
        m = self._minhash(text)
        if self.lsh.query(m):
            return True
        self.lsh.insert(str(self._n), m)
        self._n += 1
        return False
