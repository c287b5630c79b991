"""Meta's Llama 3 `tokenizer.model` (tiktoken format) as an HF `tokenizers` byte-level BPE.

The file is one `<base64 token bytes> <rank>` line per token, ranks 0..n-1 (128000 for Llama 3).
tiktoken merges, inside each pre-token, the adjacent pair whose concatenation has the lowest rank;
an HF BPE does the same when its merges are every (left, right) split of every token whose halves
are tokens too, ordered by the merged token's rank (the derivation of transformers'
`TikTokenConverter`), with `ignore_merges` (a pre-token that is a token is taken whole, as tiktoken
does). Token strings are the GPT-2 byte-to-unicode spelling of the bytes, as in Llama 3's
tokenizer.json and GGUF. Meta's 256 special tokens follow the ranks (ids n..n+255), named as in
Meta's llama3 `tokenizer.py`; the pre-tokenizer is Llama 3's regex as llama.cpp applies it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

from llamaworks.errors import TokenizerError
from llamaworks.tokenizer import pretokenize

NUM_RESERVED_SPECIAL_TOKENS = 256
# Meta's llama3 tokenizer.py: the named special tokens, then reserved ones up to 256 in all.
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>",  # end of turn
    *(f"<|reserved_special_token_{i}|>" for i in range(5, NUM_RESERVED_SPECIAL_TOKENS - 5)))
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?\n?")


@lru_cache(maxsize=1)
def byte_to_unicode() -> tuple[str, ...]:
    """GPT-2's printable spelling of each byte value (what byte-level BPE vocabularies store)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return tuple(out[b] for b in range(256))


def token_string(data: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in data)


def is_tiktoken_file(path: str | os.PathLike[str]) -> bool:
    """True when the file starts with a `<base64> <rank>` line (a SentencePiece model is a
    binary protobuf)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    first = head.split(b"\n", 1)[0] + (b"\n" if b"\n" in head else b"")
    return bool(first) and _LINE.fullmatch(first) is not None


def read_tiktoken_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """{token bytes: rank} of a tiktoken file; the ranks must be 0..n-1 (they become the ids)."""
    p = Path(path)
    if not p.is_file():
        raise TokenizerError(f"{p}: no such tiktoken tokenizer.model")
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(p.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{p}:{n}: not a tiktoken line (expected '<base64 bytes> "
                                 f"<rank>'): {line[:60]!r}") from None
        if token in ranks:
            raise TokenizerError(f"{p}:{n}: token {token!r} appears twice; the file is corrupt")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{p}: ranks are not 0..{len(ranks) - 1} without gaps or repeats; "
                             "llamaworks uses the ranks as token ids")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{p}: {len(missing)} single bytes have no token (first: "
                             f"{missing[0]:#04x}); a byte-level BPE needs all 256")
    return ranks


def merges_from_ranks(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every (left, right) split of every token whose halves are tokens, ordered by the merged
    token's rank, then by the halves' ranks (as transformers' TikTokenConverter orders them)."""
    out: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            lr, rr = ranks.get(left), ranks.get(right)
            if lr is not None and rr is not None:
                out.append((rank, lr, rr, left, right))
    out.sort()
    return [(m[3], m[4]) for m in out]


def build_tiktoken_backend(ranks: Mapping[bytes, int], special_tokens: Sequence[str],
                           pre: str = "llama-bpe") -> HFTokenizer:
    """An HF tokenizer equal to tiktoken's encoding of `ranks` with Llama 3's regex; the
    special tokens get ids len(ranks), len(ranks)+1, ..."""
    vocab = {token_string(t): r for t, r in ranks.items()}
    merges = [(token_string(a), token_string(b)) for a, b in merges_from_ranks(ranks)]
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                       ignore_merges=True)
    tok = HFTokenizer(model)
    tok.pre_tokenizer = pretokenize.byte_level_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=False,
                                       rstrip=False, single_word=False) for t in special_tokens])
    n = len(ranks)
    for i, t in enumerate(special_tokens):
        if tok.token_to_id(t) != n + i:
            raise TokenizerError(f"special token {t!r} would not get id {n + i}; is it also one "
                                 "of the file's ranked tokens?")
    return tok
