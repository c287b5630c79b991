"""Deduplication: exact (hash of whitespace-normalized text) and near (MinHash LSH over word
5-gram shingles, via `datasketch`).

The per-document part (normalization, `exact_key`, `minhash_signature`) is pure, so `prepare`
computes it in worker processes; the stateful part (the set of seen keys, the LSH index) stays in
one process and sees documents in input order. Both indexes hold exactly the *kept* documents, so
either can be rebuilt by replaying the kept output (how an interrupted `prepare` resumes)."""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Any

import numpy as np

from llamaworks.errors import LlamaworksError


def normalized(text: str) -> str:
    """Lower-cased, whitespace runs collapsed to one space: what both dedups compare."""
    return re.sub(r"\s+", " ", text).strip().lower()


def exact_key(norm: str) -> bytes:
    """16-byte hash of an already `normalized` text."""
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest()


def _datasketch() -> Any:
    try:
        import datasketch
    except ImportError:
        raise LlamaworksError("near dedup needs `pip install datasketch`, or set "
                              "near = false under [dedup] in the recipe") from None
    return datasketch


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[Any, str]:
    """The seeded MinHash permutations (and scheme), built once per process: creating them per
    document costs more than hashing a short document."""
    m = _datasketch().MinHash(num_perm=num_perm, seed=seed)
    return m.permutations, m.scheme


def minhash_signature(norm: str, num_perm: int = 128, ngram: int = 5, seed: int = 1
                      ) -> np.ndarray:
    """MinHash hash values over the word `ngram` shingles of an already `normalized` text.
    Pure: the same text gives the same signature in any process."""
    words = norm.split(" ")
    shingles = {" ".join(words[i:i + ngram]) for i in range(max(1, len(words) - ngram + 1))}
    perms, scheme = _permutations(num_perm, seed)
    m = _datasketch().MinHash(num_perm=num_perm, seed=seed, permutations=perms, scheme=scheme)
    m.update_batch([s.encode("utf-8") for s in shingles])
    return m.hashvalues


class ExactDedup:
    """`seen(text)` is True for a text whose normalized form was seen before."""

    def __init__(self) -> None:
        self._hashes: set[bytes] = set()

    def __contains__(self, key: bytes) -> bool:
        return key in self._hashes

    def add(self, key: bytes) -> None:
        self._hashes.add(key)

    def seen(self, text: str) -> bool:
        h = exact_key(normalized(text))
        if h in self._hashes:
            return True
        self._hashes.add(h)
        return False


class NearDedup:
    """`seen(text)` is True when a previous text has estimated Jaccard similarity >= threshold
    over word n-gram shingles. Deterministic (fixed MinHash seed)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5,
                 seed: int = 1) -> None:
        self.lsh = _datasketch().MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        self._n = 0

    def signature(self, text: str) -> np.ndarray:
        return minhash_signature(normalized(text), self.num_perm, self.ngram, self.seed)

    def _minhash(self, sig: np.ndarray) -> Any:  # -> datasketch.MinHash
        perms, scheme = _permutations(self.num_perm, self.seed)
        return _datasketch().MinHash(num_perm=self.num_perm, seed=self.seed, hashvalues=sig,
                                     permutations=perms, scheme=scheme)

    def near(self, sig: np.ndarray) -> bool:
        """Whether an indexed text is similar to the one with signature `sig` (no insert)."""
        return bool(self.lsh.query(self._minhash(sig)))

    def insert(self, sig: np.ndarray) -> None:
        self.lsh.insert(str(self._n), self._minhash(sig))
        self._n += 1

    def seen(self, text: str) -> bool:
        sig = self.signature(text)
        if self.near(sig):
            return True
        self.insert(sig)
        return False
